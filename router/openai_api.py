"""The OpenAI-compatible HTTP API: FastAPI on uvicorn, inside the router's event loop.

    POST /v1/completions, POST /v1/chat/completions   (stream: server-sent events)
    GET  /v1/models                                   GET /health (never needs the key)

A request takes the gRPC path through the router: `Router.validate`, then `Router.generate`
(tier, placement, retries, metrics); only the shapes differ (`openai_protocol.py`). A client
that disconnects cancels its request, which aborts it on the workers and frees its blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from router.auth import authorized
from router.openai_protocol import (
    APIError,
    ChatCompletionRequest,
    ChatFormatter,
    CompletionFormatter,
    CompletionRequest,
)
from router.router import Chunk, RequestError, Router, TierInfo, _Request

log = logging.getLogger(__name__)


def build_app(
    router: Router, api_key: str | None = None, max_request_bytes: int = 4 << 20
) -> FastAPI:
    app = FastAPI(title="Baton", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_InternalErrors)  # innermost of ours: sees what no handler took
    app.add_middleware(_LimitBody, max_bytes=max_request_bytes)
    if api_key:  # added last: runs first, before any body is read
        app.add_middleware(_RequireApiKey, api_key=api_key)
    _add_error_handlers(app)
    started = int(time.time())

    @app.get("/health")
    async def health() -> Response:
        """200 while every tier has a live prefill and a live decode worker, else 503."""
        live = {(w.tier, w.role) for w in router.workers if w.alive}
        down = [t for t in router.tiers if not {(t, "prefill"), (t, "decode")} <= live]
        if down:
            return JSONResponse({"status": "unavailable", "tiers_down": down}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> dict:
        data = [
            {
                "id": tier.name,
                "object": "model",
                "created": started,
                "owned_by": "baton",
                "root": tier.path,
                "max_model_len": tier.max_model_len,
            }
            for tier in router.tiers.values()
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        body.check_supported()
        prompt, prompt_token_ids = body.prompt_input()
        params = body.sampling_params(body.logprobs)
        req = router.validate(prompt, prompt_token_ids, body.model, params, body.max_tokens)
        formatter = CompletionFormatter(
            f"cmpl-{req.request_id}", req.tier.name, req.tier.tokenizer, body.logprobs is not None
        )
        return await _respond(request, router, req, formatter, body.stream, body.include_usage)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        body.check_supported()
        tier = _tier(router, body.model)
        prompt_token_ids = _render_chat(tier, body)
        params = body.sampling_params(body.num_logprobs)
        req = router.validate("", prompt_token_ids, body.model, params, body.max_output_tokens)
        formatter = ChatFormatter(
            f"chatcmpl-{req.request_id}", tier.name, tier.tokenizer, body.logprobs
        )
        return await _respond(request, router, req, formatter, body.stream, body.include_usage)

    return app


def _tier(router: Router, model: str) -> TierInfo:
    tier = router.tiers.get(router.default_tier if model in ("", "auto") else model)
    if tier is None:
        raise RequestError("NOT_FOUND", f"unknown model {model!r}; served: {sorted(router.tiers)}")
    return tier


def _render_chat(tier: TierInfo, body: ChatCompletionRequest) -> list[int]:
    if tier.chat_template is None or tier.tokenizer is None:
        raise APIError(
            400,
            f"model {tier.name!r} has no chat template: set chat_template in its tier config, "
            "or use /v1/completions",
            param="messages",
        )
    messages = [m.for_template() for m in body.messages]
    try:
        text = tier.chat_template.render(messages, **(body.chat_template_kwargs or {}))
    except (ValueError, TypeError) as e:
        raise APIError(400, str(e), param="messages") from None
    if len(text) > tier.max_prompt_chars:
        raise APIError(
            400,
            f"the rendered chat has {len(text)} characters; {tier.name!r} takes at most "
            f"{tier.max_prompt_chars}",
            param="messages",
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(
            400, "messages must be valid Unicode (lone surrogates are not)", param="messages"
        ) from None
    # The template wrote the special tokens it wants (BOS, turn markers): add none.
    return tier.tokenizer.encode(text, add_special_tokens=False)


# -- responding ----------------------------------------------------------------------------


async def _respond(
    request: Request,
    router: Router,
    req: _Request,
    formatter: CompletionFormatter | ChatFormatter,
    stream: bool,
    include_usage: bool,
) -> Response:
    chunks = router.generate(req)
    if not stream:
        collected = await _unless_disconnected(request, _collect(chunks))
        if collected is None:
            return Response(status_code=499)  # nobody is listening
        return JSONResponse(formatter.response(collected))
    # Wait for the first token before answering, so a request that cannot be served at all
    # (no live workers) gets its HTTP status rather than an error inside a 200 stream.
    first = await _unless_disconnected(request, anext(chunks))
    if first is None:
        return Response(status_code=499)
    return StreamingResponse(
        _sse(formatter, first, chunks, include_usage),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )


async def _collect(chunks: AsyncIterator[Chunk]) -> list[Chunk]:
    return [chunk async for chunk in chunks]


async def _sse(
    formatter: CompletionFormatter | ChatFormatter,
    first: Chunk,
    chunks: AsyncIterator[Chunk],
    include_usage: bool,
) -> AsyncIterator[str]:
    """Server-sent events: `data: {json}` per event, then `data: [DONE]`. When the client goes
    away, Starlette cancels this generator: closing `chunks` aborts the request."""
    try:
        if isinstance(formatter, ChatFormatter):
            yield _event(formatter.first_event(include_usage))
        chunk = first
        while chunk is not None:
            for event in formatter.stream_events(chunk, include_usage):
                yield _event(event)
            if chunk.finish_reason is not None:
                if include_usage:
                    yield _event(formatter.usage_event(chunk))
                break
            chunk = await anext(chunks, None)
    except RequestError as e:  # e.g. every attempt failed: the status line is long gone
        yield _event(APIError.from_request_error(e).body)
    finally:
        await chunks.aclose()
    yield "data: [DONE]\n\n"


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _unless_disconnected(request: Request, awaitable: Awaitable):
    """The awaitable's result, or None (it cancelled) if the client disconnects first."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():  # the client went away, or this handler was cancelled
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
    return None if work.cancelled() else work.result()


