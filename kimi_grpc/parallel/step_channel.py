"""Rank 0 tells the other ranks what to compute: one broadcast of a ``step_codec`` message per
engine step on the gloo control group, plus a heartbeat while idle.

The sender holds one lock from a step's broadcast to the end of its forward, so a heartbeat can
never slip between a step's message and the collectives of its layers: every rank sees the same
sequence of collectives. Idle workers wait on the next header; the heartbeat keeps that wait far
below the control group's timeout while rank 0 lives, and its failure is how rank 0 notices a
lost remote rank.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from kimi_grpc.model.forward_batch import ForwardBatch
from kimi_grpc.parallel.step_codec import (
    HEADER_LEN,
    Op,
    StepFormatError,
    StepMessage,
    decode,
    decode_header,
    encode,
)

logger = logging.getLogger(__name__)


class StepSender:
    """Rank 0's end. ``on_failure(message)`` is called (once) when a heartbeat fails."""

    def __init__(
        self, group: object, heartbeat_interval: float, on_failure: Callable[[str], None]
    ) -> None:
        self.group = group
        self.interval = heartbeat_interval
        self.on_failure = on_failure
        self.comm_seconds = 0.0  # time spent broadcasting step messages (bench/tp.py reads it)
        self._lock = threading.Lock()
        self._seq = 0
        self._last_send = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name="kimi-tp-heartbeat")
        self._thread.daemon = True
        self._thread.start()

    @contextmanager
    def step(self, batch: ForwardBatch) -> Iterator[None]:
        """Broadcasts ``batch``; the caller runs its forward inside the block."""
        message = StepMessage(
            Op.STEP,
            token_ids=batch.new_token_ids,
            context_lens=batch.context_lens_host,
            block_tables=batch.block_tables_host,
            page_size=batch.page_size,
            media_rows=list(batch.media_rows_host),
            kv_saves=list(batch.kv_saves),
            kv_loads=list(batch.kv_loads),
        )
        with self._lock:
            start = time.perf_counter()
            self._send(message)
            self.comm_seconds += time.perf_counter() - start
            yield

    def shutdown(self) -> None:
        """Stops the heartbeat and tells the workers to exit (best effort)."""
        self._stop.set()
        self._thread.join(timeout=self.interval + 1)
        with self._lock:
            try:
                self._send(StepMessage(Op.SHUTDOWN))
            except RuntimeError as exc:
                logger.warning("could not send SHUTDOWN to the workers: %s", exc)

    def _send(self, message: StepMessage) -> None:
        header, payload = encode(dataclasses.replace(message, seq=self._seq))
        self._seq += 1
        dist.broadcast(header, src=0, group=self.group)
        if payload is not None:
            dist.broadcast(payload, src=0, group=self.group)
        self._last_send = time.monotonic()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.interval / 2):
            with self._lock:
                if self._stop.is_set() or time.monotonic() - self._last_send < self.interval:
                    continue
                try:
                    self._send(StepMessage(Op.HEARTBEAT))
                except RuntimeError as exc:
                    self.on_failure(f"heartbeat to the tensor-parallel workers failed: {exc}")
                    return


class StepReceiver:
    """A worker's end: ``recv()`` blocks for rank 0's next message (control-group timeout)."""

    def __init__(self, group: object) -> None:
        self.group = group
        self._seq = 0

    def recv(self) -> StepMessage:
        header_t = torch.empty(HEADER_LEN, dtype=torch.int64)
        dist.broadcast(header_t, src=0, group=self.group)
        header = decode_header(header_t)
        if header.seq != self._seq:
            raise StepFormatError(f"expected step message {self._seq}, got {header.seq}")
        self._seq += 1
        payload = None
        if header.op is Op.STEP:
            payload = torch.empty(header.payload_len, dtype=torch.int64)
            dist.broadcast(payload, src=0, group=self.group)
        return decode(header, payload)
