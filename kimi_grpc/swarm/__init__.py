"""Agent Swarm: an orchestrator that plans sub-tasks, runs hundreds of AgentStep tool loops
concurrently with a durable journal, and synthesises their results (``kimi-grpc swarm``)."""

from kimi_grpc.swarm.decisions import (
    SPAWN_TOOL,
    Act,
    AgentView,
    Call,
    Decisions,
    Finish,
    ModelDecisions,
    ScriptedDecisions,
    Turn,
)
from kimi_grpc.swarm.journal import Journal, RunState
from kimi_grpc.swarm.orchestrator import Progress, Swarm, SwarmConfig
from kimi_grpc.swarm.tools import Tool, ToolRegistry

__all__ = [
    "SPAWN_TOOL",
    "Act",
    "AgentView",
    "Call",
    "Decisions",
    "Finish",
    "Journal",
    "ModelDecisions",
    "Progress",
    "RunState",
    "ScriptedDecisions",
    "Swarm",
    "SwarmConfig",
    "Tool",
    "ToolRegistry",
    "Turn",
]
