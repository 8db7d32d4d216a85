"""prep's buckets: the unit of work after tokenizing, and why the shards are the same on any cluster.

A document's key is the hash of its cleaned text; its bucket is the key modulo the bucket count,
which the config (or the input's size) fixes, never the cluster. ``pack_bucket`` runs in a Ray
Data task on all of one bucket's rows: it sorts them by key (exact duplicates, having equal keys, are
always in one bucket and end up adjacent), drops duplicates and counts every drop, packs the rest and
writes the bucket's shards, so its output is a pure function of its members. What does not fill a
block is carried, not dropped: each bucket writes its leftover tokens (fine-tuning: the examples of
its open block) to a small tail file, and ``pack_tails`` packs them all in bucket order at the end.
A bucket's marker file (written last, atomically, with the sha256 of everything it wrote) is what a
re-run of a killed prep trusts to skip that bucket.

Near duplicates (``data.clean.dedup: minhash``) are found partitioned by LSH band before packing:
``band_rows`` cuts each document's MinHash signature into bands, rows sharing a band's hash meet in
one partition, and ``near_duplicate_keys`` marks every document that shares a band with one of a
smaller key; ``write_near_keys`` leaves each bucket's marked keys where its ``pack_bucket`` reads them.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rayllm.prep.clean import MINHASH_PERM, minhash_signatures
from rayllm.prep.pack import ExamplePacker, Packer
from rayllm.prep.shards import ShardWriter
from rayllm.rundir import SPLITS, sha256_file, write_json

BUCKETS = "buckets"  # <prep>/buckets/bNNNNN.json (marker) and bNNNNN.tails.parquet
NEAR = "near"  # <prep>/near/bNNNNN.parquet: a bucket's near-duplicate keys; done.json once complete
COMPLETE = "complete.json"  # in BUCKETS: every bucket packed (a re-run goes straight to the tails)
TAIL_SCHEMA = pa.schema(
    [("split", pa.string()), ("ids", pa.large_list(pa.int32())), ("mask", pa.large_list(pa.int8()))]
)
# Multipliers of the band hash (a fixed seed: the partitioning must be the same in every task).
_BAND_MIX = np.random.default_rng(20261206).integers(1, 2**63, size=MINHASH_PERM, dtype=np.uint64)
_BAND_MIX |= np.uint64(1)  # odd: every multiplier keeps all 64 bits of its value


def bucket_of(keys: list[str], buckets: int) -> np.ndarray:
    """Bucket of each document key (its last 32 bits; the first 64 decide split and copies)."""
    return np.array([int(k[-8:], 16) % buckets for k in keys], dtype=np.int32)


@dataclass(frozen=True)
class BucketJob:
    """What every bucket task needs: where to write and how to pack."""

    dir: str  # the prep folder (shared by every node)
    block_len: int
    shard_rows: int
    boundaries_eos: int | None  # keep_doc_boundaries: position_ids restart after this token
    eos_id: int
    pad_id: int
    sft: bool
    fingerprint: str  # of the plan; a marker from another plan is never trusted
    near: bool  # read this bucket's near-duplicate keys

    def packer(self, split: str, prefix: str) -> Any:
        writer = ShardWriter(Path(self.dir) / split, self.block_len, prefix)
        if self.sft:
            return ExamplePacker(writer, self.shard_rows, self.pad_id)
        return Packer(writer, self.shard_rows, self.boundaries_eos)

    def marker(self, bucket: int) -> Path:
        return Path(self.dir) / BUCKETS / f"b{bucket:05d}.json"


def pack_bucket(group: pa.Table, job: BucketJob) -> pa.Table:
    """``map_groups`` body: one bucket's rows -> its shards, tail file and marker; returns the marker."""
    bucket = int(group.column("bucket")[0].as_py())
    group = group.sort_by([("hash", "ascending"), ("copies", "descending"), ("source", "ascending")])
    near = _near_keys(job, bucket)
    reasons = group.column("reason").to_pylist()
    keys = group.column("hash").to_pylist()
    splits = group.column("split").to_pylist()
    copies = group.column("copies").to_pylist()
    sources = group.column("source").to_pylist()
    ids = group.column("ids").combine_chunks()
    lengths = group.column("length").to_numpy()
    dropped: Counter[str] = Counter()
    # source -> [documents kept, tokens of its deduplicated documents, tokens packed with copies]
    per_source: dict[str, list[int]] = {}
    take: dict[str, list[int]] = {s: [] for s in SPLITS}
    prev = seen = None
    for i, reason in enumerate(reasons):
        if not reason and keys[i] != seen and keys[i] not in near:
            seen = keys[i]  # a deduplicated document, kept or left out by its source's weight
            per_source.setdefault(str(sources[i]), [0, 0, 0])[1] += int(lengths[i])
        if not reason and not copies[i]:
            reason = "downsampled"
        elif not reason and keys[i] == prev:
            reason = "duplicate"
        elif not reason and keys[i] in near:
            reason = "near_duplicate"
        if reason:
            dropped[reason] += 1
            continue
        prev = keys[i]
        take[splits[i]].extend([i] * copies[i])
        counts = per_source[str(sources[i])]
        counts[0] += 1
        counts[2] += int(lengths[i]) * copies[i]
    prefix = f"b{bucket:05d}"
    packers = {s: job.packer(s, prefix) for s in SPLITS}
    tails: list[dict[str, Any]] = []
    for split, idx in take.items():
        packer = packers[split]
        if job.sft:
            masks = group.column("mask").combine_chunks()
            for i in idx:
                packer.add(ids[i].values.to_numpy(), masks[i].values.to_numpy())
            tails += [{"split": split, "ids": a, "mask": m} for a, m in packer.take_tail()]
        else:
            if idx:
                packer.add(pc.list_flatten(ids.take(pa.array(idx))).to_numpy())
            rest = packer.take_tail()
            if len(rest):
                tails.append({"split": split, "ids": rest, "mask": None})
    record: dict[str, Any] = {
        "bucket": bucket,
        "fingerprint": job.fingerprint,
        "node": _node(),
        "documents_read": len(reasons),
        "documents_kept": sum(c[0] for c in per_source.values()),
        "dropped": dict(dropped),
        "notes": dict(Counter(n for n in group.column("note").to_pylist() if n)),
        "tokens_by_split": {s: p.tokens_in for s, p in packers.items()},
        "blocks": {s: p.blocks for s, p in packers.items()},
        "padding": {s: getattr(p, "padding", 0) for s, p in packers.items()},
        "sources": per_source,
        "shards": [shard for s in SPLITS for shard in packers[s].writer.shards],
        "tails": _write_tails(job, bucket, tails),
    }
    write_json(job.marker(bucket), record)
    return pa.table({"bucket": [bucket], "record": [json.dumps(record)]})


