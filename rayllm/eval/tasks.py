"""Downstream tasks: generate answers for a task file, then score them with the reference libraries.

A task file is jsonl, one example per line: ``{"prompt": ..., "completion": ...}`` (the same rows
fine-tuning reads), plus ``answers`` (accepted answers, question answering) or ``tests`` (Python
asserts, code). Answers come from vLLM, the engine ``rayllm serve`` runs: through Ray Data's LLM
processor (``ray.data.llm``) over the exported model (on GPUs with ``eval.gpus_per_actor``), or from
a served model over its OpenAI-compatible API (``eval.endpoint``); prompts go through the model's
chat template either way, so greedy answers are the same both ways.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rayllm.config import EvalConfig, EvalTaskConfig
from rayllm.errors import DataError
from rayllm.eval import metrics
from rayllm.progress import Count


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


def _program(text: str) -> str:
    """The code of an answer: the first fenced block when the model wrote one, else all of it."""
    match = re.search(r"```(?:python|py)?\n(.*?)(?:```|$)", text, flags=re.S)
    return match.group(1) if match else text


def _request(row: dict[str, Any], stop: list[str]) -> dict[str, Any]:
    """Ray Data LLM's input row for one answer: the prompt's token ids and vLLM's sampling settings."""
    params = {
        "max_tokens": int(row["max_tokens"]),
        "temperature": float(row["temperature"]),
        "seed": int(row["seed"]),
    }
    if stop:
        params["stop"] = stop
    return {"tokenized_prompt": row["ids"], "sampling_params": params, "key": row["key"]}


def _answer(row: dict[str, Any]) -> dict[str, Any]:
    return {"key": row["key"], "text": row["generated_text"]}


def _processor(model_dir: str, e: EvalConfig, context: int, stop: list[str]) -> Any:
    """Ray Data LLM's vLLM processor: token ids and sampling settings in, answer text out."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from rayllm.model.engine import resolve_dtype, vllm_bundles, vllm_engine_kwargs

    gpus = e.gpus_per_actor
    dtype = resolve_dtype(e.dtype, gpu=gpus > 0)
    return build_processor(
        vLLMEngineProcessorConfig(
            model_source=model_dir,
            engine_kwargs=vllm_engine_kwargs(
                dtype=dtype, gpus=gpus, max_model_len=context, kv_cache_gb=e.kv_cache_gb
            ),
            batch_size=e.batch_size,
            concurrency=e.actors,
            placement_group_config={"bundles": vllm_bundles(e.cpus_per_actor, gpus)},
            chat_template_stage=False,  # rendered above, with rayllm's fallback where the model has none
            tokenize_stage=False,
            detokenize_stage=False,  # vLLM detokenizes and applies the stop strings itself
            log_engine_metrics=False,
        ),
        preprocess=functools.partial(_request, stop=stop),
        postprocess=_answer,
    )


def generate_local(
    model_dir: str, e: EvalConfig, prompts: dict[str, list[str]]
) -> dict[str, list[list[str]]]:
    """Every task's answers from one Ray Data LLM processor (vLLM in ``eval.actors`` actors, each
    loading the model once) over the exported model: ``samples`` per prompt, by task name, in the
    order of its prompts.

    Prompts go through the model's chat template (or rayllm's fallback) here and reach vLLM as token
    ids, as serve's chat endpoint tokenizes them (no second beginning-of-sequence token). A sample
    is one request with its own seed, so sampled answers reproduce; a prompt that leaves the model's
    context less room than ``max_new_tokens`` gets the room there is.
    """
    import ray.data
    from transformers import AutoConfig, AutoTokenizer

    from rayllm.model import chat
    from rayllm.model.build import context_length
    from rayllm.runtime import ray_init_again_quietly

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    context = context_length(AutoConfig.from_pretrained(model_dir), tokenizer)
    tasks = {t.name: t for t in e.tasks if t.name in prompts}
    answers = {name: [[""] * t.samples for _ in prompts[name]] for name, t in tasks.items()}
    rows = []
    for name, task in tasks.items():
        temperature = task.temperature if task.samples > 1 else 0.0  # one answer: greedy
        for i, prompt in enumerate(prompts[name]):
            text = chat.render(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) >= context:
                raise DataError(
                    f"eval.tasks[{name}].file: example {i + 1} is {len(ids)} tokens with the chat "
                    f"template, the model's context is {context}"
                )
            room = min(task.max_new_tokens, context - len(ids))
            for j in range(task.samples):
                key, seed = json.dumps([name, i, j]), i * task.samples + j
                rows.append(
                    {"key": key, "ids": ids, "max_tokens": room, "temperature": temperature, "seed": seed}
                )
    with ray_init_again_quietly():
        processor = _processor(model_dir, e, context, list(chat.stops(tokenizer)))
    with Count(len(rows), "eval: generating", "answers") as progress:
        for b in processor(ray.data.from_items(rows)).iter_batches(batch_format="pyarrow", batch_size=None):
            for key, text in zip(b.column("key").to_pylist(), b.column("text").to_pylist(), strict=True):
                name, i, j = json.loads(key)
                answers[name][i][j] = text.strip()
            progress.advance(b.num_rows)
    return answers


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

        with Count(len(prompts), f"eval {task.name}: asking {endpoint}", "prompts") as progress:

            def counted(i: int) -> list[str]:
                answer = ask(i)
                progress.advance()
                return answer

            with ThreadPoolExecutor(8) as pool:
                return list(pool.map(counted, range(len(prompts))))


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
        with Count(sum(len(a) for a in answers), f"eval {task.name}: testing", "programs") as progress:

            def tested(program: str, tests: str) -> dict[str, Any]:
                result = metrics.run_tests(_program(program), tests, task.timeout_s, task.memory_mb)
                progress.advance()
                return result

            results = [[tested(c, r["tests"]) for c in a] for r, a in zip(rows, answers, strict=True)]
        for record, res in zip(records, results, strict=True):
            record["passed"] = [x["passed"] for x in res]
            record["reasons"] = [x["reason"] for x in res]
        figures = metrics.pass_at_k([[x["passed"] for x in res] for res in results], task.k)
    return {k: round(v, 3) for k, v in figures.items()}, iter(records)
