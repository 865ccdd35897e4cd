"""Starts a real ``kimi-grpc serve`` process on localhost (demo checkpoint, CPU) for tests."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

START_TIMEOUT_S = 120.0


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    target: str
    lines: list[str] = field(default_factory=list)  # stdout + stderr so far
    _queue: queue.Queue = field(default_factory=queue.Queue)

    def wait_for(self, text: str, timeout: float = START_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout
        for line in self.lines:
            if text in line:
                return line
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None and self._queue.empty():
                    break
                continue
            if text in line:
                return line
        raise AssertionError(f"server never printed {text!r}; output:\n" + "".join(self.lines))

    @property
    def http_base(self) -> str:
        """``http://host:port/v1`` of the OpenAI-compatible API (started with --http-port)."""
        line = self.wait_for("kimi-grpc HTTP API on", timeout=5)
        return f"http://{line.split('HTTP API on', 1)[1].strip()}/v1"

    def health(self, service: str = "") -> int:
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def terminate(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def _pump(proc: subprocess.Popen, server: ServerProcess) -> None:
    for line in proc.stdout:
        server.lines.append(line)
        server._queue.put(line)


def start_server(*args: str, wait_ready: bool = True) -> ServerProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "kimi_grpc.cli", "serve", "--port", "0", *args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    server = ServerProcess(proc, target="")
    threading.Thread(target=_pump, args=(proc, server), daemon=True).start()
    line = server.wait_for("kimi-grpc listening on")
    server.target = line.split("listening on", 1)[1].strip()
    if wait_ready:
        server.wait_for("kimi-grpc serving on")
    return server


@contextmanager
def running_server(*args: str, wait_ready: bool = True) -> Iterator[ServerProcess]:
    server = start_server(*args, wait_ready=wait_ready)
    try:
        yield server
    finally:
        server.terminate()
