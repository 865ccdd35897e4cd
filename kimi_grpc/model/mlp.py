"""SwiGLU feed-forward: the dense layer-0 MLP and the shared expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimi_grpc.checkpoint import TensorSpec
from kimi_grpc.config import Int4QuantConfig
from kimi_grpc.model.linear import Linear
from kimi_grpc.parallel import ParallelContext


class MLP(nn.Module):
    """``down(silu(gate(x)) * up(x))``; gate/up column-parallel, down row-parallel."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        *,
        name: str,
        ctx: ParallelContext,
        dtype: torch.dtype,
        device: torch.device,
        quant: Int4QuantConfig | None,
    ) -> None:
        super().__init__()

        def linear(proj: str, n_in: int, n_out: int, mode: str) -> Linear:
            q = quant if quant is not None and quant.is_quantized(f"{name}.{proj}") else None
            return Linear(n_in, n_out, parallel=mode, ctx=ctx, dtype=dtype, device=device, quant=q)

        self.gate_proj = linear("gate_proj", hidden_size, intermediate_size, "column")
        self.up_proj = linear("up_proj", hidden_size, intermediate_size, "column")
        self.down_proj = linear("down_proj", intermediate_size, hidden_size, "row")

    def forward(self, x: torch.Tensor, *, reduce: bool = True) -> torch.Tensor:
        # x: [N, H] -> [N, H]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x), reduce=reduce)

    def weight_specs(self, name: str) -> dict[str, TensorSpec]:
        specs: dict[str, TensorSpec] = {}
        for proj in ("gate_proj", "up_proj", "down_proj"):
            specs.update(getattr(self, proj).weight_specs(f"{name}.{proj}"))
        return specs
