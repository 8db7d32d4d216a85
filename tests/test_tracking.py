"""Experiment tracking against a real MLflow server on 127.0.0.1 and W&B in offline mode."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_tune import tune_cfg

from rayllm.config import RunConfig
from rayllm.rundir import read_jsonl

mlflow = pytest.importorskip("mlflow")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 with a sqlite store, telemetry off; stopped by its PID."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--default-artifact-root",
        str(root / "artifacts"), "--workers", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                if httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "mlflow server did not come up"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _history(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_train_eval_and_tune_log_to_a_real_mlflow_server(ray_cluster, prepped, tmp_path, mlflow_server):
    """train: the resolved config as params, every logged step's loss at its step, the export path;
    eval: its scores on the train's run; tune: one nested run per trial with its settings and rung
    metrics, the best tagged."""
    from mlflow import MlflowClient

    from rayllm import tune
    from rayllm.eval.stage import run as evaluate
    from rayllm.train.stage import run as train

    raw = prepped.dump()
    raw["run_dir"] = str(tmp_path / "run")
    raw["train"]["data_dir"] = str(Path(prepped.run_dir) / "prep")
    raw["tracking"] = {"mlflow": {"uri": mlflow_server, "experiment": "ci"}}
    cfg = RunConfig.model_validate(raw)
    summary = train(cfg)
    evaluate(cfg)

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("ci")
    ids = json.loads((tmp_path / "run" / "tracking.json").read_text())
    run = client.get_run(ids["mlflow:train"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.optimizer.lr"] == str(cfg.train.optimizer.lr)
    assert run.data.params["model.n_layer"] == "2"
    assert run.data.tags["export_dir"] == summary["export_dir"]
    logged = {
        r["step"]: r["loss"] for r in read_jsonl(tmp_path / "run" / "train" / "metrics.jsonl") if "loss" in r
    }
    assert _history(client, run.info.run_id, "loss") == pytest.approx(logged)
    assert sorted(logged) == [1, *range(2, cfg.train.max_steps + 1, cfg.train.log_every)]  # every logged step
    validated = {
        r["step"]: r["val_loss"]
        for r in read_jsonl(tmp_path / "run" / "train" / "metrics.jsonl")
        if "val_loss" in r
    }
    assert sorted(validated) == [0, 6, 12]
    assert _history(client, run.info.run_id, "val_loss") == pytest.approx(validated)
    eval_summary = json.loads((tmp_path / "run" / "eval" / "summary.json").read_text())
    assert _history(client, run.info.run_id, "eval/loss") == {12: pytest.approx(eval_summary["loss"])}

    tune_config = tune_cfg(
        prepped, tmp_path / "search", {"train.optimizer.lr": [3e-3, 3e-5]}, reduction_factor=8
    )
    tune_config = RunConfig.model_validate({**tune_config.dump(), "tracking": raw["tracking"]})
    searched = tune.run(tune_config)
    parent = json.loads((tmp_path / "search" / "tracking.json").read_text())["mlflow:tune"]
    trials = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert len(trials) == 2
    by_trial = {r.data.tags["trial"]: r for r in trials}
    assert set(by_trial) == {t["trial_id"] for t in searched["all"]}
    for t in searched["all"]:
        r = by_trial[t["trial_id"]]
        assert float(r.data.params["train.optimizer.lr"]) == t["params"]["train.optimizer.lr"]
        rows = read_jsonl(tmp_path / "search" / "tune" / "trials" / t["trial_id"] / "train" / "metrics.jsonl")
        assert _history(client, r.info.run_id, "val_loss") == pytest.approx(
            {x["step"]: x["val_loss"] for x in rows if "val_loss" in x}
        )
        assert (r.data.tags.get("best") == "true") == (t["trial_id"] == searched["best_trial"])
    assert client.get_run(parent).data.tags["best_trial"] == searched["best_trial"]


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_an_unreachable_tracker_is_one_line_and_exit_2(prepped, tmp_path, tracker):
    """Before Ray starts: what to fix, exit 2; nothing trains. MLflow: a URI nothing listens on; W&B
    online without an API key (no $WANDB_API_KEY, no ~/.netrc), which would otherwise prompt."""
    port = _free_port()
    setting = (
        f"tracking.mlflow.uri=http://127.0.0.1:{port}" if tracker == "mlflow" else "tracking.wandb.project=ci"
    )
    cmd = [sys.executable, "-m", "rayllm", "train", "--run-dir", str(tmp_path / "run"),
           "--set", f"train.data_dir={Path(prepped.run_dir) / 'prep'}", "--set", setting]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env={**env, "HOME": str(tmp_path)}
    )
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [x for x in done.stderr.splitlines() if x.strip()]
    expected = (
        f"tracking.mlflow.uri: cannot reach http://127.0.0.1:{port}"
        if tracker == "mlflow"
        else "tracking.wandb.mode=online needs an API key"
    )
    assert len(lines) == 1 and expected in lines[0], lines
    assert not (tmp_path / "run" / "train" / "metrics.jsonl").exists()


def test_wandb_offline_run_holds_the_metric_history(ray_cluster, prepped, tmp_path):
    """W&B offline: the run folder it writes, read back with wandb's own reader, holds every
    logged step's loss at its step and the config."""
    pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    from rayllm.train.stage import run as train

    raw = prepped.dump()
    raw["run_dir"] = str(tmp_path / "run")
    raw["train"]["data_dir"] = str(Path(prepped.run_dir) / "prep")
    raw["tracking"] = {"wandb": {"project": "ci", "mode": "offline"}}
    train(RunConfig.model_validate(raw))

    files = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    store = datastore.DataStore()
    store.open_for_scan(str(files[0]))
    history: dict[int, float] = {}
    config: dict[str, str] = {}
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            if "loss" in items:
                history[int(items["step"])] = items["loss"]
        elif record.WhichOneof("record_type") == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
    logged = {
        r["step"]: r["loss"] for r in read_jsonl(tmp_path / "run" / "train" / "metrics.jsonl") if "loss" in r
    }
    assert history == pytest.approx(logged)
    assert config["train.optimizer.lr"] == raw["train"]["optimizer"]["lr"]


