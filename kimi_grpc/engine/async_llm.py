"""``AsyncLLM``: the engine loop on its own thread, an asyncio front streaming per-request deltas.

The engine thread owns the engine: asyncio callers never touch it, they post commands (add,
abort) to a thread-safe queue and receive deltas on their own unbounded ``asyncio.Queue``. The
engine never waits for a consumer, so a slow stream cannot hold up another. A consumer that stops
iterating (cancellation, client disconnect, ``break``) aborts its request, which frees its pages.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from kimi_grpc.engine.llm_engine import EngineStats, LLMEngine, SequenceDelta
from kimi_grpc.guided import Constraint
from kimi_grpc.media.request import MediaSpan
from kimi_grpc.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop failed; the server must report NOT_SERVING and restart."""


class RequestFailedError(RuntimeError):
    """The engine ended this request with an error (e.g. a token its grammar refused)."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    remaining: int  # completions not finished yet (engine thread's count)
    interval: int = 1  # tokens per delivered delta (the last one of a completion may be fewer)
    # Per completion, the deltas not delivered yet (under ``interval`` tokens; engine thread).
    held: dict[int, SequenceDelta] = field(default_factory=dict)

    def hold(self, delta: SequenceDelta) -> SequenceDelta | None:
        """The delta to deliver now, or None while the completion's undelivered tokens stay
        under ``interval`` (a final or failed delta is never held)."""
        held = self.held.pop(delta.index, None)
        if held is not None:
            delta = _absorb(held, delta)
        if delta.finished or delta.error is not None or len(delta.token_ids) >= self.interval:
            return delta
        self.held[delta.index] = delta
        return None

    def put(self, item: object) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncLLM:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._stats = engine.stats()
        self.errored: BaseException | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="kimi-engine", daemon=True)
        self._thread.start()

    # ---- asyncio side ---------------------------------------------------------------------------
    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        request_id: str | None = None,
        priority: int = 0,
        session_id: str | None = None,
        constraint: Constraint | None = None,
        coalesce: bool = False,
        media: Sequence[MediaSpan] = (),
        stream_interval: int = 1,
    ) -> AsyncIterator[SequenceDelta]:
        """Streams the request's deltas until all ``params.n`` completions finish. Validation
        errors are raised here, before the first delta. ``session_id``: the client session for
        session-fair admission (see ``LLMEngine.add_request``). ``coalesce``: when the consumer
        has fallen behind, merge the deltas already queued for a completion into one (fewer,
        larger messages exactly when per-message cost is what holds the consumer back; a
        consumer that keeps up still gets one delta per token). ``constraint``: guided decoding
        (see ``LLMEngine.add_request``); a request the engine fails raises
        :class:`RequestFailedError` after its last delta. ``media``: the prompt's images / video
        chunks (see ``LLMEngine.add_request``). ``stream_interval``: hold a completion's deltas
        until they carry this many tokens (its final delta is never held)."""
        if self.errored is not None:
            raise EngineDeadError(f"engine loop failed: {self.errored!r}")
        loop = asyncio.get_running_loop()
        request_id = request_id or uuid.uuid4().hex
        stream = _Stream(loop, asyncio.Queue(), params.n, max(1, stream_interval))
        accepted = loop.create_future()
        self._commands.put(
            (
                *("add", request_id, prompt, params, priority, session_id, constraint, media),
                *(stream, accepted),
            )
        )
        remaining = params.n
        try:
            await accepted
            ready: list = []  # drained from the queue, in delivery order
            while remaining:
                if not ready:
                    ready.append(await stream.queue.get())
                    while coalesce and not stream.queue.empty():
                        ready.append(stream.queue.get_nowait())
                    if coalesce:
                        ready = _coalesce(ready)
                item = ready.pop(0)
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    remaining -= 1
                if item.error is not None:
                    raise RequestFailedError(item.error)
                yield item
        finally:
            if remaining:
                self._commands.put(("abort", request_id))

    def abort(self, request_id: str) -> None:
        """Aborts a request from any thread; its stream ends with finish_reason "abort"."""
        self._commands.put(("abort", request_id))

    def retain_session(self, session_id: str) -> None:
        """From any thread: see ``LLMEngine.retain_session`` (the session waits on a tool)."""
        self._commands.put(("retain", session_id))

    def release_session(self, session_id: str) -> None:
        """From any thread: see ``LLMEngine.release_session`` (the session is done)."""
        self._commands.put(("release", session_id))

    def stats(self) -> EngineStats:
        """A snapshot taken by the engine thread after its latest step."""
        return self._stats

    def shutdown(self) -> None:
        self._stopping = True
        self._commands.put(("stop",))
        self._thread.join(timeout=30)

    # ---- engine thread --------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping:
                idle = not self.engine.has_unfinished_requests()
                self._handle(self._commands.get() if idle else None)
                while not self._commands.empty():
                    self._handle(self._commands.get_nowait())
                if self.engine.has_unfinished_requests():
                    self._dispatch(self.engine.step())
        except BaseException as exc:  # a bug or device failure: fail every stream loudly
            logger.exception("engine loop failed")
            self.errored = exc
            for stream in self._streams.values():
                stream.put(EngineDeadError(f"engine loop failed: {exc!r}"))
            self._streams.clear()

    def _handle(self, command: tuple | None) -> None:
        if command is None or command[0] == "stop":
            return
        if command[0] == "retain":
            self.engine.retain_session(command[1])
            return
        if command[0] == "release":
            self.engine.release_session(command[1])
            return
        if command[0] == "abort":
            self._dispatch(self.engine.abort_request(command[1]))
            return
        _, request_id, prompt, params, priority, session_id, constraint, media, stream, accepted = (
            command
        )
        try:
            self.engine.add_request(
                request_id,
                prompt,
                params,
                priority=priority,
                session_id=session_id,
                constraint=constraint,
                media=media,
            )
        except Exception as exc:  # validation / overload: the caller's error, not the engine's
            stream.loop.call_soon_threadsafe(_settle, accepted, exc)
            return
        self._streams[request_id] = stream
        stream.loop.call_soon_threadsafe(_settle, accepted, None)

    def _dispatch(self, deltas: list[SequenceDelta]) -> None:
        # Stats first: a client that sees its final delta then reads stats sees its pages freed.
        self._stats = self.engine.stats()
        # One wake-up per event loop per step (not one per delta): at 64 streams this is most of
        # the cross-thread cost.
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        for delta in deltas:
            stream = self._streams.get(delta.request_id)
            if stream is None:
                continue
            if stream.interval > 1 and (delta := stream.hold(delta)) is None:
                continue  # held: fewer wake-ups of the consumer, not just fewer messages
            batches.setdefault(stream.loop, []).append((stream.queue, delta))
            if delta.finished:
                stream.remaining -= 1
                if stream.remaining == 0:
                    del self._streams[delta.request_id]
        for loop, batch in batches.items():
            loop.call_soon_threadsafe(_deliver, batch)


def _coalesce(items: list) -> list:
    """One delta per completion index (in order of first appearance) for the deltas before any
    error; an error keeps its place after them."""
    merged: dict[int, SequenceDelta] = {}
    out: list = []
    for item in items:
        if isinstance(item, BaseException):
            out += [*merged.values(), item]
            merged.clear()
        elif item.index in merged:
            merged[item.index] = _absorb(merged[item.index], item)
        else:
            merged[item.index] = item
    return out + list(merged.values())


def _absorb(held: SequenceDelta, later: SequenceDelta) -> SequenceDelta:
    """``held`` extended in place by the next delta of the same completion, taking the later
    one's end state. Safe in place: a delta belongs to one stream and is merged before anyone
    else reads it (the engine thread's held deltas, a consumer's queued ones)."""
    held.token_ids += later.token_ids
    held.text += later.text
    held.logprobs += later.logprobs
    held.finished, held.finish_reason = later.finished, later.finish_reason
    held.stop_reason, held.error = later.stop_reason, held.error or later.error
    held.num_cached_tokens = later.num_cached_tokens
    if held.queue_time is None:
        held.queue_time = later.queue_time
    return held


def _deliver(batch: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in batch:
        q.put_nowait(item)


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
