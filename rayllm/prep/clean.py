"""Cleaning: each step configurable, language-agnostic (Chinese and code pass through intact), counted.

``clean_batch`` runs inside Ray Data ``map_batches``. A dropped document keeps its row with a
``reason`` (``too_short``, ``too_long``, ...) so the driver can count every drop.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from functools import cache, lru_cache
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rayllm.config import CleanConfig

# Control characters except tab and newline (RE2 syntax: cleaning runs in Arrow's C++ kernels);
# \r is folded into \n first.
_CONTROL = r"[\x00-\x08\x0b-\x1f\x7f-\x9f\x{200b}\x{feff}]"
_WORD = re.compile(r"\w+|\W+")
# MinHash signatures: permutations per document and the hash scheme (datasketch).
MINHASH_PERM = 128
MINHASH_SCHEME = "affine32"


@lru_cache(maxsize=8)
def _stopwords(language: str) -> frozenset[str]:
    from stop_words import get_stop_words

    return frozenset(get_stop_words(language))


@cache
def _arrow_normalizes(form: str) -> bool:
    """Whether this pyarrow's ``utf8_normalize`` gives ``form`` (pyarrow 25.0.1 returns decomposed
    text for NFC and NFKC, which would leave composed and decomposed copies of a document apart)."""
    sample = "Cafe\u0301 Caf\u00e9 \ufb01"
    return pc.utf8_normalize(pa.array([sample]), form=form)[0].as_py() == unicodedata.normalize(form, sample)


def _normalize(texts: pa.Array, form: str) -> pa.Array:
    if _arrow_normalizes(form):
        return pc.utf8_normalize(texts, form=form)
    # Python's own, as fast on text that is already normalized (a quick check first).
    return pa.array(
        [None if t is None else unicodedata.normalize(form, t) for t in texts.to_pylist()], pa.string()
    )


def clean_texts(texts: pa.Array, cfg: CleanConfig) -> pa.Array:
    """Clean a column of documents with Arrow's vectorized string kernels (no per-document Python)."""
    if cfg.normalize != "none":
        texts = _normalize(texts, cfg.normalize)
    texts = pc.replace_substring(pc.replace_substring(texts, "\r\n", "\n"), "\r", "\n")
    if cfg.strip_control:
        texts = pc.replace_substring_regex(texts, _CONTROL, "")
    if cfg.collapse_whitespace:
        # Trailing spaces and runs of blank lines only: indentation is meaning in code.
        texts = pc.replace_substring_regex(texts, r"[ \t]+\n", "\n")
        texts = pc.utf8_trim_whitespace(pc.replace_substring_regex(texts, r"\n{3,}", "\n\n"))
    if cfg.stopwords:
        stop = _stopwords(cfg.stopword_language)
        texts = pa.array([_drop_stopwords(t, stop) for t in texts.to_pylist()], type=texts.type)
    return texts


def _drop_stopwords(text: str, stop: frozenset[str]) -> str:
    text = "".join(t for t in _WORD.findall(text) if t.lower() not in stop)
    return re.sub(r"[ \t]{2,}", " ", text).strip()


def clean_text(text: str, cfg: CleanConfig) -> str:
    """One document through ``clean_texts``."""
    return clean_texts(pa.array([text], type=pa.string()), cfg)[0].as_py()


def doc_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def hash_fraction(h: str, salt: int = 0) -> float:
    """A uniform number in [0, 1) from a document hash: deterministic splits and samples."""
    return int(h[8 * salt : 8 * salt + 8], 16) / 2**32


def clean_batch(batch: pa.Table, cfg: CleanConfig, val_fraction: float) -> pa.Table:
    """Read rows (text, doc, reason, note, weight) -> cleaned rows with hash, split and copies."""
    texts = clean_texts(batch.column("text").combine_chunks().cast(pa.large_string()), cfg)
    lengths = pc.utf8_length(texts).to_numpy(zero_copy_only=False)
    reasons = np.array(batch.column("reason").to_pylist(), dtype=object)
    fresh = reasons == ""
    too_long = lengths > (cfg.max_chars if cfg.max_chars is not None else np.iinfo(np.int64).max)
    # First matching rule wins, as in the docs: empty, then too short, then too long.
    reasons[fresh & too_long] = "too_long"
    reasons[fresh & (lengths < cfg.min_chars)] = "too_short"
    reasons[fresh & (lengths == 0)] = "empty_after_clean"
    out_texts, hashes, splits, copies = [], [], [], []
    for text, reason, doc, weight in zip(
        texts.to_pylist(),
        reasons,
        batch.column("doc").to_pylist(),
        batch.column("weight").to_pylist(),
        strict=True,
    ):
        # Drops keep a unique key so they never look like duplicates of each other.
        h = "~" + doc_hash(doc) if reason else doc_hash(text)
        out_texts.append("" if reason else text)
        hashes.append(h)
        splits.append("val" if not reason and hash_fraction(h) < val_fraction else "train")
        # Weights are repeat factors, applied after dedup: 2.5 -> 2 copies plus a third for half.
        whole = int(weight)
        copies.append(0 if reason else whole + (1 if hash_fraction(h, 1) < weight - whole else 0))
    return pa.table(
        {
            "text": pa.array(out_texts, type=pa.large_string()),
            "reason": pa.array(reasons.tolist(), type=pa.string()),
            "hash": pa.array(hashes, type=pa.string()),
            "split": pa.array(splits, type=pa.string()),
            "copies": pa.array(copies, type=pa.int32()),
            "note": batch.column("note"),
            "source": batch.column("source"),
        }
    )


def minhash_signatures(texts: list[str], ngram: int = 5) -> list[Any]:
    """MinHash of character n-grams (datasketch): works for any script, Chinese included."""
    from datasketch import MinHash

    sigs = []
    for t in texts:
        m = MinHash(num_perm=MINHASH_PERM, seed=1, scheme=MINHASH_SCHEME)
        grams = {t[i : i + ngram] for i in range(max(1, len(t) - ngram + 1))}
        m.update_batch([g.encode("utf-8") for g in grams])
        sigs.append(m)
    return sigs


def lsh_bands(threshold: float) -> tuple[int, int]:
    """(bands, rows per band) that datasketch's ``MinHashLSH`` picks for this Jaccard threshold."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=MINHASH_PERM)
    return lsh.b, lsh.r
