"""The host tier of the prefix cache (issue 17): with a device pool far smaller than the working
set, pages go to host memory and come back on a hit; greedy outputs never change."""

from __future__ import annotations

import time

import pytest
import torch

from kimi_grpc.checkpoint_maker import demo_checkpoint
from kimi_grpc.config import load_model_config
from kimi_grpc.engine.block_manager import BlockManager
from kimi_grpc.engine.host_cache import HostEntry, HostPageIndex
from kimi_grpc.engine.llm import LLM
from kimi_grpc.model.kv_cache import LatentKVCache
from kimi_grpc.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("scheduling_mode")

PAGE = 16
GREEDY = SamplingParams(temperature=0, max_tokens=12)


def make_llm(device_pages: int, host_pages: int) -> LLM:
    """The demo model (float32) with pools of exactly these many 16-token pages."""
    config = load_model_config(demo_checkpoint())
    per_page = PAGE * LatentKVCache.bytes_per_token(config, torch.float32)
    return LLM(
        page_size=PAGE,
        dtype="float32",
        kv_cache_memory=device_pages * per_page,
        host_kv_cache_memory=host_pages * per_page,
        max_model_len=256,
    )


def agent_prompts(round_: int) -> list[list[int]]:
    """Eight 'sub-agents': a shared 40-token system prefix, a private history that grows each
    round (the previous round's prompt plus new tokens), mixed lengths."""
    system = list(range(100, 140))
    return [system + [200 + 7 * a + t for t in range(24 + 9 * a + 16 * round_)] for a in range(8)]


@pytest.fixture(scope="module")
def reference() -> list[list[list[int]]]:
    """Every round's outputs with a pool that holds everything (no eviction at all)."""
    with make_llm(device_pages=400, host_pages=0) as llm:
        return [
            [o.outputs[0].token_ids for o in llm.generate(agent_prompts(r), GREEDY)]
            for r in range(3)
        ]


@pytest.mark.parametrize("host_pages", [0, 256], ids=["tier-off", "tier-on"])
def test_outputs_equal_with_every_page_through_host(reference, host_pages: int) -> None:
    """A 24-page device pool (the rounds need ~70 pages of context, so sequences also preempt
    each other): tokens equal the roomy pool's, with the tier on or off; with it on, later rounds
    are served from host pages, saved and loaded, and recompute less."""
    with make_llm(device_pages=24, host_pages=host_pages) as llm:
        outputs = [
            [o.outputs[0].token_ids for o in llm.generate(agent_prompts(r), GREEDY)]
            for r in range(3)
        ]
        stats = llm.engine.blocks.tier_stats
        assert outputs == reference
        assert llm.engine.scheduler.num_preemptions > 0
        assert llm.engine.blocks.num_used_pages == 0  # nothing leaked
        if host_pages:
            # Loads: the host hits, plus pages matched partway on host (partial hits).
            assert stats.saved_pages > 0 and stats.loaded_pages >= stats.host_hit_pages > 0
            assert llm.engine.host_pool.bytes_loaded > 0
        else:
            assert stats.host_hit_pages == stats.saved_pages == 0


def test_the_tier_cuts_recompute() -> None:
    """The same workload: prompt tokens computed (not served from any cache) in rounds 2 and 3
    drop with the tier on."""

    def computed(host_pages: int) -> int:
        with make_llm(device_pages=24, host_pages=host_pages) as llm:
            total = 0
            for r in range(3):
                results = llm.generate(agent_prompts(r), GREEDY)
                if r:
                    total += sum(len(o.prompt_token_ids) - o.num_cached_tokens for o in results)
            return total

    off, on = computed(0), computed(256)
    assert on * 2 < off, (on, off)


def test_aborts_mid_prefill_leave_no_pages_and_later_hits_stay_exact(reference) -> None:
    with make_llm(device_pages=24, host_pages=256) as llm:
        engine = llm.engine
        prompts = agent_prompts(1)
        for i, prompt in enumerate(prompts):
            engine.add_request(f"a{i}", prompt, GREEDY)
        engine.step()
        engine.step()
        for i in range(0, len(prompts), 2):
            engine.abort_request(f"a{i}")
        while engine.has_unfinished_requests():
            engine.step()
        assert engine.blocks.num_used_pages == 0
        again = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
        assert again == reference[1]


def test_host_index_verifies_parent_and_tokens_and_evicts_lru() -> None:
    index = HostPageIndex(2)
    a = index.store(HostEntry(b"a", b"", b"ta"))
    b = index.store(HostEntry(b"b", b"a", b"tb"))
    assert (a, b) == (0, 1)
    assert index.lookup(b"b", b"a", b"tb") == b
    assert index.lookup(b"b", b"x", b"tb") is None  # another parent: a collision, not a hit
    assert index.lookup(b"b", b"a", b"other") is None
    assert index.store(HostEntry(b"a", b"", b"ta")) is None  # already there
    index.pin(b)
    assert index.store(HostEntry(b"c", b"b", b"tc")) == a  # LRU among unpinned: "a"
    assert b"a" not in index and b"c" in index
    index.pin(a)
    assert index.store(HostEntry(b"d", b"", b"td")) is None  # every page pinned: dropped
    index.unpin(a)
    assert index.store(HostEntry(b"d", b"", b"td")) == a  # "c", the unpinned one, goes
    index.unpin(b)


