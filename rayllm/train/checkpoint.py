"""Train checkpoints, whole: where Ray Train keeps them, what one holds, and how a rank saves and
restores its part.

Every rank writes its own shard into the same Ray Train checkpoint (not only rank 0's). A checkpoint
taken at another data-parallel world size is converted with DeepSpeed's universal-checkpoint tool
before loading, so resuming after a resize never burns a retry on a world-size mismatch.

```
<train.storage>/train/checkpoint_<time>/          one per report, registered in Ray Train's snapshot
  ckpt/                 DeepSpeed's shards (tag "ckpt")
  rayllm_state.json     TrainState (rank 0)          config.json   the HF model config (rank 0)
  rng_rank<r>.pt        each rank's RNG streams      checksums_rank<r>.json  sha256 of its files
```
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch

from rayllm.errors import RunDirError
from rayllm.rundir import sha256_file
from rayllm.runtime import filesystem

log = logging.getLogger("rayllm.train")

RUN = "train"  # Ray Train's run name: its checkpoints live in <storage>/<RUN>/
TAG = "ckpt"  # DeepSpeed's tag: the shards are in <checkpoint>/<TAG>/
STATE_FILE = "rayllm_state.json"
CHECKSUMS = "checksums_rank{rank}.json"  # sha256 of every file one rank wrote into a checkpoint


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


# Marker in DeepSpeed's client state that lets ds_to_universal reshard the checkpoint later.
UNIVERSAL_INFO = "universal_checkpoint_info"


@dataclass
class TrainState:
    """What, beyond DeepSpeed's own shards, makes a resume exact."""

    step: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0  # wall time in training steps (data waits included; no eval, no checkpoints)
    world: int = 0
    zero_stage: int = 0
    # The figures the checkpoint was reported with: a resumed run reports them until it measures its
    # own, so every checkpoint's report carries a validation loss.
    reported: dict[str, Any] = field(default_factory=dict)


def read_state(ckpt: Any) -> TrainState:
    """The ``TrainState`` of a Ray Train checkpoint (downloaded first when it is remote), after
    checking every file against the sha256 its rank recorded."""
    with ckpt.as_directory() as d:
        return TrainState(**read_folder(Path(d)))


def select(latest: Any, registered: list[Any]) -> tuple[Any, TrainState, list[str]]:
    """The newest intact checkpoint: ``latest`` (what Ray Train restores), else the registered ones
    before it. Returns it, its state, and one line per checkpoint skipped as corrupt."""
    skipped: list[str] = []
    older = [c for c in registered if c.path < latest.path]
    for ckpt in [latest, *older]:
        try:
            return ckpt, read_state(ckpt), skipped
        except RunDirError as e:
            skipped.append(str(e))
    raise RunDirError(
        f"no intact checkpoint to resume from ({'; '.join(skipped)}); set train.resume=false to start over"
    )


def save(engine: Any, state: TrainState, rank: int, hf_config: Any, storage: str) -> None:
    """Write this rank's shard, RNG streams and (rank 0) the state, report it to Ray Train with
    the state's ``reported`` figures, and wait until Ray Train has registered it."""
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        client = {"rayllm": asdict(state), UNIVERSAL_INFO: {"universal_checkpoint_version": 0.4}}
        engine.save_checkpoint(d, tag=TAG, client_state=client)
        torch.save(_rng_state(), Path(d) / rng_file(rank))
        if rank == 0:
            (Path(d) / STATE_FILE).write_text(json.dumps(asdict(state)), encoding="utf-8")
            hf_config.save_pretrained(d)
        write_checksums(Path(d), rank)  # last: covers every file this rank wrote
        ray.train.report(dict(state.reported), checkpoint=ray.train.Checkpoint.from_directory(d))
    wait_registered(storage, state.step)


def wait_registered(storage: str, step: int) -> bool:
    """Block until Ray Train lists the checkpoint of ``step`` as registered (its controller does so
    when it next polls the workers, up to a health-check interval later). Without this a fault in
    that interval (at today's CPU speed, 10-20 steps) restarts from the checkpoint before, losing
    more than one checkpoint interval. Gives up, with a warning, after 10 intervals."""
    interval = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2"))
    deadline = time.monotonic() + 10 * interval
    while step not in registered_steps(storage):
        if time.monotonic() > deadline:
            log.warning(
                "the checkpoint of step %d is not registered after %.0f s; training on", step, 10 * interval
            )
            return False
        time.sleep(min(0.1, interval / 5))
    return True


def restore(engine: Any, ckpt: Any, saved: TrainState, rank: int, world: int) -> None:
    """Load DeepSpeed's shards (resharded when the world size changed) and this rank's RNG streams."""
    with ckpt.as_directory() as d, tempfile.TemporaryDirectory() as tmp:
        load_dir, tag = Path(d), TAG
        if needs_reshard(saved, world):
            load_dir, tag = _to_universal(Path(d), Path(tmp)), f"{TAG}_universal"
        path, _ = engine.load_checkpoint(
            str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {load_dir}/{tag}")
        # RNG streams (dropout) continue per rank when the world size is unchanged; after a resize
        # ranks map to different data, so fresh seeded streams are as good.
        rng = Path(d) / rng_file(rank)
        if saved.world == world and rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=False))


