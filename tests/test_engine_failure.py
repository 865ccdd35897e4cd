"""A forward that fails mid-stream (a device error) with the device thread of overlapped
scheduling: every open stream ends with a clear status within a second, health turns
NOT_SERVING, new calls are refused — in both scheduling modes. The server runs in this process so
the failure can be injected into its engine."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kimi_grpc.client import generate_request
from kimi_grpc.proto import inference_pb2_grpc as pb_grpc
from kimi_grpc.server.app import Server, ServerConfig

pytestmark = pytest.mark.usefixtures("scheduling_mode")

STREAMS = 4
DEADLINE_S = 1.0  # from the failure to every stream's end, and to NOT_SERVING


def fail_forward(batch):
    raise RuntimeError("injected device failure")


async def scenario() -> tuple[list[grpc.StatusCode], float, int, grpc.StatusCode]:
    config = ServerConfig(
        port=0,
        dtype="float32",
        engine_args={"kv_cache_memory": 16 << 20},
        stub_forward_seconds=0.01,
    )
    server = Server(config)
    await server.start()
    await server.load()
    engine = server.runtime.model.engine
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            params = {"max_tokens": 2000, "ignore_eos": True}
            calls = [stub.Generate(generate_request([100 + k] * 8, params)) for k in range(STREAMS)]
            for call in calls:
                await call.read()  # every stream is producing tokens
            engine.runner.forward = fail_forward
            start = time.monotonic()

            async def ending(call) -> grpc.StatusCode:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    while await call.read() is not grpc.aio.EOF:
                        pass
                return err.value.code()

            # A hang fails here (after 10 s) instead of hanging the suite.
            codes = await asyncio.wait_for(asyncio.gather(*map(ending, calls)), 10)
            ended = time.monotonic() - start
            health = health_pb2_grpc.HealthStub(channel)
            status = None
            while time.monotonic() - start < DEADLINE_S:
                status = (await health.Check(health_pb2.HealthCheckRequest())).status
                if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                await asyncio.sleep(0.05)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Generate(generate_request([5] * 4, {"max_tokens": 2})).read()
            return codes, ended, status, refused.value.code()
    finally:
        await server.server.stop(grace=0)


def test_a_failing_forward_ends_every_stream_and_health_within_a_second() -> None:
    codes, ended, status, refused = asyncio.run(scenario())
    assert set(codes) <= {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE}, codes
    assert ended < DEADLINE_S
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert refused == grpc.StatusCode.UNAVAILABLE
