"""Vocabulary: train a byte-level BPE tokenizer (``tokenizers``) or load a local one; and prep's encoder.

Either way the result is saved as a Hugging Face tokenizer folder in ``<run_dir>/prep/tokenizer``
so that train, eval and serve load the very same vocabulary and special tokens. Byte-level BPE
covers every byte, so Chinese and code never hit an unknown token. prep encodes with tiktoken when
that gives the tokenizers library's ids exactly (checked on the whole vocabulary up front and on a
sample of documents during the run), else with the tokenizers library.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from rayllm.config import TokenizerConfig
from rayllm.errors import DataError

_CACHE: dict[str, Tokenizer] = {}
# The regex of the tokenizers library's ByteLevel pre-tokenizer (use_regex=True), i.e. GPT-2's.
BYTE_LEVEL_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, out_dir: Path) -> Any:
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


def hf_tokenizer(path: str | Path) -> Any:
    """A Hugging Face tokenizer folder, loaded by the class its tokenizer_config.json names when
    transformers exports it, else by AutoTokenizer: importing AutoTokenizer pulls in torch, which
    costs prep more than a second of CPU that Ray's start-up needs."""
    import transformers

    config = Path(path) / "tokenizer_config.json"
    name = json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class") if config.is_file() else None
    cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedTokenizerBase)):
        from transformers import AutoTokenizer as cls
    return cls.from_pretrained(path)


def load_tokenizer(path: str, cfg: TokenizerConfig, out_dir: Path) -> Any:
    """Copy a local HF tokenizer folder into the run dir, keeping its own special tokens; returns
    the loaded tokenizer (as ``train_tokenizer`` does). ``prep`` checks the folder exists before
    Ray starts; anything else unloadable is reported here."""
    folder = Path(path)
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise DataError(
            f"data.tokenizer.path: cannot load a tokenizer from {path}: no tokenizer.json or "
            "tokenizer_config.json in it (point it at a folder written by save_pretrained)"
        )
    try:
        hf = hf_tokenizer(path)
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
    return hf


def _save(tok: Tokenizer, eos: str, pad: str, out_dir: Path) -> Any:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, pad_token=pad)
    hf.save_pretrained(out_dir)
    return hf


def tokenizer_hash(folder: Path) -> str:
    return hashlib.sha256((folder / "tokenizer.json").read_bytes()).hexdigest()[:16]


def get_tokenizer(tok_json: str) -> Tokenizer:
    """Per-process cache: Ray Data tasks in one worker reuse the parsed tokenizer."""
    key = hashlib.sha1(tok_json.encode()).hexdigest()
    if key not in _CACHE:
        tok = Tokenizer.from_str(tok_json)
        # A saved tokenizer can carry truncation/padding: documents must be encoded whole, unpadded.
        tok.no_truncation()
        tok.no_padding()
        _CACHE[key] = tok
    return _CACHE[key]


FastSpec = tuple[dict[bytes, int], dict[str, int]]


