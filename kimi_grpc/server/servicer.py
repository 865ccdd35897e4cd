"""``kimi.v1.InferenceService``: the RPC handlers.

Handlers validate (ServiceError → status), reserve admission, then stream from ``AsyncLLM``.
Leaving a stream for any reason — the client cancels, the deadline passes, the server drains —
closes the engine stream in ``finally``, which aborts the request and frees its KV pages.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from kimi_grpc.engine.llm_engine import SequenceDelta
from kimi_grpc.guided import Constraint, GrammarError
from kimi_grpc.guided.constraint import build_constraint
from kimi_grpc.proto import inference_pb2 as pb
from kimi_grpc.server import convert
from kimi_grpc.server.agent_step import MODE_DEFAULTS, AgentStep
from kimi_grpc.server.errors import (
    ServiceError,
    Undecodable,
    engine_errors,
    invalid,
    safe_deserializer,
)
from kimi_grpc.server.metrics import RequestClock
from kimi_grpc.server.runtime import LoadedModel, Runtime, check_id

logger = logging.getLogger(__name__)

BIG_TEXT_CHARS = 16_384  # tokenize larger inputs off the event loop
GENERATE_DEFAULTS: dict[str, Any] = {}  # vLLM's SamplingParams defaults


def _rejected(runtime: Runtime, rpc: str, err: ServiceError) -> None:
    if runtime.metrics is not None:
        runtime.metrics.rejected.labels(rpc, err.code.name).inc()
    logger.info("%s refused: %s %s", rpc, err.code.name, err.message)


def unary(rpc: str) -> Callable:
    """Wraps a unary handler: ServiceError → the call's status."""

    def wrap(handler: Callable) -> Callable:
        @functools.wraps(handler)
        async def run(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext):
            try:
                if isinstance(request, Undecodable):
                    raise request.error()
                return await handler(self, request, context)
            except ServiceError as err:
                _rejected(self.runtime, rpc, err)
                await context.abort_with_status(err.to_status())

        return run

    return wrap


def streaming(rpc: str) -> Callable:
    """Wraps a server-streaming handler (an async generator) the same way."""

    def wrap(handler: Callable) -> Callable:
        @functools.wraps(handler)
        async def run(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext):
            try:
                if isinstance(request, Undecodable):
                    raise request.error()
                async for response in handler(self, request, context):
                    yield response
            except ServiceError as err:
                _rejected(self.runtime, rpc, err)
                await context.abort_with_status(err.to_status())

        return run

    return wrap


