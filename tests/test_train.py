"""train: real DeepSpeed (gloo) in real Ray Train workers on a tiny GPT, from the tiny prepped corpus."""

from __future__ import annotations

import itertools
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import tiny_config

from rayllm.config import RunConfig, load_config
from rayllm.errors import ConfigError, RunDirError


def run_cfg(prepped: RunConfig, run_dir: Path, model: dict | None = None, **train) -> RunConfig:
    """A train config reading the shared prepped data, writing to its own run dir."""
    cfg = prepped.model_copy(deep=True)
    raw = cfg.dump()
    raw["run_dir"] = str(run_dir)
    raw["model"].update(model or {})
    raw["train"].update(data_dir=str(Path(prepped.run_dir) / "prep"), **train)
    return RunConfig.model_validate(raw)


@pytest.fixture(autouse=True)
def unordered_driver_context():
    """Ray Data's default, which a standalone `rayllm train` sees: nothing may rely on the driver's
    preserve_order for the one deterministic stream that exact resume and resizing depend on."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = False
    yield
    ctx.execution_options.preserve_order = saved


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "train" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# In the default suite: ZeRO-0's engine trains in-process in test_model, ZeRO-2 is what every other
# train test runs, and ZeRO-3 with both offloads is the export test's.
@pytest.mark.slow
@pytest.mark.parametrize(
    "deepspeed",
    [
        {"zero_stage": 0},
        {"zero_stage": 1},
        {"zero_stage": 2},
        {"zero_stage": 3},
        {"zero_stage": 2, "offload_optimizer": True},
        {"zero_stage": 3, "offload_optimizer": True, "offload_params": True},
    ],
    ids=["zero0", "zero1", "zero2", "zero3", "zero2-offload", "zero3-offload-params"],
)
def test_loss_decreases_for_each_zero_stage(ray_cluster, prepped, tmp_path, deepspeed):
    from rayllm.train.stage import run as fit

    cfg = run_cfg(prepped, tmp_path, deepspeed=deepspeed, export=False)
    s = fit(cfg)
    assert s["steps"] == 12
    assert s["train_loss_last"] < s["train_loss_first"] - 0.3
    assert s["val_loss_last"] < s["val_loss_first"] - 0.3
    assert s["tokens_per_second"] > 0 and 0 < s["mfu"] < 1
    rows = [r for r in metrics(tmp_path) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 4, 6, 8, 10, 12]
    assert all(r["world"] == 2 for r in rows)
    # every rank's shard is in the checkpoint, not only rank 0's
    ckpt = Path(s["checkpoint"]) / "ckpt"
    if deepspeed["zero_stage"] > 0:
        assert len(list(ckpt.glob("*zero_pp_rank_*optim_states.pt"))) == 2


def test_zero3_export_round_trip_and_a_corrupt_checkpoint(ray_cluster, prepped, tmp_path):
    """ZeRO-3 with the optimizer and the parameters offloaded trains on 2 workers, checkpoints every
    rank's shard, and exports a folder that loads with plain transformers and reproduces the
    reported val loss. Then a bit flip in the newest checkpoint: the resume skips it (saying which
    one and why) and continues from the checkpoint before it, also when that newest one had finished
    the run; export refuses the corrupt one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayllm.rundir import RunDir
    from rayllm.train.checkpoint import registered
    from rayllm.train.export import export_checkpoint
    from rayllm.train.stage import run as fit

    deepspeed = {"zero_stage": 3, "offload_optimizer": True, "offload_params": True}
    cfg = run_cfg(prepped, tmp_path, deepspeed=deepspeed, schedule={"decay": "wsd"})
    s = fit(cfg)
    assert s["steps"] == 12 and s["val_loss_last"] < s["val_loss_first"] - 0.3
    assert s["tokens_per_second"] > 0 and 0 < s["mfu"] < 1
    rows = [r for r in metrics(tmp_path) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 4, 6, 8, 10, 12] and all(r["world"] == 2 for r in rows)
    assert len(list((Path(s["checkpoint"]) / "ckpt").glob("*zero_pp_rank_*optim_states.pt"))) == 2
    export = Path(s["export_dir"])
    assert (export / "model.safetensors").is_file() and (export / "tokenizer.json").is_file()
    # The run's config travels with the weights: `rayllm train -c` of it trains the same way.
    sidecar = load_config([export / "rayllm_config.yaml"])
    assert sidecar.train == cfg.train and sidecar.model == cfg.model
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    AutoTokenizer.from_pretrained(export)
    t = prepped.train
    rows = int(t.eval_batches * t.global_batch)
    val = sorted((Path(prepped.run_dir) / "prep" / "val").glob("*.parquet"))
    blocks = np.stack(pq.read_table(val[0]).column("input_ids").to_numpy(zero_copy_only=False)[:rows])
    x = torch.from_numpy(blocks.astype(np.int64))
    with torch.no_grad():
        logits = model(input_ids=x[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
    assert loss.item() == pytest.approx(s["val_loss_last"], rel=1e-4)

    newest, previous = registered(RunDir.of(cfg).storage)[:2]
    assert newest.path == s["checkpoint"]
    shard = sorted(Path(newest.path, "ckpt").glob("*optim_states.pt"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(RunDirError, match=r"corrupt checkpoint .*optim_states\.pt"):
        export_checkpoint(Path(newest.path), tmp_path / "export", None)
    # The same step count again: the corrupt checkpoint is not taken as the run's finished one.
    again = fit(cfg.model_copy(update={"train": cfg.train.model_copy(update={"export": False})}))
    assert again["steps"] == 12 and again["checkpoint"] != newest.path
    events = [r for r in metrics(tmp_path) if r.get("event")]
    skipped = [r for r in events if r["event"] == "checkpoint_skipped"]
    assert len(skipped) == 1 and Path(newest.path).name in skipped[0]["reason"]
    assert [r["step"] for r in events if r["event"] == "resume"] == [6]  # the previous checkpoint's step
    assert Path(previous.path).name < Path(newest.path).name


@pytest.mark.slow
def test_continue_from_local_hf_folder_with_bf16_and_activation_checkpointing(ray_cluster, prepped, tmp_path):
    """model.path: a local HF folder (an export) is the starting point; bf16 + checkpointing on CPU."""
    from rayllm.train.stage import run as fit

    first = fit(run_cfg(prepped, tmp_path / "a", deepspeed={"zero_stage": 1}))
    cfg = run_cfg(
        prepped,
        tmp_path / "b",
        model={"path": first["export_dir"]},
        deepspeed={"zero_stage": 2, "precision": "bf16", "activation_checkpointing": True},
    )
    s = fit(cfg)
    # starts where the exported model ended, not from a random init
    assert s["val_loss_first"] == pytest.approx(first["val_loss_last"], rel=0.02)
    assert s["val_loss_last"] < s["val_loss_first"]


def test_checkpoints_to_a_storage_uri_resume_and_export(ray_cluster, prepped, tmp_path):
    """train.storage as a URI (file:// here; s3:// and gs:// take the same pyarrow path). The resumed
    run's first checkpoint comes before its next validation and still reports val_loss and the
    training loss, the restored checkpoint's: Ray Tune fails a trial on a report without its metric."""
    from rayllm.rundir import RunDir
    from rayllm.train.export import export_run
    from rayllm.train.stage import run as fit
    from rayllm.train.stage import trainer

    remote = tmp_path / "bucket"
    uri = f"file://{remote}"
    first = fit(run_cfg(prepped, tmp_path / "run", storage=uri, max_steps=6, export=False))
    assert first["checkpoint"].startswith(str(remote / "train"))
    assert list(remote.glob("train/checkpoint_*/ckpt/*optim_states.pt"))
    assert not (tmp_path / "run" / "train" / "ray").exists()
    cfg = run_cfg(
        prepped, tmp_path / "run", storage=uri, max_steps=10, checkpoint_every=2, eval_every=5, log_every=5
    )
    result = trainer(cfg, RunDir.of(cfg).start_stage(cfg, "train")).fit()
    reports = {m["step"]: m for _, m in result.best_checkpoints}
    assert sorted(reports) == [8, 10]  # the two newest kept; step 8 neither logs nor validates
    assert reports[8]["val_loss"] == pytest.approx(first["val_loss_last"], rel=1e-9)
    assert reports[8]["loss"] == pytest.approx(first["train_loss_last"], rel=1e-9)
    assert reports[10]["val_loss"] != reports[8]["val_loss"]  # the last step validates anew
    assert [r["step"] for r in metrics(tmp_path / "run") if r.get("event") == "resume"] == [6]
    out = export_run(str(tmp_path / "run"), str(tmp_path / "exported"))
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()

    # Run again with nothing left to train: exported from the step-10 checkpoint, no workers started.
    again = fit(cfg)
    assert again["steps"] == 10 and again["checkpoint"] == result.checkpoint.path
    assert Path(again["export_dir"], "model.safetensors").is_file()
    assert [r["step"] for r in metrics(tmp_path / "run") if r.get("event") == "resume"] == [6]


@pytest.mark.slow  # the config's Llama trains in-process in test_model, a Llama on Ray in test_tasks
def test_llama_family_trains(ray_cluster, prepped, tmp_path):
    """The config-defined Llama shape (RMSNorm, RoPE, SwiGLU, grouped-query attention) under ZeRO-2."""
    from rayllm.train.stage import run as fit

    s = fit(run_cfg(prepped, tmp_path, model={"family": "llama", "n_kv_head": 1}, export=False))
    assert s["val_loss_last"] < s["val_loss_first"] - 0.3
    hf = json.loads((Path(s["checkpoint"]) / "config.json").read_text())
    assert hf["model_type"] == "llama" and hf["num_key_value_heads"] == 1


def test_model_folder_with_a_smaller_vocabulary_is_rejected(prepped, tmp_path):
    from transformers import GPT2Config

    from rayllm.train.stage import run as fit

    GPT2Config(vocab_size=100, n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "small")
    with pytest.raises(ConfigError, match=r"has vocab_size=100 but the data's tokenizer has 512 tokens"):
        fit(run_cfg(prepped, tmp_path / "run", model={"path": str(tmp_path / "small")}))


@pytest.mark.slow
def test_torch_compile(ray_cluster, prepped, tmp_path):
    """deepspeed.compile: true compiles the engine's module (inductor on CPU, ~30 s of compile here)."""
    from rayllm.train.stage import run as fit

    s = fit(run_cfg(prepped, tmp_path, deepspeed={"zero_stage": 2, "compile": True}, export=False))
    assert s["steps"] == 12 and s["val_loss_last"] < s["val_loss_first"] - 0.3


@pytest.mark.slow
def test_resize_two_one_two_workers(ray_cluster, prepped, tmp_path):
    """Train at 2 workers, resume the same run at 1 (universal checkpoint), then back at 2; equal to an
    unbroken run that streams its data instead of materializing it."""
    from rayllm.train.stage import run as fit

    const = {"warmup_steps": 0, "decay": "constant"}
    # The reference streams its data from the parquet files (below train.cache_data_gb it would be
    # materialized): the same rows in the same order either way, or the losses below would differ.
    ref = fit(run_cfg(prepped, tmp_path / "ref", max_steps=18, schedule=const, export=False, cache_data_gb=0))
    run = tmp_path / "run"
    fit(run_cfg(prepped, run, max_steps=6, schedule=const, export=False))
    one = fit(run_cfg(prepped, run, max_steps=12, schedule=const, workers=1, export=False))
    two = fit(run_cfg(prepped, run, max_steps=18, schedule=const, export=False))
    resumes = [r for r in metrics(run) if r.get("event") == "resume"]
    assert [(r["step"], r["from_world"], r["world"]) for r in resumes] == [(6, 2, 1), (12, 1, 2)]
    assert one["steps"] == 12 and two["steps"] == 18
    # The same global batch and data order at any world size: the loss curve matches the
    # uninterrupted run up to floating-point reduction order.
    assert two["val_loss_last"] == pytest.approx(ref["val_loss_last"], rel=2e-3)


@pytest.mark.slow
def test_elastic_range_starts_at_the_capacity_it_finds(ray_cluster, prepped, tmp_path):
    """workers=[1, 2] on a 2-CPU node: Ray Train V2's elastic policy starts 2 and the loop adapts."""
    from rayllm.train.stage import run as fit

    s = fit(run_cfg(prepped, tmp_path, workers=[1, 2], export=False))
    assert s["steps"] == 12
    worlds = {r["world"] for r in metrics(tmp_path) if "loss" in r}
    assert worlds == {2}


def _worker_pids() -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [a.pid for a in actors]


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe",
    [{}, {"optimizer": {"name": "muon", "lr": 3e-3}, "schedule": {"decay": "wsd", "warmup_steps": 20}}],
    ids=["adamw-cosine", "muon-wsd"],
)
def test_worker_killed_mid_run_resumes_exactly(ray_cluster, prepped, tmp_path, recipe):
    """SIGKILL a worker after a registered checkpoint: the run resumes there and ends like an unbroken one."""
    from rayllm.rundir import RunDir
    from rayllm.train import checkpoint
    from rayllm.train.stage import run as fit

    common = dict(
        max_steps=300,
        log_every=10,
        eval_every=50,
        checkpoint_every=50,
        export=False,
        max_failures=2,
        **recipe,
    )
    # dropout makes the comparison depend on the restored per-rank RNG streams too
    ref = fit(run_cfg(prepped, tmp_path / "ref", model={"dropout": 0.1}, **common))
    run = tmp_path / "run"
    result: dict = {}
    thread = threading.Thread(
        target=lambda: result.update(fit(run_cfg(prepped, run, model={"dropout": 0.1}, **common)))
    )
    thread.start()
    deadline = time.time() + 240
    killed_at = None
    storage = RunDir.of(run_cfg(prepped, run)).storage
    while time.time() < deadline and thread.is_alive() and killed_at is None:
        steps = [r["step"] for r in metrics(run) if "loss" in r]
        if steps and steps[-1] < 250 and checkpoint.latest(storage) is not None:
            pids = _worker_pids()
            if pids:
                os.kill(pids[-1], signal.SIGKILL)
                killed_at = steps[-1]
        time.sleep(0.1)
    thread.join(timeout=300)
    assert killed_at is not None, "the run finished before a worker could be killed"
    resumes = [r for r in metrics(run) if r.get("event") == "resume"]
    assert len(resumes) == 1
    # at most one checkpoint interval lost: it resumed from the last checkpoint before the kill
    assert resumes[0]["step"] % 50 == 0 and 0 < resumes[0]["step"] <= killed_at + 10
    assert killed_at - resumes[0]["step"] <= 50 + 10
    assert result["steps"] == 300 and result["resumes"] == 1
    assert result["val_loss_last"] == pytest.approx(ref["val_loss_last"], rel=1e-5)
    assert result["train_loss_last"] == pytest.approx(ref["train_loss_last"], rel=1e-5)


def test_a_resume_reads_the_split_from_its_position_not_from_the_start(ray_cluster, tmp_path):
    """``rows_from`` is the resume's data-level skip: the global batches of rows ``[start:]``, in
    order, from a start at a shard boundary, inside a row group or a block, in the last one; from a
    streamed split (shards before ``start`` are not opened: here one is overwritten) and from a
    materialized one (with no Ray task: every CPU is held, as training workers may hold them)."""
    import ray
    from ray.data.dataset import MaterializedDataset

    from rayllm.prep.shards import ShardWriter
    from rayllm.rundir import PackedData
    from rayllm.train.loop import rows_from

    data = PackedData(tmp_path / "prep")
    writer = ShardWriter(data.split_dir("train"), block_len=3)
    rows = np.arange(3 * 6000, dtype=np.int32).reshape(6000, 3)
    for part in (rows[:2500], rows[2500:2600], rows[2600:]):  # row groups of 1024: 1024, 1024, 452
        writer.write({"input_ids": part})
    manifest = {"vocab_size": 10, "eos_id": 0, "pad_id": 0, "seq_len": 2, "block_len": 3}
    data.write_manifest({**manifest, "blocks": {"train": 6000, "val": 0}, "shards": writer.shards})

    def read(ds, start: int, batch: int = 64) -> np.ndarray:
        batches = [b["input_ids"] for b in rows_from(ds, data, start, batch)]
        assert all(b.shape == (batch, 3) for b in batches)
        return np.concatenate(batches) if batches else np.zeros((0, 3), np.int32)

    def want(start: int, batch: int = 64) -> np.ndarray:
        return rows[start : start + (6000 - start) // batch * batch]

    materialized = data.read("train").repartition(7).materialize()  # blocks across the shards
    held = data.dataset("train", cache_gb=2.0)  # this small a split: read by the driver, in one block
    assert held.num_blocks() == 1 and not isinstance(data.dataset("train", cache_gb=0), MaterializedDataset)

    class Holder:  # holds every CPU, as training workers may
        pass

    hold = ray.remote(num_cpus=ray.cluster_resources()["CPU"])(Holder).remote()  # once they are free
    try:
        ray.get(hold.__ray_ready__.remote(), timeout=60)
        for start, ds in itertools.product(
            (0, 1, 1023, 1024, 1500, 2499, 2500, 2550, 2600, 5900, 5999), (materialized, held)
        ):
            np.testing.assert_array_equal(read(ds, start), want(start))
    finally:
        ray.kill(hold)
    for start in (0, 1023, 1500, 2550, 2600, 5900, 6000):  # 6000: a checkpoint at the epoch's end
        np.testing.assert_array_equal(read(data.read("train"), start), want(start))
    assert read(materialized, 6000).shape == (0, 3)
    (data.dir / writer.shards[0]["path"]).write_bytes(b"not parquet")  # a resume past it never opens it
    np.testing.assert_array_equal(read(data.read("train", 2500), 2500), want(2500))
    assert data.read("train", 6000).count() == 0  # the end: no rows
    with pytest.raises(RunDirError, match="row 6001 is past the end of the train split"):
        data.read("train", 6001)


def test_bad_configuration_fails_before_workers(prepped, tmp_path):
    from rayllm.train.stage import run as fit

    with pytest.raises(ConfigError, match=r"train\.global_batch=4096 exceeds the \d+ train blocks"):
        fit(run_cfg(prepped, tmp_path, global_batch=4096, micro_batch=8))
    raw = prepped.dump()
    raw["model"]["max_positions"] = 16
    raw["data"]["seq_len"] = 16
    raw["run_dir"] = str(tmp_path)
    raw["train"]["data_dir"] = str(Path(prepped.run_dir) / "prep")
    with pytest.raises(ConfigError, match=r"data\.seq_len=32 \(from the prep manifest\) exceeds"):
        fit(RunConfig.model_validate(raw))
    with pytest.raises(RunDirError, match=r"manifest\.json not found"):
        fit(tiny_config(tmp_path / "empty", tmp_path))


@pytest.mark.slow
def test_hung_worker_fails_the_collective_within_the_timeout(ray_cluster, prepped, tmp_path):
    """SIGSTOP a worker: its peer's all-reduce times out after train.collective_timeout_s, Ray Train
    restarts the group from the last checkpoint and the run finishes (the default would wait 30 min)."""
    from rayllm.rundir import RunDir
    from rayllm.train.checkpoint import registered
    from rayllm.train.stage import run as fit

    common = dict(
        max_steps=300, log_every=5, eval_every=50, checkpoint_every=20, export=False, max_failures=1,
        collective_timeout_s=10,
    )  # fmt: skip
    run = tmp_path / "run"
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(fit(run_cfg(prepped, run, **common))))
    thread.start()
    stopped = None
    deadline = time.time() + 240
    storage = RunDir.of(run_cfg(prepped, run)).storage
    while time.time() < deadline and stopped is None and thread.is_alive():
        steps = [r["step"] for r in metrics(run) if "loss" in r]
        # A frozen worker cannot report: stop one once a checkpoint is registered, not while it is.
        if steps and steps[-1] < 150 and registered(storage) and (pids := _worker_pids()):
            os.kill(pids[-1], signal.SIGSTOP)
            stopped = time.time()
        time.sleep(0.1)
    thread.join(timeout=400)
    assert stopped is not None, "the run ended before a worker could be stopped"
    resume = [r for r in metrics(run) if r.get("event") == "resume"]
    assert len(resume) == 1 and resume[0]["step"] % 20 == 0 and result["steps"] == 300
    assert resume[0]["time"] - stopped < 10 + 60  # the timeout, then a restart of the worker group


def test_a_saved_checkpoint_waits_until_ray_train_has_registered_it(tmp_path, monkeypatch, caplog):
    """A rank goes on only once Ray Train's snapshot lists its step (else a fault in the next poll
    interval loses more than one checkpoint interval); never registered, it warns and goes on."""
    from rayllm.train.checkpoint import RUN, wait_registered

    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    snapshot = tmp_path / RUN / "checkpoint_manager_snapshot.json"
    snapshot.parent.mkdir()

    def register(steps: list[int]) -> None:
        results = [{"checkpoint_dir_name": f"checkpoint_{s}", "metrics": {"step": s}} for s in steps]
        snapshot.write_text(json.dumps({"checkpoint_results": results}))

    # Ray Train rewrites the snapshot in place, so a poll can read it half-written (CI did)
    snapshot.write_text('{"checkpoint_results": [')
    later = threading.Timer(0.5, register, args=([25, 50],))  # the controller's next poll
    later.start()
    t0 = time.monotonic()
    assert wait_registered(str(tmp_path), 50) is True
    assert 0.4 < time.monotonic() - t0 < 1.9
    t0 = time.monotonic()
    assert wait_registered(str(tmp_path), 75) is False  # 10 intervals of 0.2 s, then on
    assert 1.9 < time.monotonic() - t0 < 3.0
    assert "the checkpoint of step 75 is not registered after 2 s" in caplog.text
