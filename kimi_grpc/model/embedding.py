"""Vocab-parallel token embedding and LM head: each TP rank owns a contiguous vocab slice."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimi_grpc.checkpoint import FLOAT_DTYPES, TensorSlice, TensorSpec
from kimi_grpc.parallel import ParallelContext, shard_range


class VocabParallelEmbedding(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        *,
        ctx: ParallelContext,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.ctx = ctx
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.v0, self.v1 = shard_range(vocab_size, ctx, "vocab_size")
        self.weight = nn.Parameter(
            torch.empty(self.v1 - self.v0, hidden_size, dtype=dtype, device=device),
            requires_grad=False,
        )

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        # token_ids: [N] -> [N, hidden]; rows outside this rank's slice are zero until all-reduced.
        if self.ctx.tp_size == 1:
            return F.embedding(token_ids, self.weight)
        local = (token_ids >= self.v0) & (token_ids < self.v1)
        out = F.embedding((token_ids - self.v0).clamp(0, self.v1 - self.v0 - 1), self.weight)
        out = out * local.unsqueeze(-1).to(out.dtype)
        return self.ctx.all_reduce(out)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [M, hidden] -> float32 logits [M, vocab] (gathered over ranks)
        return self.ctx.all_gather_last_dim(F.linear(hidden, self.weight).float())

    def weight_specs(self, name: str) -> dict[str, TensorSpec]:
        def load(src: TensorSlice) -> None:
            self.weight.copy_(src[self.v0 : self.v1, :])

        return {
            f"{name}.weight": TensorSpec((self.vocab_size, self.hidden_size), FLOAT_DTYPES, load)
        }
