"""Will the model fit, and how much context × concurrency does the rest of the memory buy?

Computed before any weight is loaded, from the checkpoint's config and the sharding:

* weight bytes per rank: the model built on the ``meta`` device with this rank's
  ``ParallelContext`` (exactly the tensors the loaders will fill, no data read), plus on rank 0
  the vision tower + projector of a checkpoint that has one (~0.9 GB on K2.6: rank 0 alone runs
  it) — the plan is rank 0's, the fullest rank;
* KV bytes per token: ``layers × (kv_lora_rank + rope_dim) × dtype bytes`` (70,272 for Kimi in
  bf16), stored on every rank (the latent cache is replicated under TP) or, with decode context
  parallelism N, on one rank of each group of N (so the ranks' budgets hold N times the tokens);
* KV budget per rank: ``kv_cache_memory`` when given, else ``(free − weights) ×
  kv_cache_memory_fraction`` on a GPU (free from cuda-python; without it the engine measures the
  budget after loading, as before), and 2 GiB on the CPU;
* tokens = budget / bytes per token × N; concurrency at a context = tokens // context.

It refuses with a message naming the numbers when the weights do not fit, when one
``max_model_len`` sequence (asked for explicitly) does not fit in the KV budget, when the node has
fewer GPUs than local ranks, when two of those GPUs lack peer access, when decode context
parallelism runs on CUDA with a page size the MLA decode kernel does not take (it would fall back
to the per-sequence reference loop), or when the host KV tier
(``host_kv_cache_memory`` per rank, every local rank holding its own) exceeds the host memory
available.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from kimi_grpc.config import EngineConfig, ModelConfig, load_model_config
from kimi_grpc.model.kv_cache import CPU_DEFAULT_KV_CACHE_BYTES, LatentKVCache
from kimi_grpc.ops import CUDA_MLA_PAGE_SIZE
from kimi_grpc.parallel.devices import NodeDevices, query_cuda_devices
from kimi_grpc.parallel.distributed import ParallelConfig
from kimi_grpc.parallel.state import ParallelContext

logger = logging.getLogger("kimi_grpc.parallel")
GB = 1e9
REPORT_CONTEXTS = (4096, 32768, 131072, 262144)


class MemoryPlanError(ValueError):
    """The requested layout cannot run on this node; the message says why and what to change."""


@dataclass(frozen=True)
class MemoryPlan:
    tensor_parallel_size: int
    moe_parallel: str
    weight_bytes_per_rank: int
    kv_bytes_per_token: int
    kv_budget_bytes: int | None  # per rank (None: measured after loading)
    max_model_len: int
    free_bytes: int | None  # free GPU memory per rank before loading (None: not known)
    decode_context_parallel_size: int = 1  # ranks that split one copy of the cache by token

    @property
    def kv_tokens(self) -> int:
        if self.kv_budget_bytes is None:
            raise ValueError("the KV budget is only known after loading")
        return self.kv_budget_bytes // self.kv_bytes_per_token * self.decode_context_parallel_size

    def max_concurrency(self, context: int) -> int:
        return self.kv_tokens // context

    def report(self) -> str:
        dcp = self.decode_context_parallel_size
        layout = f"TP={self.tensor_parallel_size}" + (f", DCP={dcp}" if dcp > 1 else "")
        head = (
            f"memory plan ({layout}, moe {self.moe_parallel}): weights "
            f"{self.weight_bytes_per_rank / GB:.3f} GB per rank"
        )
        if self.kv_budget_bytes is None:
            return f"{head}; KV budget measured after loading"
        contexts = sorted(
            {c for c in REPORT_CONTEXTS if c < self.max_model_len} | {self.max_model_len}
        )
        fits = ", ".join(f"{self.max_concurrency(c)} x {c}" for c in contexts)
        free = "" if self.free_bytes is None else f" of {self.free_bytes / GB:.2f} GB free"
        shared = f" (each rank holds 1/{dcp} of them)" if dcp > 1 else ""
        return (
            f"{head}{free}; KV budget "
            f"{self.kv_budget_bytes / GB:.3f} GB per rank = {self.kv_tokens:,} tokens{shared} at "
            f"{self.kv_bytes_per_token:,} B/token; concurrency x context: {fits}"
        )


def rank_weight_bytes(
    config: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype, rank: int = 0
) -> int:
    """Parameter bytes rank ``rank`` will load (every shard is an even split; rank 0 also holds
    the vision model, when the checkpoint has one)."""
    from kimi_grpc.model import KimiForCausalLM
    from kimi_grpc.model.vision import KimiVisionModel

    ctx = ParallelContext(rank, parallel.tensor_parallel_size, None, parallel.moe_parallel)
    models = [KimiForCausalLM(config, dtype=dtype, device="meta", ctx=ctx)]
    if rank == 0 and config.vision_config is not None:
        models.append(KimiVisionModel(config.vision_config, dtype=dtype, device="meta"))
    return sum(p.numel() * p.element_size() for m in models for p in m.parameters())


def plan(
    config: ModelConfig,
    parallel: ParallelConfig,
    engine: EngineConfig,
    dtype: torch.dtype,
    device: str,
    devices: NodeDevices | None,
    host_available: int | None = None,
) -> MemoryPlan:
    """The plan for one node, or :class:`MemoryPlanError`. ``devices``: the node's GPUs
    (``device == "cuda"``; None when unknown); ``host_available``: host memory bytes available
    (None: ask the OS)."""
    tp, local = parallel.tensor_parallel_size, parallel.local_size
    dcp = parallel.decode_context_parallel_size
    _check_host_tier(engine, local, host_available)
    if dcp > 1 and device == "cuda" and engine.page_size != CUDA_MLA_PAGE_SIZE:
        raise MemoryPlanError(
            f"decode_context_parallel_size={dcp} on CUDA needs page_size={CUDA_MLA_PAGE_SIZE} "
            f"(the MLA decode kernel's page; each block then spans {CUDA_MLA_PAGE_SIZE * dcp} "
            f"tokens), got page_size={engine.page_size}"
        )
    weights = rank_weight_bytes(config, parallel, dtype)
    per_token = LatentKVCache.bytes_per_token(config, dtype)
    context = config.max_position_embeddings
    max_len = min(engine.max_model_len or context, context)
    free = None
    if device == "cuda" and devices is not None:
        free = _check_gpus(devices, local)
    if free is not None and weights > free:
        raise MemoryPlanError(
            f"the weights need {weights / GB:.1f} GB per rank at tensor_parallel_size={tp} but "
            f"a GPU has {free / GB:.1f} GB free: use more GPUs"
        )
    if engine.kv_cache_memory is not None:
        budget = engine.kv_cache_memory
        if free is not None and weights + budget > free:
            raise MemoryPlanError(
                f"weights {weights / GB:.1f} GB + kv_cache_memory {budget / GB:.1f} GB per rank "
                f"exceed the {free / GB:.1f} GB a GPU has free"
            )
    elif free is not None:  # what the engine will measure after loading, times the fraction
        budget = int((free - weights) * engine.kv_cache_memory_fraction)
    elif device == "cuda":  # no cuda-python: the engine measures the budget after loading
        logger.info("weights %.3f GB per rank; KV budget measured after loading", weights / GB)
        return MemoryPlan(tp, parallel.moe_parallel, weights, per_token, None, max_len, None, dcp)
    else:
        budget = CPU_DEFAULT_KV_CACHE_BYTES
    result = MemoryPlan(tp, parallel.moe_parallel, weights, per_token, budget, max_len, free, dcp)
    if result.kv_tokens < max_len and engine.max_model_len is None:
        logger.warning(
            "the KV cache holds %s tokens, less than the model's context %s: requests "
            "needing more are refused (set --max-model-len to make this a start-up error)",
            f"{result.kv_tokens:,}",
            f"{max_len:,}",
        )
    elif result.kv_tokens < max_len:
        where = "replicated on every rank" if dcp == 1 else f"split over {dcp} ranks"
        raise MemoryPlanError(
            f"max_model_len={max_len:,} needs {max_len * per_token / dcp / GB:.2f} GB of KV cache "
            f"per rank ({per_token:,} B/token, {where}) but only "
            f"{budget / GB:.2f} GB are left after {weights / GB:.2f} GB of weights "
            f"({result.kv_tokens:,} tokens): lower --max-model-len or use more GPUs"
        )
    return result


def _check_host_tier(engine: EngineConfig, local: int, available: int | None) -> None:
    size = engine.host_kv_cache_memory if engine.enable_prefix_caching else 0
    if not size:
        return
    available = psutil.virtual_memory().available if available is None else available
    if size * local > available:
        raise MemoryPlanError(
            f"host_kv_cache_memory {size / GB:.1f} GB x {local} local rank(s) = "
            f"{size * local / GB:.1f} GB exceeds the {available / GB:.1f} GB of host memory "
            "available: lower --host-kv-cache-memory"
        )


def _check_gpus(devices: NodeDevices, local: int) -> int:
    """Free bytes per rank (the smallest among the node's first ``local`` GPUs) or an error."""
    if len(devices.devices) < local:
        raise MemoryPlanError(
            f"{local} ranks on this node need {local} GPUs; {len(devices.devices)} are visible"
        )
    missing = devices.missing_peers(local)
    if missing:
        pairs = ", ".join(f"{i}->{j}" for i, j in missing[:8])
        raise MemoryPlanError(
            f"GPUs without peer access: {pairs}; tensor parallelism over NCCL needs P2P between "
            "every pair of its GPUs (check the topology with nvidia-smi topo -m)"
        )
    return min(d.free_bytes for d in devices.devices[:local])


def plan_or_refuse(
    path: str | Path,
    parallel: ParallelConfig,
    engine: EngineConfig,
    dtype: torch.dtype,
    device: str,
) -> MemoryPlan:
    """Start-up check: queries the GPUs (cuda-python), plans, logs the plan or raises."""
    devices = query_cuda_devices() if device == "cuda" else None
    if device == "cpu":
        logger.info("CPU: no GPU query; each rank holds its weights and KV in host memory")
    result = plan(load_model_config(path), parallel, engine, dtype, device, devices)
    logger.info("%s", result.report())
    return result
