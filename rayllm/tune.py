"""tune stage (Ray Tune): search training settings against validation metrics, promote the best.

Every trial is a train run of its own (the train stage, found in the stage table, so tune does not
import train) in ``tune/trials/<trial>/``, on packed data materialized once for all trials.

- Space: a plain list is every value (a grid, run in a seeded shuffled order); ``{choice: [...]}``
  and the ranges are sampled; ``tune.search: optuna`` proposes points with Optuna's TPE instead.
- ASHA as its paper states it (Li et al. 2020, Algorithm 2): every trial trains to the first rung,
  and whenever a trial is among the best ``1/reduction_factor`` of a rung's results it is promoted to
  the next rung, before any new trial starts. Each Ray Tune trial is one rung run of a trial, from
  one rung to the next: it resumes the trial's own checkpoint and stops at the rung
  (``train.stop_at``) on the learning-rate schedule of ``tune.max_steps``. Ray's ``ASHAScheduler``
  stops trials instead (a trial that reaches a rung first has nothing to be compared with), and its
  ``HyperBandScheduler``'s brackets train more trials to the end; docs/tuning.md has the figures.
- Concurrency: as many rung runs as the cluster's CPUs (GPUs) hold, unless ``tune.max_concurrent``.
- An interrupted search resumes (Ray Tune's restore, the searcher's rungs included) without
  re-running finished rung runs, as long as the search it was running is the same one.
- Results: a table sorted by the metric, ``tune/curves.png`` (every trial's validation curve; trials
  left at a rung end in a cross), ``tune/best.yaml`` (``rayllm train -c tune/best.yaml`` runs it as
  is) and the best trial's checkpoint exported to a Hugging Face folder.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import math
import random
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import yaml
from ray.tune.search import Searcher
from rich.console import Console
from rich.table import Table

from rayllm import stages
from rayllm.config import RunConfig, apply_overrides, validate_config
from rayllm.errors import ConfigError, find_user_error
from rayllm.progress import FollowTrials
from rayllm.rundir import SPLITS, RunDir, write_json
from rayllm.runtime import ray_session
from rayllm.tracking import Tracked

SAMPLERS = ("choice", "grid", "uniform", "loguniform", "randint")
EXPERIMENT = "tune"
GRID = "grid"  # the Tune config key of the grid's points: no config field is named so
REPORTED_AS = {"train_loss": "loss"}  # tune.metric -> the name train reports and logs it by
log = logging.getLogger("rayllm")


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

    A trial still warming up is judged by how fast its learning rate ramps, not by where it is going
    (docs/tuning.md shows it on the demo model).
    """
    tc = cfg.tune
    if tc.grace_period is not None:
        return tc.grace_period
    floor = tc.max_steps // tc.reduction_factor**2
    return max(1, min(tc.max_steps, max(cfg.train.schedule.warmup_steps, floor)))


def rungs(cfg: RunConfig) -> list[int]:
    """The steps a trial is judged at: grace * rf**k below ``tune.max_steps``, then ``max_steps``.

    With ``fifo`` there is one: every trial trains to ``max_steps`` in one rung run.
    """
    tc = cfg.tune
    if tc.scheduler == "fifo":
        return [tc.max_steps]
    out = [grace_period(cfg)]
    while out[-1] * tc.reduction_factor < tc.max_steps:
        out.append(out[-1] * tc.reduction_factor)
    return sorted({*out, tc.max_steps})


