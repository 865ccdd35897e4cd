"""compressed-tensors ``pack-quantized`` INT4: the exact bit layout of Kimi's routed experts.

Layout (shared/docs/kimi-spec.md §2.4), for a Linear weight ``W [out, in]``:

* ``q = clamp(round(W / scale), -8, 7)`` with one scale per 32 consecutive input elements
  (``scale [out, in / group_size]``, bf16 in real checkpoints);
* stored offset-binary ``u = q + 8 ∈ [0, 15]``, packed along the input dim, 8 per int32 word,
  little nibble first: element ``k`` lives in word ``k // 8`` at bits ``4 * (k % 8) .. +3``.
  Words with a high nibble >= 8 are negative int32 values.
* ``W[o, k] = q[o, k] * scale[o, k // group_size]``.
"""

from __future__ import annotations

import sys

import torch

PACK_FACTOR = 8  # int4 values per int32 word
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Packs signed int4 values ``q [..., K]`` (any int dtype, values in [-8, 7]) into int32 words.

    Returns ``[..., ceil(K / 8)]`` int32; a ragged tail is zero-padded (as compressed-tensors does).
    """
    if q.dtype.is_floating_point:
        raise TypeError("pack_int4 expects integer values")
    k = q.shape[-1]
    pad = (-k) % PACK_FACTOR
    u = (q.to(torch.int64) + 8) & 0xF
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    u = u.reshape(*q.shape[:-1], -1, PACK_FACTOR)
    words = (u << _SHIFTS.to(u.device, torch.int64)).sum(dim=-1)
    # Two's-complement wrap of the unsigned 32-bit word into int32.
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Offset-binary values ``u ∈ [0, 15]`` of int32 words ``[..., W]`` as uint8 ``[..., 8W]``."""
    if sys.byteorder == "little":
        # Byte j of a word holds elements 2j (low nibble) and 2j+1 (high nibble): splitting bytes
        # touches 4x less memory than shifting whole words.
        b = packed.contiguous().view(torch.uint8)
        return torch.stack((b & 0xF, b >> 4), dim=-1).view(*packed.shape[:-1], -1)
    nibbles = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF
    return nibbles.to(torch.uint8).reshape(*packed.shape[:-1], -1)


def unpack_int4(packed: torch.Tensor, num_columns: int) -> torch.Tensor:
    """Unpacks int32 words ``[..., W]`` into signed int8 values ``[..., num_columns]``."""
    if packed.dtype != torch.int32:
        raise TypeError(f"packed INT4 weights must be int32, got {packed.dtype}")
    if not 0 < num_columns <= packed.shape[-1] * PACK_FACTOR:
        raise ValueError(f"num_columns={num_columns} does not fit {packed.shape[-1]} packed words")
    return (_nibbles(packed)[..., :num_columns].to(torch.int8) - 8).to(torch.int8)


def dequantize_int4(
    packed: torch.Tensor, scale: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """``W [..., N, K] = q * scale`` from ``packed [..., N, K/8]`` and ``scale [..., N, K/group]``.

    Each product ``q * scale`` is exact in float32 (4-bit × bf16 needs 11 significand bits) and is
    rounded once to ``dtype``.
    """
    if packed.dtype != torch.int32:
        raise TypeError(f"packed INT4 weights must be int32, got {packed.dtype}")
    if packed.shape[-1] * PACK_FACTOR != scale.shape[-1] * group_size:
        raise ValueError(
            f"{packed.shape[-1]} packed words do not match {scale.shape[-1]} groups of {group_size}"
        )
    # bf16 and fp32 hold every q and bf16 scale exactly; fp16 does not (range), so go via fp32.
    work = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
    q = _nibbles(packed).to(work).sub_(8).view(*scale.shape, group_size)
    w = q.mul_(scale.to(work).unsqueeze(-1)).view(*scale.shape[:-1], -1)
    return w.to(dtype)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric min-max group quantization (compressed-tensors' observer: ``absmax / 7.5``).

    Returns ``(q [..., K] int8, scale [..., K/group] bf16)``; the scale is rounded to bf16 first so
    ``q * scale`` reconstructs exactly what a checkpoint stores.
    """
    if w.shape[-1] % group_size:
        raise ValueError(f"last dim {w.shape[-1]} is not a multiple of group_size={group_size}")
    groups = w.to(torch.float32).reshape(*w.shape[:-1], -1, group_size)
    scale = (groups.abs().amax(dim=-1) / 7.5).clamp_min(1e-8).to(torch.bfloat16)
    q = torch.round(groups / scale.to(torch.float32).unsqueeze(-1)).clamp(-8, 7)
    return q.reshape(w.shape).to(torch.int8), scale
