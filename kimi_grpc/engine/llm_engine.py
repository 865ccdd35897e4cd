"""The engine step: schedule → run the model → sample → detokenize, stop, finish.

Single-threaded and synchronous; ``AsyncLLM`` drives it from its own thread and ``LLM`` from a
loop. Requests are validated when added (a clear ``ValueError``/``SamplingParamsError`` naming the
field); after that, every sequence ends with ``stop``, ``length`` or ``abort``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
from collections import OrderedDict
from collections.abc import Sequence as Seq
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from kimi_grpc.config import EngineConfig
from kimi_grpc.engine.block_manager import BlockManager, TierStats, Transfers
from kimi_grpc.engine.host_cache import HostPageIndex
from kimi_grpc.engine.media_encoder import MediaEncoder, cache_keys
from kimi_grpc.engine.model_runner import ModelRunner
from kimi_grpc.engine.sampler import Sampler, SampleResult, SamplingState, make_generator
from kimi_grpc.engine.scheduler import Scheduler
from kimi_grpc.engine.sequence import FinishReason, Sequence, SequenceStatus
from kimi_grpc.engine.stop_checker import StopChecker
from kimi_grpc.guided import Constraint, Guide, GuidedStats, GuideError, MaskFiller
from kimi_grpc.guided.llguidance_backend import LLGuidanceBackend
from kimi_grpc.media.request import MediaSpan
from kimi_grpc.model.forward_batch import ForwardBatch
from kimi_grpc.model.vision import KimiVisionModel
from kimi_grpc.parallel.executor import RankExecutor
from kimi_grpc.parallel.leader import Leader
from kimi_grpc.sampling_params import SamplingParams
from kimi_grpc.tokenizer import IncrementalDetokenizer, KimiTokenizer


class RequestError(ValueError):
    """A request the engine refuses; ``field`` names what is wrong ("prompt", "max_tokens", ...)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class DuplicateRequestError(RequestError):
    """The request id is already in flight (gRPC ALREADY_EXISTS)."""


@dataclass
class SequenceDelta:
    """What one step produced for one completion."""

    request_id: str
    index: int
    token_ids: list[int]  # new tokens (empty for an abort)
    text: str  # newly emitted text (stop strings and held-back prefixes excluded)
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    queue_time: float | None = None  # seconds from add_request to first scheduling
    error: str | None = None  # why the request failed (finish_reason "abort"), e.g. a grammar


@dataclass
class StepTimings:
    """Wall-clock seconds per phase over all steps. Host side (the engine thread): schedule,
    prepare, process, and — overlapped — ``wait`` for the device thread. Device side: forward,
    mask_wait, sample (on the engine thread when synchronous, so inside neither host phase)."""

    steps: int = 0
    schedule: float = 0.0
    prepare: float = 0.0  # building the ForwardBatch on the host
    process: float = 0.0  # the finished step's outputs: detokenise, stop checks, deltas
    wait: float = 0.0  # overlapped: the host waiting for the device thread's step
    forward: float = 0.0  # the model
    mask_wait: float = 0.0  # waiting after the forward for guided-decoding masks
    sample: float = 0.0  # the sampler

    def add(self, **seconds: float) -> None:
        """One host step's phases."""
        self.steps += 1
        self.add_device(**seconds)

    def add_device(self, **seconds: float) -> None:
        for name, value in seconds.items():
            setattr(self, name, getattr(self, name) + value)


