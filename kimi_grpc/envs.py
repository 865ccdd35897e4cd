"""The one typed registry of environment variables (all prefixed ``KIMI_GRPC_``)."""

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

ALL = (OPS, CACHE_DIR)
