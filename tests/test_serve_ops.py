"""Serve operations against a real local Ray Serve LLM (vLLM) on 127.0.0.1: autoscaling under load,
API keys, the bounded queue, disconnects and timeouts. One server, with keys, one slot, a queue of
one and a short timeout, serves every default test here (a vLLM replica takes about a minute to start
on 2 cores)."""

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
    return make_tiny_gpt2(tmp_path_factory.mktemp("ops") / "tiny-gpt2", n_positions=4096)


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
    return app.deployments["RayllmServer:tiny-gpt2"].replica_states.get("RUNNING", 0)


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


KEY = "first-key"
TIMEOUT_S = 8.0


@pytest.fixture(scope="module")
def guarded(ray_cluster: Any, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """(url, run_dir) of a server with two keys (config and file), one slot, a queue of one and a
    short timeout; shut down even if a test fails."""
    from rayllm.serve import stage

    run_dir = tmp_path_factory.mktemp("guarded")
    key_file = run_dir / "keys"
    key_file.write_text("# one key per line\nsecond-key\n")
    serve = {
        "model_dir": str(model_dir),
        "port": free_port(),
        "api_keys": [KEY],
        "api_keys_file": str(key_file),
        "max_batch": 1,
        "max_queue": 1,
        "request_timeout_s": TIMEOUT_S,
        "max_tokens_limit": 4000,
    }
    try:
        url = stage.start(RunConfig.model_validate({"run_dir": str(run_dir), "serve": serve}))
        _warm_up(url)
        yield url, run_dir
    finally:
        stage.shutdown()


def _warm_up(url: str) -> None:
    """The first requests of a fresh server pay one-time costs (vLLM's warm-up, the first stream's
    path through Serve), which on a busy 2-core machine once ran past this server's 8 s timeout (the
    full suite saw a 504 before the first streamed byte); the tests below are about the queue and
    the timeout in steady state, so a plain and a streamed request run first."""
    deadline = time.monotonic() + 120
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        for stream in (False, True):
            body = {"prompt": "x", "max_tokens": 2, "stream": stream}
            while (r := c.post("/v1/completions", json=body)).status_code != 200:
                assert r.status_code == 504 and time.monotonic() < deadline, r.text[:300]


@pytest.fixture
def http(guarded: tuple) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=guarded[0], timeout=60, trust_env=False, headers=headers) as c:
        yield c


# ------------------------------------------------------------------------------------------- auth
def test_api_keys_are_required_and_health_stays_open(guarded: tuple) -> None:
    import openai

    url, run_dir = guarded
    with httpx.Client(base_url=url, timeout=30, trust_env=False) as c:
        missing = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        wrong = c.get("/v1/models", headers={"Authorization": "Bearer nope"})
        for r in (missing, wrong):
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"]["code"] == "invalid_api_key" and r.json()["error"]["message"]
        assert "missing API key" in missing.json()["error"]["message"]
        assert c.get("/health").status_code == 200
    for key in (KEY, "second-key"):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        assert client.completions.create(model="tiny-gpt2", prompt="hi", max_tokens=2).usage.completion_tokens
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="stolen", max_retries=0).models.list()
    saved = (run_dir / "serve" / "config.yaml").read_text()
    assert KEY not in saved and "second-key" not in saved


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
    # The vLLM engine settings are validated the same way, naming the field.
    bad = subprocess.run([*base, "--set", f"serve.model_dir={model_dir}", "--set", "serve.kv_cache_gb=0"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "serve.kv_cache_gb" in bad.stderr, bad.stderr
    assert len([ln for ln in bad.stderr.splitlines() if ln.strip()]) == 1
    from rayllm.config import ServeConfig
    from rayllm.errors import ConfigError
    from rayllm.serve.preflight import KEYS_FILE_ENV, api_keys, check_exposure

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


def test_queue_bound_and_disconnects(guarded: tuple, http: httpx.Client) -> None:
    """One request runs and one waits; the next is refused at once with 429 and Retry-After; a
    client that hangs up gives its place back at once."""
    host, port = guarded[0].removeprefix("http://").split(":")
    body = json.dumps({"prompt": "x", "max_tokens": 4000, "ignore_eos": True, "stream": True}).encode()
    active = lambda: http.get("/health").json()["active"]  # noqa: E731
    rejected = http.get("/health").json()["rejected"]
    socks = []
    try:
        for _ in range(2):  # raw sockets: sent, never read, hung up when the test says
            sock = socket.create_connection((host, int(port)), timeout=10)
            head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
            sock.sendall(
                f"{head}Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
            )
            socks.append(sock)
        _wait(lambda: active() == 2, "the two requests were not both admitted", timeout=5)
        assert socks[0].recv(64).startswith(b"HTTP/1.1 200")  # the first one is streaming
        refused = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1", refused.text
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert refused.json()["error"]["type"] == "server_busy"
        assert http.get("/health").json()["rejected"] == rejected + 1
        socks.pop(0).close()
        assert _wait(lambda: active() == 1, "a hung-up request kept its place", timeout=3) < 3
    finally:
        for sock in socks:
            sock.close()
    _wait(lambda: active() == 0, "a hung-up queued request kept its place", timeout=TIMEOUT_S + 3)
    ok = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_n_is_bounded_by_the_engine_batch(http: httpx.Client) -> None:
    """serve.max_n is 16 by default, but this server runs one sequence at a time: n=2 is a 400."""
    r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "n": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
    assert "serve.max_batch" in r.json()["error"]["message"]


def test_requests_past_the_timeout_end_with_an_openai_error(http: httpx.Client) -> None:
    """A stream past the timeout ends with an error event and [DONE], a plain request gets 504, and
    neither keeps the engine busy afterwards."""
    # 4,000 tokens take well over the timeout on any CPU (about 4 ms a token here).
    slow = {"prompt": "x", "max_tokens": 4000, "ignore_eos": True}
    timed_out = http.get("/health").json()["timed_out"]
    for stream in (True, False):
        t0 = time.monotonic()
        r = http.post("/v1/completions", json={**slow, "stream": stream})
        assert time.monotonic() - t0 < TIMEOUT_S + 2
        if stream:
            events = [ln for ln in r.text.splitlines() if ln]
            assert r.status_code == 200 and len(events) > 2, r.text[:300]
            assert '"code": "request_timeout"' in events[-2] and events[-1] == "data: [DONE]"
        else:
            assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout", r.text[:300]
            assert r.json()["error"]["type"] == "timeout"
        t0 = time.monotonic()  # the cut-off sequences left the engine: a new request runs at once
        ok = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2
        assert time.monotonic() - t0 < TIMEOUT_S / 2, (stream, time.monotonic() - t0)
    assert http.get("/health").json()["timed_out"] == timed_out + 2
