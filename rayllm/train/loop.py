"""The per-worker training loop: runs inside each Ray Train worker process, top to bottom.

Data order is one deterministic global stream per epoch (the packed blocks, optionally through a
seeded local shuffle). Optimizer step ``s`` consumes rows ``[s*B, (s+1)*B)`` of it and rank ``r`` of
``W`` takes its contiguous slice, so the data position is a single number (rows consumed this epoch)
that means the same thing at any world size: resume and elastic resizing continue exactly where the
run stopped, with no repeated or skipped data.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from rayllm.config import RunConfig, TrainConfig
from rayllm.model.build import add_adapters, build_model, count_params, flops_per_token, model_config
from rayllm.model.loss import NextTokenLoss, resolve_impl, shift
from rayllm.rundir import (
    INPUT_IDS,
    LOSS_MASK,
    METRICS,
    POSITION_IDS,
    TENSORBOARD,
    Manifest,
    MetricsWriter,
    PackedData,
    packed_columns,
)
from rayllm.train import checkpoint
from rayllm.train.checkpoint import TrainState
from rayllm.train.parallel import (
    cpu_runtime,
    import_deepspeed,
    parallelize,
    peak_flops,
    resolve_micro_batch,
)

log = logging.getLogger("rayllm.train")


class RankSlice:
    """Collate a global batch into this rank's slice of tensors (Ray pins and moves them to the device).

    ``tokens`` is the number of loss targets in the whole global batch, the same on every rank: each
    rank scales its loss by it so that the gradient is the mean over the global batch's targets, also
    when fine-tuning masks differ per example.
    """

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        cols = packed_columns(batch)
        per = len(cols[INPUT_IDS]) // self.world
        rows = slice(self.rank * per, (self.rank + 1) * per)
        mask = cols.get(LOSS_MASK)
        out = {
            name: torch.from_numpy(np.ascontiguousarray(cols[name][rows]).astype(np.int64))
            for name in (INPUT_IDS, POSITION_IDS, LOSS_MASK)
            if name in cols
        }
        total = mask[:, 1:].sum() if mask is not None else cols[INPUT_IDS][:, 1:].size
        out["tokens"] = torch.tensor(int(total), dtype=torch.int64)
        return out


class Worker:
    """One rank's training state: the DeepSpeed engine, its data, its metrics sinks.

    A plain constructor: ``build_worker`` makes the parts inside a Ray Train worker, and a test makes
    them on a one-rank process group, so the step tested is the step that trains.
    """

    def __init__(
        self,
        t: TrainConfig,
        engine: Any,
        scheduler: Any,
        *,
        device: torch.device,
        rank: int = 0,
        world: int = 1,
        seq_len: int,
        state: TrainState | None = None,
        flops_per_token: float = 0.0,
        peak: float = math.inf,
        hf_config: Any = None,
        storage: str = "",
        train: Any = None,
        val: Any = None,
        train_from: Callable[[int], Iterator[dict[str, np.ndarray]]] | None = None,
        metrics: MetricsWriter | None = None,
        tb: Any = None,
    ) -> None:
        self.t, self.engine, self.scheduler, self.device = t, engine, scheduler, device
        self.rank, self.world, self.seq_len = rank, world, seq_len
        self.state = state or TrainState(world=world, zero_stage=t.deepspeed.zero_stage)
        self.flops_per_token, self.hf_config, self.storage = flops_per_token, hf_config, storage
        self.train_it, self.val_it, self.metrics, self.tb = train, val, metrics, tb
        self.train_from = train_from
        self.accum = t.grad_accum(world)
        self.collate = RankSlice(rank, world)
        self._val: list[dict[str, torch.Tensor]] | None = None
        self.peak = peak  # FLOP/s of the whole group: MFU's denominator
        self.watchdog = Watchdog(t.collective_timeout_s, rank)

    # ------------------------------------------------------------------------------------- data
    def _epoch_batches(self, it: Any, epoch: int, skip: int = 0):
        """The epoch's global batches after the first ``skip``.

        A resume skips at the data level (``train_from``): its first step comes as soon at step
        100,000 as at step 10. With a shuffle buffer the order depends on every row before the
        position, so the batches before it are read and dropped instead."""
        shuffle = self.t.shuffle_buffer
        if skip and not shuffle and self.train_from is not None:
            for columns in self.train_from(skip * self.t.global_batch):
                yield self.collate(columns)
            return
        batches = it.iter_torch_batches(
            batch_size=self.t.global_batch,
            drop_last=True,
            collate_fn=self.collate,
            prefetch_batches=2,
            pin_memory=self.device.type == "cuda",
            local_shuffle_buffer_size=shuffle or None,
            local_shuffle_seed=self.t.seed + epoch if shuffle else None,
        )
        for i, batch in enumerate(batches):
            if i >= skip:
                yield batch

    def _micro_batches(self, batch: dict[str, torch.Tensor]):
        """(inputs, targets, position_ids) per micro-batch of this rank's slice, on the device."""
        mb = self.t.micro_batch
        for m in range(0, len(batch[INPUT_IDS]), mb):
            ids = batch[INPUT_IDS][m : m + mb].to(self.device, non_blocking=True)
            mask = batch[LOSS_MASK][m : m + mb].to(self.device) if LOSS_MASK in batch else None
            pos = batch[POSITION_IDS][m : m + mb, :-1].to(self.device) if POSITION_IDS in batch else None
            inputs, targets = shift(ids, mask)
            yield inputs, targets, pos

    # ------------------------------------------------------------------------------------- step
    def train_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One optimizer step over this rank's slice of the global batch; returns the summed NLL on
        the device (read only when logging: no host sync per step).

        ``engine.step()`` runs after every micro-batch, but DeepSpeed steps the optimizer (and the
        schedule) only at the accumulation boundary, the last micro-batch; before it, it only keeps
        the gradients."""
        # engine.backward divides by the accumulation steps and the gradient all-reduce averages
        # over ranks; this scale makes the result the mean over the global batch's targets.
        scale = self.accum * self.world / batch["tokens"].to(self.device).clamp(min=1)
        nll_sum = torch.zeros((), device=self.device)
        for inputs, targets, pos in self._micro_batches(batch):
            nll, _, _ = self.engine(inputs, targets, pos)
            self.engine.backward(nll * scale)
            self.engine.step()
            nll_sum += nll.detach()
        return nll_sum

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss over the first ``eval_batches`` global batches of val: the same rows at any world size."""
        if self._val is None:
            # The same rows every time: read them once instead of re-running a Ray Data pipeline.
            self._val = list(itertools.islice(self._epoch_batches(self.val_it, 0), self.t.eval_batches))
        self.engine.eval()
        total = torch.zeros(3, dtype=torch.float64, device=self.device)
        for batch in self._val:
            for inputs, targets, pos in self._micro_batches(batch):
                nll, count, correct = self.engine(inputs, targets, pos, accuracy=True)
                total += torch.stack([nll.double(), count.double(), correct.double()])
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
        t, s = self.t, self.state
        latest: dict[str, Any] = dict(s.reported)  # a resumed run's: its checkpoint's report
        if s.step == 0:
            with self.watchdog.armed("the first validation"):
                latest.update(self.evaluate())
                self._log(step=0, **latest, world=self.world)
        eval_at = set(t.eval_at)
        end = t.end_step
        window = _Window(self.device)
        while s.step < end:
            finished_epoch = True
            for batch in self._epoch_batches(
                self.train_it, s.epoch, skip=s.samples_in_epoch // t.global_batch
            ):
                with self.watchdog.armed(f"step {s.step + 1}"):
                    window.add(self.train_step(batch), batch["tokens"])
                s.step += 1
                s.samples_in_epoch += t.global_batch
                s.tokens_seen += t.global_batch * self.seq_len
                metrics: dict[str, Any] = {}
                if s.step % t.log_every == 0 or s.step == 1 or s.step == end:
                    with self.watchdog.armed("the metrics all-reduce"):
                        metrics = self._train_metrics(window)
                with window.paused():  # validation and checkpoints are not training time
                    if s.step % t.eval_every == 0 or s.step == end or s.step in eval_at:
                        with self.watchdog.armed("validation"):
                            metrics.update(step=s.step, **self.evaluate())
                    if metrics:
                        self._log(**metrics)
                    # A checkpoint is reported with the newest train and validation figures: its
                    # step need not be an eval or log step.
                    latest.update(metrics, step=s.step)
                    if s.step % t.checkpoint_every == 0 or s.step == end:
                        s.reported = dict(latest)
                        checkpoint.save(self.engine, s, self.rank, self.hf_config, self.storage)
                if s.step >= end:
                    finished_epoch = False
                    break
            if finished_epoch:
                s.epoch += 1
                s.samples_in_epoch = 0
        if self.tb is not None:
            self.tb.close()
            self.metrics.close()

    def _train_metrics(self, window: _Window) -> dict[str, Any]:
        s = self.state
        nll, tokens, steps, seconds = window.take(self._all_reduce)
        s.train_seconds += seconds
        tokens_per_s = steps * self.t.global_batch * self.seq_len / max(seconds, 1e-9)
        grad_norm = self.engine.get_global_grad_norm()
        out = {
            "step": s.step,
            "epoch": s.epoch,
            "loss": nll / max(tokens, 1),
            "lr": self.scheduler.get_last_lr()[0],
            "tokens_per_second": tokens_per_s,
            "step_time": seconds / max(steps, 1),
            "mfu": self.flops_per_token * tokens_per_s / self.peak,
            "tokens_seen": s.tokens_seen,
            "train_seconds": round(s.train_seconds, 3),
            "world": self.world,
            "memory_mb": _memory_mb(self.device),
        }
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
        return out


