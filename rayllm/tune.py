"""tune stage (Ray Tune): search training settings against validation metrics, stop weak trials early.

Each trial is a function trainable that runs the train stage (found in the stage table, so tune does
not import train) into its own run folder ``tune/trials/<id>/``, on packed data materialized once for
all trials, with ``TuneReportCallback`` forwarding the workers' validation reports so that ASHA can
stop weak trials early (Train V2 does not accept ``Tuner(trainable=trainer)``).

- Space: a plain list is every value (a grid, run in a seeded shuffled order); ``{choice: [...]}``
  and the ranges are sampled; ``tune.search: optuna`` proposes points with Optuna's TPE instead.
- ASHA: rungs ``reduction_factor`` apart from ``grace_period`` (default: the warmup), and every
  trial validates at each rung, so that a rung is judged on fresh figures whatever ``eval_every``.
- Concurrency: as many trials as the cluster's CPUs (GPUs) hold, unless ``tune.max_concurrent``.
- An interrupted search resumes (Ray Tune's restore) without re-running finished trials, as long
  as the search it was running is the same one.
- Results: a table sorted by the metric, ``tune/curves.png`` (every trial's validation curve; trials
  stopped early end in a cross), ``tune/best.yaml`` (``rayllm train -c tune/best.yaml`` runs it as is)
  and the best trial's checkpoint exported to a Hugging Face folder.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from rayllm import stages
from rayllm.config import RunConfig, apply_overrides, validate_config
from rayllm.errors import ConfigError, find_user_error
from rayllm.rundir import SPLITS, RunDir, write_json
from rayllm.runtime import ray_session

SAMPLERS = ("choice", "grid", "uniform", "loguniform", "randint")
EXPERIMENT = "tune"
GRID = "grid"  # the Tune config key of the grid's points: no config field is named so
REPORTED_AS = {"train_loss": "loss"}  # tune.metric -> the name train reports and logs it by


def search_space(
    space: dict[str, Any], search: str = "random", order: str = "shuffled", seed: int = 0
) -> dict[str, Any]:
    """``{train.optimizer.lr: {loguniform: [1e-4, 1e-2]}, train.optimizer.name: [sgd, adamw]}`` -> Tune.

    A plain list is a grid (every value) under random search. The grid's points are one Tune grid
    under the key ``GRID``, in a seeded shuffled order unless ``order`` is ``listed``: run one after
    another in a sorted sweep (sgd before adamw, small lr before large), each trial would only meet
    worse ones at ASHA's rungs and none would be stopped. Optuna proposes points itself, so there a
    list is a categorical choice and ``grid`` is refused.
    """
    from ray import tune

    out: dict[str, Any] = {}
    grid: dict[str, list[Any]] = {}
    for key, spec in space.items():
        where = f"tune.space.{key}"
        if isinstance(spec, list):
            spec = {"grid" if search == "random" else "choice": spec}
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
            raise ConfigError(f"{where}: use a list of values or one of {{{', '.join(SAMPLERS)}: [...]}}")
        kind, args = next(iter(spec.items()))
        if kind in ("choice", "grid"):
            if not isinstance(args, list) or not args:
                raise ConfigError(f"{where}: {kind} needs a non-empty list of values")
            if kind == "grid" and search == "optuna":
                raise ConfigError(f"{where}: tune.search=optuna proposes points itself; use a list or choice")
            if kind == "grid":
                grid[key] = args
            else:
                out[key] = tune.choice(args)
        else:
            if not (isinstance(args, list) and len(args) == 2 and args[0] < args[1]):
                raise ConfigError(f"{where}: {kind} needs [low, high] with low < high, got {args!r}")
            if kind == "loguniform" and args[0] <= 0:
                raise ConfigError(f"{where}: loguniform needs low > 0, got {args[0]}")
            out[key] = getattr(tune, kind)(*args)
    if grid:
        points = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
        if order == "shuffled":
            random.Random(seed).shuffle(points)
        out[GRID] = tune.grid_search(points)
    return out


def trial_params(config: dict[str, Any], space: dict[str, Any]) -> dict[str, Any]:
    """A trial's searched fields, by name, from its Tune config (grid points sit under ``GRID``)."""
    flat = {**config, **config.get(GRID, {})}
    return {k: flat[k] for k in space}


def _overrides(params: dict[str, Any]) -> list[str]:
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in params.items()]


