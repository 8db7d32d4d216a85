"""Everything DeepSpeed: the generated config, the optimizer and LR schedule, MFU peak numbers.

The model arrives plain; ZeRO stage, offload, precision, activation checkpointing and compile are
applied here from ``TrainConfig`` by ``parallelize`` (torchtitan's split between model and parallelism).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch

from rayllm.config import OptimizerConfig, ScheduleConfig, TrainConfig, deep_merge
from rayllm.model.loss import NextTokenLoss

# Dense bf16/fp16 tensor-core peak FLOP/s per device (vendor datasheets, without sparsity).
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "A10": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "V100": 125e12,
    "T4": 65e12,
}


def import_deepspeed() -> Any:
    """``import deepspeed`` without the optional ``import mlflow`` of its autotuner, which rayllm never
    runs: mlflow is 2.5 s of DeepSpeed's 6 s import on 2 cores, paid again by every worker process."""
    if "deepspeed" not in sys.modules and "mlflow" not in sys.modules:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # makes `import mlflow` raise ImportError
        try:
            import deepspeed
        finally:
            del sys.modules["mlflow"]
    import deepspeed

    return deepspeed


def cpu_runtime(threads: int) -> bool:
    """A CPU worker's process: ``threads`` intra-op threads, and freed memory kept for reuse.

    glibc hands every freed block above its trim threshold back to the kernel, so each step would
    page-fault its activations and logits in again (docs/design.md has the measurement). Blocks up
    to 32 MB (glibc's ceiling for this setting) stay on the heap and the heap is not trimmed: the
    process keeps its peak, which a training loop reaches again every step anyway. Returns whether
    the allocator took the setting (glibc only; elsewhere the allocator is left as it is).
    """
    torch.set_num_threads(threads)
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    # Both or neither: a fixed trim threshold alone also fixes the mmap threshold at 128 KB.
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def deepspeed_config(
    t: TrainConfig, world: int, load_universal: bool = False, n_params: int | None = None
) -> dict[str, Any]:
    ds = t.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        overlap = t.use_gpu if ds.overlap_comm is None else ds.overlap_comm
        zero.update(contiguous_gradients=True, overlap_comm=overlap)
        if ds.reduce_bucket_size:
            zero["reduce_bucket_size"] = ds.reduce_bucket_size
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": t.use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": t.use_gpu}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        persist = ds.zero3_param_persistence_threshold
        if persist is None and world == 1 and n_params:
            persist = n_params  # one worker holds everything anyway: never release and re-gather
        for key, value in (
            ("stage3_param_persistence_threshold", persist),
            ("stage3_prefetch_bucket_size", ds.zero3_prefetch_bucket_size),
            ("stage3_max_live_parameters", ds.zero3_max_live_parameters),
        ):
            if value is not None:
                zero[key] = value
    cfg: dict[str, Any] = {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum(world),
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "initial_scale_power": 16},
        # SGD and Adafactor are fine with ZeRO partitioning; DeepSpeed only lists what it tested.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
        # Always set: left out, DeepSpeed clips at its default of 1.0 (0 turns clipping off).
        "gradient_clipping": t.grad_clip,
    }
    o = t.optimizer
    if o.name == "muon":
        # DeepSpeed's Muon partitions with ZeRO (it orthogonalizes whole matrices, then shards).
        cfg["optimizer"] = {
            "type": "Muon",
            "params": {
                "lr": o.lr, "muon_lr": o.muon_lr, "adam_lr": o.lr, "momentum": o.muon_momentum,
                "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
            },
        }  # fmt: skip
    elif ds.offload_optimizer:
        # DeepSpeed builds DeepSpeedCPUAdam itself when the optimizer lives in its config.
        cfg["optimizer"] = {
            "type": "AdamW" if o.name == "adamw" else "Adam",
            "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay},
        }
    return deep_merge(cfg, ds.extra)


