"""prep stage (Ray Data): sources -> clean -> vocabulary -> tokenize -> buckets -> shards + manifest.

The driver plans and accounts: it lists the files, trains or loads the vocabulary on a bounded
sample, fixes the bucket count, and writes the manifest from the buckets' markers. Everything else
is Ray Data work: one task per bin of files reads, cleans and tokenizes, rows go to their bucket
(the hash of the cleaned text modulo the bucket count), and one task per bucket sorts, deduplicates,
packs and writes it (``rayllm.prep.buckets``). No process ever holds the corpus, and the shards are
the same bytes whatever the parallelism, the number of nodes or the order of the sources.

A prep that is killed and started again with the same config and input keeps its vocabulary and
every bucket whose marker checks out, and redoes the rest; the manifest, written last and
atomically, is what train reads.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rayllm.config import DataConfig, RunConfig
from rayllm.errors import DataError
from rayllm.prep.buckets import (
    BUCKETS,
    COMPLETE,
    NEAR,
    BucketJob,
    band_rows,
    bucket_of,
    finished,
    near_duplicate_keys,
    pack_bucket,
    pack_tails,
    write_near_keys,
)
from rayllm.prep.clean import clean_batch, hash_fraction, lsh_bands
from rayllm.prep.sources import ROW_SCHEMA, file_items, read_file
from rayllm.prep.tokenizer import (
    Encoder,
    FastSpec,
    fast_spec,
    hf_tokenizer,
    load_tokenizer,
    tokenizer_hash,
    train_tokenizer,
)
from rayllm.rundir import INPUT_IDS, LOSS_MASK, POSITION_IDS, SPLITS, PackedData, RunDir, write_json
from rayllm.runtime import apply_env, ray_session

# Share of documents that a fast engine's ids are checked on against the tokenizers library.
CHECK_FRACTION = 1 / 32
# Input bytes per read -> clean -> tokenize task, and documents cleaned (and handed on) at a time.
BIN_BYTES = 4 << 20
READ_ROWS = 16384
# Up to this many bins grouping by bucket uses Ray's classic pull-based sort: its fixed cost is
# ~0.1 s where Ray 2.60's default (shuffle v2) costs ~3 s, but its tasks grow as bins squared.
SMALL_SORT_BINS = 256
# data.buckets by default: one bucket per this much weighted input (input bytes times the source's
# weight, about the bytes a bucket's task packs and writes), at least MIN_BUCKETS: many more buckets
# than CPUs keeps the packing balanced, few enough that a small corpus is not a heap of tiny files.
BUCKET_BYTES = 16 << 20
MIN_BUCKETS = 8
# <prep>/plan.json: the fingerprint of config + input, the bucket count and the vocabulary's hash.
PLAN = "plan.json"


def tokenize_batch(
    batch: pa.Table, tok_json: str, fast: FastSpec | None, eos_id: int, chunk: int
) -> pa.Table:
    """Encode kept documents with EOS appended (text is dropped: packing needs only ids).

    ``chunk`` documents at a time: ids turn into uint16/int32 arrays before the next chunk, so a
    task's memory stays near its input size, not that of Python lists of ints. A document its
    source's weight leaves out (no copies) is encoded for its ``length`` only: the mixing report
    weighs every deduplicated document.
    """
    reasons = batch.column("reason").to_pylist()
    texts = batch.column("text").to_pylist()
    copies = batch.column("copies").to_pylist()
    hashes = batch.column("hash").to_pylist()
    todo = [i for i, r in enumerate(reasons) if not r]
    encoder = Encoder(tok_json, fast)  # ~15 ms: tiktoken's tables from the ranks
    # uint16 where the vocabulary fits (GPT-2's does): half the bytes through the sort and the store.
    dtype = np.uint16 if encoder.max_id < 1 << 16 else np.int32
    lengths = np.zeros(len(texts), dtype=np.int64)
    stored = np.zeros(len(texts), dtype=np.int64)
    pieces = []
    eos = np.array([eos_id], dtype=dtype)
    for start in range(0, len(todo), chunk):
        rows = todo[start : start + chunk]
        docs = [texts[i] for i in rows]
        encoded = encoder.encode_batch(docs)
        if encoder.engine != "tokenizers":
            _check_sample(encoder, docs, encoded, [hashes[i] for i in rows])
        for i, ids in zip(rows, encoded, strict=True):
            lengths[i] = len(ids) + 1
            if copies[i]:
                pieces += [np.asarray(ids, dtype=dtype), eos]
                stored[i] = lengths[i]
    offsets = np.concatenate([[0], np.cumsum(stored)]).astype(np.int64)
    flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    ids = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat))
    return pa.table({"ids": ids, "length": pa.array(lengths, pa.int64()), **_passed_on(batch)})


def _passed_on(batch: pa.Table) -> dict[str, Any]:
    """The columns a bucket needs besides the ids (the text stays behind)."""
    return {
        name: batch.column(name) for name in ("hash", "split", "reason", "copies", "note", "source", "bucket")
    }


def tokenize_examples(batch: pa.Table, tok_dir: str, block_len: int) -> pa.Table:
    """Fine-tuning examples (chat messages as JSON) -> token ids and loss masks through the model's
    chat template; an example longer than a block is dropped and counted (``longer_than_block``)."""
    from rayllm.model import chat
    from rayllm.prep.tokenizer import hf_tokenizer

    tokenizer = hf_tokenizer(tok_dir)
    reasons = batch.column("reason").to_pylist()
    ids: list[list[int]] = []
    masks: list[list[int]] = []
    lengths: list[int] = []
    for i, (text, copies) in enumerate(
        zip(batch.column("text").to_pylist(), batch.column("copies").to_pylist(), strict=True)
    ):
        tokens: list[int] = []
        mask: list[int] = []
        if not reasons[i]:
            try:
                tokens, mask = chat.prompt_and_answer(tokenizer, json.loads(text))
            except ValueError as e:
                raise DataError(f"data.tokenizer.path={tok_dir}: {e}") from None
            if len(tokens) > block_len:
                reasons[i], tokens, mask = "longer_than_block", [], []
        lengths.append(len(tokens))
        ids.append(tokens if copies else [])
        masks.append(mask if copies else [])
    return pa.table(
        {
            "ids": pa.array(ids, type=pa.large_list(pa.int32())),
            "length": pa.array(lengths, pa.int64()),
            "mask": pa.array(masks, type=pa.large_list(pa.int8())),
            **_passed_on(batch),
            "reason": pa.array(reasons, type=pa.string()),
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


def read_clean_bins(batch: pa.Table, cfg: DataConfig) -> Iterator[pa.Table]:
    """``map_batches`` body: read and clean the files of a bin, in one task, ``READ_ROWS`` documents
    at a time: per-document Python objects never pile up, and a file of any size streams through."""
    for files in batch.column("files").to_pylist():
        for item in json.loads(files):
            rows: list[dict[str, Any]] = []
            for row in read_file(item, cfg.on_error, cfg.invalid_utf8):
                rows.append(row)
                if len(rows) == READ_ROWS:
                    yield clean_batch(
                        pa.Table.from_pylist(rows, schema=ROW_SCHEMA), cfg.clean, cfg.val_fraction
                    )
                    rows = []
            if rows:
                yield clean_batch(pa.Table.from_pylist(rows, schema=ROW_SCHEMA), cfg.clean, cfg.val_fraction)


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


def assign_buckets(batch: pa.Table, buckets: int, todo: np.ndarray, max_key: str | None) -> pa.Table:
    """``map_batches`` body: each row's bucket; rows of buckets a previous run finished are left out
    (before they are tokenized), and with ``data.max_docs`` documents past the cap are counted."""
    bucket = bucket_of(batch.column("hash").to_pylist(), buckets)
    if max_key is not None:
        keys, copies = batch.column("hash").to_pylist(), batch.column("copies").to_pylist()
        reasons = [
            "beyond_max_docs" if not r and copies[i] and keys[i] > max_key else r
            for i, r in enumerate(batch.column("reason").to_pylist())
        ]
        batch = batch.set_column(
            batch.schema.get_field_index("reason"), "reason", pa.array(reasons, pa.string())
        )
    return batch.append_column("bucket", pa.array(bucket)).filter(pa.array(todo[bucket]))


def _buckets(dcfg: DataConfig, bins: list[list[dict[str, Any]]], vocab: Vocabulary, plan: Plan) -> Any:
    """read -> clean -> (unfinished buckets) -> tokenize, in one task per bin of files; then one
    ``pack_bucket`` per bucket. Yields nothing big to the driver: each bucket's marker record."""
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
            },
        )
    tokens = (
        _read_clean(dcfg, bins)
        .map_batches(
            assign_buckets,
            batch_format="pyarrow",
            batch_size=None,
            fn_kwargs={"buckets": plan.buckets, "todo": plan.todo, "max_key": plan.max_key},
        )
        .map_batches(fn, batch_format="pyarrow", batch_size=None, fn_kwargs=fn_kwargs)
    )
    return _grouped(tokens, "bucket", plan.buckets, len(bins), pack_bucket, {"job": plan.job})


