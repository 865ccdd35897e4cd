"""The start-up memory planner, with fake GPUs (no CUDA needed): fits, refusals, the report."""

from __future__ import annotations

import dataclasses
import enum
import logging
import sys
import types

import pytest
import torch

from kimi_grpc.checkpoint_maker import K2_TEXT_CONFIG, quantization_config
from kimi_grpc.config import EngineConfig, VisionConfig, parse_model_config
from kimi_grpc.engine.llm import LLM
from kimi_grpc.parallel.devices import DeviceInfo, NodeDevices, query_cuda_devices
from kimi_grpc.parallel.distributed import ParallelConfig
from kimi_grpc.parallel.memory_plan import MemoryPlanError, plan, rank_weight_bytes

GB = 1e9
BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def kimi():
    """The full K2.6 config (61 layers, 384 INT4 experts); only built on the meta device."""
    return parse_model_config(dict(K2_TEXT_CONFIG, quantization_config=quantization_config(32)))


def h200s(n: int = 8, free: float = 140 * GB, peers: bool = True) -> NodeDevices:
    devices = [DeviceInfo(i, "NVIDIA H200", int(143 * GB), int(free)) for i in range(n)]
    access = {(i, j): peers for i in range(n) for j in range(n) if i != j}
    return NodeDevices(devices, access)


def test_kimi_weights_split_eight_ways(kimi):
    whole = rank_weight_bytes(kimi, ParallelConfig(1), BF16)
    assert 580 * GB < whole < 610 * GB  # ~600 GB INT4 checkpoint
    for moe in ("tp", "ep"):
        per_rank = rank_weight_bytes(kimi, ParallelConfig(8, moe), BF16)
        # q_a/kv_a projections, norms and router gates are replicated: a little over 1/8
        assert whole / 8 < per_rank < whole / 8 * 1.05


def test_tp8_on_h200_fits_256k_and_reports_concurrency(kimi):
    result = plan(kimi, ParallelConfig(8), EngineConfig(), BF16, "cuda", h200s())
    assert result.kv_bytes_per_token == 70_272  # 61 layers x 576 x bf16
    assert result.kv_budget_bytes == int((140 * GB - result.weight_bytes_per_rank) * 0.9)
    assert result.max_model_len == 262_144
    assert result.max_concurrency(262_144) >= 1
    assert result.max_concurrency(4096) == result.kv_tokens // 4096
    report = result.report()
    assert "TP=8" in report and "x 262144" in report and "70,272 B/token" in report


def test_too_few_gpus_for_the_weights_is_refused(kimi):
    with pytest.raises(MemoryPlanError, match=r"weights need .* GB per rank .* use more GPUs"):
        plan(kimi, ParallelConfig(4), EngineConfig(), BF16, "cuda", h200s())


def test_256k_context_that_does_not_fit_is_refused(kimi):
    tight = h200s(free=90 * GB)  # weights fit, ~4.5 GB left for KV: ~64K tokens
    with pytest.raises(MemoryPlanError, match=r"max_model_len=262,144 needs .*--max-model-len"):
        plan(kimi, ParallelConfig(8), EngineConfig(max_model_len=262_144), BF16, "cuda", tight)
    shorter = plan(kimi, ParallelConfig(8), EngineConfig(max_model_len=32_768), BF16, "cuda", tight)
    assert shorter.kv_tokens >= 32_768


def test_missing_peer_access_is_refused(kimi):
    with pytest.raises(MemoryPlanError, match="peer access: 0->1"):
        plan(kimi, ParallelConfig(8), EngineConfig(), BF16, "cuda", h200s(peers=False))


def test_fewer_gpus_than_local_ranks_is_refused(kimi):
    with pytest.raises(MemoryPlanError, match="8 ranks on this node need 8 GPUs; 4 are visible"):
        plan(kimi, ParallelConfig(8), EngineConfig(), BF16, "cuda", h200s(n=4))


