"""tune: real Ray Tune trials, each a real DeepSpeed run: a grid under ASHA, interrupted and
resumed, its best config reproduced by `rayllm train`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rayllm.config import RunConfig, load_config
from rayllm.errors import ConfigError
from rayllm.rundir import RunDir


def tune_cfg(prepped: RunConfig, run_dir: Path, space: dict, **tune) -> RunConfig:
    raw = prepped.dump()
    raw["run_dir"] = str(run_dir)
    raw["train"]["data_dir"] = str(Path(prepped.run_dir) / "prep")
    # One worker per trial: trials are real DeepSpeed runs; 2-worker runs are train's tests.
    # eval_every=4: ASHA's rungs (2, 6) are validated only because tune asks for them.
    raw["train"].update(eval_every=4, checkpoint_every=4, workers=1, micro_batch=8)
    # 16 steps: a trial stopped at a rung is cut short, with room for the steps it runs on meanwhile.
    raw["tune"] = {"space": space, "max_steps": 16, "grace_period": 2, **tune}
    return RunConfig.model_validate(raw)


def test_grid_asha_resume_and_best_config(ray_cluster, prepped, tmp_path):
    """A plain list is a grid (2 trials, not 1 sample); ASHA stops the weak one early; a search killed
    after its first finished trial resumes without re-running it; best.yaml reproduces the best trial."""
    from rayllm.train.stage import run as train

    # One trial at a time: the second meets ASHA's rungs with the first one's results there
    # (tune.seed 0 keeps this grid's order: the weak 3e-5 meets 3e-3 at the rung).
    cfg = tune_cfg(prepped, tmp_path, {"train.optimizer.lr": [3e-3, 3e-5]}, max_concurrent=1)
    config = tmp_path / "tune.yaml"
    config.write_text(yaml.safe_dump(cfg.public()))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "rayllm", "tune", "-c", str(config)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300

    def recorded_done() -> bool:  # Tune's own experiment state lists a trial as finished
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

    def trained(folder: Path) -> list[str]:  # the rows of training steps (an export adds an event)
        return [r for r in (folder / "metrics.jsonl").read_text().splitlines() if '"loss"' in r]

    first_rows = trained(first)
    first_trial = (first.parent / "trial.json").read_text()  # a trial started again rewrites it

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert trained(first) == first_rows  # restored as finished, not trained again
    assert (first.parent / "trial.json").read_text() == first_trial
    s = json.loads((tmp_path / "tune" / "summary.json").read_text())
    assert s["trials"] == 2 and len({t["trial_id"] for t in s["all"]}) == 2
    assert s["trials_stopped_early"] >= 1 and s["rungs"] == [2, 6]
    for t in s["all"]:  # every trial validated at each rung it reached, off its eval_every
        trial_run = RunConfig(run_dir=str(tmp_path / "tune" / "trials" / t["trial_id"]))
        rows = RunDir.of(trial_run).read_metrics("train")
        validated = [r["step"] for r in rows if "val_loss" in r]
        assert validated == [v for v in (0, 2, 4, 6, 8, 12, 16) if v <= t["steps"]], t
    assert s["trial_steps"] < 2 * 16 and s["best_steps"] == 16
    assert all(t["first_step_s"] is not None and t["first_step_s"] > 0 for t in s["all"])
    assert s["best_params"] == {"train.optimizer.lr": 3e-3}
    assert "tune trials by val_loss" in done.stderr  # the table, sorted by the metric
    assert (tmp_path / "tune" / "curves.png").stat().st_size > 10_000
    assert Path(s["best_export"], "model.safetensors").is_file()
    rows = [json.loads(x) for x in (tmp_path / "tune" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all("val_loss" in r for r in rows)

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


def test_asha_rungs_are_rays_and_every_trial_validates_at_them():
    """The rungs are where Ray's ASHA judges; a trial validates at each, whatever its eval_every."""
    from ray.tune.schedulers import ASHAScheduler

    from rayllm.tune import grace_period, rungs, trial_config

    def cfg(warmup: int = 30, **tune) -> RunConfig:
        raw = {
            "train": {"eval_every": 50, "eval_at": [7], "schedule": {"warmup_steps": warmup}},
            "tune": tune,
        }
        return RunConfig.model_validate(raw)

    # Default grace: the warmup, at least max_steps / rf^2; rf defaults to 3.
    assert grace_period(cfg(max_steps=150)) == 30 and rungs(cfg(max_steps=150)) == [30, 90]
    assert grace_period(cfg(0, max_steps=100)) == 11 and rungs(cfg(0, max_steps=100)) == [11, 33, 99]
    assert grace_period(cfg(500, max_steps=100)) == 100
    for c in (
        cfg(max_steps=150),
        cfg(0, max_steps=100),
        cfg(max_steps=81, grace_period=1),
        cfg(max_steps=64, grace_period=2, reduction_factor=2),
    ):
        ray_rungs = ASHAScheduler(
            time_attr="step", max_t=c.tune.max_steps, grace_period=grace_period(c),
            reduction_factor=c.tune.reduction_factor,
        )._brackets[0]._rungs  # fmt: skip
        assert rungs(c) == sorted(milestone for milestone, _ in ray_rungs)
    # A trial validates at every rung before its last step (which always validates), plus its own.
    assert trial_config(cfg(0, max_steps=100), {}).train.eval_at == [7, 11, 33, 99]
    assert trial_config(cfg(max_steps=81, grace_period=1), {}).train.eval_at == [1, 3, 7, 9, 27]
    assert trial_config(cfg(0, max_steps=100, scheduler="fifo"), {}).train.eval_at == [7]
    with pytest.raises(ValueError, match="grace_period=200 is longer than a trial"):
        cfg(max_steps=100, grace_period=200)
