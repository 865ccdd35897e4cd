"""Decode context parallelism (DCP): where a token's latent lives, and the exact merge of the
partial attentions the ranks compute over their shares.

Layout. With ``N = dcp_size``, one block-table page covers ``page_size × N`` tokens (the block
manager's page, so also the prefix cache's granularity); each DCP rank stores its ``page_size``
tokens of it in its own local page of the same id. Position ``p`` lives on DCP rank ``p % N`` at
local index ``p // N``: slot ``table[p // (page_size × N)] × page_size + (p % (page_size × N)) //
N``. Read in table order, rank ``r``'s pages hold positions ``r, r + N, r + 2N, ...``.

Merge. Rank ``r``'s attention over its share gives ``o_r`` (normalised over its own tokens) and
``lse_r = log Σ_{j in share r} exp(s_j)``. The full attention is ``Σ_r exp(lse_r − lse) · o_r``
with ``lse = logsumexp_r lse_r``: each partial's softmax denominator is recovered from its LSE,
so the merge is exact up to rounding. A rank holding none of a sequence's tokens has
``lse_r = −inf`` (weight 0); every sequence has at least one token somewhere, so ``lse`` is finite.
"""

from __future__ import annotations

import torch


def local_length(total: int, dcp_rank: int, dcp_size: int) -> int:
    """How many of positions ``0 .. total - 1`` live on ``dcp_rank``."""
    return max(0, (total - dcp_rank + dcp_size - 1) // dcp_size)


def local_slot(position: int, pages: list[int], page_size: int, dcp_size: int) -> int:
    """The local cache slot of ``position`` on the DCP rank that owns it (``position % dcp_size``);
    ``pages``: the sequence's block table, ``page_size``: tokens per local page."""
    span = page_size * dcp_size
    return pages[position // span] * page_size + (position % span) // dcp_size


def merge_weights(lse: torch.Tensor) -> torch.Tensor:
    """``lse [N, ...]`` (float32, natural log) -> the weight ``exp(lse_r − logsumexp_r lse_r)``
    of each rank's partial output, ``[N, ...]``."""
    return torch.softmax(lse.float(), dim=0)


def merge_partials(out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial attentions ``out [N, B, H, D]`` with ``lse [N, B, H]`` -> the attention over the
    union of the N shares: ``([B, H, D] in out's dtype, [B, H] float32)``. (The layer does the
    same merge as a weighted reduce-scatter across the DCP ranks.)"""
    weights = merge_weights(lse)
    merged = (out.float() * weights[..., None]).sum(dim=0)
    return merged.to(out.dtype), torch.logsumexp(lse.float(), dim=0)
