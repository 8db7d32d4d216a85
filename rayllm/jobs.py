"""Ray Jobs API: submit a stage to a cluster, follow its logs, read its status, stop it.

A submitted job runs ``python jobs/run_stage.py STAGE --config ... --set ... --run-dir ...`` inside a
copy of this project (the job's runtime_env ``working_dir``), so the cluster runs exactly the code and
config files that were validated on the submitting machine, through the same stage function as the CLI.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlsplit

from rayllm import stages
from rayllm.config import RunConfig, load_config
from rayllm.errors import ConfigError, RayllmError, find_user_error, one_line
from rayllm.runtime import is_loopback, is_uri, worker_env

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

# What a job runs: a stage of the table, the resumable chain (`rayllm run`), or the demo.
COMMANDS = (*stages.NAMES, "run", "demo")
ENTRYPOINT = "jobs/run_stage.py"
# Config files are copied here for the upload: a config under a git-ignored folder (runs/...) or outside
# the project would otherwise not reach the cluster. Must not be listed in .gitignore (Ray honors it).
STAGING = ".rayllm-submit"
# Anchored folder names (not "dir/" patterns) so Ray skips them without walking e.g. the whole .venv.
EXCLUDES = [
    "/.git",
    "/.venv",
    "/runs",
    "/.cache",
    "/bench/results",
    "__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
QUIET_LOGGERS = (
    "ray._private.runtime_env.packaging",
    "ray.dashboard.modules.dashboard_sdk",
    "ray.dashboard.modules.job.sdk",
)
TOKEN_HELP = (
    "`ray get-auth-token` on the head prints the cluster's token; put it in {token_file} "
    "(or in the file named by $RAY_AUTH_TOKEN_PATH, or in the RAY_AUTH_TOKEN variable)"
)


# ------------------------------------------------------------------------------------------ client
def resolve_address(address: str | None = None, cfg: RunConfig | None = None) -> str:
    """The Jobs API (dashboard) address: argument, then ``cluster.address``, then ``$RAY_ADDRESS``."""
    addr = address or (cfg.cluster.address if cfg is not None else None) or os.environ.get("RAY_ADDRESS")
    if not addr:
        raise RayllmError(
            "no Ray cluster address: pass --address http://<head>:8265, set cluster.address in the "
            "config, or export RAY_ADDRESS=http://<head>:8265 (the head's dashboard address; for KubeRay "
            "`kubectl port-forward svc/<cluster>-head-svc 8265:8265` and use http://127.0.0.1:8265)"
        )
    if addr in ("auto", "local"):
        raise RayllmError(
            f"address {addr!r} only works for ray.init; the Jobs API needs the head's dashboard address, "
            "e.g. http://127.0.0.1:8265"
        )
    return addr if "://" in addr else f"http://{addr}"


def _auth_error(address: str, err: Exception) -> RayllmError:
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token"
    hint = TOKEN_HELP.format(token_file=token_file)
    if str(getattr(err, "message", err)).startswith("Authentication failed"):  # HTTP 403
        return RayllmError(
            f"the Ray cluster at {address} rejected this machine's auth token (HTTP 403): {hint}"
        )
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        return RayllmError(
            f"the Ray cluster at {address} requires an auth token and RAY_AUTH_MODE=token is set, but no "
            f"token was found: {hint}"
        )
    return RayllmError(
        f"the Ray cluster at {address} requires token authentication (HTTP 401): set RAY_AUTH_MODE=token "
        f"and give this machine the cluster's token: {hint}"
    )


@contextlib.contextmanager
def _errors(address: str, job_id: str | None = None) -> Iterator[None]:
    """Turn the Jobs SDK's auth, connection and not-found errors into one-line user errors."""
    import aiohttp
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as e:
        raise _auth_error(address, e) from None
    except (ConnectionError, requests.exceptions.ConnectionError, aiohttp.ClientConnectionError) as e:
        raise RayllmError(
            f"cannot reach the Ray Jobs API at {address} ({type(e).__name__}): is the head up, and is this "
            "its dashboard address (port 8265 by default, not the GCS port 6379)?"
        ) from None
    except RuntimeError as e:
        if job_id is not None and "status code 404" in str(e):
            raise RayllmError(f"no job {job_id!r} on the Ray cluster at {address}") from None
        raise


def client(address: str) -> JobSubmissionClient:
    """A Jobs API client; Ray adds the auth token header itself when RAY_AUTH_MODE=token."""
    from ray.job_submission import JobSubmissionClient

    # Per-file upload notes and websocket closes at INFO would bury the job's own log lines.
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    with _errors(address):
        return JobSubmissionClient(address)


