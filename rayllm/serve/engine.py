"""A continuous-batching generation engine on plain torch + transformers (no vLLM: it needs CUDA).

Sequences join and leave one running batch between decode steps. The batch's KV cache is a transformers
``DynamicCache`` whose rows are left-padded so that every sequence's newest token sits in the last
column: a new group is prefilled on its own, then its cache is left-padded to the running width and
concatenated along the batch axis; finished or cancelled rows are dropped with ``index_select`` and
columns that became padding for every row are trimmed. Positions come from the attention mask, so
padding never shifts a sequence. Each sequence samples with its own ``torch.Generator`` (seeded
requests reproduce), greedy when ``temperature == 0``.

The model runs in one worker thread; an asyncio task on the caller's loop schedules steps and hands
outputs back to per-request queues, so HTTP handling never waits behind a forward pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import itertools
import logging
import secrets
from collections import deque
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from rayllm.model.build import context_length

log = logging.getLogger("rayllm.serve")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GREEDY_BELOW = 1e-5  # temperatures this small are argmax: dividing logits by them only adds noise
SCORE_TOKEN_BUDGET = 1024  # prompt positions whose full-vocabulary logits one scoring forward may hold
DETOK_CONTEXT = 6  # prompt tokens kept in front of the output so leading spaces decode as in context


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-sequence generation settings, validated by the HTTP layer before they get here."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # alternatives per generated token; None: no log-probs at all
    prompt_logprobs: bool = False  # score the prompt tokens too (OpenAI `echo` + `logprobs`)
    ignore_eos: bool = False


@dataclasses.dataclass
class TokenLogprob:
    """One token's log-probability under the raw model distribution, with the top alternatives."""

    token_id: int
    token: str
    logprob: float | None  # None only for a prompt's first token, which has no context to score it
    top: list[tuple[int, str, float]]
    text_offset: int = 0  # characters of generated text before this token


@dataclasses.dataclass
class Output:
    """What one sequence produced in one engine step; ``finish_reason`` is set on its last one."""

    index: int
    text: str
    token_ids: list[int]
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


