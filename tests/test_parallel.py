"""The generated DeepSpeed config, optimizers and LR schedules (no Ray, no processes)."""

from __future__ import annotations

import math

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
import resource, sys, torch
from rayllm.train.parallel import cpu_runtime
took = cpu_runtime(1) if sys.argv[1] == "keep" else None
def step():  # activations of a few MB each, alive together, then freed: one training step
    return sum(float(t.sum()) for t in [torch.ones(n * 250_000) for n in range(1, 9)])
for _ in range(3):  # warm up: the first allocations fault in either way
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_cpu_runtime_keeps_freed_memory_instead_of_faulting_it_in_again():
    """A CPU worker's allocations of a few MB reuse freed memory: no page faults per step."""
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
    # The 20 steps touch 20 x 36 MB = 184,320 pages of 4 KB. glibc's default returns some of the
    # blocks and faults them in again (how many depends on its adaptive thresholds: 3,900 to 175,000
    # seen); kept, the steps reuse the heap: at most a few percent of the pages (0 to 1,953 seen,
    # the rest from the interpreter and torch's own threads).
    touched = 20 * sum(n * 250_000 * 4 for n in range(1, 9)) // 4096
    assert runs["default"][1] > 1000, runs
    assert runs["keep"][1] < min(touched // 20, runs["default"][1] // 2), runs
    assert torch.get_num_threads() >= 1