# ------------------------------------------------------------------------------------------ submit
def project_dir() -> Path:
    """The folder uploaded as the job's working_dir: the checkout that holds ``jobs/run_stage.py``."""
    for cand in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (cand / ENTRYPOINT).is_file():
            return cand
    raise RayllmError(
        f"{ENTRYPOINT} not found in {Path.cwd()} or next to the rayllm package: run `rayllm submit` "
        "from the rayllm project folder"
    )


def _job_run_dir(run_dir: str, address: str) -> str:
    """A run dir the job can use: a relative one would land in the job's temporary copy of the project."""
    if is_uri(run_dir) or run_dir.startswith("~") or Path(run_dir).is_absolute():
        return run_dir
    # The head runs on this machine: the same path as a local `rayllm <stage>`.
    if is_loopback(urlsplit(address).hostname or ""):
        return str(Path(run_dir).resolve())
    raise RayllmError(
        f"run_dir {run_dir!r} is relative, but a job runs in a temporary copy of the project on the "
        "cluster, where its outputs would be lost: pass an absolute path on storage that every node "
        f"mounts, e.g. --run-dir /mnt/shared/runs/{Path(run_dir).name}"
    )


def _stage_configs(config_files: list[str], dest: Path, root: Path) -> list[str]:
    """Copy the config files into the upload; returns their paths relative to the working dir."""
    dest.mkdir(parents=True)
    out = []
    for i, f in enumerate(config_files):
        src = Path(f)
        if not src.is_file():
            raise ConfigError(f"config file {f} does not exist")
        dst = dest / f"{i}-{src.name}"
        shutil.copyfile(src, dst)
        out.append(dst.relative_to(root).as_posix())
    return out


def submit(
    cfg: RunConfig,
    stage: str,
    config_files: list[str],
    sets: list[str],
    run_dir: str | None,
    address: str | None,
    wait: bool,
    until: str | None = None,
    serve: bool = False,
) -> dict[str, Any]:
    """Submit ``stage`` as a Ray job; with ``wait`` stream its logs to stdout until it ends.

    ``until`` and ``serve`` are `rayllm run`'s: where the chain stops, and whether it ends serving."""
    if stage not in COMMANDS:
        raise RayllmError(f"unknown stage {stage!r}: choose one of {', '.join(COMMANDS)}")
    if (until or serve) and stage != "run":
        raise RayllmError(f"--until and --serve belong to `rayllm submit run`, not to {stage!r}")
    if until is not None and until not in stages.NAMES:
        raise RayllmError(f"--until {until!r}: choose one of {', '.join(stages.NAMES)}")
    t0 = time.time()
    addr = resolve_address(address, cfg)
    job_run_dir = _job_run_dir(run_dir or cfg.run_dir, addr)
    root = project_dir()
    jobs = client(addr)
    job_id = f"rayllm-{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    staged = root / STAGING / job_id
    try:
        args = [stage]
        for rel in _stage_configs(config_files, staged, root):
            args += ["--config", rel]
        for item in sets:
            args += ["--set", item]
        args += ["--until", until] if until else []
        args += ["--serve"] if serve else []
        command = shlex.join(["python", ENTRYPOINT, *args, "--run-dir", job_run_dir])
        runtime_env = {
            "working_dir": str(root),
            # Other submissions' staged configs (concurrent `rayllm submit`) stay out of this upload.
            "excludes": [*EXCLUDES, f"/{STAGING}/*", f"!/{STAGING}/{job_id}"],
            "env_vars": worker_env(cfg.cluster, use_gpu=cfg.train.use_gpu),
        }
        with _errors(addr):
            jobs.submit_job(
                entrypoint=command,
                submission_id=job_id,
                runtime_env=runtime_env,
                metadata={"rayllm_stage": stage, "run_dir": job_run_dir},
            )
    finally:
        shutil.rmtree(staged, ignore_errors=True)
        with contextlib.suppress(OSError):
            (root / STAGING).rmdir()  # only when no other submission is staging
    result: dict[str, Any] = {"job_id": job_id, "address": addr, "entrypoint": command}
    if wait:
        print(
            f"submitted {job_id} to {addr}; following its logs (Ctrl-C stops following, not the job)",
            file=sys.stderr,
        )
        info = follow(job_id, addr, jobs=jobs)
    else:
        info = status(job_id, addr, jobs=jobs)
    result["status"] = info["status"]
    if info.get("message") and info["status"] in ("FAILED", "STOPPED"):
        result["message"] = info["message"]
    result["run_dir"] = job_run_dir
    result["seconds"] = round(time.time() - t0, 1)
    return result


