"""Turns a scheduled step into one model forward over the paged latent cache."""

from __future__ import annotations

import torch

from kimi_grpc.engine.kv_cache import LatentKVCache
from kimi_grpc.engine.sequence import Sequence
from kimi_grpc.model import ForwardBatch, KimiForCausalLM


class ModelRunner:
    def __init__(self, model: KimiForCausalLM, cache: LatentKVCache) -> None:
        self.model, self.cache = model, cache

    def execute(self, scheduled: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Computes ``n`` new tokens for each ``(sequence, n)``; returns float32 logits
        ``[len(scheduled), vocab]`` at each sequence's last computed token."""
        new_tokens, context_lens, tables = [], [], []
        for seq, n in scheduled:
            start = seq.num_computed_tokens
            new_tokens.append(seq.token_slice(start, start + n))
            context_lens.append(start + n)
            tables.append(seq.table.pages)
        batch = ForwardBatch.build(
            new_tokens, context_lens, tables, self.cache.page_size, self.model.device
        )
        return self.model(batch, self.cache.pools)
