"""What rayllm adds to vLLM's OpenAI app, as ASGI middleware on it inside the engine's replica: API
keys (401), the body limit (413), the ``serve`` config's request limits (400), a bounded queue (429 +
Retry-After), the request timeout (504, or an error event mid-stream), ``/health`` with the
replica's counters, and every error in OpenAI's format with a 4xx status for a bad request (a server
never dies on one)."""

from __future__ import annotations

import asyncio
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
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rayllm.model.chat import FALLBACK_CHAT_STOP

log = logging.getLogger("rayllm.serve")

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
# What this replica holds, admitted, refused (429) and cut off (504), for /health (one replica, one
# process, one app).
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
    send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    raw = json.dumps(body, ensure_ascii=False).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    head += headers or []
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


_PARAMETER = re.compile(r"\s*\(parameter=(\w+)\)$")  # how vLLM names the field at fault


def _openai_error(
    status: int, message: str, param: str | None = None, code: str | None = None, type: str | None = None
) -> dict[str, Any]:
    """OpenAI's error for ``status``: a snake_case ``type`` kept, else one by the status (vLLM writes
    its exception's class name there), and the parameter vLLM names at the end of its message."""
    named = _PARAMETER.search(message)
    if named:
        param, message = param or named.group(1), message[: named.start()]
    kind = type if type and re.fullmatch(r"[a-z]+(_[a-z]+)*", type) else _kind(status)
    return error_body(message, kind, param, code)


_BODY_HEADERS = frozenset({b"content-length", b"content-type"})


class _ErrorShape:
    """Wraps ``send``: a response with an error status leaves in OpenAI's form (``_openai_error``)."""

    def __init__(self, send: Send) -> None:
        self.send, self.start, self.chunks = send, None, []

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] >= 400:
            self.start = message  # held until its body is known
            return
        if self.start is None or message["type"] != "http.response.body":
            await self.send(message)
            return
        self.chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        status, raw = self.start["status"], b"".join(self.chunks)
        try:
            error = json.loads(raw).get("error")
        except (ValueError, AttributeError):
            error = None
        if isinstance(error, dict):
            message, kind = str(error.get("message") or ""), error.get("type")
            body = _openai_error(status, message, error.get("param"), error.get("code"), kind)
        else:
            body = error_body(raw.decode(errors="replace") or f"HTTP {status}", _kind(status))
        kept = [(k, v) for k, v in self.start.get("headers", []) if k.lower() not in _BODY_HEADERS]
        self.start, self.chunks = None, []
        await _send_json(self.send, status, body, kept)


class OpenAIErrors:
    """Every error leaves in OpenAI's format: a response with an error status is rewritten
    (``_ErrorShape``), and an exception from the routes gets its ``status_code`` where it has one, else
    500 with the reason, logged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        shaped = _ErrorShape(send)
        tracked = _Tracked(shaped)
        try:
            await self.app(scope, receive, tracked)
        except Exception as e:
            status = getattr(e, "status_code", None)
            if not isinstance(status, int) or not 400 <= status < 600:
                status = 500
                log.exception("request failed")
            if tracked.started and shaped.start is None:
                if not tracked.done:  # mid-stream: say it as an event, then end the stream
                    await _end_stream(send, error_body(str(getattr(e, "message", e)), _kind(status)))
                return
            message = str(getattr(e, "message", None) or getattr(e, "detail", None) or e)
            await _send_json(send, status, _openai_error(status, message, getattr(e, "param", None)))


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

        try:
            await self.app(scope, limited_receive, send)
        except StarletteHTTPException as e:  # raised where the body is read outside FastAPI's routes
            if e.status_code != 413:
                raise
            await _send_json(send, 413, too_large(self.max_bytes))


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
        await _send_json(send, 401, body, [(b"www-authenticate", b"Bearer")])


class Admission:
    """Bounds the generation requests this replica holds (running plus queued) at ``limit``;
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
            await _send_json(send, 429, body, [(b"retry-after", b"1")])
            return
        self.active += 1
        COUNTERS["requests"] += 1
        COUNTERS["active"] = self.active
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1
            COUNTERS["active"] = self.active


