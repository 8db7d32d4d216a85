"""eval stage: perplexity and next-token accuracy of an exported model on the validation blocks.

The scoring runs as a Ray Data actor (the model loads once per actor) over the packed val parquet,
so it scales out with ``concurrency`` on a cluster; the driver sums losses and token counts.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from rayllm.config import RunConfig
from rayllm.errors import RunDirError
from rayllm.runtime import MetricsWriter, exported_model_dir, ray_session, save_stage_config, write_summary


class BlockScorer:
    """Sums of token NLL and correct argmax predictions for batches of packed blocks."""

    def __init__(self, model_dir: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(1)
        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = (
            AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(self.device).eval()
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        ids = batch["input_ids"]
        ids = np.stack(ids) if ids.dtype == object else ids
        x = torch.from_numpy(ids.astype(np.int64)).to(self.device)
        with torch.no_grad():
            logits = self.model(input_ids=x[:, :-1]).logits.float()
        targets = x[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none"
        ).view(targets.shape)
        correct = (logits.argmax(-1) == targets).sum(-1)
        return {
            "nll": nll.sum(-1).double().cpu().numpy(),
            "tokens": np.full(len(ids), targets.size(1), dtype=np.int64),
            "correct": correct.cpu().numpy(),
        }


def evaluate(cfg: RunConfig) -> dict[str, Any]:
    """Score the val split; writes ``eval/summary.json`` with ``loss`` and ``perplexity``."""
    import ray.data

    from rayllm.data import read_blocks
    from rayllm.train import data_dir_of

    model_dir = exported_model_dir(cfg.eval.model_dir, "eval.model_dir", cfg.run_dir)
    val_dir = data_dir_of(cfg) / "val"
    if not val_dir.is_dir():
        raise RunDirError(f"{val_dir} not found: run `rayllm prep` (with data.val_fraction > 0) first")
    out = save_stage_config(cfg, "eval")
    t0 = time.time()
    with ray_session(cfg.cluster):
        ds = read_blocks(val_dir)  # eval.max_batches: the split's first rows
        if cfg.eval.max_batches:
            ds = ds.limit(cfg.eval.max_batches * cfg.eval.batch_size)
        scored = ds.map_batches(
            BlockScorer,
            fn_constructor_kwargs={"model_dir": model_dir},
            batch_size=cfg.eval.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=1,
        )
        totals = np.zeros(3, dtype=np.float64)
        for b in scored.iter_batches(batch_format="numpy", batch_size=None):
            totals += [b["nll"].sum(), b["tokens"].sum(), b["correct"].sum()]
    loss = totals[0] / max(totals[1], 1)
    summary = {
        "loss": float(loss),
        "perplexity": float(math.exp(min(loss, 50.0))),
        "token_accuracy": float(totals[2] / max(totals[1], 1)),
        "tokens": int(totals[1]),
        "model_dir": model_dir,
        "seconds": round(time.time() - t0, 1),
    }
    writer = MetricsWriter(out / "metrics.jsonl")
    writer.write(**summary)
    writer.close()
    write_summary(out, summary)
    return summary
