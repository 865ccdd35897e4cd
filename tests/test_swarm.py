"""Agent Swarm against a real server (demo checkpoint, CPU). The demo's random weights cannot plan,
so ScriptedDecisions stands in for the model's *decisions* only: every AgentStep still goes over
gRPC to the server, which renders, prefills (mostly from the prefix cache) and generates."""

from __future__ import annotations

import asyncio
import collections
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kimi_grpc.client import AsyncKimiClient, KimiClient
from kimi_grpc.swarm import (
    Act,
    Call,
    ScriptedDecisions,
    Swarm,
    SwarmConfig,
    Tool,
    ToolRegistry,
)
from kimi_grpc.swarm.journal import JOURNAL_FILE, Journal, RunState, read_records
from tests.server_harness import ServerProcess, start_server

# A long shared system prompt, as real agent prompts are: the fan-out must hit it in the cache.
SYSTEM = "You are a careful sub-agent: check every answer twice and report tersely. " * 40


def config(**overrides) -> SwarmConfig:
    return SwarmConfig(**{"max_tokens": 4, "system_prompt": SYSTEM, "backoff_s": 0.2, **overrides})


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    srv = start_server("--max-num-seqs", "256", "--max-queued-requests", "256")
    yield srv
    srv.terminate()


def journal_steps(run_dir: Path) -> collections.Counter:
    return collections.Counter(
        (r["agent"], r["step"]) for r in read_records(run_dir) if r["type"] == "step"
    )


def wait_idle(client: KimiClient, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.server_status()
        if status.kv_pages_used == 0 and status.running == 0 and status.waiting == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"server not idle: {client.server_status()}")


def test_300_subagents_5_steps_each(server: ServerProcess, tmp_path: Path) -> None:
    calls: collections.Counter = collections.Counter()

    def record(agent: int, step: int) -> str:
        """Record that a sub-agent's step ran its tool."""
        calls[(agent, step)] += 1
        return f"recorded {agent}/{step}"

    sync = KimiClient(server.target)
    wait_idle(sync)
    before = sync.server_status()

    async def run() -> dict:
        async with AsyncKimiClient(server.target) as client:
            swarm = Swarm(
                client,
                ToolRegistry([record]),
                tmp_path / "run",
                config(max_parallel=300),
                decisions=ScriptedDecisions(300, 5, "record"),
            )
            return await swarm.run("Check 300 things")

    report = asyncio.run(run())
    assert report["done"] and report["outcomes"] == {"done": 300}
    steps = journal_steps(tmp_path / "run")
    assert steps == collections.Counter({(a, s): 1 for a in range(300) for s in range(1, 6)})
    assert calls == collections.Counter({(a, s): 1 for a in range(300) for s in range(1, 5)})
    records = read_records(tmp_path / "run")
    assert [r["type"] for r in records].count("agent_done") == 300
    assert records[-2]["type"] == "synthesis" and records[-1]["type"] == "run_done"
    # every step's final came back exactly once and nothing is left running on the server
    assert report["totals"]["steps"] == 1500 and report["totals"]["retries"] == 0
    wait_idle(sync)
    after = sync.server_status()
    assert after.kv_pages_used == before.kv_pages_used == 0
    # the shared prefix is computed once: >= 90% of the swarm's prompt tokens came from cache
    prompt = after.prompt_tokens_total - before.prompt_tokens_total
    cached = after.cached_tokens_total - before.cached_tokens_total
    assert cached / prompt >= 0.90, (cached, prompt)
    journaled = report["totals"]
    assert journaled["cached_tokens"] / journaled["prompt_tokens"] >= 0.90
    sync.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_restart_mid_run_is_retried(tmp_path: Path) -> None:
    port = _free_port()
    srv = start_server("--port", str(port))
    restarted: list[ServerProcess] = []
    try:

        async def run() -> dict:
            async with AsyncKimiClient(srv.target) as client:
                swarm = Swarm(
                    client,
                    ToolRegistry([Tool.from_function(lambda agent, step: "ok", name="noop")]),
                    tmp_path / "run",
                    config(max_parallel=20, max_retries=40, backoff_max_s=1.0),
                    decisions=ScriptedDecisions(20, 6, "noop"),
                )
                task = asyncio.create_task(swarm.run("survive a restart"))
                while swarm.progress.steps < 30:
                    await asyncio.sleep(0.02)
                srv.proc.kill()  # a crash, not a drain
                srv.proc.wait()
                restarted.append(await asyncio.to_thread(start_server, "--port", str(port)))
                return await task

        report = asyncio.run(run())
        assert report["done"] and report["outcomes"] == {"done": 20}
        assert report["totals"]["retries"] > 0
        steps = journal_steps(tmp_path / "run")
        assert steps == collections.Counter({(a, s): 1 for a in range(20) for s in range(1, 7)})
    finally:
        srv.terminate()
        for s in restarted:
            s.terminate()