class RequestLimits:
    """The ``serve`` config's limits on a generation request, checked on its JSON before vLLM reads
    it (vLLM validates the rest): ``n`` up to ``max_n``, ``max_tokens`` up to ``max_tokens_limit``
    and ``default_max_tokens`` where left out, at least one chat message, and for a model without a
    chat template the fallback template's stop string (a base model writes the next turn itself)."""

    def __init__(
        self, app: ASGIApp, *, max_n: int, max_tokens_limit: int, default_max_tokens: int, fallback_chat: bool
    ) -> None:
        self.app, self.max_n = app, max_n
        self.max_tokens_limit, self.default_max_tokens = max_tokens_limit, default_max_tokens
        self.fallback_chat = fallback_chat

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:  # the whole body (BodyLimit, outside, bounds it)
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending it
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None  # vLLM's validation says what is wrong with it
        if isinstance(body, dict):
            self._apply(body, chat=scope["path"] == "/v1/chat/completions")
            raw = json.dumps(body, ensure_ascii=False).encode()
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
            scope = {**scope, "headers": [*headers, (b"content-length", str(len(raw)).encode())]}
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # a disconnect, for a stream that is watching for one
            replayed = True
            return {"type": "http.request", "body": raw, "more_body": False}

        await self.app(scope, replay, send)

    def _apply(self, body: dict[str, Any], chat: bool) -> None:
        n = body.get("n")
        if isinstance(n, int) and not isinstance(n, bool) and n > self.max_n:
            message = f"n: at most {self.max_n} (serve.max_n, and no more than serve.max_batch)"
            raise RequestError(message, "n")
        newer = chat and body.get("max_completion_tokens") is not None
        field = "max_completion_tokens" if newer else "max_tokens"
        tokens = body.get(field)
        if tokens is None:
            body[field] = self.default_max_tokens
        elif isinstance(tokens, int) and tokens > self.max_tokens_limit:
            raise RequestError(f"{field}: at most {self.max_tokens_limit} (serve.max_tokens_limit)", field)
        if not chat:
            return
        if body.get("messages") == []:
            raise RequestError("messages: must hold at least one message", "messages")
        stop = body.get("stop")
        if self.fallback_chat and (stop is None or isinstance(stop, (str, list))):
            body["stop"] = [*([stop] if isinstance(stop, str) else stop or []), FALLBACK_CHAT_STOP]


class Timeout:
    """Cuts off a generation request still running after ``seconds``: 504 before its response
    starts, an error event and ``[DONE]`` in a stream already flowing. vLLM is told what a client
    that hangs up tells it, ``http.disconnect``, and so aborts the sequences, which frees their slots
    (cancelling its handler would not: its generation runs on in a task of its own)."""

    GRACE_S = 5.0  # for vLLM's handler to stop once told; cancelled past it

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app, self.seconds = app, seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        tracked = _Tracked(send)
        expired = asyncio.Event()

        async def client_receive() -> Message:
            """The client's messages until the deadline, then a disconnect."""
            if not expired.is_set():
                reading = asyncio.ensure_future(receive())
                deadline = asyncio.ensure_future(expired.wait())
                try:
                    await asyncio.wait({reading, deadline}, return_when=asyncio.FIRST_COMPLETED)
                finally:  # also when the handler is cancelled while it waits
                    deadline.cancel()
                    if not reading.done():
                        reading.cancel()
                if not reading.cancelled():
                    return reading.result()
            return {"type": "http.disconnect"}

        async def client_send(message: Message) -> None:
            if not expired.is_set():  # past the deadline, what vLLM still sends goes nowhere
                await tracked(message)

        task = asyncio.ensure_future(self.app(scope, client_receive, client_send))
        try:
            done, _ = await asyncio.wait({task}, timeout=self.seconds)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if done:
            task.result()
            return
        expired.set()
        try:
            await asyncio.wait_for(task, self.GRACE_S)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this request itself is being cancelled, not only vLLM's handler
        except Exception:  # what a handler whose client left raises is no news
            log.debug("a timed-out request ended with an exception", exc_info=True)
        COUNTERS["timed_out"] += 1
        message = f"the request ran past serve.request_timeout_s ({self.seconds:g} s) and was stopped"
        body = error_body(message, "timeout", None, "request_timeout")
        if not tracked.started:
            await _send_json(send, 504, body)
        elif not tracked.done:
            await _end_stream(send, body)


def install(
    app: FastAPI,
    *,
    api_keys: list[str],
    max_body_bytes: int,
    max_active: int,
    timeout_s: float,
    limits: dict[str, Any],
    health: dict[str, Any],
) -> None:
    """Add rayllm's layer to vLLM's app (already built, so its cached middleware stack is dropped
    and rebuilt, as Ray Serve LLM adds its own). Middleware runs outermost first: errors, keys, body
    limit, request limits, queue bound, timeout. ``/health`` (open without a key) answers ``health``
    plus the counters, in place of vLLM's empty one."""
    app.router.routes = [r for r in app.router.routes if not (isinstance(r, Route) and r.path == "/health")]

    @app.get("/health")
    async def _health() -> dict[str, Any]:
        return {"status": "ok", **health, **COUNTERS}

    app.middleware_stack = None
    app.add_middleware(Timeout, seconds=timeout_s)
    app.add_middleware(Admission, limit=max_active)
    app.add_middleware(RequestLimits, **limits)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(BearerAuth, keys=api_keys)  # strangers never reach the body
    app.add_middleware(OpenAIErrors)

    @app.exception_handler(RequestValidationError)  # in place of vLLM's: names the field and its type
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(exc.errors()))
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 413:
            return JSONResponse(too_large(max_body_bytes), status_code=413)
        return JSONResponse(error_body(str(exc.detail), _kind(exc.status_code)), status_code=exc.status_code)
