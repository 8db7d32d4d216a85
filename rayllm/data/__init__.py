"""prep stage (Ray Data): sources -> clean -> dedup -> vocabulary -> tokenize -> pack -> parquet + manifest.

Parallel work (reading, cleaning, the corpus-wide sort that makes exact duplicates adjacent and the
output independent of source order, tokenization) runs in Ray Data. The driver consumes the ordered
token stream, drops adjacent duplicates, counts every drop by reason and packs blocks into shards.
"""

from __future__ import annotations

import heapq
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from rayllm.config import DataConfig, RunConfig
from rayllm.data.clean import MINHASH_SCHEME, clean_batch
from rayllm.data.pack import Packer, ShardWriter
from rayllm.data.sources import file_items, read_file
from rayllm.data.tokenizer import get_tokenizer, load_tokenizer, tokenizer_hash, train_tokenizer
from rayllm.errors import DataError
from rayllm.runtime import MetricsWriter, ray_session, save_stage_config, write_summary

MANIFEST = "manifest.json"
SPLITS = ("train", "val")


def tokenize_batch(batch: pa.Table, tok_json: str, eos_id: int, minhash_perm: int) -> pa.Table:
    """Encode kept documents with EOS appended (text is dropped: the driver needs only ids)."""
    reasons = batch.column("reason").to_pylist()
    texts = batch.column("text").to_pylist()
    copies = batch.column("copies").to_pylist()
    todo = [i for i, r in enumerate(reasons) if not r and copies[i]]
    tok = get_tokenizer(tok_json)
    encoded = tok.encode_batch_fast([texts[i] for i in todo], add_special_tokens=False) if todo else []
    lengths = np.zeros(len(texts), dtype=np.int64)
    pieces = []
    eos = np.array([eos_id], dtype=np.int32)
    for i, enc in zip(todo, encoded, strict=True):
        pieces += [np.asarray(enc.ids, dtype=np.int32), eos]
        lengths[i] = len(enc.ids) + 1
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    cols: dict[str, Any] = {
        "ids": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa.int32())),
        "hash": batch.column("hash"),
        "split": batch.column("split"),
        "reason": batch.column("reason"),
        "copies": batch.column("copies"),
        "note": batch.column("note"),
    }
    if minhash_perm:
        from rayllm.data.clean import minhash_signatures

        wanted = set(todo)
        sigs = minhash_signatures([t if i in wanted else "" for i, t in enumerate(texts)], minhash_perm)
        cols["minhash"] = pa.array([s.hashvalues.astype(np.uint64).tobytes() for s in sigs], type=pa.binary())
    return pa.table(cols)


def _read_clean(cfg: DataConfig, items: list[dict[str, Any]]) -> Any:
    import ray.data

    # Few, large blocks: every block becomes a task in each stage and in the sort's shuffle, and
    # on small clusters per-task overhead, not bytes, dominates. ~32 MB of input text per block.
    blocks = int(os.environ.get("RAYLLM_PREP_BLOCKS", "0")) or max(
        2 * _cluster_cpus(), min(256, sum(it["bytes"] for it in items) // (32 << 20))
    )
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), blocks)))
    ds = ds.flat_map(read_file, fn_kwargs={"on_error": cfg.on_error, "invalid_utf8": cfg.invalid_utf8})
    return ds.map_batches(
        clean_batch,
        batch_format="pandas",
        batch_size=1024,
        fn_kwargs={"cfg": cfg.clean, "val_fraction": cfg.val_fraction},
    )


def _cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _smallest_hashes(batch: pd.DataFrame, k: int) -> pd.DataFrame:
    kept = batch[batch["reason"] == ""]
    return kept.sort_values("hash").head(k)[["hash", "text"]]


