"""The run directory: the one contract between stages.

Stages never import each other; they meet here. This module alone knows where a run's files live
and how they are laid out:

```
<run_dir>/
  <stage>/config.yaml  stage.log  metrics.jsonl  summary.json     every stage
  prep/manifest.json  prep/tokenizer/  prep/{train,val}/*.parquet             packed data (the
      manifest lists the shards, in order, with their sha256); prep/plan.json, buckets/, near/
      are prep's own working files, from which a killed prep resumes
  train/ray/train/checkpoint_*/                                     Ray Train storage (train.storage)
      ckpt/ (DeepSpeed shards)  rayllm_state.json  rng_rank<r>.pt  config.json
  train/export/                                                     plain Hugging Face folder
  tune/best.yaml  tune/trials/
  run/state.json                                                    `rayllm run` fingerprints
  tracking.json         the MLflow / W&B run ids of this run's stages (tracking.*): eval logs to its
                        train's run, a `rayllm run` parent holds the stages' runs
```

Packed data may come from another run (``train.data_dir``) and checkpoints may live on any pyarrow
URI (``train.storage``); ``RunDir.of(cfg)`` resolves both, so a change to a layout touches this file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from rayllm.config import RunConfig, validate_config
from rayllm.errors import RunDirError
from rayllm.runtime import is_uri, log_to_file

log = logging.getLogger("rayllm")

CONFIG, LOG, METRICS, SUMMARY = "config.yaml", "stage.log", "metrics.jsonl", "summary.json"
TENSORBOARD = "tensorboard"  # train: event files beside metrics.jsonl
SPLITS = ("train", "val")
# A split up to one Ray Data block (its default target size) is read by the driver itself: a Ray Data
# job's start-up alone (5 s on 2 cores) takes longer than reading it.
DRIVER_READ_GB = 0.125
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer"
# Packed-data columns: fixed-size int32 lists of block_len = seq_len + 1 tokens (inputs + shifted label).
INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"  # restart after each EOS: attention does not cross documents
LOSS_MASK = "loss_mask"  # 1 where the token is a training target (SFT: the answer), 0 elsewhere


# ------------------------------------------------------------------------------------- stage files
class MetricsWriter:
    """jsonl, one line per ``write`` with ``time`` and the metrics, flushed so a crash loses nothing.

    Appends by default (a resumed run continues its curve); ``replace`` starts the file afresh for
    tables that are rewritten whole, such as tune's one row per trial."""

    def __init__(self, path: Path, replace: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = path.open("w" if replace else "a", encoding="utf-8")

    def write(self, **metrics: Any) -> None:
        self._f.write(json.dumps({"time": round(time.time(), 3), **metrics}, default=float) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_json(path: Path, data: Any) -> Path:
    """Write-then-rename: a reader never sees half a file, also when the writer is killed."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------------ packed data
def packed_columns(batch: dict[str, np.ndarray] | pa.Table) -> dict[str, np.ndarray]:
    """Packed-data columns as 2-D arrays (rows x block_len), from a numpy batch (Ray Data hands
    fixed-size lists over as object arrays of rows) or a pyarrow table."""
    if isinstance(batch, dict):
        return {name: np.stack(v) if v.dtype == object else v for name, v in batch.items()}
    out = {}
    for name in batch.column_names:
        column = batch.column(name).combine_chunks()
        out[name] = column.flatten().to_numpy().reshape(len(column), column.type.list_size)
    return out


class Manifest(BaseModel):
    """``prep/manifest.json``: what train and eval need from the packed data, plus prep's accounting."""

    model_config = ConfigDict(extra="allow")

    vocab_size: int
    eos_id: int
    pad_id: int
    seq_len: int
    block_len: int
    blocks: dict[str, int]
    columns: list[str] = [INPUT_IDS]
    tokenizer_hash: str = ""

    def split_gb(self, split: str) -> float:
        return self.blocks[split] * self.block_len * 4 * len(self.columns) / 2**30


@dataclass(frozen=True)
class PackedData:
    """A prep output folder: manifest, tokenizer folder and the packed splits."""

    dir: Path

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST

    @property
    def tokenizer_dir(self) -> Path:
        return self.dir / TOKENIZER

    def split_dir(self, split: str) -> Path:
        return self.dir / split

    def clear(self) -> None:
        """Remove a previous prep's outputs (a re-run must not mix old shards with new ones)."""
        for name in (*SPLITS, MANIFEST, SUMMARY, TOKENIZER):
            p = self.dir / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        write_json(self.manifest_path, manifest)

    def manifest(self) -> Manifest:
        p = self.manifest_path
        if not p.is_file():
            raise RunDirError(
                f"{p} not found: run `rayllm prep` first or set train.data_dir to a prep folder"
            )
        try:
            return Manifest.model_validate_json(p.read_bytes())
        except ValidationError as e:
            field = ".".join(str(x) for x in e.errors()[0]["loc"])
            raise RunDirError(f"{p}: not a rayllm prep manifest ({field}: {e.errors()[0]['msg']})") from None

    def require(self, split: str) -> Path:
        d = self.split_dir(split)
        if not d.is_dir():
            raise RunDirError(f"{d} not found: run `rayllm prep` (with data.val_fraction > 0) first")
        return d

    def shards(self, split: str) -> list[tuple[str, int]]:
        """The split's shards as the manifest lists them, in order, with their rows: only shards a
        finished prep wrote and checksummed, never a leftover of an interrupted one."""
        self.require(split)
        listed = self.manifest().model_extra.get("shards") or []
        shards = [(str(self.dir / s["path"]), int(s["rows"])) for s in listed if s["split"] == split]
        if not shards:
            raise RunDirError(
                f"{self.manifest_path} lists no {split} shards: re-run `rayllm prep` with more data"
            )
        missing = [p for p, _ in shards if not Path(p).is_file()]
        if missing:
            raise RunDirError(
                f"{missing[0]} is listed in {self.manifest_path} but missing: re-run `rayllm prep`"
            )
        return shards

    def dataset(self, split: str, cache_gb: float) -> Any:
        """A split as train and tune hand it to Ray Train, in file order: held in the object store
        when smaller than ``cache_gb`` (fast epochs, restarts and trials), else streamed from storage."""
        import pyarrow.parquet as pq
        import ray.data

        gb = self.manifest().split_gb(split)
        if gb >= cache_gb:
            return self.read(split)
        if gb >= DRIVER_READ_GB:
            return self.read(split).materialize()
        # One block, as Ray Data makes of a split this small: a block per shard cost ~1 ms more per
        # batch to iterate.
        ds = ray.data.from_arrow(pa.concat_tables([pq.read_table(path) for path, _ in self.shards(split)]))
        ds.context.execution_options.preserve_order = True
        return ds

    def read(self, split: str, start: int = 0) -> Any:
        """A split's packed blocks from row ``start`` on, as a Ray Data dataset in file order whatever
        the driver's context says (train's exact resume and eval's ``max_batches`` both mean "these
        rows"). The shards before ``start`` are not read: the manifest knows their rows, and of the
        shard holding ``start`` only its row groups from there on are."""
        import pyarrow.parquet as pq
        import ray.data

        shards, skipped = self.shards(split), 0
        last = shards[-1][0]
        while shards and skipped + shards[0][1] <= start:
            skipped += shards.pop(0)[1]
        offset, paths = start - skipped, [path for path, _ in shards]
        if not shards and offset == 0:  # start at the end: no rows, the split's columns
            ds = ray.data.from_arrow(pq.read_schema(last).empty_table())
        elif not shards:
            raise RunDirError(f"{self.manifest_path}: row {start} is past the end of the {split} split")
        elif not offset:
            ds = ray.data.read_parquet(paths)
        else:
            first = pq.ParquetFile(paths[0])
            group, before = 0, 0
            while before + first.metadata.row_group(group).num_rows <= offset:
                before += first.metadata.row_group(group).num_rows
                group += 1
            tail = first.read_row_groups(range(group, first.num_row_groups)).slice(offset - before)
            ds = ray.data.from_arrow(tail)
            if paths[1:]:
                ds = ds.union(ray.data.read_parquet(paths[1:]))
        ds.context.execution_options.preserve_order = True
        return ds


# --------------------------------------------------------------------------------- the run dir
@dataclass(frozen=True)
class RunDir:
    """Every path a run's stages exchange, resolved once from the config."""

    root: Path
    data: PackedData
    storage: str  # Ray Train storage: a local path or a pyarrow URI

    @classmethod
    def of(cls, cfg: RunConfig) -> RunDir:
        if is_uri(cfg.run_dir):
            raise RunDirError(
                f"run_dir {cfg.run_dir}: stage outputs need a local or mounted path; "
                "cloud URIs are used for train checkpoints via train.storage"
            )
        root = Path(cfg.run_dir).expanduser().resolve()
        data = Path(cfg.train.data_dir).expanduser().resolve() if cfg.train.data_dir else root / "prep"
        return cls(root, PackedData(data), cfg.train.storage or str(root / "train" / "ray"))

    @classmethod
    def load(cls, run_dir: str) -> RunDir:
        """A run dir as its train stage saw it (its saved config), for `rayllm export` and status."""
        saved = Path(run_dir).expanduser() / "train" / CONFIG
        raw = yaml.safe_load(saved.read_text(encoding="utf-8")) if saved.is_file() else {}
        return cls.of(validate_config({**(raw or {}), "run_dir": run_dir}, origin=str(saved)))

    # ------------------------------------------------------------------------------ stage files
    def stage(self, name: str, create: bool = True) -> Path:
        d = self.root / name
        if create:
            d.mkdir(parents=True, exist_ok=True)
        return d

    def start_stage(self, cfg: RunConfig, name: str) -> Path:
        """Create the stage folder, save the resolved config, and log the stage to its ``stage.log``."""
        d = self.stage(name)
        (d / CONFIG).write_text(
            yaml.safe_dump(cfg.public(), sort_keys=False, allow_unicode=True), encoding="utf-8"
        )
        log_to_file(d / LOG)
        log.info("%s: run_dir=%s", name, self.root)
        return d

    def write_summary(self, name: str, summary: dict[str, Any]) -> Path:
        log.info("%s summary: %s", name, json.dumps(summary, ensure_ascii=False, default=str))
        return write_json(self.stage(name) / SUMMARY, summary)

    def summary(self, name: str) -> dict[str, Any] | None:
        p = self.stage(name, create=False) / SUMMARY
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None

    def read_summary(self, name: str) -> dict[str, Any]:
        s = self.summary(name)
        if s is None:
            raise RunDirError(
                f"{self.root / name / SUMMARY} not found: run `rayllm {name}` for this run dir first"
            )
        return s

    def metrics(self, name: str, replace: bool = False) -> MetricsWriter:
        return MetricsWriter(self.stage(name) / METRICS, replace)

    def read_metrics(self, name: str) -> list[dict[str, Any]]:
        return read_jsonl(self.stage(name, create=False) / METRICS)

    # ------------------------------------------------------------------------------ run files
    @property
    def export_dir(self) -> Path:
        return self.root / "train" / "export"

    @property
    def tracking_path(self) -> Path:
        return self.root / "tracking.json"

    def run_state(self) -> dict[str, Any]:
        """``run/state.json``: what `rayllm run` recorded per stage (fingerprint, inputs, status)."""
        p = self.root / "run" / "state.json"
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}

    def write_run_state(self, state: dict[str, Any]) -> None:
        write_json(self.stage("run") / "state.json", state)

    def model_dir(self, explicit: str | None, field: str) -> str:
        """The model a stage loads: ``field`` when set, else the run's export (train ``export_dir``)."""
        if explicit:
            return model_folder(Path(explicit).expanduser(), f"{field}={explicit}", field)
        raw = self.read_summary("train").get("export_dir") or ""
        origin = f"{self.root}/train/{SUMMARY} export_dir"
        if not raw:
            raise RunDirError(
                f"{origin} is empty: the train stage exported no model (train.export=false?); "
                f"run `rayllm train` with train.export=true, `rayllm export`, or set {field}"
            )
        path = Path(raw).expanduser()
        if not path.is_absolute() and not path.exists():
            path = self.root / path
        return model_folder(path, f"{origin}={raw}", field)


def model_folder(path: Path, origin: str, field: str = "model_dir") -> str:
    """``path`` if it is a Hugging Face model folder whose safetensors headers read, else one line
    naming ``field``. Checked here because vLLM, inside a Ray replica or actor, reports a broken
    weights file as "Failed to create vLLM engine config:" with the reason lost."""
    from safetensors import SafetensorError, safe_open

    if not (path / "config.json").is_file():
        raise RunDirError(
            f"{origin}: not a Hugging Face model folder (no config.json in {path.resolve()}); "
            f"point {field} at a folder written by save_pretrained"
        )
    for weights in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(weights), "np"):  # reads the header only
                pass
        except (SafetensorError, OSError) as e:
            raise RunDirError(
                f"{origin}: {weights.name} is not a readable safetensors file ({e}); export the model again"
            ) from None
    return str(path.resolve())


# ------------------------------------------------------------------------------------- files
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