@dataclass(eq=False)
class _Step:
    """A launched step, until its outputs are processed."""

    scheduled: list[tuple[Sequence, int]]
    batch: ForwardBatch
    transfers: Transfers
    previous: _Step | None  # the step whose samples fill this one's placeholders (then None)
    fills: list[tuple[int, int]] = field(default_factory=list)  # (batch row, previous's sample)
    sampling: list[Sequence] = field(default_factory=list)  # the sequences that sample, in order
    sample_rows: list[int] = field(default_factory=list)  # their batch rows
    sample_index: dict[int, int] = field(default_factory=dict)  # seq_id -> index in sampling
    # Set when the sampling states are current (every earlier step's outputs processed): the
    # pending guided-decoding masks, or None.
    ready: Future = field(default_factory=Future)
    result: Future | None = None  # the device thread's run of it (None: run on the caller)
    token_ids: list[int] = field(default_factory=list)  # sampled (set by the device side)
    failed: frozenset[int] = frozenset()  # indices in ``sampling`` whose grammar allowed nothing
    committed: list[int] = field(default_factory=list)  # pages registered at its launch
    error: BaseException | None = None  # the device side raised


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    pages_total: int
    pages_used: int
    pages_cached: int
    page_size: int
    num_preemptions: int
    tiers: TierStats = field(default_factory=TierStats)  # prefix-cache tiers (a copy)
    host_pages_total: int = 0
    host_pages_used: int = 0
    host_pages_retained: int = 0
    bytes_saved: int = 0
    bytes_loaded: int = 0


MAX_REMEMBERED_SESSIONS = 65_536  # sessions whose latest pages retention can still name


