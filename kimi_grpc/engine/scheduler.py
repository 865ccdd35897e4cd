"""Continuous batching with chunked prefill, prefix-cache-aware admission and preemption.

Every step has a token budget (``max_num_batched_tokens``). Running sequences are served first,
oldest first: a decoding sequence needs one token, a sequence still in (chunked) prefill needs the
rest of its prompt, cut to what the budget has left. When the cache has no page for a running
sequence, the newest running sequence is preempted (pages freed, back to the front of the waiting
queue; it is recomputed later through the prefix cache). Then waiting sequences are admitted in
(priority, arrival) order while the budget, ``max_num_seqs`` and the page pool allow; admission
reuses cached pages for the longest matching prefix. Pure CPU state: no tensors, no model.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from kimi_grpc.engine.block_manager import BlockManager
from kimi_grpc.engine.sequence import FinishReason, Sequence, SequenceStatus


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full; the caller should retry later (gRPC RESOURCE_EXHAUSTED)."""


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, new tokens)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_waiting: int,
    ) -> None:
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.waiting: list[Sequence] = []  # sorted by Sequence.sort_key
        self.running: list[Sequence] = []  # admission order: the last one is the newest
        self.num_preemptions = 0

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.blocks.page_size)

    def add(self, seqs: list[Sequence]) -> None:
        """Queues the sequences of one request (all or none)."""
        if len(self.waiting) + len(seqs) > self.max_waiting:
            raise EngineOverloadedError(
                f"the waiting queue is full ({len(self.waiting)} of {self.max_waiting} sequences)"
            )
        for seq in seqs:
            self._enqueue(seq)

    def _enqueue(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=Sequence.sort_key)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.blocks.extend(seq.table, seq.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.scheduled.append((seq, n))
                budget -= n
                i += 1
        if out.preempted:
            return out  # memory is short: admit nobody this step
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            tokens = seq.token_ids()
            table = self.blocks.allocate(tokens, len(tokens))
            if table is None:
                break  # head-of-line waits for pages (FCFS: later requests do not jump it)
            self.waiting.pop(0)
            seq.table = table
            seq.num_computed_tokens = table.num_cached_tokens
            if seq.num_cached_tokens < 0:
                seq.num_cached_tokens = table.num_cached_tokens
                seq.first_scheduled = time.monotonic()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(len(tokens) - seq.num_computed_tokens, budget)
            out.scheduled.append((seq, n))
            budget -= n
        return out

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: drop the pages, keep the tokens."""
        self.blocks.free(seq.table)
        seq.table = None
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Ends a sequence (from any state) and frees its pages at once."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        if seq.table is not None:
            self.blocks.free(seq.table)
            seq.table = None
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