def needs_reshard(saved: TrainState | None, world: int) -> bool:
    """ZeRO shards optimizer state by data-parallel rank: another world size needs a conversion."""
    return saved is not None and saved.world != world and saved.zero_stage > 0


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_universal(ckpt_dir: Path, tmp: Path) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format, loadable at any DP world size."""
    from rayllm.train.parallel import import_deepspeed

    import_deepspeed()
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = tmp / "universal"
    out.mkdir()
    args = argparse.Namespace(
        input_folder=str(ckpt_dir / TAG),
        output_folder=str(out / f"{TAG}_universal"),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    ds_to_universal(args)
    return out


# ------------------------------------------------------------------------------ files in storage
def _snapshot(storage: str) -> tuple[Any, str, list[dict[str, Any]]]:
    """Ray Train's snapshot of the checkpoints it keeps (a private file of Ray's, read only here):
    (filesystem, root, [{checkpoint_dir_name, metrics}])."""
    fs, root = filesystem(storage)
    snapshot = f"{root}/{RUN}/checkpoint_manager_snapshot.json"
    if fs.get_file_info(snapshot).type == pafs.FileType.NotFound:
        return fs, root, []
    with fs.open_input_stream(snapshot) as f:
        raw = f.read()
    try:
        return fs, root, json.loads(raw).get("checkpoint_results") or []
    except json.JSONDecodeError as e:
        raise RunDirError(f"{snapshot}: unreadable Ray Train checkpoint snapshot ({e.msg})") from None


def registered(storage: str) -> list[Any]:
    """Checkpoints Ray Train registered under ``storage`` and still keeps, newest first."""
    from ray.train import Checkpoint

    fs, root, results = _snapshot(storage)
    names = sorted({r["checkpoint_dir_name"] for r in results}, reverse=True)  # names carry the time
    return [Checkpoint(path=f"{root}/{RUN}/{name}", filesystem=fs) for name in names]


def latest(storage: str) -> Any:
    """The newest checkpoint Ray Train registered (never a half-written one), or None."""
    return next(iter(registered(storage)), None)


def latest_step(storage: str) -> int | None:
    """The step the newest registered checkpoint was saved at (its report says), or None."""
    _, _, results = _snapshot(storage)
    if not results:
        return None
    newest = max(results, key=lambda r: r["checkpoint_dir_name"])
    step = (newest.get("metrics") or {}).get("step")
    return step if isinstance(step, int) else None


def registered_steps(storage: str) -> set[int]:
    """The steps of the checkpoints Ray Train has registered under ``storage`` (their reports say).
    Meant for polling during a run: Ray Train rewrites its snapshot in place, so a half-written
    one reads as nothing registered yet."""
    try:
        _, _, results = _snapshot(storage)
    except RunDirError:
        return set()
    return {r["metrics"]["step"] for r in results if isinstance((r.get("metrics") or {}).get("step"), int)}


def clear(storage: str) -> None:
    """``train.resume: false``: forget the previous run's checkpoints, wherever they live."""
    fs, root = filesystem(storage)
    if fs.get_file_info(f"{root}/{RUN}").type != pafs.FileType.NotFound:
        fs.delete_dir(f"{root}/{RUN}")


def read_folder(d: Path) -> dict[str, Any]:
    """A local checkpoint folder's state, after checking every file against its recorded sha256."""
    p = d / STATE_FILE
    if not p.is_file() or not (d / TAG).is_dir():
        raise RunDirError(f"{d}: not a rayllm train checkpoint (no {STATE_FILE} and {TAG}/ in it)")
    bad = corrupt_files(d)
    if bad:
        raise RunDirError(
            f"{d}: corrupt checkpoint ({len(bad)} files differ from their sha256, e.g. {bad[0]})"
        )
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RunDirError(f"{p}: corrupt checkpoint state ({e.msg})") from None


def write_checksums(d: Path, rank: int) -> None:
    """Record the sha256 of every file in ``d`` (one rank's part of a checkpoint, before upload)."""
    sums = {str(p.relative_to(d)): sha256_file(p) for p in sorted(d.rglob("*")) if p.is_file()}
    (d / CHECKSUMS.format(rank=rank)).write_text(json.dumps(sums), encoding="utf-8")


def corrupt_files(d: Path) -> list[str]:
    """Files of a checkpoint folder that are missing or differ from their recorded sha256."""
    bad = []
    for listing in sorted(d.glob(CHECKSUMS.format(rank="*"))):
        for rel, digest in json.loads(listing.read_text(encoding="utf-8")).items():
            p = d / rel
            if not p.is_file() or sha256_file(p) != digest:
                bad.append(rel)
    return bad
