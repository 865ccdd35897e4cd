"""`kimi-grpc generate --target`, `chat` and `agent` against a real server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kimi_grpc.cli_remote import load_tools, run_tool
from tests.server_harness import ServerProcess, start_server


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    srv = start_server()
    yield srv
    srv.terminate()


def kimi(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kimi_grpc.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_generate_target_streams_json_lines(server: ServerProcess) -> None:
    out = kimi(
        "generate", "--target", server.target, "--prompt", "Hello", "--max-tokens", "6",
        "--temperature", "0", "--ignore-eos", "--json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    *deltas, last = [json.loads(line) for line in out.stdout.splitlines()]
    assert sum(len(d["token_ids"]) for d in deltas) == 6
    assert last["finish_reason"] == "length" and last["completion_tokens"] == 6


def test_generate_target_error_is_a_clear_message(server: ServerProcess) -> None:
    out = kimi("generate", "--target", server.target, "--prompt", "x", "--top-p", "7")
    assert out.returncode == 3
    assert "INVALID_ARGUMENT" in out.stderr and "sampling.top_p" in out.stderr


def test_chat_reads_turns_from_stdin(server: ServerProcess) -> None:
    out = kimi(
        "chat", "--target", server.target, "--max-tokens", "5", "--temperature", "0",
        stdin="hello\n/mode instant\nsecond turn\n/exit\n",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") >= 2


def test_agent_runs_local_command_tools(server: ServerProcess, tmp_path: Path) -> None:
    script = tmp_path / "clock.py"
    script.write_text(
        "import sys\nsys.stdin.read()\nprint('TIME-IS-NOON')\n"  # the demo writes random arguments
    )
    tools = tmp_path / "tools.json"
    tools.write_text(
        json.dumps(
            [
                {
                    "name": "get_time",
                    "description": "Current time",
                    "parameters": {"type": "object", "properties": {}},
                    "command": [sys.executable, str(script)],
                }
            ]
        )
    )
    out = kimi(
        "agent", "--target", server.target, "--tools", str(tools), "--task", "What time is it?",
        "--tool-choice", "get_time", "--max-steps", "2", "--max-tokens", "24",
        "--thinking-budget", "4", "--temperature", "0", "--json",
    )  # fmt: skip
    assert out.returncode in (0, 1), out.stderr
    first = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{")))
    assert first["step"] == 0 and first["tool_calls"][0]["name"] == "get_time"
    assert first["tool_calls"][0]["id"] == "functions.get_time:0"
    assert "TIME-IS-NOON" in out.stdout


def test_tool_runner_turns_failures_into_results(tmp_path: Path) -> None:
    tools_file = tmp_path / "t.json"
    tools_file.write_text(
        json.dumps(
            [
                {"name": "fail", "command": [sys.executable, "-c", "import sys; sys.exit(4)"]},
                {"name": "missing", "command": ["/no/such/program"]},
            ]
        )
    )
    tools = load_tools(tools_file)
    assert run_tool(tools, "fail", "{}").startswith("error: fail exited with 4")
    assert run_tool(tools, "missing", "{}").startswith("error: missing could not run")
    assert run_tool(tools, "nope", "{}").startswith("error: unknown tool")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"name": "x", "command": "not a list"}]')
    with pytest.raises(ValueError, match="command must be a list"):
        load_tools(bad)
