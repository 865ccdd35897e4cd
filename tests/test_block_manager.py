"""The KV page allocator: reference counts, all-or-nothing allocation, the hash-chained prefix
cache (hits, the one-token cap, LRU eviction, collisions) and its statistics."""

from __future__ import annotations

import random

import pytest

from kimi_grpc.engine.block_manager import BlockManager, PageTable

PS = 4  # small pages keep the token lists readable


def stats(bm: BlockManager) -> tuple[int, int, int]:
    return bm.num_used_pages, bm.num_cached_pages, bm.num_free_pages


def prefill(bm: BlockManager, tokens: list[int]) -> PageTable:
    """Admit a sequence and compute its whole prompt, as the scheduler would."""
    table = bm.allocate(tokens, len(tokens))
    assert table is not None
    bm.commit(table, tokens, len(tokens))
    return table


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def test_allocate_then_free_restores_the_pool() -> None:
    bm = BlockManager(16, PS)
    assert stats(bm) == (0, 0, 16)
    table = bm.allocate(toks(0, 10), 10)
    assert table is not None
    assert len(table.pages) == 3 and len(set(table.pages)) == 3
    assert table.num_cached_tokens == 0 and table.hashes == []
    assert stats(bm) == (3, 0, 13)
    bm.commit(table, toks(0, 10), 10)  # two full pages registered, the third is partial
    assert len(table.hashes) == 2
    assert stats(bm) == (3, 2, 13)
    bm.free(table)
    assert stats(bm) == (0, 2, 16)  # cached but unreferenced pages count as free
    assert table.pages == [] and table.hashes == []


def test_sharing_a_prefix_counts_references() -> None:
    bm = BlockManager(16, PS)
    prefix = toks(100, 3 * PS)
    a_tokens = [*prefix, 1, 2]
    a = prefill(bm, a_tokens)
    assert len(a.pages) == 4 and a.num_cached_tokens == 0
    assert stats(bm) == (4, 3, 12)

    b_tokens = [*prefix, 7, 8, 9, 10, 11]
    assert bm.pages_needed(b_tokens, len(b_tokens)) == 2  # the 3 shared pages are in use already
    b = bm.allocate(b_tokens, len(b_tokens))
    assert b is not None
    assert b.pages[:3] == a.pages[:3] and b.num_cached_tokens == 3 * PS
    assert len(b.pages) == 5 and not set(b.pages[3:]) & set(a.pages)
    assert b.hashes == a.hashes[:3]
    assert stats(bm) == (6, 3, 10)

    b_pages = list(b.pages)
    bm.free(a)
    assert stats(bm) == (5, 3, 11)  # only A's own page went back
    assert b.pages == b_pages
    # The whole free pool can be handed out without touching one of B's pages.
    rest = bm.allocate(toks(1000, bm.num_free_pages * PS), bm.num_free_pages * PS)
    assert rest is not None and not set(rest.pages) & set(b_pages)
    assert bm.num_free_pages == 0
    assert bm.allocate(toks(5000, 1), 1) is None
    bm.free(rest)
    bm.free(b)
    assert stats(bm)[0] == 0 and bm.num_free_pages == 16


def test_at_least_one_token_is_left_to_compute() -> None:
    bm = BlockManager(16, PS)
    prompt = toks(0, 3 * PS)  # exactly k = 3 full pages
    a = prefill(bm, prompt)
    assert bm.num_cached_pages == 3
    b = bm.allocate(prompt, len(prompt))
    assert b is not None
    assert b.num_cached_tokens == 2 * PS and b.pages[:2] == a.pages[:2]
    assert len(b.pages) == 3 and b.pages[2] != a.pages[2]
    c = bm.allocate([*prompt, 99], len(prompt) + 1)  # one more token: all 3 pages hit
    assert c is not None and c.num_cached_tokens == 3 * PS and c.pages[:3] == a.pages
    # Asking for fewer tokens than are cached still leaves room for the one to compute.
    d = bm.allocate([*prompt, 99], 1)
    assert d is not None and d.num_cached_tokens == 3 * PS and len(d.pages) == 4
    assert bm.allocate([7], 1) is not None  # a one-token prompt never hits, never fails here