def trial_config(base: RunConfig, params: dict[str, Any], stop_at: int | None = None) -> RunConfig:
    """One trial's train run: its settings, on the schedule of ``tune.max_steps``, validating at
    every rung, and (for one rung run) stopping at ``stop_at``."""
    tc = base.tune
    eval_at = sorted({*base.train.eval_at, *(r for r in rungs(base) if r < tc.max_steps)})
    sets = [
        *_overrides(params),
        f"train.max_steps={tc.max_steps}",
        f"train.stop_at={json.dumps(stop_at)}",
        f"train.eval_at={json.dumps(eval_at)}",
        "train.export=false",
        "train.storage=null",
        "tracking={}",  # the search logs its trials, nested under its own run
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


def grid_trials(cfg: RunConfig, space: dict[str, Any]) -> list[dict[str, Any]]:
    """Every trial of a random search, in order: the grid's points (shuffled by ``tune.seed``),
    ``num_samples`` times, with the sampled fields drawn by Ray Tune's variant generator."""
    import numpy as np
    from ray.tune.search.variant_generator import generate_variants

    tc = cfg.tune
    rng = np.random.RandomState(tc.seed)
    return [
        trial_params(config, tc.space)
        for _ in range(num_samples(cfg))
        for _, config in generate_variants(space, random_state=rng)
    ]


TRIAL, STOP_AT = "trial", "stop_at"  # a rung run's keys in its Tune config, beside the searched fields


class Promotions(Searcher):
    """ASHA (Li et al. 2020, Algorithm 2) as a Ray Tune searcher whose every Tune trial is a rung run.

    A rung run trains one trial from its rung to the next. Asked for one, it promotes the first trial,
    from the top rung down, that is among the best ``1/reduction_factor`` of its rung's results and
    not promoted yet; else it starts a new trial (the next grid point, or one Optuna proposes, told
    of each trial's first-rung result); else it waits for the running ones. When none is left, and no
    trial has reached the last rung (few trials), the best of the highest rung reached goes on, so
    that the search always hands on a trial trained for ``tune.max_steps``.
    """

    def __init__(
        self,
        rungs: list[int],
        reduction_factor: int,
        metric: str,
        mode: str,
        trials: list[dict[str, Any]] | None = None,
        sampler: Searcher | None = None,
        samples: int = 0,
    ) -> None:
        super().__init__(metric=metric, mode=mode)
        self.rungs, self.rf = rungs, reduction_factor
        self._queue = list(trials or [])  # the trials not started yet (random search)
        self._sampler, self._samples = sampler, samples  # or Optuna, for this many trials
        self.params: list[dict[str, Any]] = []  # trial i's settings
        self.results: list[dict[int, float]] = [{} for _ in rungs]  # rung -> trial -> metric
        self.promoted: list[set[int]] = [set() for _ in rungs]
        self.running: dict[str, tuple[int, int]] = {}  # Tune trial id of a rung run -> (trial, rung)
        self._most = (len(self._queue) if trials else samples) * len(rungs)

    def max_runs(self) -> int:
        """At most every trial to every rung: Tune's ``num_samples`` (the searcher ends sooner)."""
        return self._most

    @staticmethod
    def name(trial: int) -> str:
        return f"trial_{trial:03d}"

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True  # built with its metric, mode and trials

    def _ranked(self, rung: int) -> list[int]:
        values = self.results[rung]
        return sorted(values, key=lambda i: values[i] if self.mode == "min" else -values[i])

    def _promotion(self, past_the_best: bool = False) -> tuple[int, int] | None:
        """The first trial not promoted yet, from the top rung down, among the best 1/rf of its rung
        (``past_the_best``: among all of it)."""
        for k in reversed(range(len(self.rungs) - 1)):
            ranked = self._ranked(k)
            for i in ranked if past_the_best else ranked[: len(ranked) // self.rf]:
                if i not in self.promoted[k]:
                    return i, k + 1
        return None

    def _new_trial(self) -> tuple[int, int] | None:
        i = len(self.params)
        if self._sampler is not None:
            if i >= self._samples:
                return None
            config = self._sampler.suggest(self.name(i))
            if not isinstance(config, dict):
                return None
            self.params.append(config)
        elif self._queue:
            self.params.append(self._queue.pop(0))
        else:
            return None
        return i, 0

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        job, why = self._promotion(), "among the best 1/{rf} of the {n} there"
        if job is None:
            job = self._new_trial()
        if job is None and not self.running and not self.results[-1]:  # none trained to the end yet
            job, why = (
                self._promotion(past_the_best=True),
                "the best not promoted, so that a trial reaches the end",
            )
        if job is None:
            return None if self.running else Searcher.FINISHED
        i, k = job
        if k:
            self.promoted[k - 1].add(i)
            was = self.results[k - 1]
            _say(
                f"{self.name(i)} promoted to step {self.rungs[k]}: {self.metric} {was[i]:.4f} at step "
                f"{self.rungs[k - 1]} is {why.format(rf=self.rf, n=len(was))}"
            )
        self.running[trial_id] = (i, k)
        return {**self.params[i], TRIAL: self.name(i), STOP_AT: self.rungs[k]}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self.running:
            return
        i, k = self.running.pop(trial_id)
        value = (result or {}).get(self.metric)
        failed = error or value is None
        if failed:  # left out: a trial without a result at a rung is never promoted from it
            # In the stage log and the results table only: a user error ends the search in one line.
            log.warning("%s failed on its way to step %d; it is left out", self.name(i), self.rungs[k])
        else:
            self.results[k][i] = value
            _say(f"{self.name(i)} reached step {self.rungs[k]}: {self.metric} {value:.4f}")
        if k == 0 and self._sampler is not None:  # Optuna learns from first-rung results
            self._sampler.on_trial_complete(self.name(i), None if failed else {self.metric: value}, failed)

    def save(self, checkpoint_path: str) -> None:
        """The search's state as JSON, by name; Optuna's own saved state (its format) inside it."""
        state = {
            "queue": self._queue,
            "params": self.params,
            "results": [{str(i): v for i, v in rung.items()} for rung in self.results],
            "promoted": [sorted(p) for p in self.promoted],
            "running": {tid: list(job) for tid, job in self.running.items()},
            "sampler": None,
        }
        if self._sampler is not None:
            with tempfile.TemporaryDirectory() as d:
                self._sampler.save(f"{d}/sampler")
                state["sampler"] = base64.b64encode(Path(d, "sampler").read_bytes()).decode()
        Path(checkpoint_path).write_text(json.dumps(state), encoding="utf-8")

    def restore(self, checkpoint_path: str) -> None:
        state = json.loads(Path(checkpoint_path).read_text(encoding="utf-8"))
        self._queue, self.params = state["queue"], state["params"]
        self.results = [{int(i): v for i, v in rung.items()} for rung in state["results"]]
        self.promoted = [set(p) for p in state["promoted"]]
        self.running = {tid: (job[0], job[1]) for tid, job in state["running"].items()}
        if self._sampler is not None and state["sampler"]:
            with tempfile.TemporaryDirectory() as d:
                Path(d, "sampler").write_bytes(base64.b64decode(state["sampler"]))
                self._sampler.restore(f"{d}/sampler")


def _say(line: str) -> None:
    """A progress line on the driver's stderr (Tune itself runs quiet) and in the stage log."""
    log.info(line)
    print(f"tune: {line}", file=sys.stderr, flush=True)


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


def _searcher(cfg: RunConfig, space: dict[str, Any]) -> Promotions:
    """The search: ``space`` is ``search_space``'s Tune form of ``tune.space``."""
    tc = cfg.tune
    metric = REPORTED_AS.get(tc.metric, tc.metric)
    steps = rungs(cfg)
    if tc.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        sampler = OptunaSearch(space=space, metric=metric, mode=tc.mode, seed=tc.seed)
        return Promotions(
            steps, tc.reduction_factor, metric, tc.mode, sampler=sampler, samples=num_samples(cfg)
        )
    return Promotions(steps, tc.reduction_factor, metric, tc.mode, trials=grid_trials(cfg, space))


def run(cfg: RunConfig) -> dict[str, Any]:
    """Run (or resume) the search; writes ``tune/summary.json``, ``best.yaml`` and ``curves.png``."""
    tc = cfg.tune
    space = _validated_space(cfg)
    rd = RunDir.of(cfg)
    manifest = rd.data.manifest()  # a missing prep fails here, before Ray starts
    out = rd.start_stage(cfg, "tune")
    same_search = _same_search(cfg, rd, out)
    metric = REPORTED_AS.get(tc.metric, tc.metric)
    t0 = time.time()
    tracked = Tracked.open(cfg, "tune")  # an unreachable tracker stops the search before it starts
    with tracked or nullcontext(), ray_session(cfg.cluster, use_gpu=cfg.train.use_gpu):
        # Read and materialized once: every trial's workers then start from the object store.
        small = all(manifest.split_gb(s) < cfg.train.cache_data_gb for s in SPLITS)
        splits = {s: rd.data.dataset(s, cfg.train.cache_data_gb) for s in SPLITS} if small else None
        tuner, concurrent = _tuner(cfg, space, out / "ray", same_search, splits)
        with FollowTrials(out / "trials", metric, tc.max_steps):
            results = tuner.fit()
        trials, best = _results(out, results, tc.metric, tc.mode)
        export = _export_best(cfg, rd, out, best)
        if tracked:
            _track(tracked, out, trials, best, tc.metric, export)
    metrics = rd.metrics("tune", replace=True)  # the whole search, restored trials included
    for t in trials:
        metrics.write(**t)
    metrics.close()
    best_yaml = out / "best.yaml"
    best_yaml.write_text(yaml.safe_dump(best_config(cfg, best["params"]).public(), sort_keys=False))
    plot_curves(trials, out / "trials", out / "curves.png", tc.max_steps)
    _print_table(trials, tc.metric, tc.mode)
    first_steps = [t["first_step_s"] for t in trials if t["first_step_s"] is not None]
    scored = [t for t in trials if t[tc.metric] is not None]
    summary = {
        "trials": len(trials),
        "rung_runs": len(results),
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
        "rungs": rungs(cfg),
        "curves": str(out / "curves.png"),
        "seconds": round(time.time() - t0, 1),
        "all": trials,
    }
    rd.write_summary("tune", summary)
    return summary


def _validated_space(cfg: RunConfig) -> dict[str, Any]:
    """``tune.space`` in Ray Tune's form, every searched key tried as a config field, before Ray starts."""
    tc = cfg.tune
    space = search_space(tc.space, tc.search, tc.grid_order, tc.seed)  # a bad space fails here
    _check_space(cfg)
    if tc.search == "optuna":
        try:
            import optuna  # noqa: F401  (Ray's OptunaSearch drives it)
        except ImportError:
            raise ConfigError("tune.search=optuna needs the optuna package: pip install optuna") from None
    return space


def _same_search(cfg: RunConfig, rd: RunDir, out: Path) -> bool:
    """Whether ``out`` holds this very search (which then resumes); another search's trials and
    Tune state are removed, so that they are never resumed as this one's."""
    key = _search_key(cfg, rd)
    saved = out / "search.json"
    same = saved.is_file() and json.loads(saved.read_text()) == json.loads(json.dumps(key))
    if not same:
        shutil.rmtree(out / "ray", ignore_errors=True)
        shutil.rmtree(out / "trials", ignore_errors=True)
        write_json(saved, key)
    return same


def train_to_rung(
    config: dict[str, Any], cfg: RunConfig, data_dir: str, trials_dir: Path, splits: dict[str, Any] | None
) -> None:
    """The Ray Tune trainable: one rung run, a trial trained in its own run folder from its
    checkpoint (if any) to the rung in ``config[STOP_AT]``, reporting the metric there."""
    from ray import tune

    params = {k: config[k] for k in cfg.tune.space}
    folder = trials_dir / config[TRIAL]
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "trial.json").is_file():  # its first rung run: where first_step_s counts from
        write_json(folder / "trial.json", {"started": time.time(), "params": params})
    trial_cfg = trial_config(
        cfg, {**params, "run_dir": str(folder), "train.data_dir": data_dir}, config[STOP_AT]
    )
    stages.get("train").entry(trial_cfg, splits=splits)
    metric = REPORTED_AS.get(cfg.tune.metric, cfg.tune.metric)
    at_rung = [r for r in _trial_metrics(folder) if r.get("step") == config[STOP_AT] and metric in r]
    if not at_rung:
        raise RuntimeError(f"{folder}: no {metric} logged at step {config[STOP_AT]}")
    tune.report({metric: at_rung[-1][metric], "step": config[STOP_AT]})


def _tuner(
    cfg: RunConfig, space: dict[str, Any], storage: Path, resume: bool, splits: dict[str, Any] | None
) -> tuple[Any, int]:
    """The Ray Tune ``Tuner`` of the search, restored when ``resume`` and Tune saved one; and how many
    rung runs it runs at once."""
    from ray import tune

    tc = cfg.tune
    trainable = tune.with_parameters(
        train_to_rung,
        cfg=cfg,
        data_dir=str(RunDir.of(cfg).data.dir),
        trials_dir=storage.parent / "trials",
        splits=splits,
    )
    # The trainable only drives a TorchTrainer: its workers hold the real resources.
    trainable = tune.with_resources(trainable, {"CPU": 0.01})
    concurrent = max_concurrent(cfg)
    experiment = storage / EXPERIMENT
    if resume and tune.Tuner.can_restore(str(experiment)):
        # A rung run that failed stays failed: its trial was left out of the rungs it would have joined.
        return tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True), concurrent
    searcher = _searcher(cfg, space)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=REPORTED_AS.get(tc.metric, tc.metric),
            mode=tc.mode,
            num_samples=searcher.max_runs(),
            search_alg=searcher,
            max_concurrent_trials=concurrent,
        ),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(storage), verbose=0),
    )
    return tuner, concurrent


