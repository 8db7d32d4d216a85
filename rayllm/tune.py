"""tune stage (Ray Tune): search training settings against validation metrics with ASHA early stopping.

Each trial is a function trainable that runs the train stage (found in the stage table, so tune does
not import train) into its own folder under ``tune/trials/``, with ``TuneReportCallback`` forwarding
the workers' eval reports so ASHA can stop weak trials early (Train V2 does not accept
``Tuner(trainer)``). The best trial is handed on as a full run config (``tune/best.yaml``) and its
checkpoint path.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from rayllm import stages
from rayllm.config import RunConfig, apply_overrides, validate_config
from rayllm.errors import ConfigError, find_user_error
from rayllm.rundir import RunDir
from rayllm.runtime import ray_session

SAMPLERS = ("choice", "grid", "uniform", "loguniform", "randint")


def search_space(space: dict[str, Any]) -> dict[str, Any]:
    """``{train.optimizer.lr: {loguniform: [1e-4, 1e-2]}, train.optimizer.name: [sgd, adamw]}`` -> Tune."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, spec in space.items():
        where = f"tune.space.{key}"
        if isinstance(spec, list):
            spec = {"choice": spec}
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
            raise ConfigError(f"{where}: use a list of values or one of {{{', '.join(SAMPLERS)}: [...]}}")
        kind, args = next(iter(spec.items()))
        if kind in ("choice", "grid"):
            if not isinstance(args, list) or not args:
                raise ConfigError(f"{where}: {kind} needs a non-empty list of values")
            out[key] = tune.grid_search(args) if kind == "grid" else tune.choice(args)
        else:
            if not (isinstance(args, list) and len(args) == 2 and args[0] < args[1]):
                raise ConfigError(f"{where}: {kind} needs [low, high] with low < high, got {args!r}")
            if kind == "loguniform" and args[0] <= 0:
                raise ConfigError(f"{where}: loguniform needs low > 0, got {args[0]}")
            out[key] = getattr(tune, kind)(*args)
    return out


def trial_config(base: RunConfig, params: dict[str, Any], max_steps: int) -> RunConfig:
    overrides = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in params.items()]
    raw = apply_overrides(base.dump(), [*overrides, f"train.max_steps={max_steps}", "train.export=false"])
    return validate_config(raw, origin="tune trial")


def _check_space(cfg: RunConfig) -> None:
    """Every searched key must be a real config field: try the first value of each before Ray starts."""
    if not cfg.tune.space:
        raise ConfigError("tune.space is empty: name at least one field to search, e.g. train.optimizer.lr")
    for key, spec in cfg.tune.space.items():
        value = spec[0] if isinstance(spec, list) else next(iter(spec.values()))[0]
        try:
            trial_config(cfg, {key: value}, cfg.tune.max_steps)
        except ConfigError as e:
            raise ConfigError(f"tune.space.{key}: {e}") from None


def run(cfg: RunConfig) -> dict[str, Any]:
    """Run the search; writes ``tune/summary.json`` and ``tune/best.yaml``."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    tc = cfg.tune
    space = search_space(tc.space)
    _check_space(cfg)
    rd = RunDir.of(cfg)
    rd.data.manifest()  # a missing prep fails here, before Ray starts
    out = rd.start_stage(cfg, "tune")
    train = stages.get("train").entry

    def trial(params: dict[str, Any]) -> None:
        # Each trial is a run of its own whose packed data is this run's.
        trial_dir = out / "trials" / tune.get_context().get_trial_id()
        trial_cfg = trial_config(
            cfg, {**params, "run_dir": str(trial_dir), "train.data_dir": str(rd.data.dir)}, tc.max_steps
        )
        train(trial_cfg, callbacks=[TuneReportCallback()])

    scheduler = (
        ASHAScheduler(
            time_attr="step",
            max_t=tc.max_steps,
            grace_period=tc.grace_period,
            reduction_factor=tc.reduction_factor,
        )
        if tc.scheduler == "asha"
        else FIFOScheduler()
    )
    t0 = time.time()
    with ray_session(cfg.cluster, use_gpu=cfg.train.use_gpu):
        tuner = tune.Tuner(
            # The trial function only drives a TorchTrainer: its workers hold the real resources.
            tune.with_resources(trial, {"CPU": 0.01}),
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=tc.metric,
                mode=tc.mode,
                num_samples=tc.num_samples,
                scheduler=scheduler,
                max_concurrent_trials=tc.max_concurrent,
            ),
            run_config=tune.RunConfig(name="tune", storage_path=str(out / "ray"), verbose=0),
        )
        results = tuner.fit()
    trials = []
    for r in results:
        trials.append(
            {
                "trial_id": r.metrics.get("trial_id") if r.metrics else None,
                "params": {k: r.config[k] for k in tc.space},
                "steps": (r.metrics or {}).get("step"),
                tc.metric: (r.metrics or {}).get(tc.metric),
                "error": str(r.error).splitlines()[0] if r.error else None,
            }
        )
    metrics = rd.metrics("tune")
    for t in trials:
        metrics.write(**t)
    metrics.close()
    scored = [t for t in trials if t[tc.metric] is not None]
    if not scored:
        # The same mistake usually fails every trial: a user error says what to fix in one line.
        for r in results:
            user = find_user_error(r.error) if r.error else None
            if user is not None:
                raise user
        raise RuntimeError(f"no trial reported {tc.metric}: {[t['error'] for t in trials]}")
    best = results.get_best_result(metric=tc.metric, mode=tc.mode, scope="last")
    best_params = {k: best.config[k] for k in tc.space}
    best_cfg = trial_config(cfg, best_params, cfg.train.max_steps)
    best_yaml = out / "best.yaml"
    best_yaml.write_text(yaml.safe_dump(best_cfg.public(), sort_keys=False), encoding="utf-8")
    summary = {
        "trials": len(trials),
        "trials_stopped_early": sum(1 for t in scored if (t["steps"] or 0) < tc.max_steps),
        "metric": tc.metric,
        "best_value": best.metrics[tc.metric],
        "best_params": best_params,
        "best_config": str(best_yaml),
        "best_checkpoint": _checkpoint_path(best),
        "seconds": round(time.time() - t0, 1),
        "all": trials,
    }
    rd.write_summary("tune", summary)
    return summary


def _checkpoint_path(result: Any) -> str | None:
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    path = (result.metrics or {}).get(CHECKPOINT_PATH_KEY)
    return str(Path(path)) if path else None
