"""The host tier of the prefix cache: which full KV pages live in host memory, keyed like the
device cache. Pure bookkeeping (the bytes live in ``model.kv_cache.HostKVPool``).

A device page that loses its prefix-cache entry to a fresh allocation is *demoted*: its latents
are copied to a host page and the host index records the page's chain hash, its parent's chain
hash and its token ids. A lookup that misses on the device continues here with the same chained
hash; a hit needs the hash, the stored tokens and the parent hash to match, and the walk starts at
the root (or at a verified device hit), so by induction a host hit reproduces the whole prefix —
as collision-safe as a device hit. A host hit is *promoted*: copied into a fresh device page
before the step's forward.

Partial pages: an evicted device page that an agent's next step may match only partway (a tail,
or a registered page) is findable here by its parent's chain hash too (:meth:`children`); the
block manager compares token prefixes and loads the best one into a fresh, unregistered device
page. A tail's entry has fewer tokens than a page and a hash of its own, so it never serves a
whole-page hit.

Invariants: a host page holds at most one entry; pages with a copy in flight (``pin``) are never
evicted or overwritten; eviction is LRU over unpinned entries.

**Retention** (an agent session waiting on a tool): :meth:`retain` marks chain hashes — whether
their pages are on the device or here already — until a deadline; eviction skips retained
entries. The rule that keeps idle sessions from starving everyone else: when every unpinned
entry is retained, the one whose retention ends first is evicted anyway (retention yields to new
pages, never blocks them). :meth:`release` ends a session's retention at once.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import NamedTuple


class HostEntry(NamedTuple):
    hash: bytes
    parent_hash: bytes
    tokens: bytes  # the page's token ids, packed as the block manager packs them


class HostPageIndex:
    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError(f"a host tier needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        self._by_hash: OrderedDict[bytes, int] = OrderedDict()  # LRU: oldest first
        self._entry: list[HostEntry | None] = [None] * num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # pop() gives the lowest page first
        self._pins = [0] * num_pages
        self._retained: dict[bytes, float] = {}  # chain hash -> time.monotonic() deadline
        self._children: dict[bytes, set[int]] = {}  # parent chain hash -> host pages

    def __len__(self) -> int:
        return len(self._by_hash)

    def __contains__(self, h: bytes) -> bool:
        return h in self._by_hash

    def lookup(self, h: bytes, parent_hash: bytes, tokens: bytes) -> int | None:
        """The host page holding exactly this page (hash, parent and tokens all equal)."""
        page = self._by_hash.get(h)
        if page is None:
            return None
        entry = self._entry[page]
        assert entry is not None and entry.hash == h
        if entry.parent_hash != parent_hash or entry.tokens != tokens:
            return None  # a hash collision: never served
        self._by_hash.move_to_end(h)
        return page

    def store(self, entry: HostEntry) -> int | None:
        """A host page for a demoted device page (evicting the least recently used unpinned
        entry when full); None when the page is already here or every page is pinned."""
        if entry.hash in self._by_hash:
            self._by_hash.move_to_end(entry.hash)
            return None
        if self._free:
            page = self._free.pop()
        else:
            victim = self._victim()
            if victim is None:
                return None
            page = self._by_hash.pop(victim)
            self._unlink(page)
        self._entry[page] = entry
        self._by_hash[entry.hash] = page
        self._children.setdefault(entry.parent_hash, set()).add(page)
        return page

    def children(self, parent_hash: bytes) -> list[tuple[int, bytes]]:
        """``(host page, packed tokens)`` of the entries whose parent is ``parent_hash``."""
        return [(page, self._entry[page].tokens) for page in self._children.get(parent_hash, ())]

    def touch(self, page: int) -> None:
        """``page`` served a hit: most recently used."""
        self._by_hash.move_to_end(self._entry[page].hash)

    def _unlink(self, page: int) -> None:
        parent_hash = self._entry[page].parent_hash
        siblings = self._children[parent_hash]
        siblings.discard(page)
        if not siblings:
            del self._children[parent_hash]

    def _victim(self) -> bytes | None:
        """The least recently used unpinned entry that is not retained; else (every one is
        retained) the retained entry whose retention ends first; None when all are pinned."""
        now = time.monotonic()
        first_to_expire: tuple[float, bytes] | None = None
        skipped: list[bytes] = []
        victim = None
        for h, page in self._by_hash.items():
            if self._pins[page]:
                continue
            deadline = self._retained.get(h)
            if deadline is None or deadline <= now:
                self._retained.pop(h, None)
                victim = h
                break
            skipped.append(h)
            if first_to_expire is None or deadline < first_to_expire[0]:
                first_to_expire = (deadline, h)
        for h in skipped:  # retained: to the recent end, so the next scan does not pass them again
            self._by_hash.move_to_end(h)
        if victim is None and first_to_expire is not None:
            victim = first_to_expire[1]
        return victim

    @property
    def num_retained(self) -> int:
        """Entries here whose retention has not ended."""
        now = time.monotonic()  # O(retained hashes), not O(host pages): read every step
        return sum(1 for h, t in self._retained.items() if t > now and h in self._by_hash)

    def retain(self, hashes: Iterable[bytes], until: float) -> None:
        """Keep these pages (``time.monotonic()`` deadline ``until``), here or when they come."""
        for h in hashes:
            self._retained[h] = max(until, self._retained.get(h, 0.0))
        if len(self._retained) > 4 * self.num_pages:  # forget deadlines that have passed
            now = time.monotonic()
            self._retained = {h: t for h, t in self._retained.items() if t > now}

    def release(self, hashes: Iterable[bytes]) -> None:
        for h in hashes:
            self._retained.pop(h, None)

    def forget(self, page: int) -> None:
        """Drops ``page``'s entry (its bytes are not what the entry says); the page is free."""
        entry = self._entry[page]
        if entry is None:
            return
        del self._by_hash[entry.hash]
        self._unlink(page)
        self._entry[page] = None
        self._free.append(page)

    def pin(self, page: int) -> None:
        """A copy from or to ``page`` is pending: it may not be evicted until :meth:`unpin`."""
        self._pins[page] += 1

    def unpin(self, page: int) -> None:
        assert self._pins[page] > 0, f"host page {page} unpinned more often than pinned"
        self._pins[page] -= 1
