"""train stage: Ray Train ``TorchTrainer`` + DeepSpeed ZeRO over the packed parquet blocks.

The driver validates everything it can before any worker starts (data dir, vocabulary vs model,
sequence length vs positions, batch arithmetic), then hands the run to Ray Train, which restarts the
worker group from the last checkpoint on failures and resumes a re-launched run from storage.
"""

from __future__ import annotations

import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from rayllm import tracking
from rayllm.config import RunConfig
from rayllm.errors import ConfigError, RunDirError
from rayllm.model.build import context_length, model_config
from rayllm.progress import FollowMetrics
from rayllm.rundir import METRICS, SPLITS, TENSORBOARD, Manifest, RunDir
from rayllm.runtime import ray_session
from rayllm.train import checkpoint


def check_compatible(cfg: RunConfig, manifest: Manifest) -> None:
    """Reject data/model/batch mismatches with the field to change, before any worker starts."""
    hf = model_config(cfg.model, manifest.vocab_size, manifest.eos_id, manifest.pad_id)
    positions = context_length(hf)
    if manifest.seq_len > positions:
        raise ConfigError(
            f"data.seq_len={manifest.seq_len} (from the prep manifest) exceeds the model's {positions} "
            "positions; re-run prep with a smaller data.seq_len or raise model.max_positions"
        )
    t = cfg.train
    blocks = manifest.blocks
    if blocks["train"] < t.global_batch:
        raise ConfigError(
            f"train.global_batch={t.global_batch} exceeds the {blocks['train']} train blocks in the data; "
            "lower train.global_batch or prep more data"
        )
    if blocks["val"] < t.global_batch:
        raise ConfigError(
            f"the val split has {blocks['val']} blocks, fewer than train.global_batch={t.global_batch}; "
            "raise data.val_fraction or lower train.global_batch"
        )


def datasets(cfg: RunConfig) -> dict[str, Any]:
    """The packed splits as Ray datasets: materialized once in the object store when smaller than
    ``train.cache_data_gb`` (fast epochs, restarts and Tune trials), else streamed from storage."""
    data = RunDir.of(cfg).data
    return {split: data.dataset(split, cfg.train.cache_data_gb) for split in SPLITS}


def trainer(cfg: RunConfig, out: Path, splits: dict[str, Any] | None = None) -> Any:
    """The ``TorchTrainer`` for one run (also each Ray Tune trial, with its own ``out``)."""
    import ray.train
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from rayllm.train.loop import train_loop

    t = cfg.train
    rd = RunDir.of(cfg)
    lo, hi = t.worker_range
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = t.gpus_per_worker
    resources.update(t.resources_per_worker)
    ingest = DataConfig.default_ingest_options()
    # Ray Train copies preserve_order from the driver's DataContext, where it is off unless something
    # turned it on: without it the "deterministic" stream is reordered by whichever read task ends first.
    ingest.preserve_order = True
    data = splits or datasets(cfg)
    return TorchTrainer(
        train_loop,
        # The process group Ray creates (and DeepSpeed reuses) times collectives out at this.
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo", timeout_s=t.collective_timeout_s),
        train_loop_config={
            "cfg": cfg.dump(),
            "manifest": rd.data.manifest().model_dump(),
            "out_dir": str(out),
            "storage": rd.storage,
            # A resumed epoch's rows after the position, cut from this dataset (see loop.rows_from).
            "train_data": data["train"],
            "data_dir": str(rd.data.dir),
        },
        scaling_config=ScalingConfig(
            num_workers=lo if lo == hi else (lo, hi),
            use_gpu=t.use_gpu,
            resources_per_worker=resources,
            elastic_resize_monitor_interval_s=t.elastic_monitor_s,
        ),
        run_config=ray.train.RunConfig(
            name=checkpoint.RUN,
            storage_path=rd.storage,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
        ),
        datasets=data,
        # Every worker reads the whole (deterministic) stream and takes its slice per step:
        # the data position then survives restarts and world-size changes exactly.
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ingest),
    )