class LLMEngine:
    def __init__(
        self,
        executor: RankExecutor,
        tokenizer: KimiTokenizer,
        config: EngineConfig,
        *,
        leader: Leader | None = None,
        vision: KimiVisionModel | None = None,
    ) -> None:
        """``executor``: this rank's model and KV cache (sized with ``config``).
        ``leader``: rank 0's handle on the other tensor-parallel ranks (None: one process).
        ``vision``: the checkpoint's vision tower + projector (None: text only; requests with
        media are refused)."""
        model = executor.model
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.model_path: Path | None = None  # set by load_engine, for reporting
        mc = model.config
        self.max_model_len = min(
            config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings
        )
        if tokenizer.vocab_size > mc.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} tokens but the model only {mc.vocab_size}"
            )
        self.leader = leader
        self.cache = executor.cache
        num_pages = self.cache.num_pages
        self.host_pool = executor.host  # every rank holds the same host pages
        host_index = None
        if self.host_pool is not None:
            host_index = HostPageIndex(self.host_pool.pages.shape[0])
        self.blocks = BlockManager(
            num_pages,
            executor.tokens_per_page,
            enable_prefix_caching=config.enable_prefix_caching,
            host=host_index,
        )
        self.scheduler = Scheduler(
            self.blocks,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_waiting=config.max_waiting,
            max_prefill_chunk_tokens=config.prefill_chunk_cap,
        )
        self.media_encoder: MediaEncoder | None = None
        if vision is not None:
            self.media_encoder = MediaEncoder(vision, config.encoder_cache_tokens)
        self.runner = ModelRunner(executor, leader, self.media_encoder)
        # Requests without a seed share one engine-wide stream.
        self.sampler = Sampler(make_generator(config.seed, model.device))
        # Stop on every eos the checkpoint declares, plus <|im_end|> and [EOS] (Kimi's rule).
        eos = list(mc.eos_token_ids)
        eos += [
            t for t in (tokenizer.im_end_id, tokenizer.eos_id) if t is not None and t not in eos
        ]
        self.eos_token_ids = frozenset(eos)
        # Guided decoding: one grammar engine per process (tokenizer trie built once); the mask
        # filler also serves grammar-less constraints (tool_choice none) when it is off.
        self.guided_stats = GuidedStats()
        self.grammar_backend: LLGuidanceBackend | None = None
        if config.guided_decoding:
            self.grammar_backend = LLGuidanceBackend(
                tokenizer, eos_token_ids=sorted(self.eos_token_ids), vocab_size=mc.vocab_size
            )
        self.mask_filler = MaskFiller(self.grammar_backend, self.guided_stats)
        self.requests: dict[str, list[Sequence]] = {}
        self._session_pages: OrderedDict[str, list[bytes]] = OrderedDict()
        self._seq_ids = itertools.count()
        self.timings = StepTimings()
        # Overlapped scheduling: forwards and sampling run on this thread, one step behind the
        # host (see ``step``); ``_in_flight`` is the step launched but not yet processed.
        self._device_thread: ThreadPoolExecutor | None = None
        if config.overlap_scheduling:
            self._device_thread = ThreadPoolExecutor(1, thread_name_prefix="kimi-device")
        self._in_flight: _Step | None = None

    def shutdown(self) -> None:
        """Stops the device thread and the tensor-parallel workers (after the step in flight)."""
        if self._device_thread is not None:
            if self._in_flight is not None and not self._in_flight.ready.done():
                self._in_flight.ready.set_result(None)
            self._device_thread.shutdown(wait=True)
        self.mask_filler.shutdown()
        if self.leader is not None:
            self.leader.shutdown()

    # ---- requests -------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        session_id: str | None = None,
        constraint: Constraint | None = None,
        media: Seq[MediaSpan] = (),
    ) -> list[int]:
        """Validates and queues a request; returns its prompt token ids.

        ``media``: the prompt's images / video chunks (``media.request.media_prompt``), in
        position order; their vision embeddings replace those positions' token embeddings.

        ``constraint``: guided decoding (grammar compiled by the caller with
        :attr:`grammar_backend`); each completion follows it with its own :class:`Guide`.

        ``session_id`` names the client session (an agent run, a sub-agent) the request belongs
        to: among waiting requests of equal priority, the scheduler admits first those whose
        session has the fewest sequences running, so one session flooding the queue does not
        starve the others. None or "" (proto3's unset string): the request is a session of its
        own (plain FCFS among those). Scheduling changes when a greedy or seeded request is
        computed, never its tokens (unseeded sampling draws from the shared engine stream)."""
        if not isinstance(request_id, str) or not request_id:
            raise RequestError("request_id", "request_id must be a non-empty string")
        if session_id is not None and not isinstance(session_id, str):
            raise RequestError("session_id", "session_id must be a string or None")
        session_id = session_id or None
        if request_id in self.requests:
            raise DuplicateRequestError(
                "request_id", f"request_id {request_id!r} is already in flight"
            )
        if isinstance(prompt, str):
            prompt_ids = self.tokenizer.encode(prompt)
        else:
            prompt_ids = list(prompt)
            vocab = self.model.config.vocab_size
            for t in prompt_ids:
                if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                    raise RequestError(
                        "prompt", f"prompt token id {t!r} is outside the vocabulary [0, {vocab})"
                    )
        if not prompt_ids:
            raise RequestError("prompt", "prompt is empty")
        params.validate_token_ids(self.model.config.vocab_size)
        media = tuple(media)
        if media:
            self._check_media(prompt_ids, media)
        if constraint is not None and constraint.uses_grammar:
            if self.grammar_backend is None:
                raise RequestError("guided_decoding", "guided decoding is off on this server")
            if params.ignore_eos:
                raise RequestError(
                    "ignore_eos",
                    "ignore_eos cannot be combined with guided decoding (the grammar decides "
                    "where the output may end)",
                )
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            raise RequestError(
                "prompt",
                f"prompt has {len(prompt_ids)} tokens; the maximum context length is "
                f"{self.max_model_len} tokens",
            )
        max_tokens = room if params.max_tokens is None else params.max_tokens
        if max_tokens > room:
            raise RequestError(
                "max_tokens",
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                f"maximum context length ({self.max_model_len})",
            )
        needed = self.scheduler.pages_for(len(prompt_ids) + max_tokens)
        if needed > self.blocks.num_pages:
            raise RequestError(
                "max_tokens",
                f"prompt + max_tokens need {needed} KV pages but the cache holds "
                f"{self.blocks.num_pages}; lower max_tokens or raise kv_cache_memory",
            )
        now = time.monotonic()
        keys = cache_keys(prompt_ids, media)  # computed once for the request's n sequences
        seqs = []
        for index in range(params.n):
            sampling = SamplingState.create(
                params,
                prompt_ids,
                self.eos_token_ids,
                self.model.device,
                seed=params.completion_seed(index),
            )
            seqs.append(
                Sequence(
                    seq_id=next(self._seq_ids),
                    request_id=request_id,
                    index=index,
                    prompt_token_ids=prompt_ids,
                    params=params,
                    max_tokens=max_tokens,
                    sampling=sampling,
                    detokenizer=IncrementalDetokenizer(
                        self.tokenizer, skip_special_tokens=params.skip_special_tokens
                    ),
                    stop_checker=StopChecker(params.stop or [], params.include_stop_str_in_output),
                    priority=priority,
                    arrival=now,
                    session_id=session_id,
                    media=media,
                    prompt_cache_keys=keys,
                )
            )
        if constraint is not None:
            for seq in seqs:
                seq.sampling.guide = Guide(constraint)
        self.scheduler.add(seqs)
        self.requests[request_id] = seqs
        if constraint is not None and constraint.uses_grammar:
            self.guided_stats.add(constrained_requests=1)
        return prompt_ids

    def _check_media(self, prompt_ids: list[int], media: tuple[MediaSpan, ...]) -> None:
        if self.media_encoder is None:
            raise RequestError("media", "this model has no vision tower: images and video are off")
        pad = self.media_encoder.vision.config.media_placeholder_token_id
        end = 0
        for i, span in enumerate(media):
            if span.offset < end or span.end > len(prompt_ids):
                why = f"media span {i} [{span.offset}, {span.end}) overlaps or leaves the prompt"
                raise RequestError("media", why)
            if any(prompt_ids[p] != pad for p in range(span.offset, span.end)):
                raise RequestError("media", f"media span {i} does not cover media pad tokens")
            end = span.end
        # Up to the last span, every pad must be a span's (one left out would keep a text
        # embedding). After it, a pad is an ordinary token: a multi-phase AgentStep re-runs
        # prompt + generated, and the model may have sampled the pad id.
        pads = prompt_ids[:end].count(pad)
        covered = sum(span.chunk.num_tokens for span in media)
        if pads != covered:
            raise RequestError(
                "media", f"the prompt has {pads} media pad tokens but the spans cover {covered}"
            )

    def abort_request(self, request_id: str) -> list[SequenceDelta]:
        """Finishes every unfinished sequence of the request now (pages freed at once)."""
        seqs = self.requests.pop(request_id, None)
        if seqs is None:
            return []
        deltas = []
        for seq in seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, FinishReason.ABORT)
                deltas.append(self._delta(seq, [], ""))
        return deltas

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def stats(self) -> EngineStats:
        host = self.blocks.host
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            pages_total=self.blocks.num_pages,
            pages_used=self.blocks.num_used_pages,
            pages_cached=self.blocks.num_cached_pages,
            page_size=self.blocks.page_size,
            num_preemptions=self.scheduler.num_preemptions,
            tiers=dataclasses.replace(self.blocks.tier_stats),
            host_pages_total=host.num_pages if host is not None else 0,
            host_pages_used=len(host) if host is not None else 0,
            host_pages_retained=host.num_retained if host is not None else 0,
            bytes_saved=self.host_pool.bytes_saved if self.host_pool is not None else 0,
            bytes_loaded=self.host_pool.bytes_loaded if self.host_pool is not None else 0,
        )

    # ---- the step -------------------------------------------------------------------------------
    def step(self) -> list[SequenceDelta]:
        """Schedules and launches a step; returns the outputs of the step that finished.

        Synchronous (``overlap_scheduling=False``): the step launched is the one that finishes.
        Overlapped: the forward and sampling run on the device thread, one step behind the
        host — this call schedules and prepares step N+1 while step N's forward runs, then
        processes step N's outputs (detokenise, stop checks, deltas) while N+1's runs. The
        sampled tokens of N are the one dependency: N+1 is built with placeholders that the
        device thread fills from N's samples before N+1's forward (vLLM's async scheduling);
        N+1 samples only once N's outputs are processed, so penalties, min_tokens and grammars
        see every earlier token. What changes is when the scheduler learns of a stop (one step
        later: a sequence that stopped at N computed one discarded token in N+1), never a
        greedy or seeded token."""
        t0 = time.perf_counter()
        out = self.scheduler.schedule()
        t1 = time.perf_counter()
        launched = self._launch(out.scheduled) if out.scheduled else None
        t2 = time.perf_counter()
        if self._device_thread is None:
            done = launched
        else:
            done, self._in_flight = self._in_flight, launched
        try:
            deltas = self._complete(done) if done is not None else []
        except BaseException:  # the launched step cannot run on a failed one's samples
            if launched is not None and launched is not done:
                self._in_flight = None
                self._abandon(launched)
            raise
        # The launched step samples once the states it reads are current (now).
        if launched is not None and not launched.ready.done():
            self._make_ready(launched)
        if done is not None or launched is not None:
            self.timings.add(schedule=t1 - t0, prepare=t2 - t1)
        return deltas

    def _launch(self, scheduled: list[tuple[Sequence, int]]) -> _Step:
        """Builds the batch for ``scheduled``, advances the sequences' counts and starts it (on the
        device thread when overlapped)."""
        previous = self._in_flight
        batch = self.runner.prepare(scheduled)
        # Host tier: the pages this schedule evicted and promoted move with the batch (every
        # rank makes the copies before its forward).
        transfers = self.blocks.drain_transfers()
        batch.kv_saves, batch.kv_loads = transfers.saves, transfers.loads
        step = _Step(scheduled, batch, transfers, previous)
        page = self.blocks.page_size
        for b, (seq, n) in enumerate(scheduled):
            known, end = seq.num_tokens, seq.num_computed_tokens + n
            if end > known:  # its input was sampled by the previous step
                step.fills.append((b, previous.sample_index[seq.seq_id]))
            if end == known + seq.num_pending_tokens:  # it samples
                step.sample_index[seq.seq_id] = len(step.sampling)
                step.sample_rows.append(b)
                step.sampling.append(seq)
                seq.num_pending_tokens += 1
            seq.num_computed_tokens = end
            # Pages filled by this step are registered now: any step that could hit them runs
            # after this one on the device (and if this one fails, they are discarded).
            if min(end, known) // page > len(seq.table.hashes):
                step.committed += self._commit(seq)
        if previous is None:
            self._make_ready(step)
        if self._device_thread is not None:
            step.result = self._device_thread.submit(self._execute, step)
        return step

    def _commit(self, seq: Sequence) -> list[int]:
        """Registers the sequence's newly full pages whose token ids are all known; returns them."""
        known = seq.num_known_computed_tokens
        start = len(seq.table.hashes)
        if known // self.blocks.page_size <= start:
            return []
        self.blocks.commit(seq.table, seq.cache_token_ids(), known)
        return seq.table.pages[start : len(seq.table.hashes)]

    def _abandon(self, step: _Step) -> None:
        """A launched step whose predecessor failed: let it end (it does not run a forward on a
        failed step's samples), then undo what it promised."""
        if not step.ready.done():
            step.ready.set_result(None)
        with contextlib.suppress(BaseException):  # its own failure adds nothing to the first
            step.result.result()
        self._step_failed(step)

    def _step_failed(self, step: _Step) -> None:
        """``step`` raised (or was abandoned): its moves and the pages it registered at launch may
        hold nothing, so none of them may serve a hit. Its sequences are left to the caller to
        abort (LLM.generate does; the server's engine loop stops)."""
        if step.transfers:
            self.blocks.transfers_failed(step.transfers)
        self.blocks.discard_entries(step.committed)
        for seq in step.sampling:
            seq.num_pending_tokens -= 1

    def _make_ready(self, step: _Step) -> None:
        """The sampling states ``step`` reads are current: start its guided-decoding masks (filled
        on another thread while the forward runs) and let it sample."""
        guided = [
            (i, seq.sampling.guide, seq.sampling.stop_token_ids)
            for i, seq in enumerate(step.sampling)
            if seq.sampling.guide is not None and not seq.is_finished
        ]
        step.ready.set_result(self.mask_filler.start(guided) if guided else None)

    def _execute(self, step: _Step) -> list[SampleResult]:
        """The device side of a step: fill the placeholders, forward, wait for the states to be
        current, sample. (On the device thread when overlapped.)"""
        t0 = time.perf_counter()
        if step.previous is not None and step.previous.error is not None:
            step.error = RuntimeError("not run: the step before it failed")
            raise step.error
        try:
            return self._run_device_side(step, t0)
        except BaseException as exc:
            step.error = exc
            raise

    def _run_device_side(self, step: _Step, t0: float) -> list[SampleResult]:
        if step.fills:
            samples = step.previous.token_ids
            step.batch.fill_last_tokens(
                [b for b, _ in step.fills], [samples[i] for _, i in step.fills]
            )
        step.previous = None  # no chain of finished steps kept alive
        logits = self.runner.forward(step.batch)
        t1 = time.perf_counter()
        pending = step.ready.result()
        masks = pending.result() if pending is not None else None
        t2 = time.perf_counter()
        results: list[SampleResult] = []
        if step.sampling:
            # logits[rows] is a fresh copy (advanced indexing) that masks may overwrite; when every
            # row samples, the forward's own logits (an inference tensor) go in unowned.
            states = [seq.sampling for seq in step.sampling]
            partial = len(step.sample_rows) < logits.shape[0]
            if partial:
                logits = logits[step.sample_rows]
            results = self.sampler.sample(logits, states, masks, owned=partial)
        step.failed = frozenset(masks.empty) if masks is not None else frozenset()
        step.token_ids = [r.token_id for r in results]
        self.timings.add_device(forward=t1 - t0, mask_wait=t2 - t1, sample=time.perf_counter() - t2)
        return results

    def _complete(self, step: _Step) -> list[SequenceDelta]:
        """Waits for ``step`` and turns its samples into deltas (detokenise, stops, finishes)."""
        try:
            if step.result is None:
                results = self._execute(step)
            else:
                t0 = time.perf_counter()
                results = step.result.result()
                self.timings.wait += time.perf_counter() - t0
        except BaseException:
            self._step_failed(step)
            raise
        start = time.perf_counter()
        if step.transfers:
            self.blocks.transfers_done(step.transfers)
        # Pages whose last token was a placeholder at launch are complete now (before a finish
        # below frees the sequence).
        page = self.blocks.page_size
        for seq, _ in step.scheduled:
            if seq.status is SequenceStatus.RUNNING and seq.num_computed_tokens // page > len(
                seq.table.hashes
            ):
                self._commit(seq)
        deltas = []
        for i, (seq, result) in enumerate(zip(step.sampling, results, strict=True)):
            seq.num_pending_tokens -= 1
            if seq.is_finished:  # aborted, or stopped at the step before (a discarded token)
                continue
            if i in step.failed:
                deltas += self._fail(seq, "guided decoding: the grammar allows no next token")
            else:
                deltas += self._advance(seq, result)
        self.timings.process += time.perf_counter() - start
        return deltas

    def _fail(self, seq: Sequence, error: str) -> list[SequenceDelta]:
        """Ends the whole request of ``seq`` with ``error`` (its other completions aborted)."""
        self.guided_stats.add(rejected_tokens=1)
        deltas = self.abort_request(seq.request_id)
        for delta in deltas:
            if delta.index == seq.index:
                delta.error = error
        return deltas

    def _advance(self, seq: Sequence, result) -> list[SequenceDelta]:
        token = result.token_id
        seq.sampling.output_token_ids.append(token)
        guide = seq.sampling.guide
        if guide is not None:
            try:
                guide.sync(seq.sampling.output_token_ids, seq.sampling.stop_token_ids)
            except GuideError as exc:
                seq.sampling.output_token_ids.pop()
                return self._fail(seq, f"guided decoding refused token {token}: {exc}")
        logprobs = []
        if result.logprob is not None:
            logprobs = [(result.logprob, result.top_logprobs or [])]
        text, reason = "", None
        if token in seq.sampling.stop_token_ids:
            reason, seq.stop_reason = FinishReason.STOP, token
        else:
            piece = seq.detokenizer.push(token)
            if guide is not None and guide.in_structure:
                update = seq.stop_checker.pass_through(piece)  # no stop inside a call / JSON
            else:
                update = seq.stop_checker.push(piece)
            text = update.text
            if update.stopped:
                reason, seq.stop_reason = FinishReason.STOP, update.stop_str
        if reason is None and (
            len(seq.output_token_ids) >= seq.max_tokens or seq.num_tokens >= self.max_model_len
        ):
            reason = FinishReason.LENGTH
        if reason is not None:
            if seq.stop_reason is None or isinstance(seq.stop_reason, int):
                text += seq.stop_checker.push(seq.detokenizer.flush()).text
                text += seq.stop_checker.flush()
            if seq.session_id is not None and self.blocks.host is not None and seq.table:
                self._remember_session(seq)
            self.scheduler.finish(seq, reason)
            self._forget_if_done(seq.request_id)
        return [self._delta(seq, [token], text, logprobs)]

    # ---- retention (host tier) ----------------------------------------------------------------
    def _remember_session(self, seq: Sequence) -> None:
        """The pages a session's latest finished sequence filled (what retention keeps)."""
        sessions = self._session_pages
        sessions[seq.session_id] = list(seq.table.hashes)
        sessions.move_to_end(seq.session_id)
        while len(sessions) > MAX_REMEMBERED_SESSIONS:
            sessions.popitem(last=False)

    def retain_session(self, session_id: str, seconds: float | None = None) -> int:
        """The session waits on a tool: keep the pages of its latest finished sequence in the
        host tier for ``seconds`` (default ``kv_retention_seconds``) — evicted from the device
        like any idle page, they stay in host memory for the session's next step. Returns the
        pages retained (0 without a host tier or a finished sequence of that session)."""
        hashes = self._session_pages.get(session_id)
        if self.blocks.host is None or not hashes:
            return 0
        ttl = self.config.kv_retention_seconds if seconds is None else seconds
        self.blocks.host.retain(hashes, time.monotonic() + ttl)
        return len(hashes)

    def release_session(self, session_id: str) -> None:
        """The session is done: its pages stop being retained at once."""
        hashes = self._session_pages.pop(session_id, None)
        if self.blocks.host is not None and hashes:
            self.blocks.host.release(hashes)

    def _forget_if_done(self, request_id: str) -> None:
        seqs = self.requests.get(request_id)
        if seqs is not None and all(s.is_finished for s in seqs):
            del self.requests[request_id]

    @staticmethod
    def _delta(
        seq: Sequence, tokens: list[int], text: str, logprobs: list | None = None
    ) -> SequenceDelta:
        finished = seq.status is SequenceStatus.FINISHED
        return SequenceDelta(
            request_id=seq.request_id,
            index=seq.index,
            token_ids=tokens,
            text=text,
            logprobs=logprobs or [],
            finished=finished,
            finish_reason=seq.finish_reason.value if finished else None,
            stop_reason=seq.stop_reason,
            num_prompt_tokens=len(seq.prompt_token_ids),
            num_cached_tokens=max(seq.num_cached_tokens, 0),
            queue_time=None if seq.first_scheduled < 0 else seq.first_scheduled - seq.arrival,
        )