def test_block_manager_demotes_on_eviction_and_promotes_on_a_host_hit() -> None:
    blocks = BlockManager(4, 2, host=HostPageIndex(8))
    prompt = [1, 2, 3, 4, 5, 6, 7]
    table = blocks.allocate(prompt, len(prompt))
    blocks.commit(table, prompt, 7)  # pages 0-2 full and registered
    blocks.free(table)
    other = blocks.allocate([9] * 7, 7)  # takes all four pages: three registered ones saved
    moves = blocks.drain_transfers()
    assert len(moves.saves) == 3 and not moves.loads
    blocks.transfers_done(moves)
    blocks.free(other)
    again = blocks.allocate(prompt, len(prompt))
    moves = blocks.drain_transfers()
    assert again.num_cached_tokens == 6 and len(moves.loads) == 3
    assert [d for _, d in moves.loads] == again.pages[:3]
    assert blocks.tier_stats.host_hit_pages == 3


def test_step_codec_carries_the_host_tier_moves() -> None:
    from kimi_grpc.parallel.step_codec import Op, StepMessage, decode, decode_header, encode

    message = StepMessage(
        Op.STEP,
        7,
        token_ids=[[1, 2], [3]],
        context_lens=[2, 5],
        block_tables=[[0], [1, 2]],
        page_size=4,
        media_rows=[1],
        kv_saves=[(5, 0), (6, 1)],
        kv_loads=[(0, 3)],
    )
    header, payload = encode(message)
    assert decode(decode_header(header), payload) == message


def test_tensor_parallel_host_tier_equals_one_process(reference) -> None:
    """TP=2 (gloo): rank 0 decides the moves, the step message carries them, every rank copies
    its own pages; tokens equal the single-process reference."""
    config = load_model_config(demo_checkpoint())
    per_page = PAGE * LatentKVCache.bytes_per_token(config, torch.float32)
    with LLM(
        page_size=PAGE,
        dtype="float32",
        kv_cache_memory=24 * per_page,
        host_kv_cache_memory=256 * per_page,
        max_model_len=256,
        tensor_parallel_size=2,
    ) as llm:
        outputs = [
            [o.outputs[0].token_ids for o in llm.generate(agent_prompts(r), GREEDY)]
            for r in range(3)
        ]
        assert llm.engine.blocks.tier_stats.host_hit_pages > 0
    assert outputs == reference


def test_host_index_retention_protects_then_yields_and_releases() -> None:
    index = HostPageIndex(2)
    index.retain([b"a"], time.monotonic() + 60)  # before it arrives: protected when it does
    a = index.store(HostEntry(b"a", b"", b"ta"))
    b = index.store(HostEntry(b"b", b"", b"tb"))
    assert index.num_retained == 1
    assert index.store(HostEntry(b"c", b"", b"tc")) == b  # "a" is older, but retained
    index.retain([b"c"], time.monotonic() + 30)
    # Everything retained: the retention that ends first yields ("c", 30 s), never blocking.
    assert index.store(HostEntry(b"d", b"", b"td")) == b
    index.release([b"a"])
    assert index.store(HostEntry(b"e", b"", b"te")) == a  # released: evictable again
    index.retain([b"e"], time.monotonic() - 1)  # a deadline in the past retains nothing
    assert index.num_retained == 0


def test_a_retained_session_resumes_from_host_not_recompute() -> None:
    """Session A ends a step in tool calls (retain_session); other traffic then churns through a
    host pool smaller than itself. A's next step loads its pages from host; without retention
    the churn evicted them and A recomputes. Tokens are the same either way."""

    def resume(retain: bool) -> tuple[int, list[int]]:
        with make_llm(device_pages=16, host_pages=24) as llm:
            engine = llm.engine
            history = list(range(300, 380))  # 5 pages
            engine.add_request("a1", history, GREEDY, session_id="A")
            while engine.has_unfinished_requests():
                engine.step()
            if retain:
                assert engine.retain_session("A") == 5
            others = [[600 + 97 * i + t for t in range(70)] for i in range(12)]
            llm.generate(others, GREEDY)  # 12 x 4 pages through a 24-page host pool
            hits = engine.blocks.tier_stats.host_hit_pages
            out = llm.generate([history + list(range(500, 540))], GREEDY)
            return engine.blocks.tier_stats.host_hit_pages - hits, out[0].outputs[0].token_ids

    retained_hits, retained_tokens = resume(True)
    plain_hits, plain_tokens = resume(False)
    assert retained_hits >= 4 and plain_hits == 0
    assert retained_tokens == plain_tokens


def test_a_step_that_fails_mid_move_leaves_nothing_stale(reference, monkeypatch) -> None:
    """A save that raises (an out-of-memory error, an interrupt) fails that generate; the moves
    queued with it are dropped from both tiers, so the next generate still equals the reference
    and no host page stays pinned."""
    from kimi_grpc.model.kv_cache import HostKVPool

    with make_llm(device_pages=24, host_pages=256) as llm:
        assert llm.engine.stats().host_pages_total == 256  # reported while still empty
        llm.generate(agent_prompts(0), GREEDY)
        real_save, calls = HostKVPool.save, []

        def failing_save(self, pools, moves):
            if moves and not calls:
                calls.append(len(moves))
                raise MemoryError("injected")
            return real_save(self, pools, moves)

        monkeypatch.setattr(HostKVPool, "save", failing_save)
        with pytest.raises(MemoryError):
            llm.generate(agent_prompts(1), GREEDY)
        assert calls
        host = llm.engine.blocks.host
        assert not any(host._pins)  # nothing left pinned
        again = [
            [o.outputs[0].token_ids for o in llm.generate(agent_prompts(r), GREEDY)]
            for r in range(3)
        ]
        assert again == reference
        assert llm.engine.blocks.num_used_pages == 0