def _max_key(dcfg: DataConfig, bins: list[list[dict[str, Any]]]) -> str | None:
    """``data.max_docs``: the largest key among the ``max_docs`` smallest keys of documents that
    would be kept (before near-duplicate removal), or None when there are no more than that. Each
    block sends only its own smallest keys, so the driver holds ``max_docs`` keys at most."""
    k = dcfg.max_docs
    assert k is not None
    sample = _read_clean(dcfg, bins).map_batches(
        _smallest_live_keys, batch_format="pyarrow", batch_size=None, fn_kwargs={"k": k}
    )
    best: list[str] = []
    for b in sample.iter_batches(batch_format="pyarrow", batch_size=None):
        best = heapq.nsmallest(k, {*best, *b.column("hash").to_pylist()})
    return best[-1] if len(best) == k else None


def _smallest_live_keys(batch: pa.Table, k: int) -> pa.Table:
    live = batch.filter(pc.and_(pc.equal(batch.column("reason"), ""), pc.greater(batch.column("copies"), 0)))
    return pa.table({"hash": pc.unique(live.column("hash")).sort()[:k]})


def _mark_near_duplicates(dcfg: DataConfig, bins: list[list[dict[str, Any]]], plan: Plan) -> int:
    """MinHash LSH partitioned by band (``rayllm.prep.buckets``): every bucket's near-duplicate keys
    on disk before packing starts. Returns how many documents were marked."""
    bands, rows = lsh_bands(dcfg.clean.minhash_threshold)
    (Path(plan.job.dir) / NEAR).mkdir(parents=True, exist_ok=True)
    band_table = _read_clean(dcfg, bins).map_batches(
        band_rows,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={"bands": bands, "rows": rows, "parts": plan.buckets},
    )
    keys = _grouped(
        band_table, "part", plan.buckets, len(bins), near_duplicate_keys, {"buckets": plan.buckets}
    )
    marked = _grouped(keys, "bucket", plan.buckets, len(bins), write_near_keys, {"prep_dir": plan.job.dir})
    return sum(sum(b.column("keys").to_pylist()) for b in marked.iter_batches(batch_format="pyarrow"))