TOOLS_PY = """
import json, os
LOG = os.environ["SWARM_TOOL_LOG"]

def record(agent: int, step: int) -> str:
    '''Append the call to the log.'''
    with open(LOG, "a") as f:
        f.write(json.dumps([agent, step]) + "\\n")
    return "ok"

TOOLS = [record]
"""


def test_killed_orchestrator_resumes_without_repeating_finished_steps(
    server: ServerProcess, tmp_path: Path
) -> None:
    tools = tmp_path / "tools.py"
    tools.write_text(TOOLS_PY)
    log = tmp_path / "tool-calls.jsonl"
    run_dir = tmp_path / "run"
    env = {**__import__("os").environ, "SWARM_TOOL_LOG": str(log)}
    args = [
        "--target", server.target, "--tools", str(tools), "--max-tokens", "4",
        "--decisions", "kimi_grpc.swarm.decisions:ScriptedDecisions",
        "--decisions-args", '{"num_agents": 30, "steps_per_agent": 5, "tool": "record"}',
        "--system-prompt", SYSTEM, "--json",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "kimi_grpc.cli", "swarm"]
    first = subprocess.Popen([*cmd, "--task", "t", "--out", str(run_dir), *args], env=env)
    journal = run_dir / JOURNAL_FILE
    deadline = time.monotonic() + 120
    while sum(1 for _ in _lines(journal)) < 50 and time.monotonic() < deadline:
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = journal_steps(run_dir)
    assert 0 < sum(before.values()) < 150, "killed mid-run"
    resumed = subprocess.run(
        [*cmd, "--resume", str(run_dir), *args], env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert report["done"] and report["outcomes"] == {"done": 30}
    steps = journal_steps(run_dir)
    assert steps == collections.Counter({(a, s): 1 for a in range(30) for s in range(1, 6)})
    executed = collections.Counter(tuple(json.loads(line)) for line in _lines(log))
    for (agent, step), _ in before.items():
        if step < 5:  # a finished step's tool never runs again
            assert executed[(agent, step)] == 1, (agent, step)
    records = read_records(run_dir)
    assert [r["type"] for r in records].count("plan") == 1
    assert [r["type"] for r in records].count("run") == 1


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


class FailOne(ScriptedDecisions):
    """Agent 0 writes a malformed tool name into its history: its next step is INVALID_ARGUMENT."""

    def act(self, agent, turn):
        if agent.index == 0 and agent.step == 1:
            return Act((Call("functions.bad name:0", "bad name", "{}"),))
        return super().act(agent, turn)


def test_invalid_argument_fails_one_agent_without_retries(
    server: ServerProcess, tmp_path: Path
) -> None:
    async def run() -> dict:
        async with AsyncKimiClient(server.target) as client:
            swarm = Swarm(
                client,
                ToolRegistry([Tool.from_function(lambda agent, step: "ok", name="record")]),
                tmp_path / "run",
                config(max_parallel=8),
                decisions=FailOne(8, 3, "record"),
            )
            return await swarm.run("one bad apple")

    report = asyncio.run(run())
    assert report["outcomes"] == {"done": 7, "failed": 1}
    failed = report["agents"][0]
    assert failed["outcome"] == "failed" and "INVALID_ARGUMENT" in failed["error"]
    assert failed["retries"] == 0 and report["totals"]["retries"] == 0
    assert failed["steps"] == 1  # its first step finished; the second was refused
    (first,) = [
        r for r in read_records(tmp_path / "run") if r["type"] == "step" and r["agent"] == 0
    ]
    assert first["tool_results"][0]["result"].startswith("error: unknown tool 'bad name'")


def test_cancelling_the_run_cancels_every_stream(server: ServerProcess, tmp_path: Path) -> None:
    sync = KimiClient(server.target)
    wait_idle(sync)

    async def run() -> None:
        async with AsyncKimiClient(server.target) as client:
            swarm = Swarm(
                client,
                ToolRegistry([Tool.from_function(lambda agent, step: "ok", name="record")]),
                tmp_path / "run",
                config(max_parallel=50, max_tokens=200),
                decisions=ScriptedDecisions(50, 5, "record"),
            )
            task = asyncio.create_task(swarm.run("cancel me"))
            while swarm.progress.running < 50:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(run())
    wait_idle(sync)  # every in-flight AgentStep was cancelled and its pages freed
    state = RunState.load(tmp_path / "run")
    assert not state.done and all(not a.finished for a in state.agents)
    sync.close()


# ---- units ---------------------------------------------------------------------------------------
def test_tool_registry_errors_are_results(tmp_path: Path) -> None:
    def boom(x: int) -> str:
        raise RuntimeError("kaput")

    async def slow() -> str:
        await asyncio.sleep(5)
        return "late"

    failing = tmp_path / "fail.sh"
    failing.write_text("#!/bin/sh\necho oops >&2\nexit 3\n")
    failing.chmod(0o755)
    registry = ToolRegistry(
        [
            boom,
            Tool.from_function(slow, timeout_s=0.1),
            Tool(name="sh", command=(str(failing),)),
            Tool(name="missing", command=("/no/such/binary",)),
        ]
    )

    async def calls() -> list[str]:
        return [
            await registry.call("boom", '{"x": 1}'),
            await registry.call("slow", "{}"),
            await registry.call("sh", "{}"),
            await registry.call("missing", "{}"),
            await registry.call("nope", "{}"),
            await registry.call("boom", "{not json"),
            await registry.call("boom", "[1]"),
        ]

    results = asyncio.run(calls())
    assert results[0] == "error: boom raised RuntimeError: kaput"
    assert results[1].startswith("error: slow timed out")
    assert results[2] == "error: sh exited with 3: oops"
    assert results[3].startswith("error: missing could not start")
    assert results[4].startswith("error: unknown tool 'nope'")
    assert results[5].startswith("error: arguments are not valid JSON")
    assert results[6] == "error: arguments must be a JSON object"
    assert registry.tools["boom"].parameters == {
        "type": "object",
        "properties": {"x": {"type": "integer"}},
        "required": ["x"],
    }


def test_journal_survives_a_torn_last_line_and_rejects_gaps(tmp_path: Path) -> None:
    async def write() -> None:
        journal = Journal(tmp_path)
        await journal.append({"type": "run", "run_id": "r", "task": "t", "config": {}})
        await journal.append({"type": "plan", "subtasks": ["a", "b"]})
        await asyncio.gather(
            *(
                journal.append({"type": "step", "agent": a, "step": 1, "usage": {}})
                for a in range(2)
            )
        )
        journal.close()

    asyncio.run(write())
    path = tmp_path / JOURNAL_FILE
    with open(path, "ab") as f:
        f.write(b'{"type": "step", "agent": 0, "st')  # crash mid-write
    state = RunState.load(tmp_path)
    assert [len(a.steps) for a in state.agents] == [1, 1]
    Journal(tmp_path).close()  # reopening cuts the torn tail
    assert path.read_bytes().endswith(b"\n")
    gap = {"type": "step", "agent": 0, "step": 3, "usage": {}}
    with pytest.raises(ValueError, match="out of order"):
        state.apply(gap)
