"""The KV page allocator: reference-counted pages and a content-addressed prefix cache.

Pure CPU bookkeeping: it hands out page ids for the pools of ``LatentKVCache`` and never touches a
tensor. A sequence owns a block table (``PageTable.pages``); token ``t`` of the sequence lives in
page ``pages[t // page_size]`` at slot ``t % page_size``.

Invariants:

- A page is in the free queue exactly when its reference count is 0. Free pages may still hold a
  prefix-cache entry; they stay hit-able until a fresh allocation takes them from the queue head.
- Only full, computed pages are registered and shared. A shared page is never written again: hits
  stop at least one token short of the known tokens, so a sequence only ever writes its own last,
  non-full page (and the fresh pages after it).
- A hit needs the chain hash, the page's stored token ids and the page's parent to match, where the
  parent is the identity (page id, generation) of the previous page in the hit chain. So no hash
  collision can hand one request another's KV: the stored tokens and parents reproduce the prefix.
- A page's generation changes whenever it loses its cache entry, which orphans its descendants;
  orphaned entries never hit and are replaced when their hash is registered again.

Partial hits: when the whole-page hits stop at a page that no cached page matches entirely, a
page after the same parent that matches its first tokens serves them (the longest common prefix,
>= 1 token; KV at a position depends only on the tokens up to it). This is what an agent loop
needs: its next prompt re-renders the previous step's answer, so it diverges inside the page that
held the previous prompt's end and the generated tokens. An unreferenced *leaf* page (no
registered page continues it, so no other history is orphaned) is taken over: it becomes the new
sequence's own, which overwrites the slots after the common prefix; it loses its entry as on
eviction (saved to host first). So is a *tail*: a sequence freed with its last page partly
computed leaves that page unregistered but keyed by its parent's identity with its token ids;
tails are evicted before any registered page (freed last-page-first). With a host tier, evicted
pages and tails are found there by their parent's chain hash and loaded into a fresh,
unregistered page, and a registered page that cannot be taken over (in use, or continued by
others) is copied through host: saved, then loaded into a fresh page (copy-on-write).

With a host tier (``host``: ``engine.host_cache.HostPageIndex``), a registered page that a fresh
allocation takes is first *saved* to a host page, and a lookup that misses on the device continues
in the host index with the same chained hash; each host hit takes a fresh device page, registered
at once, which is *loaded* from host. The moves are queued here (``drain_transfers``) and the
engine copies them before the step's forward: saves first (a taken page may be a load's
destination), then loads.
"""

from __future__ import annotations

import hashlib
import secrets
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from kimi_grpc.engine.host_cache import HostEntry, HostPageIndex

_HASH_KEY = secrets.token_bytes(32)  # per process: hashes are unguessable and never persisted
_ROOT_HASH = b""
_Ident = tuple[int, int]  # (page id, generation): one page's content between two evictions
_ROOT: _Ident = (-1, 0)
_TAIL_MARK = b"tail"  # hashed after a tail's tokens: its host key differs from any page's


def _pack(token_ids: Sequence[int]) -> bytes:
    """Token ids as fixed-width 8-byte integers (one conversion per call, not per page)."""
    return array("q", token_ids).tobytes()


def _common_tokens(a: bytes, b: bytes) -> int:
    """How many leading tokens two packed token lists share (binary search on slices)."""
    lo, hi = 0, min(len(a), len(b)) // 8  # a[: 8 * lo] == b[: 8 * lo] holds
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[: 8 * mid] == b[: 8 * mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass
class PageTable:
    """One sequence's pages.

    ``hashes[i]`` is the chain hash of full, committed page ``i`` (``len(hashes) <= len(pages)``).
    ``num_cached_tokens`` is how many leading tokens ``allocate`` served from the prefix cache; it
    survives ``free`` (usage reporting), while ``pages`` and ``hashes`` are emptied.
    """

    pages: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)
    num_cached_tokens: int = 0


class _Entry(NamedTuple):
    hash: bytes
    parent: _Ident
    tokens: bytes  # the page's token ids, packed as by _pack
    parent_hash: bytes  # the chain hash of the previous page (what the host tier verifies)


@dataclass
class Transfers:
    """Copies the engine must make before the next forward, in this order."""

    saves: list[tuple[int, int]] = field(default_factory=list)  # (device page, host page)
    loads: list[tuple[int, int]] = field(default_factory=list)  # (host page, device page)

    def __bool__(self) -> bool:
        return bool(self.saves or self.loads)


