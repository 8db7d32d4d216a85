"""prep throughput and memory: `rayllm prep` against `datasets.map` and a one-process tokenizer loop.

Corpora: Shakespeare (paragraphs), the King James Bible (jsonl verses) and the CPython standard
library (a document per file), tokenized with the byte-exact GPT-2 BPE. Baselines run in the same
process on the same documents. Memory: peak RSS of the driver and every Ray process while prep runs
on the Shakespeare corpus replicated 1x and 10x (each copy made unique so dedup cannot shrink it).
Ends with one line of JSON: ``ratio`` = ours / datasets (target 1.0), ``memory_ratio`` = 10x / 1x.

    .venv/bin/python bench/bench_prep.py [--skip-memory]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
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


def run_prep(config: dict, work: Path, name: str, sample_memory: bool = False) -> tuple[dict, float, float]:
    """`rayllm prep` in its own process (own Ray start and stop); returns manifest, wall s, peak MB."""
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
    peak = [0.0]
    if sample_memory:
        threading.Thread(target=_sample_rss, args=(proc, peak), daemon=True).start()
    _, err = proc.communicate(timeout=3600)
    wall = time.time() - t0
    if proc.returncode:
        raise SystemExit(f"rayllm prep failed ({proc.returncode}):\n{err[-3000:]}")
    manifest = json.loads((Path(config["run_dir"]) / "prep" / "manifest.json").read_text())
    return manifest, wall, peak[0]


def _sample_rss(proc: subprocess.Popen, peak: list[float]) -> None:
    """Peak summed RSS of the prep process and every process it started (Ray's raylet, workers)."""
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
            total = sum(p.memory_info().rss for p in procs if p.is_running())
            peak[0] = max(peak[0], total / 2**20)
        except psutil.Error:
            pass
        time.sleep(0.5)


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
    ours_manifest, wall, _ = run_prep({**base, "run_dir": str(work / "ours")}, work, "ours")
    print(
        f"rayllm prep: {ours_manifest['tokens']:,} tokens in {ours_manifest['seconds']} s "
        f"({wall:.1f} s with Ray start-up)",
        file=sys.stderr,
    )
    docs = documents()
    ds_tps, ds_tokens = bench_datasets(docs, tok_dir)
    raw_tps, _ = bench_encode_batch(docs, work / "ours" / "prep" / "tokenizer")

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
            memory[f"{copies}x_peak_rss_mb"] = round(peak, 1)
            memory[f"{copies}x_tokens"] = m["tokens"]
    ours_tps = ours_manifest["tokens_per_second"]
    result = {
        "benchmark": "prep",
        "tokens": ours_manifest["tokens"],
        "documents": ours_manifest["documents_read"],
        "ours_tokens_per_s": ours_tps,
        "ours_wall_tokens_per_s_incl_ray_start": round(ours_manifest["tokens"] / wall, 1),
        "datasets_map_tokens_per_s": round(ds_tps, 1),
        "encode_batch_one_process_tokens_per_s": round(raw_tps, 1),
        "baseline_tokens": ds_tokens,
        "ratio": round(ours_tps / ds_tps, 3),
        "target": 1.0,
        "ratio_vs_encode_batch": round(ours_tps / raw_tps, 3),
        **memory,
    }
    if memory:
        result["memory_ratio_10x_over_1x"] = round(memory["10x_peak_rss_mb"] / memory["1x_peak_rss_mb"], 3)
        result["memory_target"] = 1.5
    print(json.dumps(result))


if __name__ == "__main__":
    main()