def _grouped(
    ds: Any, key: str, n_keys: int, n_bins: int, fn: Callable[..., pa.Table], fn_kwargs: dict[str, Any]
) -> Any:
    """``fn`` over each group of rows sharing ``key`` (an int in [0, n_keys)), in at most ``n_keys``
    partitions, about four per CPU. Ray Data's ``groupby`` gives the sort-based shuffle as many
    partitions as input blocks (one per bin of files: on a small corpus fewer than a cluster's
    CPUs); fixed range boundaries set the count and spare the shuffle its sampling pass. The
    hash-based shuffle (over SMALL_SORT_BINS bins) takes the count as it is."""
    import ray
    import ray.data

    parts = max(1, min(n_keys, max(n_bins, 4 * int(ray.cluster_resources().get("CPU", 1)))))
    sort_based = ray.data.DataContext.get_current().shuffle_strategy in (
        ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED,
        ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PUSH_BASED,
    )
    if not sort_based:
        grouped = ds.groupby(key, num_partitions=parts)
        return grouped.map_groups(fn, batch_format="pyarrow", fn_kwargs=fn_kwargs)
    bounds = sorted({-(-i * n_keys // parts) for i in range(1, parts)})
    return ds.sort(key, boundaries=bounds).map_batches(
        _each_group, batch_format="pyarrow", batch_size=None, fn_kwargs={"key": key, "fn": fn, **fn_kwargs}
    )


def _each_group(block: pa.Table, key: str, fn: Callable[..., pa.Table], **kwargs: Any) -> Iterator[pa.Table]:
    """``map_batches`` body over a block sorted by ``key``: ``fn`` on each run of equal keys (an
    empty partition yields nothing, as ``map_groups`` does)."""
    if not block.num_rows:
        return
    keys = block.column(key).to_numpy()
    starts = np.flatnonzero(np.diff(keys, prepend=keys[0] - 1))
    for a, b in zip(starts, np.append(starts[1:], len(keys)), strict=True):
        yield fn(block.slice(a, b - a), **kwargs)


@contextlib.contextmanager
def _prep_data_context(n_bins: int) -> Iterator[None]:
    """For up to SMALL_SORT_BINS bins, the pull-based sort; the caller's Ray Data context (a demo
    goes on to train in this process) is restored afterwards."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = ctx.shuffle_strategy
    if n_bins <= SMALL_SORT_BINS:
        ctx.shuffle_strategy = ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        yield
    finally:
        ctx.shuffle_strategy = saved


@dataclass
class Plan:
    """What the driver decides before any bucket runs."""

    buckets: int
    fingerprint: str
    job: BucketJob
    todo: np.ndarray  # bool per bucket: still to pack
    max_key: str | None = None


def fingerprint(dcfg: DataConfig, items: list[dict[str, Any]], buckets: int) -> str:
    """Config and input (every file's path, size and modification time, a given tokenizer's
    hash): a re-run reuses a previous run's work only when all of it is the same."""
    given = Path(dcfg.tokenizer.path) / "tokenizer.json" if dcfg.tokenizer.path else None
    state = {
        "data": dcfg.model_dump(mode="json"),
        "buckets": buckets,
        "files": [(it["path"], it["bytes"], it.get("mtime_ns", 0)) for it in items],
        "tokenizer": hashlib.sha256(given.read_bytes()).hexdigest() if given and given.is_file() else None,
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:32]


def _resumable(out: PackedData, fp: str) -> bool:
    """A previous prep of the same plan left its plan and vocabulary: keep them and its buckets."""
    try:
        plan = json.loads((out.dir / PLAN).read_text(encoding="utf-8"))
        return plan["fingerprint"] == fp and plan["tokenizer_hash"] == tokenizer_hash(out.tokenizer_dir)
    except (OSError, ValueError, KeyError):
        return False


def _clear(out: PackedData) -> None:
    """Start afresh: a previous prep's outputs and working files are removed."""
    out.clear()
    for name in (BUCKETS, NEAR):
        shutil.rmtree(out.dir / name, ignore_errors=True)
    (out.dir / PLAN).unlink(missing_ok=True)


def run(cfg: RunConfig) -> dict[str, Any]:
    """Run the prep stage; writes shards, ``manifest.json`` and ``summary.json`` into ``<run_dir>/prep``."""
    t0 = time.time()
    dcfg = cfg.data
    rd = RunDir.of(cfg)
    out = PackedData(rd.start_stage(cfg, "prep"))
    items = file_items(dcfg)  # listed once, before Ray starts: missing paths fail fast
    weighted = sum(it["bytes"] * it["weight"] for it in items)
    n_buckets = dcfg.buckets or max(MIN_BUCKETS, int(-(-weighted // BUCKET_BYTES)))
    fp = fingerprint(dcfg, items, n_buckets)
    resumed = _resumable(out, fp)
    if not resumed:
        _clear(out)
    (out.manifest_path).unlink(missing_ok=True)
    for leftover in out.dir.rglob("*.tmp"):  # what a killed prep was writing
        leftover.unlink()
    for split in SPLITS:  # the tail pass always runs again
        for f in out.split_dir(split).glob("tail-*.parquet"):
            f.unlink()
    for d in (BUCKETS, NEAR, *SPLITS):
        (out.dir / d).mkdir(parents=True, exist_ok=True)
    tok_dir = out.tokenizer_dir
    engine = dcfg.tokenizer.engine
    if dcfg.tokenizer.path and not os.path.isdir(dcfg.tokenizer.path):
        raise DataError(f"data.tokenizer.path: {dcfg.tokenizer.path} is not a tokenizer folder")
    phases: dict[str, float] = {}
    apply_env(cfg.cluster)  # before the loading thread imports transformers, which reads it
    with ThreadPoolExecutor(max_workers=1) as pool:
        # A given tokenizer folder loads while Ray starts: importing transformers alone takes ~0.6 s.
        loading = None
        if resumed:
            loading = pool.submit(lambda: _describe(hf_tokenizer(tok_dir), tok_dir, engine))
        elif dcfg.tokenizer.path:
            path = dcfg.tokenizer.path
            loading = pool.submit(
                lambda: _describe(load_tokenizer(path, dcfg.tokenizer, tok_dir), tok_dir, engine)
            )
        with ray_session(cfg.cluster):
            mark = _phases(phases, t0)
            mark("start_ray")
            bins = _bins(items)
            with _prep_data_context(len(bins)):
                if loading is not None:
                    vocab = loading.result()
                else:
                    vocab = _describe(_train_vocabulary(dcfg, bins, tok_dir), tok_dir, engine)
                write_json(
                    out.dir / PLAN,
                    {"fingerprint": fp, "buckets": n_buckets, "tokenizer_hash": tokenizer_hash(tok_dir)},
                )
                mark("vocabulary")
                job = BucketJob(
                    dir=str(out.dir),
                    block_len=dcfg.seq_len + 1,
                    shard_rows=dcfg.shard_rows,
                    boundaries_eos=vocab.eos_id if dcfg.keep_doc_boundaries and dcfg.task != "sft" else None,
                    eos_id=vocab.eos_id,
                    pad_id=vocab.pad_id,
                    sft=dcfg.task == "sft",
                    fingerprint=fp,
                    near=dcfg.clean.dedup == "minhash",
                )
                plan = Plan(n_buckets, fp, job, np.ones(n_buckets, dtype=bool))
                if dcfg.max_docs is not None:
                    plan.max_key = _max_key(dcfg, bins)
                    mark("max_docs")
                near_done = out.dir / NEAR / "done.json"
                if job.near and not near_done.is_file():
                    marked = _mark_near_duplicates(dcfg, bins, plan)
                    write_json(near_done, {"fingerprint": fp, "marked": marked})
                    mark("near_duplicates")
                records = finished(job, n_buckets)
                reused = len(records)
                complete = out.dir / BUCKETS / COMPLETE
                done = json.loads(complete.read_text()).get("buckets", []) if complete.is_file() else None
                if done is None or not set(done) <= set(records):
                    # Buckets with no documents never get a marker: the list of those that did is
                    # what lets a re-run after the last bucket skip reading the corpus again.
                    complete.unlink(missing_ok=True)
                    plan.todo[list(records)] = False
                    for b in _buckets(dcfg, bins, vocab, plan).iter_batches(
                        batch_format="pyarrow", batch_size=None
                    ):
                        for raw in b.column("record").to_pylist():
                            record = json.loads(raw)
                            records[record["bucket"]] = record
                    write_json(complete, {"fingerprint": fp, "buckets": sorted(records)})
                mark("read_clean_tokenize_pack")
                order = sorted(records)
                tails = _tails(job, [records[b]["tails"]["path"] for b in order if records[b].get("tails")])
                mark("tails")
                seconds = time.time() - t0  # shards written; stopping a Ray this stage started is not work
    stats = _account(dcfg, [records[b] for b in order], tails)
    manifest = {
        "files": len(items),
        **stats,
        "buckets": n_buckets,
        "buckets_reused": reused,
        "sources": _mixing(dcfg, [records[b] for b in order]),
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
        "buckets": n_buckets,
        "vocab_size": manifest["vocab_size"],
        "seconds": manifest["seconds"],
        "tokens_per_second": manifest["tokens_per_second"],
        "data_dir": str(out.dir),
    }
    rd.write_summary("prep", summary)
    return summary


def _phases(phases: dict[str, float], t0: float) -> Any:
    """``mark(name)``: the seconds since the previous mark go to ``name``."""
    last = [t0]

    def mark(name: str) -> None:
        now = time.time()
        phases[name] = now - last[0]
        last[0] = now

    return mark


def _tails(job: BucketJob, files: list[str]) -> dict[str, Any]:
    """The tail pass as one Ray task (on any node: the prep folder is shared storage)."""
    import ray

    return ray.get(ray.remote(num_cpus=1)(pack_tails).remote(job, files))


def _account(dcfg: DataConfig, records: list[dict[str, Any]], tails: dict[str, Any]) -> dict[str, Any]:
    """The buckets' accounting summed (in bucket order) and the tail pass's added; the one-line
    errors for output that train could not use."""
    dropped: Counter[str] = Counter()
    notes: Counter[str] = Counter()
    for r in records:
        dropped.update(r["dropped"])
        notes.update(r["notes"])
    read = sum(r["documents_read"] for r in records)
    kept = sum(r["documents_kept"] for r in records)
    tokens = {s: sum(r["tokens_by_split"][s] for r in records) for s in SPLITS}
    blocks = {s: sum(r["blocks"][s] for r in records) + tails["blocks"][s] for s in SPLITS}
    block_len = dcfg.seq_len + 1
    if read == 0 or kept == 0:
        raise DataError(f"no documents kept out of {read} read (dropped: {dict(dropped) or 'none'})")
    if blocks["train"] == 0:
        raise DataError(
            f"the train split has no full block of data.seq_len+1={block_len} tokens; "
            "lower data.seq_len or add data"
        )
    if dcfg.val_fraction > 0 and blocks["val"] == 0:
        raise DataError(
            f"the validation split got {tokens['val']} tokens, less than one block of "
            f"{block_len}; raise data.val_fraction or add data"
        )
    shards = [
        *(
            f
            for s in SPLITS
            for f in [*(x for r in records for x in r["shards"] if x["split"] == s), *tails["shards"][s]]
        )
    ]
    out = {
        "documents_read": read,
        "documents_kept": kept,
        "dropped": dict(sorted(dropped.items())),
        "notes": dict(notes),
        "tokens": sum(tokens.values()),
        "tokens_by_split": tokens,
        "tokens_dropped_tail": tails["tokens_dropped_tail"],
        "documents_cut_by_tail": tails["documents_cut_by_tail"],
        "blocks": blocks,
        "shards": shards,
    }
    if dcfg.task == "sft":
        out["padding_tokens"] = {
            s: sum(r["padding"][s] for r in records) + tails["padding"][s] for s in SPLITS
        }
    return out


def _mixing(dcfg: DataConfig, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each source's share of the packed tokens against the share its weight asks for (its kept
    tokens times its weight over all sources'): weights apply to deduplicated documents."""
    totals = [[0, 0, 0] for _ in dcfg.sources]
    for r in records:
        for src, counts in r["sources"].items():
            for k in range(3):
                totals[int(src)][k] += counts[k]
    packed = sum(t[2] for t in totals) or 1
    asked = sum(t[1] * s.weight for t, s in zip(totals, dcfg.sources, strict=True)) or 1
    return [
        {
            "path": s.path,
            "weight": s.weight,
            "documents": t[0],
            "deduplicated_tokens": t[1],
            "tokens": t[2],
            "share": round(t[2] / packed, 6),
            "weighted_share": round(t[1] * s.weight / asked, 6),
        }
        for t, s in zip(totals, dcfg.sources, strict=True)
    ]


def _columns(dcfg: DataConfig) -> list[str]:
    if dcfg.task == "sft":
        return [INPUT_IDS, LOSS_MASK, POSITION_IDS]
    return [INPUT_IDS, POSITION_IDS] if dcfg.keep_doc_boundaries else [INPUT_IDS]
