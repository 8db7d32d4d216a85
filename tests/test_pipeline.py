"""The whole chain at tiny scale: `rayllm demo`, then `rayllm run` skipping, re-running and resuming
stage by stage, as a user runs it (CLI processes joined to the session's Ray)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config
from ray_head import free_port


def test_demo_then_run_skips_reruns_and_resumes(ray_cluster, tiny_corpus, tmp_path):
    from rich.console import Console

    from rayllm.pipeline import demo
    from rayllm.rundir import RunDir

    cfg = tiny_config(
        tmp_path, tiny_corpus, train__max_steps=12, train__checkpoint_every=6, serve__port=free_port()
    )
    s = demo(cfg, console=Console(quiet=True))
    assert s["val_loss_last"] < s["val_loss_first"] - 0.5
    assert s["train_loss_last"] < s["train_loss_first"]
    assert s["url"] == f"http://127.0.0.1:{cfg.serve.port}"
    assert s["sample"].startswith("ROMEO:\n") and len(s["sample"]) > len("ROMEO:\n")
    ev = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert 1 < ev["perplexity"] < 512 and ev["tokens"] > 0
    for stage in ("prep", "train", "eval", "demo"):
        assert (tmp_path / stage / "summary.json").is_file(), stage
    train = json.loads((tmp_path / "train" / "summary.json").read_text())
    for key in ("steps", "train_loss_first", "val_loss_last", "tokens_per_second", "mfu", "export_dir"):
        assert train[key] is not None, key
    assert Path(train["export_dir"], "model.safetensors").is_file()
    assert (tmp_path / "train" / "loss.png").is_file()
    assert list((tmp_path / "train" / "tensorboard").glob("events.out.tfevents.*"))
    state = RunDir.of(cfg).run_state()
    assert {k: v["status"] for k, v in state.items()} == {"prep": "done", "train": "done", "eval": "done"}

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg.public()))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "rayllm", "run", "-c", str(config)]

    # Nothing changed: every stage is skipped, saying so.
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ("prep", "train", "eval"):
        assert f"{stage}: up to date" in again.stderr, again.stderr
    assert "tune: off" in again.stderr

    # A longer run: prep is skipped, train continues from its step-12 checkpoint; killed mid-way.
    longer = [*cmd, "--set", "train.max_steps=60"]
    proc = subprocess.Popen(longer, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "train" / "metrics.jsonl"

    def steps() -> list[int]:
        return [r["step"] for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]

    deadline = time.time() + 240
    while not (steps() and steps()[-1] >= 30):
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else steps()
        time.sleep(0.2)
    time.sleep(1.5)  # the step-30 checkpoint is registered at the controller's next poll
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    status = subprocess.run(
        [sys.executable, "-m", "rayllm", "status", str(tmp_path), "--set", "train.max_steps=60"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert status.returncode == 0 and "interrupted" in status.stdout and "done" in status.stdout

    resumed = subprocess.run(longer, env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "prep: up to date" in resumed.stderr
    assert "train (Ray Train + DeepSpeed): interrupted before" in resumed.stderr
    assert "eval (Ray Data): changed" in resumed.stderr  # its upstream, train, changed
    events = [r for r in map(json.loads, metrics.read_text().splitlines()) if r.get("event") == "resume"]
    assert events[0]["step"] == 12 and events[-1]["step"] >= 30  # never back to step 0
    assert json.loads((tmp_path / "train" / "summary.json").read_text())["steps"] == 60
    # Not a terminal: one plain progress line per logged step, from where the run resumed.
    shown = [int(m) for m in re.findall(r"^train step (\d+)/60 \(\d+%\)  loss ", resumed.stdout, re.M)]
    assert shown and shown[0] > events[-1]["step"] and shown[-1] == 60, resumed.stdout
    assert re.search(
        r"^train step 60/60 \(100%\)  loss \d+\.\d{4}  val \d+\.\d{4}  [\d,]+ tok/s", resumed.stdout, re.M
    ), resumed.stdout
    # and nothing from Ray's internals: warnings, its loggers' INFO lines, the raylet's notices.
    for noise in (r"Warning:", r"^INFO ", r"^\[\d{4}-\d\d-\d\d [\d:,]+ [IW] ", r"\(raylet\)", r"\(pid=\d+\)"):
        assert not re.search(noise, resumed.stdout + resumed.stderr, re.M), (noise, resumed.stderr)
    assert RunDir.of(cfg).run_state()["eval"]["status"] == "done"


def test_the_plan_trains_the_best_trial_and_a_longer_train_keeps_the_search(tiny_corpus, tmp_path):
    """What `rayllm run` fingerprints with a search in the chain (no Ray needed): train and eval run
    the best trial's settings, prep and tune the config as given; another best re-runs train, not
    the search; a longer final train re-runs train (resuming: same identity) and eval only."""
    from rayllm.pipeline import plan
    from rayllm.tune import best_config

    def planned(lr: float, **sections) -> dict:
        cfg = tiny_config(tmp_path, tiny_corpus, tune__space={"train.optimizer.lr": [3e-5, 3e-3]}, **sections)
        return plan(cfg, best_config(cfg, {"train.optimizer.lr": lr}))

    base = planned(3e-3)
    other = planned(3e-5)
    lr = {s: other[s]["inputs"]["config"]["train"]["optimizer"]["lr"] for s in ("tune", "train")}
    assert lr == {"tune": 3e-3, "train": 3e-5}  # the search runs tiny_config's lr, train the best
    assert [other[s] == base[s] for s in ("prep", "tune", "train", "eval")] == [True, True, False, False]
    longer = planned(3e-3, train__max_steps=24)
    assert [longer[s] == base[s] for s in ("prep", "tune", "train", "eval")] == [True, True, False, False]
    assert longer["train"]["identity"] == base["train"]["identity"]
    assert other["train"]["identity"] != base["train"]["identity"]  # another lr starts train afresh


@pytest.mark.slow  # tune, train and eval in CLI processes; the plan above and test_tune cover its parts
def test_run_with_a_tune_grid_hands_the_best_trial_to_train(ray_cluster, tiny_corpus, tmp_path):
    """prep -> tune (a 2-point grid) -> train with the best lr -> eval, as one CLI command; a longer
    final train re-runs train and eval but neither prep nor the search."""
    from rayllm.config import RunConfig
    from rayllm.rundir import RunDir

    cfg = tiny_config(
        tmp_path,
        tiny_corpus,
        train__workers=1,
        train__max_steps=6,
        train__eval_every=2,
        train__checkpoint_every=3,  # not a log step: every report to Tune still carries the metric
        tune__space={"train.optimizer.lr": [3e-5, 3e-3]},
        tune__metric="train_loss",  # the metrics file calls it loss
        tune__max_steps=4,
        tune__grace_period=2,
    )
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg.public()))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "rayllm", "run", "-c", str(config), "--until", "eval"]

    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "tune (Ray Tune): running" in first.stderr
    tune = json.loads((tmp_path / "tune" / "summary.json").read_text())
    assert tune["trials"] == 2 and tune["best_params"] == {"train.optimizer.lr": 3e-3}
    for trial in tune["all"]:  # each trial scored by the last training loss it logged
        logged = RunDir.of(RunConfig(run_dir=str(tmp_path / "tune" / "trials" / trial["trial_id"])))
        last = [r for r in logged.read_metrics("train") if "loss" in r][-1]
        assert trial["train_loss"] == last["loss"] and trial["steps"] == last["step"]
    assert tune["best_value"] == min(t["train_loss"] for t in tune["all"])
    trained = yaml.safe_load((tmp_path / "train" / "config.yaml").read_text())
    assert trained["train"]["optimizer"]["lr"] == 3e-3 and trained["train"]["max_steps"] == 6
    assert json.loads((tmp_path / "train" / "summary.json").read_text())["steps"] == 6
    for stage in ("prep", "tune", "train", "eval"):  # every stage logs its figures
        assert RunDir.of(cfg).read_metrics(stage), stage

    status = subprocess.run(
        [sys.executable, "-m", "rayllm", "status", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert status.returncode == 0 and "stale" not in status.stdout, status.stdout

    longer = subprocess.run(
        [*cmd, "--set", "train.max_steps=8"], env=env, capture_output=True, text=True, timeout=600
    )
    assert longer.returncode == 0, longer.stderr[-3000:]
    for stage in ("prep", "tune"):
        assert f"{stage}: up to date" in longer.stderr, longer.stderr
    assert "train (Ray Train + DeepSpeed): changed (train.max_steps)" in longer.stderr
    assert json.loads((tmp_path / "train" / "summary.json").read_text())["steps"] == 8
    assert json.loads((tmp_path / "tune" / "summary.json").read_text())["trials"] == 2
