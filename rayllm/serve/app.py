"""The Ray Serve application: an OpenAI-compatible FastAPI ingress in front of the generation engine.

One deployment, ``LLMServer``: each replica loads the model once and runs one continuous batch
(``engine.py``). Requests enter that batch through ``@serve.batch``, which groups arrivals within
``batch_wait_ms`` into one prefill of up to ``max_batch`` sequences; replicas scale between
``replicas.min`` and ``replicas.max`` on ``target_ongoing_requests``. Every failure a client can cause
is a 4xx in OpenAI's error format, raised before the engine sees the request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jinja2
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve import Application
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rayllm.config import ServeConfig, validate_config
from rayllm.runtime import exported_model_dir, model_folder, worker_env
from rayllm.serve.engine import Engine, GenerationStream, Output, SamplingParams, TokenLogprob
from rayllm.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    error_body,
)

log = logging.getLogger("rayllm.serve")

APP_NAME = "rayllm"
# For tokenizers without a chat template (base models such as the ones `rayllm train` exports):
# "System: ...\nUser: ...\nAssistant:" turns. A base model then tends to write the next "User:" turn
# itself, so that is also a stop string whenever this template is in use.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
FALLBACK_CHAT_STOP = "\nUser:"
UNION_HINTS = {
    "prompt": "must be a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "must be a string or a list of at most 16 strings",
    "content": "must be a string or a list of {type: text, text} parts",
}


def _sequence_count(groups: list[list[Any]]) -> int:
    return sum(len(g) for g in groups)


@serve.deployment(name="LLMServer")
@serve.ingress()
class LLMServer:
    """One replica: the engine, the tokenizer-side request handling, and the HTTP routes."""

    def __init__(self, serve_cfg: dict[str, Any], model_dir: str, model_name: str) -> None:
        self.cfg = ServeConfig.model_validate(serve_cfg)
        device = "cuda" if self.cfg.gpus_per_replica > 0 and torch.cuda.is_available() else "cpu"
        self.engine = Engine(model_dir, device=device, dtype=self.cfg.dtype, max_batch=self.cfg.max_batch)
        self.tokenizer = self.engine.tokenizer
        self.model_name = model_name
        self.created = int(time.time())
        self.chat_template = self.tokenizer.chat_template or FALLBACK_CHAT_TEMPLATE
        self.chat_stops = () if self.tokenizer.chat_template else (FALLBACK_CHAT_STOP,)
        self._admit.set_max_batch_size(self.cfg.max_batch)
        self._admit.set_batch_wait_timeout_s(self.cfg.batch_wait_ms / 1000)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self)

    async def check_health(self) -> None:
        self.engine.check_health()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, batch_size_fn=_sequence_count)
    async def _admit(self, groups: list[list[Any]]) -> list[None]:
        """Dynamic batching: arrivals within ``batch_wait_ms`` start together in one prefill."""
        for group in groups:
            self.engine.add(group)
        return [None] * len(groups)

    async def _submit(self, stream: GenerationStream) -> None:
        size = self.cfg.max_batch
        seqs = stream.sequences
        await asyncio.gather(*(self._admit(seqs[i : i + size]) for i in range(0, len(seqs), size)))

    # ------------------------------------------------------------------------------ validation
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(
                404,
                f"model {model!r} does not exist; this server serves {self.model_name!r}",
                "model",
                "model_not_found",
            )

    def check_token_ids(self, ids: list[int], param: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.engine.vocab_size]
        if bad:
            raise APIError(
                400, f"token id {bad[0]} is outside the vocabulary [0, {self.engine.vocab_size})", param
            )

    def completion_prompts(self, prompt: str | list[Any]) -> list[list[int]]:
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], str)):
            texts = [prompt] if isinstance(prompt, str) else prompt
            prompts = [list(ids) for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"]]
        else:
            prompts = [prompt] if isinstance(prompt[0], int) else prompt
            for ids in prompts:
                self.check_token_ids(ids, "prompt")
        # An empty text starts from the document boundary, as OpenAI's models do with "<|endoftext|>".
        tok = self.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if start is None and not all(prompts):
            raise APIError(
                400, "prompt is empty and this tokenizer has no BOS/EOS token to start from", "prompt"
            )
        return [ids or [start] for ids in prompts]

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.text} for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(
                messages, chat_template=self.chat_template, add_generation_prompt=True, tokenize=False
            )
        except jinja2.TemplateError as e:
            raise APIError(400, f"messages do not fit the model's chat template: {e}", "messages") from None
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def max_tokens(self, requested: int | None, prompts: list[list[int]], echo: bool = False) -> int:
        """The generation budget, checked against the server limit and the model's context."""
        ctx, longest = self.engine.max_context, max(len(p) for p in prompts)
        if requested is None:
            budget = min(self.cfg.default_max_tokens, self.cfg.max_tokens_limit, ctx - longest)
            if budget <= 0 and not (echo and longest <= ctx):
                raise APIError(
                    400,
                    f"the prompt has {longest} tokens, which leaves no room in the model's context of "
                    f"{ctx} tokens",
                    "prompt",
                    "context_length_exceeded",
                )
            return max(budget, 0)
        if requested > self.cfg.max_tokens_limit:
            raise APIError(
                400,
                f"max_tokens={requested} exceeds this server's limit of {self.cfg.max_tokens_limit}",
                "max_tokens",
            )
        if longest + requested > ctx:
            raise APIError(
                400,
                f"this model's maximum context length is {ctx} tokens, but the prompt has {longest} "
                f"tokens and max_tokens is {requested}; shorten the prompt or lower max_tokens",
                "max_tokens",
                "context_length_exceeded",
            )
        return requested

    def check_n(self, n: int) -> None:
        if n > self.cfg.max_batch:
            raise APIError(400, f"n={n} exceeds this server's max_batch of {self.cfg.max_batch}", "n")

    # ------------------------------------------------------------------------------ completions
    async def completions(self, req: CompletionRequest) -> Response:
        self.check_model(req.model)
        self.check_n(req.n)
        prompts = self.completion_prompts(req.prompt)
        params = SamplingParams(
            max_tokens=self.max_tokens(req.max_tokens, prompts, echo=req.echo),
            temperature=req.temperature,
            top_p=req.top_p,
            stop=req.stop_strings,
            seed=req.seed,
            logprobs=req.logprobs,
            prompt_logprobs=req.echo and req.logprobs is not None,
            ignore_eos=req.ignore_eos,
        )
        stream = self.engine.new_stream(prompts, params, req.n)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}
        usage = _Usage(sum(len(p) for p in prompts))
        choices = self._completion_deltas(req, stream, prompts, usage)
        if req.stream:
            return _sse(self._completion_chunks(req, choices, meta, usage))
        texts, reasons, logprobs = self._start_choices(len(stream.sequences))
        async for index, text, entries, reason in choices:
            texts[index] += text
            logprobs[index] += entries
            reasons[index] = reason or reasons[index]
        body = [
            {
                "index": i,
                "text": texts[i],
                "logprobs": _legacy_logprobs(logprobs[i]) if req.logprobs is not None else None,
                "finish_reason": reasons[i],
            }
            for i in range(len(texts))
        ]
        return JSONResponse({**meta, "object": "text_completion", "choices": body, "usage": usage.body()})

    async def _completion_deltas(
        self, req: CompletionRequest, stream: GenerationStream, prompts: list[list[int]], usage: _Usage
    ) -> AsyncIterator[tuple[int, str, list[TokenLogprob], str | None]]:
        """(choice, text, log-prob entries, finish reason) per engine output; the echo goes first.

        Log-prob entries carry ``text_offset`` into the choice's whole text (echo included), as
        OpenAI's legacy API reports it.
        """
        echo = [self.engine.prompt_pieces(p) for p in prompts] if req.echo else None
        started = [False] * len(stream.sequences)
        async for out in self._run(stream):
            usage.add(out)
            text, entries, base = out.text, out.logprobs or [], 0
            if echo is not None:
                pieces = echo[out.index // req.n]
                base = sum(len(piece) for piece in pieces)
                for entry in entries:
                    entry.text_offset += base
                if not started[out.index]:
                    scored, offset = out.prompt_logprobs or [], 0
                    for entry, piece in zip(scored, pieces if scored else [], strict=True):
                        entry.text_offset, offset = offset, offset + len(piece)
                    text, entries = "".join(pieces) + text, scored + entries
            started[out.index] = True
            if text or entries or out.finish_reason is not None:
                yield out.index, text, entries, out.finish_reason

    async def _completion_chunks(
        self,
        req: CompletionRequest,
        deltas: AsyncIterator[tuple[int, str, list[TokenLogprob], str | None]],
        meta: dict[str, Any],
        usage: _Usage,
    ) -> AsyncIterator[dict[str, Any]]:
        async for index, text, entries, reason in deltas:
            choice = {
                "index": index,
                "text": text,
                "logprobs": _legacy_logprobs(entries) if req.logprobs is not None else None,
                "finish_reason": reason,
            }
            yield {**meta, "object": "text_completion", "choices": [choice]}
        if req.include_usage:
            yield {**meta, "object": "text_completion", "choices": [], "usage": usage.body()}

    # ------------------------------------------------------------------------------------- chat
    async def chat(self, req: ChatCompletionRequest) -> Response:
        self.check_model(req.model)
        self.check_n(req.n)
        prompt = self.chat_prompt(req)
        params = SamplingParams(
            max_tokens=self.max_tokens(req.requested_max_tokens, [prompt]),
            temperature=req.temperature,
            top_p=req.top_p,
            stop=req.stop_strings + self.chat_stops,
            seed=req.seed,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            ignore_eos=req.ignore_eos,
        )
        stream = self.engine.new_stream([prompt], params, req.n)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}
        usage = _Usage(len(prompt))
        if req.stream:
            return _sse(self._stream_chat(req, stream, meta, usage))
        texts, reasons, logprobs = self._start_choices(req.n)
        async for out in self._run(stream):
            texts[out.index] += out.text
            logprobs[out.index] += out.logprobs or []
            reasons[out.index] = out.finish_reason or reasons[out.index]
            usage.add(out)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": texts[i]},
                "logprobs": {"content": _chat_logprobs(logprobs[i])} if req.logprobs else None,
                "finish_reason": reasons[i],
            }
            for i in range(req.n)
        ]
        return JSONResponse({**meta, "object": "chat.completion", "choices": choices, "usage": usage.body()})

    async def _stream_chat(
        self, req: ChatCompletionRequest, stream: GenerationStream, meta: dict[str, Any], usage: _Usage
    ) -> AsyncIterator[dict[str, Any]]:
        chunk = {**meta, "object": "chat.completion.chunk"}
        for i in range(req.n):
            role = {
                "index": i,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            yield {**chunk, "choices": [role]}
        async for out in self._run(stream):
            usage.add(out)
            if not out.text and not out.logprobs and out.finish_reason is None:
                continue
            choice = {
                "index": out.index,
                "delta": {"content": out.text} if out.text else {},
                "logprobs": {"content": _chat_logprobs(out.logprobs or [])} if req.logprobs else None,
                "finish_reason": out.finish_reason,
            }
            yield {**chunk, "choices": [choice]}
        if req.include_usage:
            yield {**chunk, "choices": [], "usage": usage.body()}

    # ---------------------------------------------------------------------------------- helpers
    async def _run(self, stream: GenerationStream) -> AsyncIterator[Output]:
        """Admit a request's sequences and yield their outputs; cancels them if the caller goes away."""
        try:
            await self._submit(stream)
            async for out in stream:
                yield out
        finally:
            stream.cancel()

    @staticmethod
    def _start_choices(n: int) -> tuple[list[str], list[str | None], list[list[TokenLogprob]]]:
        return [""] * n, [None] * n, [[] for _ in range(n)]

    def health(self) -> dict[str, Any]:
        self.engine.check_health()
        return {
            "status": "ok",
            "model": self.model_name,
            "max_context": self.engine.max_context,
            "active": self.engine.active,
            "pending": self.engine.pending,
            **self.engine.stats,
        }

    def models(self) -> dict[str, Any]:
        card = {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "rayllm",
            "max_model_len": self.engine.max_context,
        }
        return {"object": "list", "data": [card]}

    def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        self.check_model(req.model)
        ids = list(self.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"])
        return {"tokens": ids, "count": len(ids), "max_model_len": self.engine.max_context}

    def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]:
        self.check_model(req.model)
        self.check_token_ids(req.tokens, "tokens")
        return {"prompt": self.tokenizer.decode(req.tokens)}


class _Usage:
    """Token counts of one request; prompt tokens count once per prompt, not once per choice."""

    def __init__(self, prompt_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0

    def add(self, out: Output) -> None:
        if out.finish_reason is not None:
            self.completion_tokens += out.completion_tokens

    def body(self) -> dict[str, int]:
        total = self.prompt_tokens + self.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": total,
        }


def _top_dict(entry: TokenLogprob) -> dict[str, float] | None:
    """The alternatives plus the chosen token (OpenAI always includes it); None for an unscored token."""
    if entry.logprob is None:
        return None
    top = {token: value for _, token, value in entry.top}
    top.setdefault(entry.token, entry.logprob)
    return top


def _legacy_logprobs(entries: list[TokenLogprob]) -> dict[str, list[Any]]:
    """OpenAI's legacy ``logprobs`` object (the first echoed prompt token has null log-probs)."""
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [_top_dict(e) for e in entries],
        "text_offset": [e.text_offset for e in entries],
    }


