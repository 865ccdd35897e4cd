"""Every refusal the service can give, as a gRPC status with a message that names the field.

Handlers raise :class:`ServiceError` (or let a known library exception through
:func:`to_service_error`); the servicer turns it into the call's status with rich details:
``BadRequest`` field violations for INVALID_ARGUMENT and ``RetryInfo`` for RESOURCE_EXHAUSTED /
UNAVAILABLE, so clients can tell "fix your request" from "retry later". Nothing becomes INTERNAL
unless it really is a server bug.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from kimi_grpc.chat import ChatError
from kimi_grpc.engine.async_llm import EngineDeadError, RequestFailedError
from kimi_grpc.engine.llm_engine import DuplicateRequestError, RequestError, SequenceDelta
from kimi_grpc.engine.scheduler import EngineOverloadedError
from kimi_grpc.sampling_params import SamplingParamsError

RETRY_AFTER_OVERLOAD_S = 1.0
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"


class ServiceError(Exception):
    """A refused call: ``code`` + ``message``; ``field`` (a request field path) for bad input;
    ``reason`` a stable machine-readable name for a refusal clients act on (the HTTP API's
    ``error.code``, e.g. ``context_length_exceeded``)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        field: str | None = None,
        retry_after_s: float | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s
        self.reason = reason

    def to_status(self) -> grpc.Status:
        details = []
        if self.field is not None:
            violation = error_details_pb2.BadRequest.FieldViolation(
                field=self.field, description=self.message
            )
            details.append(error_details_pb2.BadRequest(field_violations=[violation]))
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after_s * 1e9))
            details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        status = status_pb2.Status(code=_CODES[self.code], message=self.message)
        for detail in details:
            status.details.add().Pack(detail)
        return rpc_status.to_status(status)


_CODES = {code: getattr(code_pb2, code.name) for code in grpc.StatusCode}


class Undecodable:
    """Stands in for a request whose bytes did not parse (e.g. invalid UTF-8 in a string field),
    so the handler can answer INVALID_ARGUMENT instead of gRPC's generic INTERNAL."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def error(self) -> ServiceError:
        return invalid(
            "request",
            f"is not a valid {self.type_name} (malformed protobuf, or invalid UTF-8 in a string "
            "field: send raw bytes as token ids)",
        )


def safe_deserializer(message_cls: type) -> Callable[[bytes], object]:
    def parse(data: bytes) -> object:
        try:
            return message_cls.FromString(data)
        except Exception:  # DecodeError; never let a bad payload become INTERNAL
            return Undecodable(message_cls.DESCRIPTOR.full_name)

    return parse


def invalid(field: str, message: str) -> ServiceError:
    """INVALID_ARGUMENT; the message starts with the field path so it reads on its own."""
    text = message if message.startswith(field) else f"{field}: {message}"
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, text, field=field)


def overloaded(message: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, message, retry_after_s=RETRY_AFTER_OVERLOAD_S
    )


def unavailable(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, message, retry_after_s=RETRY_AFTER_OVERLOAD_S)


def to_service_error(exc: BaseException, *, fields: dict[str, str] | None = None) -> ServiceError:
    """Maps engine / chat / sampling exceptions to statuses. ``fields`` renames engine field names
    to request field paths (e.g. ``{"prompt": "token_ids"}``)."""
    fields = fields or {}
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, SamplingParamsError):
        return invalid(f"sampling.{exc.field}", str(exc))
    if isinstance(exc, DuplicateRequestError):
        return ServiceError(grpc.StatusCode.ALREADY_EXISTS, str(exc), field="request_id")
    if isinstance(exc, RequestError):
        field = fields.get(exc.field, exc.field)
        if exc.field == "max_tokens":
            field = "sampling.max_tokens"
        error = invalid(field, str(exc))
        if "maximum context length" in error.message:
            error.reason = CONTEXT_LENGTH_EXCEEDED
        return error
    if isinstance(exc, ChatError):
        return invalid(exc.field, str(exc))
    if isinstance(exc, EngineOverloadedError):
        return overloaded(str(exc))
    if isinstance(exc, EngineDeadError):
        return ServiceError(grpc.StatusCode.INTERNAL, str(exc))
    if isinstance(exc, RequestFailedError):  # e.g. a grammar refused a token: never unconstrained
        return ServiceError(grpc.StatusCode.INTERNAL, str(exc))
    raise exc


async def engine_errors(
    stream: AsyncIterator[SequenceDelta], fields: dict[str, str]
) -> AsyncIterator[SequenceDelta]:
    """Passes the engine's deltas through, turning its validation errors (raised before the
    first delta) into ServiceErrors with request field names."""
    try:
        async for delta in stream:
            yield delta
    except ServiceError:
        raise
    except Exception as exc:
        raise to_service_error(exc, fields=fields) from None
