"""RMSNorm as DeepSeek-V3/Kimi compute it: fp32 statistics, weight applied in the input dtype."""

from __future__ import annotations

import torch
from torch import nn

from kimi_grpc.checkpoint import FLOAT_DTYPES, TensorSlice, TensorSpec


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(
            torch.empty(dim, dtype=dtype, device=device), requires_grad=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., dim]
        variance = x.float().pow(2).mean(-1, keepdim=True)
        normed = (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype)
        return self.weight * normed

    def weight_specs(self, name: str) -> dict[str, TensorSpec]:
        def load(src: TensorSlice) -> None:
            self.weight.copy_(src.read())

        return {f"{name}.weight": TensorSpec(tuple(self.weight.shape), FLOAT_DTYPES, load)}
