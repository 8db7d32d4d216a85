"""Serve operations against a real local Ray Serve on 127.0.0.1: autoscaling under load, API keys,
the bounded queue, disconnects and timeouts."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray_head import free_port
from serve_helpers import make_tiny_gpt2

from rayllm.config import RunConfig


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_gpt2(tmp_path_factory.mktemp("ops") / "tiny-gpt2", n_positions=512)


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
    return app.deployments["LLMServer"].replica_states.get("RUNNING", 0)


@pytest.mark.slow
def test_replicas_scale_up_under_load_and_back_down(start_server: Any) -> None:
    url = start_server(
        cpus_per_replica=0.5,
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
        deadline = time.monotonic() + 90
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


# ------------------------------------------------------------------------------------------- auth
def test_api_keys_are_required_and_health_stays_open(start_server: Any, tmp_path: Path) -> None:
    import openai

    key_file = tmp_path / "keys"
    key_file.write_text("# one key per line\nsecond-key\n")
    url = start_server(api_keys=["first-key"], api_keys_file=str(key_file))
    with httpx.Client(base_url=url, timeout=30, trust_env=False) as c:
        missing = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        wrong = c.get("/v1/models", headers={"Authorization": "Bearer nope"})
        for r in (missing, wrong):
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"]["code"] == "invalid_api_key" and r.json()["error"]["message"]
        assert "missing API key" in missing.json()["error"]["message"]
        assert c.get("/health").status_code == 200
    for key in ("first-key", "second-key"):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        assert client.completions.create(model="tiny-gpt2", prompt="hi", max_tokens=2).usage.completion_tokens
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="stolen", max_retries=0).models.list()
    saved = (tmp_path / "serve" / "config.yaml").read_text()
    assert "first-key" not in saved and "second-key" not in saved


def test_network_address_without_keys_refuses_to_start(model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """Through the CLI, before any Ray starts: one line, exit 2, naming the fields that fix it."""
    import subprocess
    import sys

    base = [sys.executable, "-m", "rayllm", "serve", "--run-dir", str(tmp_path)]
    sets = ["--set", f"serve.model_dir={model_dir}", "--set", "serve.host=0.0.0.0"]
    proc = subprocess.run([*base, *sets], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "serve.host=0.0.0.0" in lines[0] and "serve.api_keys" in lines[0]
    assert "serve.allow_unauthenticated" in lines[0]
    from rayllm.config import ServeConfig
    from rayllm.errors import ConfigError
    from rayllm.serve.deployment import KEYS_FILE_ENV, api_keys, check_exposure

    empty = tmp_path / "empty-keys"
    empty.write_text("\n# comments only\n")
    with pytest.raises(ConfigError, match=r"serve\.api_keys_file: .* holds no API key"):
        api_keys(ServeConfig(api_keys_file=str(empty)))
    # The environment variable names a key file when the config names none.
    keys = tmp_path / "keys"
    keys.write_text("env-key\n")
    monkeypatch.setenv(KEYS_FILE_ENV, str(keys))
    exposed = ServeConfig(host="0.0.0.0")
    assert api_keys(exposed) == ["env-key"]
    check_exposure(exposed, api_keys(exposed))  # keys from the variable make a network address fine
    monkeypatch.setenv(KEYS_FILE_ENV, str(tmp_path / "gone"))
    with pytest.raises(ConfigError, match=r"\$RAYLLM_API_KEYS_FILE: cannot read the API key file"):
        api_keys(exposed)


# ------------------------------------------------------------------------------ load and failures
def _wait(predicate: Any, what: str, timeout: float = 30) -> float:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, what
        time.sleep(0.05)
    return time.monotonic() - t0


def test_queue_bound_disconnects_and_timeouts(start_server: Any) -> None:
    url = start_server(max_batch=1, max_queue=1, batch_wait_ms=0)
    long = {"prompt": "x", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=url, timeout=60, trust_env=False) as c:
        health = lambda: c.get("/health").json()  # noqa: E731

        def hold(stream_cm: Any) -> Any:
            r = stream_cm.__enter__()
            assert r.status_code == 200
            return r

        # One request decodes in the only row, one waits in the queue: the next one is refused.
        running = c.stream("POST", "/v1/completions", json=long)
        hold(running)
        _wait(lambda: health()["active"] == 1, "the first request never started")
        waiting = c.stream("POST", "/v1/completions", json=long)
        hold(waiting)
        _wait(lambda: health()["pending"] == 1, "the second request never queued")
        refused = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        # A client that hangs up frees its slot at once: the waiting request takes the row.
        cancelled = health()["cancelled"]
        running.__exit__(None, None, None)
        took = _wait(lambda: health()["cancelled"] > cancelled, "the row was not freed", timeout=5)
        assert took < 3
        _wait(
            lambda: health()["active"] == 1 and health()["pending"] == 0, "the queued request did not start"
        )
        waiting.__exit__(None, None, None)
        _wait(lambda: health()["active"] == 0, "rows still busy after both clients left", timeout=5)

        # A non-streaming client that hangs up while its request decodes is cancelled too. A raw
        # socket, so the hang-up comes once the request is in a batch row, not before it arrives.
        before = health()["cancelled"]
        body = json.dumps({**long, "stream": False, "max_tokens": 480, "n": 4}).encode()
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            _wait(lambda: health()["active"] == 1, "the non-streaming request never started")
        _wait(lambda: health()["cancelled"] > before, "an abandoned request kept decoding", timeout=5)
        _wait(lambda: health()["active"] == 0 and health()["pending"] == 0, "its rows stayed busy", timeout=5)

        assert health()["status"] == "ok"


def test_requests_past_the_timeout_end_with_an_openai_error(start_server: Any) -> None:
    url = start_server(request_timeout_s=0.25)
    # 8 x 480 tokens take well over a second on any CPU; the timeout is a quarter of one.
    slow = {"prompt": "x", "max_tokens": 480, "n": 8, "ignore_eos": True}
    with httpx.Client(base_url=url, timeout=60, trust_env=False) as c:
        cut = c.post("/v1/completions", json=slow)
        assert cut.status_code == 504 and cut.json()["error"]["code"] == "timeout", cut.text
        events = [
            ln for ln in c.post("/v1/completions", json={**slow, "stream": True}).text.splitlines() if ln
        ]
        assert '"code": "timeout"' in events[-2] and events[-1] == "data: [DONE]"
        _wait(lambda: c.get("/health").json()["active"] == 0, "timed-out sequences kept decoding", timeout=5)
        ok = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2
