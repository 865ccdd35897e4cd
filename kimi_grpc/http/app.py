"""The OpenAI-compatible HTTP API: a Starlette app served by uvicorn inside the gRPC server's event
loop (one process, one engine, one admission count, one drain).

Routes: ``GET /health``, ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions``
(one AgentStep), ``POST /v1/completions`` (Generate). Every response carries ``x-request-id`` (the
client's, when it sent a valid one). With ``--api-key-file``, every route but ``/health`` needs
``Authorization: Bearer <key>`` (the gRPC keys). A client that disconnects — closing a stream, or
giving up on a non-stream request — aborts its engine request at once (its KV pages are freed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kimi_grpc.http.chat_request import chat_completion_call
from kimi_grpc.http.chat_response import ChatStream, TokenText, completion
from kimi_grpc.http.completions import CompletionBuilder, CompletionCall, completion_call
from kimi_grpc.http.errors import HttpError
from kimi_grpc.proto import inference_pb2 as pb
from kimi_grpc.server.auth import ApiKeys
from kimi_grpc.server.errors import ServiceError
from kimi_grpc.server.runtime import LoadedModel, Runtime
from kimi_grpc.server.servicer import InferenceServicer

logger = logging.getLogger("kimi_grpc.http")

ROUTES = ("/health", "/v1/models", "/v1/chat/completions", "/v1/completions")
OPEN_PATHS = ("/health",)  # no key needed (probes)
REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,256}$")  # a client's x-request-id we echo
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
DONE = b"data: [DONE]\n\n"
BIG_BODY_BYTES = 1024 * 1024  # parse and translate larger bodies off the event loop


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def sse(payload: dict[str, Any]) -> bytes:
    return (
        b"data: "
        + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        + b"\n\n"
    )


def _aborted() -> HttpError:
    return HttpError(
        503, "the request was aborted (the server is shutting down)", code="aborted",
        retry_after_s=1.0,
    )  # fmt: skip


class HttpApi:
    """The routes, over the gRPC service's runtime and handlers."""

    def __init__(
        self,
        runtime: Runtime,
        servicer: InferenceServicer,
        *,
        keys: ApiKeys | None = None,
        aliases: tuple[str, ...] = (),
        max_body_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.runtime = runtime
        self.servicer = servicer
        self.keys = keys
        self.extra_aliases = aliases
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.model, methods=["GET"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ]
        handlers = {
            HTTPException: self._http_exception,
            HttpError: self._http_error,
            ClientGone: self._client_gone,
            Exception: self._server_error,
        }
        self.app = _Front(Starlette(routes=routes, exception_handlers=handlers), self)

    # ---- helpers --------------------------------------------------------------------------------
    def names(self, model: LoadedModel) -> tuple[str, tuple[str, ...]]:
        """(served name, aliases): extra --served-model-name values and the hub id's short
        forms (``moonshotai/Kimi-K2.6`` also answers to ``Kimi-K2.6`` and ``kimi-k2.6``)."""
        short = model.name.rstrip("/").rsplit("/", 1)[-1]
        aliases = dict.fromkeys((*self.extra_aliases, short, short.lower()))
        aliases.pop(model.name, None)
        return model.name, tuple(aliases)

    def ready(self) -> LoadedModel:
        try:
            return self.runtime.ready()
        except ServiceError as err:
            raise HttpError.from_service(err) from None

    async def _call(self, request: Request, translate: Callable[..., Any]) -> tuple[Any, Any]:
        """(model, call): the body read (bounded), parsed and translated by ``translate(data,
        served, aliases)`` — off the event loop when it is large. Refusals are HttpErrors."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise HttpError(413, f"the request body exceeds {self.max_body_bytes} bytes")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise HttpError(413, f"the request body exceeds {self.max_body_bytes} bytes")
                chunks.append(chunk)
        except ClientDisconnect:
            raise ClientGone from None
        model = self.ready()

        def parse() -> Any:
            try:
                data = json.loads(b"".join(chunks))
            except (ValueError, RecursionError) as exc:
                raise HttpError(400, f"the request body is not valid JSON ({exc})") from None
            try:
                return translate(data, *self.names(model))
            except ServiceError as err:
                raise HttpError.from_service(err) from None
            except UnicodeEncodeError:  # JSON may escape a lone surrogate; no text holds one
                raise HttpError(400, "a string in the body holds an unpaired surrogate") from None

        return model, await asyncio.to_thread(parse) if size > BIG_BODY_BYTES else parse()

    def _count(self, path: str, status: int) -> None:
        if self.runtime.metrics is not None:
            route = path if path in ROUTES else "other"  # bounded label values
            if path.startswith("/v1/models/"):
                route = "/v1/models/{id}"
            self.runtime.metrics.http_requests.labels(route, str(status)).inc()

    def _refusal(self, request: Request, err: HttpError) -> JSONResponse:
        self._count(request.url.path, err.status)
        if err.status >= 500 and err.status != 503:
            logger.error("%s %s: %s", request.method, request.url.path, err.message)
        else:
            logger.info("%s refused %d: %s", request.url.path, err.status, err.message)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers())

    async def _http_error(self, request: Request, err: Exception) -> Response:
        assert isinstance(err, HttpError)
        return self._refusal(request, err)

    async def _client_gone(self, request: Request, exc: Exception) -> Response:
        logger.info("%s: the client disconnected", request.url.path)
        return Response(status_code=499)  # nobody reads it (nginx's "client closed request")

    async def _server_error(self, request: Request, exc: Exception) -> Response:
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return self._refusal(request, HttpError(500, "internal server error"))

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = {404: f"no route {request.url.path}", 405: "method not allowed"}
        code = {404: "unknown_route", 405: "method_not_allowed"}.get(exc.status_code)
        error = HttpError(exc.status_code, message.get(exc.status_code, str(exc.detail)), code=code)
        return self._refusal(request, error)

    # ---- routes ---------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        try:
            self.runtime.ready()
        except ServiceError as err:
            error = HttpError.from_service(err)
            return JSONResponse(error.body(), status_code=503, headers=error.headers())
        return JSONResponse({"status": "ok"})

    def _model_card(self, model: LoadedModel, name: str) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "kimi-grpc",
            "root": model.name,
            # Moonshot's extra fields, read by kimi-cli's model listing.
            "context_length": model.engine.max_model_len,
            "max_model_len": model.engine.max_model_len,
            "supports_reasoning": True,
            "supports_image_in": model.media_config is not None,
            "supports_video_in": model.media_config is not None,
        }

    async def models(self, request: Request) -> Response:
        model = self.ready()
        served, aliases = self.names(model)
        data = [self._model_card(model, name) for name in (served, *aliases)]
        return JSONResponse({"object": "list", "data": data})

    async def model(self, request: Request) -> Response:
        model = self.ready()
        served, aliases = self.names(model)
        name = request.path_params["model_id"]
        if name != served and name not in aliases:
            raise HttpError(404, f"The model `{name}` does not exist.", param="model")
        return JSONResponse(self._model_card(model, name))

    async def chat_completions(self, request: Request) -> Response:
        model, call = await self._call(request, chat_completion_call)
        engine_id = uuid.uuid4().hex
        completion_id, created = f"chatcmpl-{engine_id}", int(time.time())
        tokens = TokenText(model.tokenizer)
        responses = self.servicer.agent_step(call.step, request_id=engine_id, fit_context=True)
        route = request.url.path
        if call.stream:
            first = await self._first(request, responses, engine_id)
            if first is None:
                return Response(status_code=499)
            if first.HasField("final") and first.final.finish_reason == pb.FINISH_REASON_ABORT:
                raise _aborted()  # nothing was sent yet: a retryable status, not an event
            stream = ChatStream(call, completion_id, created, tokens)
            return self._sse(route, engine_id, responses, first, self._chat_chunks(stream))

        async def whole() -> dict[str, Any]:
            logprobs: list[pb.TokenLogprob] = []
            async for response in responses:
                if response.HasField("delta"):
                    logprobs.extend(response.delta.logprobs)
                else:
                    final = response.final
            if final.finish_reason == pb.FINISH_REASON_ABORT:
                raise _aborted()
            return completion(call, completion_id, created, final, logprobs, tokens)

        body = await self._unless_disconnected(request, whole(), responses, engine_id)
        if body is None:
            return Response(status_code=499)
        self._count(route, 200)
        return JSONResponse(body)

    @staticmethod
    def _chat_chunks(stream: ChatStream) -> Callable[[Any, bool], list[dict[str, Any]]]:
        def chunks(response: pb.AgentStepResponse, first: bool) -> list[dict[str, Any]]:
            out = [stream.first()] if first else []
            if response.HasField("delta"):
                return out + stream.delta(response.delta)
            if response.final.finish_reason == pb.FINISH_REASON_ABORT:
                raise _aborted()
            return out + stream.final(response.final)

        return chunks

    async def completions(self, request: Request) -> Response:
        model, call = await self._call(request, completion_call)
        engine_id = uuid.uuid4().hex
        builder = CompletionBuilder(
            call, f"cmpl-{engine_id}", int(time.time()), TokenText(model.tokenizer)
        )
        ids = [engine_id if i == 0 else f"{engine_id}-{i}" for i in range(len(call.requests))]
        generate = self.servicer.generate
        responses = _merged(
            [generate(r, request_id=i) for r, i in zip(call.requests, ids, strict=True)]
        )
        route = request.url.path
        if call.stream:
            first = await self._first(request, responses, *ids)
            if first is None:
                return Response(status_code=499)
            final = first[1].final if first[1].HasField("final") else None
            if final is not None and final.finish_reason == pb.FINISH_REASON_ABORT:
                raise _aborted()
            tail = [builder.usage_chunk] if call.include_usage else []
            chunks = self._completion_chunks(call, builder)
            return self._sse(route, ids, responses, first, chunks, tail)

        async def whole() -> dict[str, Any]:
            async for prompt_index, response in responses:
                if response.HasField("delta"):
                    builder.delta(prompt_index, response.delta)
                elif response.final.finish_reason == pb.FINISH_REASON_ABORT:
                    raise _aborted()
                else:
                    builder.final(prompt_index, response.final)
            return builder.completion()

        body = await self._unless_disconnected(request, whole(), responses, *ids)
        if body is None:
            return Response(status_code=499)
        self._count(route, 200)
        return JSONResponse(body)

    @staticmethod
    def _completion_chunks(call: CompletionCall, builder: CompletionBuilder) -> Callable:
        def chunks(item: tuple[int, pb.GenerateResponse], first: bool) -> list[dict[str, Any]]:
            prompt_index, response = item
            out = []
            if first and call.echo:
                out = [
                    builder.echo_chunk(p, k)
                    for p in range(len(call.prompts))
                    for k in range(call.n)
                ]
            if response.HasField("delta"):
                choice = builder.delta(prompt_index, response.delta)
                return out + ([builder.chunk([choice])] if choice is not None else [])
            if response.final.finish_reason == pb.FINISH_REASON_ABORT:
                raise _aborted()
            return [*out, builder.chunk([builder.final(prompt_index, response.final)])]

        return chunks

    # ---- streaming and disconnects --------------------------------------------------------------
    async def _first(self, request: Request, responses: AsyncIterator, *engine_ids: str) -> Any:
        """The first response, so refusals (validation, admission) still get their HTTP status;
        None when the client left meanwhile."""
        try:
            return await self._unless_disconnected(
                request, anext(responses), responses, *engine_ids
            )
        except StopAsyncIteration:
            raise HttpError(500, "the engine produced no output") from None

    async def _unless_disconnected(
        self, request: Request, work: Awaitable, responses: AsyncIterator, *engine_ids: str
    ) -> Any:
        """Runs ``work`` until done or until the client disconnects (then aborts the engine
        requests and returns None). ServiceErrors become HttpErrors."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            logger.info("%s: the client disconnected; aborted", request.url.path)
            return None
        except ServiceError as err:
            raise HttpError.from_service(err) from None
        finally:
            gone.cancel()
            if not (task.done() and not task.cancelled()):  # the work did not finish (the
                task.cancel()  # client left, or this handler was cancelled): stop it now
                await _close(responses)
                self.runtime.abort(list(engine_ids))

    def _sse(
        self,
        route: str,
        engine_ids: str | list[str],
        responses: AsyncIterator,
        first: Any,
        chunks: Callable[[Any, bool], list[dict[str, Any]]],
        tail: list[Callable[[], dict[str, Any]]] | None = None,
    ) -> StreamingResponse:
        """The SSE response: ``chunks(item, is_first)`` per response, then ``tail`` chunks
        (built at the end), then ``[DONE]``; an error after the headers is an error event."""
        ids = [engine_ids] if isinstance(engine_ids, str) else engine_ids

        async def events() -> AsyncIterator[bytes]:
            try:
                item, is_first = first, True
                while True:
                    for chunk in chunks(item, is_first):
                        yield sse(chunk)
                    is_first = False
                    try:
                        item = await anext(responses)
                    except StopAsyncIteration:
                        break
                for build in tail or []:
                    yield sse(build())
            except (ServiceError, HttpError) as exc:  # after the headers: an error event
                err = HttpError.from_service(exc) if isinstance(exc, ServiceError) else exc
                logger.info("%s stream ended with %d: %s", route, err.status, err.message)
                yield sse(err.body())
            except Exception:
                logger.exception("%s stream failed", route)
                yield sse(HttpError(500, "internal error while streaming").body())
            finally:  # also on disconnect (CancelledError): stop the engine work now
                await _close(responses)
                self.runtime.abort(ids)
            yield DONE

        self._count(route, 200)
        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


async def _close(responses: AsyncIterator) -> None:
    with contextlib.suppress(BaseException):
        await responses.aclose()  # type: ignore[attr-defined]


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read: the next message is the
    disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _merged(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    """(stream index, item) from several streams as they come; the first error ends all."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue(maxsize=16 * len(streams))  # a slow reader slows them
    done = object()

    async def pump(i: int, stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                await queue.put((i, item))
        except BaseException as exc:
            await queue.put((i, exc))
            return
        await queue.put((i, done))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            await _close(stream)


class _Front:
    """Pure ASGI wrapper (no BaseHTTPMiddleware on streaming routes): assigns ``x-request-id``,
    adds it to every response, and checks the bearer key."""

    def __init__(self, app: Starlette, api: HttpApi) -> None:
        self.app, self.api = app, api

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        request_id = given if REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode("latin-1")),
                ]
            await send(message)

        keys = self.api.keys
        open_path = scope["path"] in OPEN_PATHS
        if keys is not None and not open_path and not keys.accepts(headers.get("authorization")):
            error = HttpError(
                401, "missing or invalid API key (header 'Authorization: Bearer <key>')"
            )
            self.api._count(scope["path"], 401)
            response = JSONResponse(error.body(), status_code=401)
            await response(scope, receive, send_with_id)
            return
        await self.app(scope, receive, send_with_id)


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: SIGTERM/SIGINT belong to the server's drain (a plain
    ``uvicorn.Server`` replaces them and would stop HTTP before the drain runs)."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield


class HttpServer:
    """uvicorn serving :class:`HttpApi` in the running event loop."""

    def __init__(
        self,
        api: HttpApi,
        host: str,
        port: int,
        *,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        config = uvicorn.Config(
            api.app,
            lifespan="off",
            access_log=False,
            log_level="warning",
            timeout_graceful_shutdown=5,
            ssl_certfile=tls_cert,
            ssl_keyfile=tls_key,
        )
        self.socket = socket.create_server(
            (host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET
        )
        self.port = self.socket.getsockname()[1]
        self.server = _EmbeddedUvicorn(config)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self.server.serve(sockets=[self.socket]))
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._task is None:
            return
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
