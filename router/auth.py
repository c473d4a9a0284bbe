"""API keys: `Authorization: Bearer <key>` on HTTP, `authorization` metadata on gRPC.

Off unless a key is configured. Health checks and gRPC reflection stay open, so load balancers
and `grpcurl list` work without the key. The admin service (scaling) takes its own key when one
is configured, else the API key.
"""

from __future__ import annotations

import hmac

import grpc

from proto import admin_pb2, serving_pb2


def authorized(header: str | None, api_key: str) -> bool:
    """True when `header` is `Bearer <api_key>` (compared in constant time)."""
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), api_key.encode())


BATON_SERVICE = serving_pb2.DESCRIPTOR.services_by_name["Baton"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name


def service_keys(api_key: str | None, admin_api_key: str | None) -> dict[str, str]:
    """Which key each protected service needs (a service without one is open)."""
    keys = {BATON_SERVICE: api_key, ADMIN_SERVICE: admin_api_key or api_key}
    return {service: key for service, key in keys.items() if key}


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls to a protected service without its key with UNAUTHENTICATED.
    `keys`: service full name (e.g. "baton.v1.Baton") -> its key."""

    def __init__(self, keys: dict[str, str]):
        self.keys = {f"/{service}/": key for service, key in keys.items()}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        key = next((k for prefix, k in self.keys.items() if method.startswith(prefix)), None)
        if handler is None or key is None:
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        if authorized(metadata.get("authorization"), key):
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
