"""Experiment tracking: MLflow and Weights & Biases, through their own clients, from the driver.

A stage's driver logs what the run's own files already hold (the resolved config, each logged step of
``metrics.jsonl`` as ``FollowMetrics`` reads it, tune's trial folders, eval's scores), so the workers
make no tracker calls and a slow tracker never slows a step. Ray Train V2 has no MLflow callback
(ray-project/ray#64179), and Tune's logger callbacks would log each promotion leg as its own run,
where rayllm's trial is several legs: tune logs its trials itself once the search is done.

Run ids go to ``<run_dir>/tracking.json`` (``rayllm.rundir``): eval logs to the run of the train that
made the model it scores, and a ``rayllm run`` parent run holds its stages' runs. A tracker that
cannot be reached stops the stage before anything starts (one line, exit 2).
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from rayllm.config import RunConfig
from rayllm.errors import ConfigError
from rayllm.rundir import RunDir, write_json

# While `rayllm run` runs: each tracker's handle on its run (MLflow: the run id its stages' runs name
# as parent; W&B: the group its stages' runs join).
_PARENT: dict[str, str] = {}


def enabled(cfg: RunConfig) -> bool:
    return cfg.tracking.mlflow is not None or cfg.tracking.wandb is not None


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The config as ``section.key`` params (lists as JSON), which both trackers show as a table."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, list | dict) else v
    return out


def numbers(record: dict[str, Any]) -> dict[str, float]:
    """A metrics record's finite numbers (step and time are the axis, not metrics)."""
    return {
        k: float(v)
        for k, v in record.items()
        if k not in ("step", "time") and isinstance(v, int | float) and not isinstance(v, bool)
        and math.isfinite(v)
    }  # fmt: skip


def _ids(cfg: RunConfig) -> dict[str, Any]:
    path = RunDir.of(cfg).tracking_path
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_id(cfg: RunConfig, key: str, value: str) -> None:
    ids = _ids(cfg)
    ids[key] = value
    path = RunDir.of(cfg).tracking_path
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, ids)


