"""The scheduler alone (no model): budgets, chunked prefill, admission order, preemption."""

from __future__ import annotations

import pytest

from kimi_grpc.engine.block_manager import BlockManager
from kimi_grpc.engine.sampler import SamplingState
from kimi_grpc.engine.scheduler import EngineOverloadedError, Scheduler
from kimi_grpc.engine.sequence import FinishReason, Sequence, SequenceStatus
from kimi_grpc.engine.stop_checker import StopChecker
from kimi_grpc.sampling_params import SamplingParams
from kimi_grpc.tokenizer import IncrementalDetokenizer, KimiTokenizer, demo_tokenizer_dir

TOKENIZER = KimiTokenizer.from_dir(demo_tokenizer_dir())
PAGE = 4


def seq(seq_id: int, prompt_len: int, *, priority: int = 0, first_token: int = 0) -> Sequence:
    params = SamplingParams(max_tokens=100)
    prompt = list(range(first_token, first_token + prompt_len))
    return Sequence(
        seq_id=seq_id,
        request_id=f"r{seq_id}",
        index=0,
        prompt_token_ids=prompt,
        params=params,
        max_tokens=100,
        sampling=SamplingState(params=params, prompt_token_ids=prompt),
        detokenizer=IncrementalDetokenizer(TOKENIZER),
        stop_checker=StopChecker([], False),
        priority=priority,
        arrival=float(seq_id),
    )


def make(num_pages=64, budget=100, max_seqs=8, max_waiting=16) -> Scheduler:
    return Scheduler(
        BlockManager(num_pages, PAGE),
        max_num_seqs=max_seqs,
        max_num_batched_tokens=budget,
        max_waiting=max_waiting,
    )


def step(sched: Scheduler) -> list[tuple[int, int]]:
    """One scheduling step plus what a model step does to the sequences' state."""
    out = sched.schedule()
    for s, n in out.scheduled:
        s.num_computed_tokens += n
        sched.blocks.commit(s.table, s.token_ids(), s.num_computed_tokens)
        if s.num_computed_tokens == s.num_tokens:
            s.sampling.output_token_ids.append(1000 + s.seq_id)
    return [(s.seq_id, n) for s, n in out.scheduled]


def test_chunked_prefill_then_decode():
    sched = make(budget=100)
    sched.add([seq(0, 250)])
    assert step(sched) == [(0, 100)]
    assert step(sched) == [(0, 100)]
    assert step(sched) == [(0, 50)]
    assert step(sched) == [(0, 1)]


def test_running_first_then_admission_within_budget():
    sched = make(budget=100)
    sched.add([seq(0, 30)])
    step(sched)
    sched.add([seq(1, 150, first_token=500), seq(2, 10, first_token=900)])
    # Decode of 0 first (1 token), then 1's first chunk takes the rest; 2 must wait.
    assert step(sched) == [(0, 1), (1, 99)]
    assert step(sched) == [(0, 1), (1, 51), (2, 10)]


def test_max_num_seqs():
    sched = make(budget=1000, max_seqs=2)
    sched.add([seq(i, 5) for i in range(4)])
    assert [i for i, _ in step(sched)] == [0, 1]
    assert len(sched.waiting) == 2


def test_priority_then_fcfs():
    sched = make(budget=1000, max_seqs=1)
    sched.add([seq(0, 5, priority=1), seq(1, 5, priority=0), seq(2, 5, priority=1)])
    admitted = []
    for _ in range(3):
        admitted.append(step(sched)[0][0])
        sched.finish(sched.running[0], FinishReason.STOP)
    assert admitted == [1, 0, 2]


def test_waiting_queue_bound():
    sched = make(max_waiting=3)
    sched.add([seq(0, 5), seq(1, 5)])
    with pytest.raises(EngineOverloadedError, match="waiting queue is full"):
        sched.add([seq(2, 5), seq(3, 5)])  # a request's sequences are added all or none
    assert len(sched.waiting) == 2


def test_preemption_takes_the_newest_and_recomputes_its_output():
    sched = make(num_pages=6, budget=1000)  # 24 token slots
    a, b = seq(0, 8), seq(1, 8, first_token=100)
    sched.add([a, b])
    step(sched)  # both prefilled: 2 + 2 pages (+ decode slots as they grow)
    for _ in range(8):
        step(sched)
    # Growing both beyond 24 slots forces the newest (b) out; a keeps running.
    assert b.num_preemptions >= 1 and a.num_preemptions == 0
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    produced = len(b.output_token_ids)
    assert produced > 0
    sched.finish(a, FinishReason.LENGTH)
    scheduled = step(sched)
    assert scheduled[0][0] == 1
    # Re-admission recomputes prompt + output so far (minus what the prefix cache still holds).
    assert b.num_computed_tokens == b.num_tokens - 1


def test_head_of_line_waits_for_pages():
    sched = make(num_pages=4, budget=1000)
    sched.add([seq(0, 12)])
    step(sched)  # 3 pages + room to grow
    sched.add([seq(1, 12, first_token=50), seq(2, 2, first_token=80)])
    assert [i for i, _ in step(sched)] == [0]  # 1 does not fit; 2 may not jump the queue


def test_finish_frees_pages_from_any_state():
    sched = make(num_pages=16)
    free = sched.blocks.num_free_pages
    a, b = seq(0, 10), seq(1, 10, first_token=200)
    sched.add([a])
    step(sched)
    sched.add([b])
    sched.finish(a, FinishReason.ABORT)
    sched.finish(b, FinishReason.ABORT)
    sched.finish(b, FinishReason.ABORT)  # idempotent
    assert not sched.running and not sched.waiting
    assert sched.blocks.num_free_pages == free and sched.blocks.num_used_pages == 0
    assert a.finish_reason is FinishReason.ABORT and a.table is None
