"""The swarm orchestrator: plan → up to ``max_parallel`` sub-agent tool loops → synthesis.

    swarm = Swarm(AsyncKimiClient(target), ToolRegistry([...]), Path("runs/r1"))
    report = await swarm.run("Survey these 300 repositories ...")   # or run() to resume

Every model call is an AgentStep (``final_only``: the orchestrator acts on parsed turns). Sub-agents
of one run share the system prompt and tool declarations — the K2.6 prompt starts with them — so
after one priming call their prompts are prefix-cache hits; ``session_id`` is the run id, which
the server's scheduler uses to keep one run from starving others.

Failure policy: UNAVAILABLE and RESOURCE_EXHAUSTED (server restarting, draining or full) and an
aborted turn are retried with exponential backoff; anything else (INVALID_ARGUMENT, a deadline)
fails that sub-agent only, with the error in the report. Tool errors are tool *results*.
Cancelling ``run()`` cancels every in-flight stream.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from kimi_grpc.client import AsyncKimiClient, agent_step_request, chat_message
from kimi_grpc.client import tool as client_tool
from kimi_grpc.proto import inference_pb2 as pb
from kimi_grpc.swarm.decisions import (
    SPAWN_DECLARATION,
    SPAWN_TOOL,
    Act,
    AgentView,
    Call,
    Decisions,
    ModelDecisions,
    Turn,
)
from kimi_grpc.swarm.journal import AgentState, Journal, RunState
from kimi_grpc.swarm.tools import ToolRegistry

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
MAX_RESULT_CHARS_IN_SYNTHESIS = 2000
SUBAGENT_SYSTEM = (
    "You are a sub-agent of a Kimi agent swarm. Solve only the sub-task you are given, using the "
    "tools when they help. Call tools in parallel when the calls are independent. When you are "
    "done, answer with the result alone: it is handed to the orchestrator verbatim."
)
PLANNER_SYSTEM = (
    "You are the orchestrator of a Kimi agent swarm. Split the user's task into independent "
    "sub-tasks by calling spawn_subagents once; each sub-agent sees only its own sub-task."
)
SYNTHESIS_SYSTEM = (
    "You are the orchestrator of a Kimi agent swarm. Combine the sub-agents' results into one "
    "answer to the user's task."
)


@dataclass
class SwarmConfig:
    max_parallel: int = 300  # sub-agents in flight
    max_steps: int = 4000  # steps of all sub-agents together
    max_steps_per_agent: int = 32
    agent_deadline_s: float = 3600.0
    max_retries: int = 10
    backoff_s: float = 0.2  # first retry delay, doubled up to backoff_max_s
    backoff_max_s: float = 5.0
    system_prompt: str = SUBAGENT_SYSTEM
    mode: str = "agent"
    thinking_budget: int | None = None
    max_tokens: int | None = 4096  # per step
    sampling: dict[str, Any] = field(default_factory=dict)
    prime_prefix: bool = True  # compute the shared prefix once before fanning out

    def __post_init__(self) -> None:
        for name in ("max_parallel", "max_steps", "max_steps_per_agent"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class AgentFailed(Exception):
    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome


class _Aborted(Exception):
    """The server ended the turn with ABORT (draining or an Abort RPC): retry it."""


@dataclass
class Progress:
    running: int = 0
    done: int = 0
    failed: int = 0
    steps: int = 0
    retries: int = 0
    completion_tokens: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / max(time.monotonic() - self.started, 1e-9)


def _turn(final: pb.AgentStepFinal) -> Turn:
    msg = final.message
    reason = pb.FinishReason.Name(final.finish_reason).removeprefix("FINISH_REASON_").lower()
    u = final.usage
    return Turn(
        content=msg.content,
        reasoning=msg.reasoning_content,
        tool_calls=tuple(Call(c.id, c.name, c.arguments) for c in msg.tool_calls),
        finish_reason=reason,
        usage={
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "cached_tokens": u.cached_tokens,
        },
    )


def agent_messages(system_prompt: str, agent: AgentState) -> list[dict[str, Any]]:
    """The sub-agent's conversation so far, rebuilt from its journaled steps."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": agent.subtask},
    ]
    for record in agent.steps:
        messages.append(record["assistant"])
        messages += [
            {"role": "tool", "tool_call_id": r["id"], "content": r["result"]}
            for r in record["tool_results"]
        ]
    return messages


