"""prep at cluster scale: throughput against the number of CPUs, and driver memory against corpus size.

The packaged corpora (Shakespeare paragraphs, the King James Bible's verses, the CPython standard
library's files; 7.7M GPT-2 tokens) with every source's ``weight`` raised to about 100M packed
tokens: reading, cleaning and tokenizing stay the corpus's size, packing and writing grow with the
weight (the work that used to run in the driver alone). Each run is a fresh ``rayllm prep``
process starting its own local Ray with ``cluster.num_cpus`` CPUs, the process and everything it
starts pinned to that many cores (CPU affinity), so that N CPUs means N cores for the driver and
Ray's own processes too; throughput is packed tokens over
the stage's seconds after Ray started (``seconds`` less ``phase_seconds.start_ray``, both from the
manifest). The driver's peak RSS is the prep process's own (``ru_maxrss``), at the full weight and
at a tenth of it, on the largest CPU count.

Ends with one JSON line: ``ratio`` = tokens/s at the most CPUs / tokens/s at the fewest, ``target``
= 0.75 x the CPU ratio (1.5 for 2 against 1), ``driver_rss_ratio`` = full weight / a tenth
(target 1.2), and each source's share of the packed tokens against the share its weight asks for.

    .venv/bin/python bench/bench_prep_scale.py [--cpus 1,2] [--weight 13] [--runs 3]
    # on a 16-core machine: --cpus 1,2,4,8,16
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from bench_prep import gpt2_tokenizer, stdlib_files  # noqa: E402

RUN = """
import json, os, resource, sys
os.sched_setaffinity(0, range(int(sys.argv[2])))  # this process and all it starts (Ray) on N cores
from rayllm.config import load_config
from rayllm.prep.stage import run
summary = run(load_config([sys.argv[1]]))
print(json.dumps({"driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def prep(config: dict, label: str) -> dict:
    """One ``rayllm prep`` in its own process; its manifest plus the driver's peak RSS."""
    path = Path(config["run_dir"] + ".yaml")
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAYLLM_PROGRESS": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", RUN, str(path), str(config["cluster"]["num_cpus"])],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )
    if proc.returncode:
        raise SystemExit(f"prep {label} failed:\n{proc.stderr[-3000:]}")
    rss = json.loads(proc.stdout.strip().splitlines()[-1])["driver_peak_rss_mb"]
    manifest = json.loads((Path(config["run_dir"]) / "prep" / "manifest.json").read_text())
    work_seconds = manifest["seconds"] - manifest["phase_seconds"]["start_ray"]
    out = {
        "tokens": manifest["tokens"],
        "seconds": manifest["seconds"],
        "work_seconds": round(work_seconds, 2),
        "tokens_per_s": round(manifest["tokens"] / work_seconds, 1),
        "driver_peak_rss_mb": round(rss, 1),
        "phase_seconds": manifest["phase_seconds"],
        "sources": manifest["sources"],
    }
    print(f"{label}: {json.dumps({k: v for k, v in out.items() if k != 'sources'})}", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpus", default="1,2", help="comma-separated CPU counts of the local Ray")
    ap.add_argument("--weight", type=float, default=13.0, help="every source's weight (13: ~100M tokens)")
    ap.add_argument("--runs", type=int, default=3, help="runs per CPU count (median)")
    args = ap.parse_args()
    cpus = [int(c) for c in args.cpus.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-prep-scale-"))
    tok_dir = gpt2_tokenizer(work / "gpt2")
    lib = Path(__import__("sysconfig").get_paths()["stdlib"])
    stdlib = work / "stdlib"
    stdlib.mkdir()
    for p in stdlib_files():
        (stdlib / str(p.relative_to(lib)).replace("/", "__")).symlink_to(p)

    def config(name: str, n_cpus: int, weight: float) -> dict:
        return {
            "run_dir": str(work / name),
            "data": {
                "sources": [
                    {"path": "pkg://shksprdata/texts/*_gut.txt", "split_on": "paragraph", "weight": weight},
                    {"path": "pkg://bible/data/kjv.jsonl", "weight": weight},
                    {"path": str(stdlib), "format": "txt", "split_on": "file", "weight": weight},
                ],
                "tokenizer": {"path": str(tok_dir)},
                "invalid_utf8": "replace",
                "on_error": "skip",
                "seq_len": 1024,
                "shard_rows": 8192,
            },
            "cluster": {"address": "local", "num_cpus": n_cpus, "object_store_gb": 2.0, "dashboard": False},
        }

    runs: dict[int, list[dict]] = {n: [] for n in cpus}
    for r in range(args.runs):
        for n in cpus:  # interleaved: a drifting machine slows every CPU count alike
            runs[n].append(prep(config(f"cpus{n}-{r}", n, args.weight), f"{n} CPUs, run {r + 1}"))
    tps = {n: statistics.median(x["tokens_per_s"] for x in runs[n]) for n in cpus}
    big = max(cpus)
    small = prep(config("tenth", big, args.weight / 10), f"{big} CPUs, weight {args.weight / 10:g}")
    full_rss = statistics.median(x["driver_peak_rss_mb"] for x in runs[big])
    sources = runs[big][0]["sources"]
    result = {
        "benchmark": "prep_scale",
        "date": datetime.date.today().isoformat(),
        "machine_cpus": os.cpu_count(),
        "tokens": runs[big][0]["tokens"],
        "tokens_per_s_by_cpus": {str(n): tps[n] for n in cpus},
        "work_seconds_by_cpus": {str(n): [x["work_seconds"] for x in runs[n]] for n in cpus},
        "driver_peak_rss_mb": {"weight": full_rss, "tenth": small["driver_peak_rss_mb"]},
        "driver_rss_ratio": round(full_rss / small["driver_peak_rss_mb"], 3),
        "driver_rss_target": 1.2,
        "source_shares": [
            {"path": s["path"], "share": s["share"], "weighted_share": s["weighted_share"]} for s in sources
        ],
        "max_share_gap": round(max(abs(s["share"] - s["weighted_share"]) for s in sources), 6),
        "ratio": round(tps[big] / tps[min(cpus)], 3),
        "target": round(0.75 * big / min(cpus), 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
