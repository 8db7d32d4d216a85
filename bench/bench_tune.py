"""Ray Tune with ASHA against the full grid, over the same space, on the demo model.

Space: optimizer in {sgd, adam, adamw} x learning rate in {3e-4, 1e-3, 3e-3, 1e-2}, 12 trials of up
to ``--steps`` steps each, one leg at a time. The grid runs every trial to the end (FIFO); ASHA
trains every trial to its first rung (25 steps) and promotes the best third of a rung to the next
(75, then 150), resuming each from its checkpoint. Both take the grid in rayllm's default seeded
shuffled order; ASHA runs once per order (``--orders``: tune.seed 0, 1, ...), since which trials it
promotes early depends on the order they arrive in. The grid's cost does not depend on the order.

Compute is counted in trial-steps. A search delivers its answer (its best trial) when it ends, so
the compute it needs to get within 2% of the grid's best validation loss is all its trial-steps, and
an ASHA search whose best is not within 2% has not got there at all. Also reported: the trial-steps
until a trial first touched that target in the order the trials ran (a figure that presumes the
target known in advance), wall time, the seconds from a trial's start to its first step, and how far
an ASHA trial's validation curve strays from the same settings' grid trial (trials are seeded, so
they should agree). Ray's own synchronous successive halving (``HyperBandScheduler``) is replayed
on the grid's curves in each ASHA order (``hyperband``, ``hyperband_ratio``): its brackets' sizes
and rungs, not the curves, decide what it spends.

    .venv/bin/python bench/bench_tune.py [--steps 150] [--orders 3]

Ends with one JSON line: ``ratio`` = the grid's trial-steps / ASHA's mean over the orders (0 if
any ASHA search missed the target), ``target`` 2.5.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rayllm.config import ClusterConfig, load_config  # noqa: E402
from rayllm.rundir import read_jsonl  # noqa: E402
from rayllm.runtime import init_ray  # noqa: E402

TARGET = 2.5
WITHIN = 0.02
SPACE = {"train.optimizer.name": ["sgd", "adam", "adamw"], "train.optimizer.lr": [3e-4, 1e-3, 3e-3, 1e-2]}
Curve = list[tuple[int, float]]


def curves(run: Path) -> list[tuple[str, Curve]]:
    """(settings, [(step, val_loss)]) of every trial of a tune run, in the order they started."""
    out = []
    for trial in (run / "tune" / "trials").iterdir():
        meta = json.loads((trial / "trial.json").read_text())
        rows = read_jsonl(trial / "train" / "metrics.jsonl")
        points = sorted({r["step"]: r["val_loss"] for r in rows if "val_loss" in r}.items())
        out.append((meta["started"], json.dumps(meta["params"], sort_keys=True), points))
    return [(params, points) for _, params, points in sorted(out)]


def first_touch(target: float, trials: list[tuple[str, Curve]]) -> int | None:
    """Trial-steps spent, in run order, until a trial's validation loss first reached ``target``."""
    spent = 0
    for _, points in trials:
        for step, loss in points:
            if loss <= target:
                return spent + step
        spent += points[-1][0] if points else 0
    return None


def stray(trials: list[tuple[str, Curve]], reference: dict[str, dict[int, float]]) -> float:
    """The largest gap between a trial's validation loss and its settings' grid trial at one step."""
    gaps = [
        abs(loss - reference[params][step])
        for params, points in trials
        for step, loss in points
        if step in reference[params]
    ]
    return max(gaps, default=0.0)


