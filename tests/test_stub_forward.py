"""The stub-forward hook (issue 18's measurement tool): the real engine around a forward that
only waits and returns position-determined logits."""

from __future__ import annotations

import time

import pytest

from kimi_grpc.engine.llm import LLM, load_engine
from kimi_grpc.engine.stub_forward import use_stub_forward
from kimi_grpc.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("scheduling_mode")


def expected_tokens(prompt_len: int, n: int) -> list[int]:
    """The stub picks 100 + position * 7919 mod 1000 at each sequence's last position."""
    return [100 + ((prompt_len - 1 + i) * 7919) % 1000 for i in range(n)]


def test_the_real_engine_runs_around_the_stub() -> None:
    engine = load_engine(dtype="float32")
    stub = use_stub_forward(engine, 0.02)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    engine.add_request("a", list(range(100, 112)), params)
    engine.add_request("b", list(range(100, 107)), params)
    tokens: dict[str, list[int]] = {"a": [], "b": []}
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for delta in engine.step():
            tokens[delta.request_id] += delta.token_ids
    assert tokens == {"a": expected_tokens(12, 5), "b": expected_tokens(7, 5)}
    assert stub.calls == 5  # one prefill and four decode steps, none wasted
    assert time.perf_counter() - start >= stub.calls * stub.seconds  # every forward waited
    assert engine.timings.forward >= stub.calls * stub.seconds
    assert engine.blocks.num_used_pages == 0
    engine.shutdown()


def test_stop_tokens_end_the_stream_as_with_the_model() -> None:
    engine = load_engine(dtype="float32")
    use_stub_forward(engine, 0)
    want = expected_tokens(12, 6)
    stop = SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[want[3]])
    engine.add_request("s", list(range(100, 112)), stop)
    out: list[int] = []
    while engine.has_unfinished_requests():
        for delta in engine.step():
            out += delta.token_ids
    assert out == want[:4]  # the stop token ends the stream (and is reported)
    engine.shutdown()


def test_the_stub_refuses_tensor_parallel_engines() -> None:
    llm = LLM(dtype="float32", tensor_parallel_size=2)
    try:
        with pytest.raises(ValueError, match="tensor_parallel_size=1"):
            use_stub_forward(llm.engine, 0.001)
    finally:
        llm.shutdown()
