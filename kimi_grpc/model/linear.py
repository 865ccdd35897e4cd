"""Linear layers that know their tensor-parallel shard and their checkpoint format.

``Linear(..., parallel="column")`` keeps rows ``[rank * out/tp, (rank+1) * out/tp)`` of the weight;
``parallel="row"`` keeps the matching input columns and sums partial outputs over the ranks;
``parallel="replicated"`` keeps everything. A weight is either a float tensor ``weight [out, in]``
or, when the quantization config says so, compressed-tensors INT4 (``weight_packed [out, in/8]``
int32, ``weight_scale [out, in/group]``, ``weight_shape = [out, in]``). Loaders read only this
rank's slice.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kimi_grpc.checkpoint import FLOAT_DTYPES, CheckpointError, TensorSlice, TensorSpec
from kimi_grpc.config import Int4QuantConfig
from kimi_grpc.int4 import PACK_FACTOR, dequantize_int4
from kimi_grpc.parallel import ParallelContext, shard_range

ParallelMode = Literal["replicated", "column", "row"]
SHAPE_DTYPES = (torch.int32, torch.int64)


def check_weight_shape(src: TensorSlice, expected: tuple[int, int]) -> None:
    """Validates a compressed-tensors ``weight_shape`` tensor against the module's ``[out, in]``."""
    values = tuple(int(v) for v in src.read().flatten().tolist())
    if values != expected:
        raise CheckpointError(
            f"tensor {src.info.name} says {list(values)}, expected {list(expected)}"
        )


class Linear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        parallel: ParallelMode,
        ctx: ParallelContext,
        dtype: torch.dtype,
        device: torch.device,
        quant: Int4QuantConfig | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.mode, self.ctx, self.quant = parallel, ctx, quant
        self.rows = (0, out_features)
        self.cols = (0, in_features)
        if parallel == "column":
            self.rows = shard_range(out_features, ctx, "output features")
        elif parallel == "row":
            self.cols = shard_range(in_features, ctx, "input features")
        out_local = self.rows[1] - self.rows[0]
        in_local = self.cols[1] - self.cols[0]
        if quant is None:
            self.weight = nn.Parameter(
                torch.empty(out_local, in_local, dtype=dtype, device=device), requires_grad=False
            )
        else:
            if in_local % quant.group_size:
                raise ValueError(
                    f"INT4 linear: local input width {in_local} is not a multiple of "
                    f"group_size={quant.group_size}"
                )
            self.weight_packed = nn.Parameter(
                torch.empty(out_local, in_local // PACK_FACTOR, dtype=torch.int32, device=device),
                requires_grad=False,
            )
            self.weight_scale = nn.Parameter(
                torch.empty(
                    out_local, in_local // quant.group_size, dtype=torch.bfloat16, device=device
                ),
                requires_grad=False,
            )
        self.dtype = dtype

    def dense_weight(self) -> torch.Tensor:
        """This rank's ``[out_local, in_local]`` weight in the compute dtype (INT4 dequantized)."""
        if self.quant is None:
            return self.weight
        return dequantize_int4(
            self.weight_packed, self.weight_scale, self.quant.group_size, self.dtype
        )

    def forward(self, x: torch.Tensor, *, reduce: bool = True) -> torch.Tensor:
        # x: [N, in_local] -> [N, out_local]; row-parallel outputs are partial sums until reduced.
        y = F.linear(x, self.dense_weight())
        if self.mode == "row" and reduce:
            y = self.ctx.all_reduce(y)
        return y

    def weight_specs(self, name: str) -> dict[str, TensorSpec]:
        r0, r1 = self.rows
        c0, c1 = self.cols
        full = (self.out_features, self.in_features)
        if self.quant is None:

            def load(src: TensorSlice) -> None:
                self.weight.copy_(src[r0:r1, c0:c1])

            return {f"{name}.weight": TensorSpec(full, FLOAT_DTYPES, load)}

        group = self.quant.group_size

        def load_packed(src: TensorSlice) -> None:
            self.weight_packed.copy_(src[r0:r1, c0 // PACK_FACTOR : c1 // PACK_FACTOR])

        def load_scale(src: TensorSlice) -> None:
            self.weight_scale.copy_(src[r0:r1, c0 // group : c1 // group])

        return {
            f"{name}.weight_packed": TensorSpec(
                (full[0], full[1] // PACK_FACTOR), (torch.int32,), load_packed
            ),
            f"{name}.weight_scale": TensorSpec(
                (full[0], full[1] // group), FLOAT_DTYPES, load_scale
            ),
            f"{name}.weight_shape": TensorSpec(
                (2,), SHAPE_DTYPES, lambda src: check_weight_shape(src, full)
            ),
        }
