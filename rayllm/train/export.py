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

import yaml

from rayllm.config import LoraConfig
from rayllm.errors import RunDirError
from rayllm.model.build import merge_adapters
from rayllm.rundir import RunDir
from rayllm.train import checkpoint
from rayllm.train.parallel import import_deepspeed

EXPORT_INFO = "rayllm_export.json"  # the checkpoint and state the weights came from
EXPORT_CONFIG = "rayllm_config.yaml"  # the training run's config beside its exported weights

# Training wraps the model in the loss module (``NextTokenLoss.lm``): its weights carry this prefix.
PREFIX = "lm."


def export_checkpoint(
    ckpt_dir: Path, out_dir: Path, tokenizer_dir: Path | None, config: dict[str, Any] | None = None
) -> Path:
    """The checkpoint's weights as a Hugging Face folder; ``config`` (the run's, without secrets) is
    written beside them as ``rayllm_config.yaml``, so `rayllm train -c` of it trains the same way."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    state = checkpoint.read_folder(ckpt_dir)
    hf_config = AutoConfig.from_pretrained(ckpt_dir)
    if state["zero_stage"] == 0:
        blob = torch.load(
            ckpt_dir / checkpoint.TAG / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
        )
        weights = {k: v.float() for k, v in blob["module"].items()}
    else:
        import_deepspeed()
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # DeepSpeed narrates every shard and draws progress bars; the CLI prints its own summary.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            weights = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=checkpoint.TAG)
    weights = {k.removeprefix(PREFIX): v for k, v in weights.items()}
    model = AutoModelForCausalLM.from_config(hf_config)
    lora = LoraConfig(**config["train"]["lora"]) if config and config["train"].get("lora") else None
    if lora is not None and lora.r:
        # Base weights plus adapters, merged: a plain model again, loadable without peft.
        model, (missing, unexpected) = merge_adapters(model, lora, weights), ([], [])
    else:
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
    if config is not None:
        (out_dir / EXPORT_CONFIG).write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    (out_dir / EXPORT_INFO).write_text(
        json.dumps({"checkpoint": str(ckpt_dir), **state}, indent=2), encoding="utf-8"
    )
    return out_dir


def export_run(run_dir: str, out_dir: str | None = None, folder: str | None = None) -> Path:
    """``rayllm export RUN_DIR``: the last registered checkpoint (or ``folder``, a checkpoint
    folder) -> ``<run_dir>/train/export``."""
    rd = RunDir.load(run_dir)
    out = Path(out_dir) if out_dir else rd.export_dir
    tokenizer = rd.data.tokenizer_dir if rd.data.tokenizer_dir.is_dir() else None
    saved = rd.stage("train", create=False) / "config.yaml"
    config = yaml.safe_load(saved.read_text(encoding="utf-8")) if saved.is_file() else None
    if folder:
        return export_checkpoint(Path(folder), out, tokenizer, config)
    ckpt = checkpoint.latest(rd.storage)
    if ckpt is None:
        raise RunDirError(f"no train checkpoint under {rd.storage}: run `rayllm train` first")
    with ckpt.as_directory() as d:
        return export_checkpoint(Path(d), out, tokenizer, config)
