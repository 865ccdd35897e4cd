"""``kimi-grpc serve``: start listening at once, load and warm the model, serve, drain on SIGTERM.

With ``--http-port`` the OpenAI-compatible HTTP API (``kimi_grpc.http``) listens in the same event
loop and follows the same lifecycle (``GET /health``: 200 when SERVING, else 503).

Lifecycle and what health reports (``grpc.health.v1``, service "" and "kimi.v1.InferenceService"):
  listening, loading weights   NOT_SERVING   (inference RPCs: UNAVAILABLE "still loading")
  warm-up generation passed    SERVING
  SIGTERM / SIGINT             NOT_SERVING at once; new calls UNAVAILABLE; in-flight streams run
                               to completion for up to ``drain_timeout`` s, then are aborted;
                               the process exits 0.
  engine failure               NOT_SERVING; calls UNAVAILABLE (Kubernetes restarts the pod)
  tensor-parallel failure      (a worker rank died, a collective failed or timed out, a GPU stopped
                               answering) NOT_SERVING at once, in-flight calls aborted, the
                               process exits 1 within a few seconds (``ServerFailed``)
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kimi_grpc.engine.async_llm import AsyncLLM
from kimi_grpc.engine.llm import load_engine
from kimi_grpc.engine.stub_forward import use_stub_forward
from kimi_grpc.http.app import HttpApi, HttpServer
from kimi_grpc.media import MediaLimits
from kimi_grpc.media.request import load_chat
from kimi_grpc.parallel.devices import device_alive
from kimi_grpc.parallel.distributed import ParallelConfig
from kimi_grpc.sampling_params import SamplingParams
from kimi_grpc.server.auth import ApiKeys, BearerAuthInterceptor, load_api_keys
from kimi_grpc.server.runtime import LoadedModel, Runtime, model_name
from kimi_grpc.server.servicer import SERVICE_NAME, InferenceServicer, add_inference_service

logger = logging.getLogger("kimi_grpc.server")

MIB = 1024 * 1024
FATAL_EXIT_DEADLINE_S = 10.0  # a failed tensor-parallel server is gone within this
DEVICE_CHECK_INTERVAL_S = 5.0


class ServerFailed(RuntimeError):
    """The server cannot continue (a lost rank); the process must exit non-zero."""


@dataclass
class ServerConfig:
    model: str | None = None  # path or hub id; None = the built-in demo checkpoint
    revision: str | None = None
    host: str = "127.0.0.1"
    port: int = 50051  # 0 = pick a free port (printed at start)
    device: str = "cpu"
    dtype: str = "auto"
    max_queued_requests: int = 256  # beyond max_num_seqs running; then RESOURCE_EXHAUSTED
    api_key_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"
    http_port: int | None = None  # the OpenAI-compatible HTTP API (same host); None = off
    served_model_names: tuple[str, ...] = ()  # extra names the HTTP API accepts
    drain_timeout: float = 30.0  # seconds in-flight streams get after SIGTERM
    # Receive limit (gRPC messages and HTTP bodies). 64 MiB: ~12M token ids, or a ~2.5-minute
    # 1080p H.264 clip inline (~3.5 Mbit/s); gRPC's own ceiling is 2 GiB - 1.
    max_message_bytes: int = 64 * MIB
    reflection: bool = True
    media_limits: MediaLimits = field(default_factory=MediaLimits)  # per-request media caps
    engine_args: dict[str, Any] = field(default_factory=dict)  # EngineConfig fields
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # TP layout (rank 0 here)
    # Tokens per streamed delta message (Generate's stream_interval overrides; AgentStep and the
    # HTTP API use this). 1: every token its own message.
    stream_interval: int = 1
    # Benchmarks only (bench/serving_path.py): the model's forward replaced by a wait of this
    # many seconds (engine/stub_forward.py); the tokens streamed are meaningless. None: off.
    stub_forward_seconds: float | None = None


def grpc_options(config: ServerConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # Long streams: ping idle connections every 60 s to find dead peers, and tolerate client
        # pings down to every 10 s (gRPC's default 5 min makes eager clients get GOAWAY).
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_concurrent_streams", 4096),
    ]


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        if config.stream_interval < 1:
            raise ValueError(f"--stream-interval must be >= 1, got {config.stream_interval}")
        self.runtime = Runtime(
            max_queued_requests=config.max_queued_requests, stream_interval=config.stream_interval
        )
        self.health = health.aio.HealthServicer()
        keys = ApiKeys(load_api_keys(config.api_key_file)) if config.api_key_file else None
        interceptors = [BearerAuthInterceptor(keys)] if keys is not None else []
        self.server = grpc.aio.server(options=grpc_options(config), interceptors=interceptors)
        servicer = InferenceServicer(self.runtime)
        add_inference_service(self.server, servicer)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if config.reflection:
            names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, self.server)
        self.port = self._bind()
        self.http: HttpServer | None = None
        if config.http_port is not None:
            api = HttpApi(
                self.runtime,
                servicer,
                keys=keys,
                aliases=config.served_model_names,
                max_body_bytes=config.max_message_bytes,
            )
            self.http = HttpServer(
                api, config.host, config.http_port, tls_cert=config.tls_cert, tls_key=config.tls_key
            )
        self._stopped = asyncio.Event()
        self._watcher: asyncio.Task | None = None
        self.failure: str | None = None
        self._fatal_task: asyncio.Future | None = None

    def _bind(self) -> int:
        address = f"{self.config.host}:{self.config.port}"
        if self.config.tls_cert or self.config.tls_key:
            if not (self.config.tls_cert and self.config.tls_key):
                raise ValueError("--tls-cert and --tls-key go together")
            with open(self.config.tls_key, "rb") as f:
                key = f.read()
            with open(self.config.tls_cert, "rb") as f:
                cert = f.read()
            creds = grpc.ssl_server_credentials([(key, cert)])
            port = self.server.add_secure_port(address, creds)
        else:
            port = self.server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        return port

    async def _set_health(self, status: int) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def start(self) -> None:
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        if self.http is not None:
            await self.http.start()
            logger.info("HTTP API on %s:%d", self.config.host, self.http.port)
        logger.info("listening on %s:%d (loading the model)", self.config.host, self.port)

    async def load(self) -> None:
        """Loads the checkpoint (off the event loop), warms it up, then reports SERVING."""
        cfg = self.config
        engine = await asyncio.to_thread(
            load_engine, cfg.model, revision=cfg.revision, device=cfg.device, dtype=cfg.dtype,
            parallel=cfg.parallel, **cfg.engine_args,
        )  # fmt: skip
        if cfg.stub_forward_seconds is not None:
            use_stub_forward(engine, cfg.stub_forward_seconds)
            logger.warning(
                "benchmark mode: the forward is a %.1f ms stub", 1e3 * cfg.stub_forward_seconds
            )
        if engine.leader is not None:
            loop = asyncio.get_running_loop()
            engine.leader.on_failure(
                lambda message: loop.call_soon_threadsafe(self._schedule_fatal, message)
            )
        vision = engine.model.config.vision_config
        chat, media_config = load_chat(engine.model_path, engine.tokenizer, vision)
        llm = AsyncLLM(engine)
        # Warm-up: one real generation proves the weights, the cache and the loop work.
        async for _ in llm.generate([0], SamplingParams(max_tokens=1), request_id="warmup"):
            pass
        name = model_name(engine.model_path if cfg.model else None, cfg.model)
        limits = _reachable(cfg.media_limits, cfg.max_message_bytes) if vision else None
        loaded = LoadedModel(engine, llm, engine.tokenizer, chat, name, media_config, limits)
        self.runtime.attach(loaded)
        if cfg.metrics_port is not None:
            port = self.runtime.metrics.serve_http(cfg.metrics_port, cfg.metrics_host)
            logger.info("metrics on port %d", port)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._watcher = asyncio.create_task(self._watch_engine(llm))
        logger.info("serving %s on port %d", name, self.port)

    async def _watch_engine(self, llm: AsyncLLM) -> None:
        cuda = self.config.device == "cuda"
        next_device_check = 0.0
        loop = asyncio.get_running_loop()
        while llm.errored is None and not self._stopped.is_set():
            await asyncio.sleep(0.5)
            if cuda and loop.time() >= next_device_check:  # liveness includes the GPU
                next_device_check = loop.time() + DEVICE_CHECK_INTERVAL_S
                problem = await asyncio.to_thread(device_alive, llm.engine.model.device.index or 0)
                if problem is not None:
                    await self.fail(problem)
                    return
        if llm.errored is not None:
            logger.error("engine failed (%r): reporting NOT_SERVING", llm.errored)
            await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            if llm.engine.leader is not None:  # the ranks are out of step: nothing can continue
                await self.fail(f"engine failed under tensor parallelism: {llm.errored!r}")

    def _schedule_fatal(self, message: str) -> None:
        self._fatal_task = asyncio.ensure_future(self.fail(message))

    async def fail(self, message: str) -> None:
        """A lost rank: NOT_SERVING now, abort every call, stop; ``wait`` then raises
        ``ServerFailed``. A watchdog ends the process if any of this blocks."""
        if self.failure is not None:
            return
        self.failure = message
        watchdog = threading.Timer(FATAL_EXIT_DEADLINE_S, _hard_exit, args=(message,))
        watchdog.daemon = True
        watchdog.start()
        logger.error("fatal: %s; reporting NOT_SERVING and exiting", message)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.runtime.draining = True
        self.runtime.abort(list(self.runtime.inflight))
        if self.runtime.model is not None and self.runtime.model.engine.leader is not None:
            await asyncio.to_thread(self.runtime.model.engine.leader.workers.kill)
        await self._stop_listeners()

    async def drain(self) -> None:
        """SIGTERM: stop accepting, let in-flight calls finish (bounded), then stop."""
        if self.runtime.draining:
            return
        logger.info("draining: %d calls in flight", len(self.runtime.inflight))
        self.runtime.draining = True
        await self.health.enter_graceful_shutdown()
        if not await self.runtime.wait_idle(self.config.drain_timeout):
            left = self.runtime.abort(list(self.runtime.inflight))
            logger.warning("drain timeout: aborted %d calls", len(left))
            await self.runtime.wait_idle(5.0)
        await self._stop_listeners()

    async def _stop_listeners(self) -> None:
        if self.http is not None:
            await self.http.stop()
        await self.server.stop(grace=1.0)
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()
        if self.failure is not None:
            raise ServerFailed(self.failure)
        self.runtime.media_pool.shutdown(wait=False, cancel_futures=True)
        if self.runtime.model is not None:
            await asyncio.to_thread(self.runtime.model.llm.shutdown)
            await asyncio.to_thread(self.runtime.model.engine.shutdown)


def _reachable(limits: MediaLimits, max_message_bytes: int) -> MediaLimits:
    """The media byte limits no larger than a request can be (what GetModelInfo reports)."""
    cap = {
        name: max_message_bytes
        for name in ("max_image_bytes", "max_video_bytes")
        if getattr(limits, name) > max_message_bytes
    }
    if cap:
        logger.info(
            "media byte limits capped at the %d MiB request limit (--max-message-mb): %s",
            max_message_bytes // MIB,
            ", ".join(cap),
        )
    return dataclasses.replace(limits, **cap)


def _hard_exit(message: str) -> None:
    logger.error(
        "fatal: %s; shutdown took over %.0f s, exiting now", message, FATAL_EXIT_DEADLINE_S
    )
    logging.shutdown()
    os._exit(1)


async def serve(config: ServerConfig) -> None:
    server = Server(config)
    await server.start()
    print(f"kimi-grpc listening on {config.host}:{server.port}", flush=True)
    if server.http is not None:
        print(f"kimi-grpc HTTP API on {config.host}:{server.http.port}", flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.drain()))
    try:
        await server.load()
    except Exception:
        logger.exception("loading the model failed")
        if server.http is not None:
            await server.http.stop()
        await server.server.stop(grace=0)
        raise
    print(f"kimi-grpc serving on {config.host}:{server.port}", flush=True)
    await server.wait()
    logger.info("stopped")
