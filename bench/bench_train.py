"""Training throughput: `rayllm train` against a bare PyTorch loop and a plain HF `Trainer`.

Same model shape, batch, sequence length, data and thread count, measured in the same run; tokens/s
are steady-state (first steps excluded) so start-up costs do not decide the ratio. Also reports memory
per rank for ZeRO 0/1/2/3 at 2 workers. Ends with one line of JSON (``ratio`` = ours / bare loop).

    .venv/bin/python bench/bench_train.py [--steps 60] [--skip-memory]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rayllm.config import ClusterConfig, load_config  # noqa: E402
from rayllm.runtime import init_ray  # noqa: E402

THREADS = os.cpu_count() or 2


def base_config(run_dir: Path, steps: int) -> list[str]:
    return [
        f"train.max_steps={steps}",
        "train.log_every=5",
        f"train.eval_every={steps}",
        f"train.checkpoint_every={steps}",
        "train.eval_batches=1",
        "train.export=false",
        "train.resume=false",
        f"run_dir={run_dir}",
    ]


def blocks(data_dir: Path, n: int) -> np.ndarray:
    import pyarrow.parquet as pq

    files = sorted((data_dir / "train").glob("*.parquet"))
    out = np.stack(pq.read_table(files[0]).column("input_ids").to_numpy(zero_copy_only=False))
    return out[:n].astype(np.int64)


def bare_loop(cfg, manifest: dict, data: np.ndarray, steps: int) -> float:
    """nanoGPT-style loop: the floor any framework adds overhead to."""
    from rayllm.model.build import build_model, model_config
    from rayllm.train.parallel import build_optimizer

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = build_model(cfg.model, model_config(cfg.model, manifest["vocab_size"], 0, 1))
    opt = build_optimizer(model, cfg.train.optimizer)
    b = cfg.train.global_batch
    times = []
    for s in range(steps):
        x = torch.from_numpy(data[(s * b) % (len(data) - b) :][:b])
        t0 = time.perf_counter()
        logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    steady = times[5:]
    return b * (data.shape[1] - 1) * len(steady) / sum(steady)


def trainer_args(out: Path, batch: int, steps: int, lr: float, **more: Any) -> Any:
    """A plain HF ``Trainer`` on CPU as a baseline: no logging, checkpoints, reporting or data workers
    in its timed loop."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=lr,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **more,
    )


def hf_trainer(cfg, manifest: dict, data: np.ndarray, steps: int, out: Path) -> float:
    """A plain transformers Trainer on the same model and blocks (the usual starting point)."""
    from transformers import Trainer, TrainerCallback

    from rayllm.model.build import build_model, model_config

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = build_model(cfg.model, model_config(cfg.model, manifest["vocab_size"], 0, 1))
    rows = [{"input_ids": r[:-1].tolist(), "labels": r[:-1].tolist()} for r in data]

    class Times(TrainerCallback):
        def __init__(self) -> None:
            self.t: list[float] = []

        def on_step_begin(self, *a, **k) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k) -> None:
            self.t.append(time.perf_counter() - self.t0)

    timer = Times()
    args = trainer_args(
        out,
        cfg.train.global_batch,
        steps,
        cfg.train.optimizer.lr,
        weight_decay=cfg.train.optimizer.weight_decay,
        max_grad_norm=cfg.train.grad_clip,
    )
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[timer]).train()
    steady = timer.t[5:]
    return cfg.train.global_batch * (data.shape[1] - 1) * len(steady) / sum(steady)


LOSS_PROBE = """
import resource, sys, time, torch
from transformers import GPT2Config, GPT2LMHeadModel
from rayllm.model.loss import NextTokenLoss, shift
torch.set_num_threads(int(sys.argv[2]))
torch.manual_seed(0)
lm = GPT2LMHeadModel(GPT2Config(vocab_size=50304, n_positions=256, n_embd=256, n_layer=4, n_head=4))
loss, opt = NextTokenLoss(lm, sys.argv[1]), torch.optim.AdamW(lm.parameters(), 1e-3)
x, times = torch.randint(0, 50304, (8, 257)), []
for _ in range(6):
    t0 = time.perf_counter()
    nll, count, _ = loss(*shift(x))
    (nll / count).backward(); opt.step(); opt.zero_grad()
    times.append(time.perf_counter() - t0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, sorted(times[2:])[2])
"""


def loss_memory() -> dict[str, Any]:
    """Peak RSS and step time of one process training a GPT-2-vocabulary model (50,304 tokens, batch
    8 x 256) with full logits and with the chunked loss: what never materializing the logits saves."""
    out = {}
    for impl in ("full", "chunked"):
        proc = subprocess.run(
            [sys.executable, "-c", LOSS_PROBE, impl, str(THREADS)], capture_output=True, text=True, check=True
        )
        rss, step = map(float, proc.stdout.split())
        out[impl] = {"peak_rss_mb": round(rss), "step_s": round(step, 3)}
    out["rss_saved_mb"] = out["full"]["peak_rss_mb"] - out["chunked"]["peak_rss_mb"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()

    from rayllm.prep.stage import run as prep
    from rayllm.rundir import RunDir
    from rayllm.train.stage import run as fit

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    example = ROOT / "examples" / "configs" / "shakespeare-cpu.yaml"
    init_ray(ClusterConfig(num_cpus=THREADS, object_store_gb=1.0))
    cfg = load_config([example], base_config(work / "run", args.steps))
    prep(cfg)
    manifest = RunDir.of(cfg).data.manifest().model_dump()
    ours_cfg = load_config(
        [example],
        [
            *base_config(work / "run", args.steps),
            "train.workers=1",
            f"train.cpus_per_worker={THREADS - 0.5}",
            "train.deepspeed.zero_stage=0",
        ],
    )
    ours = fit(ours_cfg)["tokens_per_second"]
    data = blocks(work / "run" / "prep", ours_cfg.train.global_batch * args.steps)
    bare = bare_loop(ours_cfg, manifest, data, args.steps)
    trainer = hf_trainer(ours_cfg, manifest, data, args.steps, work / "hf")
    memory = {}
    if not args.skip_memory:
        for stage in (0, 1, 2, 3):
            c = load_config(
                [example],
                [
                    *base_config(work / f"mem{stage}", 12),
                    f"train.deepspeed.zero_stage={stage}",
                    "model.d_model=512",
                    "model.n_layer=8",
                    "model.n_head=8",
                ],
            )
            c.train.data_dir = str(work / "run" / "prep")
            fit(c)
            rows = [json.loads(line) for line in (work / f"mem{stage}" / "train" / "metrics.jsonl").open()]
            memory[f"zero{stage}"] = round(max(r.get("memory_mb", 0) for r in rows), 1)
    result = {
        "benchmark": "train",
        "ours_tokens_per_s": round(ours, 1),
        "bare_loop_tokens_per_s": round(bare, 1),
        "hf_trainer_tokens_per_s": round(trainer, 1),
        "ratio": round(ours / bare, 3),
        "target": 0.95,
        "ratio_vs_hf_trainer": round(ours / trainer, 3),
        "target_vs_hf_trainer": 1.0,
        "rank0_rss_mb_by_zero_stage_2_workers_d512_l8": memory,
        "loss_vocab_50k": loss_memory(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