def _vocabulary(cfg: DataConfig, items: list[dict[str, Any]], out: Path) -> Path:
    """Load the configured tokenizer, or train one on the ``sample_docs`` documents of smallest hash.

    The smallest hashes are a uniform, deterministic sample that no source order can change; each
    block sends only its own k smallest to the driver, which keeps a running k: bounded memory.
    """
    tok_dir = out / "tokenizer"
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    if cfg.tokenizer.path:
        return load_tokenizer(cfg.tokenizer.path, cfg.tokenizer, tok_dir)
    k = cfg.tokenizer.sample_docs
    sample = _read_clean(cfg, items).map_batches(
        _smallest_hashes, batch_format="pandas", batch_size=None, fn_kwargs={"k": k}
    )
    best: list[tuple[str, str]] = []
    for b in sample.iter_batches(batch_format="pandas", batch_size=None):
        best = heapq.nsmallest(k, [*best, *zip(b["hash"], b["text"], strict=True)])
    if not best:
        raise DataError("no document survived reading and cleaning; nothing to build a vocabulary from")
    return train_tokenizer((text for _, text in best), cfg.tokenizer, tok_dir)


def prep(cfg: RunConfig) -> dict[str, Any]:
    """Run the prep stage; writes shards, ``manifest.json`` and ``summary.json`` into ``<run_dir>/prep``."""
    import ray.data

    t0 = time.time()
    dcfg = cfg.data
    out = save_stage_config(cfg, "prep")
    for stale in (*SPLITS, MANIFEST, "summary.json"):
        p = out / stale
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    items = file_items(dcfg)  # listed once, before Ray starts: missing paths fail fast
    with ray_session(cfg.cluster):
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        tok_dir = _vocabulary(dcfg, items, out)
        phases = {"vocabulary": time.time() - t0}
        from transformers import AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(tok_dir)
        eos_id = int(hf_tok.eos_token_id)
        tok_json = (tok_dir / "tokenizer.json").read_text(encoding="utf-8")
        perm = 128 if dcfg.clean.dedup == "minhash" else 0
        # Sorting by content hash makes exact duplicates adjacent (the driver drops them), gives a
        # shuffled deterministic document order, and makes the output independent of source order.
        # Text sorts several times faster than token-id lists, so tokenization comes after it.
        docs = _read_clean(dcfg, items).sort(["hash", "copies"], descending=[False, True])
        tokens = docs.map_batches(
            tokenize_batch,
            batch_format="pyarrow",
            batch_size=dcfg.tokenize_batch,
            fn_kwargs={"tok_json": tok_json, "eos_id": eos_id, "minhash_perm": perm},
        )
        stats = _pack_stream(tokens, dcfg, out, eos_id)
    seconds = time.time() - t0
    phases["read_clean_sort_tokenize_pack"] = seconds - sum(phases.values())
    manifest = {
        "files": len(items),
        **stats,
        "vocab_size": len(hf_tok),
        "eos_id": eos_id,
        "pad_id": int(hf_tok.pad_token_id),
        "seq_len": dcfg.seq_len,
        "block_len": dcfg.seq_len + 1,
        "tokenizer": "tokenizer",
        "tokenizer_hash": tokenizer_hash(tok_dir),
        "seconds": round(seconds, 2),
        "phase_seconds": {k: round(v, 2) for k, v in phases.items()},
        "tokens_per_second": round(stats["tokens"] / max(seconds, 1e-9), 1),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
    metrics = MetricsWriter(out / "metrics.jsonl")
    metrics.write(**{k: v for k, v in manifest.items() if k != "shards"})
    metrics.close()
    summary = {
        "documents_in": stats["documents_read"],
        "documents_kept": stats["documents_kept"],
        "dropped": stats["dropped"],
        "tokens": stats["tokens"],
        "blocks": stats["blocks"]["train"] + stats["blocks"]["val"],
        "train_blocks": stats["blocks"]["train"],
        "val_blocks": stats["blocks"]["val"],
        "vocab_size": manifest["vocab_size"],
        "seconds": manifest["seconds"],
        "tokens_per_second": manifest["tokens_per_second"],
        "data_dir": str(out),
    }
    write_summary(out, summary)
    return summary


def _pack_stream(tokens: Any, dcfg: DataConfig, out: Path, eos_id: int) -> dict[str, Any]:
    block_len = dcfg.seq_len + 1
    eos = eos_id if dcfg.keep_doc_boundaries else None
    packers = {s: Packer(ShardWriter(out, s, block_len, dcfg.shard_rows, eos)) for s in SPLITS}
    dropped: Counter[str] = Counter()
    notes: Counter[str] = Counter()
    read = kept = 0
    prev_hash = None
    lsh = None
    if dcfg.clean.dedup == "minhash":
        from datasketch import MinHashLSH

        lsh = MinHashLSH(threshold=dcfg.clean.minhash_threshold, num_perm=128)
    for batch in tokens.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=2):
        reasons = batch.column("reason").to_pylist()
        hashes = batch.column("hash").to_pylist()
        splits = batch.column("split").to_pylist()
        copies = batch.column("copies").to_pylist()
        sigs = batch.column("minhash").to_pylist() if lsh is not None else None
        take: dict[str, list[int]] = {s: [] for s in SPLITS}
        for i, reason in enumerate(reasons):
            if dcfg.max_docs is not None and kept >= dcfg.max_docs:
                break
            read += 1
            if not reason and not copies[i]:
                reason = "downsampled"
            elif not reason and hashes[i] == prev_hash:
                reason = "duplicate"
            elif not reason and lsh is not None:
                reason = _near_duplicate(lsh, hashes[i], sigs[i])
            if reason:
                dropped[reason] += 1
                continue
            prev_hash = hashes[i]
            kept += 1
            take[splits[i]].extend([i] * copies[i])
        notes.update(n for n in batch.column("note").to_pylist() if n)
        ids = batch.column("ids")
        for split, idx in take.items():
            if idx:
                flat = pc.list_flatten(ids.take(pa.array(idx)))
                packers[split].add(flat.to_numpy())
        if dcfg.max_docs is not None and kept >= dcfg.max_docs:
            break
    tails = {s: p.finish() for s, p in packers.items()}
    blocks = {s: p.blocks for s, p in packers.items()}
    if read == 0 or kept == 0:
        raise DataError(f"no documents kept out of {read} read (dropped: {dict(dropped) or 'none'})")
    if blocks["train"] == 0:
        raise DataError(
            f"the train split has no full block of data.seq_len+1={block_len} tokens; "
            "lower data.seq_len or add data"
        )
    if dcfg.val_fraction > 0 and blocks["val"] == 0:
        raise DataError(
            f"the validation split got {packers['val'].tokens_in} tokens, less than one block of "
            f"{block_len}; raise data.val_fraction or add data"
        )
    return {
        "documents_read": read,
        "documents_kept": kept,
        "dropped": dict(sorted(dropped.items())),
        "notes": dict(notes),
        "tokens": sum(p.tokens_in for p in packers.values()),
        "tokens_by_split": {s: p.tokens_in for s, p in packers.items()},
        "tokens_dropped_tail": tails,
        "blocks": blocks,
        "shards": packers["train"].writer.shards + packers["val"].writer.shards,
    }


def _near_duplicate(lsh: Any, key: str, sig: bytes) -> str:
    from datasketch import MinHash

    m = MinHash(num_perm=128, hashvalues=np.frombuffer(sig, dtype=np.uint64), scheme=MINHASH_SCHEME)
    if lsh.query(m):
        return "near_duplicate"
    lsh.insert(key, m)
    return ""


def load_manifest(data_dir: str | Path) -> dict[str, Any]:
    p = Path(data_dir) / MANIFEST
    if not p.is_file():
        raise DataError(f"{p} not found: run `rayllm prep` first or set train.data_dir to a prep folder")
    return json.loads(p.read_text(encoding="utf-8"))
