"""Bearer-token authentication for every RPC but health checks (probes cannot send tokens).

Keys are compared through their SHA-256 digests with ``hmac.compare_digest``: constant time in
the token's content and length (CVE-2025-59425 was a plain ``==``).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)


def load_api_keys(path: str | Path) -> list[str]:
    """One key per line; blank lines and ``#`` comments ignored. No key is an error."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ValueError(f"--api-key-file {path}: holds no key")
    return keys


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", errors="surrogatepass")).digest()


class ApiKeys:
    """The accepted keys, checked against an ``Authorization: Bearer <key>`` value (gRPC metadata
    and the HTTP API share one instance)."""

    def __init__(self, keys: list[str]) -> None:
        self._digests = [_digest(k) for k in keys]

    def accepts(self, authorization: object) -> bool:
        if not isinstance(authorization, str) or not authorization.startswith("Bearer "):
            return False
        given = _digest(authorization[len("Bearer ") :])
        # Check every key (no early exit) so timing does not tell which key matched.
        matches = [hmac.compare_digest(given, d) for d in self._digests]
        return any(matches)


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys

    def authorized(self, metadata: tuple | None) -> bool:
        header = next((v for k, v in metadata or () if k == "authorization"), None)
        return self.keys.accepts(header)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(EXEMPT_PREFIXES):
            return handler
        if self.authorized(details.invocation_metadata):
            return handler
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind (unary/streaming request and response) that refuses the call."""
    message = "missing or invalid bearer token (metadata 'authorization: Bearer <key>')"

    async def unary_response(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming_response(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # never reached; makes this an async generator

    kinds = {
        (False, False): (grpc.unary_unary_rpc_method_handler, unary_response),
        (False, True): (grpc.unary_stream_rpc_method_handler, streaming_response),
        (True, False): (grpc.stream_unary_rpc_method_handler, unary_response),
        (True, True): (grpc.stream_stream_rpc_method_handler, streaming_response),
    }
    make, behaviour = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        behaviour,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
