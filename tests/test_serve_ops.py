"""Autoscaling against a real local Ray Serve LLM (vLLM) on 127.0.0.1: replicas added under load
and taken away when idle. A server of its own (test_serve's keys, queue and timeouts share one)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray_head import free_port
from serve_helpers import SERVE_MODEL

from rayllm.config import RunConfig


@pytest.fixture
def start_server(ray_cluster: Any, model_dir: Path, tmp_path: Path) -> Iterator[Any]:
    """Start a server with the given serve section on a free port; always shut down after the test."""
    from rayllm.serve import stage

    def start(**serve: Any) -> str:
        cfg = RunConfig.model_validate(
            {"run_dir": str(tmp_path), "serve": {"model_dir": str(model_dir), "port": free_port(), **serve}}
        )
        return stage.start(cfg)

    try:
        yield start
    finally:
        stage.shutdown()


def _running_replicas() -> int:
    from ray import serve

    app = serve.status().applications["rayllm"]
    return app.deployments[f"RayllmServer:{SERVE_MODEL}"].replica_states.get("RUNNING", 0)


@pytest.mark.slow
def test_replicas_scale_up_under_load_and_back_down(start_server: Any) -> None:
    url = start_server(
        cpus_per_replica=1,
        max_batch=2,
        replicas={
            "min": 1,
            "max": 2,
            "target_ongoing_requests": 1,
            "upscale_delay_s": 1,
            "downscale_delay_s": 3,
        },
    )
    assert _running_replicas() == 1
    stop = threading.Event()
    body = {"prompt": "load", "max_tokens": 400, "ignore_eos": True, "temperature": 0}

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120, trust_env=False) as c:
            while not stop.is_set():
                c.post("/v1/completions", json=body)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        # A second vLLM replica starts while the first one keeps 2 cores busy: over a minute here.
        deadline = time.monotonic() + 180
        while _running_replicas() < 2:
            assert time.monotonic() < deadline, "no second replica under 4 concurrent requests"
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    deadline = time.monotonic() + 90
    while _running_replicas() > 1:
        assert time.monotonic() < deadline, "idle replicas were not scaled back to replicas.min"
        time.sleep(0.5)
