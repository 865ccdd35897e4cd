"""One completion being generated: its tokens, cache pages, sampling and output state.

A request with ``n > 1`` becomes ``n`` sequences sharing the prompt (and, through the prefix
cache, its pages). State machine: WAITING → RUNNING → FINISHED, and RUNNING → WAITING only by
preemption, which frees the pages and recomputes the prompt *and* the output so far on
re-admission (the output continues exactly where it stopped).

``session_id`` groups the requests of one client session (an agent run, a sub-agent) for
session-fair admission; see :attr:`Sequence.fairness_key` and the scheduler.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from kimi_grpc.engine.block_manager import PageTable
from kimi_grpc.engine.media_encoder import Hold, cache_keys
from kimi_grpc.engine.sampler import SamplingState
from kimi_grpc.engine.stop_checker import StopChecker
from kimi_grpc.media.request import MediaSpan
from kimi_grpc.sampling_params import SamplingParams
from kimi_grpc.tokenizer import IncrementalDetokenizer


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # eos / stop token id / stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # completion index within its request (0..n-1)
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved: params.max_tokens, capped by the context
    sampling: SamplingState
    detokenizer: IncrementalDetokenizer
    stop_checker: StopChecker
    priority: int = 0
    arrival: float = 0.0
    session_id: str | None = None  # the client session (agent run) this request belongs to
    status: SequenceStatus = SequenceStatus.WAITING
    table: PageTable | None = None
    # Tokens whose latents are in the cache, or will be once the steps in flight finish (the
    # count advances when a step is launched).
    num_computed_tokens: int = 0
    # Tokens sampled by steps still in flight (overlapped scheduling): not in output_token_ids
    # yet, but the scheduler already plans the step that computes them (their ids are filled in
    # just before that step's forward). 0 between steps of a synchronous engine.
    num_pending_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hits at first admission (-1: not admitted yet)
    first_scheduled: float = -1.0  # time.monotonic() at first admission (-1: not yet)
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    # Images / video chunks in the prompt, by position (shared by the request's n sequences).
    media: tuple[MediaSpan, ...] = ()
    # The prompt as the prefix cache keys it: token ids, media positions replaced by their
    # content keys (see media_encoder.cache_keys); the prompt list itself without media.
    prompt_cache_keys: list[int] | None = None
    # The media chunk this sequence's prefill stopped inside (content hash -> embeddings): kept
    # until the sequence passes the chunk's end (see media_encoder), freed with the sequence.
    media_hold: Hold = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.prompt_cache_keys is None:
            self.prompt_cache_keys = cache_keys(self.prompt_token_ids, self.media)

    @property
    def output_token_ids(self) -> list[int]:
        return self.sampling.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.sampling.output_token_ids)

    @property
    def num_tokens_incl_pending(self) -> int:
        """What the scheduler plans for: ``num_tokens`` plus the tokens sampled in flight."""
        return self.num_tokens + self.num_pending_tokens

    @property
    def num_known_computed_tokens(self) -> int:
        """Computed tokens whose ids are known (a step in flight may compute a pending one): what
        the prefix cache may hash and register."""
        return min(self.num_computed_tokens, self.num_tokens)

    def ends_with_pending(self) -> bool:
        """The tokens sampled in flight reach ``max_tokens`` (capped by the context): the
        sequence finishes by length when they arrive, so no step should compute them."""
        return len(self.sampling.output_token_ids) + self.num_pending_tokens >= self.max_tokens

    def token_ids(self) -> list[int]:
        """Prompt + output so far (what a re-admitted sequence recomputes)."""
        return self.prompt_token_ids + self.sampling.output_token_ids

    def cache_token_ids(self) -> list[int]:
        """What the prefix cache hashes: :meth:`token_ids` with media positions keyed by
        content (two images behind the same pad ids never share pages)."""
        return self.prompt_cache_keys + self.sampling.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """``token_ids()[start:end]`` without concatenating the whole sequence."""
        prompt, output = self.prompt_token_ids, self.sampling.output_token_ids
        p = len(prompt)
        if end <= p:
            return prompt[start:end]
        if start >= p:
            return output[start - p : end - p]
        return prompt[start:] + output[: end - p]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def fairness_key(self) -> str:
        """Whose share of the engine this sequence uses: its session, or its request without one
        (a session-less request is a session of its own)."""
        return self.session_id if self.session_id is not None else self.request_id

    def sort_key(self) -> tuple[int, int, float, int]:
        """Waiting-queue order: priority (lower first); within a priority, preempted sequences
        first (they resume work already streamed to a client and free their pages sooner); then
        arrival, then id (FCFS). Constant while the sequence waits (``num_preemptions`` only
        changes on the way into the queue), as ``bisect`` on the sorted list requires."""
        return (self.priority, 0 if self.num_preemptions else 1, self.arrival, self.seq_id)