def grace_period(cfg: RunConfig) -> int:
    """``tune.grace_period``, else the trials' warmup, at least ``max_steps / reduction_factor**2``.

    A trial still warming up is judged by how fast its learning rate ramps: on the demo model (30
    warmup steps) the grid's best (adamw, 3e-3) is third at step 15, behind both 1e-2 rates, and
    first from step 25 on.
    """
    tc = cfg.tune
    if tc.grace_period is not None:
        return tc.grace_period
    floor = tc.max_steps // tc.reduction_factor**2
    return max(1, min(tc.max_steps, max(cfg.train.schedule.warmup_steps, floor)))


def rungs(cfg: RunConfig) -> list[int]:
    """ASHA's rungs, as Ray's ASHAScheduler lays them out: grace * rf**k up to ``tune.max_steps``."""
    tc = cfg.tune
    out = [grace_period(cfg)]
    while out[-1] * tc.reduction_factor <= tc.max_steps:
        out.append(out[-1] * tc.reduction_factor)
    return out


def trial_config(base: RunConfig, params: dict[str, Any]) -> RunConfig:
    """One trial's train run: its settings for ``tune.max_steps``, validating at each of ASHA's rungs.

    A trial reports only when it validates, and ASHA judges a rung by the first report at or past
    it: without a validation there, a rung before the first ``eval_every`` could stop nothing.
    """
    tc = base.tune
    eval_at = base.train.eval_at
    if tc.scheduler == "asha":
        eval_at = sorted({*eval_at, *(r for r in rungs(base) if r < tc.max_steps)})
    sets = [
        *_overrides(params),
        f"train.max_steps={tc.max_steps}",
        f"train.eval_at={json.dumps(eval_at)}",
        "train.export=false",
        "train.storage=null",
    ]
    raw = apply_overrides(base.dump(), sets)
    return validate_config(raw, origin="tune trial")


def best_config(base: RunConfig, params: dict[str, Any]) -> RunConfig:
    """The base run with the best trial's settings: what `rayllm train -c tune/best.yaml` trains."""
    return validate_config(apply_overrides(base.dump(), _overrides(params)), origin="tune best")


def num_samples(cfg: RunConfig) -> int:
    """``tune.num_samples``, else 1 for a search that is only grids, 8 otherwise."""
    tc = cfg.tune
    if tc.num_samples is not None:
        return tc.num_samples
    grid_only = tc.search == "random" and all(
        isinstance(v, list) or (isinstance(v, dict) and "grid" in v) for v in tc.space.values()
    )
    return 1 if grid_only else 8


def max_concurrent(cfg: RunConfig) -> int:
    """``tune.max_concurrent``, else as many trials as the cluster's CPUs (and GPUs) hold at once."""
    if cfg.tune.max_concurrent is not None:
        return cfg.tune.max_concurrent
    import ray

    t = cfg.train
    workers = t.worker_range[1]
    total = ray.cluster_resources()
    fits = math.floor(total.get("CPU", 1) / (workers * t.cpus_per_worker))
    if t.use_gpu:
        fits = min(fits, math.floor(total.get("GPU", 0) / (workers * t.gpus_per_worker)))
    return max(1, fits)


def _check_space(cfg: RunConfig) -> None:
    """Every searched key must be a real config field: try the first value of each before Ray starts."""
    if not cfg.tune.space:
        raise ConfigError("tune.space is empty: name at least one field to search, e.g. train.optimizer.lr")
    for key, spec in cfg.tune.space.items():
        value = spec[0] if isinstance(spec, list) else next(iter(spec.values()))[0]
        try:
            trial_config(cfg, {key: value})
        except ConfigError as e:
            raise ConfigError(f"tune.space.{key}: {e}") from None


def _search_key(cfg: RunConfig, rd: RunDir) -> dict[str, Any]:
    """What a search is: resuming one means the same space, scheduler, trial config and data."""
    manifest = rd.data.manifest()
    data = {"tokenizer": manifest.tokenizer_hash, "blocks": manifest.blocks}
    # The tune row's fields: what a trial overrides (its steps, storage, export) is no part of it.
    return {**stages.get("tune").config_fields(cfg.dump()), "data": data}


