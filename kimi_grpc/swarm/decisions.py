"""The model's decisions in a swarm, behind one hook.

Every AgentStep call goes to the server; what the orchestrator *does* with a turn is decided
here: which sub-tasks a planning turn spawns, whether a sub-agent's turn calls tools or finishes,
what the synthesis answer is. :class:`ModelDecisions` (the default) reads them from the model's
parsed output. :class:`ScriptedDecisions` replaces only the decisions with a fixed script — for
tests and benchmarks on models that cannot plan (the demo checkpoint's random weights) — while
the calls, tokens, cache and scheduling stay real. Pass any object with these three methods as
``Swarm(decisions=...)`` or ``kimi-grpc swarm --decisions MODULE_OR_FILE:FACTORY``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

SPAWN_TOOL = "spawn_subagents"
SPAWN_DECLARATION = {
    "name": SPAWN_TOOL,
    "description": (
        "Split the task into independent sub-tasks, each solved by its own sub-agent with the "
        "tools; call once with every sub-task."
    ),
    "parameters": {
        "type": "object",
        "properties": {
            "tasks": {
                "type": "array",
                "items": {"type": "string"},
                "description": "One self-contained instruction per sub-agent",
            }
        },
        "required": ["tasks"],
    },
}


@dataclass(frozen=True)
class Call:
    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Turn:
    """One assistant turn as the server returned it."""

    content: str
    reasoning: str
    tool_calls: tuple[Call, ...]
    finish_reason: str  # "stop" | "length" | "tool_calls" | "abort"
    usage: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class AgentView:
    index: int
    subtask: str
    step: int  # 1-based number of the step being decided
    messages: list[dict[str, Any]]


@dataclass(frozen=True)
class Act:
    calls: tuple[Call, ...]  # run these tools, then take another step


@dataclass(frozen=True)
class Finish:
    result: str  # the sub-agent's answer


class Decisions(Protocol):
    def plan(self, task: str, turn: Turn) -> list[str]: ...

    def act(self, agent: AgentView, turn: Turn) -> Act | Finish: ...

    def synthesize(self, task: str, turn: Turn) -> str: ...


class ModelDecisions:
    """The model decides: ``spawn_subagents`` calls give the plan (no call: one sub-agent does
    the whole task), tool calls continue a sub-agent, a turn without calls finishes it."""

    def plan(self, task: str, turn: Turn) -> list[str]:
        subtasks: list[str] = []
        for call in turn.tool_calls:
            if call.name != SPAWN_TOOL:
                continue
            try:
                tasks = json.loads(call.arguments).get("tasks", [])
            except (json.JSONDecodeError, AttributeError):
                continue
            subtasks += [t for t in tasks if isinstance(t, str) and t.strip()]
        return subtasks or [task]

    def act(self, agent: AgentView, turn: Turn) -> Act | Finish:
        if turn.tool_calls:
            return Act(turn.tool_calls)
        return Finish(turn.content)

    def synthesize(self, task: str, turn: Turn) -> str:
        return turn.content


class ScriptedDecisions:
    """A fixed script: ``num_agents`` sub-tasks; each sub-agent calls ``tool`` on steps
    1..steps_per_agent-1 with ``{"agent": i, "step": k}`` and finishes on step
    ``steps_per_agent``. The model's own output is ignored (its tokens were still generated)."""

    def __init__(self, num_agents: int, steps_per_agent: int, tool: str) -> None:
        if num_agents < 1 or steps_per_agent < 1:
            raise ValueError("num_agents and steps_per_agent must be >= 1")
        self.num_agents, self.steps_per_agent, self.tool = num_agents, steps_per_agent, tool

    def plan(self, task: str, turn: Turn) -> list[str]:
        return [f"{task} — part {i + 1} of {self.num_agents}" for i in range(self.num_agents)]

    def act(self, agent: AgentView, turn: Turn) -> Act | Finish:
        if agent.step >= self.steps_per_agent:
            return Finish(f"agent {agent.index} finished after {agent.step} steps")
        arguments = json.dumps({"agent": agent.index, "step": agent.step})
        return Act((Call(f"functions.{self.tool}:{agent.step - 1}", self.tool, arguments),))

    def synthesize(self, task: str, turn: Turn) -> str:
        return f"synthesis of {self.num_agents} sub-agent results"