class _Detokenizer:
    """Incremental decoding that never emits half a UTF-8 character (the vLLM / TGI offsets scheme)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, context: list[int], skip_special: bool) -> None:
        self._tok = tokenizer
        self._skip = skip_special
        self._ids = list(context)
        self._prefix = 0
        self._read = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        rest = self._decode(self._ids[self._prefix :])[len(prefix_text) :]
        self._prefix = self._read = len(self._ids)
        return rest


class GenerationStream:
    """The sequences of one request (prompts x n) and the queue their outputs arrive on, in order."""

    def __init__(self, sequences: list[_Sequence]) -> None:
        self.sequences = sequences
        self.queue: asyncio.Queue[Output | BaseException] = asyncio.Queue()
        for seq in sequences:
            seq.stream = self

    def cancel(self) -> None:
        """Stop generating for this request (client gone): the engine drops its rows before the next step."""
        for seq in self.sequences:
            seq.cancelled = True

    async def __aiter__(self) -> AsyncIterator[Output]:
        """Outputs in order; whatever piled up while the consumer was busy comes merged per sequence.

        Under load a client (or Serve's proxy) reads slower than the engine steps; one chunk per
        backlog instead of one per token keeps the per-chunk cost from eating the batching gain.
        """
        remaining = len(self.sequences)
        while remaining:
            batch = [await self.queue.get()]
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            merged: dict[int, Output] = {}
            for item in batch:
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    remaining -= 1
                merged[item.index] = _merge(merged[item.index], item) if item.index in merged else item
            for out in merged.values():
                yield out


class _Sequence:
    """Engine-side state of one generated sequence."""

    def __init__(self, index: int, prompt_ids: list[int], params: SamplingParams) -> None:
        self.index = index
        self.prompt_ids = prompt_ids
        self.params = params
        self.stream: GenerationStream | None = None
        self.generated: list[int] = []
        self.text = ""
        self.emitted = 0
        self.cancelled = False
        self.finished = False
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(seed)
        self.detok: _Detokenizer | None = None


class Engine:
    """Loads a local Hugging Face causal LM and serves many concurrent sequences with one KV-cached batch."""

    def __init__(self, model_dir: str, device: str = "cpu", dtype: str = "auto", max_batch: int = 16) -> None:
        path = Path(model_dir)
        self.device = torch.device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        # The worker thread decodes with its own copy: a Rust tokenizer shared across threads can
        # raise "Already borrowed" while another thread encodes.
        self._detok_tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype).to(self.device).eval()
        self.max_batch = max_batch
        self.max_context = context_length(self.model.config, self.tokenizer)
        self.vocab_size = int(self.model.config.get_text_config().vocab_size)
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        # transformers renamed `past_key_values` to `cache` during 5.x; pass whichever this version takes.
        forward_params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in forward_params else "past_key_values"
        probe = DynamicCache(config=self.model.config)
        if any(type(layer) is not DynamicLayer for layer in probe.layers):
            raise ValueError(
                f"{model_dir}: the serve engine batches full-attention KV caches only; this model uses "
                f"{sorted({type(layer).__name__ for layer in probe.layers})}"
            )
        self._piece_cache: dict[int, str] = {}
        # Running batch; touched only inside _step, which runs on the worker thread one call at a time.
        self._rows: list[_Sequence] = []
        self._cache: DynamicCache | None = None
        self._mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        self._last = torch.zeros(0, dtype=torch.long, device=self.device)
        # Scheduling state; touched only on the event loop.
        self._pending: deque[_Sequence] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="rayllm-engine")
        self.stats = {"requests": 0, "sequences": 0, "generated_tokens": 0, "cancelled": 0, "steps": 0}

    # ------------------------------------------------------------------------------- public API
    def new_stream(self, prompts: list[list[int]], params: SamplingParams, n: int = 1) -> GenerationStream:
        """Sequences for ``prompts`` x ``n`` choices; choice i of a seeded request uses ``seed + i``."""
        seqs = []
        for index, (prompt, choice) in enumerate(itertools.product(prompts, range(n))):
            p = (
                params
                if params.seed is None or choice == 0
                else dataclasses.replace(params, seed=(params.seed + choice) % 2**63)
            )
            seqs.append(_Sequence(index, prompt, p))
        self.stats["requests"] += 1
        return GenerationStream(seqs)

    def add(self, sequences: Sequence[_Sequence]) -> None:
        """Queue sequences for the next step; call on the event loop that consumes their streams."""
        self._ensure_running()
        self._pending.extend(sequences)
        assert self._wake is not None
        self._wake.set()

    @property
    def active(self) -> int:
        return len(self._rows)

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def waiting_requests(self) -> int:
        """Requests with a sequence still waiting for a row of the running batch."""
        return len({id(s.stream) for s in self._pending if not s.cancelled})

    def check_health(self) -> None:
        """Raise if the scheduling task died, so Serve replaces the replica."""
        if self._task is not None and self._task.done():
            reason = "cancelled" if self._task.cancelled() else repr(self._task.exception())
            raise RuntimeError(f"engine loop stopped: {reason}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    def token_text(self, token_id: int) -> str:
        """The text of one token on its own (what OpenAI's ``logprobs.tokens`` lists)."""
        piece = self._piece_cache.get(token_id)
        if piece is None:
            piece = self._piece_cache[token_id] = self._detok_tokenizer.decode([token_id])
        return piece

    def prompt_pieces(self, prompt_ids: list[int]) -> list[str]:
        """Per-token text of a prompt whose concatenation is the decoded prompt (for echo and offsets)."""
        detok = _Detokenizer(self.tokenizer, [], skip_special=False)
        pieces = [detok.add(t) for t in prompt_ids]
        if pieces:
            pieces[-1] += detok.flush()
        return pieces

    # -------------------------------------------------------------------------------- scheduling
    def _ensure_running(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._loop = loop
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run(), name="rayllm-engine")

    async def _run(self) -> None:
        assert self._wake is not None and self._loop is not None
        while True:
            await self._wake.wait()
            admitted: list[_Sequence] = []
            while self._pending and len(self._rows) + len(admitted) < self.max_batch:
                seq = self._pending.popleft()
                if seq.cancelled:
                    self.stats["cancelled"] += 1
                else:
                    admitted.append(seq)
            try:
                await self._loop.run_in_executor(self._executor, self._step, admitted)
            except Exception as exc:  # a bug or OOM: fail these requests, keep serving the next ones
                log.exception("engine step failed; failing %d sequences", len(self._rows) + len(admitted))
                self._deliver([(s, exc) for s in {id(s): s for s in self._rows + admitted}.values()])
                self._reset_batch()
            if not self._rows and not self._pending:
                self._wake.clear()

    def _deliver(self, items: list[tuple[_Sequence, Output | BaseException]]) -> None:
        for seq, item in items:
            if not seq.cancelled and seq.stream is not None:
                seq.stream.queue.put_nowait(item)

    def _emit(self, items: list[tuple[_Sequence, Output | BaseException]]) -> None:
        """Hand outputs from the worker thread to the loop right away (prefill outputs are the TTFT)."""
        if items:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._deliver, items)

    # ------------------------------------------------------------------------------ worker thread
    def _step(self, admitted: list[_Sequence]) -> None:
        with torch.inference_mode():
            self._drop_rows([i for i, s in enumerate(self._rows) if s.cancelled], cancelled=True)
            if admitted:
                self._prefill(admitted)
            if self._rows:
                self._decode()
        self.stats["steps"] += 1

    def _reset_batch(self) -> None:
        self._rows, self._cache = [], None
        self._mask = self._mask[:0, :0]
        self._last = self._last[:0]

    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        all_logits: bool = False,
    ) -> torch.Tensor:
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,
            **{self._cache_kw: cache},
        )
        return out.logits.float()

    def _prefill(self, seqs: list[_Sequence]) -> None:
        emitted: list[tuple[_Sequence, Output | BaseException]] = []
        for seq in seqs:
            seq.detok = _Detokenizer(
                self._detok_tokenizer, seq.prompt_ids[-DETOK_CONTEXT:], skip_special=True
            )
        plain = [s for s in seqs if s.params.max_tokens > 0 and not s.params.prompt_logprobs]
        scoring = [s for s in seqs if s.params.prompt_logprobs]
        for seq in seqs:
            if not seq.params.max_tokens and not seq.params.prompt_logprobs:  # nothing for the model to do
                emitted.append((seq, self._finish(seq, "length", [], None)))
        groups = [(plain, False)] if plain else []
        groups += [(group, True) for group in _chunks_by_tokens(scoring, SCORE_TOKEN_BUDGET)]
        for group, all_logits in groups:
            emitted += self._prefill_group(group, all_logits)
        self._emit(emitted)

    def _prefill_group(self, seqs: list[_Sequence], all_logits: bool) -> list[tuple[_Sequence, Output]]:
        width = max(len(s.prompt_ids) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s.prompt_ids) :] = torch.tensor(s.prompt_ids)
            mask[i, width - len(s.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, mask, positions, cache, all_logits=all_logits)
        prompt_lps: list[list[TokenLogprob] | None] = [None] * len(seqs)
        if all_logits:
            for i, s in enumerate(seqs):
                prompt_lps[i] = self._prompt_logprobs(logits[i, width - len(s.prompt_ids) :], s)
        last = logits[:, -1]
        out: list[tuple[_Sequence, Output]] = []
        keep: list[int] = []
        generating = [i for i, s in enumerate(seqs) if s.params.max_tokens > 0]
        tokens, lps = (
            self._sample(last[generating], [seqs[i] for i in generating]) if generating else ([], [])
        )
        sampled = dict(zip(generating, zip(tokens, lps, strict=True), strict=True))
        for i, s in enumerate(seqs):
            if i in sampled:
                token, lp = sampled[i]
                o = self._advance(s, token, lp)
            else:
                o = self._finish(s, "length", [], None)
            o.prompt_logprobs = prompt_lps[i]
            out.append((s, o))
            if not s.finished:
                keep.append(i)
        if keep:
            index = torch.tensor(keep, device=self.device)
            cache.batch_select_indices(index)
            self._merge(
                cache,
                mask[index],
                torch.tensor([sampled[i][0] for i in keep], device=self.device),
                [seqs[i] for i in keep],
            )
        return out

    def _merge(
        self, cache: DynamicCache, mask: torch.Tensor, last: torch.Tensor, seqs: list[_Sequence]
    ) -> None:
        """Join prefilled rows to the running batch, left-padding whichever side is narrower."""
        if self._cache is None or not self._rows:
            self._cache, self._mask, self._last, self._rows = cache, mask, last, list(seqs)
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_left_pad(old.keys, width, 2), _left_pad(new.keys, width, 2)])
            old.values = torch.cat([_left_pad(old.values, width, 2), _left_pad(new.values, width, 2)])
        self._mask = torch.cat([_left_pad(self._mask, width, 1), _left_pad(mask, width, 1)])
        self._last = torch.cat([self._last, last])
        self._rows += seqs

    def _decode(self) -> None:
        positions = self._mask.sum(-1, keepdim=True)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(self._rows), 1)], dim=1)
        assert self._cache is not None
        logits = self._forward(self._last[:, None], self._mask, positions, self._cache)[:, -1]
        tokens, lps = self._sample(logits, self._rows)
        emitted: list[tuple[_Sequence, Output | BaseException]] = []
        for seq, token, lp in zip(self._rows, tokens, lps, strict=True):
            emitted.append((seq, self._advance(seq, token, lp)))
        self._emit(emitted)
        self._last = torch.tensor(tokens, device=self.device)
        self._drop_rows([i for i, s in enumerate(self._rows) if s.finished])

    def _drop_rows(self, drop: list[int], cancelled: bool = False) -> None:
        if not drop:
            return
        if cancelled:
            self.stats["cancelled"] += len(drop)
        dropped = set(drop)
        keep = [i for i in range(len(self._rows)) if i not in dropped]
        if not keep:
            self._reset_batch()
            return
        index = torch.tensor(keep, device=self.device)
        assert self._cache is not None
        self._cache.batch_select_indices(index)
        self._mask, self._last = self._mask[index], self._last[index]
        self._rows = [self._rows[i] for i in keep]
        lead = int((self._mask.sum(0) == 0).long().cumprod(0).sum())  # columns of padding in every row
        if lead:
            self._mask = self._mask[:, lead:]
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]

    # ---------------------------------------------------------------------------------- sampling
    def _sample(
        self, logits: torch.Tensor, seqs: list[_Sequence]
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """One token per row with that row's settings; log-probs come from the raw (untempered) logits.

        ``logits`` is consumed (scaled in place): on CPU every extra (rows x vocab) temporary costs about
        as much as the model's own decode step for a small model.
        """
        lps: list[TokenLogprob | None] = [None] * len(seqs)
        scored = {
            i: torch.log_softmax(logits[i], -1) for i, s in enumerate(seqs) if s.params.logprobs is not None
        }
        rows = [i for i, s in enumerate(seqs) if s.params.temperature >= GREEDY_BELOW and s.params.top_p > 0]
        tokens = logits.argmax(-1) if len(rows) < len(seqs) else torch.zeros(len(seqs), dtype=torch.long)
        if rows:
            index = torch.tensor(rows, device=logits.device)
            temps = torch.tensor([seqs[i].params.temperature for i in rows], device=logits.device)
            scaled = logits if len(rows) == len(seqs) else logits[index]
            probs = torch.softmax(scaled.div_(temps[:, None]), dim=-1)
            for j, i in enumerate(rows):
                if seqs[i].params.top_p < 1:
                    probs[j] = _nucleus(probs[j], seqs[i].params.top_p)
            # Inverse-CDF sampling: one uniform per row from its own generator. It draws exactly from the
            # distribution and is ~20x cheaper on CPU than torch.multinomial over a 50k vocabulary.
            u = torch.cat([torch.rand(1, generator=seqs[i].generator) for i in rows]).to(probs.device)
            cdf = probs.cumsum_(-1)
            choice = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
            tokens[index.to(tokens.device)] = choice[:, 0].clamp(max=logits.shape[-1] - 1).to(tokens.device)
        token_list = tokens.tolist()
        for i, logprobs in scored.items():
            lps[i] = self._logprob(logprobs, token_list[i], seqs[i].params.logprobs or 0)
        return token_list, lps

    def _logprob(self, logprobs: torch.Tensor, token_id: int, k: int) -> TokenLogprob:
        top: list[tuple[int, str, float]] = []
        if k:
            values, ids = torch.topk(logprobs, k)
            top = [(t, self.token_text(t), v) for t, v in zip(ids.tolist(), values.tolist(), strict=True)]
        return TokenLogprob(token_id, self.token_text(token_id), float(logprobs[token_id]), top)

    def _prompt_logprobs(self, logits: torch.Tensor, seq: _Sequence) -> list[TokenLogprob]:
        """Log-probability of each prompt token given the ones before it; the first has none (null)."""
        k = seq.params.logprobs or 0
        first, targets = seq.prompt_ids[0], seq.prompt_ids[1:]
        out = [TokenLogprob(first, self.token_text(first), None, [])]
        if not targets:
            return out
        logprobs = torch.log_softmax(logits[:-1], dim=-1)
        chosen = logprobs.gather(1, torch.tensor(targets, device=logprobs.device)[:, None])[:, 0].tolist()
        top_values, top_ids = logprobs.topk(k, dim=-1) if k else (None, None)
        for pos, (token, value) in enumerate(zip(targets, chosen, strict=True)):
            top = []
            if top_values is not None and top_ids is not None:
                pairs = zip(top_ids[pos].tolist(), top_values[pos].tolist(), strict=True)
                top = [(t, self.token_text(t), v) for t, v in pairs]
            out.append(TokenLogprob(token, self.token_text(token), value, top))
        return out

    # --------------------------------------------------------------------------- per-token text
    def _advance(self, seq: _Sequence, token: int, lp: TokenLogprob | None) -> Output:
        """Append a sampled token: decode it, apply stop strings / EOS / length, and say what to emit."""
        seq.generated.append(token)
        self.stats["generated_tokens"] += 1
        params = seq.params
        if token in self.eos_ids and not params.ignore_eos:
            return self._finish(seq, "stop", [token], None)
        assert seq.detok is not None
        before = len(seq.text)
        if lp is not None:
            lp.text_offset = before
        seq.text += seq.detok.add(token)
        reason = "length" if len(seq.generated) >= params.max_tokens else None
        if params.stop:
            longest = max(len(s) for s in params.stop)
            start = max(0, before - longest + 1)
            hits = [i for i in (seq.text.find(s, start) for s in params.stop) if i >= 0]
            if hits:
                seq.text = seq.text[: min(hits)]
                reason = "stop"
        if reason is not None:
            return self._finish(seq, reason, [token], lp)
        safe = len(seq.text) - _held_back(seq.text, params.stop)
        text, seq.emitted = seq.text[seq.emitted : max(safe, seq.emitted)], max(safe, seq.emitted)
        return Output(seq.index, text, [token], len(seq.generated), [lp] if lp else None)

    def _finish(self, seq: _Sequence, reason: str, tokens: list[int], lp: TokenLogprob | None) -> Output:
        if reason == "length" and seq.detok is not None and seq.params.max_tokens:
            seq.text += seq.detok.flush()
        seq.finished = True
        self.stats["sequences"] += 1
        text = seq.text[seq.emitted :]
        seq.emitted = len(seq.text)
        logprobs = [lp] if lp else ([] if seq.params.logprobs is not None else None)
        return Output(seq.index, text, tokens, len(seq.generated), logprobs, finish_reason=reason)


# ------------------------------------------------------------------------------------- helpers
def _merge(first: Output, later: Output) -> Output:
    """Two consecutive outputs of one sequence as one."""
    logprobs = None if first.logprobs is None else first.logprobs + (later.logprobs or [])
    return Output(
        first.index,
        first.text + later.text,
        first.token_ids + later.token_ids,
        later.completion_tokens,
        logprobs,
        first.prompt_logprobs,
        later.finish_reason,
    )


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # bf16 is no faster on CPUs without AMX, and fp32 keeps log-probs exact


def _eos_ids(model: Any, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest set of most likely tokens whose mass reaches ``top_p``.

    Only tokens with p >= (1 - top_p) / V are sorted: together the others weigh less than 1 - top_p, so
    they are outside the nucleus anyway, and a trained model puts most of a 50k vocabulary below that.
    """
    candidates = (probs >= (1 - top_p) / probs.numel()).nonzero().squeeze(1)
    values, order = probs[candidates].sort(descending=True)
    keep = (values.cumsum(0) - values) < top_p
    keep[0] = True
    kept = candidates[order[keep]]
    out = torch.zeros_like(probs)
    out[kept] = probs[kept]
    return out


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of ``text`` that could still become a stop string, so must not be streamed."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


def _chunks_by_tokens(seqs: list[_Sequence], budget: int) -> list[list[_Sequence]]:
    """Group scoring sequences so one forward's full logits (rows x width x vocab) stay bounded."""
    groups: list[list[_Sequence]] = []
    current: list[_Sequence] = []
    width = 0
    for seq in sorted(seqs, key=lambda s: len(s.prompt_ids)):
        new_width = max(width, len(seq.prompt_ids))
        if current and new_width * (len(current) + 1) > budget:
            groups.append(current)
            current, new_width = [], len(seq.prompt_ids)
        current.append(seq)
        width = new_width
    if current:
        groups.append(current)
    return groups