@pytest.mark.parametrize("a_alive", [True, False])
def test_pages_needed_matches_what_allocate_takes(a_alive: bool) -> None:
    bm = BlockManager(32, PS)
    assert bm.pages_needed(toks(0, 9), 9) == 3
    a = prefill(bm, toks(0, 4 * PS + 1))  # 4 cached pages
    if not a_alive:
        bm.free(a)  # its cached pages now sit in the free pool with ref 0
    prompt = [*toks(0, 3 * PS), 500, 501]  # hits 3 pages
    need = bm.pages_needed(prompt, 30)
    assert need == (5 if a_alive else 8)  # 8 pages for 30 tokens; hits on ref-0 pages count
    assert bm.pages_needed(prompt, 30) == need  # no side effects
    before = bm.num_free_pages
    table = bm.allocate(prompt, 30)
    assert table is not None and table.num_cached_tokens == 3 * PS and len(table.pages) == 8
    assert before - bm.num_free_pages == need
    # Fresh allocations after the hit never hand out a page the table holds.
    other = bm.allocate(toks(900, bm.num_free_pages * PS), bm.num_free_pages * PS)
    assert other is not None and not set(other.pages) & set(table.pages)


def test_failed_allocation_changes_nothing() -> None:
    bm = BlockManager(6, PS)
    a = prefill(bm, toks(0, 3 * PS))
    bm.free(a)
    hog = bm.allocate(toks(50, 2), 2)  # takes a never-used page; 3 cached pages stay free
    assert hog is not None
    before = stats(bm)
    assert before == (1, 3, 5)
    prompt = [*toks(0, 3 * PS), 1]  # 3 hits on ref-0 pages + 3 fresh = 6 > 5 free
    assert bm.pages_needed(prompt, 6 * PS) == 6
    assert bm.allocate(prompt, 6 * PS) is None
    assert stats(bm) == before
    assert not bm.extend(hog, 7 * PS) and len(hog.pages) == 1
    assert stats(bm) == before
    # The cached pages survived the failed attempt: a fitting request still hits all three.
    table = bm.allocate(prompt, len(prompt))
    assert table is not None and table.num_cached_tokens == 3 * PS
    assert stats(bm) == (5, 3, 1)


def test_extend() -> None:
    bm = BlockManager(8, PS)
    table = bm.allocate([1, 2], 2)
    assert table is not None and len(table.pages) == 1
    assert bm.extend(table, 9) and len(table.pages) == 3
    assert bm.extend(table, 5) and len(table.pages) == 3  # never shrinks
    assert bm.extend(table, 12) and len(table.pages) == 3  # still fits
    assert not bm.extend(table, 9 * PS) and len(table.pages) == 3
    assert bm.extend(table, 8 * PS) and len(table.pages) == 8 and len(set(table.pages)) == 8
    assert stats(bm) == (8, 0, 0)
    with pytest.raises(ValueError):
        bm.extend(table, -1)


def test_generated_tokens_become_reusable() -> None:
    bm = BlockManager(32, PS)
    tokens = toks(0, 6)
    table = bm.allocate(tokens, len(tokens))
    assert table is not None
    bm.commit(table, tokens, len(tokens))
    assert bm.num_cached_pages == 1
    for step in range(9):  # decode: feed one generated token per step
        tokens.append(1000 + step)
        assert bm.extend(table, len(tokens))
        bm.commit(table, tokens, len(tokens))
    assert len(tokens) == 15 and len(table.hashes) == 3 and bm.num_cached_pages == 3
    bm.free(table)
    # The agent's next turn: previous prompt + assistant output + new user tokens.
    turn = [*tokens, 7, 7, 7]
    nxt = bm.allocate(turn, len(turn))
    assert nxt is not None and nxt.num_cached_tokens == 3 * PS  # beyond the 6 prompt tokens
    # A different continuation of the same prompt shares only the prompt's full page.
    fork = [*tokens[:6], 1, 2, 3, 4, 5, 6, 7]
    other = bm.allocate(fork, len(fork))
    assert other is not None and other.num_cached_tokens == PS