def parallelize(
    objective: NextTokenLoss, t: TrainConfig, world: int, load_universal: bool
) -> tuple[Any, Any]:
    """Activation checkpointing, the optimizer and DeepSpeed around the loss-wrapped model.

    Returns the DeepSpeed engine (call it like the objective) and its LR scheduler.
    """
    deepspeed = import_deepspeed()

    lm = objective.lm
    if t.deepspeed.activation_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if t.deepspeed.zero_stage == 3 and objective.impl != "full":
        # The fused/chunked loss reads the output embedding outside its module's forward.
        deepspeed.zero.register_external_parameter(objective, lm.get_output_embeddings().weight)
    in_config = t.deepspeed.offload_optimizer or t.optimizer.name == "muon"  # DeepSpeed builds those
    optimizer = None if in_config else build_optimizer(objective, t.optimizer)
    schedule = lr_lambda(t.schedule, t.max_steps, lr_scale(t))
    with _embeddings_not_muon(objective):
        engine, _, _, scheduler = deepspeed.initialize(
            model=objective,
            optimizer=optimizer,
            model_parameters=None if optimizer else param_groups(objective, t.optimizer.weight_decay),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            config=deepspeed_config(t, world, load_universal, sum(p.numel() for p in objective.parameters())),
        )
    compile = t.deepspeed.compile if t.deepspeed.compile is not None else t.use_gpu
    # DeepSpeed's Muon wraps its Newton-Schulz kernels in torch.compile. On CPU inductor spends up to
    # a minute per worker on them and the steps run no faster (docs/benchmarks.md), so there
    # torch.compile directives run eagerly unless train.deepspeed.compile asks for compiling.
    torch.compiler.set_stance("default" if compile or t.use_gpu else "force_eager")
    if compile:
        compile_model(engine, objective, t.deepspeed.zero_stage)
    return engine, scheduler


@contextlib.contextmanager
def _embeddings_not_muon(objective: NextTokenLoss) -> Iterator[None]:
    """DeepSpeed picks Muon's matrices by name (not "embed", not "lm_head"); GPT-2's wte and wpe
    are matrices by those rules. Every embedding table and the output head go to AdamW instead."""
    deepspeed = import_deepspeed()

    tag = deepspeed.set_optimizer_flags
    aux = {id(m.weight) for m in objective.modules() if isinstance(m, torch.nn.Embedding)}
    head = objective.lm.get_output_embeddings()
    if head is not None:
        aux.add(id(head.weight))

    def set_flags(config: Any, model: torch.nn.Module) -> None:
        tag(config, model)
        for p in model.parameters():
            if id(p) in aux and getattr(p, "use_muon", False):
                p.use_muon = False

    deepspeed.set_optimizer_flags = set_flags
    try:
        yield
    finally:
        deepspeed.set_optimizer_flags = tag


def compile_model(engine: Any, objective: NextTokenLoss, zero_stage: int) -> str:
    """Regional compile: each transformer block on its own, so compile time is one block's and the
    rest (embedding, loss) stays eager. ZeRO-3's parameter hooks live around every module, so there
    DeepSpeed compiles the engine as a whole."""
    blocks = _blocks(objective.lm)
    if zero_stage == 3 or not blocks:
        engine.compile()
        return "engine"
    for block in blocks:
        block.compile()
    return "blocks"


