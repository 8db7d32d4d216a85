"""Cleaning: each step configurable, language-agnostic (Chinese and code pass through intact), counted.

``clean_batch`` runs inside Ray Data ``map_batches``. A dropped document keeps its row with a
``reason`` (``too_short``, ``too_long``, ...) so the driver can count every drop.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd

from rayllm.config import CleanConfig

# Control characters except tab and newline; \r is folded into \n first.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\ufeff]")
_TRAILING = re.compile(r"[ \t]+\n")
_BLANK_RUNS = re.compile(r"\n{3,}")
_WORD = re.compile(r"\w+|\W+")
# Signatures travel from Ray tasks to the driver as raw values; both sides must use one scheme.
MINHASH_SCHEME = "affine32"


@lru_cache(maxsize=8)
def _stopwords(language: str) -> frozenset[str]:
    from stop_words import get_stop_words

    return frozenset(get_stop_words(language))


def clean_text(text: str, cfg: CleanConfig) -> str:
    if cfg.normalize != "none":
        text = unicodedata.normalize(cfg.normalize, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if cfg.strip_control:
        text = _CONTROL.sub("", text)
    if cfg.collapse_whitespace:
        # Trailing spaces and runs of blank lines only: indentation is meaning in code.
        text = _BLANK_RUNS.sub("\n\n", _TRAILING.sub("\n", text)).strip()
    if cfg.stopwords:
        stop = _stopwords(cfg.stopword_language)
        text = "".join(t for t in _WORD.findall(text) if t.lower() not in stop)
        text = re.sub(r"[ \t]{2,}", " ", text).strip()
    return text


def doc_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def hash_fraction(h: str, salt: int = 0) -> float:
    """A uniform number in [0, 1) from a document hash: deterministic splits and samples."""
    return int(h[8 * salt : 8 * salt + 8], 16) / 2**32


def clean_batch(batch: pd.DataFrame, cfg: CleanConfig, val_fraction: float) -> pd.DataFrame:
    texts, reasons, hashes, splits, copies = [], [], [], [], []
    for text, reason, doc, weight in zip(
        batch["text"], batch["reason"], batch["doc"], batch["weight"], strict=True
    ):
        if not reason:
            text = clean_text(text, cfg)
            if not text:
                reason = "empty_after_clean"
            elif len(text) < cfg.min_chars:
                reason = "too_short"
            elif cfg.max_chars is not None and len(text) > cfg.max_chars:
                reason = "too_long"
        # Drops keep a unique key so they never look like duplicates of each other.
        h = "~" + doc_hash(doc) if reason else doc_hash(text)
        texts.append("" if reason else text)
        reasons.append(reason)
        hashes.append(h)
        splits.append("val" if not reason and hash_fraction(h) < val_fraction else "train")
        # Weights are repeat factors, applied after dedup: 2.5 -> 2 copies plus a third for half.
        whole = int(weight)
        copies.append(0 if reason else whole + (1 if hash_fraction(h, 1) < weight - whole else 0))
    return pd.DataFrame(
        {
            "text": texts,
            "reason": reasons,
            "hash": hashes,
            "split": splits,
            "copies": np.asarray(copies, dtype=np.int32),
            "note": batch["note"].to_numpy(),
        }
    )


def minhash_signatures(texts: list[str], num_perm: int = 128, ngram: int = 5) -> list[Any]:
    """MinHash of character n-grams (datasketch): works for any script, Chinese included."""
    from datasketch import MinHash

    sigs = []
    for t in texts:
        m = MinHash(num_perm=num_perm, seed=1, scheme=MINHASH_SCHEME)
        grams = {t[i : i + ngram] for i in range(max(1, len(t) - ngram + 1))}
        m.update_batch([g.encode("utf-8") for g in grams])
        sigs.append(m)
    return sigs