class InferenceServicer:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def _encode(self, text: str, allow_special: bool) -> list[int]:
        tokenizer = self.runtime.ready().tokenizer
        if len(text) > BIG_TEXT_CHARS:
            return await asyncio.to_thread(tokenizer.encode, text, allow_special=allow_special)
        return tokenizer.encode(text, allow_special=allow_special)

    # ---- Generate -------------------------------------------------------------------------------
    @streaming("Generate")
    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator:
        async for response in self.generate(request):
            yield response

    async def generate(
        self, request: pb.GenerateRequest, *, request_id: str | None = None
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Generate without the gRPC wrapper (the HTTP API calls it too); raises ServiceError.
        ``request_id`` overrides the request's (a caller-chosen id)."""
        model = self.runtime.ready()
        metrics = self.runtime.metrics
        clock = RequestClock(metrics)
        params = convert.sampling_params(request.sampling, GENERATE_DEFAULTS)
        check_id("session_id", request.session_id)
        which = request.WhichOneof("input")
        if which == "text":
            prompt = await self._encode(request.text, request.allow_special_tokens)
            field = "text"
        elif which == "token_ids":
            prompt, field = list(request.token_ids.ids), "token_ids.ids"
        else:
            raise invalid("input", "set text or token_ids")
        constraint = await self._json_constraint(model, request.response_format)
        request_id = request_id or request.request_id
        async with self.runtime.admit(request_id, params.n) as (request_id, _):
            stream = model.llm.generate(
                prompt,
                params,
                request_id=request_id,
                priority=request.priority,
                session_id=request.session_id or None,
                constraint=constraint,
                coalesce=True,
                stream_interval=request.stream_interval or self.runtime.stream_interval,
            )
            counts = [0] * params.n
            try:
                first = True
                async for delta in engine_errors(stream, {"prompt": field}):
                    if first:
                        clock.admitted(delta)
                        first = False
                    clock.tokens(len(delta.token_ids))
                    counts[delta.index] += len(delta.token_ids)
                    if delta.token_ids or delta.text:
                        yield pb.GenerateResponse(
                            delta=pb.GenerateDelta(
                                index=delta.index,
                                token_ids=delta.token_ids,
                                text=delta.text,
                                logprobs=convert.logprobs(delta),
                            )
                        )
                    if delta.finished:
                        yield pb.GenerateResponse(
                            final=self._final(request_id, delta, counts, clock)
                        )
            finally:
                await stream.aclose()

    @staticmethod
    async def _json_constraint(model: LoadedModel, fmt: pb.ResponseFormat) -> Constraint | None:
        """Generate's response_format: every completion is JSON from its first token."""
        schema = convert.response_schema(fmt)
        if schema is None:
            return None
        if model.engine.grammar_backend is None:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "response_format: needs guided decoding (the server runs --guided-decoding off)",
                field="response_format",
            )
        try:
            return await asyncio.to_thread(
                build_constraint,
                model.engine.grammar_backend,
                model.tokenizer,
                model.engine.guided_stats,
                tools=[],
                tool_choice="auto",
                response_schema=schema,
                response_field="response_format.json_schema",
            )
        except GrammarError as exc:
            raise invalid(exc.field, exc.message) from None

    def _final(
        self, request_id: str, delta: SequenceDelta, counts: list[int], clock: RequestClock
    ) -> pb.GenerateFinal:
        if self.runtime.metrics:
            self.runtime.metrics.finished.labels("Generate", delta.finish_reason).inc()
        final = pb.GenerateFinal(
            index=delta.index,
            request_id=request_id,
            finish_reason=convert.FINISH_REASONS[delta.finish_reason],
            usage=convert.usage(
                delta.num_prompt_tokens, counts[delta.index], delta.num_cached_tokens
            ),
            timings=clock.timings(),
        )
        if isinstance(delta.stop_reason, str):
            final.stop_string = delta.stop_reason
        elif isinstance(delta.stop_reason, int):
            final.stop_token_id = delta.stop_reason
        return final

    # ---- AgentStep ------------------------------------------------------------------------------
    @streaming("AgentStep")
    async def AgentStep(self, request: pb.AgentStepRequest, context) -> AsyncIterator:
        async for response in self.agent_step(request):
            if not request.final_only or response.HasField("final"):
                yield response

    async def agent_step(
        self,
        request: pb.AgentStepRequest,
        *,
        request_id: str | None = None,
        fit_context: bool = False,
    ) -> AsyncIterator[pb.AgentStepResponse]:
        """AgentStep without the gRPC wrapper (the HTTP API calls it too); raises ServiceError.
        ``fit_context``: clamp max_tokens to the room left after the prompt (OpenAI semantics)."""
        model = self.runtime.ready()
        step = AgentStep(model, request, self.runtime.metrics, self.runtime.stream_interval)
        check_id("session_id", request.session_id)
        # Admitted first: decoding media takes seconds and memory, so a full server refuses
        # before it, drain waits for it, and an abort or cancel stops the call during it.
        async with self.runtime.admit(request_id or request.request_id, 1) as (request_id, call):
            clock = RequestClock(self.runtime.metrics)  # TTFT includes media preprocessing
            chat = await self.runtime.run_blocking(step.render, step.has_media)
            if fit_context:
                step.fit_context(len(chat.token_ids))
            constraint = await asyncio.to_thread(step.constraint, chat)
            async for response in step.run(request_id, chat, call, clock, constraint):
                yield response

    # ---- unary RPCs -----------------------------------------------------------------------------
    @unary("Tokenize")
    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        model = self.runtime.ready()
        which = request.WhichOneof("input")
        if which == "text":
            ids = await self._encode(request.text, request.allow_special_tokens)
            return pb.TokenizeResponse(text=request.text, token_ids=ids)
        if which == "chat":
            media = any(m.parts for m in request.chat.messages)
            chat = await self.runtime.run_blocking(
                lambda: AgentStep.render_chat(model, request.chat, "chat"), media
            )
            media = [
                pb.MediaTokens(
                    message_index=item.input.message_index,
                    part_index=item.input.part_index,
                    num_tokens=item.num_tokens,
                    num_chunks=len(item.chunks),
                )
                for item in chat.media
            ]
            return pb.TokenizeResponse(
                text=chat.rendered.text, token_ids=chat.token_ids, media=media
            )
        raise invalid("input", "set text or chat")

    @unary("GetModelInfo")
    async def GetModelInfo(self, request, context) -> pb.GetModelInfoResponse:
        model = self.runtime.ready()
        engine, cfg = model.engine, model.engine.model.config
        quant = "none"
        if cfg.quantization is not None:
            q = cfg.quantization
            quant = f"int4 pack-quantized symmetric, group {q.group_size} (compressed-tensors)"
        return pb.GetModelInfoResponse(
            model_name=model.name,
            variant=f"{cfg.model_type} ({cfg.architecture})",
            max_context_length=engine.max_model_len,
            eos_token_ids=sorted(engine.eos_token_ids),
            vocab_size=model.tokenizer.vocab_size,
            quantization=quant,
            dtype=str(engine.model.dtype).removeprefix("torch."),
            device=str(engine.model.device),
            page_size=engine.blocks.page_size,
            default_sampling=convert.sampling_to_proto(
                convert.sampling_params(pb.SamplingParams(), GENERATE_DEFAULTS)
            ),
            mode_defaults=[
                pb.ModeDefaults(mode=mode, temperature=d["temperature"], top_p=d["top_p"])
                for mode, d in MODE_DEFAULTS.items()
            ],
            tensor_parallel_size=1,
            vision=self._vision_info(model),
        )

    @staticmethod
    def _vision_info(model: LoadedModel) -> pb.VisionInfo | None:
        config, limits = model.media_config, model.media_limits
        if config is None or limits is None:
            return None
        return pb.VisionInfo(
            max_items=limits.max_items,
            max_image_bytes=limits.max_image_bytes,
            max_video_bytes=limits.max_video_bytes,
            max_image_pixels=limits.max_image_pixels,
            max_video_seconds=limits.max_video_seconds,
            max_video_frames=limits.max_video_frames,
            max_media_tokens=limits.max_media_tokens,
            sample_fps=config.sample_fps,
            frames_per_chunk=config.temporal_merge_kernel_size,
        )

    @unary("GetServerStatus")
    async def GetServerStatus(self, request, context) -> pb.GetServerStatusResponse:
        rt = self.runtime
        status = pb.GetServerStatusResponse(
            uptime_seconds=time.monotonic() - rt.started, draining=rt.draining
        )
        if rt.model is not None:
            stats = rt.model.llm.stats()
            status.running, status.waiting = stats.running, stats.waiting
            status.kv_pages_total, status.kv_pages_used = stats.pages_total, stats.pages_used
            status.kv_pages_cached, status.page_size = stats.pages_cached, stats.page_size
            status.num_preemptions = stats.num_preemptions
            status.kv_tiers.CopyFrom(
                pb.KvTierStatus(
                    device_hit_pages=stats.tiers.device_hit_pages,
                    host_hit_pages=stats.tiers.host_hit_pages,
                    saved_pages=stats.tiers.saved_pages,
                    loaded_pages=stats.tiers.loaded_pages,
                    bytes_saved=stats.bytes_saved,
                    bytes_loaded=stats.bytes_loaded,
                    host_pages_total=stats.host_pages_total,
                    host_pages_used=stats.host_pages_used,
                    host_pages_retained=stats.host_pages_retained,
                    partial_hit_tokens=stats.tiers.partial_hit_tokens,
                )
            )
            guided = rt.model.engine.guided_stats
            status.guided_decoding.CopyFrom(
                pb.GuidedDecodingStatus(
                    enabled=rt.model.engine.grammar_backend is not None,
                    constrained_requests=guided.constrained_requests,
                    lenient_fallbacks=guided.lenient_fallbacks,
                    rejected_tokens=guided.rejected_tokens,
                    masks=guided.masks,
                    mask_seconds=guided.mask_seconds,
                )
            )
        if rt.metrics is not None:
            status.prompt_tokens_total = rt.metrics.prompt_tokens_total
            status.cached_tokens_total = rt.metrics.cached_tokens_total
        return status

    @unary("Abort")
    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        return pb.AbortResponse(aborted_request_ids=self.runtime.abort(list(request.request_ids)))


SERVICE_NAME = "kimi.v1.InferenceService"
_METHODS = {  # name -> (request type, response type, server streaming)
    "Generate": (pb.GenerateRequest, pb.GenerateResponse, True),
    "AgentStep": (pb.AgentStepRequest, pb.AgentStepResponse, True),
    "Tokenize": (pb.TokenizeRequest, pb.TokenizeResponse, False),
    "GetModelInfo": (pb.GetModelInfoRequest, pb.GetModelInfoResponse, False),
    "GetServerStatus": (pb.GetServerStatusRequest, pb.GetServerStatusResponse, False),
    "Abort": (pb.AbortRequest, pb.AbortResponse, False),
}


def add_inference_service(server: grpc.aio.Server, servicer: InferenceServicer) -> None:
    """Registers the service with deserializers that never fail the call before the handler."""
    handlers = {}
    for name, (request_cls, response_cls, server_streaming) in _METHODS.items():
        make = (
            grpc.unary_stream_rpc_method_handler
            if server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[name] = make(
            getattr(servicer, name),
            request_deserializer=safe_deserializer(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