def _blocks(lm: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks: the longest ``ModuleList`` in the model (h, layers, ...)."""
    lists = [m for m in lm.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def resolve_micro_batch(
    t: TrainConfig, world: int, objective: NextTokenLoss, device: torch.device, seq_len: int
) -> int:
    """``train.micro_batch: auto``: the largest divisor of this worker's share of the global batch
    whose forward and backward fit. GPUs try it (out-of-memory means too large) with room left for
    the optimizer state; CPUs estimate activations against available memory. All workers take the
    smallest answer, since DeepSpeed needs one micro-batch size."""
    import torch.distributed as dist

    if isinstance(t.micro_batch, int):
        return t.micro_batch
    share = t.global_batch // world
    sizes = [m for m in range(share, 0, -1) if share % m == 0]
    n_params = sum(p.numel() for p in objective.parameters())
    fits = _fits_gpu if device.type == "cuda" else _fits_cpu
    chosen = next((m for m in sizes if fits(objective, m, seq_len, n_params, device)), 1)
    if dist.is_initialized():
        agreed = torch.tensor([chosen], device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        chosen = int(agreed.item())
    return chosen


def _fits_cpu(
    objective: NextTokenLoss, micro: int, seq_len: int, n_params: int, device: torch.device
) -> bool:
    """Activations (about 34 bytes per token, hidden unit and layer in fp32, plus attention scores)
    within half of this worker's share of the memory that is free now."""
    import psutil

    cfg = objective.lm.config.get_text_config()
    layers, d = cfg.num_hidden_layers, cfg.hidden_size
    heads = cfg.num_attention_heads
    activations = micro * seq_len * layers * (34 * d + 4 * heads * seq_len)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return activations + 16 * n_params < 0.5 * psutil.virtual_memory().available / local


def _fits_gpu(
    objective: NextTokenLoss, micro: int, seq_len: int, n_params: int, device: torch.device
) -> bool:
    """One forward and backward at this size, with room for weights, gradients and Adam state."""
    from rayllm.model.loss import shift

    objective.to(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    total = torch.cuda.get_device_properties(device).total_memory
    try:
        ids = torch.randint(
            0, objective.lm.config.get_text_config().vocab_size, (micro, seq_len + 1), device=device
        )
        with torch.autocast("cuda", dtype=torch.bfloat16):
            nll, count, _ = objective(*shift(ids))
        (nll / count).backward()
        peak = torch.cuda.max_memory_allocated(device)
    except torch.OutOfMemoryError:
        return False
    finally:
        objective.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
    return peak + 12 * n_params < 0.9 * total  # fp32 master weights and two Adam moments still to come


def lr_scale(t: TrainConfig) -> float:
    """The batch-size rule: learning rates tuned at ``reference_batch`` scaled to ``global_batch``."""
    ratio = t.global_batch / t.optimizer.reference_batch
    return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[t.optimizer.lr_scaling]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and norm weights (1-d tensors), as GPT-2/nanoGPT train."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, o: OptimizerConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, o.weight_decay)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
    if o.name == "adam":
        return torch.optim.Adam(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=o.fused or None)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=o.fused or None)
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=o.lr, scale_parameter=False, relative_step=False, warmup_init=False)


def lr_lambda(s: ScheduleConfig, max_steps: int, scale: float = 1.0):
    """Linear warmup, then constant / linear / cosine decay down to ``min_lr_ratio``, or
    warmup-stable-decay (the peak until the last ``decay_fraction`` of the steps, then linear).
    ``scale`` is the batch-size rule's factor on every learning rate."""

    def fn(step: int) -> float:
        return scale * _shape(step)

    def _shape(step: int) -> float:
        if step < s.warmup_steps:
            return (step + 1) / (s.warmup_steps + 1)
        if s.decay == "constant":
            return 1.0
        if s.decay == "wsd":
            start = max(s.warmup_steps, round(max_steps * (1 - s.decay_fraction)))
            progress = min(1.0, max(0, step - start) / max(1, max_steps - start))
            return s.min_lr_ratio + (1.0 - s.min_lr_ratio) * (1.0 - progress)
        progress = min(1.0, (step - s.warmup_steps) / max(1, max_steps - s.warmup_steps))
        shape = 1.0 - progress if s.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return s.min_lr_ratio + (1.0 - s.min_lr_ratio) * shape

    return fn


def peak_flops(device: torch.device, precision: str) -> float:
    """Peak FLOP/s of one worker's device: a datasheet table on GPUs, a measured matmul on CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_FLOPS.items():
            if key in name:
                return value if precision != "fp32" else value / 2
        return 100e12
    # The best of many short matmuls: a worker measures this while its node is still busy starting
    # (Ray Data, other ranks), and a peak measured low reads as an MFU above 100%.
    n = 1024
    gen = torch.Generator().manual_seed(0)  # its own generator: the training RNG stream stays untouched
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    torch.matmul(a, b)
    best, until = math.inf, time.perf_counter() + 1.0
    for i in range(40):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
        if i >= 5 and t0 > until:
            break
    return 2 * n**3 / best
