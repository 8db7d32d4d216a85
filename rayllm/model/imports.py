"""`rayllm import`: a pretrained model that ships as a GGUF file, as a plain Hugging Face folder.

transformers reads GGUF and de-quantizes its weights (to fp32 here); the folder it saves is what
``model.path``, ``serve.model_dir`` and ``eval.model_dir`` load, offline. A path that already is a
Hugging Face folder is checked and used as it is.
"""

from __future__ import annotations

from pathlib import Path

from rayllm.errors import ConfigError
from rayllm.rundir import model_folder
from rayllm.runtime import resolve_pkg


def import_model(source: str, out: Path | None = None) -> Path:
    """``source``: a ``.gguf`` file (local or ``pkg://package/file.gguf``) or a Hugging Face folder."""
    path = Path(resolve_pkg(source)).expanduser()
    if path.is_dir():
        return Path(model_folder(path, f"rayllm import {source}", "the source"))
    if path.suffix != ".gguf" or not path.is_file():
        raise ConfigError(f"rayllm import {source}: not a .gguf file or a Hugging Face model folder")
    try:  # transformers reads GGUF with these; a missing one would surface as a deep traceback
        import accelerate  # noqa: F401
        import gguf  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"rayllm import {source}: reading GGUF needs the {e.name} package: pip install {e.name}"
        ) from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = (out or Path("models") / path.stem).expanduser()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"rayllm import {source}: transformers cannot read this GGUF file: {e}") from None
    # The weights are de-quantized fp32 tensors now: save them as such, not as a GGUF quantization.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
