"""The worker processes one node starts for its local ranks, and the thread that watches them.

Each worker is ``python -m kimi_grpc.parallel.worker`` with a pipe as stdin: the parent never
writes to it, so when the parent dies — however it dies — the worker reads EOF and exits. A
worker that exits while the node is not stopping is a failure: ``on_failure`` gets one line
naming the rank, its pid and how it ended.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from kimi_grpc.parallel.worker import WorkerSpec

POLL_S = 0.2


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


class LocalWorkers:
    def __init__(
        self, spec: WorkerSpec, ranks: list[int], on_failure: Callable[[str], None]
    ) -> None:
        self.ranks = ranks
        self.on_failure = on_failure
        self._stopping = threading.Event()
        self.procs: list[subprocess.Popen] = []
        try:
            for rank in ranks:
                cmd = [sys.executable, "-m", "kimi_grpc.parallel.worker", "--rank", str(rank)]
                self.procs.append(
                    subprocess.Popen([*cmd, "--spec", spec.to_json()], stdin=subprocess.PIPE)
                )
        except BaseException:
            self.kill()
            raise
        self._monitor = threading.Thread(target=self._watch, name="kimi-tp-workers", daemon=True)
        self._monitor.start()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _watch(self) -> None:
        while not self._stopping.wait(POLL_S):
            dead = self.first_dead()
            if dead is not None and not self._stopping.is_set():
                self.on_failure(dead)
                return

    def first_dead(self, wait: float = 0.0) -> str | None:
        """Which worker exited (waiting up to ``wait`` s for one to), or None."""
        deadline = time.monotonic() + wait
        while True:
            for rank, proc in zip(self.ranks, self.procs, strict=True):
                code = proc.poll()
                if code is not None:
                    return (
                        f"tensor-parallel worker rank {rank} (pid {proc.pid}) exited with "
                        f"{describe_exit(code)}"
                    )
            if time.monotonic() >= deadline:
                return None
            time.sleep(POLL_S / 4)

    def stop(self, timeout: float = 15.0) -> None:
        """After SHUTDOWN was sent: waits for every worker, then cuts the pipes and kills."""
        self._stopping.set()
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        self.kill()

    def kill(self) -> None:
        """Ends every worker now (closing the pipe first lets them log why)."""
        self._stopping.set()
        for proc in self.procs:
            if proc.stdin is not None and not proc.stdin.closed:
                proc.stdin.close()
        deadline = time.monotonic() + 2.0
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
