"""Config validation: bad values are rejected before any Ray work, naming the dotted field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rayllm.config import RunConfig, load_config, validate_config
from rayllm.errors import ConfigError

EXAMPLES = Path(__file__).parent.parent / "examples" / "configs"


def error_of(raw: dict) -> str:
    with pytest.raises(ConfigError) as e:
        validate_config(raw)
    return str(e.value)


def test_defaults_validate_and_roundtrip():
    cfg = RunConfig()
    assert cfg.train.deepspeed.zero_stage == 2
    assert RunConfig.model_validate(cfg.dump()) == cfg


def test_unknown_key_names_its_path():
    msg = error_of({"train": {"optimizer": {"lrr": 0.1}}})
    assert "train.optimizer.lrr: unknown key" in msg


def test_zero_stage_4_lists_allowed_values():
    msg = error_of({"train": {"deepspeed": {"zero_stage": 4}}})
    assert "train.deepspeed.zero_stage" in msg and "got 4" in msg and "0, 1, 2 or 3" in msg


def test_negative_learning_rate():
    msg = error_of({"train": {"optimizer": {"lr": -0.1}}})
    assert "train.optimizer.lr" in msg and "greater than 0" in msg and "-0.1" in msg


def test_wrong_type():
    msg = error_of({"train": {"max_steps": "many"}})
    assert "train.max_steps" in msg and "integer" in msg


def test_batch_not_divisible_by_workers_times_micro_batch():
    msg = error_of({"train": {"workers": 3, "global_batch": 16, "micro_batch": 4}})
    assert "train: global_batch=16 is not divisible by micro_batch x workers = 4 x 3 = 12" in msg


def test_elastic_range_checks_every_size():
    msg = error_of({"train": {"workers": [1, 3], "global_batch": 8, "micro_batch": 4}})
    assert "4 x 3 = 12" in msg
    ok = validate_config({"train": {"workers": [1, 2], "global_batch": 8, "micro_batch": 4}})
    assert ok.train.worker_range == (1, 2) and ok.train.grad_accum(1) == 2 and ok.train.grad_accum(2) == 1


def test_seq_len_over_model_positions():
    msg = error_of({"data": {"seq_len": 512}, "model": {"max_positions": 256}})
    assert "data.seq_len=512 exceeds model.max_positions=256" in msg


def test_offload_rules():
    assert "offload_optimizer needs zero_stage" in error_of(
        {"train": {"deepspeed": {"zero_stage": 0, "offload_optimizer": True}}}
    )
    assert "must be adam or adamw" in error_of(
        {"train": {"optimizer": {"name": "sgd"}, "deepspeed": {"offload_optimizer": True}}}
    )


def test_fp16_needs_gpu():
    assert "fp16 needs train.use_gpu" in error_of({"train": {"deepspeed": {"precision": "fp16"}}})


def test_yaml_merge_and_overrides(tmp_path: Path):
    base = tmp_path / "a.yaml"
    base.write_text(yaml.safe_dump({"train": {"max_steps": 10, "optimizer": {"name": "sgd"}}}))
    more = tmp_path / "b.yaml"
    more.write_text(yaml.safe_dump({"train": {"optimizer": {"lr": 0.5}}}))
    cfg = load_config([base, more], ["train.optimizer.lr=2e-4", "train.workers=[1, 2]", "data.seq_len=64"])
    assert cfg.train.max_steps == 10
    assert cfg.train.optimizer.name == "sgd"
    assert cfg.train.optimizer.lr == pytest.approx(2e-4)
    assert cfg.train.workers == (1, 2)
    assert cfg.data.seq_len == 64


def test_bad_override_and_missing_file(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"expected section\.key=value"):
        load_config([], ["train.max_steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([tmp_path / "nope.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config([bad])


# serve.yaml is a Ray Serve config file, not a run config: test_serve builds its application.
RUN_CONFIGS = [
    p for p in sorted(EXAMPLES.glob("*.yaml")) if "applications" not in yaml.safe_load(p.read_text())
]


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_example_configs_validate(path: Path):
    load_config([path])


def test_resolved_config_saved(tmp_path: Path):
    from rayllm.rundir import RunDir

    cfg = load_config([], ["train.max_steps=7"], run_dir=str(tmp_path / "run"))
    d = RunDir.of(cfg).start_stage(cfg, "train")
    saved = yaml.safe_load((d / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 7
    assert validate_config(saved) == cfg


def test_config_reference_is_current():
    from rayllm.config import reference_markdown

    page = (Path(__file__).parent.parent / "docs" / "config.md").read_text(encoding="utf-8")
    assert reference_markdown() in page, (
        "run `make docs` to regenerate the config reference in docs/config.md"
    )


def test_local_ray_workers_get_cluster_env_vars():
    """A Ray that rayllm starts passes its environment to workers without a runtime env (which
    would make Ray start fresh workers); cluster.env_vars win over the caller's environment."""
    import os
    import subprocess
    import sys

    code = (
        "import os, ray\n"
        "from rayllm.config import ClusterConfig\n"
        "from rayllm.runtime import ray_session\n"
        "cfg = ClusterConfig(num_cpus=1, object_store_gb=0.1, env_vars={'RAYLLM_PROBE': 'config'})\n"
        "with ray_session(cfg):\n"
        "    probe = ray.remote(lambda: [os.environ.get(k) for k in ('RAYLLM_PROBE', 'HF_HUB_OFFLINE')])\n"
        "    print(ray.get(probe.remote()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "RAYLLM_PROBE": "shell"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['config', '1']"
