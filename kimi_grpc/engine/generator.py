"""Offline generation for one prompt: prefill, then absorbed-MLA decode steps.

This is the single-request path behind ``kimi-grpc generate``; the serving engine (continuous
batching, page allocator, prefix cache) builds on the same model step (``ForwardBatch``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kimi_grpc.engine.kv_cache import DEFAULT_PAGE_SIZE, LatentKVCache
from kimi_grpc.engine.sampler import make_generator, sample
from kimi_grpc.model.forward_batch import ForwardBatch
from kimi_grpc.model.kimi import KimiForCausalLM
from kimi_grpc.sampling_params import SamplingParams
from kimi_grpc.tokenizer import KimiTokenizer


@dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated ids, including a final stop token if one ended generation
    text: str  # detokenized generated ids, special tokens skipped
    finish_reason: str  # "stop" | "length"


class Generator:
    def __init__(
        self, model: KimiForCausalLM, tokenizer: KimiTokenizer, page_size: int = DEFAULT_PAGE_SIZE
    ) -> None:
        self.model, self.tokenizer, self.page_size = model, tokenizer, page_size
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} tokens but the model only "
                f"{model.config.vocab_size}"
            )
        # Stop on every eos the checkpoint declares, plus <|im_end|> and [EOS] (Kimi's rule).
        stops = list(model.config.eos_token_ids)
        for token_id in (tokenizer.im_end_id, tokenizer.eos_id):
            if token_id is not None and token_id not in stops:
                stops.append(token_id)
        self.eos_token_ids = tuple(stops)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, *, dtype: torch.dtype, device: torch.device | str
    ) -> Generator:
        model = KimiForCausalLM.from_checkpoint(path, dtype=dtype, device=device)
        return cls(model, KimiTokenizer.from_dir(path))

    def generate(self, prompt: str | list[int], params: SamplingParams) -> GenerationResult:
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        config = self.model.config
        if not prompt_ids:
            raise ValueError("prompt is empty")
        bad = [t for t in prompt_ids if not 0 <= t < config.vocab_size]
        if bad:
            raise ValueError(
                f"prompt token id {bad[0]} is outside the vocabulary [0, {config.vocab_size})"
            )
        max_len = min(len(prompt_ids) + params.max_tokens, config.max_position_embeddings)
        if len(prompt_ids) >= max_len:
            raise ValueError(
                f"prompt has {len(prompt_ids)} tokens; the model's context is "
                f"{config.max_position_embeddings}"
            )
        device = self.model.device
        cache = LatentKVCache(
            config,
            -(-max_len // self.page_size),
            page_size=self.page_size,
            dtype=self.model.dtype,
            device=device,
        )
        pages = list(range(cache.num_pages))
        stops = set(params.stop_token_ids) | (
            set() if params.ignore_eos else set(self.eos_token_ids)
        )
        rng = make_generator(params, device)

        output: list[int] = []
        new_tokens, finish = list(prompt_ids), "length"
        while True:
            context = len(prompt_ids) + len(output)
            batch = ForwardBatch.build([new_tokens], [context], [pages], self.page_size, device)
            token = sample(self.model(batch, cache.pools)[0], params, rng)
            output.append(token)
            if token in stops:
                finish = "stop"
                break
            if len(output) >= params.max_tokens or context + 1 >= max_len:
                break
            new_tokens = [token]
        text = self.tokenizer.decode(output, skip_special_tokens=True)
        return GenerationResult(prompt_ids, output, text, finish)
