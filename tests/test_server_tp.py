"""``kimi-grpc serve --tensor-parallel-size 2`` on the CPU: same answers as one process, and a
lost worker takes the whole server down (NOT_SERVING, non-zero exit) instead of hanging it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from kimi_grpc.client import KimiClient
from kimi_grpc.parallel.distributed import free_port
from tests.server_harness import ServerProcess, running_server

ARGS = ("--kv-cache-memory", str(16 * 1024**2), "--max-model-len", "512")
FAIL_DEADLINE_S = 30.0
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]


def answers(server: ServerProcess) -> list:
    with KimiClient(server.target) as client:
        out = []
        for prompt in ("Tensor parallel", [5, 6, 7, 8] * 10):
            result = client.generate_result(
                prompt, {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
            )
            out.append((result.token_ids, result.text, result.final.finish_reason))
        for mode in ("instant", "thinking"):
            step = client.agent_step_result(
                MESSAGES, mode=mode, params={"max_tokens": 16, "temperature": 0.0}
            )
            msg = step.final.message
            out.append((step.token_ids, msg.content, msg.reasoning_content, step.final.usage))
        return out


@pytest.fixture(scope="module")
def single_answers() -> list:
    with running_server(*ARGS) as srv:
        return answers(srv)


@pytest.mark.parametrize("moe", ["tp", "ep"])
def test_tp2_server_answers_like_one_process(single_answers, moe) -> None:
    with running_server(*ARGS, "--tensor-parallel-size", "2", "--moe-parallel", moe) as srv:
        srv.wait_for("tensor parallel x2")
        assert answers(srv) == single_answers
        assert srv.terminate() == 0
        assert "rank 1: shut down" in "".join(srv.lines)


def test_two_nodes_on_loopback_answer_like_one_process(single_answers) -> None:
    """``--nnodes 2``: node 1 hosts rank 1 (no gRPC server) and exits 0 when rank 0 stops."""
    layout = ("-tp", "2", "--nnodes", "2", "--master-addr", "127.0.0.1")
    layout += ("--master-port", str(free_port()))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "kimi_grpc.cli", "serve", *ARGS, *layout, "--node-rank", "1"]
    node1 = subprocess.Popen(cmd, env=env)
    try:
        with running_server(*ARGS, *layout, "--node-rank", "0") as srv:
            assert answers(srv) == single_answers
        assert node1.wait(timeout=FAIL_DEADLINE_S) == 0
    finally:
        if node1.poll() is None:
            node1.kill()
            node1.wait()


def worker_pid(srv: ServerProcess) -> int:
    return int(srv.wait_for("started tensor-parallel worker rank 1: pid").rsplit("pid", 1)[1])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_killed_worker_mid_stream_brings_the_server_down() -> None:
    with running_server(*ARGS, "--tensor-parallel-size", "2") as srv:
        pid = worker_pid(srv)
        assert srv.health() == health_pb2.HealthCheckResponse.SERVING
        client = KimiClient(srv.target)
        stream = client.generate("long", {"max_tokens": 400, "ignore_eos": True})
        next(stream)  # a step is in flight on both ranks
        os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError):  # the stream ends with an error, not a hang
            for _ in stream:
                pass
        try:  # NOT_SERVING while it goes down, or already gone
            assert srv.health() == health_pb2.HealthCheckResponse.NOT_SERVING
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert srv.proc.wait(timeout=FAIL_DEADLINE_S) != 0
        assert time.monotonic() - start < FAIL_DEADLINE_S
        srv.wait_for(f"worker rank 1 (pid {pid}) exited with signal SIGKILL", timeout=1)
        client.close()


def test_worker_exits_when_the_server_is_killed() -> None:
    with running_server(*ARGS, "--tensor-parallel-size", "2") as srv:
        pid = worker_pid(srv)
        srv.proc.kill()
        deadline = time.monotonic() + FAIL_DEADLINE_S
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_alive(pid), "an orphaned worker outlived rank 0"


def test_hung_worker_times_out_instead_of_hanging() -> None:
    timeout = 3.0
    args = (*ARGS, "--tensor-parallel-size", "2", "--collective-timeout", str(timeout))
    with running_server(*args) as srv:
        pid = worker_pid(srv)
        os.kill(pid, signal.SIGSTOP)  # alive but never answers: only a timeout can tell
        try:
            start = time.monotonic()
            with KimiClient(srv.target) as client, pytest.raises(grpc.RpcError):
                client.generate_result("stuck", {"max_tokens": 4}, timeout=FAIL_DEADLINE_S)
            assert srv.proc.wait(timeout=FAIL_DEADLINE_S) != 0
            assert time.monotonic() - start < FAIL_DEADLINE_S
        finally:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