def hyperband(grid: dict[str, dict[int, float]], order: list[str], max_t: int, eta: int) -> dict[str, Any]:
    """Ray's synchronous successive halving (``HyperBandScheduler``, which pauses trials and resumes
    them from checkpoints) replayed on the grid's own validation curves: trials are seeded and a
    resumed trial's curve equals its grid trial's (``stray_from_grid``), so the replay makes the
    decisions a live search would. One trial at a time, in the search's order; every step is a
    result, scored by the newest validation at or before it. Returns its trial-steps and best."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import HyperBandScheduler, TrialScheduler

    class Replay:  # what the scheduler reads of a trial
        def __init__(self, params: str) -> None:
            self.params, self.status, self.is_saving, self.step = params, Trial.PENDING, False, 0

        def loss(self) -> float:
            return grid[self.params][max(s for s in grid[self.params] if s <= self.step)]

    class Controller:
        def stop_trial(self, trial: Replay) -> None:
            trial.status = Trial.TERMINATED

    sched = HyperBandScheduler("step", "val_loss", "min", max_t=max_t, reduction_factor=eta)
    controller, trials, spent = Controller(), [Replay(p) for p in order], 0
    for t in trials:
        sched.on_trial_add(controller, t)
    while (t := sched.choose_trial_to_run(controller)) is not None:
        t.status = Trial.RUNNING
        action = TrialScheduler.CONTINUE
        while action == TrialScheduler.CONTINUE:
            t.step += 1
            spent += 1
            result = {"step": t.step, "val_loss": t.loss()}
            action = sched.on_trial_result(controller, t, result)
            if action == TrialScheduler.CONTINUE and t.step >= max_t:
                sched.on_trial_complete(controller, t, result)
                action = TrialScheduler.STOP
        t.status = Trial.PAUSED if action == TrialScheduler.PAUSE else Trial.TERMINATED
    loss, params = min((t.loss(), t.params) for t in trials)
    return {"trial_steps": spent, "best_val_loss": round(loss, 4), "best_params": json.loads(params)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--orders", type=int, default=3, help="ASHA searches, one per shuffled order")
    args = ap.parse_args()
    from rayllm.prep.stage import run as prep
    from rayllm.tune import run as tune

    work = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    example = ROOT / "examples" / "configs" / "shakespeare-cpu.yaml"
    init_ray(ClusterConfig(address="local", object_store_gb=1.0))
    prep(load_config([example], [f"run_dir={work / 'data'}"]))
    common = [
        f"train.data_dir={work / 'data' / 'prep'}",
        f"tune.space={json.dumps(SPACE)}",
        f"tune.max_steps={args.steps}",
        "tune.max_concurrent=1",
        "train.eval_every=25",
        "train.checkpoint_every=1000",
        "train.log_every=25",
        "tune.grace_period=25",
        "tune.reduction_factor=3",
    ]
    searches = [("grid", "fifo", 0)] + [(f"asha/{seed}", "asha", seed) for seed in range(args.orders)]
    results: dict[str, Any] = {}
    for name, scheduler, seed in searches:
        run = work / name.replace("/", "-")
        t0 = time.time()
        overrides = [*common, f"run_dir={run}", f"tune.scheduler={scheduler}", f"tune.seed={seed}"]
        s = tune(load_config([example], overrides))
        results[name] = {"summary": s, "seconds": round(time.time() - t0), "curves": curves(run)}
    grid_curves = {params: dict(points) for params, points in results["grid"]["curves"]}
    best = results["grid"]["summary"]["best_value"]
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
                "best_val_loss": round(s["best_value"], 4),
                "within_target": s["best_value"] <= target,
                "first_touch_steps": first_touch(target, r["curves"]),
                "best_params": s["best_params"],
                "first_step_s": s["first_step_seconds_mean"],
                "seconds": r["seconds"],
                "stray_from_grid": round(stray(r["curves"], grid_curves), 4),
            }
        )
    print(f"\ngrid best validation loss {best:.4f}; target within {WITHIN:.0%}: {target:.4f}")
    head = ("search", "trials", "stopped", "steps", "best", "within", "touch", "s", "stray")
    print("{:<7} {:>6} {:>7} {:>6} {:>7} {:>6} {:>6} {:>5} {:>6}  best params".format(*head))
    for t in table:
        print(
            f"{t['search']:<7} {t['trials']:>6} {t['stopped_early']:>7} {t['trial_steps']:>6} "
            f"{t['best_val_loss']:>7} {t['within_target']!s:>6} {t['first_touch_steps']!s:>6} "
            f"{t['seconds']:>5} {t['stray_from_grid']:>6}  {t['best_params']}"
        )
    grid, ashas = table[0], table[1:]
    asha_steps = statistics.mean(t["trial_steps"] for t in ashas)
    # Ray's HyperBand, in each ASHA search's order (which its brackets are filled in).
    hyper = [
        hyperband(grid_curves, [p for p, _ in results[t["search"]]["curves"]], args.steps, 3) for t in ashas
    ]
    for h in hyper:
        h["within_target"] = h["best_val_loss"] <= target
        print(f"Ray HyperBandScheduler (replayed): {h}")
    hyper_steps = statistics.mean(h["trial_steps"] for h in hyper)
    ratio = grid["trial_steps"] / asha_steps if all(t["within_target"] for t in ashas) else 0.0
    print(
        json.dumps(
            {
                "bench": "tune",
                "rows": table,
                "grid_best": round(best, 4),
                "asha_trial_steps_mean": round(asha_steps, 1),
                "ratio": round(ratio, 3),
                "ratio_per_order": [round(grid["trial_steps"] / t["trial_steps"], 3) for t in ashas],
                "hyperband": hyper,
                "hyperband_ratio": round(grid["trial_steps"] / hyper_steps, 3)
                if all(h["within_target"] for h in hyper)
                else 0.0,
                "target": TARGET,
            }
        )
    )


if __name__ == "__main__":
    main()
