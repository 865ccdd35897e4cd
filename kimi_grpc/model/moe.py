"""DeepSeek-MoE with Kimi's values: 384 routed experts (top-8, sigmoid ``noaux_tc`` router) plus
one always-on shared expert.

Routed experts are stacked per layer so the grouped GEMM op sees one tensor per projection:
``w13 [E, 2I, H]`` (gate rows then up rows) and ``w2 [E, H, I]``, kept INT4-packed exactly as
stored (``*_packed`` int32 + ``*_scale`` bf16) — never dequantized as a whole. Under tensor
parallelism each rank holds the slice ``I/tp`` of every expert (``--moe-parallel tp``) or
``E/tp`` whole experts (``--moe-parallel ep``); the combine is one all-reduce either way.
"""

from __future__ import annotations

import math

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
    """This rank's share of the routed experts, under one of the two layouts:

    * ``moe_parallel="tp"``: rows ``[i0, i1)`` of every expert's gate/up and the same columns of
      its down projection (``I/tp`` wide). When that slice is narrower than an INT4 group (tiny
      models), the scales are re-grouped exactly to ``gcd(I/tp, group)`` columns per scale.
    * ``moe_parallel="ep"``: whole experts ``[e0, e1)`` (``E/tp`` of them); slots routed to
      another rank's expert get id -1, which the expert op skips.

    Either way the forward returns a partial sum that the caller all-reduces.
    """

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
        if ctx.moe_parallel == "ep":
            self.e0, self.e1 = shard_range(e, ctx, "n_routed_experts")
            self.i0, self.i1 = 0, i
        else:
            self.e0, self.e1 = 0, e
            self.i0, self.i1 = shard_range(i, ctx, "moe_intermediate_size")
        el, il = self.e1 - self.e0, self.i1 - self.i0
        quant = config.quantization
        self.quant = quant if quant and quant.is_quantized(f"{name}.0.gate_proj") else None
        if self.quant is None:
            self.w13 = _param((el, 2 * il, h), dtype, device)
            self.w2 = _param((el, h, il), dtype, device)
        else:
            g = self.group = math.gcd(il, self.quant.group_size)
            if g % PACK_FACTOR:
                raise ValueError(
                    f"per-rank expert width {il} shares only {g} columns with "
                    f"group_size={self.quant.group_size}; need a multiple of {PACK_FACTOR} "
                    "(use --moe-parallel ep or a smaller tensor_parallel_size)"
                )
            self.w13_packed = _param((el, 2 * il, h // PACK_FACTOR), torch.int32, device)
            self.w13_scale = _param((el, 2 * il, h // g), torch.bfloat16, device)
            self.w2_packed = _param((el, h, il // PACK_FACTOR), torch.int32, device)
            self.w2_scale = _param((el, h, il // g), torch.bfloat16, device)

    def forward(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        # x: [T, H], topk_ids: [T, k] global expert ids -> [T, H] partial sum of this rank.
        if self.e1 - self.e0 != self.num_experts:
            local = (topk_ids >= self.e0) & (topk_ids < self.e1)
            topk_ids = torch.where(local, topk_ids - self.e0, -1).to(torch.int32)
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
            group_size=self.group,
        )

    def weight_specs(self, name: str) -> dict[str, TensorSpec]:
        specs: dict[str, TensorSpec] = {}
        h, i = self.hidden, self.inter
        for e in range(self.e0, self.e1):
            for proj, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
                specs.update(self._expert_specs(f"{name}.{e}.{proj}", e - self.e0, proj, shape))
        return specs

    def _expert_specs(
        self, name: str, e: int, proj: str, shape: tuple[int, int]
    ) -> dict[str, TensorSpec]:
        """Specs of one checkpoint expert projection, loaded into local expert ``e``."""
        i0, i1 = self.i0, self.i1
        il = i1 - i0

        def loader(dst: torch.Tensor, read_slice):
            def load(src: TensorSlice) -> None:
                if proj == "gate_proj":
                    dst[e, :il].copy_(read_slice(src[i0:i1, :]))
                elif proj == "up_proj":
                    dst[e, il:].copy_(read_slice(src[i0:i1, :]))
                else:  # down_proj: this rank's input (I) columns
                    dst[e].copy_(read_slice(src[:, :], i0, i1))

            return load

        def columns(per_word: int):
            """Plain column slice of a float or packed tensor (``per_word`` values per entry)."""

            def read(t: torch.Tensor, c0: int = 0, c1: int | None = None) -> torch.Tensor:
                c1 = t.shape[1] * per_word if c1 is None else c1
                return t[:, c0 // per_word : c1 // per_word]

            return read

        if self.quant is None:
            dst = self.w2 if proj == "down_proj" else self.w13
            return {f"{name}.weight": TensorSpec(shape, FLOAT_DTYPES, loader(dst, columns(1)))}
        g_ckpt, g = self.quant.group_size, self.group

        def scales(t: torch.Tensor, c0: int = 0, c1: int | None = None) -> torch.Tensor:
            # t: [rows, in/g_ckpt] -> [rows, (c1-c0)/g]: one scale per local group of g columns.
            c1 = t.shape[1] * g_ckpt if c1 is None else c1
            if g == g_ckpt:
                return t[:, c0 // g : c1 // g]
            return t[:, torch.arange(c0, c1, g) // g_ckpt]

        packed = self.w2_packed if proj == "down_proj" else self.w13_packed
        scale = self.w2_scale if proj == "down_proj" else self.w13_scale
        return {
            f"{name}.weight_packed": TensorSpec(
                (shape[0], shape[1] // PACK_FACTOR),
                (torch.int32,),
                loader(packed, columns(PACK_FACTOR)),
            ),
            f"{name}.weight_scale": TensorSpec(
                (shape[0], shape[1] // g_ckpt), FLOAT_DTYPES, loader(scale, scales)
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
