"""The gRPC front door: `baton.v1.Baton` plus the standard health and reflection services."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.sampling_params import SamplingParams
from proto import admin_pb2_grpc, serving_pb2, serving_pb2_grpc
from router.auth import ADMIN_SERVICE, BATON_SERVICE, ApiKeyInterceptor, service_keys
from router.router import MAX_REQUEST_ID_CHARS, RequestError, Router
from router.scaling import PoolScaler

log = logging.getLogger(__name__)


def sampling_from_proto(sp: serving_pb2.SamplingParams) -> SamplingParams:
    """Proto → engine params; raises ValueError (→ INVALID_ARGUMENT) on bad values."""
    kwargs = dict(
        top_k=sp.top_k,
        min_p=sp.min_p,
        presence_penalty=sp.presence_penalty,
        frequency_penalty=sp.frequency_penalty,
        stop=list(sp.stop),
        stop_token_ids=list(sp.stop_token_ids),
        ignore_eos=sp.ignore_eos,
        include_stop_str_in_output=sp.include_stop_str_in_output,
    )
    for name in ("temperature", "top_p", "seed", "repetition_penalty", "logprobs"):
        if sp.HasField(name):
            kwargs[name] = getattr(sp, name)
    # Structured output: proto3 strings have no presence, so empty means unset.
    kwargs.update(json_schema=sp.json_schema or None, regex=sp.regex or None)
    if sp.choice:
        kwargs["choice"] = list(sp.choice)
    return SamplingParams(**kwargs)


def _logprobs_to_proto(token_ids, logprobs) -> list[serving_pb2.TokenLogprob]:
    out = []
    for token_id, entry in zip(token_ids, logprobs or []):
        if entry is None:
            continue
        chosen, top = entry
        out.append(
            serving_pb2.TokenLogprob(
                token_id=token_id,
                logprob=chosen,
                top_token_ids=[t for t, _ in top],
                top_logprobs=[lp for _, lp in top],
            )
        )
    return out


class BatonServicer(serving_pb2_grpc.BatonServicer):
    def __init__(self, router: Router):
        self.router = router

    async def Generate(self, request: serving_pb2.GenerateRequest, context):
        try:
            await self._generate(request, context)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if isinstance(e, grpc.aio.AbortError) or context.done():
                raise
            # A bug, not bad input: say so in the status rather than in a stack trace.
            log.exception("Generate failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}")

    async def _generate(self, request: serving_pb2.GenerateRequest, context):
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        try:
            if len(request.request_id) > MAX_REQUEST_ID_CHARS:
                raise ValueError(f"request_id is longer than {MAX_REQUEST_ID_CHARS} characters")
            params = sampling_from_proto(request.sampling)
            max_tokens = (
                request.sampling.max_tokens if request.sampling.HasField("max_tokens") else None
            )
            req = self.router.validate(
                request.prompt,
                list(request.prompt_token_ids),
                request.model,
                params,
                max_tokens,
                request.ttft_slo_ms,
                request.itl_slo_ms,
                request.min_quality,
                request.max_cost,
            )
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except RequestError as e:
            await _abort(context, e)
        if request.request_id:
            req.request_id = request.request_id
        try:
            # aclosing: a cancelled call (client gone) aborts the request at once.
            async with contextlib.aclosing(self.router.generate(req)) as chunks:
                async for chunk in chunks:
                    msg = serving_pb2.GenerateResponse(
                        token_ids=chunk.token_ids,
                        text=chunk.text,
                        finish_reason=chunk.finish_reason or "",
                        request_id=req.request_id,
                        logprobs=_logprobs_to_proto(chunk.token_ids, chunk.logprobs),
                        stop_reason=chunk.stop_reason or "",
                    )
                    if chunk.usage is not None:
                        msg.usage.CopyFrom(serving_pb2.Usage(**chunk.usage))
                        msg.timings.CopyFrom(serving_pb2.Timings(**chunk.timings))
                        msg.model = chunk.tier
                        msg.prefill_instance = chunk.prefill_instance
                        msg.decode_instance = chunk.decode_instance
                        msg.estimated_cost = chunk.estimated_cost
                        msg.tier_reason = chunk.tier_reason
                    await context.write(msg)
        except RequestError as e:
            await _abort(context, e)

    async def ListModels(self, request, context):
        models = []
        for tier in self.router.tiers.values():
            workers = [
                w for w in self.router.workers if w.tier == tier.name and w.alive and not w.draining
            ]
            models.append(
                serving_pb2.ModelInfo(
                    name=tier.name,
                    path=tier.path,
                    max_model_len=tier.max_model_len,
                    prefill_instances=sum(w.role == "prefill" for w in workers),
                    decode_instances=sum(w.role == "decode" for w in workers),
                    vocab_size=tier.vocab_size,
                )
            )
        return serving_pb2.ListModelsResponse(models=models, default_model=self.router.default_tier)


class _Undecodable:
    """What `_lenient` hands the servicer for bytes that are not a GenerateRequest."""

    def __init__(self, reason: str):
        self.reason = reason


def _lenient(message_type):
    # NOTE: with the generated stubs' deserializer, grpc answers undecodable bytes with UNKNOWN
    # ("Unexpected DecodeError"); the servicer answers INVALID_ARGUMENT instead.
    def deserialize(raw: bytes):
        try:
            return message_type.FromString(raw)
        except DecodeError as e:
            return _Undecodable(f"the request is not a valid {message_type.__name__}: {e}")

    return deserialize


def _add_baton_servicer(servicer: BatonServicer, server: grpc.aio.Server) -> None:
    """`serving_pb2_grpc.add_BatonServicer_to_server`, with a lenient request parser."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate,
            request_deserializer=_lenient(serving_pb2.GenerateRequest),
            response_serializer=serving_pb2.GenerateResponse.SerializeToString,
        ),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels,
            request_deserializer=serving_pb2.ListModelsRequest.FromString,
            response_serializer=serving_pb2.ListModelsResponse.SerializeToString,
        ),
    }
    name = serving_pb2.DESCRIPTOR.services_by_name["Baton"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


async def _abort(context, e: RequestError) -> None:
    """End the call with the error's status; RESOURCE_EXHAUSTED carries `retry-after` (seconds)
    in its trailing metadata."""
    metadata = ()
    if e.retry_after_s is not None:
        metadata = (("retry-after", f"{e.retry_after_s:g}"),)
    await context.abort(getattr(grpc.StatusCode, e.code), e.message, metadata)


async def start_grpc_server(
    router: Router,
    host: str,
    port: int,
    api_key: str | None = None,
    max_request_bytes: int = 4 << 20,
    scaler: PoolScaler | None = None,
    admin_api_key: str | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Serve Baton, health and reflection on one port, and with a `scaler` the admin service
    (router/admin.py); returns the server and the bound port. With `api_key`, Baton's methods
    need `authorization: Bearer <key>` metadata, and so do the admin's, with `admin_api_key`
    if given. A request message over `max_request_bytes` gets RESOURCE_EXHAUSTED from gRPC."""
    keys = service_keys(api_key, admin_api_key)
    server = grpc.aio.server(
        interceptors=[ApiKeyInterceptor(keys)] if keys else None,
        options=[("grpc.max_receive_message_length", max_request_bytes)],
    )
    _add_baton_servicer(BatonServicer(router), server)
    service_names = [BATON_SERVICE]
    if scaler is not None:
        from router.admin import AdminServicer

        admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(scaler), server)
        service_names.append(ADMIN_SERVICE)
        if ADMIN_SERVICE not in keys and host not in ("localhost", "127.0.0.1", "::1"):
            log.warning("the admin service (scaling) is open: no api_key or admin_api_key set")
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service_names += [health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(service_names, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    for name in ("", service_names[0]):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("gRPC serving on %s:%d", host, bound)
    return server, bound
