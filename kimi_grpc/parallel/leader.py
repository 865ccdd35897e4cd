"""Rank 0's side of tensor parallelism: it starts this node's workers, joins the process groups,
broadcasts every step, watches the workers, and shuts them down.

A failure — a worker process exits, a heartbeat or a step's collective fails — is recorded once
(``failure``, one log line) and reported to the registered callbacks (the server turns it into
NOT_SERVING and a non-zero exit). Later steps raise :class:`ParallelFailure` at once instead of
waiting for a collective's timeout.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

from kimi_grpc.model.forward_batch import ForwardBatch
from kimi_grpc.parallel.distributed import (
    RankGroups,
    agree_after_load,
    destroy_groups,
    init_groups,
)
from kimi_grpc.parallel.step_channel import StepSender
from kimi_grpc.parallel.worker import WorkerSpec, split_cpu_threads
from kimi_grpc.parallel.worker_procs import LocalWorkers

logger = logging.getLogger("kimi_grpc.parallel")
T = TypeVar("T")
DEAD_WORKER_GRACE_S = 1.0  # after a failed collective, how long to look for a dead worker


class ParallelFailure(RuntimeError):
    """A tensor-parallel rank is gone; this process cannot compute any more steps."""


class Leader:
    def __init__(self, spec: WorkerSpec, device: torch.device) -> None:
        pcfg = spec.parallel
        self.config = pcfg
        self.failure: str | None = None
        self.weight_bytes: list[int] = []  # per rank, after agree_num_pages
        self._callbacks: list[Callable[[str], None]] = []
        self._fail_lock = threading.Lock()
        self._failed = threading.Event()
        self._threads = torch.get_num_threads()  # restored at shutdown (an LLM in a user process)
        split_cpu_threads(device.type, pcfg.local_size)
        self.workers = LocalWorkers(spec, list(range(1, pcfg.local_size)), self.fail)
        for rank, pid in zip(self.workers.ranks, self.workers.pids, strict=True):
            logger.info("started tensor-parallel worker rank %d: pid %d", rank, pid)
        try:
            self.groups: RankGroups = self._unless_failed(lambda: init_groups(pcfg, 0, device))
        except BaseException:
            self.workers.kill()
            torch.set_num_threads(self._threads)
            raise
        self.sender = StepSender(self.groups.control, pcfg.heartbeat_s, self.fail)
        self._shut_down = False
        atexit.register(self.shutdown)

    def _unless_failed(self, wait: Callable[[], T]) -> T:
        """Runs a start-up collective (rendezvous, post-load agreement: up to the startup timeout)
        on a helper thread, so that a worker dying meanwhile fails the start-up at once instead of
        leaving rank 0 waiting for a rank that will never come."""
        result: list = []

        def run() -> None:
            try:
                result.append((True, wait()))
            except BaseException as exc:
                result.append((False, exc))
            done.set()

        done = threading.Event()
        threading.Thread(target=run, name="kimi-tp-startup", daemon=True).start()
        while not done.wait(0.1):
            if self._failed.is_set():
                raise ParallelFailure(self.failure)
        ok, value = result[0]
        if not ok:
            raise value
        return value

    @property
    def ctx(self):
        return self.groups.ctx

    def on_failure(self, callback: Callable[[str], None]) -> None:
        """Calls ``callback(message)`` on the first failure (at once if one already happened)."""
        with self._fail_lock:
            self._callbacks.append(callback)
            failure = self.failure
        if failure is not None:
            callback(failure)

    def fail(self, message: str) -> None:
        with self._fail_lock:
            if self.failure is not None:
                return
            self.failure = message
            self._failed.set()
            callbacks = list(self._callbacks)
        logger.error("%s: the server cannot continue", message)
        for callback in callbacks:
            callback(message)

    def agree_num_pages(self, local_pages: int, weight_bytes: int) -> int:
        """Rank 0's ``AgreePages`` (``parallel.executor``): waits for every rank's load; the KV
        pages all of them hold. Logs the per-rank weights."""
        num_pages, self.weight_bytes = self._unless_failed(
            lambda: agree_after_load(local_pages, weight_bytes)
        )
        per_rank = ", ".join(f"{b / 1e6:.1f}" for b in self.weight_bytes)
        logger.info(
            "tensor parallel x%d (moe %s): weights per rank [%s] MB; %d KV pages on every rank",
            self.config.tensor_parallel_size,
            self.config.moe_parallel,
            per_rank,
            num_pages,
        )
        return num_pages

    @contextmanager
    def step(self, batch: ForwardBatch) -> Iterator[None]:
        if self.failure is not None:
            raise ParallelFailure(self.failure)
        try:
            with self.sender.step(batch):
                yield
        except Exception as exc:  # the ranks are out of step now: nothing can continue
            if not isinstance(exc, ParallelFailure):
                # A dead local worker is the likely cause; name it rather than the socket error.
                dead = self.workers.first_dead(wait=DEAD_WORKER_GRACE_S)
                cause = f"a step failed: {type(exc).__name__}: {exc}"
                self.fail(f"{dead} ({cause})" if dead else f"tensor-parallel {cause}")
            raise ParallelFailure(self.failure or str(exc)) from exc

    def shutdown(self) -> None:
        """SHUTDOWN to the workers, wait for them (bounded), leave the groups. Idempotent; also
        runs at interpreter exit for an ``LLM`` its user never shut down."""
        if self._shut_down:
            return
        self._shut_down = True
        atexit.unregister(self.shutdown)
        torch.set_num_threads(self._threads)
        if self.failure is None:
            self.sender.shutdown()
            self.workers.stop()
            destroy_groups()
        else:
            self.workers.kill()
