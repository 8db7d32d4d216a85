"""Training throughput: `rayllm train` against a bare PyTorch loop and a plain HF `Trainer`.

Same model shape, global batch, micro-batch (gradient accumulation), sequence length, data and
thread count. The three run interleaved, each round starting with the next one (rayllm, bare,
Trainer; bare, Trainer, rayllm; ...), and the median of each is reported, so that a noisy machine
slows all three alike. All three are timed the same way: wall clock from one optimizer step's end
to the next, getting the batch included, over the steps after the first ``WARMUP`` (rayllm's own
metrics rows time exactly that; its validation and checkpoints are left out). During rayllm's runs
the CPU time of Ray's own processes (every process of the local Ray but the training worker) is
sampled: reported as a fraction of one core.
Also reports memory per rank for ZeRO 0/1/2/3 at 2 workers. Ends with one line of JSON
(``ratio`` = ours / bare loop, medians).

    .venv/bin/python bench/bench_train.py [--steps 60] [--rounds 5] [--skip-memory] [--set KEY=VALUE]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rayllm.config import ClusterConfig, load_config  # noqa: E402
from rayllm.runtime import init_ray  # noqa: E402

THREADS = os.cpu_count() or 2
WARMUP = 10  # steps left out of every figure: allocator and thread-pool warm-up, the first log line


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


def steady(step_ends: list[float], tokens_per_step: int) -> float:
    """Tokens/s over the steps after WARMUP, from the wall-clock ends of all steps (index 0: start)."""
    return tokens_per_step * (len(step_ends) - 1 - WARMUP) / (step_ends[-1] - step_ends[WARMUP])


def bare_loop(cfg, manifest: dict, data: np.ndarray, steps: int) -> float:
    """nanoGPT-style loop: micro-batches with gradient accumulation, clipping, AdamW; the floor any
    framework adds overhead to."""
    from rayllm.model.build import build_model, model_config
    from rayllm.train.parallel import build_optimizer

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = build_model(cfg.model, model_config(cfg.model, manifest["vocab_size"], 0, 1))
    opt = build_optimizer(model, cfg.train.optimizer)
    b, mb = cfg.train.global_batch, cfg.train.micro_batch
    ends = [time.perf_counter()]
    for s in range(steps):
        x = torch.from_numpy(data[(s * b) % (len(data) - b) :][:b])
        for m in range(0, b, mb):
            logits = model(input_ids=x[m : m + mb, :-1]).logits
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), x[m : m + mb, 1:].reshape(-1)
            )
            (loss * (mb / b)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
    return steady(ends, b * (data.shape[1] - 1))


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
    """A plain transformers Trainer on the same model, blocks and accumulation (the usual start)."""
    from transformers import Trainer, TrainerCallback

    from rayllm.model.build import build_model, model_config

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = build_model(cfg.model, model_config(cfg.model, manifest["vocab_size"], 0, 1))
    rows = [{"input_ids": r[:-1].tolist(), "labels": r[:-1].tolist()} for r in data]

    class StepEnds(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_train_begin(self, *a, **k) -> None:
            self.ends = [time.perf_counter()]

        def on_step_end(self, *a, **k) -> None:
            self.ends.append(time.perf_counter())

    timer = StepEnds()
    t = cfg.train
    args = trainer_args(
        out,
        t.micro_batch,
        steps,
        t.optimizer.lr,
        gradient_accumulation_steps=t.global_batch // t.micro_batch,
        weight_decay=t.optimizer.weight_decay,
        max_grad_norm=t.grad_clip,
    )
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[timer]).train()
    return steady(timer.ends, t.global_batch * (data.shape[1] - 1))


class RayCpu:
    """CPU seconds of every process under this driver (the local Ray), sampled twice a second."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, dict[int, tuple[str, float]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RayCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        procs: dict[int, psutil.Process] = {}
        while not self._stop.is_set():
            snap = {}
            for p in psutil.Process().children(recursive=True):
                procs.setdefault(p.pid, p)
            for pid, p in list(procs.items()):
                try:
                    with p.oneshot():
                        cpu = p.cpu_times()
                        snap[pid] = (" ".join(p.cmdline())[:60], cpu.user + cpu.system)
                except psutil.Error:
                    procs.pop(pid)
            self.samples.append((time.time(), snap))
            self._stop.wait(0.5)

    def background(self, t0: float, t1: float) -> tuple[float, float]:
        """(Ray's processes but the training worker, the worker) in cores over [t0, t1]."""
        before = next((s for t, s in reversed(self.samples) if t <= t0), self.samples[0][1])
        after = next((s for t, s in self.samples if t >= t1), self.samples[-1][1])
        ray_cpu = worker = 0.0
        for pid, (name, cpu) in after.items():
            if pid in before:
                delta = cpu - before[pid][1]
                if "RayTrainWorker" in name or "RayTrainWorker" in before[pid][0]:
                    worker += delta
                else:
                    ray_cpu += delta
        return ray_cpu / (t1 - t0), worker / (t1 - t0)


