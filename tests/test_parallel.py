"""The generated DeepSpeed config, optimizers and LR schedules (no Ray, no processes)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from rayllm.config import OptimizerConfig, ScheduleConfig, TrainConfig
from rayllm.train.parallel import build_optimizer, deepspeed_config, lr_lambda


def test_deepspeed_config_from_train_config():
    t = TrainConfig(
        workers=[1, 2],
        global_batch=16,
        micro_batch=4,
        grad_clip=0.5,
        deepspeed={
            "zero_stage": 3,
            "offload_optimizer": True,
            "offload_params": True,
            "precision": "bf16",
            "extra": {"zero_optimization": {"reduce_bucket_size": 1000}},
        },
    )
    one, two = deepspeed_config(t, 1), deepspeed_config(t, 2, load_universal=True)
    assert (one["gradient_accumulation_steps"], two["gradient_accumulation_steps"]) == (4, 2)
    assert one["train_batch_size"] == two["train_batch_size"] == 16
    z = two["zero_optimization"]
    assert (
        z["stage"] == 3
        and z["offload_optimizer"]["device"] == "cpu"
        and z["offload_param"]["device"] == "cpu"
    )
    assert z["reduce_bucket_size"] == 1000 and z["contiguous_gradients"] is True
    assert two["bf16"]["enabled"] and not two["fp16"]["enabled"]
    assert two["gradient_clipping"] == 0.5 and two["checkpoint"]["load_universal"] is True
    assert two["optimizer"]["type"] == "AdamW"  # offload: DeepSpeedCPUAdam built from the config


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "adafactor"])
def test_every_optimizer_steps_and_skips_decay_on_1d(name: str):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, OptimizerConfig(name=name, lr=0.1, weight_decay=0.1))
    decays = sorted(g["weight_decay"] for g in opt.param_groups)
    assert decays == [0.0, 0.1]
    before = model[0].weight.detach().clone()
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert not torch.equal(before, model[0].weight)


def test_lr_schedules():
    warm = lr_lambda(ScheduleConfig(warmup_steps=4, decay="cosine", min_lr_ratio=0.1), max_steps=104)
    assert warm(0) == pytest.approx(0.2) and warm(3) == pytest.approx(0.8)
    assert (
        warm(4) == pytest.approx(1.0) and warm(54) == pytest.approx(0.55) and warm(104) == pytest.approx(0.1)
    )
    linear = lr_lambda(ScheduleConfig(warmup_steps=0, decay="linear", min_lr_ratio=0.0), max_steps=10)
    assert [linear(s) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    const = lr_lambda(ScheduleConfig(warmup_steps=0, decay="constant"), max_steps=10)
    assert {const(s) for s in range(20)} == {1.0}
    assert math.isclose(warm(1000), 0.1)


FAULTS_PROBE = """
import ctypes, resource, sys
from rayllm.train.parallel import cpu_runtime
took = cpu_runtime(1) if sys.argv[1] == "keep" else None
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def step():  # one training step's activations: 16 blocks of 4 MB alive together, then freed
    blocks = [libc.malloc(4 << 20) for _ in range(16)]
    for b in blocks:
        ctypes.memset(b, 1, 4 << 20)
    for b in reversed(blocks):
        libc.free(b)
for _ in range(3):  # warm up: the first allocations fault in either way
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_cpu_runtime_keeps_freed_memory_instead_of_faulting_it_in_again():
    """A CPU worker's allocations of a few MB reuse freed memory: no page faults per step.

    The probe calls malloc itself: torch's own small allocations between the blocks decide, run to
    run, whether glibc can trim the heap's top, so a torch probe faulted 3,900 to 175,000 pages by
    default and 0 to 1,953 kept. With nothing in between, the default trims the 64 MB every step.
    """
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    runs = {}
    for mode in ("default", "keep"):
        out = subprocess.run(
            [sys.executable, "-c", FAULTS_PROBE, mode], capture_output=True, text=True, check=True, env=env
        ).stdout.split()
        runs[mode] = (out[0], int(out[1]))
    assert runs["keep"][0] == "True"
    touched = 20 * 16 * (4 << 20) // 4096  # 327,680 pages of 4 KB over the 20 steps
    assert runs["default"][1] > touched // 2, runs  # trimmed and faulted in again, every step
    assert runs["keep"][1] < touched // 100, runs  # kept: none after the warm-up (0 seen)
    assert torch.get_num_threads() >= 1


def test_deepspeed_is_imported_without_mlflow_and_its_cpu_ops_come_prebuilt():
    """In a fresh process: DeepSpeed's autotuner imports mlflow when it can (2.5 s of every worker's
    start), so rayllm imports DeepSpeed without it, and mlflow still imports afterwards. The CPU ops a
    run uses were compiled by `make install`: a missing one is JIT-compiled at a run's first step
    (70-90 s on 2 cores, in every fresh install)."""
    code = (
        "import sys\n"
        "from rayllm.train.parallel import import_deepspeed\n"
        "ds = import_deepspeed()\n"
        "from deepspeed.autotuning import autotuner\n"
        "from deepspeed.git_version_info import installed_ops\n"
        "assert not autotuner.has_mlflow and 'mlflow' not in sys.modules\n"
        "import mlflow\n"
        "print(sorted(op for op in ('cpu_adam', 'fused_adam', 'deepspeed_shm_comm') if installed_ops[op]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    prebuilt = done.stdout.strip().splitlines()[-1]
    assert prebuilt == "['cpu_adam', 'deepspeed_shm_comm', 'fused_adam']", done.stdout