def _write_tails(job: BucketJob, bucket: int, tails: list[dict[str, Any]]) -> dict[str, str] | None:
    if not tails:
        return None
    path = Path(job.dir) / BUCKETS / f"b{bucket:05d}.tails.parquet"
    table = pa.Table.from_pylist(
        [
            {"split": t["split"], "ids": np.asarray(t["ids"]).tolist(), "mask": _list(t["mask"])}
            for t in tails
        ],
        schema=TAIL_SCHEMA,
    )
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(path)
    return {"path": f"{BUCKETS}/{path.name}", "sha256": sha256_file(path)}


def _node() -> str:
    """The Ray node that packed a bucket (markers only: the shards do not depend on it)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def _list(mask: Any) -> list[int] | None:
    return None if mask is None else np.asarray(mask).tolist()


def pack_tails(job: BucketJob, tail_files: list[str]) -> dict[str, Any]:
    """Every bucket's tail, in bucket order, packed into ``tail-NNNNN`` shards; the final partial
    block of each split (language modelling) is left out and counted."""
    packers = {s: job.packer(s, "tail") for s in SPLITS}
    for name in tail_files:
        for row in pq.read_table(Path(job.dir) / name).to_pylist():
            ids = np.asarray(row["ids"], dtype=np.int32)
            if job.sft:
                packers[row["split"]].add(ids, np.asarray(row["mask"], dtype=np.int32))
            else:
                packers[row["split"]].add(ids)
    if job.sft:
        dropped = {s: p.finish() for s, p in packers.items()}
        cut = dict.fromkeys(SPLITS, 0)
    else:  # the final partial block: its tokens, and the documents whose end (EOS) was in it
        rest = {s: p.take_tail() for s, p in packers.items()}
        dropped = {s: len(r) for s, r in rest.items()}
        cut = {s: int((r == job.eos_id).sum()) for s, r in rest.items()}
    return {
        "shards": {s: p.writer.shards for s, p in packers.items()},
        "blocks": {s: p.blocks for s, p in packers.items()},
        "tokens_dropped_tail": dropped,
        "documents_cut_by_tail": cut,
        "padding": {s: getattr(p, "padding", 0) for s, p in packers.items()},
    }


def finished(job: BucketJob, buckets: int) -> dict[int, dict[str, Any]]:
    """The buckets a previous run of the same plan finished, each checked file by file: a marker
    whose shards or tail file are missing or differ from their sha256 is redone."""
    out = {}
    root = Path(job.dir)
    for marker in sorted((root / BUCKETS).glob("b*.json")):
        try:
            record = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if record.get("fingerprint") != job.fingerprint or not 0 <= record.get("bucket", -1) < buckets:
            continue
        files = [*record["shards"], *([record["tails"]] if record.get("tails") else [])]
        if all((root / f["path"]).is_file() and sha256_file(root / f["path"]) == f["sha256"] for f in files):
            out[record["bucket"]] = record
    return out


# --------------------------------------------------------------------------- near duplicates (LSH)
def band_rows(batch: pa.Table, bands: int, rows: int, parts: int) -> pa.Table:
    """``map_batches`` body: one row per (document, band) for documents that would be packed: the
    band's hash and the partition it meets the other documents sharing it in."""
    reasons = batch.column("reason").to_pylist()
    copies = batch.column("copies").to_pylist()
    live = [i for i, r in enumerate(reasons) if not r and copies[i]]
    texts = batch.column("text").to_pylist()
    keys = batch.column("hash").to_pylist()
    if not live:
        return pa.table({"part": pa.array([], pa.int32()), "band": pa.array([], pa.int16()),
                         "bhash": pa.array([], pa.uint64()), "hash": pa.array([], pa.string())})  # fmt: skip
    sigs = np.stack([m.hashvalues.astype(np.uint64) for m in minhash_signatures([texts[i] for i in live])])
    cols: dict[str, list[np.ndarray]] = {"part": [], "band": [], "bhash": [], "hash": []}
    doc_keys = np.array([keys[i] for i in live], dtype=object)
    for b in range(bands):
        # A multiply-add hash of the band's values (uint64 arithmetic wraps): vectorized and seeded.
        bh = (sigs[:, b * rows : (b + 1) * rows] * _BAND_MIX[:rows]).sum(axis=1, dtype=np.uint64)
        cols["part"].append((bh % np.uint64(parts)).astype(np.int32))
        cols["band"].append(np.full(len(live), b, dtype=np.int16))
        cols["bhash"].append(bh)
        cols["hash"].append(doc_keys)
    return pa.table(
        {
            "part": np.concatenate(cols["part"]),
            "band": np.concatenate(cols["band"]),
            "bhash": np.concatenate(cols["bhash"]),
            "hash": pa.array(np.concatenate(cols["hash"]).tolist(), pa.string()),
        }
    )