class Swarm:
    def __init__(
        self,
        client: AsyncKimiClient,
        tools: ToolRegistry,
        run_dir: str | Path,
        config: SwarmConfig | None = None,
        *,
        decisions: Decisions | None = None,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> None:
        self.client, self.tools, self.run_dir = client, tools, Path(run_dir)
        self.config = config or SwarmConfig()
        self.decisions = decisions or ModelDecisions()
        self.on_progress = on_progress
        self.progress = Progress()
        self.state = RunState()
        self._steps_reserved = 0
        # Request ids carry a per-process nonce: after a crash, a resumed step never collides
        # with its predecessor's request if the server has not yet seen that one cancelled.
        self._nonce = uuid.uuid4().hex[:6]
        # Converted once / incrementally: rebuilding the protos of every tool declaration and
        # of the whole conversation on each step was a third of the orchestrator's CPU per step.
        self._tool_protos = [client_tool(t) for t in tools.declarations()]
        self._conversations: dict[int, list[pb.ChatMessage]] = {}

    # ---- the run --------------------------------------------------------------------------------
    async def run(self, task: str | None = None) -> dict[str, Any]:
        """Runs ``task`` in a new run directory, or resumes the journal in it (task None)."""
        self.state = RunState.load(self.run_dir)
        if task is None and not self.state.run_id:
            raise ValueError(f"{self.run_dir}: no journal to resume; give a task")
        if task is not None and self.state.run_id:
            raise ValueError(f"{self.run_dir} already holds run {self.state.run_id}; resume it")
        journal = Journal(self.run_dir)
        started = time.monotonic()
        try:
            if not self.state.run_id:
                record = {"type": "run", "run_id": uuid.uuid4().hex[:12], "task": task}
                record["config"] = asdict(self.config)
                await self._log(journal, record)
            else:
                self.config = SwarmConfig(**self.state.config)
            if self.state.subtasks is None:
                await self._plan(journal)
            await self._run_agents(journal)
            if self.state.answer is None:
                await self._synthesize(journal)
            if not self.state.done:
                await self._log(journal, {"type": "run_done"})
        finally:
            journal.close()
        report = self.report(time.monotonic() - started)
        (self.run_dir / "report.json").write_text(_json(report))
        return report

    async def _log(self, journal: Journal, record: dict[str, Any]) -> None:
        await journal.append(record)
        self.state.apply(record)

    def _notify(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.progress)

    async def _plan(self, journal: Journal) -> None:
        messages = [
            {"role": "system", "content": PLANNER_SYSTEM},
            {"role": "user", "content": self.state.task},
        ]
        turn, _ = await self._step(
            "plan", messages, tools=[SPAWN_DECLARATION], tool_choice=SPAWN_TOOL
        )
        subtasks = self.decisions.plan(self.state.task, turn)
        await self._log(journal, {"type": "plan", "subtasks": subtasks})

    async def _run_agents(self, journal: Journal) -> None:
        pending = [a for a in self.state.agents if not a.finished]
        self._steps_reserved = self.state.steps_used
        finished = [a for a in self.state.agents if a.finished]
        self.progress.done = sum(a.outcome == "done" for a in finished)
        self.progress.failed = len(finished) - self.progress.done
        self.progress.steps = self.state.steps_used
        if pending and self.config.prime_prefix:
            # One call computes the shared prefix (tools + system prompt) so the fan-out hits it
            # in the prefix cache instead of hundreds of sub-agents prefilling it at once.
            prime = [{"role": "system", "content": self.config.system_prompt}]
            prime.append({"role": "user", "content": "."})
            await self._step("prime", prime, tools=self._tool_protos, max_tokens=1)
        gate = asyncio.Semaphore(self.config.max_parallel)
        async with asyncio.TaskGroup() as group:
            for agent in pending:
                group.create_task(self._run_agent(agent, gate, journal))

    async def _run_agent(
        self, agent: AgentState, gate: asyncio.Semaphore, journal: Journal
    ) -> None:
        cfg = self.config
        async with gate:
            self.progress.running += 1
            self._notify()
            deadline = time.monotonic() + cfg.agent_deadline_s
            outcome, result, error = "done", "", ""
            try:
                while True:
                    if len(agent.steps) >= cfg.max_steps_per_agent:
                        outcome = "max_steps"
                        break
                    if self._steps_reserved >= cfg.max_steps:
                        outcome = "budget"
                        break
                    self._steps_reserved += 1
                    try:
                        finished, result = await self._agent_step(agent, deadline, journal)
                    except BaseException:
                        self._steps_reserved -= 1
                        raise
                    if finished:
                        break
            except AgentFailed as exc:
                outcome, error = exc.outcome, str(exc)
            finally:
                self.progress.running -= 1
            record = {"type": "agent_done", "agent": agent.index, "outcome": outcome}
            record.update(result=result, error=error)
            await self._log(journal, record)
            if outcome == "done":
                self.progress.done += 1
            else:
                self.progress.failed += 1
            self._notify()

    async def _agent_step(
        self, agent: AgentState, deadline: float, journal: Journal
    ) -> tuple[bool, str]:
        """One step: the model's turn, the decision, the tools; journaled. -> (finished, result)"""
        cfg = self.config
        step = len(agent.steps) + 1
        messages = agent_messages(cfg.system_prompt, agent)
        protos = self._conversations.setdefault(agent.index, [])
        protos += [chat_message(m) for m in messages[len(protos) :]]
        label = f"{self.state.run_id}-{agent.index}-{step}"
        turn, retries = await self._step(label, protos, tools=self._tool_protos, deadline=deadline)
        decision = self.decisions.act(AgentView(agent.index, agent.subtask, step, messages), turn)
        calls = decision.calls if isinstance(decision, Act) else ()
        assistant: dict[str, Any] = {"role": "assistant", "content": turn.content}
        if turn.reasoning:
            assistant["reasoning_content"] = turn.reasoning
        if calls:
            assistant["tool_calls"] = [
                {"id": c.id, "name": c.name, "arguments": c.arguments} for c in calls
            ]
        results = await asyncio.gather(*(self.tools.call(c.name, c.arguments) for c in calls))
        record = {
            "type": "step",
            "agent": agent.index,
            "step": step,
            "assistant": assistant,
            "tool_results": [
                {"id": c.id, "name": c.name, "result": r}
                for c, r in zip(calls, results, strict=True)
            ],
            "finish_reason": turn.finish_reason,
            "usage": turn.usage,
            "retries": retries,
        }
        await self._log(journal, record)
        self.progress.steps += 1
        self.progress.completion_tokens += turn.usage.get("completion_tokens", 0)
        self._notify()
        if isinstance(decision, Act):
            return False, ""
        return True, decision.result

    async def _synthesize(self, journal: Journal) -> None:
        lines = [self.state.task, "", "Sub-agent results:"]
        for agent in self.state.agents:
            text = agent.result if agent.outcome == "done" else f"[{agent.outcome}] {agent.error}"
            lines.append(
                f"{agent.index + 1}. {agent.subtask}\n{text[:MAX_RESULT_CHARS_IN_SYNTHESIS]}"
            )
        messages = [
            {"role": "system", "content": SYNTHESIS_SYSTEM},
            {"role": "user", "content": "\n".join(lines)},
        ]
        turn, _ = await self._step("synthesis", messages, tools=[], mode="thinking")
        answer = self.decisions.synthesize(self.state.task, turn)
        await self._log(journal, {"type": "synthesis", "answer": answer})

    # ---- one AgentStep call, with retries -----------------------------------------------------
    async def _step(
        self,
        label: str,
        messages: list[dict[str, Any]] | list[pb.ChatMessage],
        *,
        tools: list[dict[str, Any]] | list[pb.Tool],
        tool_choice: str | None = None,
        mode: str | None = None,
        max_tokens: int | None = None,
        deadline: float | None = None,
    ) -> tuple[Turn, int]:
        cfg = self.config
        params = dict(cfg.sampling)
        if max_tokens or cfg.max_tokens:
            params["max_tokens"] = max_tokens or cfg.max_tokens
        mode = mode or (cfg.mode if tools else "thinking")
        delay = cfg.backoff_s
        for attempt in range(cfg.max_retries + 1):
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                raise AgentFailed("deadline", f"{label}: agent deadline passed")
            request = agent_step_request(
                messages,
                tools=tools,
                tool_choice_=tool_choice,
                mode=mode,
                params=params,
                thinking_budget=cfg.thinking_budget,
                request_id=f"{label}-{self._nonce}-a{attempt}",
                session_id=self.state.run_id,
                final_only=True,
            )
            try:
                return await self._call(request, timeout), attempt
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise AgentFailed("deadline", f"{label}: {exc.details()}") from None
                if code not in RETRYABLE or attempt == cfg.max_retries:
                    raise AgentFailed("failed", f"{label}: {code.name}: {exc.details()}") from None
            except _Aborted as exc:
                if attempt == cfg.max_retries:
                    raise AgentFailed("failed", f"{label}: {exc}") from None
            self.progress.retries += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, cfg.backoff_max_s)
        raise AssertionError("unreachable")

    async def _call(self, request: pb.AgentStepRequest, timeout: float | None) -> Turn:
        final = None
        call = self.client.stub.AgentStep(request, timeout=timeout, metadata=self.client.metadata)
        async for response in call:
            if response.HasField("final"):
                final = response.final
        if final is None:
            raise _Aborted("the stream ended without a final message")
        if final.finish_reason == pb.FINISH_REASON_ABORT:
            raise _Aborted("the server aborted the turn")
        return _turn(final)

    # ---- report -------------------------------------------------------------------------------
    def report(self, wall_s: float) -> dict[str, Any]:
        agents = []
        for agent in self.state.agents:
            usage = {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}
            for record in agent.steps:
                for key in usage:
                    usage[key] += record["usage"].get(key, 0)
            agents.append(
                {
                    "index": agent.index,
                    "subtask": agent.subtask,
                    "outcome": agent.outcome,
                    "steps": len(agent.steps),
                    "retries": sum(r.get("retries", 0) for r in agent.steps),
                    **usage,
                    "error": agent.error,
                    "result": agent.result,
                }
            )
        totals = {k: sum(a[k] for a in agents) for k in ("steps", "retries", "prompt_tokens")}
        for key in ("completion_tokens", "cached_tokens"):
            totals[key] = sum(a[key] for a in agents)
        outcomes: dict[str, int] = {}
        for a in agents:
            outcomes[a["outcome"] or "unfinished"] = (
                outcomes.get(a["outcome"] or "unfinished", 0) + 1
            )
        return {
            "run_id": self.state.run_id,
            "task": self.state.task,
            "answer": self.state.answer,
            "done": self.state.done,
            "wall_s": round(wall_s, 3),
            "outcomes": outcomes,
            "totals": totals,
            "agents": agents,
        }


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=1)