def _results(out: Path, results: Any, metric: str, mode: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every trial as a record (from its own run folder) and the best one; when no trial reported the
    metric, the user error that failed them (the same mistake usually fails every trial)."""
    errors = {r.config[TRIAL]: str(r.error).splitlines()[0] for r in results if r.error and r.config}
    trials = [_trial_row(folder, metric, errors) for folder in sorted((out / "trials").glob("*"))]
    scored = [t for t in trials if t[metric] is not None]
    if not scored:
        for r in results:
            user = find_user_error(r.error) if r.error else None
            if user is not None:
                raise user
        raise RuntimeError(f"no trial reported {metric}: {[t['error'] for t in trials]}")
    best = min(scored, key=lambda t: t[metric] if mode == "min" else -t[metric])
    return trials, best


def _track(
    tracked: Tracked,
    out: Path,
    trials: list[dict[str, Any]],
    best: dict[str, Any],
    metric: str,
    export: str | None,
) -> None:
    """Every trial as a run nested under the search's, the best tagged, its export logged."""
    tracked.trials(
        [
            (t["trial_id"], t["params"], _trial_metrics(out / "trials" / t["trial_id"]), t is best)
            for t in trials
        ]
    )
    tracked.scores({f"best_{metric}": best[metric]}, best["steps"] or 0)
    tracked.tag("best_trial", best["trial_id"])
    if export:
        tracked.export(export)


def _trial_metrics(folder: Path) -> list[dict[str, Any]]:
    """A trial's own train-stage metrics: each trial is a run directory of its own."""
    return RunDir.of(RunConfig(run_dir=str(folder))).read_metrics("train")


def _trial_row(folder: Path, metric: str, errors: dict[str, str]) -> dict[str, Any]:
    """One trial as a plain record, from its own run folder (``tune/trials/<trial>``)."""
    meta = json.loads((folder / "trial.json").read_text())
    rows = _trial_metrics(folder)
    first = next((x["time"] for x in rows if x.get("step") == 1 and "loss" in x), None)
    key = REPORTED_AS.get(metric, metric)
    scored = [x for x in rows if key in x and "step" in x]
    # The checkpoint of its last finished rung run, as that run's train summary names it.
    train = RunDir.of(RunConfig(run_dir=str(folder))).summary("train") or {}
    return {
        "trial_id": folder.name,
        "params": meta["params"],
        "steps": scored[-1]["step"] if scored else None,
        metric: scored[-1][key] if scored else None,
        "first_step_s": round(first - meta["started"], 1) if first else None,
        "checkpoint": train.get("checkpoint"),
        "error": errors.get(folder.name),
    }


def _export_best(cfg: RunConfig, rd: RunDir, out: Path, best: dict[str, Any]) -> str | None:
    """Export the best trial's checkpoint: run to its last step, the train stage finds nothing left to
    train and exports that checkpoint without starting workers, so tune needs no export code."""
    if best["checkpoint"] is None:
        return None
    folder = out / "trials" / best["trial_id"]
    params = {**best["params"], "run_dir": str(folder), "train.data_dir": str(rd.data.dir)}
    sets = ["train.export=true"]
    trial_cfg = validate_config(
        apply_overrides(trial_config(cfg, params, best["steps"]).dump(), sets), origin="tune export"
    )
    return stages.get("train").entry(trial_cfg)["export_dir"]


def plot_curves(trials: list[dict[str, Any]], trials_dir: Path, png: Path, max_steps: int) -> None:
    """Every trial's validation loss against step on one PNG; a trial left at a rung ends in a cross."""
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
    ax.set_title("tune: every trial (x: left at a rung)")
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