def run(cfg: RunConfig) -> dict[str, Any]:
    """Run (or resume) the search; writes ``tune/summary.json``, ``best.yaml`` and ``curves.png``."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    tc = cfg.tune
    space = search_space(tc.space, tc.search, tc.grid_order, tc.seed)
    _check_space(cfg)
    if tc.search == "optuna":
        try:
            import optuna  # noqa: F401  (Ray's OptunaSearch drives it)
        except ImportError:
            raise ConfigError("tune.search=optuna needs the optuna package: pip install optuna") from None
    rd = RunDir.of(cfg)
    manifest = rd.data.manifest()  # a missing prep fails here, before Ray starts
    out = rd.start_stage(cfg, "tune")
    train = stages.get("train").entry
    key = _search_key(cfg, rd)
    experiment = out / "ray" / EXPERIMENT
    saved_key = out / "search.json"
    same_search = saved_key.is_file() and json.loads(saved_key.read_text()) == json.loads(json.dumps(key))
    if not same_search:  # another search's trials must not be resumed as this one's
        shutil.rmtree(out / "ray", ignore_errors=True)
        shutil.rmtree(out / "trials", ignore_errors=True)
        write_json(saved_key, key)

    def trial(config: dict[str, Any], splits: dict[str, Any] | None) -> None:
        # Each trial is a run of its own whose packed data is this run's.
        params = trial_params(config, tc.space)
        trial_dir = out / "trials" / tune.get_context().get_trial_id()
        trial_dir.mkdir(parents=True, exist_ok=True)
        write_json(trial_dir / "trial.json", {"started": time.time(), "params": params})
        trial_cfg = trial_config(
            cfg, {**params, "run_dir": str(trial_dir), "train.data_dir": str(rd.data.dir)}
        )
        train(trial_cfg, splits=splits, callbacks=[TuneReportCallback()])

    scheduler = (
        ASHAScheduler(
            time_attr="step",
            max_t=tc.max_steps,
            grace_period=grace_period(cfg),
            reduction_factor=tc.reduction_factor,
        )
        if tc.scheduler == "asha"
        else FIFOScheduler()
    )
    t0 = time.time()
    with ray_session(cfg.cluster, use_gpu=cfg.train.use_gpu):
        # Read and materialized once: every trial's workers then start from the object store.
        small = all(manifest.split_gb(s) < cfg.train.cache_data_gb for s in SPLITS)
        splits = {s: rd.data.read(s).materialize() for s in SPLITS} if small else None
        # The trial function only drives a TorchTrainer: its workers hold the real resources.
        trainable = tune.with_resources(tune.with_parameters(trial, splits=splits), {"CPU": 0.01})
        concurrent = max_concurrent(cfg)
        if same_search and tune.Tuner.can_restore(str(experiment)):
            tuner = tune.Tuner.restore(
                str(experiment), trainable, resume_unfinished=True, resume_errored=True
            )
        else:
            if tc.search == "optuna":
                from ray.tune.search.optuna import OptunaSearch

                search_alg = OptunaSearch(seed=tc.seed)
            else:
                from ray.tune.search import BasicVariantGenerator

                # Tune's default generator, seeded; it takes the concurrency limit itself.
                search_alg = BasicVariantGenerator(max_concurrent=concurrent, random_state=tc.seed)
            tuner = tune.Tuner(
                trainable,
                param_space=space,
                tune_config=tune.TuneConfig(
                    metric=REPORTED_AS.get(tc.metric, tc.metric),
                    mode=tc.mode,
                    num_samples=num_samples(cfg),
                    scheduler=scheduler,
                    search_alg=search_alg,
                    max_concurrent_trials=concurrent if tc.search == "optuna" else None,
                ),
                run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(out / "ray"), verbose=0),
            )
        results = tuner.fit()
        taken: set[str] = set()
        trials = [_trial_row(r, tc.space, tc.metric, out, taken) for r in results]
        scored = [t for t in trials if t[tc.metric] is not None]
        if not scored:
            # The same mistake usually fails every trial: a user error says what to fix in one line.
            for r in results:
                user = find_user_error(r.error) if r.error else None
                if user is not None:
                    raise user
            raise RuntimeError(f"no trial reported {tc.metric}: {[t['error'] for t in trials]}")
        best = min(scored, key=lambda t: t[tc.metric] if tc.mode == "min" else -t[tc.metric])
        export = _export_best(cfg, rd, out, best, train)
    metrics = rd.metrics("tune", replace=True)  # the whole search, restored trials included
    for t in trials:
        metrics.write(**t)
    metrics.close()
    best_yaml = out / "best.yaml"
    best_yaml.write_text(yaml.safe_dump(best_config(cfg, best["params"]).public(), sort_keys=False))
    plot_curves(trials, out / "trials", out / "curves.png", tc.max_steps)
    _print_table(trials, tc.metric, tc.mode)
    first_steps = [t["first_step_s"] for t in trials if t["first_step_s"] is not None]
    summary = {
        "trials": len(trials),
        "trials_stopped_early": sum(1 for t in scored if (t["steps"] or 0) < tc.max_steps),
        "trial_steps": sum(t["steps"] or 0 for t in trials),
        "metric": tc.metric,
        "best_value": best[tc.metric],
        "best_params": best["params"],
        "best_trial": best["trial_id"],
        "best_steps": best["steps"],
        "best_config": str(best_yaml),
        "best_checkpoint": best["checkpoint"],
        "best_export": export,
        "first_step_seconds_mean": round(sum(first_steps) / len(first_steps), 1) if first_steps else None,
        "max_concurrent": concurrent,
        "rungs": rungs(cfg) if tc.scheduler == "asha" else [],
        "curves": str(out / "curves.png"),
        "seconds": round(time.time() - t0, 1),
        "all": trials,
    }
    rd.write_summary("tune", summary)
    return summary


def _trial_metrics(folder: Path) -> list[dict[str, Any]]:
    """A trial's own train-stage metrics: each trial is a run directory of its own."""
    return RunDir.of(RunConfig(run_dir=str(folder))).read_metrics("train")


