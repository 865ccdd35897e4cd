"""YaRN rotary embedding as in DeepSeek-V3 (the rope part of MLA, 64 dims for Kimi).

Checkpoint rope dims are GPT-J interleaved pairs ``(x0, x1), (x2, x3), ...``; each pair rotates by
one frequency. ``apply_rope`` returns the rotated values de-interleaved (all pair-firsts, then all
pair-seconds), exactly like transformers' DeepseekV3 ``apply_rotary_pos_emb_interleave``; queries
and keys use the same layout, so their dot products are the model's.
"""

from __future__ import annotations

import math

import torch

from kimi_grpc.config import ModelConfig, RopeScaling


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_inv_freq(dim: int, base: float, scaling: RopeScaling | None) -> torch.Tensor:
    """``[dim / 2]`` float32 inverse frequencies; YaRN blends interpolation and extrapolation
    with a linear ramp over the frequency indices picked by ``beta_fast``/``beta_slow``."""
    extrapolation = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if scaling is None or scaling.factor <= 1.0:
        return extrapolation
    interpolation = extrapolation / scaling.factor
    orig = scaling.original_max_position_embeddings
    low = max(math.floor(_correction_dim(scaling.beta_fast, dim, base, orig)), 0)
    high = min(math.ceil(_correction_dim(scaling.beta_slow, dim, base, orig)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    return interpolation * ramp + extrapolation * (1 - ramp)


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


class RotaryEmbedding:
    def __init__(self, config: ModelConfig, device: torch.device) -> None:
        scaling = config.rope_scaling
        self.inv_freq = yarn_inv_freq(config.qk_rope_head_dim, config.rope_theta, scaling).to(
            device
        )
        # cos/sin magnitude: mscale(factor, mscale) / mscale(factor, mscale_all_dim) (1.0 for Kimi).
        self.attention_factor = 1.0
        if scaling is not None and scaling.factor > 1:
            if scaling.mscale and scaling.mscale_all_dim:
                self.attention_factor = _yarn_mscale(scaling.factor, scaling.mscale) / _yarn_mscale(
                    scaling.factor, scaling.mscale_all_dim
                )
            else:
                self.attention_factor = _yarn_mscale(scaling.factor, 1.0)

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions ``[N]`` -> cos, sin ``[N, rope_dim / 2]`` in ``dtype``."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        return (
            (angles.cos() * self.attention_factor).to(dtype),
            (angles.sin() * self.attention_factor).to(dtype),
        )


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[N, ..., rope_dim]`` (interleaved pairs), cos/sin ``[N, rope_dim/2]`` -> rotated,
    de-interleaved ``[N, ..., rope_dim]``."""
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    cos, sin = cos.view(shape), sin.view(shape)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat([even * cos - odd * sin, odd * cos + even * sin], dim=-1)
