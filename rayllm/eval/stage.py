"""eval stage: perplexity and next-token accuracy of an exported model on the validation blocks.

Scoring runs in a pool of ``eval.actors`` Ray Data actors over the packed val parquet (each loads
the model once; with ``eval.gpus_per_actor`` they run on GPUs in bf16); the driver sums.
"""

from __future__ import annotations

import math
import time
from typing import Any

from rayllm.config import RunConfig
from rayllm.eval.lm import BlockScorer, totals
from rayllm.rundir import RunDir
from rayllm.runtime import ray_session


def run(cfg: RunConfig) -> dict[str, Any]:
    """Score the val split; writes ``eval/summary.json`` with ``loss`` and ``perplexity``."""
    import ray.data

    e = cfg.eval
    rd = RunDir.of(cfg)
    model_dir = rd.model_dir(e.model_dir, "eval.model_dir")
    rd.data.require("val")
    rd.start_stage(cfg, "eval")
    t0 = time.time()
    with ray_session(cfg.cluster, use_gpu=e.gpus_per_actor > 0):
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
    summary = {
        "loss": float(loss),
        "perplexity": float(math.exp(min(loss, 50.0))),
        "token_accuracy": float(correct / max(tokens, 1)),
        "tokens": int(tokens),
        "model_dir": model_dir,
        "seconds": round(time.time() - t0, 1),
    }
    writer = rd.metrics("eval")
    writer.write(**summary)
    writer.close()
    rd.write_summary("eval", summary)
    return summary