def _chat_logprobs(entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    def item(token: str, logprob: float | None) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return [{**item(e.token, e.logprob), "top_logprobs": [item(t, v) for _, t, v in e.top]} for e in entries]


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


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts: list[str] = []
    params: list[str] = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if p != "body"]
        if err["type"] == "json_invalid":
            return f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}", None
        field = next((p for p in reversed(loc) if p in UNION_HINTS), None)
        name = ".".join(loc[: loc.index(field) + 1]) if field else ".".join(loc)
        msg = UNION_HINTS[field] if field else err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown parameter"
        text = f"{name}: {msg}" if name else msg
        if text not in parts:
            parts.append(text)
            params.append(name)
    return "; ".join(parts), (params[0] or None) if params else None


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


def build_api(server: LLMServer) -> FastAPI:
    """The replica's FastAPI app; built per replica so ``max_body_bytes`` comes from its config."""
    limit = server.cfg.max_body_bytes
    api = FastAPI(title="rayllm", docs_url=None, redoc_url=None)
    api.add_middleware(_BodyLimit, max_bytes=limit)

    @api.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @api.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
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
        return await server.completions(body)

    @api.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> Response:
        return await server.chat(body)

    @api.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        return server.tokenize(body)

    @api.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        return server.detokenize(body)

    return api


