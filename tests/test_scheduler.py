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


def seq(
    seq_id: int,
    prompt_len: int,
    *,
    priority: int = 0,
    first_token: int = 0,
    session: str | None = None,
    request_id: str | None = None,
) -> Sequence:
    params = SamplingParams(max_tokens=100)
    prompt = list(range(first_token, first_token + prompt_len))
    return Sequence(
        seq_id=seq_id,
        request_id=request_id or f"r{seq_id}",
        index=0,
        prompt_token_ids=prompt,
        params=params,
        max_tokens=100,
        sampling=SamplingState(params=params, prompt_token_ids=prompt),
        detokenizer=IncrementalDetokenizer(TOKENIZER),
        stop_checker=StopChecker([], False),
        priority=priority,
        arrival=float(seq_id),
        session_id=session,
    )


def make(num_pages=64, budget=100, max_seqs=8, max_waiting=16, chunk=None) -> Scheduler:
    return Scheduler(
        BlockManager(num_pages, PAGE),
        max_num_seqs=max_seqs,
        max_num_batched_tokens=budget,
        max_waiting=max_waiting,
        max_prefill_chunk_tokens=chunk,
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


# ---- fairness: decodes before prefills, prefill chunk cap, session-fair admission -------------
BUDGET, CHUNK = 64, 32


def run_swarm(chunk: int | None, num_big: int = 1) -> dict:
    """``num_big`` prompts of 40 x budget tokens prefill while small requests arrive every other
    step and leave after 5 tokens. Every step checks that each small sequence that was decoding
    got its token. Returns the small requests' first-token latencies (steps after arrival), each
    big prompt's tokens per step until its prefill ended, and the skipped decodes."""
    sched = make(num_pages=4096, budget=BUDGET, max_seqs=16, max_waiting=64, chunk=chunk)
    bigs = [seq(i, 40 * BUDGET, first_token=10_000 * i) for i in range(num_big)]
    sched.add(bigs)
    arrived: dict[int, int] = {}
    latency: dict[int, int] = {}
    chunks: list[list[int]] = [[] for _ in bigs]
    skipped: list[str] = []
    for t in range(400):
        if t % 2 == 0 and len(arrived) < 40:
            sid = num_big + len(arrived)
            sched.add([seq(sid, 5 + (sid * 7) % 20, first_token=3000 + 50 * sid)])
            arrived[sid] = t
        decoding = {s.seq_id for s in sched.running if s.seq_id in arrived and s.output_token_ids}
        prefilling = [not big.output_token_ids for big in bigs]
        scheduled = dict(step(sched))
        skipped += [f"step {t}: decode of {i}" for i in decoding if scheduled.get(i) != 1]
        for big, got, before in zip(bigs, chunks, prefilling, strict=True):
            if before:
                got.append(scheduled.get(big.seq_id, 0))
        for s in list(sched.running):
            if s.seq_id in arrived and s.output_token_ids:
                latency.setdefault(s.seq_id, t - arrived[s.seq_id])
                if len(s.output_token_ids) == 5:
                    sched.finish(s, FinishReason.LENGTH)
        if len(latency) == 40 and all(b.output_token_ids for b in bigs):
            break
    return {"latency": latency, "chunks": chunks, "skipped": skipped}


def test_long_prefill_does_not_starve_small_requests():
    got = run_swarm(CHUNK)
    assert got["skipped"] == []
    # Every small request is admitted and gets its first token in the step it arrives.
    assert len(got["latency"]) == 40 and max(got["latency"].values()) == 0
    # The big prompt advances by a full capped chunk every step until its prefill ends.
    assert got["chunks"][0] == [CHUNK] * (40 * BUDGET // CHUNK)
    # Without the cap the same small requests wait out the whole prefill (~40 steps).
    got = run_swarm(None)
    assert got["skipped"] == []
    assert got["chunks"][0][0] == BUDGET and max(got["latency"].values()) >= 30


def test_several_long_prefills_neither_starve_decodes_nor_admission():
    """Two huge prompts, each capped at half the budget, would together take every token of a
    step: decodes go first anyway, and while a request waits the long prefills share one chunk,
    so arrivals still start at once; the older prompt advances by a chunk every step and the
    younger one whenever nobody waits, then at full chunks after the older one is done."""
    got = run_swarm(CHUNK, num_big=2)
    assert got["skipped"] == []
    assert len(got["latency"]) == 40 and max(got["latency"].values()) <= 1
    first, second = got["chunks"]
    assert first == [CHUNK] * (40 * BUDGET // CHUNK)
    assert sum(second) == 40 * BUDGET and 0 in second
    assert len(second) <= 2 * 40 * BUDGET // CHUNK  # bounded: no worse than one after the other


def test_alone_a_long_prompt_takes_the_whole_budget():
    sched = make(num_pages=128, budget=BUDGET, chunk=CHUNK, max_seqs=1)
    sched.add([seq(0, 300)])
    assert [step(sched) for _ in range(5)] == [[(0, 64)]] * 4 + [[(0, 44)]]
    # A waiting request that max_num_seqs keeps out gains nothing from a cap: still no cap.
    sched = make(num_pages=128, budget=BUDGET, chunk=CHUNK, max_seqs=1)
    sched.add([seq(0, 300), seq(1, 5, first_token=500)])
    assert [step(sched) for _ in range(5)] == [[(0, 64)]] * 4 + [[(0, 44)]]
    # Once another sequence competes, the chunk is capped.
    sched = make(num_pages=128, budget=BUDGET, chunk=CHUNK)
    sched.add([seq(0, 300)])
    assert step(sched) == [(0, 64)]
    sched.add([seq(1, 5, first_token=500)])
    assert step(sched) == [(0, 32), (1, 5)]
    assert step(sched) == [(1, 1), (0, 32)]  # and the decode goes first


def test_decodes_are_served_before_older_prefills():
    """Two long prefills capped at half the budget fill a step between them; the decodes of
    sequences admitted after them (newer, so served last if oldest first) still go first."""
    sched = make(num_pages=512, budget=40, chunk=20)
    old = [seq(0, 400), seq(1, 400, first_token=1000)]
    sched.add(old)
    assert step(sched) == [(0, 20), (1, 20)]
    sched.add([seq(2, 3, first_token=500), seq(3, 3, first_token=600)])
    assert step(sched) == [(0, 20), (2, 3), (3, 3)]  # the long prefills shared one chunk
    steps = 0
    while not old[0].output_token_ids:
        assert step(sched) == [(2, 1), (3, 1), (0, 20), (1, 18)]
        steps += 1
    assert steps == (400 - 40) // 20
    assert [len(s.output_token_ids) for s in sched.running[2:]] == [steps + 1, steps + 1]


def test_preemption_takes_the_newest_even_when_it_is_a_prefill_served_later():
    """Decodes are served before prefills, but when a decode misses a page the victim is still
    the newest running sequence: here a prefill that comes later in the service order."""
    sched = make(num_pages=9, budget=12, chunk=4)  # 36 token slots
    a = seq(0, 8)
    sched.add([a])
    assert step(sched) == [(0, 8)]  # 2 full pages
    b = seq(1, 24, first_token=500)
    sched.add([b])
    assert step(sched) == [(0, 1), (1, 4)]  # a: 3 pages; b: all 6 prompt pages at admission
    for _ in range(3):
        assert step(sched) == [(0, 1), (1, 4)]
    out = sched.schedule()  # a's 13th token needs a 4th page: the pool is empty
    assert out.preempted == [b] and [(s.seq_id, n) for s, n in out.scheduled] == [(0, 1)]
    assert b.status is SequenceStatus.WAITING and b.table is None and a.num_preemptions == 0


def admission_order(sched: Scheduler, count: int) -> list[str]:
    """Steps until ``count`` sequences were admitted, finishing the oldest running sequence
    after each step; returns request ids in admission order."""
    order: list[str] = []
    while len(order) < count:
        before = set(map(id, sched.running))
        step(sched)
        order += [s.request_id for s in sched.running if id(s) not in before]
        sched.finish(sched.running[0], FinishReason.STOP)
    return order


def test_session_fair_admission():
    sched = make(budget=1000, max_seqs=2, max_waiting=32)
    for i in range(10):
        sched.add([seq(i, 5, first_token=100 * i, session="A", request_id=f"A{i}")])
    sched.add([seq(10, 5, first_token=2000, session="B", request_id="B0")])
    # B has nothing running: it overtakes A's queue as soon as A has a sequence running.
    assert admission_order(sched, 11) == ["A0", "B0"] + [f"A{i}" for i in range(1, 10)]


def test_without_sessions_admission_stays_fcfs():
    sched = make(budget=1000, max_seqs=2, max_waiting=32)
    sched.add([seq(i, 5, first_token=100 * i) for i in range(11)])
    assert admission_order(sched, 11) == [f"r{i}" for i in range(11)]
    # Mixed: a session-less request is a session of its own, with nothing else running.
    sched = make(budget=1000, max_seqs=3, max_waiting=32)
    for i in range(4):
        sched.add([seq(i, 5, first_token=100 * i, session="A", request_id=f"A{i}")])
    sched.add([seq(4, 5, first_token=900), seq(5, 5, first_token=990, session="B")])
    assert admission_order(sched, 6) == ["A0", "r4", "r5", "A1", "A2", "A3"]


def test_fairness_keeps_priority_and_a_requests_completions_together():
    sched = make(budget=1000, max_seqs=4, max_waiting=32)
    sched.add([seq(0, 5, session="A", request_id="A0")])
    step(sched)  # A has one sequence running
    # A1 (n=3: one request) arrives before B0; C0 has a better priority than both.
    sched.add([seq(i, 5, first_token=50, session="A", request_id="A1") for i in (1, 2, 3)])
    sched.add([seq(4, 5, first_token=80, session="B", request_id="B0")])
    sched.add([seq(5, 5, first_token=90, session="C", request_id="C0", priority=-1)])
    assert [i for i, _ in step(sched)] == [0, 5, 4, 1]  # C by priority, B (A is busy), A1
    sched.add([seq(6, 5, first_token=120, session="E", request_id="E0")])
    sched.finish(sched.running[0], FinishReason.STOP)  # A0
    # A1's running completion does not count against its siblings: they keep their turn.
    assert [i for i, _ in step(sched)] == [5, 4, 1, 2]


def test_fair_choice_is_still_head_of_line_on_pages():
    sched = make(num_pages=8, budget=1000, max_seqs=8)
    sched.add([seq(0, 12, session="A", request_id="A0")])
    step(sched)  # 3 pages + 1 to grow; 4 left
    sched.add([seq(1, 4, first_token=100, session="A", request_id="A1")])
    sched.add([seq(2, 20, first_token=200, session="B", request_id="B0")])
    # B0 is chosen (A is busy) but needs 5 pages: nobody is admitted, A1 does not jump it.
    assert step(sched) == [(0, 1)]
    assert [s.request_id for s in sched.waiting] == ["A1", "B0"]


def test_preempted_sequences_resume_before_fairer_fresh_ones():
    sched = make(num_pages=7, budget=1000)  # 28 token slots
    a0 = seq(0, 8, session="A", request_id="A0")
    c0 = seq(1, 4, first_token=100, session="C", request_id="C0")
    a1 = seq(2, 8, first_token=200, session="A", request_id="A1")
    sched.add([a0, c0, a1])
    step(sched)  # 2 + 1 + 2 pages
    while a1.status is SequenceStatus.RUNNING:
        step(sched)
    assert a1.num_preemptions == 1 and a0.status is SequenceStatus.RUNNING
    sched.add([seq(3, 4, first_token=300, session="B", request_id="B0")])
    assert sched.waiting[0] is a1  # a preempted sequence goes back to the front
    sched.finish(c0, FinishReason.STOP)
    # A already runs a0, B runs nothing, yet the preempted A1 resumes first.
    assert next(i for i, _ in step(sched) if i != 0) == 2