def _trial_row(r: Any, space: dict[str, Any], metric: str, out: Path, taken: set[str]) -> dict[str, Any]:
    """One trial as a plain record, from its result and its own run folder (``tune/trials/<id>``)."""
    params = trial_params(r.config, space)
    folder = out / "trials" / str((r.metrics or {}).get("trial_id"))
    if not folder.is_dir():  # a trial that failed before reporting: its folder by its parameters
        candidates = [
            p for p in sorted((out / "trials").glob("*"))
            if p.name not in taken and json.loads((p / "trial.json").read_text())["params"] == params
        ]  # fmt: skip
        folder = candidates[0] if candidates else None
    if folder is not None:
        taken.add(folder.name)
    rows = _trial_metrics(folder) if folder else []
    started = json.loads((folder / "trial.json").read_text())["started"] if folder else None
    first = next((x["time"] for x in rows if x.get("step") == 1 and "loss" in x), None)
    key = REPORTED_AS.get(metric, metric)
    scored = [x for x in rows if key in x and "step" in x]
    ckpt = RunDir.of(RunConfig(run_dir=str(folder))).latest_checkpoint() if folder else None
    return {
        "trial_id": folder.name if folder else None,
        "params": params,
        "steps": scored[-1]["step"] if scored else None,
        metric: scored[-1][key] if scored else None,
        "first_step_s": round(first - started, 1) if first and started else None,
        "checkpoint": ckpt.path if ckpt else None,
        "error": str(r.error).splitlines()[0] if r.error else None,
    }


def _export_best(cfg: RunConfig, rd: RunDir, out: Path, best: dict[str, Any], train: Any) -> str | None:
    """Export the best trial's checkpoint: run at its last step, the train stage finds nothing left to
    train and exports that checkpoint without starting workers, so tune needs no export code."""
    if best["checkpoint"] is None:
        return None
    folder = out / "trials" / best["trial_id"]
    params = {**best["params"], "run_dir": str(folder), "train.data_dir": str(rd.data.dir)}
    sets = ["train.export=true", f"train.max_steps={best['steps']}"]
    trial_cfg = validate_config(apply_overrides(trial_config(cfg, params).dump(), sets), origin="tune export")
    return train(trial_cfg)["export_dir"]


def plot_curves(trials: list[dict[str, Any]], trials_dir: Path, png: Path, max_steps: int) -> None:
    """Every trial's validation loss against step on one PNG; a trial stopped early ends in a cross."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for t in trials:
        rows = _trial_metrics(trials_dir / t["trial_id"]) if t["trial_id"] else []
        points = sorted({r["step"]: r["val_loss"] for r in rows if "val_loss" in r}.items())
        if not points:
            continue
        label = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in t["params"].items())
        (line,) = ax.plot(*zip(*points, strict=True), marker=".", label=label)
        if points[-1][0] < max_steps:
            ax.plot(*points[-1], marker="x", markersize=10, color=line.get_color())
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("tune: every trial (x: stopped early)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _print_table(trials: list[dict[str, Any]], metric: str, mode: str) -> None:
    table = Table(title=f"tune trials by {metric}", title_justify="left")
    for col in ("trial", "params", "steps", metric, "first step s", "error"):
        table.add_column(col)
    bad = math.inf if mode == "min" else -math.inf

    def order(t: dict[str, Any]) -> float:
        v = t[metric] if t[metric] is not None else bad
        return v if mode == "min" else -v

    for t in sorted(trials, key=order):
        params = ", ".join(f"{k}={v}" for k, v in t["params"].items())
        value = f"{t[metric]:.4f}" if t[metric] is not None else "-"
        table.add_row(
            str(t["trial_id"]), params, str(t["steps"]), value, str(t["first_step_s"]), t["error"] or ""
        )
    Console(stderr=True).print(table)
