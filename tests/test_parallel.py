"""Tensor and expert parallelism on the CPU (gloo): N processes give the single process's tokens.

Each ``LLM(tensor_parallel_size=N)`` starts N-1 real worker processes; rank 0 is this process.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time

import pytest
import torch
from hf_reference import VARIANTS, build

from kimi_grpc import LLM, SamplingParams
from kimi_grpc.checkpoint_maker import demo_checkpoint
from kimi_grpc.model import KimiForCausalLM
from kimi_grpc.parallel import ParallelContext
from kimi_grpc.parallel.step_codec import (
    MAGIC,
    VERSION,
    Op,
    StepFormatError,
    StepMessage,
    decode,
    decode_header,
    encode,
)

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
# Small steps force chunked prefill next to decodes: both attention paths run under TP.
ENGINE = dict(kv_cache_memory=8 * 1024**2, max_num_batched_tokens=24, dtype="float32")


def prompts() -> list[list[int]]:
    rng = random.Random(3)
    return [[rng.randrange(0, 1792) for _ in range(n)] for n in (5, 40, 1, 17)]


def generate(path, tp: int, moe: str = "tp") -> list[list[int]]:
    with LLM(str(path), tensor_parallel_size=tp, moe_parallel=moe, **ENGINE) as llm:
        return [out.token_ids for out in llm.generate(prompts(), GREEDY)]


@pytest.fixture(scope="module")
def demo_path():
    return demo_checkpoint()


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory):
    """A transformers-built DeepseekV3 checkpoint: 4 heads, 16 experts, vocab 2048, I=96/32."""
    path = tmp_path_factory.mktemp("hf-tp")
    build(VARIANTS[1], path, seed=5)
    return path


@pytest.fixture(scope="module")
def demo_tokens(demo_path):
    return generate(demo_path, 1)


@pytest.fixture(scope="module")
def hf_tokens(hf_path):
    return generate(hf_path, 1)


@pytest.mark.parametrize(("tp", "moe"), [(2, "tp"), (4, "tp"), (4, "ep")])
def test_demo_tp_matches_single_process(demo_path, demo_tokens, tp, moe):
    assert generate(demo_path, tp, moe) == demo_tokens


@pytest.mark.parametrize("moe", ["tp", "ep"])
def test_transformers_checkpoint_tp4_matches_single_process(hf_path, hf_tokens, moe):
    assert generate(hf_path, 4, moe) == hf_tokens


def _params(path, tp: int, rank: int, moe: str) -> dict[str, torch.Tensor]:
    ctx = ParallelContext(rank, tp, None, moe)  # loading needs no collectives
    model = KimiForCausalLM.from_checkpoint(path, dtype=torch.float32, ctx=ctx)
    return dict(model.named_parameters())


@pytest.mark.parametrize("moe", ["tp", "ep"])
def test_each_rank_loads_its_share(hf_path, moe):
    tp = 4
    full = _params(hf_path, 1, 0, "tp")
    ranks = [_params(hf_path, tp, r, moe) for r in range(tp)]
    replicated = sharded = 0
    for name, whole in full.items():
        sizes = {ranks[r][name].numel() for r in range(tp)}
        assert len(sizes) == 1, name  # even shards
        local = sizes.pop()
        nbytes = whole.numel() * whole.element_size()
        if local == whole.numel():
            replicated += nbytes
        elif moe == "tp" and name.endswith("_scale"):
            # I/tp = 8 < group 32: one scale per 8 columns instead of per 32 (exact regrouping)
            assert local * tp == whole.numel() * 4, name
            sharded += nbytes
        else:
            assert local * tp == whole.numel(), name
            sharded += nbytes
    assert sharded > replicated  # the experts, projections and vocab dominate
    for params in ranks:
        loaded = sum(p.numel() * p.element_size() for p in params.values())
        extra = loaded - replicated - sharded / tp
        assert extra <= (0.2 * sharded / tp if moe == "tp" else 0), (loaded, extra)


def test_ep_rank_holds_only_its_experts(hf_path):
    params = _params(hf_path, 4, 2, "ep")
    experts = params["layers.1.mlp.experts.w13_packed"]
    assert experts.shape[0] == 16 // 4
    whole = _params(hf_path, 1, 0, "tp")["layers.1.mlp.experts.w13_packed"]
    assert torch.equal(experts, whole[8:12])


def test_step_message_round_trip():
    msg = StepMessage(
        Op.STEP,
        seq=7,
        token_ids=[[1, 2, 3], [9], [4, 5]],
        context_lens=[3, 70, 12],
        block_tables=[[0], [3, 4], [8]],
        page_size=64,
    )
    header, payload = encode(msg)
    assert header.dtype == payload.dtype == torch.int64
    assert header[:3].tolist() == [MAGIC, VERSION, int(Op.STEP)]
    assert decode(decode_header(header), payload) == msg
    beat, none = encode(StepMessage(Op.HEARTBEAT, seq=8))
    assert none is None and decode(decode_header(beat), None) == StepMessage(Op.HEARTBEAT, 8)


def test_step_header_version_and_magic_are_checked():
    header, _ = encode(StepMessage(Op.SHUTDOWN, seq=1))
    newer = header.clone()
    newer[1] = VERSION + 1
    with pytest.raises(StepFormatError, match="version"):
        decode_header(newer)
    garbage = header.clone()
    garbage[0] = 12345
    with pytest.raises(StepFormatError, match="not a kimi-grpc step header"):
        decode_header(garbage)
    unknown = header.clone()
    unknown[2] = 99
    with pytest.raises(StepFormatError, match="unknown step op"):
        decode_header(unknown)
    step_header, step_payload = encode(StepMessage(Op.STEP, 0, [[1]], [1], [[0]], 16))
    with pytest.raises(StepFormatError, match="payload"):
        decode(decode_header(step_header), step_payload[:-1])


WORKER_DIES_AT_START = """
import subprocess, sys
import kimi_grpc.parallel.worker_procs as procs
real = subprocess.Popen
procs.subprocess.Popen = lambda cmd, **kw: real([sys.executable, "-c", "raise SystemExit(7)"], **kw)
from kimi_grpc import LLM
from kimi_grpc.parallel.leader import ParallelFailure
try:
    LLM(tensor_parallel_size=2, kv_cache_memory=8_000_000)
except ParallelFailure as exc:
    print("refused:", exc)
"""


def test_worker_dying_before_rendezvous_fails_the_start_at_once():
    """Rank 0 must not wait out the 30-minute startup timeout for a rank that will never come."""
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", WORKER_DIES_AT_START], capture_output=True, text=True, timeout=60
    )
    assert "refused: tensor-parallel worker rank 1" in out.stdout, out.stderr
    assert "exited with exit code 7" in out.stdout
    assert time.monotonic() - start < 30
