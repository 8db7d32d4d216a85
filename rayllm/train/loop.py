"""The per-worker training loop: runs inside each Ray Train worker process.

Data order is one deterministic global stream per epoch (the packed blocks, optionally through a
seeded local shuffle). Optimizer step ``s`` consumes rows ``[s*B, (s+1)*B)`` of it and rank ``r`` of
``W`` takes its contiguous slice, so the data position is a single number (rows consumed this epoch)
that means the same thing at any world size: resume and elastic resizing continue exactly where the
run stopped, with no repeated or skipped data.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rayllm.config import RunConfig
from rayllm.model import build_model, count_params, flops_per_token, model_config
from rayllm.train.parallel import build_optimizer, deepspeed_config, lr_lambda, peak_flops

TAG = "ckpt"
STATE_FILE = "rayllm_state.json"
UNIVERSAL_INFO = "universal_checkpoint_info"


@dataclass
class TrainState:
    """What, beyond DeepSpeed's own shards, makes a resume exact."""

    step: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0
    tokens_seen: int = 0
    world: int = 0
    zero_stage: int = 0


def lm_loss(engine: Any, x: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over packed blocks of ``seq_len + 1`` tokens."""
    logits = engine(input_ids=x[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))


def _rank_slicer(rank: int, world: int):
    def collate(batch: dict[str, np.ndarray]) -> torch.Tensor:
        ids = batch["input_ids"]
        if ids.dtype == object:
            ids = np.stack(ids)
        per = len(ids) // world
        return torch.from_numpy(np.ascontiguousarray(ids[rank * per : (rank + 1) * per]).astype(np.int64))

    return collate


class Worker:
    """One rank's training state: the DeepSpeed engine, data iterators, metrics sinks."""

    def __init__(self, config: dict[str, Any]) -> None:
        import deepspeed
        import ray.train

        self.cfg = RunConfig.model_validate(config["cfg"])
        self.manifest = config["manifest"]
        self.out_dir = Path(config["out_dir"])
        t = self.t = self.cfg.train
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        if t.use_gpu and torch.cuda.is_available():
            self.device = torch.device("cuda", ctx.get_local_rank())
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
            # One intra-op thread per reserved CPU (rounded up: 0.5 CPU leaves room for Ray Data).
            torch.set_num_threads(max(1, math.ceil(t.cpus_per_worker)))
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        self.metrics = self.tb = None
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            from rayllm.runtime import MetricsWriter

            self.metrics = MetricsWriter(self.out_dir / "metrics.jsonl")
            self.tb = SummaryWriter(str(self.out_dir / "tensorboard"))
        self.seq_len = int(self.manifest["seq_len"])
        self.accum = t.grad_accum(self.world)

        torch.manual_seed(t.seed)
        self.hf_config = model_config(
            self.cfg.model, self.manifest["vocab_size"], self.manifest["eos_id"], self.manifest["pad_id"]
        )
        model = build_model(self.cfg.model, self.hf_config)
        if t.deepspeed.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        self.flops_per_token = flops_per_token(self.hf_config, count_params(model), self.seq_len)

        self.state = TrainState(world=self.world, zero_stage=t.deepspeed.zero_stage)
        ckpt = ray.train.get_checkpoint()
        saved: TrainState | None = None
        if ckpt is not None:
            with ckpt.as_directory() as d:
                saved = TrainState(**json.loads((Path(d) / STATE_FILE).read_text()))
        resharding = saved is not None and saved.world != self.world and saved.zero_stage > 0
        ds_config = deepspeed_config(t, self.world, load_universal=resharding)
        optimizer = None if t.deepspeed.offload_optimizer else build_optimizer(model, t.optimizer)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            model_parameters=None if optimizer else [p for p in model.parameters() if p.requires_grad],
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
                opt, lr_lambda(t.schedule, t.max_steps)
            ),
            config=ds_config,
        )
        if t.deepspeed.compile:
            self.engine.compile()
        if ckpt is not None and saved is not None:
            self._restore(ckpt, saved, resharding)

        self.train_it = ray.train.get_dataset_shard("train")
        self.val_it = ray.train.get_dataset_shard("val")
        self.collate = _rank_slicer(self.rank, self.world)
        self._val: list[torch.Tensor] | None = None
        self.peak = peak_flops(self.device, t.deepspeed.precision) * self.world

    # ------------------------------------------------------------------------------ checkpoints
    def _restore(self, ckpt: Any, saved: TrainState, resharding: bool) -> None:
        with ckpt.as_directory() as d:
            load_dir, tag = Path(d), TAG
            with tempfile.TemporaryDirectory() as tmp:
                if resharding:
                    load_dir, tag = _to_universal(Path(d), Path(tmp)), f"{TAG}_universal"
                path, _ = self.engine.load_checkpoint(
                    str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
                )
                if path is None:
                    raise RuntimeError(f"DeepSpeed could not load checkpoint {load_dir}/{tag}")
            # RNG streams (dropout, sampling) continue per rank when the world size is unchanged;
            # after a resize ranks map to different data, so fresh seeded streams are as good.
            rng = Path(d) / f"rng_rank{self.rank}.pt"
            if saved.world == self.world and rng.is_file():
                _set_rng_state(torch.load(rng, weights_only=False))
        self.state = TrainState(**{**asdict(saved), "world": self.world})
        self._log(event="resume", step=saved.step, from_world=saved.world, world=self.world)

    def checkpoint(self, metrics: dict[str, Any]) -> None:
        import ray.train

        with tempfile.TemporaryDirectory() as d:
            # The universal-checkpoint marker lets ds_to_universal reshard this checkpoint later.
            client = {"rayllm": asdict(self.state), UNIVERSAL_INFO: {"universal_checkpoint_version": 0.4}}
            self.engine.save_checkpoint(d, tag=TAG, client_state=client)
            torch.save(_rng_state(), Path(d) / f"rng_rank{self.rank}.pt")
            if self.rank == 0:
                (Path(d) / STATE_FILE).write_text(json.dumps(asdict(self.state)))
                self.hf_config.save_pretrained(d)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    # ------------------------------------------------------------------------------------- data
    def _epoch_batches(self, it: Any, epoch: int, skip: int = 0):
        shuffle = self.t.shuffle_buffer
        batches = it.iter_torch_batches(
            batch_size=self.t.global_batch,
            drop_last=True,
            collate_fn=self.collate,
            prefetch_batches=2,
            local_shuffle_buffer_size=shuffle or None,
            local_shuffle_seed=self.t.seed + epoch if shuffle else None,
        )
        for i, x in enumerate(batches):
            if i >= skip:
                yield x

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss over the first ``eval_batches`` global batches of val: the same rows at any world size."""
        if self._val is None:
            # The same rows every time: read them once instead of re-running a Ray Data pipeline.
            self._val = list(itertools.islice(self._epoch_batches(self.val_it, 0), self.t.eval_batches))
        self.engine.eval()
        total = torch.zeros(3, dtype=torch.float64)
        for x in self._val:
            for m in range(0, len(x), self.t.micro_batch):
                mb = x[m : m + self.t.micro_batch].to(self.device)
                logits = self.engine(input_ids=mb[:, :-1]).logits.float()
                targets = mb[:, 1:]
                loss = F.cross_entropy(
                    logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"
                )
                correct = (logits.argmax(-1) == targets).sum()
                total += torch.tensor([loss.item(), targets.numel(), correct.item()], dtype=torch.float64)
        self.engine.train()
        total = self._all_reduce(total)
        loss = (total[0] / total[1]).item()
        return {
            "val_loss": loss,
            "val_perplexity": float(np.exp(min(loss, 50.0))),
            "val_accuracy": (total[2] / total[1]).item(),
        }

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if self.device.type == "cuda":
            t = t.to(self.device)
        dist.all_reduce(t)
        return t.cpu()

    def _log(self, **metrics: Any) -> None:
        if self.metrics is None:
            return
        self.metrics.write(**metrics)
        step = metrics.get("step", self.state.step)
        for k, v in metrics.items():
            if isinstance(v, int | float) and k != "step":
                self.tb.add_scalar(f"train/{k}", v, step)

    # ------------------------------------------------------------------------------------- loop
    def run(self) -> None:
        import ray.train

        t, s = self.t, self.state
        if s.step == 0:
            self._log(step=0, **self.evaluate(), world=self.world)
        window_loss, window_steps, window_time = 0.0, 0, 0.0
        while s.step < t.max_steps:
            finished_epoch = True
            for x in self._epoch_batches(self.train_it, s.epoch, skip=s.samples_in_epoch // t.global_batch):
                t0 = time.perf_counter()
                x = x.to(self.device, non_blocking=True)
                step_loss = 0.0
                for m in range(self.accum):
                    loss = lm_loss(self.engine, x[m * t.micro_batch : (m + 1) * t.micro_batch])
                    self.engine.backward(loss)
                    self.engine.step()
                    step_loss += loss.item() / self.accum
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                window_time += time.perf_counter() - t0
                window_loss += step_loss
                window_steps += 1
                s.step += 1
                s.samples_in_epoch += t.global_batch
                s.tokens_seen += t.global_batch * self.seq_len
                metrics: dict[str, Any] = {}
                if s.step % t.log_every == 0 or s.step == 1 or s.step == t.max_steps:
                    metrics = self._train_metrics(window_loss, window_steps, window_time)
                    window_loss, window_steps, window_time = 0.0, 0, 0.0
                if s.step % t.eval_every == 0 or s.step == t.max_steps:
                    metrics.update(self.evaluate())
                if metrics:
                    self._log(**metrics)
                if s.step % t.checkpoint_every == 0 or s.step == t.max_steps:
                    self.checkpoint(metrics or {"step": s.step})
                elif "val_loss" in metrics:
                    ray.train.report(metrics)
                if s.step >= t.max_steps:
                    finished_epoch = False
                    break
            if finished_epoch:
                s.epoch += 1
                s.samples_in_epoch = 0
        if self.tb is not None:
            self.tb.close()
            self.metrics.close()

    def _train_metrics(self, loss_sum: float, steps: int, seconds: float) -> dict[str, Any]:
        s = self.state
        loss = self._all_reduce(torch.tensor([loss_sum / max(steps, 1)], dtype=torch.float64))
        tokens_per_s = steps * self.t.global_batch * self.seq_len / max(seconds, 1e-9)
        grad_norm = self.engine.get_global_grad_norm()
        out = {
            "step": s.step,
            "epoch": s.epoch,
            "loss": loss.item() / self.world,
            "lr": self.scheduler.get_last_lr()[0],
            "tokens_per_second": tokens_per_s,
            "step_time": seconds / max(steps, 1),
            "mfu": self.flops_per_token * tokens_per_s / self.peak,
            "tokens_seen": s.tokens_seen,
            "world": self.world,
            "memory_mb": _memory_mb(self.device),
        }
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
        return out


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


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _to_universal(ckpt_dir: Path, tmp: Path) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format, loadable at any DP world size."""
    import argparse

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


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point (``train_loop_per_worker``)."""
    Worker(config).run()
