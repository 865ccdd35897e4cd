"""``LLM``: offline batch generation through the serving engine (vLLM-style API)."""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from kimi_grpc.config import EngineConfig
from kimi_grpc.engine.llm_engine import LLMEngine
from kimi_grpc.engine.outputs import CompletionOutput, RequestOutput
from kimi_grpc.model import KimiForCausalLM
from kimi_grpc.sampling_params import SamplingParams
from kimi_grpc.tokenizer import KimiTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_engine(
    model: str | None = None,
    *,
    revision: str | None = None,
    device: str = "cpu",
    dtype: str | torch.dtype = "auto",
    tensor_parallel_size: int = 1,
    **engine_args,
) -> LLMEngine:
    """Loads a checkpoint (a directory, a hub repo id, or the built-in demo when None)."""
    from kimi_grpc.checkpoint import resolve_model_path
    from kimi_grpc.checkpoint_maker import demo_checkpoint

    if tensor_parallel_size != 1:
        raise ValueError("tensor_parallel_size > 1 arrives with the scale-out work; use 1")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: no CUDA device is available to this torch build")
    path = resolve_model_path(model, revision) if model else demo_checkpoint()
    net = KimiForCausalLM.from_checkpoint(path, dtype=resolve_dtype(dtype, device), device=device)
    engine = LLMEngine(net, KimiTokenizer.from_dir(path), EngineConfig(**engine_args))
    engine.model_path = path
    return engine


class LLM:
    """``LLM(model=...).generate(prompts, sampling_params)`` -> one ``RequestOutput`` per prompt.

    Engine arguments (see ``EngineConfig``): ``kv_cache_memory``, ``max_num_seqs``,
    ``max_num_batched_tokens``, ``max_model_len``, ``enable_prefix_caching``, ``page_size``, ...
    """

    def __init__(self, model: str | None = None, **kwargs) -> None:
        self.engine = load_engine(model, **kwargs)
        self._counter = 0

    @property
    def tokenizer(self) -> KimiTokenizer:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | Seq[str | list[int]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = (
            [sampling_params] * len(prompts)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params) != len(prompts):
            raise ValueError(
                f"got {len(params)} sampling_params for {len(prompts)} prompts (give 1 or 1 each)"
            )
        results: dict[str, RequestOutput] = {}
        order = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                request_id = f"offline-{self._counter}"
                self._counter += 1
                ids = self.engine.add_request(request_id, prompt, p)
                results[request_id] = RequestOutput(
                    request_id, ids, [CompletionOutput(i) for i in range(p.n)]
                )
                order.append(request_id)
            while self.engine.has_unfinished_requests():
                for delta in self.engine.step():
                    results[delta.request_id].apply(delta)
        except BaseException:
            for request_id in order:
                self.engine.abort_request(request_id)
            raise
        return [results[r] for r in order]
