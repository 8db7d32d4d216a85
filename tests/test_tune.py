"""tune: real Ray Tune rung runs, each a real DeepSpeed run: a grid under ASHA's promotions, interrupted
and resumed, its best config reproduced by `rayllm train`; the promotion rule itself without Ray."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import mlflow_history

from rayllm.config import RunConfig, load_config
from rayllm.errors import ConfigError
from rayllm.rundir import RunDir


def tune_cfg(prepped: RunConfig, run_dir: Path, space: dict, **tune) -> RunConfig:
    raw = prepped.dump()
    raw["run_dir"] = str(run_dir)
    raw["train"]["data_dir"] = str(Path(prepped.run_dir) / "prep")
    # One worker per trial: trials are real DeepSpeed runs; 2-worker runs are train's tests.
    # eval_every=4: ASHA's first rung (2) is validated only because tune asks for it.
    raw["train"].update(eval_every=4, checkpoint_every=4, workers=1, micro_batch=8)
    raw["tune"] = {"space": space, "max_steps": 16, "grace_period": 2, **tune}
    return RunConfig.model_validate(raw)


def test_grid_asha_resume_tracking_and_best_config(ray_cluster, prepped, tmp_path, mlflow_server):
    """A plain list is a grid (2 trials, not 1 sample); ASHA leaves the weak one at the first rung and
    trains the best on, rung by rung, from its checkpoints; a search killed after its first rung run resumes
    without re-running it; the search logs each trial to MLflow as a run nested under its own, the
    best tagged; best.yaml reproduces the best trial."""
    from mlflow import MlflowClient

    from rayllm.train.stage import run as train

    # One rung run at a time (tune.seed 0 keeps this grid's order: 3e-3 first, then the weak 3e-5).
    # Rungs 2 and 16 (reduction factor 8): three rung runs; tests above check promotions within a grid.
    cfg = tune_cfg(
        prepped, tmp_path, {"train.optimizer.lr": [3e-3, 3e-5]}, max_concurrent=1, reduction_factor=8
    )
    tracking = {"mlflow": {"uri": mlflow_server, "experiment": "search"}}
    cfg = RunConfig.model_validate({**cfg.dump(), "tracking": tracking})
    config = tmp_path / "tune.yaml"
    config.write_text(yaml.safe_dump(cfg.public()))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "rayllm", "tune", "-c", str(config)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300

    def recorded_done() -> bool:  # Tune's own experiment state lists a rung run as finished
        states = (tmp_path / "tune" / "ray").glob("*/experiment_state-*.json")
        return any("TERMINATED" in p.read_text() for p in states)

    while not (
        (finished := sorted((tmp_path / "tune" / "trials").glob("*/train/summary.json"))) and recorded_done()
    ):
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = finished[0].parent

    def trained(folder: Path) -> list[int]:  # the steps of training rows (an export adds an event)
        return [
            json.loads(r)["step"]
            for r in (folder / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in r
        ]

    first_steps = trained(first)
    first_trial = (first.parent / "trial.json").read_text()  # a trial started again rewrites it
    assert first.parent.name == "trial_000" and first_steps[-1] == 2  # its first rung run: to the first rung

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # Restored as finished: promoted later, it went on from its checkpoint, no step trained twice.
    steps = trained(first)
    assert steps[: len(first_steps)] == first_steps and steps == sorted(set(steps)) and steps[-1] == 16
    assert (first.parent / "trial.json").read_text() == first_trial
    assert "trial_000 promoted to step 16" in done.stderr
    s = json.loads((tmp_path / "tune" / "summary.json").read_text())
    assert s["trials"] == 2 and [t["trial_id"] for t in s["all"]] == ["trial_000", "trial_001"]
    assert s["trials_stopped_early"] == 1 and s["rungs"] == [2, 16] and s["rung_runs"] == 3
    for t in s["all"]:  # every trial validated at each rung it reached, off its eval_every
        trial_run = RunConfig(run_dir=str(tmp_path / "tune" / "trials" / t["trial_id"]))
        rows = RunDir.of(trial_run).read_metrics("train")
        validated = [r["step"] for r in rows if "val_loss" in r]
        assert validated == [v for v in (0, 2, 4, 8, 12, 16) if v <= t["steps"]], t
    assert s["trial_steps"] == 2 + 16 and s["best_steps"] == 16  # the grid: 2 x 16
    assert all(t["first_step_s"] is not None and t["first_step_s"] > 0 for t in s["all"])
    assert s["best_params"] == {"train.optimizer.lr": 3e-3}
    assert "tune trials by val_loss" in done.stderr  # the table, sorted by the metric
    assert (tmp_path / "tune" / "curves.png").stat().st_size > 10_000
    assert Path(s["best_export"], "model.safetensors").is_file()
    rows = [json.loads(x) for x in (tmp_path / "tune" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all("val_loss" in r for r in rows)

    # MLflow: the resumed search's run, one nested run per trial with its settings and its metrics
    # file's val_loss at each step (the killed search's first rung run included), the best tagged.
    client = MlflowClient(mlflow_server)
    parent = json.loads((tmp_path / "tracking.json").read_text())["mlflow:tune"]
    experiment = client.get_experiment_by_name("search").experiment_id
    nested = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    by_trial = {r.data.tags["trial"]: r for r in nested}
    assert sorted(by_trial) == ["trial_000", "trial_001"] and len(nested) == 2
    for t in s["all"]:
        r = by_trial[t["trial_id"]]
        assert float(r.data.params["train.optimizer.lr"]) == t["params"]["train.optimizer.lr"]
        trial_run = RunConfig(run_dir=str(tmp_path / "tune" / "trials" / t["trial_id"]))
        rows = RunDir.of(trial_run).read_metrics("train")
        assert mlflow_history(client, r.info.run_id, "val_loss") == pytest.approx(
            {x["step"]: x["val_loss"] for x in rows if "val_loss" in x}
        )
        assert (r.data.tags.get("best") == "true") == (t["trial_id"] == s["best_trial"])
    assert client.get_run(parent).data.tags["best_trial"] == s["best_trial"]

    # `rayllm train -c tune/best.yaml` runs the best settings as they are.
    best = load_config([s["best_config"]], [f"train.max_steps={s['best_steps']}", "train.export=false"])
    assert best.run_dir == str(tmp_path) and best.train.optimizer.lr == s["best_params"]["train.optimizer.lr"]
    again = train(
        load_config([s["best_config"]], [f"train.max_steps={s['best_steps']}"], str(tmp_path / "b"))
    )
    assert again["val_loss_last"] == pytest.approx(s["best_value"], rel=0.02)


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"train.optimizer.lrr": [0.1]}, r"tune\.space\.train\.optimizer\.lrr: .*unknown key"),
        ({"train.optimizer.lr": {"loguniform": [0.0, 1.0]}}, "loguniform needs low > 0"),
        ({"train.optimizer.lr": {"normal": [0, 1]}}, "use a list of values or one of"),
        ({"train.deepspeed.zero_stage": [4]}, r"tune\.space\.train\.deepspeed\.zero_stage: .*got 4"),
        ({}, "tune.space is empty"),
    ],
)
def test_bad_search_space_is_rejected_before_ray(prepped, tmp_path, space, message):
    from rayllm.tune import run

    with pytest.raises(ConfigError, match=message):
        run(tune_cfg(prepped, tmp_path, space))


def test_lists_are_grids_and_optuna_samples_them():
    from ray.tune.search.sample import Categorical

    from rayllm.tune import num_samples, search_space, trial_params

    grid = search_space({"a": [1, 2], "b": {"choice": [3, 4]}}, order="listed")
    assert grid["grid"] == {"grid_search": [{"a": 1}, {"a": 2}]} and isinstance(grid["b"], Categorical)
    assert trial_params({"grid": {"a": 2}, "b": 4}, {"a": [1, 2], "b": {}}) == {"a": 2, "b": 4}
    # Shuffled by default: every point once, in an order fixed by the seed and not the listed one.
    space = {"a": [1, 2, 3, 4], "b": ["x", "y", "z"]}
    listed = search_space(space, order="listed")["grid"]["grid_search"]
    assert listed[:4] == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 1, "b": "z"}, {"a": 2, "b": "x"}]
    orders = [search_space(space, seed=seed)["grid"]["grid_search"] for seed in (0, 0, 1)]
    assert orders[0] == orders[1] != orders[2] and orders[0] != listed
    assert all(sorted(o, key=str) == sorted(listed, key=str) for o in orders)
    assert isinstance(search_space({"a": [1, 2]}, "optuna")["a"], Categorical)
    with pytest.raises(ConfigError, match="optuna proposes points itself"):
        search_space({"a": {"grid": [1, 2]}}, "optuna")
    only_grid = RunConfig.model_validate({"tune": {"space": {"train.optimizer.lr": [1e-3, 3e-3]}}})
    sampled = RunConfig.model_validate(
        {"tune": {"space": {"train.optimizer.lr": {"loguniform": [1e-4, 1e-2]}}}}
    )
    assert num_samples(only_grid) == 1 and num_samples(sampled) == 8


def test_rungs_and_every_trial_validates_at_them():
    """Rungs are grace * rf**k below max_steps, then max_steps; a trial validates at each."""
    from rayllm.tune import grace_period, rungs, trial_config

    def cfg(warmup: int = 30, **tune) -> RunConfig:
        raw = {
            "train": {"eval_every": 50, "eval_at": [7], "schedule": {"warmup_steps": warmup}},
            "tune": tune,
        }
        return RunConfig.model_validate(raw)

    # Default grace: the warmup, at least max_steps / rf^2; rf defaults to 3.
    assert grace_period(cfg(max_steps=150)) == 30 and rungs(cfg(max_steps=150)) == [30, 90, 150]
    assert grace_period(cfg(0, max_steps=100)) == 11 and rungs(cfg(0, max_steps=100)) == [11, 33, 99, 100]
    assert grace_period(cfg(500, max_steps=100)) == 100 and rungs(cfg(500, max_steps=100)) == [100]
    assert rungs(cfg(max_steps=81, grace_period=1)) == [1, 3, 9, 27, 81]
    assert rungs(cfg(max_steps=64, grace_period=2, reduction_factor=2)) == [2, 4, 8, 16, 32, 64]
    assert rungs(cfg(max_steps=150, scheduler="fifo")) == [150]  # one rung run: every trial to the end
    # A trial validates at every rung before its last step (which always validates), plus its own.
    assert trial_config(cfg(0, max_steps=100), {}).train.eval_at == [7, 11, 33, 99]
    assert trial_config(cfg(max_steps=81, grace_period=1), {}).train.eval_at == [1, 3, 7, 9, 27]
    assert trial_config(cfg(0, max_steps=100, scheduler="fifo"), {}).train.eval_at == [7]
    # A rung run stops at its rung on the schedule of the whole trial.
    one = trial_config(cfg(0, max_steps=100), {"train.optimizer.lr": 1e-3}, stop_at=33).train
    assert (one.max_steps, one.stop_at, one.end_step, one.optimizer.lr) == (100, 33, 33, 1e-3)
    with pytest.raises(ValueError, match="grace_period=200 is longer than a trial"):
        cfg(max_steps=100, grace_period=200)
    with pytest.raises(ValueError, match="stop_at=120 is past the run's max_steps=100"):
        RunConfig.model_validate({"train": {"max_steps": 100, "stop_at": 120}})


def _search(searcher, loss, runs: list | None = None) -> dict[str, int]:
    """Drive a searcher as Tune does with one rung run at a time; ``loss(params, step)`` scores one.
    Returns each trial's last step; ``runs`` collects (trial, step) in the order they ran."""
    from rayllm.tune import STOP_AT, TRIAL

    reached: dict[str, int] = {}
    for n in range(100):
        job = searcher.suggest(f"job{n}")
        if job == "FINISHED":
            return reached
        assert job is not None  # nothing runs, so there is always a job or the end
        reached[job[TRIAL]] = job[STOP_AT]
        if runs is not None:
            runs.append((job[TRIAL], job[STOP_AT]))
        value = loss(job, job[STOP_AT])
        searcher.on_trial_complete(f"job{n}", None if value is None else {"val_loss": value})
    raise AssertionError("the search did not end")


