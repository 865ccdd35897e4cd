"""Refusals as OpenAI error bodies: ``{"error": {"message", "type", "param", "code"}}``.

The service's :class:`ServiceError` (the same one gRPC turns into a status) maps to the HTTP status
each OpenAI client acts on: 400 for bad input (never 422), 401 for a bad key, 404 for an unknown
model, 429 + ``Retry-After`` when admission is full, 503 + ``Retry-After`` while loading or
draining, 500 for a server fault. Field paths from the shared validation (proto names such as
``sampling.max_tokens`` or ``tools[0].parameters_json``) are renamed to the request body's.
"""

from __future__ import annotations

import math
import re
from typing import Any

import grpc

from kimi_grpc.server.errors import ServiceError

STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
CODES = {  # error.code when the error has no more specific reason
    400: "invalid_value",
    401: "invalid_api_key",
    404: "model_not_found",
    429: "rate_limit_exceeded",
    503: "service_unavailable",
    500: "internal_error",
}

# Shared-validation field names → body paths (first match wins; \1 keeps the index).
_RENAMES = (
    (re.compile(r"^sampling\.logprobs$"), "top_logprobs"),
    (re.compile(r"^sampling\.(\w+)$"), r"\1"),
    (re.compile(r"^tools\[(\d+)\]\.parameters_json$"), r"tools[\1].function.parameters"),
    (re.compile(r"^tools\[(\d+)\]\.(name|description|strict)$"), r"tools[\1].function.\2"),
    (re.compile(r"^tool_choice\.function_name$"), "tool_choice.function.name"),
    (re.compile(r"^tool_choice\.mode$"), "tool_choice"),
    (re.compile(r"^chat_template_kwargs_json"), "chat_template_kwargs"),
    (re.compile(r"^response_format\.json_schema$"), "response_format.json_schema.schema"),
    (re.compile(r"^thinking_budget$"), "thinking.budget_tokens"),
    (re.compile(r"^session_id$"), "prompt_cache_key"),
    (re.compile(r"^(text|token_ids\.ids|input)$"), "prompt"),
    (re.compile(r"^messages\[(\d+)\]\.parts\["), r"messages[\1].content["),
    (re.compile(r"^messages\[(\d+)\]\.tool_calls\[(\d+)\]\.(name|arguments)$"),
     r"messages[\1].tool_calls[\2].function.\3"),
)  # fmt: skip


def body_field(field: str | None) -> str | None:
    if field is None:
        return None
    for pattern, replacement in _RENAMES:
        renamed, count = pattern.subn(replacement, field)
        if count:
            return renamed
    return field


class HttpError(Exception):
    """An HTTP refusal with its OpenAI body and headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str | None = None,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        # Client text quoted in a message may hold a lone surrogate: keep the body encodable.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind or ("server_error" if status >= 500 else "invalid_request_error")
        self.param = param
        self.code = code or CODES.get(status)
        self.retry_after_s = retry_after_s

    @classmethod
    def from_service(cls, err: ServiceError) -> HttpError:
        status, kind = STATUS.get(err.code, (500, "server_error"))
        param = body_field(err.field)
        message = err.message
        if param is not None and err.field is not None and message.startswith(err.field):
            message = param + message[len(err.field) :]
        return cls(
            status,
            message,
            kind=kind,
            param=param,
            code=err.reason,
            retry_after_s=err.retry_after_s,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"retry-after": str(max(1, math.ceil(self.retry_after_s)))}