def test_multi_node_checks_only_local_gpus(kimi):
    two_nodes = ParallelConfig(16, nnodes=2, master_addr="10.0.0.1", master_port=29500)
    result = plan(kimi, two_nodes, EngineConfig(), BF16, "cuda", h200s())
    assert result.weight_bytes_per_rank < rank_weight_bytes(kimi, ParallelConfig(8), BF16)


def test_explicit_kv_budget_must_fit_next_to_the_weights(kimi):
    too_much = EngineConfig(kv_cache_memory=int(70 * GB))
    with pytest.raises(MemoryPlanError, match="kv_cache_memory"):
        plan(kimi, ParallelConfig(8), too_much, BF16, "cuda", h200s())
    deploy = EngineConfig(kv_cache_memory=51_539_607_552, max_model_len=262_144)  # docs/DEPLOY.md
    result = plan(kimi, ParallelConfig(8), deploy, BF16, "cuda", h200s())
    assert result.max_concurrency(262_144) == 2


def test_cuda_without_the_gpu_query_defers_the_kv_budget(kimi):
    result = plan(kimi, ParallelConfig(8), EngineConfig(), BF16, "cuda", None)
    assert result.kv_budget_bytes is None
    assert "KV budget measured after loading" in result.report()


def test_cpu_plan_uses_the_cpu_budget(kimi):
    demo_like = plan(kimi, ParallelConfig(8), EngineConfig(max_model_len=4096), BF16, "cpu", None)
    assert demo_like.kv_budget_bytes == 2 * 1024**3 and demo_like.free_bytes is None


def test_query_without_cuda_python_logs_and_returns_none(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)  # import fails
    with caplog.at_level(logging.INFO, logger="kimi_grpc.parallel"):
        assert query_cuda_devices() is None
    assert "cuda-python is not installed" in caplog.text


class FakeDriver:
    """cuda.bindings.driver's calling convention: every call returns ``(CUresult, *values)``."""

    class CUresult(enum.Enum):
        CUDA_SUCCESS = 0
        CUDA_ERROR_INVALID_DEVICE = 101

    def __init__(self, free: list[int], no_peer: set[tuple[int, int]]) -> None:
        self.free, self.no_peer, self.retained = free, no_peer, 0
        ok = self.CUresult.CUDA_SUCCESS
        self.cuInit = lambda flags: (ok,)
        self.cuDeviceGetCount = lambda: (ok, len(free))
        self.cuDeviceGet = lambda i: (ok, i)
        self.cuDeviceGetName = lambda n, dev: (ok, b"NVIDIA H200" + b"\0" * (n - 11))
        self.cuCtxPushCurrent = lambda ctx: (ok,)
        self.cuCtxPopCurrent = lambda: (ok, self.current)
        self.cuMemGetInfo = lambda: (ok, self.free[self.current], 143 * 10**9)
        self.cuDeviceCanAccessPeer = lambda a, b: (ok, int((a, b) not in no_peer))

        def retain(dev):
            self.current = dev
            self.retained += 1
            return ok, dev

        def release(dev):
            self.retained -= 1
            return (ok,)

        self.cuDevicePrimaryCtxRetain = retain
        self.cuDevicePrimaryCtxRelease = release


def test_query_reads_memory_and_peers_through_the_driver(monkeypatch, kimi):
    fake = FakeDriver([140 * 10**9, 139 * 10**9], no_peer={(1, 0)})
    monkeypatch.setitem(sys.modules, "cuda.bindings", types.SimpleNamespace(driver=fake))
    node = query_cuda_devices()
    assert [(d.name, d.free_bytes) for d in node.devices] == [
        ("NVIDIA H200", 140 * 10**9),
        ("NVIDIA H200", 139 * 10**9),
    ]
    assert node.peer_access == {(0, 1): True, (1, 0): False}
    assert fake.retained == 0  # every primary context released: torch starts clean
    with pytest.raises(MemoryPlanError, match="peer access: 1->0"):
        plan(kimi, ParallelConfig(2), EngineConfig(), BF16, "cuda", node)


def test_engine_start_refuses_a_context_it_cannot_hold():
    with pytest.raises(MemoryPlanError, match="max_model_len=100,000"):
        LLM(kv_cache_memory=1024**2, max_model_len=100_000)


