"""The walking skeleton end to end at tiny scale: prep -> train (ZeRO-2, 2 workers) -> eval -> serve."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from conftest import tiny_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_pipeline_end_to_end(ray_cluster, tiny_corpus, tmp_path):
    from rich.console import Console

    from rayllm.pipeline import demo

    cfg = tiny_config(
        tmp_path,
        tiny_corpus,
        train__max_steps=24,
        train__eval_every=12,
        train__checkpoint_every=12,
        serve__port=free_port(),
    )
    s = demo(cfg, console=Console(quiet=True))
    assert s["val_loss_last"] < s["val_loss_first"] - 0.5
    assert s["train_loss_last"] < s["train_loss_first"]
    assert s["url"] == f"http://127.0.0.1:{cfg.serve.port}"
    assert s["sample"].startswith("ROMEO:\n") and len(s["sample"]) > len("ROMEO:\n")
    # the eval stage scored the exported model on the same split the trainer validated on
    ev = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert 1 < ev["perplexity"] < 512 and ev["tokens"] > 0
    for stage in ("prep", "train", "eval", "demo"):
        assert (tmp_path / stage / "summary.json").is_file(), stage
    for stage in ("prep", "train", "eval"):
        assert (tmp_path / stage / "config.yaml").is_file(), stage
    train = json.loads((tmp_path / "train" / "summary.json").read_text())
    for key in (
        "steps",
        "train_loss_first",
        "train_loss_last",
        "val_loss_first",
        "val_loss_last",
        "tokens_per_second",
        "mfu",
        "export_dir",
    ):
        assert train[key] is not None, key
    assert Path(train["export_dir"], "model.safetensors").is_file()
    assert (tmp_path / "train" / "loss.png").is_file()
    assert list((tmp_path / "train" / "tensorboard").glob("events.out.tfevents.*"))
