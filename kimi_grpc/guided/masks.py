"""One step's token masks: filled on a worker thread while the forward runs, applied to raw logits.

The engine knows before the forward which rows will sample; :meth:`MaskFiller.start` hands their
guides to a worker thread, whose grammar rows are filled by the backend's native threads with the
GIL released, so mask computation overlaps the model. :func:`apply_masks` then sets every banned
logit to -inf on the raw logits, before penalties, temperature, top-k/p and min-p (masking later
could leave only banned tokens). Masks depend only on each row's own guide.

Stop ids (eos and the request's ``stop_token_ids``) follow the grammar: allowed exactly when it
accepts. A row whose grammar allows nothing is reported in :attr:`StepMasks.empty` (its request
fails) instead of being sampled.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from kimi_grpc import ops
from kimi_grpc.guided.backend import GrammarBackend, mask_words
from kimi_grpc.guided.guide import Guide


@dataclass
class GuidedStats:
    """Process-wide counters (read by GetServerStatus and the metrics)."""

    constrained_requests: int = 0
    lenient_fallbacks: int = 0
    rejected_tokens: int = 0
    masks: int = 0
    mask_seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **amounts: float) -> None:
        with self._lock:
            for name, value in amounts.items():
                setattr(self, name, getattr(self, name) + value)


@dataclass
class StepMasks:
    """Masks for the rows of one sampling batch (row = index into the batch)."""

    grammar_rows: list[int]
    bitmask: torch.Tensor | None  # int32 [len(grammar_rows), W]
    banned: list[tuple[int, tuple[int, ...]]]  # (row, ids set to -inf)
    empty: list[int]  # rows whose grammar allows no token at all


class MaskFiller:
    def __init__(self, backend: GrammarBackend | None, stats: GuidedStats) -> None:
        """``backend`` None: guided decoding is off; only grammar-less guides (ban lists) run."""
        self.backend = backend
        self.stats = stats
        self.words = mask_words(backend.vocab_size) if backend is not None else 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kimi-guided")
        self._buffer = np.empty((0, self.words), dtype=np.int32)

    def start(self, rows: list[tuple[int, Guide, frozenset[int]]]) -> Future[StepMasks] | None:
        """Begins filling masks for ``(row, guide, stop ids)``; None when no row is guided."""
        if not rows:
            return None
        return self._pool.submit(self._fill, rows)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)

    def _fill(self, rows: list[tuple[int, Guide, frozenset[int]]]) -> StepMasks:
        t0 = time.perf_counter()
        grammar = [(row, guide, stops) for row, guide, stops in rows if guide.matcher is not None]
        banned = []
        for row, guide, stops in rows:
            if guide.matcher is None:
                ids = guide.banned_ids()
                if guide.reasoning and not guide.constraint.stops_in_reasoning:
                    ids = ids + tuple(stops)
                if ids:
                    banned.append((row, ids))
        bitmask, empty = None, []
        if grammar:
            assert self.backend is not None, "a grammar guide without a grammar engine"
            if self._buffer.shape[0] < len(grammar):
                self._buffer = np.empty((2 * len(grammar), self.words), dtype=np.int32)
            out = self._buffer[: len(grammar)]
            self.backend.fill_masks([(g.matcher, i) for i, (_, g, _) in enumerate(grammar)], out)
            words = out.view(np.uint32)
            for i, (row, guide, stops) in enumerate(grammar):
                accepting = guide.matcher.is_accepting()
                for token in stops:
                    word, bit = divmod(token, 32)
                    if accepting:
                        words[i, word] |= np.uint32(1 << bit)
                    else:
                        words[i, word] &= ~np.uint32(1 << bit)
                if not out[i].any():
                    empty.append(row)
            bitmask = torch.from_numpy(out.copy())
        self.stats.add(masks=len(grammar), mask_seconds=time.perf_counter() - t0)
        return StepMasks([row for row, _, _ in grammar], bitmask, banned, empty)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 ``[R, W]`` packed masks -> bool ``[R, vocab_size]`` (True = allowed; for inspecting
    masks, the engine applies them packed)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().reshape(bitmask.shape[0], -1)
    return torch.nn.functional.pad(bits, (0, max(0, vocab_size - bits.shape[1])))[:, :vocab_size]


def apply_masks(logits: torch.Tensor, masks: StepMasks) -> torch.Tensor:
    """logits: ``[B, V]`` f32, modified in place and returned: every disallowed id at -inf."""
    x = logits
    if masks.bitmask is not None:
        bitmask = masks.bitmask.to(x.device, non_blocking=True)
        if len(masks.grammar_rows) == x.shape[0]:
            ops.apply_token_bitmask_(x, bitmask)
        else:
            rows = torch.tensor(masks.grammar_rows, device=x.device)
            x[rows] = ops.apply_token_bitmask_(x[rows].contiguous(), bitmask)
    if masks.banned:
        r = [row for row, ids in masks.banned for _ in ids]
        c = [t for _, ids in masks.banned for t in ids]
        x[torch.tensor(r, device=x.device), torch.tensor(c, device=x.device)] = float("-inf")
    return x
