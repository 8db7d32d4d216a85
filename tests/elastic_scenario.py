"""Elastic scenario on a simulated 3-node Ray cluster, run in its own process by test_elastic.py.

Two worker nodes carry one ``slot`` each; training asks for ``workers: [1, 2]`` with one slot per
worker. Mid-run one node is removed (its worker dies with it), later a node is added back. Prints
one JSON line with what happened, for the test to assert on.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "20"
os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"
sys.path.insert(0, str(Path(__file__).parent))

from conftest import tiny_config


def metrics(run: Path) -> list[dict]:
    path = run / "train" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(predicate, timeout: float, what: str) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return time.time() - t0
        time.sleep(0.2)
    raise SystemExit(f"timed out after {timeout} s waiting for {what}")


def main(corpus: Path, work: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from rayllm.prep.stage import run as prep
    from rayllm.rundir import RunDir
    from rayllm.train import checkpoint
    from rayllm.train.stage import run as fit

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": 300 * 2**20, "include_dashboard": False},
    )
    try:
        nodes = [
            cluster.add_node(num_cpus=1, resources={"slot": 1}, object_store_memory=150 * 2**20)
            for _ in range(2)
        ]
        ray.init(address=cluster.address)
        cfg = tiny_config(
            work,
            corpus,
            train__workers=[1, 2],
            train__resources_per_worker={"slot": 1},
            train__max_steps=1500,
            train__log_every=10,
            train__eval_every=250,
            train__checkpoint_every=50,
            train__max_failures=2,
            train__elastic_monitor_s=5,
            train__export=False,
        )
        prep(cfg)
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(fit(cfg)))
        thread.start()
        wait_for(
            lambda: checkpoint.latest(RunDir.of(cfg).storage) is not None and metrics(work),
            180,
            "a checkpoint",
        )
        cluster.remove_node(nodes[1])
        removed_at = time.time()
        shrink_s = wait_for(
            lambda: any(r.get("world") == 1 and "loss" in r for r in metrics(work)),
            180,
            "training at 1 worker",
        )
        cluster.add_node(num_cpus=1, resources={"slot": 1}, object_store_memory=150 * 2**20)
        regrow_s = wait_for(
            lambda: any(r.get("event") == "resume" and r.get("world") == 2 for r in metrics(work)),
            180,
            "scaling back to 2 workers",
        )
        thread.join(timeout=600)
        print(
            json.dumps(
                {
                    "shrink_seconds": round(shrink_s, 1),
                    "regrow_seconds": round(regrow_s, 1),
                    "since_removal": round(time.time() - removed_at, 1),
                    "resumes": [
                        (r["step"], r["from_world"], r["world"])
                        for r in metrics(work)
                        if r.get("event") == "resume"
                    ],
                    "worlds": sorted({r["world"] for r in metrics(work) if "loss" in r}),
                    "summary": result,
                },
                default=str,
            )
        )
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