def near_duplicate_keys(part: pa.Table, buckets: int) -> pa.Table:
    """``map_groups`` body over one partition of band rows: the keys of documents that share a band
    with a document of smaller key (exact copies, sharing the key itself, are left to exact dedup)."""
    part = part.sort_by([("band", "ascending"), ("bhash", "ascending"), ("hash", "ascending")])
    band = part.column("band").to_numpy()
    bh = part.column("bhash").to_numpy()
    keys = np.array(part.column("hash").to_pylist(), dtype=object)
    same = np.zeros(len(keys), dtype=bool)
    same[1:] = (band[1:] == band[:-1]) & (bh[1:] == bh[:-1])
    start = np.maximum.accumulate(np.where(same, 0, np.arange(len(keys))))
    marked = sorted(set(keys[same & (keys != keys[start])].tolist()))
    return pa.table({"hash": pa.array(marked, pa.string()), "bucket": bucket_of(marked, buckets)})


def write_near_keys(group: pa.Table, prep_dir: str) -> pa.Table:
    """``map_groups`` body over one bucket's marked keys: ``near/bNNNNN.parquet``."""
    bucket = int(group.column("bucket")[0].as_py())
    keys = sorted(set(group.column("hash").to_pylist()))
    path = Path(prep_dir) / NEAR / f"b{bucket:05d}.parquet"
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table({"hash": pa.array(keys, pa.string())}), tmp)
    tmp.replace(path)
    return pa.table({"bucket": [bucket], "keys": [len(keys)]})


def _near_keys(job: BucketJob, bucket: int) -> set[str]:
    path = Path(job.dir) / NEAR / f"b{bucket:05d}.parquet"
    if not job.near or not path.is_file():
        return set()
    return set(pq.read_table(path).column("hash").to_pylist())
