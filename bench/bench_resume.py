"""Resume: the time from a resumed `rayllm train` run's start to its first step, at an early and a late
position of a larger packed set.

The packed set is ``--rows`` blocks of random tokens, written as prep writes them (its
``ShardWriter``, shards of 16,384 rows, a manifest listing them). Two runs of a small GPT train to
the early and the late step and checkpoint there; each is then resumed for one more step from a fresh
copy of its run directory, ``--repeats`` times, interleaved, and timed from the call of the train
stage to the first step's metrics row (Ray is started once, before). Once with the split
materialized in the object store (``train.cache_data_gb`` above its size), once streamed from the
shards (``train.cache_data_gb=0``).

    .venv/bin/python bench/bench_resume.py [--rows 400000] [--repeats 2]

Ends with one JSON line: ``ratio`` = the early resume's median time over the late one's, the lower
of the two modes (1.0: a resume costs the same wherever it stops), ``target`` 0.8.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rayllm.config import ClusterConfig, load_config  # noqa: E402
from rayllm.prep.shards import ShardWriter  # noqa: E402
from rayllm.rundir import PackedData, read_jsonl  # noqa: E402
from rayllm.runtime import init_ray  # noqa: E402

TARGET = 0.8
SEQ_LEN, VOCAB, SHARD_ROWS, GLOBAL_BATCH = 64, 512, 16384, 2048


def packed_set(folder: Path, rows: int) -> None:
    """``rows`` train blocks and one global batch of val blocks, as prep lays them out."""
    data, rng = PackedData(folder), np.random.default_rng(0)
    shards = []
    for split, n in (("train", rows), ("val", GLOBAL_BATCH)):
        writer = ShardWriter(data.split_dir(split), SEQ_LEN + 1)
        for start in range(0, n, SHARD_ROWS):
            size = min(SHARD_ROWS, n - start)
            writer.write({"input_ids": rng.integers(1, VOCAB, (size, SEQ_LEN + 1), dtype=np.int32)})
        shards += writer.shards
    data.write_manifest(
        {
            "vocab_size": VOCAB, "eos_id": 0, "pad_id": 0, "seq_len": SEQ_LEN, "block_len": SEQ_LEN + 1,
            "blocks": {"train": rows, "val": GLOBAL_BATCH}, "shards": shards,
        }
    )  # fmt: skip


def config(run: Path, data: Path, steps: int, cache_gb: float):
    return load_config(
        [ROOT / "examples" / "configs" / "shakespeare-cpu.yaml"],
        [
            f"run_dir={run}", f"train.data_dir={data}", f"train.max_steps={steps}", "train.workers=1",
            "train.cpus_per_worker=1", f"train.global_batch={GLOBAL_BATCH}", "train.micro_batch=512",
            "train.eval_batches=1", "train.eval_every=100000", "train.log_every=100000",
            f"train.checkpoint_every={steps}", "train.export=false", f"train.cache_data_gb={cache_gb}",
            "train.schedule.warmup_steps=0", "model.n_layer=1", "model.n_head=2", "model.d_model=64",
            f"model.max_positions={SEQ_LEN}", f"data.seq_len={SEQ_LEN}",
        ],
    )  # fmt: skip


def first_step_seconds(run: Path, data: Path, step: int, cache_gb: float) -> float:
    """Resume ``run`` (checkpointed at ``step``) for one step; seconds until that step's row."""
    from rayllm.train.stage import run as fit

    t0 = time.time()
    fit(config(run, data, step + 1, cache_gb))
    rows = read_jsonl(run / "train" / "metrics.jsonl")
    resumed = [r for r in rows if r.get("event") == "resume"]
    assert resumed and resumed[-1]["step"] == step, f"{run} did not resume at step {step}: {resumed}"
    return next(r["time"] for r in rows if r.get("step") == step + 1 and "loss" in r) - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=400_000)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    from rayllm.train.stage import run as fit

    work = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    data = work / "prep"
    packed_set(data, args.rows)
    init_ray(ClusterConfig(num_cpus=2, object_store_gb=1.5))
    late = int(args.rows * 0.9) // GLOBAL_BATCH
    positions = {"early": 2, "late": late}
    for name, step in positions.items():
        t0 = time.time()
        fit(config(work / name, data, step, 2.0))
        print(f"trained to the {name} step {step} in {time.time() - t0:.0f} s", file=sys.stderr)
    times: dict[str, dict[str, list[float]]] = {}
    for mode, cache_gb in (("materialized", 2.0), ("streamed", 0.0)):
        times[mode] = {name: [] for name in positions}
        for r in range(args.repeats):
            order = list(positions) if r % 2 == 0 else list(reversed(positions))
            for name in order:
                copy = work / f"{mode}-{name}-{r}"
                shutil.copytree(work / name, copy)
                seconds = first_step_seconds(copy, data, positions[name], cache_gb)
                times[mode][name].append(round(seconds, 2))
                shutil.rmtree(copy)
                print(f"{mode} {name} (step {positions[name]}): {seconds:.1f} s", file=sys.stderr)
    ratios = {mode: statistics.median(t["early"]) / statistics.median(t["late"]) for mode, t in times.items()}
    shutil.rmtree(work)
    print(
        json.dumps(
            {
                "benchmark": "resume",
                "date": datetime.date.today().isoformat(),
                "rows": args.rows,
                "global_batch": GLOBAL_BATCH,
                "positions": {k: {"step": v, "rows": v * GLOBAL_BATCH} for k, v in positions.items()},
                "seconds_to_first_step": times,
                "ratio_by_mode": {k: round(v, 3) for k, v in ratios.items()},
                "ratio": round(min(ratios.values()), 3),
                "target": TARGET,
            }
        )
    )


if __name__ == "__main__":
    main()