# ---------------------------------------------------------------------------------- app building
def resolve_model_dir(serve_cfg: ServeConfig, run_dir: str | None) -> str:
    """``serve.model_dir``, else the run's exported model (``train/summary.json`` ``export_dir``)."""
    return exported_model_dir(serve_cfg.model_dir, "serve.model_dir", run_dir)


def model_name(serve_cfg: ServeConfig, model_dir: str) -> str:
    return serve_cfg.model_name or Path(model_dir).name


def build_app(serve_cfg: ServeConfig, model_dir: str) -> Application:
    """The Serve application for ``model_dir`` with replicas, resources and batching from ``serve_cfg``."""
    model_dir = model_folder(Path(model_dir).expanduser(), f"model_dir={model_dir}", "serve.model_dir")
    replicas = serve_cfg.replicas
    gpu = serve_cfg.gpus_per_replica > 0
    return LLMServer.options(
        autoscaling_config={
            "min_replicas": replicas.min,
            "initial_replicas": max(replicas.min, 1),
            "max_replicas": replicas.max,
            "target_ongoing_requests": replicas.target_ongoing_requests,
        },
        # Requests beyond a full batch wait in the engine's queue, which is cheaper than Serve's.
        max_ongoing_requests=4 * serve_cfg.max_batch,
        ray_actor_options={
            "num_cpus": serve_cfg.cpus_per_replica,
            "num_gpus": serve_cfg.gpus_per_replica,
            "runtime_env": {"env_vars": worker_env(use_gpu=gpu)},
        },
        health_check_period_s=10,
        health_check_timeout_s=60,
    ).bind(serve_cfg.model_dump(mode="json"), model_dir, model_name(serve_cfg, model_dir))


def app_builder(args: dict[str, Any]) -> Application:
    """Import path for Serve's own tools: ``serve run rayllm.serve:app_builder model_dir=/path``.

    ``args`` are ``serve`` section fields (``max_batch=8``, ``replicas.max=2``) plus an optional
    ``run_dir`` whose exported model is served when ``model_dir`` is not given.
    """
    raw: dict[str, Any] = {}
    for key, value in args.items():
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    run_dir = raw.pop("run_dir", None)
    cfg = validate_config({"serve": raw}, origin="serve application args").serve
    return build_app(cfg, resolve_model_dir(cfg, run_dir))