def test_commit_rejects_uncomputable_counts() -> None:
    bm = BlockManager(8, PS)
    table = bm.allocate(toks(0, 5), 5)
    assert table is not None
    with pytest.raises(ValueError):
        bm.commit(table, toks(0, 5), 6)  # more than the known tokens
    with pytest.raises(ValueError):
        bm.commit(table, toks(0, 12), 9)  # more than the table holds
    with pytest.raises(ValueError):
        bm.commit(table, toks(0, 5), -1)
    with pytest.raises(ValueError):
        bm.allocate([1], -1)
    with pytest.raises(ValueError):
        BlockManager(0, PS)
    with pytest.raises(ValueError):
        BlockManager(4, 0)


def test_lru_evicts_older_sequences_and_tails_first() -> None:
    bm = BlockManager(8, PS)
    a = prefill(bm, toks(0, 3 * PS))
    b = prefill(bm, toks(100, 3 * PS))
    a_pages, b_pages = list(a.pages), list(b.pages)
    bm.free(a)
    bm.free(b)
    assert stats(bm) == (0, 6, 8)
    taken = []
    for i in range(8):  # one fresh page at a time, distinct content so nothing hits
        t = bm.allocate([10_000 + i], 1)
        assert t is not None
        taken.append(t.pages[0])
        if i == 4:  # never-used pages, then A's three pages, tail first
            assert bm.num_cached_pages == 3
            a_again = [*toks(0, 3 * PS), 1]
            b_again = [*toks(100, 3 * PS), 1]
            assert bm.pages_needed(a_again, len(a_again)) == 4  # A is gone
            assert bm.pages_needed(b_again, len(b_again)) == 4  # B's 3 hits + 1 fresh
    never_used = [p for p in range(8) if p not in a_pages + b_pages]
    assert taken == never_used + a_pages[::-1] + b_pages[::-1]
    assert stats(bm) == (8, 0, 0)


def test_uncached_pages_are_reused_before_cached_ones() -> None:
    bm = BlockManager(6, PS)
    a = prefill(bm, toks(0, 2 * PS + 1))  # 2 cached pages + a partial one each
    b = prefill(bm, toks(100, 2 * PS + 1))
    partials = {a.pages[2], b.pages[2]}
    bm.free(a)
    bm.free(b)
    assert stats(bm) == (0, 4, 6)
    t = bm.allocate([999], 2 * PS)  # the worthless partial pages go first, even B's
    assert t is not None and set(t.pages) == partials
    assert bm.num_cached_pages == 4


def test_a_collision_on_the_parent_does_not_leak_its_children(monkeypatch) -> None:
    # The hash ignores the parent and collides on parity: [1,0,0,0] and [0,1,0,0] share a hash.
    monkeypatch.setattr(BlockManager, "_hash", lambda self, p, t: bytes([sum(t) % 2]) * 16)
    bm = BlockManager(16, PS)
    a = prefill(bm, [1, 0, 0, 0, 9])
    prefill(bm, [0, 1, 0, 0, 0, 0, 0, 0, 9])  # its page 1 follows content A never had
    c = bm.allocate([1, 0, 0, 0, 0, 0, 0, 0, 9], 9)
    assert c is not None and c.num_cached_tokens == PS and c.pages[0] == a.pages[0]


