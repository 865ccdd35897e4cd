"""The hot ops, one function each: contract here, PyTorch reference in ``reference.py``,
native CPU/CUDA kernels in the ``kimi_grpc._C`` extension (``csrc/``).

Backend choice (``--ops`` on the CLI, env ``KIMI_GRPC_OPS``):

* ``auto`` (default): the native kernel for the tensor's device when the extension provides one,
  otherwise the reference;
* ``native``: like auto, but the extension must be importable (a failed build is an error);
* ``reference``: always the PyTorch reference (debugging, A/B runs).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from types import ModuleType

import torch

from kimi_grpc import envs
from kimi_grpc.ops import reference

logger = logging.getLogger(__name__)
BACKENDS = ("auto", "native", "reference")
_backend: str | None = None


def set_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"ops backend {name!r}: expected one of {', '.join(BACKENDS)}")
    global _backend
    _backend = name
    _native_op.cache_clear()
    if name == "native":
        _extension(required=True)


def backend() -> str:
    return _backend if _backend is not None else envs.OPS.get()


@functools.cache
def _extension(required: bool = False) -> ModuleType | None:
    try:
        from kimi_grpc import _C  # type: ignore[attr-defined]
    except ImportError as exc:
        if required:
            raise RuntimeError(
                f"--ops native: the kimi_grpc._C extension is not built ({exc}); "
                "reinstall with `pip install --no-build-isolation -e .`"
            ) from exc
        logger.info("kimi_grpc._C not available (%s); using PyTorch reference ops", exc)
        return None
    return _C


@functools.cache
def _native_op(name: str, device_type: str) -> Callable | None:
    mode = backend()
    if mode == "reference":
        return None
    ext = _extension(required=mode == "native")
    return getattr(ext, f"{name}_{device_type}", None) if ext is not None else None


def native_available(name: str, device_type: str) -> bool:
    """Whether ``name`` would run natively on ``device_type`` under the current backend."""
    return _native_op(name, device_type) is not None


# The CUDA kernels' envelope (csrc/cuda/*.cuh); shapes outside it (toy widths, fp32 models) run the
# reference. Kimi K2.x and the k2-shape presets are inside it.
def _cuda_moe_supported(
    x: torch.Tensor, w13_packed: torch.Tensor, topk_ids: torch.Tensor, group_size: int
) -> bool:
    hidden, inter = x.shape[-1], w13_packed.shape[1] // 2
    return (
        x.dtype == torch.bfloat16
        and hidden % 32 == 0
        and inter % 32 == 0
        and group_size > 0
        and group_size % 32 == 0
        and hidden % group_size == 0
        and inter % group_size == 0
        and w13_packed.shape[0] <= 2048
        and topk_ids.shape[-1] <= 32
    )


CUDA_MLA_PAGE_SIZE = 64  # kMlaPageSize in csrc/cuda/mla_decode.cuh: the kernel's page tile


def _cuda_mla_supported(q: torch.Tensor, kv_cache: torch.Tensor, kv_lora_rank: int) -> bool:
    dim = q.shape[-1]
    return (
        q.shape[1] >= 1
        and 0 < kv_lora_rank <= dim
        and q.dtype == torch.bfloat16
        and kv_cache.dtype == torch.bfloat16
        and kv_cache.shape[1] == CUDA_MLA_PAGE_SIZE
        and dim % 16 == 0
        and dim <= 576
        and kv_lora_rank % 8 == 0
        and kv_lora_rank <= 512
    )


def moe_route(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor | None,
    *,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 ``noaux_tc`` routing: pick ``top_k`` experts per token.

    Args:
        router_logits: ``[T, E]`` float32, ``x @ W_gate^T``.
        correction_bias: ``[E]`` float32 ``e_score_correction_bias`` (selection only) or None.
    Returns:
        ``topk_weights [T, top_k]`` float32 and ``topk_ids [T, top_k]`` int32, in descending order
        of the biased score. ``scores = sigmoid(logits)``; selection ranks ``scores + bias``, first
        keeping the ``topk_group`` groups (of ``n_group``) with the largest sum of their top-2
        biased scores; weights are the *unbiased* scores of the chosen experts, divided by their
        sum (``+1e-20``) when ``renormalize``, times ``routed_scaling_factor``. Ties go to the
        lower index. All math in float32.
    """
    native = _native_op("moe_route", router_logits.device.type)
    if native is not None:
        bias = correction_bias if correction_bias is not None else router_logits.new_empty(0)
        return native(
            router_logits.float().contiguous(),
            bias.float().contiguous(),
            top_k,
            n_group,
            topk_group,
            renormalize,
            routed_scaling_factor,
        )
    return reference.moe_route(
        router_logits,
        correction_bias,
        top_k,
        n_group,
        topk_group,
        renormalize,
        routed_scaling_factor,
    )


