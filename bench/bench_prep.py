"""prep throughput and memory: `rayllm prep` against `datasets.map` and a one-process tokenizer loop.

Corpora: Shakespeare (paragraphs), the King James Bible (jsonl verses) and the CPython standard
library (a document per file), tokenized with the byte-exact GPT-2 BPE. Baselines run in the same
process on the same documents. Memory: peak RSS of the driver and every Ray process while prep runs
on the Shakespeare corpus replicated 1x and 10x (each copy made unique so dedup cannot shrink it).
Each side runs ``--runs`` times (default 3), the sides taking turns round after round, and the
medians are compared: on a 2-core machine a single run varies by about 10%. Ours is the stage's
own ``seconds``, from listing files to the last shard written, each run a fresh ``rayllm prep``
process:

- ``ratio``: against a Ray head on 127.0.0.1 (``cluster.address``) that has run a job before, as
  a job on a cluster runs: the process connects, its job's workers start, Ray Data starts its
  actors, all counted.
- ``ratio_cold_start``: each process also starts (and pays for) a local Ray, ~2.5 s here.

Ends with one line of JSON with both ratios (target 1.0) and ``memory_ratio`` = 10x / 1x.

    .venv/bin/python bench/bench_prep.py [--runs 3] [--skip-memory]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
RAYLLM = Path(sys.executable).parent / "rayllm"
CORES = os.cpu_count() or 2


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec and spec.submodule_search_locations, f"pip install the package that ships {name}"
    return Path(next(iter(spec.submodule_search_locations)))


def stdlib_files() -> list[Path]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "tests", "idlelib", "lib2to3")
    return sorted(p for p in lib.rglob("*.py") if not any(part in skip for part in p.relative_to(lib).parts))


def gpt2_tokenizer(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from serve_helpers import write_gpt2_tokenizer

    write_gpt2_tokenizer(folder)
    return folder


def documents() -> list[str]:
    """The same documents prep reads (paragraphs, verses, files), for the baselines."""
    docs: list[str] = []
    for f in sorted((package_dir("shksprdata") / "texts").glob("*_gut.txt")):
        docs += [p for p in f.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    with (package_dir("bible") / "data" / "kjv.jsonl").open(encoding="utf-8") as fh:
        docs += [json.loads(line)["text"] for line in fh if line.strip()]
    docs += [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files()]
    return docs


def run_prep(
    config: dict, work: Path, name: str, sample_memory: bool = False
) -> tuple[dict, float, list[float]]:
    """`rayllm prep` in its own process; returns its manifest, wall seconds and [peak RSS, PSS] MB."""
    cfg_path = work / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAYLLM_PROGRESS": "0"}
    t0 = time.time()
    proc = subprocess.Popen(
        [str(RAYLLM), "prep", "-c", str(cfg_path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = [0.0, 0.0]
    if sample_memory:
        threading.Thread(target=_sample_rss, args=(proc, peak), daemon=True).start()
    _, err = proc.communicate(timeout=3600)
    wall = time.time() - t0
    if proc.returncode:
        raise SystemExit(f"rayllm prep failed ({proc.returncode}):\n{err[-3000:]}")
    manifest = json.loads((Path(config["run_dir"]) / "prep" / "manifest.json").read_text())
    return manifest, wall, peak


def _sample_rss(proc: subprocess.Popen, peak: list[float]) -> None:
    """Peak summed RSS and PSS of the prep process and every process it started (Ray's raylet,
    workers, actors). RSS counts object-store pages once per process that maps them; PSS splits
    shared pages between those processes, so it sums to the memory really in use."""
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        rss = pss = 0
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                info = p.memory_full_info()
                rss, pss = rss + info.rss, pss + info.pss
        peak[0], peak[1] = max(peak[0], rss / 2**20), max(peak[1], pss / 2**20)
        time.sleep(0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_head() -> Iterator[str]:
    """A Ray head on 127.0.0.1 for the "running cluster" runs; stopped by its process group and,
    for anything that left the group, by PID (processes naming its own temp dir)."""
    tmp = Path(tempfile.mkdtemp(prefix="rb-", dir="/tmp"))  # short: Ray's socket paths have a cap
    port = free_port()
    cmd = [
        str(RAYLLM.parent / "ray"), "start", "--head", "--block", f"--port={port}",
        "--node-ip-address=127.0.0.1", "--include-dashboard=false", f"--num-cpus={CORES}",
        "--object-store-memory=2000000000", f"--temp-dir={tmp}",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_"))}
    log = (tmp / "head.log").open("w")
    proc = subprocess.Popen(
        cmd, env={**env, "RAY_AUTH_MODE": "disabled"}, stdout=log, stderr=log, start_new_session=True
    )
    try:
        deadline = time.time() + 120
        while "Ray runtime started" not in (tmp / "head.log").read_text():
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"ray start failed:\n{(tmp / 'head.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        left = [p for p in psutil.process_iter(["cmdline"]) if str(tmp) in " ".join(p.info["cmdline"] or [])]
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(left, timeout=10)
        log.close()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


def bench_datasets(docs: list[str], tok_dir: Path) -> tuple[float, int]:
    from datasets import Dataset, disable_progress_bars
    from transformers import AutoTokenizer

    disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    t0 = time.time()
    ds = Dataset.from_dict({"text": docs})
    out = ds.map(
        lambda b: {"ids": [[*ids, tok.eos_token_id] for ids in tok(b["text"])["input_ids"]]},
        batched=True,
        num_proc=CORES,
        remove_columns=["text"],
    )
    tokens = sum(len(x) for x in out["ids"])
    return tokens / (time.time() - t0), tokens


def bench_encode_batch(docs: list[str], tok_dir: Path) -> tuple[float, int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    t0 = time.time()
    tokens = sum(len(e.ids) + 1 for e in tok.encode_batch_fast(docs, add_special_tokens=False))
    return tokens / (time.time() - t0), tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-prep-"))
    tok_dir = gpt2_tokenizer(work / "gpt2")
    lib = Path(sysconfig.get_paths()["stdlib"])
    stdlib_list = work / "stdlib"
    stdlib_list.mkdir()
    for p in stdlib_files():  # a flat folder of the same files prep and the baselines read
        (stdlib_list / str(p.relative_to(lib)).replace("/", "__")).symlink_to(p)
    base = {
        "data": {
            "sources": [
                {"path": "pkg://shksprdata/texts/*_gut.txt", "format": "txt", "split_on": "paragraph"},
                {"path": "pkg://bible/data/kjv.jsonl", "format": "jsonl"},
                {"path": str(stdlib_list), "format": "txt", "split_on": "file"},
            ],
            "tokenizer": {"path": str(tok_dir)},
            "invalid_utf8": "replace",
            "on_error": "skip",
            "seq_len": 1024,
            "shard_rows": 8192,
        },
        "cluster": {"object_store_gb": 2.0, "dashboard": False},
    }

    def prep_run(name: str, k: int, address: str) -> tuple[float, dict]:
        cfg = {**base, "run_dir": str(work / f"{name}{k}")}
        cfg["cluster"] = {**base["cluster"], "address": address}
        manifest, wall, _ = run_prep(cfg, work, f"{name}{k}")
        print(
            f"rayllm prep ({name}): {manifest['tokens']:,} tokens in {manifest['seconds']} s "
            f"({wall:.1f} s process) {manifest['phase_seconds']}",
            file=sys.stderr,
        )
        return manifest["tokens_per_second"], manifest

    def median(runs: list[tuple[float, dict]]) -> tuple[float, dict, list[float]]:
        tps, manifest = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
        return tps, manifest, [r[0] for r in runs]

    # Each prep run takes turns with a datasets.map run, round after round, so that a machine whose
    # speed drifts slows both alike: cold runs with no Ray up (a second Ray starts slower beside
    # one), then the "ours" runs on one head, each after an untimed first job (a head that has run
    # nothing yet starts its first job slower; a cluster's head has run jobs before).
    docs = documents()
    cold, ours, ds_cold, ds_ours = [], [], [], []
    for k in range(args.runs):
        cold.append(prep_run("cold", k, "local"))
        ds_cold.append(bench_datasets(docs, tok_dir))
    with ray_head() as address:
        prep_run("first-job", 0, address)
        for k in range(args.runs):
            ours.append(prep_run("ours", k, address))
            ds_ours.append(bench_datasets(docs, tok_dir))
    cold_tps, _, cold_runs = median(cold)
    ours_tps, ours_manifest, ours_runs = median(ours)
    ds_runs = ds_ours
    ds_tps, ds_tokens = statistics.median(r[0] for r in ds_ours), ds_ours[0][1]
    ds_cold_tps = statistics.median(r[0] for r in ds_cold)
    raw_tps = statistics.median(
        bench_encode_batch(docs, work / "cold0" / "prep" / "tokenizer")[0] for _ in range(args.runs)
    )

    memory: dict[str, float] = {}
    if not args.skip_memory:
        for copies in (1, 10):
            src = work / f"copies{copies}"
            src.mkdir()
            for f in sorted((package_dir("shksprdata") / "texts").glob("*_gut.txt")):
                text = f.read_text(encoding="utf-8")
                paragraphs = [p for p in text.split("\n\n") if p.strip()]
                with (src / f.name).open("w", encoding="utf-8") as out:
                    for c in range(copies):
                        out.write("\n\n".join(f"[{c}] {p}" for p in paragraphs) + "\n\n")
            cfg = {**base, "run_dir": str(work / f"mem{copies}")}
            cfg["data"] = {**base["data"], "sources": [{"path": str(src / "*.txt"), "split_on": "paragraph"}]}
            m, _, peak = run_prep(cfg, work, f"mem{copies}", sample_memory=True)
            memory[f"{copies}x_peak_rss_mb"] = round(peak[0], 1)
            memory[f"{copies}x_peak_pss_mb"] = round(peak[1], 1)
            memory[f"{copies}x_tokens"] = m["tokens"]
    result = {
        "benchmark": "prep",
        "tokens": ours_manifest["tokens"],
        "documents": ours_manifest["documents_read"],
        "ours_tokens_per_s": ours_tps,
        "ours_runs_tokens_per_s": ours_runs,
        "ours_phase_seconds": ours_manifest["phase_seconds"],
        "cold_start_tokens_per_s": cold_tps,
        "cold_start_runs_tokens_per_s": cold_runs,
        "tokenizer_engine": ours_manifest["tokenizer_engine"],
        "datasets_map_tokens_per_s": round(ds_tps, 1),
        "datasets_runs_tokens_per_s": [round(r[0], 1) for r in ds_runs],
        "encode_batch_one_process_tokens_per_s": round(raw_tps, 1),
        "baseline_tokens": ds_tokens,
        "ratio": round(ours_tps / ds_tps, 3),
        "target": 1.0,
        "datasets_map_beside_no_ray_tokens_per_s": round(ds_cold_tps, 1),
        "ratio_cold_start": round(cold_tps / ds_cold_tps, 3),
        "ratio_vs_encode_batch": round(ours_tps / raw_tps, 3),
        **memory,
    }
    if memory:
        result["memory_ratio_10x_over_1x"] = round(memory["10x_peak_rss_mb"] / memory["1x_peak_rss_mb"], 3)
        result["memory_ratio_pss"] = round(memory["10x_peak_pss_mb"] / memory["1x_peak_pss_mb"], 3)
        result["memory_target"] = 1.5
    print(json.dumps(result))


if __name__ == "__main__":
    main()