async def _disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


# -- errors and keys -----------------------------------------------------------------------


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body, status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError) -> JSONResponse:
        return await api_error(request, APIError.from_request_error(e))

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, e: RequestValidationError) -> JSONResponse:
        problems, param = [], None
        for error in e.errors():
            if error.get("type") == "json_invalid":  # loc is ("body", character offset)
                reason = error.get("ctx", {}).get("error", error.get("msg"))
                problems.append(f"the body is not valid JSON: {reason}")
                continue
            loc = [str(part) for part in error.get("loc", ()) if part != "body"]
            param = param or (".".join(loc) or None)
            problems.append(f"{'.'.join(loc) or 'body'}: {error.get('msg')}")
        return await api_error(request, APIError(400, "; ".join(problems), param=param))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        # Starlette logs the traceback; the client gets the same error shape as for the rest.
        error = APIError(500, f"internal error: {type(e).__name__}", type="server_error")
        return await api_error(request, error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return await api_error(request, APIError(e.status_code, str(e.detail), type=kind))


class _InternalErrors:
    """ASGI middleware: an exception no handler took (a bug) becomes a 500 in the API's error
    shape, logged here. Left to Starlette, the 500 is sent and the exception re-raised to the
    server, which then closes the connection: a client's next request on that keep-alive
    connection was reset (the openai client, CI 2026-11-26)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception as e:
            if started:
                raise  # too late for an error response: the server ends the connection
            log.exception("internal error on %s %s", scope.get("method"), scope.get("path"))
            error = APIError(500, f"internal error: {type(e).__name__}", type="server_error")
            await JSONResponse(error.body, status_code=error.status)(scope, receive, send)


class _LimitBody:
    """ASGI middleware: a request body over `max_bytes` gets 413 before anything parses it.
    The body is read here (up to the limit) and handed on in one piece."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away while sending
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()  # after the body: the disconnect
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send) -> None:
        error = APIError(413, f"the request body is over {self.max_bytes} bytes")
        await JSONResponse(error.body, status_code=413)(scope, receive, send)


class _RequireApiKey:
    """ASGI middleware: /v1 routes need `Authorization: Bearer <key>`; others stay open.
    (Checked before the body is parsed, so a bad key never learns whether the body was valid.)"""

    def __init__(self, app, api_key: str):
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            headers = dict(scope["headers"])
            header = headers.get(b"authorization", b"").decode("latin-1")
            if not authorized(header, self.api_key):
                error = APIError(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                )
                response = JSONResponse(error.body, status_code=401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# -- the server ----------------------------------------------------------------------------


@dataclass
class HttpServer:
    server: uvicorn.Server
    task: asyncio.Task
    port: int  # the bound port (the one asked for, or a free one for 0)

    async def stop(self) -> None:
        self.server.should_exit = True
        await self.task


class _Server(uvicorn.Server):
    def capture_signals(self):
        # The process hosting the router owns SIGINT/SIGTERM (it stops everything).
        return contextlib.nullcontext()


async def start_openai_server(
    router: Router,
    host: str,
    port: int,
    api_key: str | None = None,
    max_request_bytes: int = 4 << 20,
) -> HttpServer:
    """Serve the API on the running loop; returns once the port accepts connections."""
    sock = _bind(host, port)
    config = uvicorn.Config(
        build_app(router, api_key, max_request_bytes),
        log_level="warning",
        log_config=None,  # leave the process's logging alone
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=2,  # streams still open at stop are cut after this
        # NOTE: uvicorn closes an idle keep-alive connection after 5 s by default; a client or
        # load balancer reusing it just then gets a dropped connection (seen in the test suite
        # as APIConnectionError). Longer than the usual proxy idle timeouts (60 s), so the
        # client side is the one that closes.
        timeout_keep_alive=75,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("the HTTP server stopped while starting")
        await asyncio.sleep(0.01)
    bound = sock.getsockname()[1]
    log.info("OpenAI API on http://%s:%d/v1", host, bound)
    return HttpServer(server, task, bound)


def _bind(host: str, port: int) -> socket.socket:
    # Bound here rather than by uvicorn: port 0 then tells us its port, and a port in use is
    # an OSError with the port in it (uvicorn would call sys.exit).
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"HTTP port {host}:{port}: {e.strerror}") from None
    return sock