class _Mlflow:
    key = "mlflow"

    def __init__(self, cfg: RunConfig) -> None:
        m = cfg.tracking.mlflow
        assert m is not None
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # unreachable: fail at once
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # the console stays ours
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise ConfigError(
                "tracking.mlflow needs MLflow's client: pip install 'rayllm[tracking]'"
            ) from None
        self.conf = m
        self.client = MlflowClient(tracking_uri=m.uri)
        try:
            found = self.client.get_experiment_by_name(m.experiment)
            self.experiment = found.experiment_id if found else self.client.create_experiment(m.experiment)
        except Exception as e:  # any failure to reach the store is the user's to fix
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ConfigError(f"tracking.mlflow.uri: cannot reach {m.uri} ({first})") from None
        self.run_id: str | None = None

    def start(self, name: str, tags: dict[str, str], parent: str | None) -> str:
        if parent:
            tags = {**tags, "mlflow.parentRunId": parent}
        self.run_id = self.client.create_run(self.experiment, run_name=name, tags=tags).info.run_id
        return self.run_id

    def attach(self, run_id: str) -> None:
        self.run_id = run_id

    def handle(self) -> str:
        return str(self.run_id)

    def child(
        self, name: str, params: dict[str, Any], rows: list[dict[str, Any]], tags: dict[str, str]
    ) -> None:
        """A run nested under this one (a tune trial): its settings, metric history and tags."""
        tags = {**tags, "mlflow.parentRunId": str(self.run_id)}
        run_id = self.client.create_run(self.experiment, run_name=name, tags=tags).info.run_id
        self._params(run_id, params)
        for r in rows:
            self._metrics(run_id, numbers(r), r["step"], r.get("time"))
        self.client.set_terminated(run_id, "FINISHED")

    def params(self, params: dict[str, Any]) -> None:
        self._params(str(self.run_id), params)

    def metrics(self, values: dict[str, float], step: int, timestamp: float | None = None) -> None:
        self._metrics(str(self.run_id), values, step, timestamp)

    def _params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # the server takes at most 100 params a batch
            self.client.log_batch(run_id, params=items[i : i + 100])

    def _metrics(self, run_id: str, values: dict[str, float], step: int, timestamp: float | None) -> None:
        from mlflow.entities import Metric

        ms = int(1000 * (timestamp or time.time()))  # when rank 0 logged the step, when known
        if values:
            self.client.log_batch(run_id, metrics=[Metric(k, v, ms, step) for k, v in values.items()])

    def tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def artifact(self, folder: str) -> None:
        if self.conf.log_model:
            self.client.log_artifacts(self.run_id, folder, artifact_path="model")

    def end(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


def _wandb_key() -> bool:
    """Whether W&B has an API key: $WANDB_API_KEY, or the ~/.netrc entry `wandb login` writes for
    the server ($WANDB_BASE_URL, default api.wandb.ai). Checked so that a run never stops at a prompt."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or ""
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class _Wandb:
    key = "wandb"

    def __init__(self, cfg: RunConfig) -> None:
        w = cfg.tracking.wandb
        assert w is not None
        try:
            import wandb
        except ImportError:
            raise ConfigError("tracking.wandb needs wandb: pip install 'rayllm[tracking]'") from None
        if w.mode == "online" and not _wandb_key():
            raise ConfigError(
                "tracking.wandb.mode=online needs an API key ($WANDB_API_KEY or `wandb login`); "
                "mode: offline writes the runs to disk for `wandb sync`"
            )
        self.wandb, self.conf = wandb, w
        self.dir = Path(w.dir or cfg.run_dir).expanduser()  # W&B writes <dir>/wandb/<run>/
        self.run: Any = None

    def start(
        self, name: str | None, tags: dict[str, str], parent: str | None, run_id: str | None = None
    ) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        settings = self.wandb.Settings(silent=True, console="off", x_disable_stats=True)
        labels = [v[:64] for k, v in tags.items() if k != "run_dir"]  # W&B tags: 64 characters at most
        try:
            self.run = self.wandb.init(
                project=self.conf.project, entity=self.conf.entity, mode=self.conf.mode, dir=str(self.dir),
                name=name, group=parent, job_type=tags.get("stage"), tags=labels, id=run_id,
                resume="allow" if run_id else None, reinit="create_new", settings=settings,
            )  # fmt: skip
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ConfigError(
                f"tracking.wandb: cannot start a run in {self.conf.project} ({first})"
            ) from None
        self.run.define_metric("*", step_metric="step")
        return self.run.id

    def attach(self, run_id: str) -> None:
        self.start(None, {"stage": "eval"}, None, run_id=run_id)  # the run keeps its name

    def handle(self) -> str:
        return str(self.run.group or self.run.name)

    def child(
        self, name: str, params: dict[str, Any], rows: list[dict[str, Any]], tags: dict[str, str]
    ) -> None:
        """A run in this run's group (a tune trial): its settings, metric history and tags."""
        child = copy.copy(self)  # the same project and folder, a run of its own
        child.start(name, tags, self.handle())
        child.params(params)
        for r in rows:
            child.metrics(numbers(r), r["step"])
        for k, v in tags.items():
            child.tag(k, v)
        child.end(True)

    def params(self, params: dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def metrics(self, values: dict[str, float], step: int, timestamp: float | None = None) -> None:
        if values:
            self.run.log({**values, "step": step})

    def tag(self, key: str, value: str) -> None:
        self.run.summary[key] = value

    def artifact(self, folder: str) -> None:
        pass  # W&B artifacts upload from online runs; the folder's path is the run's export_dir

    def end(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class Tracked:
    """One stage's run in every configured tracker; a context manager that ends the runs (FAILED
    when the stage raised). Constructing it reaches the trackers: do it before the stage starts.

    ``attach``: log to the run that stage (``train``) of this run dir logged, when there is one
    (eval scores the model that train made). ``resume``: a stage resuming from a checkpoint goes on
    logging to its own earlier run, at the same steps.
    """

    def __init__(self, cfg: RunConfig, stage: str, attach: str | None = None, resume: bool = False) -> None:
        self.stage, self.warned = stage, False
        self.trackers: list[Any] = []
        if cfg.tracking.mlflow is not None:
            self.trackers.append(_Mlflow(cfg))
        if cfg.tracking.wandb is not None:
            self.trackers.append(_Wandb(cfg))
        ids = _ids(cfg)
        tags = {"stage": stage, "run_dir": str(Path(cfg.run_dir).expanduser().resolve())}
        self.handles: dict[str, str] = {}
        for t in self.trackers:
            earlier = ids.get(f"{t.key}:{attach or stage}") if attach or resume else None
            if earlier:
                t.attach(earlier)
            else:
                run_id = t.start(f"{Path(cfg.run_dir).name}/{stage}", tags, _PARENT.get(t.key))
                _save_id(cfg, f"{t.key}:{stage}", run_id)
                t.params(flatten(cfg.public()))
            self.handles[t.key] = t.handle()

    @classmethod
    def open(
        cls, cfg: RunConfig, stage: str, attach: str | None = None, resume: bool = False
    ) -> Tracked | None:
        return cls(cfg, stage, attach, resume) if enabled(cfg) else None

    def __enter__(self) -> Tracked:
        if self.stage == "run":  # `rayllm run`: the stages it runs nest under this run
            _PARENT.update(self.handles)
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        if self.stage == "run":
            _PARENT.clear()
        for t in self.trackers:
            self._safely(t.end, kind is None)

    def _safely(self, call: Any, *args: Any) -> None:
        """A tracker that fails mid-run costs its own logging, not the run: said once, then quiet."""
        try:
            call(*args)
        except Exception as e:
            if not self.warned:
                self.warned = True
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                print(f"rayllm: tracking failed ({first}); the {self.stage} run goes on", file=sys.stderr)

    def record(self, record: dict[str, Any]) -> None:
        """One line of a metrics file, logged at its step."""
        if isinstance(record.get("step"), int):
            for t in self.trackers:
                self._safely(t.metrics, numbers(record), record["step"], record.get("time"))

    def scores(self, values: dict[str, float], step: int = 0) -> None:
        for t in self.trackers:
            self._safely(t.metrics, values, step, None)

    def tag(self, key: str, value: str) -> None:
        for t in self.trackers:
            self._safely(t.tag, key, value)

    def trials(self, trials: list[tuple[str, dict[str, Any], list[dict[str, Any]], bool]]) -> None:
        """Tune's trials, each a run nested under the search's: (name, settings, metrics, best)."""
        for name, params, rows, best in trials:
            tags = {"stage": "tune-trial", "trial": name, **({"best": "true"} if best else {})}
            steps = [r for r in rows if isinstance(r.get("step"), int)]
            for t in self.trackers:
                self._safely(t.child, name, params, steps, tags)

    def export(self, folder: str) -> None:
        for t in self.trackers:
            self._safely(t.tag, "export_dir", folder)
            self._safely(t.artifact, folder)
