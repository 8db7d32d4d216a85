"""eval stage: the exported model's loss, perplexity and next-token accuracy on the validation blocks,
and its scores on downstream tasks (``eval.tasks``).

Scoring and generation run in pools of ``eval.actors`` Ray Data actors (each loads the model once;
with ``eval.gpus_per_actor`` on GPUs, in bf16); task answers can also come from a served model
(``eval.endpoint``). Writes ``eval/summary.json``, ``eval/metrics.jsonl`` and, per task,
``eval/<task>/predictions.jsonl``; prints a table of the task scores.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from typing import Any

from rich.console import Console
from rich.table import Table

from rayllm import tracking
from rayllm.config import RunConfig
from rayllm.eval import tasks as downstream
from rayllm.eval.lm import BlockScorer, totals
from rayllm.rundir import RunDir
from rayllm.runtime import ray_session


def run(cfg: RunConfig) -> dict[str, Any]:
    """Score the val split and the tasks; writes ``eval/summary.json``."""
    e = cfg.eval
    rd = RunDir.of(cfg)
    lm = e.lm and (not e.tasks or rd.data.manifest_path.is_file())  # tasks alone need no packed data
    needs_model = lm or (e.tasks and not e.endpoint)
    model_dir = rd.model_dir(e.model_dir, "eval.model_dir") if needs_model else None
    if lm:
        rd.data.require("val")
    examples = {t.name: downstream.read_task(t) for t in e.tasks}  # bad task files fail before Ray
    # The scores go to the run of the train that made the model (its own run for any other model).
    tracked = tracking.Tracked.open(cfg, "eval", attach="train" if needs_model and not e.model_dir else None)
    out = rd.start_stage(cfg, "eval")
    t0 = time.time()
    summary: dict[str, Any] = {}
    with tracked or nullcontext(), ray_session(cfg.cluster, use_gpu=e.gpus_per_actor > 0):
        if lm:
            summary.update(_lm(cfg, rd, model_dir))
        prompts = {name: [r["prompt"] for r in rows] for name, rows in examples.items()}
        if e.endpoint:
            answers = {
                t.name: downstream.generate_remote(e.endpoint, e.endpoint_model, t, prompts[t.name])
                for t in e.tasks
            }
        elif e.tasks:  # one vLLM engine load for every task
            answers = downstream.generate_local(model_dir, e, prompts)
        scores = {}
        for task in e.tasks:
            rows = examples[task.name]
            figures, records = downstream.score(task, rows, answers[task.name])
            folder = out / task.name
            folder.mkdir(exist_ok=True)
            with (folder / "predictions.jsonl").open("w", encoding="utf-8") as f:
                for record in records:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
            scores[task.name] = {"kind": task.kind, "examples": len(rows), **figures}
        if scores:
            summary["tasks"] = scores
            _print(scores)
        if tracked:
            figures = {f"eval/{k}": v for k, v in summary.items() if k != "tasks"}
            for name, task_scores in scores.items():
                figures.update({f"eval/{name}/{k}": v for k, v in task_scores.items() if k != "kind"})
            trained = rd.summary("train") if not e.model_dir else None
            tracked.scores(tracking.numbers(figures), (trained or {}).get("steps") or 0)
    summary.update(model_dir=model_dir or e.endpoint, seconds=round(time.time() - t0, 1))
    writer = rd.metrics("eval")
    writer.write(**summary)
    writer.close()
    rd.write_summary("eval", summary)
    return summary


def _lm(cfg: RunConfig, rd: RunDir, model_dir: str) -> dict[str, Any]:
    import ray.data

    e = cfg.eval
    ds = rd.data.read("val")  # eval.max_batches: the split's first rows
    if e.max_batches:
        ds = ds.limit(e.max_batches * e.batch_size)
    scored = ds.map_batches(
        BlockScorer,
        fn_constructor_kwargs={"model_dir": model_dir, "dtype": e.dtype},
        batch_size=e.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=e.actors),
        num_cpus=e.cpus_per_actor,
        num_gpus=e.gpus_per_actor,
    )
    nll, tokens, correct = totals(scored)
    loss = nll / max(tokens, 1)
    return {
        "loss": float(loss),
        "perplexity": float(math.exp(min(loss, 50.0))),
        "token_accuracy": float(correct / max(tokens, 1)),
        "tokens": int(tokens),
    }


def _print(scores: dict[str, dict[str, Any]]) -> None:
    table = Table(title="eval tasks", title_justify="left")
    for col in ("task", "kind", "examples", "scores"):
        table.add_column(col)
    for name, s in scores.items():
        figures = ", ".join(f"{k} {v:.2f}" for k, v in s.items() if k not in ("kind", "examples"))
        table.add_row(name, s["kind"], str(s["examples"]), figures)
    Console(stderr=True).print(table)
