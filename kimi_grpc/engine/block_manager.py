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
"""

from __future__ import annotations

import hashlib
import secrets
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

_HASH_KEY = secrets.token_bytes(32)  # per process: hashes are unguessable and never persisted
_ROOT_HASH = b""
_Ident = tuple[int, int]  # (page id, generation): one page's content between two evictions
_ROOT: _Ident = (-1, 0)


def _pack(token_ids: Sequence[int]) -> bytes:
    """Token ids as fixed-width 8-byte integers (one conversion per call, not per page)."""
    return array("q", token_ids).tobytes()


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


class BlockManager:
    """Page allocator with reference counts and an LRU prefix cache of full pages.

    With ``enable_prefix_caching=False`` nothing ever hits and nothing is registered; ``commit``
    still records ``PageTable.hashes``.
    """

    def __init__(
        self, num_pages: int, page_size: int = 64, *, enable_prefix_caching: bool = True
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
        hits, total = self._plan(token_ids, num_tokens)
        return total - len(hits) + sum(1 for page, _ in hits if self._ref[page] == 0)

    def allocate(self, token_ids: Sequence[int], num_tokens: int) -> PageTable | None:
        """A table for a new (or re-admitted) sequence whose known tokens are ``token_ids``.

        Reuses cached pages for the longest hitting prefix of whole pages, leaving at least one
        token of ``token_ids`` to compute, then adds fresh pages until the table holds
        ``max(num_tokens, num_cached_tokens + 1)`` tokens. Returns None, changing nothing, when
        the free pool is too small.
        """
        hits, total = self._plan(token_ids, num_tokens)
        need = total - len(hits) + sum(1 for page, _ in hits if self._ref[page] == 0)
        if need > len(self._free):
            return None
        for page, _ in hits:  # pull hits off the free queue before taking fresh pages
            if self._ref[page] == 0:
                del self._free[page]
            self._ref[page] += 1
        pages = [page for page, _ in hits]
        pages.extend(self._take() for _ in range(total - len(hits)))
        return PageTable(pages, [h for _, h in hits], len(hits) * self.page_size)

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
            h = self._hash(table.hashes[i - 1] if i else _ROOT_HASH, tokens)
            table.hashes.append(h)
            if self.enable_prefix_caching:
                parent = self._ident(table.pages[i - 1]) if i else _ROOT
                self._register(table.pages[i], h, parent, tokens)

    def free(self, table: PageTable) -> None:
        """Release a sequence: ref-1 on each page, last page first, so that a sequence's tail is
        evicted before its head. Empties ``table`` (freeing twice is harmless)."""
        for page in reversed(table.pages):
            assert self._ref[page] > 0, f"page {page} freed more often than taken"
            self._ref[page] -= 1
            if self._ref[page] == 0:
                self._free[page] = None  # tail: evicted last
                if self._entry[page] is None:  # nothing to keep: reuse before any cached page
                    self._free.move_to_end(page, last=False)
        table.pages.clear()
        table.hashes.clear()

    def reset_prefix_cache(self) -> None:
        """Drop the cache entries of all unreferenced pages (referenced ones keep theirs)."""
        for page in [p for p in self._cache.values() if self._ref[p] == 0]:
            self._unregister(page)
            self._free.move_to_end(page, last=False)

    # -- internals -----------------------------------------------------------------------------
    def _hash(self, parent_hash: bytes, tokens: bytes) -> bytes:
        """Chain hash of one full page (``tokens`` packed by ``_pack``): keyed BLAKE2b."""
        return hashlib.blake2b(parent_hash + tokens, digest_size=16, key=_HASH_KEY).digest()

    def _pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def _plan(
        self, token_ids: Sequence[int], num_tokens: int
    ) -> tuple[list[tuple[int, bytes]], int]:
        """The hits ``(page, hash)`` for ``token_ids`` and the table's total page count."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        hits: list[tuple[int, bytes]] = []
        if self.enable_prefix_caching:
            ps, parent_hash, parent = self.page_size, _ROOT_HASH, _ROOT
            cap = (len(token_ids) - 1) // ps  # leave >= 1 token to compute
            packed = _pack(token_ids[: max(cap, 0) * ps])
            for i in range(cap):
                tokens = packed[i * 8 * ps : (i + 1) * 8 * ps]
                h = self._hash(parent_hash, tokens)
                page = self._cache.get(h)
                if page is None:
                    break
                entry = self._entry[page]
                assert entry is not None and entry.hash == h
                if entry.parent != parent or entry.tokens != tokens:
                    break
                hits.append((page, h))
                parent_hash, parent = h, (page, self._gen[page])
        num_cached = len(hits) * self.page_size
        return hits, self._pages_for(max(num_tokens, num_cached + 1))

    def _take(self) -> int:
        """A fresh page from the free-queue head, evicting its cache entry."""
        page, _ = self._free.popitem(last=False)
        assert self._ref[page] == 0
        if self._entry[page] is not None:
            self._unregister(page)
        self._alias.pop(page, None)
        self._ref[page] = 1
        return page

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

    def _register(self, page: int, h: bytes, parent: _Ident | None, tokens: bytes) -> None:
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
        self._entry[page] = _Entry(h, parent, tokens)
        self._cache[h] = page

    def _unregister(self, page: int) -> None:
        entry = self._entry[page]
        assert entry is not None and self._cache[entry.hash] == page
        del self._cache[entry.hash]
        self._entry[page] = None
        self._gen[page] += 1  # orphans every entry chained to this page
