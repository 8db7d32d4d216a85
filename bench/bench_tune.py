"""Ray Tune with ASHA against the full grid, over the same space, on the demo model.

Space: optimizer in {sgd, adam, adamw} x learning rate in {3e-4, 1e-3, 3e-3, 1e-2}, 12 trials of up
to ``--steps`` steps each, one trial at a time so that compute is counted in the order trials run.
The grid runs every trial to the end (FIFO); ASHA stops weak trials at its rungs. Compute is counted
in trial-steps: for each search, the steps its trials had taken (in the order they ran) when one of
them first reached a validation loss within 2% of the grid's best. Also reports each search's total
trial-steps and wall time, and the seconds from a trial's start to its first step.

    .venv/bin/python bench/bench_tune.py [--steps 150]

Ends with one JSON line: ``ratio`` = grid compute / ASHA compute, ``target`` 2.5.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rayllm.config import ClusterConfig, load_config  # noqa: E402
from rayllm.rundir import read_jsonl  # noqa: E402
from rayllm.runtime import init_ray  # noqa: E402

TARGET = 2.5
WITHIN = 0.02
SPACE = {"train.optimizer.name": ["sgd", "adam", "adamw"], "train.optimizer.lr": [3e-4, 1e-3, 3e-3, 1e-2]}


def curves(run: Path) -> list[tuple[float, list[tuple[int, float]]]]:
    """(start time, [(step, val_loss)]) of every trial of a tune run, in the order they started."""
    out = []
    for trial in (run / "tune" / "trials").iterdir():
        started = json.loads((trial / "trial.json").read_text())["started"]
        rows = read_jsonl(trial / "train" / "metrics.jsonl")
        out.append((started, sorted({r["step"]: r["val_loss"] for r in rows if "val_loss" in r}.items())))
    return sorted(out)


def compute_to(target: float, trials: list[tuple[float, list[tuple[int, float]]]]) -> int | None:
    """Trial-steps spent, in run order, until a trial's validation loss first reached ``target``."""
    spent = 0
    for _, points in trials:
        for step, loss in points:
            if loss <= target:
                return spent + step
        spent += points[-1][0] if points else 0
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    from rayllm.prep.stage import run as prep
    from rayllm.tune import run as tune

    work = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    example = ROOT / "examples" / "configs" / "shakespeare-cpu.yaml"
    init_ray(ClusterConfig(address="local", object_store_gb=1.0))
    prep(load_config([example], [f"run_dir={work / 'data'}"]))
    space = json.dumps(SPACE)
    common = [
        f"train.data_dir={work / 'data' / 'prep'}",
        f"tune.space={space}",
        f"tune.max_steps={args.steps}",
        "tune.max_concurrent=1",
        "train.eval_every=25",
        "train.checkpoint_every=1000",
        "train.log_every=25",
        "tune.grace_period=25",
        "tune.reduction_factor=3",
    ]
    results: dict[str, Any] = {}
    for name, scheduler in (("grid", "fifo"), ("asha", "asha")):
        run = work / name
        t0 = time.time()
        s = tune(load_config([example], [*common, f"run_dir={run}", f"tune.scheduler={scheduler}"]))
        results[name] = {"summary": s, "seconds": round(time.time() - t0), "curves": curves(run)}
    best = min(loss for _, points in results["grid"]["curves"] for _, loss in points[-1:])
    target = best * (1 + WITHIN)
    table = []
    for name, r in results.items():
        s = r["summary"]
        table.append(
            {
                "search": name,
                "trials": s["trials"],
                "stopped_early": s["trials_stopped_early"],
                "trial_steps": s["trial_steps"],
                "steps_to_target": compute_to(target, r["curves"]),
                "best_val_loss": round(s["best_value"], 4),
                "best_params": s["best_params"],
                "first_step_s": s["first_step_seconds_mean"],
                "seconds": r["seconds"],
            }
        )
    print(f"\ngrid best validation loss {best:.4f}; target within {WITHIN:.0%}: {target:.4f}")
    head = ("search", "trials", "stopped", "steps", "to target", "best", "s")
    print("{:<6} {:>6} {:>7} {:>6} {:>9} {:>7} {:>5}  best params".format(*head))
    for t in table:
        print(
            f"{t['search']:<6} {t['trials']:>6} {t['stopped_early']:>7} {t['trial_steps']:>6} "
            f"{t['steps_to_target']!s:>9} {t['best_val_loss']:>7} {t['seconds']:>5}  {t['best_params']}"
        )
    grid, asha = table
    ratio = grid["steps_to_target"] / asha["steps_to_target"] if asha["steps_to_target"] else 0.0
    print(
        json.dumps(
            {
                "bench": "tune",
                "rows": table,
                "grid_best": round(best, 4),
                "ratio": round(ratio, 3),
                "ratio_total_steps": round(grid["trial_steps"] / asha["trial_steps"], 3),
                "target": TARGET,
            }
        )
    )


if __name__ == "__main__":
    main()