def test_rank0_counts_the_vision_tower(kimi):
    """A checkpoint with a vision tower: rank 0 runs it and holds its weights (~0.9 GB for
    K2.6's MoonViT-3D + projector in bf16); the other ranks hold none of it."""
    vision = dataclasses.replace(kimi, vision_config=VisionConfig())  # K2.6's tower
    tp8 = ParallelConfig(8)
    extra0 = rank_weight_bytes(vision, tp8, BF16, 0) - rank_weight_bytes(kimi, tp8, BF16, 0)
    assert 0.8 * GB < extra0 < 1.0 * GB
    assert rank_weight_bytes(vision, tp8, BF16, 1) == rank_weight_bytes(kimi, tp8, BF16, 1)


def test_host_tier_larger_than_host_memory_is_refused(kimi):
    """Every local rank holds its own host pages: 8 x 200 GB on a 1 TB host does not fit."""
    engine = EngineConfig(host_kv_cache_memory=int(200 * GB))
    with pytest.raises(MemoryPlanError, match=r"200.0 GB x 8 local rank\(s\) = 1600.0 GB exceeds"):
        plan(kimi, ParallelConfig(8), engine, BF16, "cuda", h200s(), host_available=int(1000 * GB))
    fits = plan(kimi, ParallelConfig(8), engine, BF16, "cuda", h200s(), host_available=int(2e12))
    assert fits.tensor_parallel_size == 8


def test_decode_context_parallelism_multiplies_the_kv_tokens(kimi):
    """DCP=8 stores each token on one rank of eight: the same per-rank budget holds 8x the
    tokens (and the report says so)."""
    engine = EngineConfig(kv_cache_memory=int(48 * GB))
    tp8 = plan(kimi, ParallelConfig(8), engine, BF16, "cuda", h200s())
    dcp8 = plan(
        kimi, ParallelConfig(8, decode_context_parallel_size=8), engine, BF16, "cuda", h200s()
    )
    assert tp8.kv_tokens == int(48 * GB) // 70_272 == 683_060
    assert dcp8.kv_tokens == 8 * tp8.kv_tokens
    assert (tp8.max_concurrency(20_000), dcp8.max_concurrency(20_000)) == (34, 273)
    assert "DCP=8" in dcp8.report() and "each rank holds 1/8" in dcp8.report()
    # A max_model_len that one rank's replicated cache cannot hold fits once it is split.
    long = EngineConfig(kv_cache_memory=int(10 * GB), max_model_len=262_144)
    with pytest.raises(MemoryPlanError, match="replicated on every rank"):
        plan(kimi, ParallelConfig(8), long, BF16, "cuda", h200s())
    split = plan(
        kimi, ParallelConfig(8, decode_context_parallel_size=2), long, BF16, "cuda", h200s()
    )
    assert split.kv_tokens >= 262_144


def test_decode_context_parallel_layouts_it_cannot_serve_are_refused(kimi):
    with pytest.raises(
        ValueError, match="decode_context_parallel_size=3 must be a positive divisor"
    ):
        ParallelConfig(8, decode_context_parallel_size=3)
    with pytest.raises(ValueError, match="a DCP group would span nodes"):
        ParallelConfig(
            8, decode_context_parallel_size=8, nnodes=2, master_addr="10.0.0.1", master_port=1
        )
    with pytest.raises(MemoryPlanError, match=r"needs page_size=64 .* got page_size=32"):
        plan(
            kimi,
            ParallelConfig(8, decode_context_parallel_size=4),
            EngineConfig(page_size=32),
            BF16,
            "cuda",
            h200s(),
        )
    # The same page size without DCP, or on the CPU (the reference op takes any page), plans.
    plan(kimi, ParallelConfig(8), EngineConfig(page_size=32), BF16, "cuda", h200s())
    cpu = ParallelConfig(2, decode_context_parallel_size=2)
    plan(kimi, cpu, EngineConfig(page_size=32, max_model_len=4096), BF16, "cpu", None)
