"""train stage: Ray Train ``TorchTrainer`` + DeepSpeed ZeRO over the packed parquet blocks.

The driver validates everything it can before any worker starts (data dir, vocabulary vs model,
sequence length vs positions, batch arithmetic), then hands the run to Ray Train, which restarts the
worker group from the last checkpoint on failures and resumes a re-launched run from storage.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from rayllm.config import RunConfig
from rayllm.data import load_manifest, read_blocks
from rayllm.errors import ConfigError
from rayllm.runtime import ray_session, save_stage_config, stage_dir, write_summary

RUN_NAME = "train"


def data_dir_of(cfg: RunConfig) -> Path:
    return Path(cfg.train.data_dir) if cfg.train.data_dir else stage_dir(cfg.run_dir, "prep", create=False)


def check_compatible(cfg: RunConfig, manifest: dict[str, Any]) -> None:
    """Reject data/model/batch mismatches with the field to change, before any worker starts."""
    from rayllm.model import max_positions, model_config

    seq = int(manifest["seq_len"])
    hf = model_config(cfg.model, manifest["vocab_size"], manifest["eos_id"], manifest["pad_id"])
    if seq > max_positions(hf):
        raise ConfigError(
            f"data.seq_len={seq} (from the prep manifest) exceeds the model's {max_positions(hf)} positions; "
            "re-run prep with a smaller data.seq_len or raise model.max_positions"
        )
    t = cfg.train
    blocks = manifest["blocks"]
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


def build_trainer(
    cfg: RunConfig, data_dir: Path, manifest: dict[str, Any], out: Path, callbacks: list[Any] | None = None
) -> Any:
    """The ``TorchTrainer`` for one run: shared by ``fit`` and each Ray Tune trial."""
    import ray.data
    import ray.train
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rayllm.train.loop import train_loop

    t = cfg.train
    lo, hi = t.worker_range
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = t.gpus_per_worker
    resources.update(t.resources_per_worker)
    splits = {}
    for split in ("train", "val"):
        ds = read_blocks(data_dir / split)  # file order, also when materialized here
        size_gb = manifest["blocks"][split] * manifest["block_len"] * 4 / 2**30
        splits[split] = ds.materialize() if size_gb < t.cache_data_gb else ds
    return TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.dump(), "manifest": manifest, "out_dir": str(out)},
        scaling_config=ScalingConfig(
            num_workers=lo if lo == hi else (lo, hi),
            use_gpu=t.use_gpu,
            resources_per_worker=resources,
            elastic_resize_monitor_interval_s=t.elastic_monitor_s,
        ),
        run_config=ray.train.RunConfig(
            name=RUN_NAME,
            storage_path=storage_of(cfg, out),
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            callbacks=callbacks,
        ),
        datasets=splits,
        # Every worker reads the whole (deterministic) stream and takes its slice per step:
        # the data position then survives restarts and world-size changes exactly.
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ordered_ingest()),
    )


def ordered_ingest() -> Any:
    """Train's default ingest options with ``preserve_order`` on. Ray Train copies that flag from
    the driver's DataContext, where it is off unless something else turned it on: without it the
    "deterministic" stream is reordered by whichever read task finishes first."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def storage_of(cfg: RunConfig, out: Path) -> str:
    return cfg.train.storage or str(out / "ray")


def _clear_storage(storage: str) -> None:
    """``train.resume: false``: forget the previous run's checkpoints, wherever they live."""
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(storage) if "://" in storage else (pafs.LocalFileSystem(), storage)
    if fs.get_file_info(f"{path}/{RUN_NAME}").type != pafs.FileType.NotFound:
        fs.delete_dir(f"{path}/{RUN_NAME}")


def fit(cfg: RunConfig) -> dict[str, Any]:
    """Train (resuming when the run dir holds checkpoints), export, and write ``train/summary.json``."""
    from rayllm.train.export import export_checkpoint

    t = cfg.train
    data_dir = data_dir_of(cfg)
    manifest = load_manifest(data_dir)
    check_compatible(cfg, manifest)
    out = save_stage_config(cfg, "train")
    if not t.resume:
        _clear_storage(storage_of(cfg, out))
        for p in (out / "metrics.jsonl", out / "tensorboard"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    t0 = time.time()
    with ray_session(cfg.cluster, use_gpu=t.use_gpu):
        result = build_trainer(cfg, data_dir, manifest, out).fit()
    seconds = time.time() - t0
    rows = read_metrics(out / "metrics.jsonl")
    summary = summarize(rows)
    plot_losses(rows, out / "loss.png")
    summary.update(seconds=round(seconds, 1), data_dir=str(data_dir), checkpoint=None, export_dir=None)
    if result.checkpoint is not None:
        # The latest checkpoint Ray registered; as_directory() downloads it when storage is remote.
        summary["checkpoint"] = result.checkpoint.path
        if t.export:
            with result.checkpoint.as_directory() as d:
                export = export_checkpoint(Path(d), out / "export", data_dir / "tokenizer")
            summary["export_dir"] = str(export)
    if result.error:
        raise result.error
    write_summary(out, summary)
    return summary


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
        "resumes": sum(1 for r in rows if r.get("event") == "resume"),
    }
