"""Connecting to Ray as Ray's own tools do: a head already running on this machine is joined."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from ray_head import ray_head


def test_a_running_head_is_joined_and_address_local_starts_a_private_one(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i} of a small corpus, 第{i}行" for i in range(300)), encoding="utf-8")
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "sources": [{"path": str(corpus), "split_on": "line"}],
                    "tokenizer": {"vocab_size": 300},
                    "seq_len": 16,
                    "val_fraction": 0.1,
                },
                "cluster": {"object_store_gb": 0.2, "num_cpus": 1, "dashboard": False},
            }
        )
    )
    ray_tmp = Path(tempfile.mkdtemp(prefix="rh-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_"))}
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_AUTH_MODE="disabled")
    prep = [sys.executable, "-m", "rayllm", "prep", "-c", str(config)]
    with ray_head(ray_tmpdir=ray_tmp, RAY_AUTH_MODE="disabled"):
        joined = subprocess.run(
            [*prep, "-r", str(tmp_path / "a")], env=env, capture_output=True, text=True, timeout=300
        )
        assert joined.returncode == 0, joined.stderr[-3000:]
        lines = [ln for ln in joined.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1, joined.stderr  # one line says so; nothing else is printed
        assert re.fullmatch(r"rayllm: joining the Ray head already running at \S+:\d+ \(.*\)", lines[0])
        assert "cluster.address: local" in lines[0]
        private = subprocess.run(
            [*prep, "-r", str(tmp_path / "b"), "--set", "cluster.address=local"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert private.returncode == 0, private.stderr[-3000:]
        assert "joining" not in private.stderr and "Traceback" not in private.stderr
    for run in ("a", "b"):
        assert (tmp_path / run / "prep" / "manifest.json").is_file()
