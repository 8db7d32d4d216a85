"""Export: consolidate a DeepSpeed checkpoint (any ZeRO stage) into a plain Hugging Face folder.

The result (config, safetensors weights, tokenizer) loads with ``AutoModelForCausalLM.from_pretrained``
without rayllm or DeepSpeed installed.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

from rayllm.errors import RunDirError
from rayllm.runtime import stage_dir
from rayllm.train import RUN_NAME
from rayllm.train.loop import STATE_FILE, TAG


def export_checkpoint(ckpt_dir: Path, out_dir: Path, tokenizer_dir: Path | None) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    state = json.loads((ckpt_dir / STATE_FILE).read_text())
    hf_config = AutoConfig.from_pretrained(ckpt_dir)
    if state["zero_stage"] == 0:
        blob = torch.load(
            ckpt_dir / TAG / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
        )
        weights = {k: v.float() for k, v in blob["module"].items()}
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # DeepSpeed narrates every shard and draws progress bars; the CLI prints its own summary.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            weights = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=TAG)
    model = AutoModelForCausalLM.from_config(hf_config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if hf_config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"checkpoint {ckpt_dir} does not match its model: missing={missing} unexpected={unexpected}"
        )
    model.tie_weights()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer_dir is not None and tokenizer_dir.is_dir():
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    (out_dir / "rayllm_export.json").write_text(
        json.dumps({"checkpoint": str(ckpt_dir), **state}, indent=2), encoding="utf-8"
    )
    return out_dir


def latest_checkpoint(storage: str) -> Any:
    """The newest registered checkpoint under a Ray Train storage path (local or any pyarrow URI)."""
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    fs, root = pafs.FileSystem.from_uri(storage) if "://" in storage else (pafs.LocalFileSystem(), storage)
    snapshot = f"{root}/{RUN_NAME}/checkpoint_manager_snapshot.json"
    if fs.get_file_info(snapshot).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(snapshot) as f:
        latest = json.loads(f.read()).get("latest_checkpoint_result")
    if not latest:
        return None
    return Checkpoint(path=f"{root}/{RUN_NAME}/{latest['checkpoint_dir_name']}", filesystem=fs)


def export_run(run_dir: str, out_dir: str | None = None) -> Path:
    """``rayllm export RUN_DIR``: the last checkpoint of the run -> ``<run_dir>/train/export``."""
    import yaml

    train_dir = stage_dir(run_dir, "train", create=False)
    config = train_dir / "config.yaml"
    storage = yaml.safe_load(config.read_text())["train"].get("storage") if config.is_file() else None
    ckpt = latest_checkpoint(storage or str(train_dir / "ray"))
    if ckpt is None:
        raise RunDirError(f"no train checkpoint under {storage or train_dir}: run `rayllm train` first")
    with ckpt.as_directory() as d:
        return export_checkpoint(
            Path(d), Path(out_dir) if out_dir else train_dir / "export", _tokenizer_dir(train_dir)
        )


def _tokenizer_dir(train_dir: Path) -> Path | None:
    """The tokenizer of the data the run trained on (``train.data_dir``, default ``<run_dir>/prep``)."""
    import yaml

    config = train_dir / "config.yaml"
    data_dir = yaml.safe_load(config.read_text())["train"].get("data_dir") if config.is_file() else None
    tok = Path(data_dir) / "tokenizer" if data_dir else train_dir.parent / "prep" / "tokenizer"
    return tok if tok.is_dir() else None