@dataclass
class TierStats:
    """Prefix-cache pages served per tier, and pages moved between them (since start)."""

    device_hit_pages: int = 0
    host_hit_pages: int = 0
    partial_hit_tokens: int = 0  # tokens served from pages matched partway (partial hits)
    saved_pages: int = 0
    loaded_pages: int = 0


class BlockManager:
    """Page allocator with reference counts and an LRU prefix cache of full pages.

    With ``enable_prefix_caching=False`` nothing ever hits and nothing is registered; ``commit``
    still records ``PageTable.hashes``.
    """

    def __init__(
        self,
        num_pages: int,
        page_size: int = 64,
        *,
        enable_prefix_caching: bool = True,
        host: HostPageIndex | None = None,
    ) -> None:
        if num_pages < 1 or page_size < 1:
            raise ValueError(
                f"need num_pages >= 1 and page_size >= 1, got {num_pages}, {page_size}"
            )
        self.num_pages, self.page_size = num_pages, page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_pages
        self._gen = [0] * num_pages
        self._entry: list[_Entry | None] = [None] * num_pages
        # Committed pages that are not registered themselves: the registered page with the same
        # content (chain parent for the sequence's next page), or None when the chain is broken.
        self._alias: dict[int, _Ident | None] = {}
        self._cache: dict[bytes, int] = {}  # chain hash -> page
        # Head = next to be taken. Unregistered pages go to the head, registered ones to the tail.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_pages))
        # page -> (parent identity, parent chain hash, packed tokens)
        self._tail_of: dict[int, tuple[_Ident, bytes, bytes]] = {}
        self._tails: dict[_Ident, list[int]] = {}  # parent identity -> its tail pages
        self._children: dict[_Ident, set[int]] = {}  # parent identity -> registered pages
        self.host = host if enable_prefix_caching else None
        self._transfers = Transfers()
        self.tier_stats = TierStats()

    # -- stats ---------------------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        """Pages allocatable now: never used or unreferenced (cached ones are evictable)."""
        return len(self._free)

    @property
    def num_used_pages(self) -> int:
        """Pages with a reference count above 0."""
        return self.num_pages - len(self._free)

    @property
    def num_cached_pages(self) -> int:
        """Pages holding a prefix-cache entry, referenced or not."""
        return len(self._cache)

    # -- public API ----------------------------------------------------------------------------
    def pages_needed(self, token_ids: Sequence[int], num_tokens: int) -> int:
        """Pages ``allocate(token_ids, num_tokens)`` would take from the free pool (fresh pages
        plus hits on unreferenced cached pages). No side effects."""
        hits, _, _, total = self._plan(token_ids, num_tokens)
        return total - len(hits) + sum(1 for page, _ in hits if self._ref[page] == 0)

    def allocate(self, token_ids: Sequence[int], num_tokens: int) -> PageTable | None:
        """A table for a new (or re-admitted) sequence whose known tokens are ``token_ids``.

        Reuses cached pages for the longest hitting prefix of whole pages, leaving at least one
        token of ``token_ids`` to compute, then adds fresh pages until the table holds
        ``max(num_tokens, num_cached_tokens + 1)`` tokens. Returns None, changing nothing, when
        the free pool is too small.
        """
        hits, host_hits, partial, total = self._plan(token_ids, num_tokens)
        need = total - len(hits) + sum(1 for page, _ in hits if self._ref[page] == 0)
        if need > len(self._free):
            return None
        for page, _ in hits:  # pull hits off the free queue before taking fresh pages
            if self._ref[page] == 0:
                del self._free[page]
            self._ref[page] += 1
        for host_page, *_ in host_hits:  # no save this allocation triggers may evict them
            self.host.pin(host_page)
        pages = [page for page, _ in hits]
        hashes = [h for _, h in hits]
        if partial is not None and partial[0] == "bounce":  # a copy of the page on host first
            partial = self._bounce(*partial[1:])
        if partial is not None and partial[0] == "host":
            self.host.pin(partial[1])
            self.host.touch(partial[1])
        if partial is not None and partial[0] == "device":  # no host hits: it follows the hits
            # Saved to host like any evicted page: others may share its prefix (the tail of a
            # swarm's priming call is every sub-agent's system prompt end).
            pages.append(self._take(partial[1]))
        for host_page, h, parent_hash, tokens in host_hits:  # promoted: registered at once
            page = self._take()
            parent = self._ident(pages[-1]) if pages else _ROOT
            self._register(page, h, parent, tokens, parent_hash)
            self._transfers.loads.append((host_page, page))
            pages.append(page)
            hashes.append(h)
        if partial is not None and partial[0] == "host":  # loaded, not registered
            page = self._take()
            self._transfers.loads.append((partial[1], page))
            pages.append(page)
        pages.extend(self._take() for _ in range(total - len(pages)))
        self.tier_stats.device_hit_pages += len(hits)
        self.tier_stats.host_hit_pages += len(host_hits)
        partial_tokens = partial[2] if partial is not None else 0
        self.tier_stats.partial_hit_tokens += partial_tokens
        return PageTable(pages, hashes, len(hashes) * self.page_size + partial_tokens)

    def extend(self, table: PageTable, num_tokens: int) -> bool:
        """Append fresh pages so ``table`` holds ``num_tokens`` tokens; False (no change) when the
        free pool is too small. Never shrinks a table."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        need = self._pages_for(num_tokens) - len(table.pages)
        if need <= 0:
            return True
        if need > len(self._free):
            return False
        table.pages.extend(self._take() for _ in range(need))
        return True

    def commit(self, table: PageTable, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Record (and register, when caching) every page that is now full and computed.

        ``token_ids`` are the sequence's tokens (prompt + fed outputs); ``num_computed_tokens`` is
        how many of them have KV written and will not be rolled back.
        """
        ps = self.page_size
        if not 0 <= num_computed_tokens <= min(len(token_ids), len(table.pages) * ps):
            raise ValueError(
                f"num_computed_tokens={num_computed_tokens} outside [0, min({len(token_ids)} "
                f"tokens, {len(table.pages)} pages * {ps})]"
            )
        start, stop = len(table.hashes), num_computed_tokens // ps
        if start >= stop:
            return
        packed = _pack(token_ids[start * ps : stop * ps])
        for i in range(start, stop):
            tokens = packed[(i - start) * 8 * ps : (i - start + 1) * 8 * ps]
            parent_hash = table.hashes[i - 1] if i else _ROOT_HASH
            h = self._hash(parent_hash, tokens)
            table.hashes.append(h)
            if self.enable_prefix_caching:
                parent = self._ident(table.pages[i - 1]) if i else _ROOT
                self._register(table.pages[i], h, parent, tokens, parent_hash)

    def free(
        self,
        table: PageTable,
        token_ids: Sequence[int] | None = None,
        num_computed_tokens: int = 0,
    ) -> None:
        """Release a sequence: ref-1 on each page, last page first, so that a sequence's tail is
        evicted before its head. Empties ``table`` (freeing twice is harmless). With the
        sequence's ``token_ids`` (as for :meth:`commit`) and ``num_computed_tokens``, a last page
        holding computed tokens short of full is kept as a partial tail."""
        if token_ids is not None and self.enable_prefix_caching:
            self._keep_tail(table, token_ids, num_computed_tokens)
        for page in reversed(table.pages):
            assert self._ref[page] > 0, f"page {page} freed more often than taken"
            self._ref[page] -= 1
            if self._ref[page] == 0:
                self._free[page] = None  # tail: evicted last
                if self._entry[page] is None and page not in self._tail_of:
                    self._free.move_to_end(page, last=False)  # nothing to keep: reuse first
        table.pages.clear()
        table.hashes.clear()

    def drain_transfers(self) -> Transfers:
        """The copies queued since the last call (the caller makes them, then calls
        :meth:`transfers_done`)."""
        transfers, self._transfers = self._transfers, Transfers()
        return transfers

    def transfers_done(self, transfers: Transfers) -> None:
        """The copies are issued: their host pages may be reused (later copies run after them)."""
        for _, host_page in transfers.saves:
            self.host.unpin(host_page)
        for host_page, _ in transfers.loads:
            self.host.unpin(host_page)
        self.tier_stats.saved_pages += len(transfers.saves)
        self.tier_stats.loaded_pages += len(transfers.loads)

    def transfers_failed(self, transfers: Transfers) -> None:
        """The step raised before its copies were surely made: nothing they were to fill may
        serve a hit — the saves' host entries are dropped, the loads' device pages lose the
        entries they were registered with (their holders are being aborted anyway)."""
        for _, host_page in transfers.saves:
            self.host.unpin(host_page)
            self.host.forget(host_page)
        for host_page, page in transfers.loads:
            self.host.unpin(host_page)
            if self._entry[page] is not None:
                self._unregister(page)
            self._alias.pop(page, None)

    def discard_entries(self, pages: list[int]) -> None:
        """The content of ``pages`` is not what was registered (the step that was to compute it
        failed): their cache entries go, so nothing hits them (their holders are being aborted)."""
        for page in pages:
            if self._entry[page] is not None:
                self._unregister(page)
            self._alias.pop(page, None)

    def reset_prefix_cache(self) -> None:
        """Drop the cache entries of all unreferenced pages (referenced ones keep theirs)."""
        for page in [p for p in self._cache.values() if self._ref[p] == 0]:
            self._unregister(page)
            self._free.move_to_end(page, last=False)
        for page in list(self._tail_of):
            self._drop_tail(page)
            self._free.move_to_end(page, last=False)

    # -- internals -----------------------------------------------------------------------------
    def _hash(self, parent_hash: bytes, tokens: bytes) -> bytes:
        """Chain hash of one full page (``tokens`` packed by ``_pack``): keyed BLAKE2b."""
        return hashlib.blake2b(parent_hash + tokens, digest_size=16, key=_HASH_KEY).digest()

    def _pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def _plan(
        self, token_ids: Sequence[int], num_tokens: int
    ) -> tuple[
        list[tuple[int, bytes]],
        list[tuple[int, bytes, bytes, bytes]],
        tuple[str, int, int] | None,
        int,
    ]:
        """The device hits ``(page, hash)`` for ``token_ids``, then the host hits ``(host page,
        hash, parent hash, tokens)`` that continue them, then the partial hit ``(kind, page,
        tokens it serves)`` (``_best_partial``); and the table's total page count."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        hits: list[tuple[int, bytes]] = []
        host_hits: list[tuple[int, bytes, bytes, bytes]] = []
        partial = None
        if self.enable_prefix_caching:
            ps, parent_hash, parent = self.page_size, _ROOT_HASH, _ROOT
            cap = (len(token_ids) - 1) // ps  # leave >= 1 token to compute
            packed = _pack(token_ids[: max(cap, 0) * ps])
            for i in range(cap):
                tokens = packed[i * 8 * ps : (i + 1) * 8 * ps]
                h = self._hash(parent_hash, tokens)
                page = None if host_hits else self._cache.get(h)
                entry = self._entry[page] if page is not None else None
                if entry is not None and entry.parent == parent and entry.tokens == tokens:
                    hits.append((page, h))
                    parent_hash, parent = h, (page, self._gen[page])
                    continue
                host_page = None
                if self.host is not None:
                    host_page = self.host.lookup(h, parent_hash, tokens)
                if host_page is None:
                    break
                host_hits.append((host_page, h, parent_hash, tokens))
                parent_hash = h
            start = (len(hits) + len(host_hits)) * ps
            following = _pack(token_ids[start : min(start + ps, len(token_ids) - 1)])
            if following:
                partial = self._best_partial(None if host_hits else parent, parent_hash, following)
        num_cached = (len(hits) + len(host_hits)) * self.page_size + (partial[2] if partial else 0)
        return hits, host_hits, partial, self._pages_for(max(num_tokens, num_cached + 1))

    def _best_partial(
        self, parent: _Ident | None, parent_hash: bytes, following: bytes
    ) -> tuple[str, int, int] | None:
        """The page after the hits whose tokens share the longest prefix, >= 1 token, with
        ``following`` (packed), as ``(kind, page, tokens)``; ties go to the cheapest kind:
        "device": an unreferenced device page after ``parent`` (a tail or a leaf registered
        page; ``parent`` None: the hits ended on host), taken over; "host": a host page after
        ``parent_hash``, loaded into a fresh page; "bounce" (with a host tier): a registered
        device page that cannot be taken over (in use, or continued by others), copied through
        a host page (saved, then loaded into a fresh page: copy-on-write)."""
        candidates: list[tuple[str, int, bytes]] = []
        if parent is not None:
            candidates += [("device", p, self._tail_of[p][2]) for p in self._tails.get(parent, ())]
            for p in self._children.get(parent, ()):
                entry = self._entry[p]
                if self._ref[p] == 0 and self._is_leaf(p):
                    candidates.append(("device", p, entry.tokens))
                elif self.host is not None and entry.hash not in self.host:
                    candidates.append(("bounce", p, entry.tokens))
        if self.host is not None:
            candidates += [("host", p, tokens) for p, tokens in self.host.children(parent_hash)]
        best, cost = None, {"device": 0, "host": 1, "bounce": 2}
        for kind, page, tokens in candidates:
            n = _common_tokens(tokens, following)
            if n and (best is None or (n, -cost[kind]) > (best[2], -cost[best[0]])):
                best = (kind, page, n)
        return best

    def _bounce(self, page: int, tokens: int) -> tuple[str, int, int] | None:
        """Saves registered device ``page`` to a host page for a copy-on-write partial hit:
        ``("host", host page, tokens)``, or None when the host tier has no unpinned page."""
        entry = self._entry[page]
        host_page = self._save(page, HostEntry(entry.hash, entry.parent_hash, entry.tokens))
        return None if host_page is None else ("host", host_page, tokens)

    def _is_leaf(self, page: int) -> bool:
        """No registered page continues this one (taking it over would orphan them: another
        agent's whole history can hang off a shared page). A tail may: it is one page, and the
        previous step's tail hangs off exactly the page its next step diverges in."""
        return (page, self._gen[page]) not in self._children

    def _keep_tail(self, table: PageTable, token_ids: Sequence[int], num_computed: int) -> None:
        full, partial = divmod(num_computed, self.page_size)
        if not partial or len(table.hashes) != full or full >= len(table.pages):
            return
        page = table.pages[full]
        if self._ref[page] != 1 or self._entry[page] is not None:
            return
        parent = self._ident(table.pages[full - 1]) if full else _ROOT
        if parent is None or num_computed > len(token_ids):
            return
        start = full * self.page_size
        parent_hash = table.hashes[full - 1] if full else _ROOT_HASH
        self._tail_of[page] = (parent, parent_hash, _pack(token_ids[start:num_computed]))
        self._tails.setdefault(parent, []).append(page)

    def _drop_tail(self, page: int) -> None:
        parent, *_ = self._tail_of.pop(page)
        siblings = self._tails[parent]
        siblings.remove(page)
        if not siblings:
            del self._tails[parent]

    def _take(self, page: int | None = None) -> int:
        """A fresh page — the free-queue head, or ``page`` (a partial hit, unreferenced) —
        evicting its cache entry (saved to the host tier first, when there is one)."""
        if page is None:
            page, _ = self._free.popitem(last=False)
        else:
            del self._free[page]
        assert self._ref[page] == 0
        entry = self._entry[page]
        if entry is not None:
            self._save(page, HostEntry(entry.hash, entry.parent_hash, entry.tokens))
            self._unregister(page)
        self._alias.pop(page, None)
        if page in self._tail_of:
            _, parent_hash, tokens = self._tail_of[page]
            tail_key = self._hash(parent_hash, tokens + _TAIL_MARK)  # never a page's chain hash
            self._save(page, HostEntry(tail_key, parent_hash, tokens))
            self._drop_tail(page)
        self._ref[page] = 1
        return page

    def _save(self, page: int, entry: HostEntry) -> int | None:
        """Queues a copy of device ``page`` to the host tier (when there is one, with room);
        the host page, pinned until the copy is done, or None."""
        if self.host is None:
            return None
        host_page = self.host.store(entry)
        if host_page is not None:
            self.host.pin(host_page)
            self._transfers.saves.append((page, host_page))
        return host_page

    def _ident(self, page: int) -> _Ident | None:
        """The registered content a committed page holds, or None if unknown (chain broken)."""
        if self._entry[page] is not None:
            return page, self._gen[page]
        ident = self._alias.get(page)
        if ident is None or self._gen[ident[0]] != ident[1]:
            return None
        return ident

    def _live(self, entry: _Entry) -> bool:
        return entry.parent == _ROOT or self._gen[entry.parent[0]] == entry.parent[1]

    def _register(
        self, page: int, h: bytes, parent: _Ident | None, tokens: bytes, parent_hash: bytes
    ) -> None:
        assert self._entry[page] is None and self._ref[page] > 0
        if parent is None:  # our previous page's content is not in the cache: nothing to chain to
            self._alias[page] = None
            return
        other = self._cache.get(h)
        if other is not None:
            entry = self._entry[other]
            assert entry is not None and other != page
            if entry.parent == parent and entry.tokens == tokens:  # same content: keep existing
                self._alias[page] = (other, self._gen[other])
                return
            if self._live(entry):  # a real hash collision: never overwrite, stop chaining
                self._alias[page] = None
                return
            self._unregister(other)  # orphaned by its parent's eviction: replace it
            if self._ref[other] == 0:
                self._free.move_to_end(other, last=False)
        self._entry[page] = _Entry(h, parent, tokens, parent_hash)
        self._cache[h] = page
        self._children.setdefault(parent, set()).add(page)

    def _unregister(self, page: int) -> None:
        entry = self._entry[page]
        assert entry is not None and self._cache[entry.hash] == page
        del self._cache[entry.hash]
        siblings = self._children[entry.parent]
        siblings.discard(page)
        if not siblings:
            del self._children[entry.parent]
        self._entry[page] = None
        self._gen[page] += 1  # orphans every entry chained to this page