def test_promotions_follow_the_asha_paper_and_survive_a_restore(tmp_path):
    """ASHA's Algorithm 2: a trial among the best third of a rung goes on before a new one starts;
    the search ends with the best trial at the last rung; a saved searcher continues the same way."""
    from rayllm.tune import Promotions

    lrs = [1e-4, 3e-3, 1e-3, 3e-4, 1e-2, 3e-5, 2e-3, 5e-4, 1e-5]  # 3e-3 is the best at every step
    trials = [{"train.optimizer.lr": lr} for lr in lrs]

    def loss(job: dict, step: int) -> float:
        return 1 + abs(math.log(job["train.optimizer.lr"] / 3e-3)) + 10 / step

    runs: list = []
    reached = _search(Promotions([1, 3, 9], 3, "val_loss", "min", trials=trials), loss, runs)
    # The third result lets the best of three (trial 1, 3e-3) go on before trial 3 starts.
    assert runs[:4] == [("trial_000", 1), ("trial_001", 1), ("trial_002", 1), ("trial_001", 3)]
    assert sorted(reached.values()) == [1] * 6 + [3] * 2 + [9]  # 9 trials, 3 promoted, 1 to the end
    assert reached["trial_001"] == 9 and sum(reached.values()) == 21  # the grid would run 81 steps

    # Saved after any rung run and restored into a fresh searcher, the search goes on the same way.
    first = Promotions([1, 3, 9], 3, "val_loss", "min", trials=trials)
    for n in range(5):
        job = first.suggest(f"job{n}")
        first.on_trial_complete(f"job{n}", {"val_loss": loss(job, job["stop_at"])})
    running = first.suggest("leg5")  # in flight when the search was interrupted
    first.save(str(tmp_path / "searcher.json"))
    saved = json.loads((tmp_path / "searcher.json").read_text())  # explicit state, by name
    assert saved["running"] == {"leg5": [int(running["trial"][-3:]), [1, 3, 9].index(running["stop_at"])]}
    assert sum(len(r) for r in saved["results"]) == 5 and saved["sampler"] is None
    again = Promotions([1, 3, 9], 3, "val_loss", "min", trials=[])
    again.restore(str(tmp_path / "searcher.json"))
    again.on_trial_complete("leg5", {"val_loss": loss(running, running["stop_at"])})
    rest: list = []
    _search(again, loss, rest)
    assert [(running["trial"], running["stop_at"]), *rest][: len(runs) - 5] == runs[5:]