# ----------------------------------------------------------------------------- status, logs, stop
def status(
    job_id: str, address: str | None = None, jobs: JobSubmissionClient | None = None
) -> dict[str, Any]:
    """The job's state, entrypoint, exit code and Ray's status message."""
    addr = resolve_address(address)
    jobs = jobs or client(addr)
    with _errors(addr, job_id):
        info = jobs.get_job_info(job_id)
    took = round((info.end_time - info.start_time) / 1000, 1) if info.start_time and info.end_time else None
    return {
        "job_id": job_id,
        "status": info.status.value,
        "entrypoint": info.entrypoint,
        "exit_code": info.driver_exit_code,
        "message": info.message,
        "seconds": took,
    }


def logs(job_id: str, address: str | None = None) -> str:
    """Everything the job has printed so far (stdout and stderr together)."""
    addr = resolve_address(address)
    jobs = client(addr)
    with _errors(addr, job_id):
        return jobs.get_job_logs(job_id)


def follow(
    job_id: str,
    address: str | None = None,
    out: TextIO | None = None,
    jobs: JobSubmissionClient | None = None,
) -> dict[str, Any]:
    """Stream the job's logs to ``out`` (stdout) as they come; returns ``status`` once the job ended."""
    addr = resolve_address(address)
    jobs = jobs or client(addr)
    out = out or sys.stdout

    async def pump() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        with _errors(addr, job_id):
            jobs.get_job_status(job_id)  # an unknown id fails here, with one line
            try:
                asyncio.run(pump())
            except RuntimeError as e:  # the websocket dropped (a proxy, a port-forward): the job goes on
                print(f"\nlog stream closed ({e}); waiting for {job_id} to end", file=sys.stderr)
            # The log stream can close a moment before the job's final state is recorded.
            while jobs.get_job_status(job_id).value not in TERMINAL:
                time.sleep(0.5)
    except KeyboardInterrupt:
        print(
            f"\nstopped following; {job_id} keeps running (ray job stop {job_id} --address {addr})",
            file=sys.stderr,
        )
        raise
    return status(job_id, addr, jobs=jobs)


def stop(job_id: str, address: str | None = None, timeout_s: float = 30.0) -> dict[str, Any]:
    """Stop the job (Ray sends SIGTERM to its entrypoint, SIGKILL a few seconds later) and wait for it."""
    addr = resolve_address(address)
    jobs = client(addr)
    deadline = time.time() + timeout_s
    with _errors(addr, job_id):
        jobs.stop_job(job_id)
        while jobs.get_job_status(job_id).value not in TERMINAL and time.time() < deadline:
            time.sleep(0.5)
    return status(job_id, addr, jobs=jobs)


# ---------------------------------------------------------------------------------- job entrypoint
def _run_stage(stage: str, cfg: RunConfig, until: str | None = None, serve: bool = False) -> dict[str, Any]:
    if stage in ("run", "demo"):
        from rich.console import Console

        from rayllm import pipeline

        if stage == "run":
            return pipeline.run(cfg, until=until, serve=serve, console=Console(stderr=True))
        return pipeline.demo(cfg, console=Console())
    return stages.run_stage(stage, cfg)


def entrypoint(argv: list[str] | None = None) -> int:
    """What ``jobs/run_stage.py`` runs on the cluster: load the config, run the stage, print JSON.

    Returns the exit code: 0, or 2 with one ``error:`` line for a user error (as the CLI does).
    """
    parser = argparse.ArgumentParser(prog=ENTRYPOINT, description="Run one rayllm stage (a Ray job).")
    parser.add_argument("stage", choices=list(COMMANDS))
    parser.add_argument("--config", action="append", default=[], help="YAML config; repeat to merge")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="section.key=value")
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--until", choices=list(stages.NAMES), help="run: the last stage of the chain")
    parser.add_argument("--serve", action="store_true", help="run: end the chain by serving")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.sets, args.run_dir)
        if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
            # Inside a Ray job: join the job's cluster via the RAY_ADDRESS that Ray set (cluster.address
            # was the submitter's dashboard URL), keep the job's working_dir, and let init_ray's env_vars
            # (the same ones the job was submitted with) merge instead of failing as a conflict.
            cfg.cluster.address = None
            cfg.cluster.working_dir = None
            os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
        summary = _run_stage(args.stage, cfg, args.until, args.serve)
    except Exception as e:
        user = find_user_error(e)
        if user is None:
            raise
        print(f"error: {one_line(user)}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps(summary, indent=2, ensure_ascii=False, default=str), flush=True)
    return 0
