"""prep stage (Ray Data): sources -> clean -> vocabulary -> tokenize -> dedup -> pack -> shards + manifest.

Parallel work runs in Ray Data: one task per bin of files reads, cleans and tokenizes, then a
corpus-wide sort by content hash makes exact duplicates adjacent and the output independent of
source order. The driver consumes the ordered token stream, drops adjacent duplicates, counts every
drop by reason and packs blocks into shards.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rayllm.config import DataConfig, RunConfig
from rayllm.errors import DataError
from rayllm.prep.clean import MINHASH_SCHEME, clean_batch, hash_fraction
from rayllm.prep.pack import ExamplePacker, Packer
from rayllm.prep.sources import ROW_SCHEMA, file_items, read_file
from rayllm.prep.tokenizer import (
    Encoder,
    FastSpec,
    fast_spec,
    load_tokenizer,
    tokenizer_hash,
    train_tokenizer,
)
from rayllm.rundir import INPUT_IDS, LOSS_MASK, POSITION_IDS, SPLITS, PackedData, RunDir
from rayllm.runtime import apply_env, ray_session

# Share of documents that a fast engine's ids are checked on against the tokenizers library.
CHECK_FRACTION = 1 / 32
# Input bytes per read -> clean -> tokenize task.
BIN_BYTES = 4 << 20
# Up to this many bins the corpus-wide sort uses Ray's classic pull-based shuffle: its fixed cost
# is ~0.1 s where Ray 2.60's default (shuffle v2) costs ~3 s, but its tasks grow as bins squared.
SMALL_SORT_BINS = 256


def tokenize_batch(
    batch: pa.Table, tok_json: str, fast: FastSpec | None, eos_id: int, chunk: int, minhash_perm: int
) -> pa.Table:
    """Encode kept documents with EOS appended (text is dropped: the driver needs only ids).

    ``chunk`` documents at a time: ids turn into uint16/int32 arrays before the next chunk, so a
    task's memory stays near its input size, not that of Python lists of ints.
    """
    reasons = batch.column("reason").to_pylist()
    texts = batch.column("text").to_pylist()
    copies = batch.column("copies").to_pylist()
    hashes = batch.column("hash").to_pylist()
    todo = [i for i, r in enumerate(reasons) if not r and copies[i]]
    encoder = Encoder(tok_json, fast)  # ~15 ms: tiktoken's tables from the ranks
    # uint16 where the vocabulary fits (GPT-2's does): half the bytes through the sort and the store.
    dtype = np.uint16 if encoder.max_id < 1 << 16 else np.int32
    lengths = np.zeros(len(texts), dtype=np.int64)
    pieces = []
    eos = np.array([eos_id], dtype=dtype)
    for start in range(0, len(todo), chunk):
        rows = todo[start : start + chunk]
        docs = [texts[i] for i in rows]
        encoded = encoder.encode_batch(docs)
        if encoder.engine != "tokenizers":
            _check_sample(encoder, docs, encoded, [hashes[i] for i in rows])
        for i, ids in zip(rows, encoded, strict=True):
            pieces += [np.asarray(ids, dtype=dtype), eos]
            lengths[i] = len(ids) + 1
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    cols: dict[str, Any] = {
        "ids": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat)),
        "hash": batch.column("hash"),
        "split": batch.column("split"),
        "reason": batch.column("reason"),
        "copies": batch.column("copies"),
        "note": batch.column("note"),
    }
    if minhash_perm:
        from rayllm.prep.clean import minhash_signatures

        wanted = set(todo)
        sigs = minhash_signatures([t if i in wanted else "" for i, t in enumerate(texts)], minhash_perm)
        cols["minhash"] = pa.array([s.hashvalues.astype(np.uint64).tobytes() for s in sigs], type=pa.binary())
    return pa.table(cols)


def tokenize_examples(batch: pa.Table, tok_dir: str, block_len: int) -> pa.Table:
    """Fine-tuning examples (chat messages as JSON) -> token ids and loss masks through the model's
    chat template; an example longer than a block is dropped and counted (``longer_than_block``)."""
    from rayllm.model import chat
    from rayllm.prep.tokenizer import hf_tokenizer

    tokenizer = hf_tokenizer(tok_dir)
    reasons = batch.column("reason").to_pylist()
    ids: list[list[int]] = []
    masks: list[list[int]] = []
    for i, (text, copies) in enumerate(
        zip(batch.column("text").to_pylist(), batch.column("copies").to_pylist(), strict=True)
    ):
        if reasons[i] or not copies:
            ids.append([])
            masks.append([])
            continue
        try:
            tokens, mask = chat.prompt_and_answer(tokenizer, json.loads(text))
        except ValueError as e:
            raise DataError(f"data.tokenizer.path={tok_dir}: {e}") from None
        if len(tokens) > block_len:
            reasons[i], tokens, mask = "longer_than_block", [], []
        ids.append(tokens)
        masks.append(mask)
    return pa.table(
        {
            "ids": pa.array(ids, type=pa.large_list(pa.int32())),
            "mask": pa.array(masks, type=pa.large_list(pa.int8())),
            "hash": batch.column("hash"),
            "split": batch.column("split"),
            "reason": pa.array(reasons, type=pa.string()),
            "copies": batch.column("copies"),
            "note": batch.column("note"),
        }
    )


def _check_sample(encoder: Encoder, docs: list[str], encoded: list[list[int]], hashes: list[str]) -> None:
    """Compare a deterministic sample (by document hash) with the tokenizers library: a fast
    engine that ever disagrees stops the run rather than write different ids silently."""
    pick = [k for k, h in enumerate(hashes) if hash_fraction(h, 2) < CHECK_FRACTION]
    if not pick:
        return
    want = encoder.reference([docs[k] for k in pick])
    for k, ids in zip(pick, want, strict=True):
        if encoded[k] != ids:
            raise DataError(
                f"data.tokenizer.engine: {encoder.engine} and the tokenizers library give different ids "
                f"for the document starting {docs[k][:60]!r}; set data.tokenizer.engine=tokenizers"
            )


def read_clean_bins(batch: pa.Table, cfg: DataConfig) -> pa.Table:
    """``map_batches`` body: read and clean the files of a bin, in one task. A file at a time
    becomes a compact Arrow table, so per-document Python objects never pile up for a whole bin."""
    tables = [
        clean_batch(
            pa.Table.from_pylist(list(read_file(item, cfg.on_error, cfg.invalid_utf8)), schema=ROW_SCHEMA),
            cfg.clean,
            cfg.val_fraction,
        )
        for files in batch.column("files").to_pylist()
        for item in json.loads(files)
    ]
    return pa.concat_tables(tables)


def file_bins(items: list[dict[str, Any]], n: int) -> list[list[dict[str, Any]]]:
    """Split the files into ``n`` bins of about equal bytes (largest first into the lightest bin):
    a bin is one task, so a corpus of one big file and many small ones still keeps every CPU busy."""
    bins: list[list[dict[str, Any]]] = [[] for _ in range(min(n, len(items)))]
    heap = [(0, 0, k) for k in range(len(bins))]  # (bytes, files, bin): empty files spread too
    for item in sorted(items, key=lambda it: (-it["bytes"], it["path"])):
        size, count, k = heapq.heappop(heap)
        bins[k].append(item)
        heapq.heappush(heap, (size + item["bytes"], count + 1, k))
    return bins


def _bins(items: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Few, large tasks: on small clusters per-task overhead, not bytes, dominates. Two bins per CPU
    so that a slow one does not hold the stage, and ~BIN_BYTES of input per bin beyond that, which
    bounds a task's memory whatever the number of files (a single file is still read whole)."""
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return file_bins(items, max(2 * cpus, -(-sum(it["bytes"] for it in items) // BIN_BYTES)))


def _read_clean(cfg: DataConfig, bins: list[list[dict[str, Any]]]) -> Any:
    import ray.data

    rows = [{"files": json.dumps(b)} for b in bins]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    return ds.map_batches(read_clean_bins, batch_format="pyarrow", batch_size=1, fn_kwargs={"cfg": cfg})


def _smallest_hashes(batch: pa.Table, k: int) -> pa.Table:
    kept = batch.filter(pc.equal(batch.column("reason"), ""))
    return kept.sort_by("hash").slice(0, k).select(["hash", "text"])


@dataclass(frozen=True)
class Vocabulary:
    """The run's tokenizer folder and what the stage needs from it."""

    dir: Path
    json: str
    eos_id: int
    pad_id: int
    size: int
    fast: FastSpec | None


def _describe(hf: Any, tok_dir: Path, engine: str) -> Vocabulary:
    tok_json = (tok_dir / "tokenizer.json").read_text(encoding="utf-8")
    fast = fast_spec(tok_json, engine)
    return Vocabulary(tok_dir, tok_json, int(hf.eos_token_id), int(hf.pad_token_id), len(hf), fast)


def _train_vocabulary(cfg: DataConfig, bins: list[list[dict[str, Any]]], tok_dir: Path) -> Any:
    """Train on the ``sample_docs`` documents of smallest hash.

    The smallest hashes are a uniform, deterministic sample that no source order can change; each
    block sends only its own k smallest to the driver, which keeps a running k: bounded memory.
    """
    k = cfg.tokenizer.sample_docs
    sample = _read_clean(cfg, bins).map_batches(
        _smallest_hashes, batch_format="pyarrow", batch_size=None, fn_kwargs={"k": k}
    )
    best: list[tuple[str, str]] = []
    for b in sample.iter_batches(batch_format="pyarrow", batch_size=None):
        pairs = zip(b.column("hash").to_pylist(), b.column("text").to_pylist(), strict=True)
        best = heapq.nsmallest(k, [*best, *pairs])
    if not best:
        raise DataError("no document survived reading and cleaning; nothing to build a vocabulary from")
    return train_tokenizer((text for _, text in best), cfg.tokenizer, tok_dir)


def _token_stream(dcfg: DataConfig, bins: list[list[dict[str, Any]]], vocab: Vocabulary) -> Any:
    """read -> clean -> tokenize in one task per bin of files, then a sort by content hash: it makes
    exact duplicates adjacent (the driver drops them), gives a shuffled deterministic document
    order, and makes the output independent of source order and sharding."""
    if dcfg.task == "sft":
        fn: Any = tokenize_examples
        fn_kwargs: dict[str, Any] = {"tok_dir": str(vocab.dir), "block_len": dcfg.seq_len + 1}
    else:
        fn, fn_kwargs = (
            tokenize_batch,
            {
                "tok_json": vocab.json,
                "fast": vocab.fast,
                "eos_id": vocab.eos_id,
                "chunk": dcfg.tokenize_batch,
                "minhash_perm": 128 if dcfg.clean.dedup == "minhash" else 0,
            },
        )
    return (
        _read_clean(dcfg, bins)
        .map_batches(fn, batch_format="pyarrow", batch_size=None, fn_kwargs=fn_kwargs)
        .sort(["hash", "copies"], descending=[False, True])
    )


@contextlib.contextmanager
def _prep_data_context(n_bins: int) -> Iterator[None]:
    """Ordered output, and for up to SMALL_SORT_BINS bins the pull-based sort; the caller's
    Ray Data context (a demo goes on to train in this process) is restored afterwards."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.shuffle_strategy
    ctx.execution_options.preserve_order = True
    if n_bins <= SMALL_SORT_BINS:
        ctx.shuffle_strategy = ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.shuffle_strategy = saved


def run(cfg: RunConfig) -> dict[str, Any]:
    """Run the prep stage; writes shards, ``manifest.json`` and ``summary.json`` into ``<run_dir>/prep``."""
    t0 = time.time()
    dcfg = cfg.data
    rd = RunDir.of(cfg)
    out = PackedData(rd.start_stage(cfg, "prep"))
    out.clear()
    items = file_items(dcfg)  # listed once, before Ray starts: missing paths fail fast
    tok_dir = out.tokenizer_dir
    engine = dcfg.tokenizer.engine
    if dcfg.tokenizer.path and not os.path.isdir(dcfg.tokenizer.path):
        raise DataError(f"data.tokenizer.path: {dcfg.tokenizer.path} is not a tokenizer folder")
    phases: dict[str, float] = {}
    apply_env(cfg.cluster)  # before the loading thread imports transformers, which reads it
    with ThreadPoolExecutor(max_workers=1) as pool:
        # A given tokenizer folder loads while Ray starts: importing transformers alone takes ~0.6 s.
        loading = None
        if dcfg.tokenizer.path:
            path = dcfg.tokenizer.path
            loading = pool.submit(
                lambda: _describe(load_tokenizer(path, dcfg.tokenizer, tok_dir), tok_dir, engine)
            )
        with ray_session(cfg.cluster):
            phases["start_ray"] = time.time() - t0
            bins = _bins(items)
            with _prep_data_context(len(bins)):
                if loading is not None:
                    vocab = loading.result()
                else:
                    vocab = _describe(_train_vocabulary(dcfg, bins, tok_dir), tok_dir, engine)
                phases["vocabulary"] = time.time() - t0 - phases["start_ray"]
                stats = _pack_stream(_token_stream(dcfg, bins, vocab), dcfg, out, vocab)
                seconds = time.time() - t0  # shards written; stopping a Ray this stage started is not work
    phases["read_clean_tokenize_sort_pack"] = seconds - sum(phases.values())
    manifest = {
        "files": len(items),
        **stats,
        "vocab_size": vocab.size,
        "eos_id": vocab.eos_id,
        "pad_id": vocab.pad_id,
        "seq_len": dcfg.seq_len,
        "block_len": dcfg.seq_len + 1,
        "columns": _columns(dcfg),
        "task": dcfg.task,
        "tokenizer_hash": tokenizer_hash(tok_dir),
        "tokenizer_engine": "tokenizers" if vocab.fast is None else "tiktoken",
        "seconds": round(seconds, 2),
        "phase_seconds": {k: round(v, 2) for k, v in phases.items()},
        "tokens_per_second": round(stats["tokens"] / max(seconds, 1e-9), 1),
    }
    out.write_manifest(manifest)
    metrics = rd.metrics("prep")
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
        "data_dir": str(out.dir),
    }
    rd.write_summary("prep", summary)
    return summary


def _columns(dcfg: DataConfig) -> list[str]:
    if dcfg.task == "sft":
        return [INPUT_IDS, LOSS_MASK, POSITION_IDS]
    return [INPUT_IDS, POSITION_IDS] if dcfg.keep_doc_boundaries else [INPUT_IDS]


def _pack_stream(tokens: Any, dcfg: DataConfig, out: PackedData, vocab: Vocabulary) -> dict[str, Any]:
    block_len = dcfg.seq_len + 1
    eos = vocab.eos_id if dcfg.keep_doc_boundaries else None
    sft = dcfg.task == "sft"
    packers: dict[str, Any] = {
        s: ExamplePacker(out.writer(s, block_len), dcfg.shard_rows, vocab.pad_id)
        if sft
        else Packer(out.writer(s, block_len), dcfg.shard_rows, eos)
        for s in SPLITS
    }
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
            if idx and sft:
                masks = batch.column("mask")
                for i in idx:
                    packers[split].add(ids[i].values.to_numpy(), masks[i].values.to_numpy())
            elif idx:
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
        **({"padding_tokens": {s: p.padding for s, p in packers.items()}} if sft else {}),
    }


def _near_duplicate(lsh: Any, key: str, sig: bytes) -> str:
    from datasketch import MinHash

    m = MinHash(num_perm=128, hashvalues=np.frombuffer(sig, dtype=np.uint64), scheme=MINHASH_SCHEME)
    if lsh.query(m):
        return "near_duplicate"
    lsh.insert(key, m)
    return ""
