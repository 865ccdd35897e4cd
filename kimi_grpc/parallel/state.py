"""Which tensor-parallel rank this process is, and the collectives its layers call.

Layers are written TP-aware from the start (column/row-parallel linear, vocab-parallel embedding,
TP- or expert-parallel MoE); with the default ``ParallelContext()`` (world size 1) every
collective is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

MoEParallel = Literal["tp", "ep"]
MOE_PARALLEL_MODES: tuple[MoEParallel, ...] = ("tp", "ep")


@dataclass(frozen=True)
class ParallelContext:
    tp_rank: int = 0
    tp_size: int = 1
    group: object | None = None  # a torch.distributed ProcessGroup when tp_size > 1
    # Routed experts: "tp" = every rank holds I/tp of every expert; "ep" = every rank holds
    # E/tp whole experts. Either way the combine is one all-reduce.
    moe_parallel: MoEParallel = "tp"

    def __post_init__(self) -> None:
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank={self.tp_rank} outside tp_size={self.tp_size}")
        if self.moe_parallel not in MOE_PARALLEL_MODES:
            raise ValueError(f"moe_parallel={self.moe_parallel!r}: expected tp or ep")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums ``x`` over the TP ranks in place (row-parallel outputs, expert combine)."""
        if self.tp_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def broadcast_from_first(self, x: torch.Tensor) -> torch.Tensor:
        """TP rank 0's ``x`` on every rank, in place (vision embeddings rank 0 computed)."""
        if self.tp_size > 1:
            dist.broadcast(x, src=dist.get_global_rank(self.group, 0), group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenates every rank's ``x`` along the last dim (vocab-parallel logits)."""
        if self.tp_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


def shard_range(size: int, ctx: ParallelContext, what: str) -> tuple[int, int]:
    """The ``[start, end)`` of an evenly split dimension owned by this rank."""
    if size % ctx.tp_size:
        raise ValueError(f"{what}={size} is not divisible by tensor_parallel_size={ctx.tp_size}")
    per_rank = size // ctx.tp_size
    return ctx.tp_rank * per_rank, (ctx.tp_rank + 1) * per_rank