def finished_checkpoint(rd: RunDir, end_step: int) -> Any:
    """The newest checkpoint when it already holds ``end_step`` steps and is intact, else None.

    Such a run has nothing left to train (a finished run started again, or tune exporting its best
    trial): it is exported from the checkpoint here, without starting a worker group (half a minute
    on a small machine). A corrupt one is left to the workers, which fall back to the one before;
    so is one in remote storage, where checking it here would mean downloading it twice.
    """
    import pyarrow.fs

    step = checkpoint.latest_step(rd.storage)
    if step is None or step < end_step:
        return None
    ckpt = checkpoint.latest(rd.storage)
    if not isinstance(ckpt.filesystem, pyarrow.fs.LocalFileSystem):
        return None
    try:
        checkpoint.read_folder(Path(ckpt.path))  # checks every file against its recorded sha256
    except RunDirError:
        return None
    return ckpt


def run(cfg: RunConfig, splits: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train (resuming when the run dir holds checkpoints), export, and write ``train/summary.json``.

    ``splits`` is for Ray Tune: datasets materialized once for every trial.
    """
    from rayllm.train.export import export_checkpoint

    t = cfg.train
    rd = RunDir.of(cfg)
    manifest = rd.data.manifest()
    check_compatible(cfg, manifest)
    out = rd.start_stage(cfg, "train")
    if not t.resume:
        checkpoint.clear(rd.storage)
        for p in (out / METRICS, out / TENSORBOARD):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    t0 = time.time()
    # A tune trial (splits given) runs in a Tune actor: its search reports and tracks the trials.
    tracked = None
    if splits is None and tracking.enabled(cfg):
        resuming = t.resume and checkpoint.latest_step(rd.storage) is not None
        tracked = tracking.Tracked(cfg, "train", resume=resuming)
    with tracked or nullcontext():
        ckpt, error = finished_checkpoint(rd, t.end_step), None
        if ckpt is None:
            sinks = [tracked.record] if tracked else []
            watch = (
                FollowMetrics(out / METRICS, t.end_step, "train", sinks=sinks)
                if splits is None
                else nullcontext()
            )
            with ray_session(cfg.cluster, use_gpu=t.use_gpu), watch:
                result = trainer(cfg, out, splits).fit()
            ckpt, error = result.checkpoint, result.error
        seconds = time.time() - t0
        # Rows without a step: validation rows from runs before they named it (events carry theirs).
        rows = [r for r in rd.read_metrics("train") if "step" in r]
        summary = summarize(rows)
        plot_losses(rows, out / "loss.png")
        summary.update(seconds=round(seconds, 1), data_dir=str(rd.data.dir), checkpoint=None, export_dir=None)
        if ckpt is not None:
            # The latest checkpoint Ray registered; as_directory() downloads it when storage is remote.
            summary["checkpoint"] = ckpt.path
            if t.export:
                with ckpt.as_directory() as d:
                    export = export_checkpoint(Path(d), rd.export_dir, rd.data.tokenizer_dir, cfg.public())
                    summary["export_dir"] = str(export)
                if tracked:
                    tracked.export(summary["export_dir"])
        if error:
            raise error
    rd.write_summary("train", summary)
    return summary


def plot_losses(rows: list[dict[str, Any]], png: Path) -> None:
    """Train and validation loss against step, one PNG for people (TensorBoard has the rest)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train"), ("val_loss", "validation")):
        points = sorted({r["step"]: r[key] for r in rows if key in r}.items())
        if points:
            ax.plot(*zip(*points, strict=True), marker="o" if key == "val_loss" else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Headline figures from the metrics records (the latest record per step wins after a resume)."""
    by_step: dict[int, dict[str, Any]] = {}
    for r in rows:
        if "event" in r:
            continue
        by_step.setdefault(r["step"], {}).update(r)
    steps = [by_step[k] for k in sorted(by_step)]
    train = [r for r in steps if "loss" in r]
    val = [r for r in steps if "val_loss" in r]
    timed = [r for r in train if r["step"] > 1] or train
    return {
        "steps": steps[-1]["step"] if steps else 0,
        "train_loss_first": train[0]["loss"] if train else None,
        "train_loss_last": train[-1]["loss"] if train else None,
        "val_loss_first": val[0]["val_loss"] if val else None,
        "val_loss_last": val[-1]["val_loss"] if val else None,
        "val_perplexity_last": val[-1]["val_perplexity"] if val else None,
        "tokens_per_second": sum(r["tokens_per_second"] for r in timed) / max(len(timed), 1),
        "mfu": sum(r["mfu"] for r in timed) / max(len(timed), 1),
        "tokens_seen": train[-1]["tokens_seen"] if train else 0,
        "train_seconds": train[-1].get("train_seconds") if train else None,
        "resumes": sum(1 for r in rows if r.get("event") == "resume"),
    }
