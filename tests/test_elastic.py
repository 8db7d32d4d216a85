"""Elastic training across simulated nodes: lose a node, continue at 1 worker, regain it, scale back to 2.

Runs ``elastic_scenario.py`` in its own process because it needs its own multi-node Ray
(``ray.cluster_utils.Cluster``), not the session's single-node one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_node_loss_shrinks_and_regained_capacity_grows(tiny_corpus, tmp_path):
    script = Path(__file__).parent / "elastic_scenario.py"
    env = {**os.environ, "RAYLLM_PROGRESS": "0"}
    proc = subprocess.run(
        [sys.executable, str(script), str(tiny_corpus), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{"shrink_seconds"')]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(lines[-1])
    # 2 -> 1 after the node loss (from the last registered checkpoint), 1 -> 2 when capacity returns;
    # the changed data-parallel degree is resharded through DeepSpeed's universal checkpoint.
    assert [tuple(x[1:]) for x in r["resumes"]] == [(2, 1), (1, 2)]
    assert r["worlds"] == [1, 2]
    s = r["summary"]
    assert s["steps"] == 1500 and s["resumes"] == 2
    assert s["val_loss_last"] < s["val_loss_first"] - 1.0
