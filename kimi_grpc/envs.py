"""The one typed registry of environment variables: ours are prefixed ``KIMI_GRPC_``; the
multi-node layout also reads the standard torchrun / LeaderWorkerSet names."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EnvVar:
    name: str
    default: str
    choices: tuple[str, ...] = ()
    help: str = ""

    def get(self) -> str:
        value = os.environ.get(self.name, self.default)
        if self.choices and value not in self.choices:
            raise ValueError(f"{self.name}={value!r}: expected one of {', '.join(self.choices)}")
        return value


OPS = EnvVar(
    "KIMI_GRPC_OPS",
    "auto",
    ("auto", "native", "reference"),
    "hot-op backend: native kernels when built (auto), required (native), or PyTorch reference",
)
CACHE_DIR = EnvVar(
    "KIMI_GRPC_CACHE_DIR",
    str(Path.home() / ".cache" / "kimi-grpc"),
    help="where the built-in demo checkpoint is generated on first use",
)

OVERLAP_SCHEDULING = EnvVar(
    "KIMI_GRPC_OVERLAP_SCHEDULING",
    "1",
    ("0", "1"),
    "default of EngineConfig.overlap_scheduling (serve --no-overlap-scheduling overrides)",
)

# Multi-node tensor parallelism (``serve --nnodes``); the CLI flags take precedence.
MASTER_ADDR = EnvVar("MASTER_ADDR", "", help="rank 0's address (torchrun convention)")
LWS_LEADER_ADDRESS = EnvVar(
    "LWS_LEADER_ADDRESS", "", help="rank 0's address set by LeaderWorkerSet (if no MASTER_ADDR)"
)
MASTER_PORT = EnvVar("MASTER_PORT", "", help="rendezvous TCP port on rank 0")
NNODES = EnvVar("NNODES", "", help="nodes in the tensor-parallel group")
NODE_RANK = EnvVar("NODE_RANK", "", help="this node's index (0 runs the gRPC server)")

ALL = (
    OPS,
    CACHE_DIR,
    OVERLAP_SCHEDULING,
    MASTER_ADDR,
    LWS_LEADER_ADDRESS,
    MASTER_PORT,
    NNODES,
    NODE_RANK,
)