def tiktoken_spec(spec: dict[str, Any]) -> FastSpec | str:
    """Byte ranks and special tokens for tiktoken when ``spec`` (a parsed tokenizer.json) is a plain
    byte-level BPE that tiktoken encodes identically; otherwise the reason it is not.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank, the tokenizers
    library the pair that comes first in ``merges``. With ranks = ids the two agree on vocabularies
    as BPE training makes them (GPT-2's too): every merge a new token, ids growing with merge order.
    A pruned or edited merge list can pass these checks, so ``fast_spec`` also compares both engines
    on every vocabulary entry.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        return f"model is {model.get('type')}, not BPE"
    if model.get("dropout") or model.get("byte_fallback"):
        return "BPE dropout or byte fallback is on"
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return "BPE uses a subword prefix or suffix"
    if spec.get("normalizer"):
        return "the tokenizer has a normalizer"
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        return "the pre-tokenizer is not ByteLevel(add_prefix_space=False, use_regex=True)"
    added = spec.get("added_tokens") or []
    if any(a.get("lstrip") or a.get("rstrip") or a.get("single_word") for a in added):
        return "an added token strips whitespace or matches single words only"
    contents = sorted(a["content"] for a in added)
    # The tokenizers library takes the longest added token at a position (non-normalized ones
    # first); tiktoken's alternation takes whichever it tries first. Equal only without prefixes
    # (sorted, a prefix of any string is a prefix of its successor).
    if "" in contents or any(b.startswith(a) for a, b in itertools.pairwise(contents)):
        return "an added token is empty or a prefix of another"
    if len({bool(a.get("normalized")) for a in added}) > 1:
        return "added tokens mix normalized and non-normalized matching"
    special = {a["content"]: int(a["id"]) for a in added}
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    for token, i in model.get("vocab", {}).items():
        if token in special:
            continue
        try:
            ranks[bytes(to_byte[c] for c in token)] = int(i)
        except KeyError:
            return f"vocabulary entry {token!r} is not byte-level"
    if any(bytes([b]) not in ranks for b in range(256)):
        return "the vocabulary lacks some of the 256 byte tokens"
    merges = model.get("merges", [])
    last = -1
    for m in merges:
        left, right = m if isinstance(m, list) else m.split(" ", 1)
        try:
            rank = ranks.get(bytes(to_byte[c] for c in left + right))
        except KeyError:
            return f"merge {left!r} + {right!r} is not byte-level"
        if rank is None or rank <= last:
            return "merge results are not new tokens in merge order"
        last = rank
    if len(merges) != len(ranks) - 256:
        return "some vocabulary tokens are not the result of a merge"
    return ranks, special


def fast_spec(tok_json: str, engine: str) -> FastSpec | None:
    """What ``data.tokenizer.engine`` resolves to for this tokenizer: tiktoken tables, or None."""
    if engine == "tokenizers":
        return None
    spec = tiktoken_spec(json.loads(tok_json))
    if not isinstance(spec, str):
        spec = _vocabulary_agrees(tok_json, spec)
    if isinstance(spec, str):
        if engine == "tiktoken":
            raise DataError(f"data.tokenizer.engine=tiktoken cannot encode this tokenizer: {spec}")
        return None
    return spec


def _vocabulary_agrees(tok_json: str, spec: FastSpec) -> FastSpec | str:
    """Both engines on every vocabulary entry that is text, with added-token ids as the library
    assigns them.

    tiktoken merges any adjacent pair whose concatenation is a token, the tokenizers library only
    listed merges: a vocabulary with pruned or edited merges shows the difference on the very
    tokens concerned (~0.3 s for GPT-2's 50k entries, in the driver, while Ray starts).
    """
    ranks, _ = spec
    added = get_tokenizer(tok_json).get_added_tokens_decoder()
    special = {t.content: i for i, t in added.items()}
    if len(special) != len(added) or set(special.values()) & set(ranks.values()):
        return "added token ids collide with each other or with the vocabulary"
    texts = list(special)
    for token in ranks:
        try:
            texts.append(token.decode("utf-8"))
        except UnicodeDecodeError:
            continue
    encoder = Encoder(tok_json, (ranks, special))
    for text, got, want in zip(texts, encoder.encode_batch(texts), encoder.reference(texts), strict=True):
        if got != want:
            return f"tiktoken and tokenizers encode the vocabulary entry {text!r} differently"
    return ranks, special


class Encoder:
    """Batch encoding with tiktoken where it is exact for this tokenizer (several times faster on
    byte-level BPE), else with the tokenizers library; ids are those of the tokenizers library."""

    def __init__(self, tok_json: str, fast: FastSpec | None) -> None:
        self.tok_json = tok_json
        self.max_id = max(get_tokenizer(tok_json).get_vocab(with_added_tokens=True).values())
        self.engine = "tokenizers"
        self._tiktoken: Any = None
        if fast is not None:
            import tiktoken

            ranks, special = fast
            self._tiktoken = tiktoken.Encoding(
                "rayllm", pat_str=BYTE_LEVEL_PATTERN, mergeable_ranks=ranks, special_tokens=special
            )
            self._specials = tuple(special)
            self.engine = "tiktoken"

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._tiktoken is None:
            return self.reference(texts)
        # Added tokens inside text are split out as the tokenizers library does (allowed_special);
        # encode_ordinary, ~1.8x faster, serves the (usual) texts that contain none.
        enc = self._tiktoken
        joined = "\0".join(texts)
        if not any(s in joined for s in self._specials):
            return [enc.encode_ordinary(t) for t in texts]
        return [
            enc.encode(t, allowed_special="all")
            if any(s in t for s in self._specials)
            else enc.encode_ordinary(t)
            for t in texts
        ]

    def reference(self, texts: list[str]) -> list[list[int]]:
        """The tokenizers library's ids: the definition the fast engine is checked against."""
        tok = get_tokenizer(self.tok_json)
        return [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
