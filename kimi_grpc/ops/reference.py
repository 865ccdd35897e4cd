"""Pure-PyTorch reference implementations of the hot ops: the specification native kernels match.

Each function here is deliberately plain (loops over experts and sequences, fp32 math) so that it
is obviously right; ``kimi_grpc.ops`` documents the contracts and dispatches to native code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kimi_grpc.int4 import dequantize_int4


def stable_topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest values along the last dim; among equals the lower index wins."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]


def moe_route(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, num_experts = router_logits.shape
    scores = router_logits.float().sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if n_group > 1:
        grouped = choice.view(num_tokens, n_group, num_experts // n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, n_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, stable_topk_indices(group_scores, topk_group), True)
        keep = keep.unsqueeze(-1).expand_as(grouped).reshape(num_tokens, num_experts)
        choice = choice.masked_fill(~keep, float("-inf"))
    ids = stable_topk_indices(choice, top_k)
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids.to(torch.int32)


def _moe_experts(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    gate_up_weight: Callable[[int], torch.Tensor],
    down_weight: Callable[[int], torch.Tensor],
) -> torch.Tensor:
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    ids = topk_ids.long()
    for expert in torch.unique(ids).tolist():
        if expert < 0:  # a slot routed to another expert-parallel rank's expert
            continue
        token_idx, slot = torch.where(ids == expert)
        gate, up = F.linear(x[token_idx], gate_up_weight(expert)).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down_weight(expert))
        out.index_add_(0, token_idx, y.float() * topk_weights[token_idx, slot, None].float())
    return out.to(x.dtype)


def int4_moe_experts(
    x: torch.Tensor,
    w13_packed: torch.Tensor,
    w13_scale: torch.Tensor,
    w2_packed: torch.Tensor,
    w2_scale: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    return _moe_experts(
        x,
        topk_weights,
        topk_ids,
        lambda e: dequantize_int4(w13_packed[e], w13_scale[e], group_size, x.dtype),
        lambda e: dequantize_int4(w2_packed[e], w2_scale[e], group_size, x.dtype),
    )


def dense_moe_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    return _moe_experts(x, topk_weights, topk_ids, lambda e: w13[e], lambda e: w2[e])


def mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
    kv_lora_rank: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, _ = q.shape
    page_size = kv_cache.shape[1]
    out = torch.empty(batch, heads, kv_lora_rank, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, dtype=torch.float32, device=q.device)
    for b, length in enumerate(seq_lens.tolist()):
        pages = block_table[b, : (length + page_size - 1) // page_size].long()
        kv = kv_cache[pages].reshape(-1, kv_cache.shape[-1])[:length].float()  # [L, 576]
        scores = (q[b].float() @ kv.T) * softmax_scale  # [H, L]
        lse[b] = torch.logsumexp(scores, dim=-1)
        out[b] = (torch.softmax(scores, dim=-1) @ kv[:, :kv_lora_rank]).to(q.dtype)
    return out, lse


def apply_token_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    vocab = logits.shape[1]
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().reshape(bitmask.shape[0], -1)
    if allowed.shape[1] < vocab:  # ids past the mask's words are never allowed
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]))
    return logits.masked_fill_(~allowed[:, :vocab], float("-inf"))
