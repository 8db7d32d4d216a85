"""prep on a simulated 3-node Ray cluster (1 CPU each), run in its own process by test_prep.py.

Prints one JSON line: the manifest's shard checksums and the nodes that packed buckets.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from conftest import tiny_config


def main(corpus: Path, work: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from rayllm.prep.stage import run as prep

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": 200 * 2**20, "include_dashboard": False},
    )
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, object_store_memory=150 * 2**20)
        ray.init(address=cluster.address)
        prep(tiny_config(work, corpus))
        manifest = json.loads((work / "prep" / "manifest.json").read_text())
        nodes = {json.loads(m.read_text())["node"] for m in (work / "prep" / "buckets").glob("b*.json")}
        print(json.dumps({"sha256": [s["sha256"] for s in manifest["shards"]], "nodes": len(nodes)}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
