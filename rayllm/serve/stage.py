"""serve stage: the run's exported model behind an OpenAI-compatible HTTP API on Ray Serve.

``start(cfg)`` deploys and returns the base URL (clients use ``<url>/v1``), ``run(cfg)`` does the same
and blocks until Ctrl-C / SIGTERM, ``shutdown()`` stops Serve. ``deployment.app_builder`` gives the
Serve application itself, for ``serve run`` / ``serve deploy`` and Serve config files
(``examples/configs/serve.yaml``).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from datetime import datetime, timezone
from types import FrameType
from typing import Any

import httpx

from rayllm.config import RunConfig
from rayllm.errors import RayllmError
from rayllm.rundir import RunDir
from rayllm.runtime import SERVE_ENV, init_ray, ray_session

log = logging.getLogger("rayllm.serve")

APP_NAME = "rayllm"
READY_TIMEOUT_S = 600.0  # a vLLM replica loads weights, profiles memory and (GPUs) captures graphs


def start(cfg: RunConfig) -> str:
    """Deploy the model on ``cfg.serve.host:port`` without blocking; returns once it answers ``/health``.

    Writes ``<run_dir>/serve/summary.json`` (url, model, ...). Ray is joined or started from
    ``cfg.cluster`` and left running: call ``shutdown()`` (and ``ray.shutdown()``) when done.
    """
    if not cfg.cluster.verbose:  # vLLM logs its platform checks as it is imported
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    from rayllm.serve.preflight import check, model_name

    s = cfg.serve
    model_dir, keys = check(cfg)  # before Ray and vLLM are imported: a refusal is one line at once
    from ray import serve as ray_serve

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    from rayllm.serve.deployment import build_app

    # Importing Ray Serve LLM swaps the root logger's handlers for its own JSON one at INFO: this
    # process's console stays as the CLI set it up.
    root.handlers[:] = handlers
    root.setLevel(level)

    if not cfg.cluster.verbose:  # importing Serve set its logger to INFO
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    init_ray(cfg.cluster, use_gpu=s.gpus_per_replica > 0)
    ray_serve.start(
        http_options={"host": s.host, "port": s.port},
        controller_options={"runtime_env": {"env_vars": SERVE_ENV}},  # also on a cluster started without
    )
    client_host = "127.0.0.1" if s.host in ("0.0.0.0", "::", "") else s.host
    url = f"http://{client_host}:{s.port}"
    try:
        try:
            ray_serve.run(build_app(s, model_dir, keys), name=APP_NAME, route_prefix="/", blocking=False)
        except RuntimeError as e:  # Serve says only "failed to update the deployments"; say why
            failure = _deploy_failure()
            if failure is None:
                raise
            raise RayllmError(f"the model server failed to start: {failure}") from e
        health = _wait_healthy(url)
        _warm_up(url, model_name(s, model_dir), keys)
    except BaseException:
        shutdown()  # nothing half-started is left behind on the cluster
        raise
    rd = RunDir.of(cfg)
    rd.start_stage(cfg, "serve")
    rd.write_summary(
        "serve",
        {
            "url": url,
            "openai_base_url": f"{url}/v1",
            "model": model_name(s, model_dir),
            "model_dir": model_dir,
            "max_context": health.get("max_context"),
            "replicas": s.replicas.model_dump(),
            "max_batch": s.max_batch,
            "api_keys": len(keys),
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )
    metrics = rd.metrics("serve")
    metrics.write(event="started", url=url, **health)
    metrics.close()
    log.info("serving %s at %s/v1", model_name(s, model_dir), url)
    return url


def shutdown() -> None:
    """Stop every Serve application and Serve itself (Ray keeps running)."""
    from ray import serve as ray_serve

    ray_serve.shutdown()


def run(cfg: RunConfig) -> dict[str, Any]:
    """``start``, block until Ctrl-C or SIGTERM, then shut Serve (and a Ray it started) down."""
    from rayllm.serve.preflight import check

    check(cfg)  # before a Ray of its own starts
    rd = RunDir.of(cfg)
    with ray_session(cfg.cluster, use_gpu=cfg.serve.gpus_per_replica > 0):
        url = start(cfg)
        summary = rd.read_summary("serve")
        print(f"serving {summary['model']} at {url}/v1 (Ctrl-C or SIGTERM stops it)", flush=True)
        try:
            _wait_for_stop_signal()
            # What the replica admitted, refused and cut off, before it goes away.
            with httpx.Client(timeout=5.0, trust_env=False) as client:
                health = client.get(f"{url}/health").json()
            stats = {k: health[k] for k in ("requests", "rejected", "timed_out") if k in health}
        except httpx.HTTPError as e:
            stats = {"health_error": str(e)}
        finally:
            shutdown()
    summary = {**summary, **stats}
    summary["stopped_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    metrics = rd.metrics("serve")
    metrics.write(event="stopped", **stats)
    metrics.close()
    rd.write_summary("serve", summary)
    return summary


def _wait_for_stop_signal() -> None:
    """Block until SIGINT or SIGTERM; installed after ``ray.init``, whose SIGTERM handler exits at once."""
    stop = threading.Event()

    def _on_signal(signum: int, _: FrameType | None) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _on_signal)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait_healthy(url: str, timeout_s: float = READY_TIMEOUT_S) -> dict[str, Any]:
    """Poll ``/health`` until the HTTP proxy routes to a ready replica; a deployment that failed
    (a replica that cannot load the model) is reported at once, by the error its replicas raised."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with httpx.Client(timeout=5.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            try:
                r = client.get(f"{url}/health")
                if r.status_code == 200:
                    return r.json()
                last = f"HTTP {r.status_code}: {r.text[:200]}"
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
            failure = _deploy_failure()
            if failure is not None:
                raise RayllmError(f"the model server failed to start: {failure}")
            time.sleep(0.5)
    raise RayllmError(
        f"the model server at {url} did not become healthy within {timeout_s:.0f} s ({last}); if Serve "
        "was already running on another port, run `serve shutdown` first; replica logs are under "
        "/tmp/ray/session_latest/logs/serve"
    )


def _warm_up(url: str, model: str, keys: list[str]) -> None:
    """One token through the engine before the server counts as started: vLLM's first request
    costs seconds (allocations, kernel selection) that no user request should pay."""
    headers = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
    body = {"model": model, "prompt": "Hello", "max_tokens": 1}
    with httpx.Client(timeout=READY_TIMEOUT_S, trust_env=False, headers=headers) as client:
        r = client.post(f"{url}/v1/completions", json=body)
    if r.status_code != 200:
        raise RayllmError(
            f"the model server started but cannot generate: HTTP {r.status_code}: {r.text[:300]}"
        )


def _deploy_failure() -> str | None:
    """When the deployment failed: the exception line of the replica traceback Serve recorded."""
    from ray import serve as ray_serve

    app = ray_serve.status().applications.get(APP_NAME)
    if app is None or app.status != "DEPLOY_FAILED":
        return None
    message = "\n".join([app.message, *(d.message for d in app.deployments.values())])
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", ln)]
    line = errors[-1] if errors else (lines[-1] if lines else "no message")
    if line.endswith(":"):  # a wrapper whose cause had no message (vLLM's engine config errors)
        line += " (no reason given; the replica's log is under /tmp/ray/session_latest/logs/serve)"
    return line