@pytest.mark.parametrize("hash_kind", ["constant", "tokens_only"])
def test_forced_collisions_never_hit_other_content(monkeypatch, hash_kind: str) -> None:
    if hash_kind == "constant":
        monkeypatch.setattr(BlockManager, "_hash", lambda self, parent, tokens: b"\0" * 16)
    else:  # ignores the parent: only the stored chain tells prefixes apart
        monkeypatch.setattr(
            BlockManager, "_hash", lambda self, parent, tokens: repr(tokens).encode()
        )
    bm = BlockManager(32, PS)
    x = [5, 6, 7, 8]
    a = prefill(bm, [1, 2, 3, 4, *x, 9])
    b = bm.allocate([9, 9, 9, 9, *x, 9], 9)  # same page tokens as A's second page, other prefix
    assert b is not None and b.num_cached_tokens == 0
    c = bm.allocate([1, 2, 3, 4, 0, 0, 0, 0, 9], 9)  # same first page, different second
    assert c is not None and c.num_cached_tokens == PS and c.pages[0] == a.pages[0]
    d = bm.allocate([1, 2, 3, 4, *x, 9], 9)
    assert d is not None
    expected = PS if hash_kind == "constant" else 2 * PS  # a constant hash holds one entry
    assert (
        d.num_cached_tokens == expected and d.pages[: expected // PS] == a.pages[: expected // PS]
    )


def test_different_prefix_same_page_tokens_is_a_miss() -> None:
    bm = BlockManager(16, PS)
    x = toks(40, PS)
    prefill(bm, [*toks(0, PS), *x, 1])
    b = bm.allocate([*toks(20, PS), *x, 1], 2 * PS + 1)
    assert b is not None and b.num_cached_tokens == 0


def test_disabled_caching_never_hits() -> None:
    bm = BlockManager(16, PS, enable_prefix_caching=False)
    prompt = toks(0, 3 * PS + 1)
    a = prefill(bm, prompt)
    assert len(a.hashes) == 3  # hashes are still recorded
    assert bm.num_cached_pages == 0
    b = bm.allocate(prompt, len(prompt))
    assert b is not None and b.num_cached_tokens == 0 and not set(a.pages) & set(b.pages)
    assert bm.pages_needed(prompt, len(prompt)) == 4
    bm.free(a)
    bm.free(b)
    assert stats(bm) == (0, 0, 16)


def test_swarm_computes_the_shared_prefix_once() -> None:
    page_size, prefix_pages, n = 64, 20, 300
    bm = BlockManager(400, page_size)
    system = toks(0, prefix_pages * page_size)
    tables, cached = [], []
    for i in range(n):
        prompt = [*system, 100_000 + i, 7, 7]  # a unique task after the system prompt
        table = bm.allocate(prompt, len(prompt) + 16)
        assert table is not None
        cached.append(table.num_cached_tokens)
        bm.commit(table, prompt, len(prompt))
        tables.append(table)
    assert cached[0] == 0
    assert cached[1:] == [prefix_pages * page_size] * (n - 1)
    shared = tables[0].pages[:prefix_pages]
    assert all(t.pages[:prefix_pages] == shared for t in tables)
    # The prefix is held once: 20 shared pages + one own page per sequence.
    assert stats(bm) == (prefix_pages + n, prefix_pages, 400 - prefix_pages - n)
    for t in tables:
        bm.free(t)
    assert stats(bm) == (0, prefix_pages, 400)


def test_double_free_is_harmless() -> None:
    bm = BlockManager(8, PS)
    a = prefill(bm, toks(0, 2 * PS))
    b = bm.allocate([*toks(0, 2 * PS), 1], 2 * PS + 1)  # shares both of A's pages
    assert b is not None and b.num_cached_tokens == 2 * PS
    bm.free(a)
    bm.free(a)
    assert stats(bm) == (3, 2, 5)  # B still holds its pages
    bm.free(b)
    bm.free(b)
    assert stats(bm) == (0, 2, 8)


def test_reset_prefix_cache_keeps_referenced_entries() -> None:
    bm = BlockManager(16, PS)
    a = prefill(bm, toks(0, 2 * PS))
    b = prefill(bm, toks(100, 2 * PS))
    bm.free(a)
    bm.reset_prefix_cache()
    assert stats(bm) == (2, 2, 14)
    miss = bm.allocate([*toks(0, 2 * PS), 1], 9)
    hit = bm.allocate([*toks(100, 2 * PS), 1], 9)
    assert miss is not None and miss.num_cached_tokens == 0
    assert hit is not None and hit.num_cached_tokens == 2 * PS and hit.pages[:2] == b.pages


def test_chain_recovers_after_its_parent_is_evicted() -> None:
    bm = BlockManager(6, PS)
    prompt = toks(0, 2 * PS + 1)
    a = bm.allocate(prompt, len(prompt))
    d = bm.allocate(prompt, len(prompt))  # admitted together: both compute the same prompt
    assert a is not None and d is not None
    a_pages = list(a.pages)
    bm.commit(a, prompt, PS)  # chunked prefill: A has computed its first page only
    bm.commit(d, prompt, len(prompt))  # D's page 0 equals A's; D's page 1 chains to A's page 0
    bm.commit(a, prompt, len(prompt))  # A's page 1 equals D's
    assert bm.num_cached_pages == 2 and bm.num_free_pages == 0
    bm.free(a)  # A's uncached pages go to the head, its cached first page to the tail
    filler = bm.allocate([999], 3 * PS)  # evicts A's first page: D's page 1 is orphaned
    assert filler is not None and sorted(filler.pages) == sorted(a_pages)
    assert bm.num_cached_pages == 1
    assert bm.pages_needed([*prompt, 1], len(prompt) + 1) == 3  # the orphan never hits
    bm.free(filler)
    bm.free(d)
    e = prefill(bm, prompt)
    assert e.num_cached_tokens == 0  # nothing to chain from: the first page was evicted
    f = bm.allocate(prompt, len(prompt))
    assert f is not None and f.num_cached_tokens == 2 * PS and f.pages[:2] == e.pages[:2]


@pytest.mark.parametrize("hash_kind", ["real", "two_values", "constant"])
def test_random_workload_hits_only_identical_prefixes(monkeypatch, hash_kind: str) -> None:
    """Ground truth: each committed page's full prefix. Every hit must reproduce it exactly."""
    if hash_kind == "two_values":
        monkeypatch.setattr(BlockManager, "_hash", lambda self, p, t: bytes([sum(t) % 2]) * 16)
    elif hash_kind == "constant":
        monkeypatch.setattr(BlockManager, "_hash", lambda self, p, t: b"c" * 16)
    rng = random.Random(0)
    bm = BlockManager(40, 2)
    content: dict[int, tuple[int, ...]] = {}  # page -> the tokens up to its end
    live: list[tuple[PageTable, list[int]]] = []
    hits = 0
    for _ in range(3000):
        if live and (rng.random() < 0.35 or bm.num_free_pages < 8):
            table, _ = live.pop(rng.randrange(len(live)))
            bm.free(table)
            continue
        prompt = [rng.randrange(2) for _ in range(rng.randrange(1, 12))]
        table = bm.allocate(prompt, len(prompt))
        if table is None:
            continue
        k = table.num_cached_tokens // 2
        hits += k
        assert len(set(table.pages)) == len(table.pages)
        for i, page in enumerate(table.pages[:k]):
            assert content[page] == tuple(prompt[: (i + 1) * 2])
        for page in table.pages[k:]:
            content.pop(page, None)  # fresh: whatever it held is overwritten
        bm.commit(table, prompt, len(prompt))
        for i, page in enumerate(table.pages[: len(prompt) // 2]):
            content.setdefault(page, tuple(prompt[: (i + 1) * 2]))
        live.append((table, prompt))
        used = {p for t, _ in live for p in t.pages}
        assert bm.num_used_pages == len(used)
    assert hits > 100  # the workload does exercise the cache


def test_a_partial_tail_is_taken_over_by_its_continuation() -> None:
    bm = BlockManager(8, PS)
    first = toks(0, 10)  # two full pages + 2 computed tokens in the third
    table = prefill(bm, first)
    tail_page = table.pages[2]
    bm.free(table, first, 10)
    # The next agent step: the same text, then more. The whole tail is served (2 tokens).
    again = bm.allocate([*first, 50, 51], 12)
    assert again.pages[2] == tail_page and again.num_cached_tokens == 10
    assert bm.tier_stats.partial_hit_tokens == 2
    bm.commit(again, [*first, 50, 51], 12)
    bm.free(again, [*first, 50, 51], 12)  # page 2 is full now: registered, no tail
    assert bm.num_cached_pages == 3
    # A continuation that diverges inside the tail takes the common prefix only.
    other = prefill(bm, toks(100, 7))  # tail: 3 tokens after one full page
    bm.free(other, toks(100, 7), 7)
    diverged = bm.allocate([*toks(100, 5), 9, 9, 9], 8)
    assert diverged.num_cached_tokens == 5
    bm.free(diverged, [*toks(100, 5), 9, 9, 9], 6)  # computed 5 + the first 9: a new tail
    # At least one token is always left to compute: the same 6 tokens reuse 5 of them.
    assert bm.allocate([*toks(100, 5), 9], 6).num_cached_tokens == 5


def test_tails_need_their_parent_and_go_before_cached_pages() -> None:
    bm = BlockManager(4, PS)
    a = prefill(bm, toks(0, 6))  # page 0 full, page 1 a tail of 2
    bm.free(a, toks(0, 6), 6)
    # Same tail tokens after a different first page: the parent differs, no hit.
    miss = bm.allocate([*toks(50, 4), 4, 5, 6], 7)
    assert miss.num_cached_tokens == 0 and bm.tier_stats.partial_hit_tokens == 0
    bm.free(miss)
    # Fresh pages take uncached pages first, then the tail, then the registered page 0.
    taken = bm.allocate(toks(200, 12), 12)
    assert bm.num_cached_pages == 1 and bm.allocate([*toks(0, 6), 7], 7) is None
    bm.free(taken)
    assert bm.allocate([*toks(0, 6), 7], 7).num_cached_tokens == 4  # page 0 hit, tail gone
    # Without the tokens (an abort), or without caching, nothing is kept.
    plain = BlockManager(4, PS, enable_prefix_caching=False)
    t = plain.allocate(toks(0, 6), 6)
    plain.commit(t, toks(0, 6), 6)
    plain.free(t, toks(0, 6), 6)
    assert plain.allocate([*toks(0, 6), 7], 7).num_cached_tokens == 0


@pytest.mark.parametrize(
    ("hash_kind", "host_pages"), [("real", 0), ("constant", 0), ("real", 24)]
)  # (host hits rest on the chain hash: a constant one is only safe on the device)
def test_random_workload_with_partial_hits_serves_only_written_kv(
    monkeypatch, hash_kind: str, host_pages: int
) -> None:
    """Ground truth per slot: the token prefix whose KV it holds (copied along with the host
    tier's saves and loads). Sequences are freed after computing a random part of their prompt
    (finished, preempted mid-prefill); every cached position a later allocation reports must
    hold exactly its prefix's KV."""
    from kimi_grpc.engine.host_cache import HostPageIndex

    if hash_kind == "constant":
        monkeypatch.setattr(BlockManager, "_hash", lambda self, p, t: b"c" * 16)
    rng = random.Random(1)
    ps = 3
    bm = BlockManager(40, ps, host=HostPageIndex(host_pages) if host_pages else None)
    written: dict[tuple[int, int], tuple[int, ...]] = {}  # (page, slot) -> prefix
    on_host: dict[tuple[int, int], tuple[int, ...] | None] = {}

    def copy_moves() -> None:  # what the engine does before the forward: saves, then loads
        moves = bm.drain_transfers()
        for device, host in moves.saves:
            for slot in range(ps):
                on_host[host, slot] = written.get((device, slot))
        for host, device in moves.loads:
            for slot in range(ps):
                written[device, slot] = on_host[host, slot]
        if moves:
            bm.transfers_done(moves)

    live: list[tuple[PageTable, list[int], int]] = []
    served = 0
    for _ in range(3000):
        if live and (rng.random() < 0.4 or bm.num_free_pages < 8):
            table, prompt, computed = live.pop(rng.randrange(len(live)))
            bm.free(table, prompt, computed)
            continue
        prompt = [rng.randrange(2) for _ in range(rng.randrange(1, 14))]
        table = bm.allocate(prompt, len(prompt))
        if table is None:
            continue
        copy_moves()
        cached = table.num_cached_tokens
        assert cached < len(prompt) and len(set(table.pages)) == len(table.pages)
        for p in range(cached):
            assert written[table.pages[p // ps], p % ps] == tuple(prompt[: p + 1])
        served += cached
        computed = rng.randrange(cached + 1, len(prompt) + 1)
        for p in range(cached, computed):
            written[table.pages[p // ps], p % ps] = tuple(prompt[: p + 1])
        bm.commit(table, prompt, computed)
        live.append((table, prompt, computed))
    assert served > 500 and bm.tier_stats.partial_hit_tokens > 50
    if host_pages:
        assert bm.tier_stats.host_hit_pages > 20
        assert bm.tier_stats.loaded_pages > bm.tier_stats.host_hit_pages  # partial host hits


def test_a_registered_page_matched_partway_is_taken_over_and_saved_to_host() -> None:
    """The agent-loop case: the previous step's last page is full (prompt end + generated tokens)
    and registered; the next prompt diverges inside it. The page is taken over for the shared
    tokens; with a host tier its full content is saved first, so a later exact hit still works."""
    from kimi_grpc.engine.host_cache import HostPageIndex

    bm = BlockManager(6, PS, host=HostPageIndex(4))
    table = prefill(bm, toks(0, 8))
    pages = list(table.pages)
    bm.free(table)
    assert bm.num_cached_pages == 2
    again = bm.allocate([0, 1, 2, 3, 4, 5, 99, 98], 8)
    assert again.num_cached_tokens == 6 and again.pages == pages
    assert bm.tier_stats.partial_hit_tokens == 2 and bm.num_cached_pages == 1
    assert [d for d, _ in bm.drain_transfers().saves] == [pages[1]]
    # A referenced page is never taken over: another prompt diverging inside the now
    # registered page 1 of `again` (still running) gets its 3 shared tokens copy-on-write: the
    # page is saved to host and loaded into a fresh, unregistered page.
    bm.commit(again, [0, 1, 2, 3, 4, 5, 99, 98], 8)
    other = bm.allocate([0, 1, 2, 3, 4, 5, 99, 7, 7], 9)
    assert other.num_cached_tokens == 7 and other.pages[1] not in again.pages
    moves = bm.drain_transfers()
    (save,) = moves.saves
    assert save[0] == again.pages[1] and moves.loads == [(save[1], other.pages[1])]
    assert bm.tier_stats.partial_hit_tokens == 5 and bm.num_cached_pages == 2
    # Its host copy now serves the next one without another save.
    third = bm.allocate([0, 1, 2, 3, 4, 5, 99, 98, 1], 9)  # a whole-page hit on `again`'s page
    assert third.num_cached_tokens == 8
    bm.free(other)
    fourth = bm.allocate([0, 1, 2, 3, 4, 5, 6, 1], 8)  # diverges inside: the oldest host copy
    assert fourth.num_cached_tokens == 7 and not bm.drain_transfers().saves


def test_a_page_that_others_continue_is_never_taken_over() -> None:
    """Another agent's history hangs off a shared page: diverging inside it must not orphan
    that history (only leaf pages and tails are taken over)."""
    bm = BlockManager(8, PS)
    history = toks(0, 12)  # three registered pages: 0-3, 4-7, 8-11
    bm.free(prefill(bm, history))
    diverging = bm.allocate([0, 1, 2, 3, 4, 5, 99, 98], 8)
    assert diverging.num_cached_tokens == 4  # page 4-7 has a child: recomputed, not taken
    bm.free(diverging)
    assert bm.allocate([*history, 50], 13).num_cached_tokens == 12  # the history still hits


def test_an_evicted_tail_is_found_on_host_after_host_hits() -> None:
    """A session's pages, tail included, go to host under pressure; its next step loads the
    whole page from host and the tail partway (two loads, 6 tokens served)."""
    from kimi_grpc.engine.host_cache import HostPageIndex

    bm = BlockManager(3, PS, host=HostPageIndex(8))
    session = prefill(bm, toks(0, 6))  # page 0-3 registered, tail 4-5
    bm.free(session, toks(0, 6), 6)
    bm.free(bm.allocate(toks(100, 12), 12))  # takes all three pages: both saved to host
    assert len(bm.drain_transfers().saves) == 2
    resumed = bm.allocate([*toks(0, 6), 50, 51], 8)
    assert resumed.num_cached_tokens == 6
    loads = bm.drain_transfers().loads
    assert [device for _, device in loads] == resumed.pages[:2]
    assert bm.tier_stats.host_hit_pages == 1 and bm.tier_stats.partial_hit_tokens == 2
    # The tail's host key is not a page's: a prompt of the tail's tokens padded to a whole page
    # never hits it as a full page.
    assert bm.num_cached_pages == 1