def test_a_pipeline_run_is_the_parent_of_its_stages_runs(tmp_path, mlflow_server):
    """`rayllm run` opens a run its stages' runs nest under (MLflow's parentRunId), ended FINISHED, or
    FAILED when a stage raised; outside it a stage's run has no parent."""
    from mlflow import MlflowClient

    from rayllm.tracking import Tracked

    cfg = RunConfig.model_validate(
        {"run_dir": str(tmp_path / "p"), "tracking": {"mlflow": {"uri": mlflow_server, "experiment": "nest"}}}
    )
    with pytest.raises(RuntimeError), Tracked(cfg, "run") as parent, Tracked(cfg, "train") as child:
        child.record({"step": 3, "loss": 2.5, "note": "text is not a metric"})
        raise RuntimeError("a stage failed")
    client = MlflowClient(mlflow_server)
    ids = json.loads((tmp_path / "p" / "tracking.json").read_text())
    run, stage = client.get_run(ids["mlflow:run"]), client.get_run(ids["mlflow:train"])
    assert parent.handles["mlflow"] == run.info.run_id
    assert stage.data.tags["mlflow.parentRunId"] == run.info.run_id
    assert (run.info.status, stage.info.status) == ("FAILED", "FAILED")
    assert stage.data.metrics == {"loss": 2.5}
    with Tracked(cfg, "eval"):
        pass
    alone = client.get_run(json.loads((tmp_path / "p" / "tracking.json").read_text())["mlflow:eval"])
    assert "mlflow.parentRunId" not in alone.data.tags and alone.info.status == "FINISHED"