def rayllm_train(cfg, run_dir: Path, tokens_per_step: int) -> tuple[float, float, float]:
    """(tokens/s over the steps after WARMUP, Ray's background cores, the worker's cores)."""
    from rayllm.train.stage import run as fit

    with RayCpu() as cpu:
        fit(cfg)
    rows = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").open()]
    rows = [r for r in rows if "step_time" in r]
    # A row times the steps since the row before it: the rows after the one at WARMUP time the rest.
    pairs = itertools.pairwise(rows)
    timed = [(b["step"] - a["step"], b["step_time"]) for a, b in pairs if a["step"] >= WARMUP]
    seconds = sum(n * step_time for n, step_time in timed)
    start = next(r["time"] for r in rows if r["step"] == WARMUP)
    background, worker = cpu.background(start, rows[-1]["time"])
    return tokens_per_step * sum(n for n, _ in timed) / seconds, background, worker


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
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for all three (e.g. train.micro_batch=16; train.loss=full for rayllm)",
    )
    args = ap.parse_args()
    if args.steps <= WARMUP + 5:
        ap.error(f"--steps must be above {WARMUP + 5} (the first {WARMUP} are warm-up)")

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
            f"train.cpus_per_worker={THREADS - 0.5}",  # its ceiling, THREADS, is its torch thread count
            "train.deepspeed.zero_stage=0",
            *args.set,
        ],
    )
    t = ours_cfg.train
    data = blocks(work / "run" / "prep", t.global_batch * args.steps)
    tokens_per_step = t.global_batch * (data.shape[1] - 1)
    runs: dict[str, list[float]] = {k: [] for k in ("ours", "bare", "trainer", "ray_cores", "worker_cores")}

    def ours() -> None:
        tokens_per_s, background, worker = rayllm_train(ours_cfg, work / "run", tokens_per_step)
        runs["ours"].append(tokens_per_s)
        runs["ray_cores"].append(background)
        runs["worker_cores"].append(worker)

    contenders = [
        ours,
        lambda: runs["bare"].append(bare_loop(ours_cfg, manifest, data, args.steps)),
        lambda: runs["trainer"].append(hf_trainer(ours_cfg, manifest, data, args.steps, work / "hf")),
    ]
    for r in range(args.rounds):
        # Each round starts with the next contender: none always runs first, or right after Ray
        # tears a Train run down.
        for run in contenders[r % 3 :] + contenders[: r % 3]:
            run()
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:,.2f}" for k, v in runs.items()), file=sys.stderr)
    med = {k: statistics.median(v) for k, v in runs.items()}
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
        "date": datetime.date.today().isoformat(),
        "threads": THREADS,
        "steps": args.steps,
        "rounds": args.rounds,
        "overrides": args.set,
        "ours_tokens_per_s": round(med["ours"], 1),
        "bare_loop_tokens_per_s": round(med["bare"], 1),
        "hf_trainer_tokens_per_s": round(med["trainer"], 1),
        "per_round": {k: [round(x, 3) for x in v] for k, v in runs.items()},
        "ray_background_cores": round(med["ray_cores"], 3),
        "ratio": round(med["ours"] / med["bare"], 3),
        "target": 0.95,
        "ratio_vs_hf_trainer": round(med["ours"] / med["trainer"], 3),
        "target_vs_hf_trainer": 1.0,
        "rank0_rss_mb_by_zero_stage_2_workers_d512_l8": memory,
        "loss_vocab_50k": loss_memory(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