def int4_moe_experts(
    x: torch.Tensor,
    w13_packed: torch.Tensor,
    w13_scale: torch.Tensor,
    w2_packed: torch.Tensor,
    w2_scale: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    group_size: int,
) -> torch.Tensor:
    """INT4 (W4A16) grouped expert GEMMs of one MoE layer, with SiLU·mul and the weighted combine.

    Args:
        x: ``[T, H]`` activations (bf16 or fp32).
        w13_packed: ``[E, 2I, H/8]`` int32, rows ``0..I-1`` gate_proj, ``I..2I-1`` up_proj, packed
            as in compressed-tensors (see ``kimi_grpc.int4``).
        w13_scale: ``[E, 2I, H/group_size]`` bf16.
        w2_packed: ``[E, H, I/8]`` int32 (down_proj); w2_scale ``[E, H, I/group_size]`` bf16.
        topk_weights: ``[T, k]`` float32; topk_ids ``[T, k]`` int32 (from :func:`moe_route`),
            ``< E``; a negative id is skipped (expert parallelism: a slot whose expert lives on
            another rank contributes nothing here).
    Returns:
        ``[T, H]`` in ``x.dtype``: ``Σ_k w[t,k] · down_e(silu(gate_e(x_t)) * up_e(x_t))`` over the
        slots with ``e = ids[t,k] >= 0``, accumulated in float32. Deterministic: the same inputs
        give the same bits regardless of how the other tokens of the batch were routed.
    """
    native = _native_op("int4_moe_experts", x.device.type)
    if (
        native is not None
        and x.is_cuda
        and not _cuda_moe_supported(x, w13_packed, topk_ids, group_size)
    ):
        native = None
    fn = native if native is not None else reference.int4_moe_experts
    return fn(x, w13_packed, w13_scale, w2_packed, w2_scale, topk_weights, topk_ids, group_size)


def dense_moe_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Unquantized experts (``w13 [E, 2I, H]``, ``w2 [E, H, I]``), same contract as
    :func:`int4_moe_experts`. Only checkpoints without INT4 experts use it; reference only."""
    return reference.dense_moe_experts(x, w13, w2, topk_weights, topk_ids)


def mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    softmax_scale: float,
    kv_lora_rank: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed-MLA decode attention over the paged latent cache (one query token per sequence).

    Args:
        q: ``[B, H, D]`` with ``D = kv_lora_rank + rope_dim`` (576 for Kimi): the query
            already multiplied by ``W_UK`` (first ``kv_lora_rank`` values), then its rotated
            rope part.
        kv_cache: ``[num_pages, page_size, D]``, one layer's pool; each token's entry is its
            normalised compressed kv (``kv_lora_rank``) followed by its rotated shared key.
        block_table: ``[B, max_pages]`` int32 page ids; sequence ``b``'s token ``t`` lives at
            ``kv_cache[block_table[b, t // page_size], t % page_size]``.
        seq_lens: ``[B]`` int32, tokens to attend per sequence (>= 1, including the new one).
    Returns:
        ``out [B, H, kv_lora_rank]`` in ``q.dtype`` (``softmax(q·kᵀ·scale) · c_kv``; multiply by
        ``W_UV`` for the heads' values) and ``lse [B, H]`` float32 (natural-log sum-exp of the
        scaled scores, for split-KV combines).
    """
    native = _native_op("mla_decode", q.device.type)
    if native is not None and q.is_cuda and not _cuda_mla_supported(q, kv_cache, kv_lora_rank):
        native = None
    fn = native if native is not None else reference.mla_decode
    return fn(q, kv_cache, block_table, seq_lens, softmax_scale, kv_lora_rank)


def apply_token_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Guided decoding's token masks, in place: ``logits[r, t] = -inf`` unless bit ``t % 32`` of
    ``bitmask[r, t // 32]`` is set (ids at or past ``32 * W`` are never allowed; a banned NaN
    becomes -inf too). Native on CPU (csrc/cpu/token_bitmask.cpp) and CUDA
    (csrc/cuda/token_bitmask.cu).

    Args:
        logits: ``[R, V]`` float32, contiguous (modified and returned).
        bitmask: ``[R, W]`` int32 packed masks (llguidance / xgrammar layout), on logits' device.
    """
    native = _native_op("apply_token_bitmask", logits.device.type)
    if native is not None and logits.is_contiguous() and logits.dtype == torch.float32:
        native(logits, bitmask.to(torch.int32))
        return logits
    return reference.apply_token_bitmask_(logits, bitmask)
