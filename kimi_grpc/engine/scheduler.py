"""Continuous batching with chunked prefill, prefix-cache-aware admission and preemption.

Every step has a token budget (``max_num_batched_tokens``). Running sequences are served first:
decoding sequences (one token each) before sequences still in (chunked) prefill, each group oldest
first, so a prefill chunk never takes the budget a decode needs. A prefill takes the rest of its
prompt cut to what the budget has left and, while other sequences compete for the step, to
``max_prefill_chunk_tokens`` (alone it takes the whole budget); while a waiting sequence can be
admitted, the prefills that do not end in this step share that one chunk. So however long and
however many the prompts in prefill, decodes keep their pace and new requests start within a step
or two, while the oldest long prompt still advances by a chunk every step. When the cache has no
page for a running sequence, the newest running sequence is preempted (pages freed, back to the
front of the waiting queue; it is recomputed later through the prefix cache). Then waiting
sequences are admitted: by priority, then preempted ones first, then the one whose session
(``Sequence.fairness_key``) has the fewest sequences running, then arrival (FCFS); admission
reuses cached pages for the longest matching prefix and stops at the first chosen sequence the
page pool cannot hold (head of line: nobody jumps it). Without sessions and without a chunk cap
this is plain FCFS. Pure CPU state: no tensors, no model.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
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
        max_prefill_chunk_tokens: int | None = None,
    ) -> None:
        """``max_prefill_chunk_tokens``: the most tokens one sequence computes in a step while
        other sequences compete for it; None: no cap (the whole budget, the behaviour without
        fairness). ``EngineConfig`` resolves its own default and always passes a number."""
        if max_prefill_chunk_tokens is not None and max_prefill_chunk_tokens < 1:
            raise ValueError(
                f"max_prefill_chunk_tokens must be >= 1 or None, got {max_prefill_chunk_tokens}"
            )
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.max_prefill_chunk_tokens = max_prefill_chunk_tokens
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
        chunk, long_room = self._prefill_limits()
        for seq in self._service_order():
            if budget <= 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this step
            if seq.num_pending_tokens and seq.ends_with_pending():
                continue  # its last token is being sampled in flight: nothing left to compute
            left = seq.num_tokens_incl_pending - seq.num_computed_tokens
            n = self._chunk(left, budget, chunk)
            long_prefill = left > chunk  # it does not end in this step
            if long_prefill:
                n = min(n, long_room)
                if n == 0:
                    continue  # the long prefills' share is spent: this one waits a step
            while not self.blocks.extend(seq.table, seq.num_computed_tokens + n):
                # The newest running sequence is the victim, whatever the service order: often a
                # prefill not served yet (skipped above once preempted). Only a decode can miss a
                # page today (admission allocates the whole prompt), so the victim is never
                # already in the batch; if a prefill ever extends, the newest may be a decode
                # served before it, which then leaves the batch and returns its token.
                victim = self.running.pop()
                budget += self._unschedule(out, victim)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.scheduled.append((seq, n))
                budget -= n
                if long_prefill:
                    long_room -= n
        if out.preempted:
            return out  # memory is short: admit nobody this step
        load: _SessionLoad | None = None
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            if load is None:
                load = _SessionLoad(self.running)
            i = self._next_admission(load)
            seq = self.waiting[i]
            assert seq.num_pending_tokens == 0, "a preempted sequence's token is still in flight"
            tokens = seq.cache_token_ids()
            table = self.blocks.allocate(tokens, len(tokens))
            if table is None:
                break  # the chosen one waits for pages; no later request jumps it
            del self.waiting[i]
            seq.table = table
            seq.num_computed_tokens = table.num_cached_tokens
            if seq.num_cached_tokens < 0:
                seq.num_cached_tokens = table.num_cached_tokens
                seq.first_scheduled = time.monotonic()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            load.add(seq)
            n = self._chunk(len(tokens) - seq.num_computed_tokens, budget, chunk)
            out.scheduled.append((seq, n))
            budget -= n
        return out

    def _service_order(self) -> list[Sequence]:
        """Running sequences in the order the budget serves them: decodes (exactly one token to
        compute) first, then (chunked) prefills, each group in admission order (oldest first)."""
        decodes, rest = [], []
        for s in self.running:
            (decodes if s.num_tokens_incl_pending - s.num_computed_tokens == 1 else rest).append(s)
        return decodes + rest

    def _prefill_limits(self) -> tuple[int, int]:
        """(the most tokens one sequence may compute this step, the most that the long prefills,
        those that do not end in this step, may compute together). Without a cap, both are the
        budget: oldest first, as much as fits.

        Competition for the step means more than one sequence can be served: the running ones
        plus the waiting ones ``max_num_seqs`` has room to admit (one that cannot be admitted
        gains nothing from a cap). Under competition one sequence's chunk is capped, which also
        bounds the step's length that the decodes sharing it wait for; alone, a long prompt
        takes the whole budget. While a waiting sequence can be admitted, the long prefills also
        share one capped chunk (oldest first): however many huge prompts are in prefill, the
        rest of the budget stays with decodes, prefills about to end and admissions, so a new
        request starts within a step or two. The long prefills then advance one after another
        instead of side by side (none waits longer than for the older ones' prefills); with
        nobody to admit, each takes a chunk."""
        budget, cap = self.max_num_batched_tokens, self.max_prefill_chunk_tokens
        if cap is None:
            return budget, budget
        admissible = min(len(self.waiting), self.max_num_seqs - len(self.running))
        chunk = cap if len(self.running) + admissible > 1 else budget
        return chunk, cap if admissible else budget

    def _chunk(self, left: int, budget: int, chunk: int) -> int:
        """Tokens for a sequence with ``left`` to compute: all that the budget allows, capped at
        ``chunk`` only when the cap leaves at least a page of budget to the others. A smaller
        remainder helps nobody: it is wasted, or admits a sequence for a few tokens, which then
        holds all its prompt pages and has done its prefix-cache lookup before the pages being
        computed in this step (a shared system prompt) could be hit."""
        n = min(left, budget)
        if n > chunk and budget - chunk >= self.blocks.page_size:
            return chunk
        return n

    @staticmethod
    def _unschedule(out: SchedulerOutput, seq: Sequence) -> int:
        """Drops ``seq`` from this step's batch; returns the tokens it had (0 if none)."""
        for k, (scheduled, n) in enumerate(out.scheduled):
            if scheduled is seq:
                del out.scheduled[k]
                return n
        return 0

    def _next_admission(self, load: _SessionLoad) -> int:
        """Index in ``waiting`` of the sequence to admit next. ``waiting`` is sorted by
        ``Sequence.sort_key`` (priority, preempted first, arrival), so: the head when it was
        preempted (resumed work stays at the front); otherwise, within the head's priority, the
        first sequence whose session has the fewest others running (ties: arrival). Session-less
        sequences have a load of 0, so among themselves the order is exactly FCFS. One pass over
        the head's priority at most, ended early by a sequence of load 0 (nobody beats it)."""
        head = self.waiting[0]
        if head.num_preemptions:
            return 0
        best, best_load = 0, load.of(head)
        for i in range(1, len(self.waiting)):
            if best_load == 0:
                break
            seq = self.waiting[i]
            if seq.priority != head.priority:
                break
            seq_load = load.of(seq)
            if seq_load < best_load:
                best, best_load = i, seq_load
        return best

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: drop the pages, keep the tokens (a token sampled in flight is
        appended when its step finishes, before the sequence can be admitted again)."""
        self.blocks.free(seq.table, seq.cache_token_ids(), seq.num_known_computed_tokens)
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
            self.blocks.free(seq.table, seq.cache_token_ids(), seq.num_known_computed_tokens)
            seq.table = None
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason


class _SessionLoad:
    """Running sequences per session, for session-fair admission. Built from ``running`` when a
    step starts admitting (O(running)) and kept up to date as it admits; nothing to keep in sync
    between steps."""

    def __init__(self, running: list[Sequence]) -> None:
        self.by_session: Counter[str] = Counter()
        self.by_request: Counter[str] = Counter()
        for seq in running:
            self.add(seq)

    def add(self, seq: Sequence) -> None:
        if seq.session_id is not None:
            self.by_session[seq.session_id] += 1
            self.by_request[seq.request_id] += 1

    def of(self, seq: Sequence) -> int:
        """Running sequences that share ``seq.fairness_key`` but belong to other requests. A
        request's own completions (``n > 1``) do not count against it, so its siblings are not
        overtaken once one of them is admitted; a session-less request's key is its own request,
        so its load is always 0."""
        if seq.session_id is None:
            return 0
        return self.by_session[seq.session_id] - self.by_request[seq.request_id]
