"""API keys: `Authorization: Bearer <key>` on HTTP, `authorization` metadata on gRPC.

Off unless a key is configured. Health checks and gRPC reflection stay open, so load balancers
and `grpcurl list` work without the key.
"""

from __future__ import annotations

import hmac

import grpc

from proto import serving_pb2


def authorized(header: str | None, api_key: str) -> bool:
    """True when `header` is `Bearer <api_key>` (compared in constant time)."""
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), api_key.encode())


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls to the Baton service without the key with UNAUTHENTICATED."""

    def __init__(self, api_key: str):
        self.api_key = api_key
        service = serving_pb2.DESCRIPTOR.services_by_name["Baton"].full_name
        self.protected_prefix = f"/{service}/"

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self.protected_prefix):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        if authorized(metadata.get("authorization"), self.api_key):
            return handler
        # A refusal of the same shape as the method (Baton's take one request message).
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                _deny_stream, handler.request_deserializer, handler.response_serializer
            )
        return grpc.unary_unary_rpc_method_handler(
            _deny, handler.request_deserializer, handler.response_serializer
        )


_DENIED = "missing or wrong API key: send metadata 'authorization: Bearer <key>'"


async def _deny(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)


async def _deny_stream(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)
    yield  # never reached: makes this an async generator, as streaming handlers are
