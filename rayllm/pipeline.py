"""The whole pipeline in one Ray session: prep -> train -> eval -> serve one request.

``rayllm demo`` / ``make demo`` run this on the embedded Shakespeare corpus; each step is the same
stage entry (``rayllm.stages``) the CLI verbs call, so the demo exercises exactly what users run.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console

from rayllm.config import RunConfig
from rayllm.rundir import RunDir
from rayllm.runtime import ray_session
from rayllm.stages import run_stage

DEMO_PROMPT = "ROMEO:\n"


def demo(cfg: RunConfig, console: Console | None = None) -> dict[str, Any]:
    import httpx

    from rayllm.serve import stage as serve

    console = console or Console()
    with ray_session(cfg.cluster, use_gpu=cfg.train.use_gpu):
        console.rule("[bold]1/4 prep[/]: Ray Data reads, cleans, dedups, trains the vocabulary, packs blocks")
        p = run_stage("prep", cfg)
        console.print(f"{p['documents_kept']:,} documents, {p['tokens']:,} tokens, {p['blocks']:,} blocks")
        console.rule(f"[bold]2/4 train[/]: Ray Train + DeepSpeed ZeRO-{cfg.train.deepspeed.zero_stage}")
        t = run_stage("train", cfg)
        console.print(
            f"val loss {t['val_loss_first']:.3f} -> {t['val_loss_last']:.3f}, "
            f"{t['tokens_per_second']:,.0f} tokens/s, MFU {t['mfu']:.1%}"
        )
        console.rule("[bold]3/4 eval[/]: perplexity of the exported model on the validation split")
        e = run_stage("eval", cfg)
        console.print(f"loss {e['loss']:.3f}, perplexity {e['perplexity']:.1f}")
        console.rule(f"[bold]4/4 serve[/]: Ray Serve, OpenAI-compatible API on {cfg.serve.host}")
        url = serve.start(cfg)
        try:
            model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
            reply = httpx.post(
                f"{url}/v1/completions",
                json={"model": model, "prompt": DEMO_PROMPT, "max_tokens": 48, "temperature": 0.8, "seed": 0},
                timeout=120,
            )
            reply.raise_for_status()
            sample = reply.json()["choices"][0]["text"]
        finally:
            serve.shutdown()
        console.print(f"[bold]sample[/] for {DEMO_PROMPT!r}:\n{DEMO_PROMPT}{sample}")
    summary = {
        "documents_kept": p["documents_kept"],
        "tokens": p["tokens"],
        "train_loss_first": t["train_loss_first"],
        "train_loss_last": t["train_loss_last"],
        "val_loss_first": t["val_loss_first"],
        "val_loss_last": t["val_loss_last"],
        "eval_perplexity": e["perplexity"],
        "tokens_per_second": t["tokens_per_second"],
        "mfu": t["mfu"],
        "url": url,
        "sample": DEMO_PROMPT + sample,
        "export_dir": t["export_dir"],
        "run_dir": str(RunDir.of(cfg).root),
    }
    RunDir.of(cfg).write_summary("demo", summary)
    return summary
