"""DeepSeek-MoE with Kimi's values: 384 routed experts (top-8, sigmoid ``noaux_tc`` router) plus
one always-on shared expert.

Routed experts are stacked per layer so the grouped GEMM op sees one tensor per projection:
``w13 [E, 2I, H]`` (gate rows then up rows) and ``w2 [E, H, I]``, kept INT4-packed exactly as
stored (``*_packed`` int32 + ``*_scale`` bf16) — never dequantized as a whole. Under tensor
parallelism each rank holds the slice ``I/tp`` of every expert and the combine is an all-reduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimi_grpc import ops
from kimi_grpc.checkpoint import FLOAT_DTYPES, TensorSlice, TensorSpec
from kimi_grpc.config import ModelConfig
from kimi_grpc.int4 import PACK_FACTOR
from kimi_grpc.model.linear import SHAPE_DTYPES, check_weight_shape
from kimi_grpc.model.mlp import MLP
from kimi_grpc.parallel import ParallelContext, shard_range


def _param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class Router(nn.Module):
    """``mlp.gate``: logits ``x @ W^T`` in float32, then :func:`kimi_grpc.ops.moe_route`."""

    def __init__(self, config: ModelConfig, device: torch.device) -> None:
        super().__init__()
        self.config = config
        e, h = config.n_routed_experts, config.hidden_size
        self.weight = _param((e, h), torch.float32, device)
        self.e_score_correction_bias = _param((e,), torch.float32, device)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [T, H] -> topk_weights [T, k] f32, topk_ids [T, k] i32
        c = self.config
        logits = F.linear(x.float(), self.weight)
        return ops.moe_route(
            logits,
            self.e_score_correction_bias,
            top_k=c.num_experts_per_tok,
            n_group=c.n_group,
            topk_group=c.topk_group,
            renormalize=c.norm_topk_prob,
            routed_scaling_factor=c.routed_scaling_factor,
        )

    def weight_specs(self, name: str) -> dict[str, TensorSpec]:
        def loader(param: nn.Parameter):
            return lambda src: param.copy_(src.read())

        return {
            f"{name}.weight": TensorSpec(
                tuple(self.weight.shape), FLOAT_DTYPES, loader(self.weight)
            ),
            f"{name}.e_score_correction_bias": TensorSpec(
                tuple(self.e_score_correction_bias.shape),
                FLOAT_DTYPES,
                loader(self.e_score_correction_bias),
            ),
        }


class RoutedExperts(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        *,
        name: str,
        ctx: ParallelContext,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        e, h, i = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts, self.hidden, self.inter = e, h, i
        self.i0, self.i1 = shard_range(i, ctx, "moe_intermediate_size")
        il = self.i1 - self.i0
        quant = config.quantization
        self.quant = quant if quant and quant.is_quantized(f"{name}.0.gate_proj") else None
        if self.quant is None:
            self.w13 = _param((e, 2 * il, h), dtype, device)
            self.w2 = _param((e, h, il), dtype, device)
        else:
            g = self.quant.group_size
            if il % g:
                raise ValueError(f"per-rank expert width {il} is not a multiple of group_size={g}")
            self.w13_packed = _param((e, 2 * il, h // PACK_FACTOR), torch.int32, device)
            self.w13_scale = _param((e, 2 * il, h // g), torch.bfloat16, device)
            self.w2_packed = _param((e, h, il // PACK_FACTOR), torch.int32, device)
            self.w2_scale = _param((e, h, il // g), torch.bfloat16, device)

    def forward(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        # x: [T, H] -> [T, H] partial sum over this rank's slice of every expert.
        if self.quant is None:
            return ops.dense_moe_experts(x, self.w13, self.w2, topk_weights, topk_ids)
        return ops.int4_moe_experts(
            x,
            self.w13_packed,
            self.w13_scale,
            self.w2_packed,
            self.w2_scale,
            topk_weights,
            topk_ids,
            group_size=self.quant.group_size,
        )

    def weight_specs(self, name: str) -> dict[str, TensorSpec]:
        specs: dict[str, TensorSpec] = {}
        h, i = self.hidden, self.inter
        for e in range(self.num_experts):
            for proj, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
                specs.update(self._expert_specs(f"{name}.{e}.{proj}", e, proj, shape))
        return specs

    def _expert_specs(
        self, name: str, e: int, proj: str, shape: tuple[int, int]
    ) -> dict[str, TensorSpec]:
        i0, i1 = self.i0, self.i1
        il = i1 - i0

        def rows_or_cols(dst: torch.Tensor, per_word: int):
            """Copies this rank's slice of one expert projection into the stacked tensor."""
            a, b = i0 // per_word, i1 // per_word

            def load(src: TensorSlice) -> None:
                if proj == "gate_proj":
                    dst[e, :il].copy_(src[i0:i1, :])
                elif proj == "up_proj":
                    dst[e, il:].copy_(src[i0:i1, :])
                else:  # down_proj: slice the input (I) columns
                    dst[e].copy_(src[:, a:b])

            return load

        if self.quant is None:
            dst = self.w2 if proj == "down_proj" else self.w13
            return {f"{name}.weight": TensorSpec(shape, FLOAT_DTYPES, rows_or_cols(dst, 1))}
        g = self.quant.group_size
        packed = self.w2_packed if proj == "down_proj" else self.w13_packed
        scale = self.w2_scale if proj == "down_proj" else self.w13_scale
        return {
            f"{name}.weight_packed": TensorSpec(
                (shape[0], shape[1] // PACK_FACTOR),
                (torch.int32,),
                rows_or_cols(packed, PACK_FACTOR),
            ),
            f"{name}.weight_scale": TensorSpec(
                (shape[0], shape[1] // g), FLOAT_DTYPES, rows_or_cols(scale, g)
            ),
            f"{name}.weight_shape": TensorSpec(
                (2,), SHAPE_DTYPES, lambda src: check_weight_shape(src, shape)
            ),
        }


class MoE(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        *,
        name: str,
        ctx: ParallelContext,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.ctx = ctx
        self.gate = Router(config, device)
        self.experts = RoutedExperts(
            config, name=f"{name}.experts", ctx=ctx, dtype=dtype, device=device
        )
        self.shared_experts = None
        if config.n_shared_experts:
            self.shared_experts = MLP(
                config.hidden_size,
                config.moe_intermediate_size * config.n_shared_experts,
                name=f"{name}.shared_experts",
                ctx=ctx,
                dtype=dtype,
                device=device,
                quant=config.quantization,
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, H] -> [T, H]; routed + shared partial sums share one all-reduce.
        topk_weights, topk_ids = self.gate(x)
        y = self.experts(x, topk_weights, topk_ids)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x, reduce=False)
        return self.ctx.all_reduce(y)

    def weight_specs(self, name: str) -> dict[str, TensorSpec]:
        specs = self.gate.weight_specs(f"{name}.gate")
        specs.update(self.experts.weight_specs(f"{name}.experts"))
        if self.shared_experts is not None:
            specs.update(self.shared_experts.weight_specs(f"{name}.shared_experts"))
        return specs
