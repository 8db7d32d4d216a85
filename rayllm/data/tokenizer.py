"""Vocabulary: train a byte-level BPE tokenizer (``tokenizers``) or load a local one.

Either way the result is saved as a Hugging Face tokenizer folder in ``<run_dir>/prep/tokenizer``
so that train, eval and serve load the very same vocabulary and special tokens. Byte-level BPE
covers every byte, so Chinese and code never hit an unknown token.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from rayllm.config import TokenizerConfig
from rayllm.errors import DataError

_CACHE: dict[str, Tokenizer] = {}


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, out_dir: Path) -> Path:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[cfg.eos_token, cfg.pad_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _save(tok, cfg.eos_token, cfg.pad_token, out_dir)


def load_tokenizer(path: str, cfg: TokenizerConfig, out_dir: Path) -> Path:
    """Copy a local HF tokenizer folder into the run dir, keeping its own special tokens."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise DataError(f"data.tokenizer.path: {path} is not a tokenizer folder")
    try:
        hf = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise DataError(f"data.tokenizer.path: cannot load a tokenizer from {path}: {e}") from None
    if not hf.is_fast:
        raise DataError(f"data.tokenizer.path: {path} has no fast (tokenizers) tokenizer.json")
    if hf.eos_token is None:
        raise DataError(f"data.tokenizer.path: {path} defines no eos_token; documents need a separator")
    if hf.pad_token is None:
        # Adding a token would change the vocabulary size; padding is masked out anyway.
        hf.pad_token = hf.eos_token
    hf.save_pretrained(out_dir)
    return out_dir


def _save(tok: Tokenizer, eos: str, pad: str, out_dir: Path) -> Path:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, pad_token=pad)
    hf.save_pretrained(out_dir)
    return out_dir


def tokenizer_hash(folder: Path) -> str:
    return hashlib.sha256((folder / "tokenizer.json").read_bytes()).hexdigest()[:16]


def get_tokenizer(tok_json: str) -> Tokenizer:
    """Per-process cache: Ray Data tasks in one worker reuse the parsed tokenizer."""
    key = hashlib.sha1(tok_json.encode()).hexdigest()
    if key not in _CACHE:
        _CACHE[key] = Tokenizer.from_str(tok_json)
    return _CACHE[key]
