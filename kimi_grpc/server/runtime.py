"""What the RPC handlers share: the loaded model, admission control, in-flight ids, drain state.

Admission is decided here, in the event loop, before anything reaches the engine: a call is
refused UNAVAILABLE while the model loads or the server drains, and RESOURCE_EXHAUSTED once
``max_num_seqs + max_queued_requests`` sequences are in flight. Counting at the front (not in the
engine's queue, which the engine thread drains in batches) makes the refusal exact and immediate:
with one running slot and one queue slot, ten simultaneous calls give two streams and eight
RESOURCE_EXHAUSTED, every time.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

from kimi_grpc.chat import ChatRenderer
from kimi_grpc.engine.async_llm import AsyncLLM
from kimi_grpc.engine.llm_engine import LLMEngine
from kimi_grpc.media import MediaConfig, MediaLimits
from kimi_grpc.server.errors import ServiceError, overloaded, unavailable
from kimi_grpc.server.metrics import ServerMetrics
from kimi_grpc.tokenizer import KimiTokenizer

T = TypeVar("T")
MAX_REQUEST_ID_CHARS = 256
# Requests whose media are being decoded at once (the rest queue). Each decode already uses
# FFmpeg's threads (one per core) for video, so a few in parallel saturate the host; a separate
# pool keeps text requests' rendering from queueing behind multi-second video decodes.
MEDIA_WORKERS = 4


@dataclass
class Call:
    """One in-flight call. ``aborted`` is set by the Abort RPC so a multi-phase AgentStep does not
    start its next phase after the current one was aborted."""

    done: asyncio.Event
    aborted: bool = False


@dataclass
class LoadedModel:
    engine: LLMEngine
    llm: AsyncLLM
    tokenizer: KimiTokenizer
    chat: ChatRenderer
    name: str
    # Images and video: the checkpoint's media_proc_cfg and the server's limits (None: the
    # checkpoint has no vision tower and media parts are refused).
    media_config: MediaConfig | None = None
    media_limits: MediaLimits | None = None


class Runtime:
    def __init__(self, *, max_queued_requests: int, stream_interval: int = 1) -> None:
        self.model: LoadedModel | None = None
        self.max_queued_requests = max_queued_requests
        self.stream_interval = stream_interval  # tokens per delta message unless a call says
        self.started = time.monotonic()
        self.draining = False
        self.inflight_seqs = 0
        self.inflight: dict[str, Call] = {}
        self.metrics: ServerMetrics | None = None
        self.media_pool = ThreadPoolExecutor(MEDIA_WORKERS, thread_name_prefix="kimi-media")

    async def run_blocking(self, fn: Callable[[], T], media: bool) -> T:
        """``fn()`` off the event loop: in the media pool when the request carries images or
        video, else in the default pool."""
        return await asyncio.get_running_loop().run_in_executor(
            self.media_pool if media else None, fn
        )

    @property
    def max_inflight_seqs(self) -> int:
        assert self.model is not None
        return self.model.engine.config.max_num_seqs + self.max_queued_requests

    def attach(self, model: LoadedModel) -> None:
        self.model = model
        self.metrics = ServerMetrics(model.llm.stats, model.engine.guided_stats)

    def ready(self) -> LoadedModel:
        """The model, or UNAVAILABLE while loading / draining / after an engine failure."""
        if self.draining:
            raise unavailable("the server is shutting down; retry on another replica")
        if self.model is None:
            raise unavailable("the model is still loading; retry shortly")
        if self.model.llm.errored is not None:
            raise unavailable("the engine failed; the server is restarting")
        return self.model

    @asynccontextmanager
    async def admit(self, request_id: str, num_seqs: int) -> AsyncIterator[tuple[str, Call]]:
        """Reserves ``num_seqs`` sequence slots and the request id for the duration of a call."""
        self.ready()
        check_id("request_id", request_id)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.inflight:
            raise ServiceError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"request_id {request_id!r} is already in flight",
                field="request_id",
            )
        if self.inflight_seqs + num_seqs > self.max_inflight_seqs:
            raise overloaded(
                f"the server is at capacity ({self.inflight_seqs} sequences in flight, limit "
                f"{self.max_inflight_seqs}); retry later"
            )
        self.inflight_seqs += num_seqs
        call = self.inflight[request_id] = Call(asyncio.Event())
        try:
            yield request_id, call
        finally:
            self.inflight_seqs -= num_seqs
            del self.inflight[request_id]
            call.done.set()

    def abort(self, request_ids: list[str]) -> list[str]:
        """Aborts the in-flight ones; returns them."""
        found = [r for r in dict.fromkeys(request_ids) if r in self.inflight]
        if self.model is not None:
            for request_id in found:
                self.inflight[request_id].aborted = True
                self.model.llm.abort(request_id)
        return found

    async def wait_idle(self, timeout: float) -> bool:
        """Waits until no call is in flight (drain); False when ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        while self.inflight:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            events = [asyncio.ensure_future(c.done.wait()) for c in self.inflight.values()]
            await asyncio.wait(events, timeout=left)
            for event in events:
                event.cancel()
        return True


def check_id(field: str, value: str) -> None:
    """request_id / session_id: at most MAX_REQUEST_ID_CHARS characters."""
    if len(value) > MAX_REQUEST_ID_CHARS:
        raise ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{field}: longer than {MAX_REQUEST_ID_CHARS} characters",
            field=field,
        )


def model_name(path: Path | None, requested: str | None) -> str:
    return requested or (str(path) if path else "kimi-grpc-demo")
