"""Downstream tasks: generate answers for a task file, then score them with the reference libraries.

A task file is jsonl, one example per line: ``{"prompt": ..., "completion": ...}`` (the same rows
fine-tuning reads), plus ``answers`` (accepted answers, question answering) or ``tests`` (Python
asserts, code). Generation runs in Ray Data actors on the exported model (each loads it once; on GPUs
with ``eval.gpus_per_actor``), or against a served model over its OpenAI-compatible API
(``eval.endpoint``); prompts go through the model's chat template either way.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from rayllm.config import EvalConfig, EvalTaskConfig
from rayllm.errors import DataError
from rayllm.eval import metrics

log = logging.getLogger("rayllm")


def read_task(task: EvalTaskConfig) -> list[dict[str, Any]]:
    """The task file's examples; a malformed line stops with the file, line and what is wrong."""
    path = Path(task.file).expanduser()
    if not path.is_file():
        raise DataError(f"eval.tasks[{task.name}].file: {path} does not exist")
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise DataError(f"{where}: needs a string field 'prompt'")
            if not isinstance(row.get("completion"), str):
                raise DataError(f"{where}: needs a string field 'completion' (the reference answer)")
            if task.kind == "code" and not isinstance(row.get("tests"), str):
                raise DataError(f"{where}: a code task needs a string field 'tests' (asserts to run)")
            answers = row.get("answers", [row["completion"]])
            if not (isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)):
                raise DataError(f"{where}: 'answers' must be a non-empty list of strings")
            rows.append({**row, "answers": answers})
            if task.max_examples and len(rows) >= task.max_examples:
                break
    if not rows:
        raise DataError(f"eval.tasks[{task.name}].file: {path} holds no examples")
    return rows


class Generator:
    """A Ray Data actor: the model loaded once, a batch of prompts in, ``samples`` answers each out."""

    def __init__(
        self, model_dir: str, dtype: str, max_new_tokens: int, samples: int, temperature: float
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            dtype = "bf16" if self.device.type == "cuda" else "fp32"
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(self.device).eval()
        self.max_new_tokens, self.samples, self.temperature = max_new_tokens, samples, temperature

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from rayllm.model import chat

        torch = self.torch
        texts = [
            chat.render(self.tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True)
            for p in batch["prompt"]
        ]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(
            self.device
        )
        torch.manual_seed(int(batch["index"][0]))  # sampled answers reproduce
        sampling = self.samples > 1 and self.temperature > 0
        with torch.no_grad():
            out = self.model.generate(
                **enc,
                max_new_tokens=self.max_new_tokens,
                do_sample=sampling,
                temperature=self.temperature if sampling else None,
                top_p=None,
                top_k=None,
                num_return_sequences=self.samples,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        answers = self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        stops = chat.stops(self.tokenizer)
        answers = [_cut(a, stops) for a in answers]
        grouped = [answers[i * self.samples : (i + 1) * self.samples] for i in range(len(texts))]
        return {"index": batch["index"], "predictions": np.array([json.dumps(g) for g in grouped])}


def _program(text: str) -> str:
    """The code of an answer: the first fenced block when the model wrote one, else all of it."""
    match = re.search(r"```(?:python|py)?\n(.*?)(?:```|$)", text, flags=re.S)
    return match.group(1) if match else text


def _cut(text: str, stops: tuple[str, ...]) -> str:
    for stop in stops:
        text = text.split(stop, 1)[0]
    return text.strip()


def generate_local(
    model_dir: str, e: EvalConfig, task: EvalTaskConfig, prompts: list[str]
) -> list[list[str]]:
    """Answers from Ray Data actors over the exported model, in the order of ``prompts``."""
    import ray.data

    ds = ray.data.from_items([{"index": i, "prompt": p} for i, p in enumerate(prompts)])
    samples = task.samples
    out = ds.map_batches(
        Generator,
        fn_constructor_kwargs={
            "model_dir": model_dir,
            "dtype": e.dtype,
            "max_new_tokens": task.max_new_tokens,
            "samples": samples,
            "temperature": task.temperature,
        },
        batch_size=e.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=e.actors),
        num_cpus=e.cpus_per_actor,
        num_gpus=e.gpus_per_actor,
    )
    answers: dict[int, list[str]] = {}
    t0, shown = time.time(), 0.0
    for b in out.iter_batches(batch_format="numpy", batch_size=None):
        for i, p in zip(b["index"], b["predictions"], strict=True):
            answers[int(i)] = json.loads(p)
        if time.time() - shown > 10:  # progress on a long generation, every 10 s at most
            shown = time.time()
            log.info(
                "eval %s: %d of %d prompts answered (%.0f s)",
                task.name,
                len(answers),
                len(prompts),
                shown - t0,
            )
    return [answers[i] for i in range(len(prompts))]


def generate_remote(
    endpoint: str, model: str | None, task: EvalTaskConfig, prompts: list[str]
) -> list[list[str]]:
    """Answers from a served model over its OpenAI-compatible chat API (8 requests at a time)."""
    import os

    import httpx

    headers = (
        {"Authorization": f"Bearer {os.environ['OPENAI_API_KEY']}"} if "OPENAI_API_KEY" in os.environ else {}
    )
    with httpx.Client(base_url=endpoint.rstrip("/"), timeout=300, headers=headers, trust_env=False) as client:
        name = model or client.get("/models").json()["data"][0]["id"]

        def ask(i: int) -> list[str]:
            body = {
                "model": name, "messages": [{"role": "user", "content": prompts[i]}], "n": task.samples,
                "max_tokens": task.max_new_tokens, "temperature": task.temperature if task.samples > 1 else 0,
                "seed": i,
            }  # fmt: skip
            r = client.post("/chat/completions", json=body)
            if r.status_code != 200:
                raise DataError(
                    f"eval.endpoint {endpoint}: HTTP {r.status_code} for {task.name}: {r.text[:200]}"
                )
            return [c["message"]["content"].strip() for c in r.json()["choices"]]

        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(ask, range(len(prompts))))


def score(
    task: EvalTaskConfig, rows: list[dict[str, Any]], answers: list[list[str]]
) -> tuple[dict[str, float], Iterator[dict[str, Any]]]:
    """The task's metrics, and one record per example (for ``predictions.jsonl``)."""
    first = [a[0] for a in answers]
    refs = [r["completion"] for r in rows]
    records = [
        {"prompt": r["prompt"], "reference": r["completion"], "predictions": a}
        for r, a in zip(rows, answers, strict=True)
    ]
    if task.kind == "translation":
        figures = metrics.translation(first, refs, task.target_lang)
    elif task.kind == "summarization":
        figures = metrics.summarization(first, refs)
    elif task.kind == "qa":
        figures = metrics.question_answering(first, [r["answers"] for r in rows])
    elif task.kind == "classification":
        figures = metrics.classification(first, refs)
    else:
        results = [
            [metrics.run_tests(_program(c), r["tests"], task.timeout_s, task.memory_mb) for c in a]
            for r, a in zip(rows, answers, strict=True)
        ]
        for record, res in zip(records, results, strict=True):
            record["passed"] = [x["passed"] for x in res]
            record["reasons"] = [x["reason"] for x in res]
        figures = metrics.pass_at_k([[x["passed"] for x in res] for res in results], task.k)
    return {k: round(v, 3) for k, v in figures.items()}, iter(records)
