"""``LLM``: offline batch generation through the serving engine (vLLM-style API)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence as Seq

import torch

from kimi_grpc.config import EngineConfig, load_model_config
from kimi_grpc.engine.llm_engine import LLMEngine
from kimi_grpc.engine.outputs import CompletionOutput, RequestOutput
from kimi_grpc.media.request import MediaSpan
from kimi_grpc.model.dtype import DTYPES, resolve_dtype
from kimi_grpc.model.vision import KimiVisionModel
from kimi_grpc.parallel.distributed import ParallelConfig, free_port, rank_device
from kimi_grpc.parallel.executor import RankExecutor
from kimi_grpc.parallel.leader import Leader
from kimi_grpc.parallel.memory_plan import plan_or_refuse
from kimi_grpc.parallel.worker import WorkerSpec
from kimi_grpc.sampling_params import SamplingParams
from kimi_grpc.tokenizer import KimiTokenizer


def load_engine(
    model: str | None = None,
    *,
    revision: str | None = None,
    device: str = "cpu",
    dtype: str | torch.dtype = "auto",
    tensor_parallel_size: int = 1,
    moe_parallel: str = "tp",
    decode_context_parallel_size: int = 1,
    parallel: ParallelConfig | None = None,
    **engine_args,
) -> LLMEngine:
    """Loads a checkpoint (a directory, a hub repo id, or the built-in demo when None).

    ``tensor_parallel_size > 1`` starts the other ranks of this node as worker processes (each
    loads only its shard) and makes this process rank 0; ``decode_context_parallel_size=N``
    shards the latent cache by token over groups of N of those ranks (N divides the TP size);
    ``parallel`` gives the full layout (multi-node, timeouts) and overrides the shorthand
    arguments. Workers use this
    process's hot-op backend.
    """
    from kimi_grpc import ops
    from kimi_grpc.checkpoint import resolve_model_path
    from kimi_grpc.checkpoint_maker import demo_checkpoint

    if parallel is None:
        parallel = ParallelConfig(tensor_parallel_size, moe_parallel, decode_context_parallel_size)
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: no CUDA device is available to this torch build")
    if device == "cuda" and torch.cuda.device_count() < parallel.local_size:
        raise ValueError(
            f"{parallel.local_size} ranks on this node need {parallel.local_size} GPUs; "
            f"{torch.cuda.device_count()} are visible"
        )
    path = resolve_model_path(model, revision) if model else demo_checkpoint()
    torch_dtype = resolve_dtype(dtype, device)
    config = EngineConfig(**engine_args)
    plan_or_refuse(path, parallel, config, torch_dtype, device)
    leader = None
    if parallel.tensor_parallel_size > 1:
        if parallel.master_port == 0:
            parallel = dataclasses.replace(parallel, master_port=free_port(parallel.master_addr))
        if not isinstance(dtype, str):
            dtype = next(name for name, d in DTYPES.items() if d is dtype)
        spec = WorkerSpec(
            str(path), parallel, device, dtype, ops.backend(), engine_args, log_level()
        )
        leader = Leader(spec, rank_device(device, 0))
    try:
        rank0_device = rank_device(device, 0) if leader else torch.device(device)
        # The vision tower runs on rank 0 only; the model broadcasts its embeddings to the other
        # ranks inside the forward (docs/ARCHITECTURE.md, "Images and video"). It loads before
        # the executor, whose cache takes a share of the memory left after everything rank 0 holds.
        vision = None
        if load_model_config(path).vision_config is not None:
            vision = KimiVisionModel.from_checkpoint(path, dtype=torch_dtype, device=rank0_device)
        executor = RankExecutor.load(
            path,
            config,
            dtype=torch_dtype,
            device=rank0_device,
            ctx=leader.ctx if leader else None,
            agree=leader.agree_num_pages if leader else None,
        )
        engine = LLMEngine(
            executor, KimiTokenizer.from_dir(path), config, leader=leader, vision=vision
        )
    except BaseException:
        if leader is not None:
            leader.fail("rank 0 failed to load")
            leader.shutdown()
        raise
    engine.model_path = path
    return engine


def log_level() -> str:
    return logging.getLevelName(logging.getLogger().getEffectiveLevel())


class LLM:
    """``LLM(model=...).generate(prompts, sampling_params)`` -> one ``RequestOutput`` per prompt.

    Engine arguments (see ``EngineConfig``): ``kv_cache_memory``, ``max_num_seqs``,
    ``max_num_batched_tokens``, ``max_model_len``, ``enable_prefix_caching``, ``page_size``, ...
    ``tensor_parallel_size=N`` (``moe_parallel="tp"|"ep"``, ``decode_context_parallel_size=D``)
    runs N ranks as N processes; call :meth:`shutdown` (or use ``with LLM(...) as llm``) to stop
    them.
    """

    def __init__(self, model: str | None = None, **kwargs) -> None:
        self.engine = load_engine(model, **kwargs)
        self._counter = 0

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def tokenizer(self) -> KimiTokenizer:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | Seq[str | list[int]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        media: Seq[Seq[MediaSpan]] | None = None,
    ) -> list[RequestOutput]:
        """``media[i]``: prompt i's images / video chunks (``ChatPrompt.spans``); for a single
        prompt, its spans directly."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
            if media is not None and all(isinstance(span, MediaSpan) for span in media):
                media = [media]
        prompts = list(prompts)
        media = [()] * len(prompts) if media is None else list(media)
        if len(media) != len(prompts):
            raise ValueError(f"got media for {len(media)} prompts, not {len(prompts)}")
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
            for prompt, p, spans in zip(prompts, params, media, strict=True):
                request_id = f"offline-{self._counter}"
                self._counter += 1
                ids = self.engine.add_request(request_id, prompt, p, media=spans)
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