class _Window:
    """Loss and wall-clock time between two log lines, kept on the device until read.

    The clock runs from the end of the previous window, so waiting for data counts; time spent in
    validation and checkpoints is excluded (``paused``).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.nll = torch.zeros((), dtype=torch.float64, device=device)
        self.tokens = torch.zeros((), dtype=torch.float64, device=device)
        self.steps = 0
        self.start = time.perf_counter()
        self.excluded = 0.0

    def add(self, nll: torch.Tensor, tokens: torch.Tensor) -> None:
        self.nll += nll.double()
        self.tokens += tokens.to(self.device, torch.float64)
        self.steps += 1

    def take(self, all_reduce: Any) -> tuple[float, float, int, float]:
        """(NLL summed over all ranks, loss targets of the global batches, steps, seconds); resets."""
        totals = all_reduce(torch.stack([self.nll, self.tokens]))  # the one host sync per window
        seconds = time.perf_counter() - self.start - self.excluded
        # Every rank counted the global batch's targets; the NLL is per rank.
        out = (totals[0].item(), totals[1].item() / _world(), self.steps, seconds)
        self.nll.zero_()
        self.tokens.zero_()
        self.steps, self.start, self.excluded = 0, time.perf_counter(), 0.0
        return out

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - t0


class Watchdog:
    """Ends this worker when a step (whose collectives wait on every rank) runs past
    ``train.collective_timeout_s``, so that Ray Train restarts the group from the last checkpoint.

    The process group's own timeout does not cover the groups DeepSpeed creates (they get torch's
    30-minute default), nor a peer that stopped without closing its sockets; this does, on any
    backend. Only a process exit gets a thread out of a blocked collective.
    """

    def __init__(self, timeout_s: float, rank: int) -> None:
        self.timeout_s, self.rank = timeout_s, rank
        self.deadline: float | None = None
        self.what = ""
        threading.Thread(target=self._watch, name="rayllm-watchdog", daemon=True).start()

    @contextlib.contextmanager
    def armed(self, what: str) -> Iterator[None]:
        self.what, self.deadline = what, time.monotonic() + self.timeout_s
        try:
            yield
        finally:
            self.deadline = None

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout_s / 10))
            deadline = self.deadline
            if deadline is not None and time.monotonic() > deadline:
                print(
                    f"rayllm: rank {self.rank}: {self.what} made no progress for {self.timeout_s:g} s "
                    "(train.collective_timeout_s), likely a hung peer; ending this worker so that Ray "
                    "Train restarts from the last checkpoint",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(1)


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size()


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def rows_from(ds: Any, data: PackedData, start: int, batch: int) -> Iterator[dict[str, np.ndarray]]:
    """Global batches of ``batch`` rows (columns as 2-D arrays) of the train split from row ``start``
    on, whole batches only, without reading the rows before ``start``.

    A materialized split's blocks are fetched from the object store in this process, the ones
    before ``start`` skipped by their row counts (no Ray task: the workers may hold every CPU); a
    streamed one is read from the manifest's shard holding ``start`` on.
    """
    from ray.data.dataset import MaterializedDataset

    if isinstance(ds, MaterializedDataset):
        tables = _blocks_from(ds, start)
    else:  # at the end of the split (a checkpoint at an epoch's end) this reads no rows
        tables = data.read("train", start).iter_batches(batch_size=batch, batch_format="pyarrow")
    pending: list[pa.Table] = []
    rows = 0
    for table in tables:
        pending.append(table)
        rows += len(table)
        while rows >= batch:
            whole = pa.concat_tables(pending)
            yield packed_columns(whole.slice(0, batch))
            pending, rows = [whole.slice(batch)], rows - batch


def _blocks_from(ds: Any, start: int) -> Iterator[pa.Table]:
    import ray

    for bundle in ds.iter_internal_ref_bundles():
        for block in bundle.blocks:
            if start >= block.metadata.num_rows:
                start -= block.metadata.num_rows
                continue
            table = ray.get(block.ref)
            yield table.slice(start)
            start = 0


def build_worker(config: dict[str, Any]) -> Worker:
    """The parts of one rank, made inside a Ray Train worker: device, process group, metrics sinks,
    model (and adapters), micro-batch, the checkpoint to restore, the DeepSpeed engine, data shards."""
    import ray.train

    deepspeed = import_deepspeed()
    cfg = RunConfig.model_validate(config["cfg"])
    m = Manifest.model_validate(config["manifest"])
    storage, t = config["storage"], cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if t.use_gpu and torch.cuda.is_available():
        device = torch.device("cuda", ctx.get_local_rank())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # One intra-op thread per reserved CPU (rounded up: 0.5 CPU leaves room for Ray Data).
        cpu_runtime(max(1, math.ceil(t.cpus_per_worker)))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    metrics = tb = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        out_dir = Path(config["out_dir"])
        metrics, tb = MetricsWriter(out_dir / METRICS), SummaryWriter(str(out_dir / TENSORBOARD))

    torch.manual_seed(t.seed)
    hf_config = model_config(cfg.model, m.vocab_size, m.eos_id, m.pad_id)
    model = build_model(cfg.model, hf_config)
    if t.lora.r:
        model = add_adapters(model, t.lora)
    frozen = count_params(model, frozen=True) if t.lora.r else 0
    flops = flops_per_token(hf_config, count_params(model), m.seq_len, frozen)
    objective = NextTokenLoss(model, resolve_impl(t.loss, model, device))
    t = t.model_copy(update={"micro_batch": resolve_micro_batch(t, world, objective, device, m.seq_len)})

    ckpt, saved, events = ray.train.get_checkpoint(), None, []
    if ckpt is not None:
        ckpt, saved, skipped = checkpoint.select(ckpt, checkpoint.registered(storage))
        for reason in skipped:
            log.warning("skipping a corrupt checkpoint: %s", reason)
            events.append({"event": "checkpoint_skipped", "step": saved.step, "reason": reason})
    reshard = checkpoint.needs_reshard(saved, world)
    engine, scheduler = parallelize(objective, t, world, load_universal=reshard)
    state = None
    if ckpt is not None and saved is not None:
        checkpoint.restore(engine, ckpt, saved, rank, world)
        state = TrainState(**{**saved.__dict__, "world": world})
        events.append({"event": "resume", "step": saved.step, "from_world": saved.world, "world": world})
    data = PackedData(Path(config["data_dir"]))
    worker = Worker(
        t, engine, scheduler, device=device, rank=rank, world=world, seq_len=m.seq_len, state=state,
        flops_per_token=flops, peak=peak_flops(device, t.deepspeed.precision) * world,
        hf_config=hf_config, storage=storage, metrics=metrics, tb=tb,
        train=ray.train.get_dataset_shard("train"), val=ray.train.get_dataset_shard("val"),
        train_from=lambda start: rows_from(config["train_data"], data, start, t.global_batch),
    )  # fmt: skip
    for event in events:
        worker._log(**event)
    return worker


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point (``train_loop_per_worker``)."""
    build_worker(config).run()
