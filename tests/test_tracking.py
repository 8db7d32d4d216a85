"""Experiment tracking against a real MLflow server on 127.0.0.1 and W&B in offline mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import mlflow_history
from ray_head import free_port

from rayllm.config import RunConfig
from rayllm.rundir import read_jsonl

mlflow = pytest.importorskip("mlflow")


def test_train_and_eval_log_to_mlflow_and_wandb_at_once(ray_cluster, prepped, tmp_path, mlflow_server):
    """One run, both trackers. MLflow (a real server): the resolved config as params, every logged
    step's loss and val_loss at its step, the export path, eval's scores on the train's run. W&B
    offline: the run folders it writes, read back with wandb's own reader, hold every logged step's
    loss at its step, eval's scores and the config. (Tune's trials: test_tune's search.)"""
    pytest.importorskip("wandb")
    from mlflow import MlflowClient
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    from rayllm.eval.stage import run as evaluate
    from rayllm.train.stage import run as train

    raw = prepped.dump()
    raw["run_dir"] = str(tmp_path / "run")
    raw["train"]["data_dir"] = str(Path(prepped.run_dir) / "prep")
    raw["tracking"] = {
        "mlflow": {"uri": mlflow_server, "experiment": "ci"},
        "wandb": {"project": "ci", "mode": "offline"},
    }
    cfg = RunConfig.model_validate(raw)
    summary = train(cfg)
    evaluate(cfg)
    rows = read_jsonl(tmp_path / "run" / "train" / "metrics.jsonl")
    logged = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert sorted(logged) == [1, *range(2, cfg.train.max_steps + 1, cfg.train.log_every)]  # every logged step

    client = MlflowClient(mlflow_server)
    ids = json.loads((tmp_path / "run" / "tracking.json").read_text())
    run = client.get_run(ids["mlflow:train"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.optimizer.lr"] == str(cfg.train.optimizer.lr)
    assert run.data.params["model.n_layer"] == "2"
    assert run.data.tags["export_dir"] == summary["export_dir"]
    assert mlflow_history(client, run.info.run_id, "loss") == pytest.approx(logged)
    validated = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    assert sorted(validated) == [0, 6, 12]
    assert mlflow_history(client, run.info.run_id, "val_loss") == pytest.approx(validated)
    eval_summary = json.loads((tmp_path / "run" / "eval" / "summary.json").read_text())
    assert mlflow_history(client, run.info.run_id, "eval/loss") == {12: pytest.approx(eval_summary["loss"])}

    # W&B offline writes a folder per process; eval's, attached to train's run, has the same run id.
    run_id = ids["wandb:train"]
    files = sorted((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{run_id}.wandb"] * 2, files
    history: dict[int, float] = {}
    scores: dict[str, float] = {}
    config: dict[str, str] = {}
    for file in files:
        store = datastore.DataStore()
        store.open_for_scan(str(file))
        while (data := store.scan_data()) is not None:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") == "history":
                item = record.history.item
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in item}
                if "loss" in items:
                    history[int(items["step"])] = items["loss"]
                scores.update({k: v for k, v in items.items() if k.startswith("eval/")})
            elif record.WhichOneof("record_type") == "config":
                config.update({i.key: json.loads(i.value_json) for i in record.config.update})
    assert history == pytest.approx(logged)
    assert scores["eval/loss"] == pytest.approx(eval_summary["loss"])
    assert config["train.optimizer.lr"] == raw["train"]["optimizer"]["lr"]


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_an_unreachable_tracker_is_one_line_and_exit_2(prepped, tmp_path, tracker):
    """Before Ray starts: what to fix, exit 2; nothing trains. MLflow: a URI nothing listens on; W&B
    online without an API key (no $WANDB_API_KEY, no ~/.netrc), which would otherwise prompt."""
    port = free_port()
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
