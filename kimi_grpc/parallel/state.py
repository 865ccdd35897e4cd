"""Which tensor-parallel rank this process is, and the collectives its layers call.

Layers are written TP-aware from the start (column/row-parallel linear, vocab-parallel embedding,
TP- or expert-parallel MoE); with the default ``ParallelContext()`` (world size 1) every
collective is the identity.

Decode context parallelism (DCP) splits the TP ranks into groups of ``dcp_size`` consecutive
ranks (``dcp_rank = tp_rank % dcp_size``). Within a group token ``i``'s latent lives on DCP rank
``i % dcp_size`` only, so a group holds ``dcp_size`` times the tokens of a replicated cache
(model/context_parallel.py has the layout and the exact merge of the partial attentions).
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
    dcp_size: int = 1  # ranks that share one copy of the latent cache (divides tp_size)
    dcp_group: object | None = None  # this rank's DCP group when dcp_size > 1

    def __post_init__(self) -> None:
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank={self.tp_rank} outside tp_size={self.tp_size}")
        if self.dcp_size < 1 or self.tp_size % self.dcp_size:
            raise ValueError(
                f"decode_context_parallel_size={self.dcp_size} does not divide "
                f"tensor_parallel_size={self.tp_size}"
            )
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

    @property
    def dcp_rank(self) -> int:
        return self.tp_rank % self.dcp_size

    def dcp_all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """``[dcp_size, *x.shape]``: every DCP rank's ``x`` (same shape), in DCP rank order."""
        out = x.new_empty(self.dcp_size, *x.shape)
        if self.dcp_size == 1:
            out[0] = x
        else:
            # The concatenation form (gloo rejects the stacked one for inputs of 2+ dims).
            flat = out.view(self.dcp_size * x.shape[0], *x.shape[1:])
            dist.all_gather_single(flat, x.contiguous(), group=self.dcp_group)
        return out

    def dcp_reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        """``x [dcp_size, *shape]`` summed over the DCP ranks; this rank gets its own slice
        ``[*shape]`` (slice ``k`` goes to DCP rank ``k``)."""
        if self.dcp_size == 1:
            return x[0]
        out = x.new_empty(x.shape[1:])
        flat = x.contiguous().view(-1, *x.shape[2:])  # concatenation form, as above
        dist.reduce_scatter_single(out, flat, group=self.dcp_group)
        return out


def shard_range(size: int, ctx: ParallelContext, what: str) -> tuple[int, int]:
    """The ``[start, end)`` of an evenly split dimension owned by this rank."""
    if size % ctx.tp_size:
        raise ValueError(f"{what}={size} is not divisible by tensor_parallel_size={ctx.tp_size}")
    per_rank = size // ctx.tp_size
    return ctx.tp_rank * per_rank, (ctx.tp_rank + 1) * per_rank