def test_few_trials_still_hand_on_one_trained_to_the_end_and_failures_are_left_out():
    from rayllm.tune import Promotions

    trials = [{"train.optimizer.lr": lr} for lr in (3e-3, 3e-5, 1.0)]

    def loss(job: dict, step: int) -> float | None:  # lr 1.0 fails (no metric)
        lr = job["train.optimizer.lr"]
        return None if lr == 1.0 else abs(math.log(lr / 3e-3)) + 1 / step

    # Two results at the first rung are too few to promote one of three: the best goes on anyway.
    reached = _search(Promotions([2, 6, 16], 3, "val_loss", "min", trials=trials), loss)
    assert reached == {"trial_000": 16, "trial_001": 2, "trial_002": 2}


def test_a_sampler_proposes_new_trials_and_learns_first_rung_results():
    """With ``tune.search: optuna``, Optuna (a Ray Tune Searcher) proposes every new trial and is
    told its first-rung result; here a plain Searcher stands in for it."""
    from ray.tune.search import Searcher

    from rayllm.tune import Promotions

    class Proposer(Searcher):
        def __init__(self) -> None:
            super().__init__(metric="val_loss", mode="min")
            self.told: dict[str, float] = {}

        def suggest(self, trial_id: str) -> dict:
            return {"train.optimizer.lr": 10.0 ** -(2 + len(self.told) % 3)}

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            self.told[trial_id] = result["val_loss"]

    proposer = Proposer()
    searcher = Promotions([2, 6], 3, "val_loss", "min", sampler=proposer, samples=6)
    reached = _search(searcher, lambda job, step: abs(math.log10(job["train.optimizer.lr"]) + 3) + 1 / step)
    assert len(reached) == 6 and sorted(proposer.told) == sorted(reached)  # each told once: rung 1
    lrs = {k: searcher.params[int(k[-3:])]["train.optimizer.lr"] for k in proposer.told}
    assert all(v == pytest.approx(0.5 + abs(math.log10(lrs[k]) + 3)) for k, v in proposer.told.items())
    assert sorted(reached.values()) == [2, 2, 2, 2, 6, 6] and searcher.max_runs() == 12
