"""SIGTERM drain and bearer-token auth against real server processes."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from kimi_grpc.client import KimiClient
from kimi_grpc.server.auth import ApiKeys, BearerAuthInterceptor, load_api_keys
from tests.server_harness import running_server

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_sigterm_drains_in_flight_streams_refuses_new_calls_and_exits() -> None:
    with running_server("--drain-timeout", "60") as srv:
        client = KimiClient(srv.target)
        tokens: list[int] = []
        finals = []

        def consume() -> None:
            for response in client.generate("drain me", {"max_tokens": 64, "ignore_eos": True}):
                if response.HasField("final"):
                    finals.append(response.final)
                else:
                    tokens.extend(response.delta.token_ids)

        reader = threading.Thread(target=consume)
        reader.start()
        while not tokens:
            time.sleep(0.01)
        srv.proc.send_signal(signal.SIGTERM)
        srv.wait_for("draining")
        assert srv.health() == NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            client.generate_result("too late", {"max_tokens": 2})
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        reader.join(timeout=60)
        assert len(tokens) == 64 and finals[0].usage.completion_tokens == 64
        assert srv.proc.wait(timeout=30) == 0
        client.close()


def test_drain_timeout_aborts_what_is_left() -> None:
    with running_server("--drain-timeout", "0.5") as srv:
        client = KimiClient(srv.target)
        stream = client.generate("long", {"max_tokens": 2000, "ignore_eos": True})
        next(stream)
        srv.proc.send_signal(signal.SIGTERM)
        finals = [r.final for r in stream if r.HasField("final")]
        assert finals and finals[0].usage.completion_tokens < 2000
        assert srv.proc.wait(timeout=30) == 0
        client.close()


def test_bearer_auth(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# operators\nsecret-one\n\nsecret-two\n")
    with running_server("--api-key-file", str(keys)) as srv:
        for key in (None, "wrong", "secret-on", "secret-one2"):
            with KimiClient(srv.target, api_key=key) as c:
                with pytest.raises(grpc.RpcError) as err:
                    c.model_info()
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.RpcError) as err:  # streaming RPCs too
                    c.generate_result("x", {"max_tokens": 1})
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        for key in ("secret-one", "secret-two"):
            with KimiClient(srv.target, api_key=key) as c:
                assert c.generate_result("x", {"max_tokens": 2}).final.usage.completion_tokens == 2
        assert srv.health() == health_pb2.HealthCheckResponse.SERVING  # probes need no token


def test_auth_helpers(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="holds no key"):
        load_api_keys(empty)
    auth = BearerAuthInterceptor(ApiKeys(["k1"]))
    assert auth.authorized((("authorization", "Bearer k1"),))
    assert not auth.authorized((("authorization", "bearer k1"),))
    assert not auth.authorized((("authorization", "Bearer k1 "),))
    assert not auth.authorized((("x-api-key", "k1"),))
    assert not auth.authorized(None)


def test_tls(tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    with running_server("--tls-cert", str(cert), "--tls-key", str(key)) as srv:
        with KimiClient(srv.target, tls=str(cert)) as c:
            assert c.generate_result("x", {"max_tokens": 2}).final.usage.completion_tokens == 2
        with KimiClient(srv.target) as plain, pytest.raises(grpc.RpcError) as err:
            plain.model_info()  # a plaintext client cannot talk to the TLS port
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
