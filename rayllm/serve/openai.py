"""The OpenAI protocol: request schemas, errors, and ``OpenAIHandler``, which turns validated requests
into engine streams and engine outputs into OpenAI response bodies and stream chunks.

Nothing here knows about HTTP or Ray Serve (``http.py`` and ``deployment.py`` do). Requests are
validated by pydantic before any work starts: wrong types, out-of-range sampling values and unknown
fields are 400s naming the field, as OpenAI's API answers them. Parameters that OpenAI clients send
with neutral defaults (penalties, ``logit_bias``, ``best_of``, ``user``) are accepted at those values
and refused otherwise, so a client never silently gets behaviour it did not ask for. Every failure a
client can cause is an ``APIError``, raised before the engine sees the request.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Literal

import jinja2
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from rayllm.config import ServeConfig
from rayllm.model import chat
from rayllm.serve.engine import Engine, GenerationStream, Output, SamplingParams, TokenLogprob

TokenIds = list[StrictInt]
Prompt = StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
Stop = StrictStr | Annotated[list[StrictStr], Field(max_length=16)] | None
MAX_SEED = 2**63 - 1
UNION_HINTS = {
    "prompt": "must be a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "must be a string or a list of at most 16 strings",
    "content": "must be a string or a list of {type: text, text} parts",
}


class APIError(Exception):
    """An error answered in OpenAI's format: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    include_usage: bool = Field(
        True, description="send a final chunk with `usage` and no choices (on by default here)"
    )


class _SamplingFields(_Request):
    model: str | None = Field(None, description="must be the served model's id when given")
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(ge=0, le=1)] = 1.0
    n: Annotated[int, Field(ge=1, le=128)] = 1
    stop: Stop = None
    seed: Annotated[int, Field(ge=-MAX_SEED, le=MAX_SEED)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating past end-of-sequence")
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @model_validator(mode="after")
    def _unsupported(self) -> _SamplingFields:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name} is not supported by this server; send 0 or leave it out")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by this server; leave it out")
        return self

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return self.stream_options is None or self.stream_options.include_usage


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions`` (OpenAI's legacy completions API, as evaluation harnesses use it)."""

    prompt: Prompt
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    best_of: Annotated[int, Field(ge=1)] | None = None
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: Prompt) -> Prompt:
        if isinstance(v, list) and (not v or any(isinstance(p, list) and not p for p in v)):
            raise ValueError("prompt must not be an empty list")
        return v

    @model_validator(mode="after")
    def _best_of(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported; leave it out")
        return self


class TextPart(_Request):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``; the prompt is the tokenizer's chat template over ``messages``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=0)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: StrictStr
    add_special_tokens: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: TokenIds


Body = dict[str, Any] | AsyncIterator[dict[str, Any]]  # a response body, or the chunks of a stream


class OpenAIHandler:
    """The OpenAI API over one engine: tokenizer-side validation, completions, chat, tokenize.

    ``submit`` admits a request's sequences into the engine's running batch (the deployment batches
    arrivals with ``@serve.batch``); non-streaming calls return a body, streaming ones the chunks.
    """

    def __init__(
        self,
        engine: Engine,
        cfg: ServeConfig,
        model_name: str,
        submit: Callable[[GenerationStream], Awaitable[None]],
    ) -> None:
        self.engine, self.cfg, self.model_name, self.submit = engine, cfg, model_name, submit
        self.tokenizer = engine.tokenizer
        self.created = int(time.time())
        self.chat_stops = chat.stops(self.tokenizer)  # the fallback template's turn marker

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
            text = chat.render(self.tokenizer, messages, add_generation_prompt=True)
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
        if n > self.cfg.max_n:
            raise APIError(400, f"n={n} exceeds this server's limit of {self.cfg.max_n} (serve.max_n)", "n")

    # ------------------------------------------------------------------------------ completions
    async def completions(self, req: CompletionRequest) -> Body:
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
        self.check_queue()
        stream = self.engine.new_stream(prompts, params, req.n)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}
        usage = _Usage(sum(len(p) for p in prompts))
        choices = self._completion_deltas(req, stream, prompts, usage)
        if req.stream:
            return self._completion_chunks(req, choices, meta, usage)
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
        return {**meta, "object": "text_completion", "choices": body, "usage": usage.body()}

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
    async def chat(self, req: ChatCompletionRequest) -> Body:
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
        self.check_queue()
        stream = self.engine.new_stream([prompt], params, req.n)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}
        usage = _Usage(len(prompt))
        if req.stream:
            return self._stream_chat(req, stream, meta, usage)
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
        return {**meta, "object": "chat.completion", "choices": choices, "usage": usage.body()}

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
    def check_queue(self) -> None:
        """429 rather than an ever-growing queue: ``serve.max_queue`` requests may wait for a slot."""
        waiting = self.engine.waiting_requests
        if waiting >= self.cfg.max_queue:
            # About one running request's worth of time frees a slot; a second is a fair first retry.
            raise APIError(
                429,
                f"this server is at capacity ({waiting} requests waiting, serve.max_queue="
                f"{self.cfg.max_queue}); retry after a moment",
                code="rate_limit_exceeded",
                type="rate_limit_error",
                headers={"Retry-After": "1"},
            )

    async def _run(self, stream: GenerationStream) -> AsyncIterator[Output]:
        """Admit a request's sequences and yield their outputs until ``serve.request_timeout_s``;
        the sequences are cancelled (their batch rows freed) however the request ends."""
        deadline = asyncio.get_running_loop().time() + self.cfg.request_timeout_s
        try:
            await self.submit(stream)
            outputs = aiter(stream)
            while True:
                # Not ``asyncio.wait_for``: on Python 3.11 it swallows a cancellation (client gone)
                # that lands as the awaited output arrives, and the request would decode to the end.
                try:
                    async with asyncio.timeout_at(deadline):
                        out = await anext(outputs)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise APIError(
                        504,
                        f"the request was still generating after serve.request_timeout_s="
                        f"{self.cfg.request_timeout_s:g} s; ask for fewer tokens",
                        code="timeout",
                        type="server_error",
                    ) from None
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


def validation_message(errors: list[Any]) -> tuple[str, str | None]:
    """OpenAI's one-message form of pydantic's errors: the field path and what it must be."""
    parts: list[str] = []
    params: list[str] = []
    for err in errors:
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
