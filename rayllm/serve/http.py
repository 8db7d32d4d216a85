"""What rayllm adds in front of Ray Serve LLM's OpenAI routes, as ASGI middleware on the ingress's
FastAPI app (Serve's way to add middleware): API keys (401), the body limit (413), a bounded queue
(429 + Retry-After), the request timeout (504, or an error event mid-stream), and every error in
OpenAI's format with a 4xx status for a bad request (a server never dies on one)."""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("rayllm.serve")

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
# The calls to the engine's replica a request has made (``Ingress`` records them), so that a timeout
# can cancel them.
IN_FLIGHT: contextvars.ContextVar[list[Any]] = contextvars.ContextVar("rayllm_in_flight")
# What this ingress replica admitted, refused (429) and cut off (504), for /health. Module state, not
# middleware arguments: Serve ships the app to the replica by value, this module by reference.
COUNTERS = {"active": 0, "requests": 0, "rejected": 0, "timed_out": 0}
UNION_HINTS = {
    "prompt": "must be a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "must be a string or a list of strings",
    "content": "must be a string or a list of {type: text, text} parts",
    "messages": "must be a list of {role, content} messages",
}


_UNION_MEMBER = re.compile(r"^([A-Z]\w*|str|int|float|bool|list|dict|.*\[.*\].*)$")


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_message(errors: list[Any]) -> tuple[str, str | None]:
    """OpenAI's one-message form of pydantic's errors: the field path and what it must be."""
    parts: list[str] = []
    params: list[str] = []
    for err in errors:
        # pydantic names the union members it tried in the path (prompt.str, messages.0.
        # ChatCompletionUserMessageParam.content): leave them out
        loc = [str(p) for p in err.get("loc", ()) if p != "body" and not _UNION_MEMBER.match(str(p))]
        if err.get("type") == "json_invalid":
            return f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}", None
        field = next((p for p in reversed(loc) if p in UNION_HINTS), None)
        name = ".".join(loc[: loc.index(field) + 1]) if field else ".".join(loc)
        msg = UNION_HINTS[field] if field else str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown parameter"
        text = f"{name}: {msg}" if name else msg
        if text not in parts:
            parts.append(text)
            params.append(name)
    return "; ".join(parts), (params[0] or None) if params else None


class RequestError(Exception):
    """A request the server will not run (400), in OpenAI's format, naming the parameter."""

    status_code = 400

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


async def _send_json(
    send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> None:
    raw = json.dumps(body, ensure_ascii=False).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    head += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": raw})


def _kind(status: int) -> str:
    return "invalid_request_error" if status < 500 else "server_error"


async def _end_stream(send: Send, error: dict[str, Any]) -> None:
    """End an event stream already flowing with ``error`` as its last event, then ``[DONE]``."""
    body = f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()
    await send({"type": "http.response.body", "body": body})


class _Tracked:
    """Wraps ``send`` to know whether the response has started, and whether it has ended."""

    def __init__(self, send: Send) -> None:
        self.send, self.started, self.done = send, False, False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.done = True
        await self.send(message)


class OpenAIErrors:
    """Any exception from the routes becomes an OpenAI error: its ``status_code`` where it has one
    (Ray Serve LLM's and vLLM's request errors do), else 500 with the reason, logged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tracked = _Tracked(send)
        try:
            await self.app(scope, receive, tracked)
        except Exception as e:
            status = getattr(e, "status_code", None)
            if not isinstance(status, int) or not 400 <= status < 600:
                status = 500
                log.exception("request failed")
            if tracked.started:
                if not tracked.done:  # mid-stream: say it as an event, then end the stream
                    await _end_stream(send, error_body(str(getattr(e, "message", e)), _kind(status)))
                return
            message = str(getattr(e, "message", None) or getattr(e, "detail", None) or e)
            param = getattr(e, "param", None)
            named = re.search(r"\s*\(parameter=(\w+)\)$", message)
            if named:  # vLLM's validation error, which Ray Serve LLM passes on as a 500
                status, param, message = 400, named.group(1), message[: named.start()]
            await _send_json(send, status, error_body(message, _kind(status), param))


class BodyLimit:
    """413 for bodies over ``max_bytes``, checked before any parsing.

    A declared ``Content-Length`` is refused without reading a byte; a chunked body is counted as it
    arrives and stops the request at the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            await _send_json(send, 413, too_large(self.max_bytes))
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


def too_large(limit: int) -> dict[str, Any]:
    message = f"the request body exceeds this server's limit of {limit} bytes (serve.max_body_bytes)"
    return error_body(message, "invalid_request_error", None, "request_too_large")


class BearerAuth:
    """401 in OpenAI's format unless ``Authorization: Bearer <key>`` names one of ``keys``.

    Checked before the body is read; ``/health`` stays open for load balancers and Serve's probes.
    """

    OPEN = frozenset({"/health"})

    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        self.app, self.keys = app, [k.encode() for k in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.OPEN or not self.keys:
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
        await _send_json(send, 401, body, {"WWW-Authenticate": "Bearer"})


class Admission:
    """Bounds the generation requests one ingress replica holds (running plus queued) at ``limit``;
    past it a request gets 429 with Retry-After at once instead of waiting without end. Counts what
    it holds, admitted and refused."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit
        self.active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            COUNTERS["rejected"] += 1
            message = (
                f"the server is busy: {self.active} requests running or queued (serve.max_queue); retry later"
            )
            body = error_body(message, "server_busy", None, "rate_limit_exceeded")
            await _send_json(send, 429, body, {"Retry-After": "1"})
            return
        self.active += 1
        COUNTERS["requests"] += 1
        COUNTERS["active"] = self.active
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1
            COUNTERS["active"] = self.active


class Timeout:
    """Cuts off a generation request still running after ``seconds``: 504 before its response
    starts, an error event and ``[DONE]`` in a stream already flowing. Its calls to the engine's
    replica are cancelled, which aborts the sequences and frees their slots."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app, self.seconds = app, seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        tracked = _Tracked(send)
        token = IN_FLIGHT.set(calls := [])
        try:
            await asyncio.wait_for(self.app(scope, receive, tracked), self.seconds)
        except asyncio.TimeoutError:
            # Cancelling this coroutine leaves the engine's replica generating: cancel its calls.
            for call in calls:
                call.cancel()
            COUNTERS["timed_out"] += 1
            message = f"the request ran past serve.request_timeout_s ({self.seconds:g} s) and was stopped"
            body = error_body(message, "timeout", None, "request_timeout")
            if not tracked.started:
                await _send_json(send, 504, body)
            elif not tracked.done:
                await _end_stream(send, body)
        finally:
            IN_FLIGHT.reset(token)


def build_api(*, api_keys: list[str], max_body_bytes: int, max_active: int, timeout_s: float) -> FastAPI:
    """The ingress's FastAPI app: Ray Serve LLM's routes are added to it by ``make_fastapi_ingress``.
    Middleware runs outermost first: errors, keys, body limit, queue bound, timeout."""
    api = FastAPI(title="rayllm", docs_url=None, redoc_url=None)
    api.add_middleware(Timeout, seconds=timeout_s)
    api.add_middleware(Admission, limit=max_active)
    api.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    api.add_middleware(BearerAuth, keys=api_keys)  # strangers never reach the body
    api.add_middleware(OpenAIErrors)

    @api.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(exc.errors()))
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @api.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 413:
            return JSONResponse(too_large(max_body_bytes), status_code=413)
        return JSONResponse(error_body(str(exc.detail), _kind(exc.status_code)), status_code=exc.status_code)

    return api
