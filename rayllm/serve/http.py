"""The HTTP layer: FastAPI routes over ``OpenAIHandler``, request-size limits, server-sent events,
and every error mapped to OpenAI's error format (a server never dies on a bad request)."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rayllm.serve.openai import (
    APIError,
    Body,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    OpenAIHandler,
    TokenizeRequest,
    error_body,
    validation_message,
)

log = logging.getLogger("rayllm.serve")


def _respond(body: Body) -> Response:
    return JSONResponse(body) if isinstance(body, dict) else _sse(body)


def _sse(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    """Server-sent events ending in ``data: [DONE]``; a failure mid-stream becomes an error event."""

    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except APIError as e:
            yield f"data: {json.dumps(e.body(), ensure_ascii=False)}\n\n"
        except Exception as e:
            log.exception("stream failed")
            yield f"data: {json.dumps(error_body(f'generation failed: {e}', 'server_error'))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class _BodyLimit:
    """413 for bodies over ``max_bytes``, checked before any parsing.

    A declared ``Content-Length`` is refused without reading a byte; a chunked body is counted as it
    arrives and stops the request at the limit (the route's error handler answers in OpenAI's format).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            await JSONResponse(_too_large(self.max_bytes), status_code=413)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise StarletteHTTPException(413)
            return message

        await self.app(scope, limited_receive, send)


def _too_large(limit: int) -> dict[str, Any]:
    message = f"the request body exceeds this server's limit of {limit} bytes (serve.max_body_bytes)"
    return error_body(message, "invalid_request_error", None, "request_too_large")


class _BearerAuth:
    """401 in OpenAI's format unless ``Authorization: Bearer <key>`` names one of ``keys``.

    Checked before the body is read; ``/health`` stays open for load balancers and Serve's probes.
    """

    OPEN = frozenset({"/health"})

    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        self.app, self.keys = app, [k.encode() for k in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.OPEN:
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() == "bearer" and any(
            hmac.compare_digest(key.strip().encode(), k) for k in self.keys
        ):
            await self.app(scope, receive, send)
            return
        message = (
            "incorrect API key provided"
            if header
            else "missing API key: send it as 'Authorization: Bearer KEY' (the openai client's api_key)"
        )
        body = error_body(message, "invalid_request_error", None, "invalid_api_key")
        await JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})(
            scope, receive, send
        )


def build_api(server: OpenAIHandler, api_keys: list[str]) -> FastAPI:
    """The replica's FastAPI app; built per replica so limits and keys come from its config."""
    limit = server.cfg.max_body_bytes
    api = FastAPI(title="rayllm", docs_url=None, redoc_url=None)
    api.add_middleware(_BodyLimit, max_bytes=limit)
    if api_keys:
        api.add_middleware(_BearerAuth, keys=api_keys)  # outermost: strangers never reach the body

    @api.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @api.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc.errors())
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @api.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 413:
            return JSONResponse(_too_large(limit), status_code=413)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @api.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(error_body(f"internal error: {exc}", "server_error"), status_code=500)

    @api.get("/health")
    async def health() -> dict[str, Any]:
        return server.health()

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        return server.models()

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Response:
        return _respond(await server.completions(body))

    @api.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> Response:
        return _respond(await server.chat(body))

    @api.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        return server.tokenize(body)

    @api.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        return server.detokenize(body)

    return api
