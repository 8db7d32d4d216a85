"""tune: real Ray Tune trials, each a real 2-worker DeepSpeed run, with ASHA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rayllm.config import RunConfig, load_config
from rayllm.errors import ConfigError


def tune_cfg(prepped: RunConfig, run_dir: Path, space: dict, **tune) -> RunConfig:
    raw = prepped.dump()
    raw["run_dir"] = str(run_dir)
    raw["train"]["data_dir"] = str(Path(prepped.run_dir) / "prep")
    raw["train"].update(eval_every=4, checkpoint_every=8)
    raw["tune"] = {"space": space, "max_steps": 8, "grace_period": 4, **tune}
    return RunConfig.model_validate(raw)


def test_search_hands_on_best_config_and_checkpoint(ray_cluster, prepped, tmp_path):
    from rayllm.tune import run

    space = {"train.optimizer.name": {"grid": ["sgd", "adamw"]}, "train.optimizer.lr": [3e-3]}
    s = run(tune_cfg(prepped, tmp_path, space, num_samples=1))
    assert s["trials"] == 2
    values = {t["params"]["train.optimizer.name"]: t["val_loss"] for t in s["all"]}
    assert s["best_value"] == min(v for v in values.values() if v is not None)
    # plain SGD at this learning rate barely moves in 8 steps; AdamW wins
    assert s["best_params"]["train.optimizer.name"] == "adamw"
    best = load_config([s["best_config"]])
    assert best.train.optimizer.name == "adamw" and best.train.max_steps == prepped.train.max_steps
    assert s["best_checkpoint"] and (Path(s["best_checkpoint"]) / "rayllm_state.json").is_file()
    saved = json.loads((tmp_path / "tune" / "summary.json").read_text())
    assert saved["best_params"] == s["best_params"]
    assert yaml.safe_load(Path(s["best_config"]).read_text())["train"]["optimizer"]["name"] == "adamw"


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"train.optimizer.lrr": [0.1]}, r"tune\.space\.train\.optimizer\.lrr: .*unknown key"),
        ({"train.optimizer.lr": {"loguniform": [0.0, 1.0]}}, "loguniform needs low > 0"),
        ({"train.optimizer.lr": {"normal": [0, 1]}}, "use a list of values or one of"),
        ({"train.deepspeed.zero_stage": [4]}, r"tune\.space\.train\.deepspeed\.zero_stage: .*got 4"),
        ({}, "tune.space is empty"),
    ],
)
def test_bad_search_space_is_rejected_before_ray(prepped, tmp_path, space, message):
    from rayllm.tune import run

    with pytest.raises(ConfigError, match=message):
        run(tune_cfg(prepped, tmp_path, space))
