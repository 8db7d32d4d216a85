"""prep: readers and cleaning (in-process), then whole Ray Data runs on real text."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import CHINESE, tiny_config

from rayllm.config import CleanConfig, SourceConfig, TokenizerConfig
from rayllm.errors import DataError
from rayllm.prep.clean import clean_batch, clean_text
from rayllm.prep.sources import ROW_SCHEMA, infer_format, list_files, read_file
from rayllm.prep.stage import file_bins, tokenize_batch
from rayllm.prep.tokenizer import Encoder, fast_spec, hf_tokenizer, tiktoken_spec, train_tokenizer


def item(path: Path, fmt: str | None = None, **kw) -> dict:
    return {
        "path": str(path),
        "source": 0,
        "format": fmt or infer_format(str(path)),
        "split_on": kw.get("split_on", "paragraph"),
        "text_field": kw.get("text_field", "text"),
        "id_field": kw.get("id_field", ""),
        "weight": 1.0,
    }


def docs(it: dict, on_error: str = "fail", invalid_utf8: str = "fail") -> list[dict]:
    return list(read_file(it, on_error, invalid_utf8))


# ------------------------------------------------------------------------------------------ readers
def test_txt_split_modes(tmp_path: Path):
    f = tmp_path / "a.txt"
    f.write_text("one\ntwo\n\n\nthree\n\nfour 四\n", encoding="utf-8")
    assert [d["text"] for d in docs(item(f))] == ["one\ntwo", "three", "four 四"]
    assert [d["doc"].rsplit(":", 1)[1] for d in docs(item(f))] == ["1", "5", "7"]
    assert [d["text"] for d in docs(item(f, split_on="line"))] == ["one", "two", "three", "four 四"]
    assert len(docs(item(f, split_on="file"))) == 1


def test_jsonl_fields_and_compression(tmp_path: Path):
    rows = [{"text": "hello", "id": "a"}, {"text": "世界", "id": "b"}]
    body = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(body))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(body))
    for name in ("a.jsonl.gz", "b.jsonl.zst"):
        out = docs(item(tmp_path / name, id_field="id"))
        assert [d["text"] for d in out] == ["hello", "世界"]
        assert out[1]["doc"].endswith(":2#b")


def test_parquet_column(tmp_path: Path):
    pq.write_table(pa.table({"body": ["x y z", "天地"]}), tmp_path / "a.parquet")
    assert [d["text"] for d in docs(item(tmp_path / "a.parquet", text_field="body"))] == ["x y z", "天地"]
    with pytest.raises(DataError, match=r"a\.parquet:0: no column 'text' \(columns: body\)"):
        docs(item(tmp_path / "a.parquet"))


@pytest.mark.parametrize(
    ("name", "content", "message", "reason"),
    [
        (
            "bad.jsonl",
            b'{"text": "ok"}\n{"text": broken\n',
            r"bad\.jsonl:2: malformed JSON",
            "malformed_json",
        ),
        (
            "field.jsonl",
            b'{"text": "ok"}\n{"body": "x"}\n',
            r"field\.jsonl:2: missing text field 'text'",
            "missing_field",
        ),
        ("empty.txt", b"  \n\n", r"empty\.txt:1: file is empty", "empty_file"),
        ("blob.txt", b"abc\x00\x01\x02def", r"blob\.txt:1: binary file", "binary_file"),
    ],
)
def test_bad_input_fails_with_file_and_line_or_is_counted(tmp_path, name, content, message, reason):
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(DataError, match=message):
        docs(item(f))
    skipped = [d["reason"] for d in docs(item(f), on_error="skip") if d["reason"]]
    assert skipped == [reason]


def test_invalid_utf8_policies(tmp_path: Path):
    f = tmp_path / "latin.txt"
    f.write_bytes(b"good line\n\ncaf\xe9 au lait\n\nlast")
    with pytest.raises(DataError, match=r"latin\.txt:3: invalid UTF-8 \(byte 0xe9"):
        docs(item(f))
    replaced = docs(item(f), invalid_utf8="replace")
    assert replaced[1]["text"] == "caf\ufffd au lait" and replaced[1]["note"] == "utf8_replaced"
    skipped = docs(item(f), invalid_utf8="skip")
    assert [d["reason"] for d in skipped] == ["", "invalid_utf8", ""]


def test_missing_and_unmatched_paths(tmp_path: Path):
    with pytest.raises(DataError, match=r"data\.sources\[3\]\.path: .*nope\.txt does not exist"):
        list_files(SourceConfig(path=str(tmp_path / "nope.txt")), 3)
    with pytest.raises(DataError, match="matches no files"):
        list_files(SourceConfig(path=str(tmp_path / "*.md")), 0)


def test_pkg_paths_resolve_to_installed_data():
    files = list_files(SourceConfig(path="pkg://shksprdata/texts/*_gut.txt"), 0)
    assert len(files) == 42 and all(f.endswith("_gut.txt") for f in files)


# ------------------------------------------------------------------------------------------ cleaning
def test_clean_steps():
    cfg = CleanConfig()
    assert clean_text("Cafe\u0301", cfg) == "Café"  # NFC composes
    assert clean_text("a\x07b\u200bc\r\nd", cfg) == "abc\nd"
    code = "def f():\n    return 1   \n\n\n\n\nx = 2\n"
    assert clean_text(code, cfg) == "def f():\n    return 1\n\nx = 2"  # indentation kept
    assert clean_text(CHINESE[0], cfg) == CHINESE[0]
    assert clean_text("the cat sat on the mat", cfg) == "the cat sat on the mat"  # stop words OFF
    on = CleanConfig(stopwords=True)
    assert clean_text("the cat sat on the mat", on) == "cat sat mat"


@pytest.mark.parametrize("form", ["NFC", "NFKC", "NFD", "NFKD"])
def test_unicode_normalization_is_right_whatever_the_pyarrow(form):
    """pyarrow 25.0.1's utf8_normalize decomposes for NFC/NFKC: prep checks it and uses Python's then."""
    import unicodedata

    from rayllm.prep.clean import _normalize

    samples = ["Cafe\u0301", "Caf\u00e9", "\ufb01ne", "한국어", "中文", None]
    expected = [None if t is None else unicodedata.normalize(form, t) for t in samples]
    assert _normalize(pa.array(samples, pa.string()), form).to_pylist() == expected


def test_clean_batch_reasons_in_rule_order():
    texts = ["   \n ", "short", "x" * 50, "a fine document of some length", ""]
    rows = pa.Table.from_pylist(
        [
            {
                "text": t,
                "doc": f"f.txt:{i}",
                "reason": "binary_file" if i == 4 else "",
                "note": "",
                "source": 0,
                "weight": 1.0,
            }
            for i, t in enumerate(texts)
        ],
        schema=ROW_SCHEMA,
    )
    out = clean_batch(rows, CleanConfig(min_chars=10, max_chars=40), val_fraction=0.0)
    assert out.column("reason").to_pylist() == [
        "empty_after_clean",
        "too_short",
        "too_long",
        "",
        "binary_file",
    ]
    assert out.column("copies").to_pylist() == [0, 0, 0, 1, 0]
    assert out.column("text").to_pylist()[3] == texts[3]
    hashes = out.column("hash").to_pylist()
    assert len(set(hashes)) == 5 and all(h.startswith("~") for i, h in enumerate(hashes) if i != 3)


def test_file_bins_balance_bytes_and_keep_every_file():
    items = [{"path": f"f{i}", "bytes": b} for i, b in enumerate([700, 10, 20, 300, 300, 5, 90, 80])]
    bins = file_bins(items, 3)
    assert sorted(it["path"] for b in bins for it in b) == sorted(it["path"] for it in items)
    loads = sorted(sum(it["bytes"] for it in b) for b in bins)
    assert loads == [400, 405, 700]  # the big file alone, the rest split evenly
    assert file_bins(list(reversed(items)), 3) == bins  # listing order does not matter
    assert len(file_bins(items[:2], 8)) == 2
    # Empty files (or remote ones of unknown size) spread like the rest: no bin is left empty.
    empties = [{"path": "a", "bytes": 9}, {"path": "e1", "bytes": 0}, {"path": "e2", "bytes": 0}]
    assert sorted(len(b) for b in file_bins(empties, 4)) == [1, 1, 1]


# ------------------------------------------------------------------------------ tokenizer engines
ENGINE_TEXTS = [
    *CHINESE,
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
    "def f(x):\n\tif x  >= 10_000:\n        return x ** 2  # comment\r\n    return None\n\n\n",
    "emoji 🤖🚀 and accents café naïve Ångström, numbers 3.14159 and 1,000,000.",
    "documents may contain <|endoftext|> literally, in the middle<|endoftext|>of words",
    "   leading and trailing spaces   \n   ",
    "",
]


def _engine_cases(tmp_path: Path) -> list[str]:
    """GPT-2's vocabulary (the DATA.md tokenizer) and one trained here on Shakespeare and Chinese."""
    from conftest import shakespeare_dir
    from serve_helpers import write_gpt2_tokenizer

    write_gpt2_tokenizer(tmp_path / "gpt2")
    gpt2 = hf_tokenizer(tmp_path / "gpt2").backend_tokenizer.to_str()
    sample = (shakespeare_dir() / "hamlet_gut.txt").read_text(encoding="utf-8").split("\n\n")[:800]
    train_tokenizer([*sample, *CHINESE * 20], TokenizerConfig(vocab_size=600), tmp_path / "trained")
    return [gpt2, (tmp_path / "trained" / "tokenizer.json").read_text(encoding="utf-8")]


def test_tiktoken_engine_gives_the_tokenizers_ids(tmp_path: Path):
    import sysconfig

    from conftest import shakespeare_dir

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [
        *ENGINE_TEXTS,
        *(shakespeare_dir() / "macbeth_gut.txt").read_text(encoding="utf-8").split("\n\n")[:400],
        *(p.read_text(encoding="utf-8") for p in sorted(stdlib.glob("[a-c]*.py"))[:25]),
    ]
    for tok_json in _engine_cases(tmp_path):
        fast = fast_spec(tok_json, "auto")
        assert fast is not None
        encoder = Encoder(tok_json, fast)
        assert encoder.engine == "tiktoken"
        ids = encoder.encode_batch(texts)
        assert ids == encoder.reference(texts)
        assert sum(map(len, ids)) > 50_000
    assert fast_spec(tok_json, "tokenizers") is None


def test_tiktoken_engine_refuses_tokenizers_it_cannot_match(tmp_path: Path):
    gpt2 = json.loads(_engine_cases(tmp_path)[0])
    normalized = {**gpt2, "normalizer": {"type": "NFKC"}}
    assert tiktoken_spec(normalized) == "the tokenizer has a normalizer"
    prefixed = {**gpt2, "pre_tokenizer": {**gpt2["pre_tokenizer"], "add_prefix_space": True}}
    assert "add_prefix_space=False" in tiktoken_spec(prefixed)
    reordered = {**gpt2, "model": {**gpt2["model"], "merges": gpt2["model"]["merges"][::-1]}}
    assert tiktoken_spec(reordered) == "merge results are not new tokens in merge order"
    assert fast_spec(json.dumps(normalized), "auto") is None  # auto falls back to tokenizers
    with pytest.raises(
        DataError, match=re.escape("data.tokenizer.engine=tiktoken cannot encode this tokenizer: ")
    ):
        fast_spec(json.dumps(normalized), "tiktoken")


def _byte_level_bpe(merges: list[list[str]], added: list[dict], **top: object) -> str:
    """A hand-made byte-level BPE tokenizer.json: 256 byte tokens, then one token per merge."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: b for b, c in bytes_to_unicode().items()}
    for left, right in merges:
        vocab[left + right] = len(vocab)
    for a in added:
        vocab.setdefault(a["content"], a["id"])
    flags = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    model = {"type": "BPE", "dropout": None, "unk_token": None, "fuse_unk": False, "byte_fallback": False}
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{**flags, **a} for a in added],
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": None,
        "decoder": byte_level,
        "model": {**model, "ignore_merges": False, "vocab": vocab, "merges": merges},
    }
    return json.dumps({**spec, **top})


def test_tiktoken_engine_refuses_unlisted_merges_and_prefix_added_tokens(tmp_path: Path):
    """Cases a structural check passes but where tiktoken would differ: caught before any task runs."""
    eos = {"id": 259, "content": "<|endoftext|>"}
    # "abc" is a token, but only via "ab" + "c": tiktoken would also merge "a" + "bc".
    unlisted = _byte_level_bpe([["b", "c"], ["a", "b"], ["ab", "c"]], [eos])
    assert fast_spec(unlisted, "auto") is None
    with pytest.raises(DataError, match="encode the vocabulary entry 'abc' differently"):
        fast_spec(unlisted, "tiktoken")
    # Added tokens where one is a prefix of another (runs of spaces, as code models ship): the
    # tokenizers library takes the longest, tiktoken's alternation whichever it tries first.
    spaces = [{"id": 254 + n, "content": " " * n, "special": False} for n in (2, 3, 4)]
    assert tiktoken_spec(json.loads(_byte_level_bpe([], [*spaces, {**eos, "id": 259}]))) == (
        "an added token is empty or a prefix of another"
    )
    # A saved truncation/padding setting must not cut or pad documents in either engine.
    eos["id"] = 257
    kept = _byte_level_bpe(
        [["a", "b"]],
        [eos],
        truncation={"direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0},
        padding={"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None,
                 "pad_id": 257, "pad_type_id": 0, "pad_token": "<|endoftext|>"},
    )  # fmt: skip
    encoder = Encoder(kept, fast_spec(kept, "tiktoken"))
    texts = ["ab ab ab ab", "a"]
    assert encoder.reference(texts) == encoder.encode_batch(texts) == [[256, 32, 256, 32, 256, 32, 256], [97]]


def test_fast_engine_disagreement_stops_prep(tmp_path: Path):
    """A fast engine that differs from the tokenizers library on a checked document is an error."""
    tok_json = _engine_cases(tmp_path)[0]
    ranks, special = fast_spec(tok_json, "tiktoken")
    the, of = ranks[b" the"], ranks[b" of"]
    broken = ({**ranks, b" the": of, b" of": the}, special)
    batch = pa.table(
        {
            "text": ["the cat and the hat, " * 5, "plain text"],
            "reason": ["", ""],
            "hash": ["0" * 32, "f" * 32],  # the first is in the checked sample, the second is not
            "split": ["train", "train"],
            "copies": pa.array([1, 1], pa.int32()),
            "note": ["", ""],
            "source": [0, 0],
            "bucket": pa.array([3, 5], pa.int32()),
        }
    )
    good = tokenize_batch(batch, tok_json, fast_spec(tok_json, "auto"), 50256, chunk=1)
    assert good.column("ids").to_pylist()[1][-1] == 50256
    with pytest.raises(DataError, match=r"tiktoken and the tokenizers library give different ids .*'the cat"):
        tokenize_batch(batch, tok_json, broken, 50256, chunk=1)


def test_hf_tokenizer_loads_what_auto_tokenizer_loads(tmp_path: Path):
    from serve_helpers import write_gpt2_tokenizer
    from transformers import AutoTokenizer

    write_gpt2_tokenizer(tmp_path)
    ours, auto = hf_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert type(ours) is type(auto)
    assert ours.backend_tokenizer.to_str() == auto.backend_tokenizer.to_str()
    assert (ours.eos_token_id, ours.pad_token_id, len(ours)) == (
        auto.eos_token_id,
        auto.pad_token_id,
        len(auto),
    )


# --------------------------------------------------------------------------------- whole Ray Data runs
def load_blocks(data_dir: Path, split: str) -> np.ndarray:
    files = sorted((data_dir / split).glob("*.parquet"))
    return np.concatenate(
        [np.stack(pq.read_table(f).column("input_ids").to_numpy(zero_copy_only=False)) for f in files]
    )


def test_prep_accounts_for_every_document_and_token(prepped):
    data_dir = Path(prepped.run_dir) / "prep"
    m = json.loads((data_dir / "manifest.json").read_text())
    assert m["documents_read"] == m["documents_kept"] + sum(m["dropped"].values())
    # CHINESE is written three times in one file: two duplicates of each paragraph are counted.
    assert m["dropped"]["duplicate"] >= 2 * len(CHINESE)
    assert m["dropped"]["too_short"] > 0
    block_len = prepped.data.seq_len + 1
    for split in ("train", "val"):
        blocks = load_blocks(data_dir, split)
        assert blocks.shape == (m["blocks"][split], block_len)
        assert m["tokens_by_split"][split] == blocks.size + m["tokens_dropped_tail"][split]
        assert sum(s["rows"] for s in m["shards"] if s["split"] == split) == m["blocks"][split]
    assert m["tokens"] == sum(m["tokens_by_split"].values())
    # Every kept document ends in EOS: the EOS count is the number of documents packed whole, all
    # but those whose end fell in a split's final partial block (left out and counted).
    eos = sum(int((load_blocks(data_dir, s) == m["eos_id"]).sum()) for s in ("train", "val"))
    assert eos == m["documents_kept"] - sum(m["documents_cut_by_tail"].values())
    assert sum(m["documents_cut_by_tail"].values()) <= 2 * prepped.data.seq_len
    summary = json.loads((data_dir / "summary.json").read_text())
    for key in ("documents_in", "documents_kept", "tokens", "blocks", "vocab_size", "tokens_per_second"):
        assert key in summary
    assert summary["vocab_size"] == 512


def test_trained_tokenizer_round_trips_chinese_and_code(prepped):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(Path(prepped.run_dir) / "prep" / "tokenizer")
    for text in (CHINESE[1], "def f(x):\n    return x ** 2\n", "To be, or not to be"):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"


def test_deterministic_across_source_order_and_sharding(ray_cluster, prepped, tiny_corpus, tmp_path):
    """Sources listed one by one, in reverse, give byte-identical shards to one glob."""
    from rayllm.prep.stage import run as prep

    files = sorted(tiny_corpus.glob("*.txt"), reverse=True)
    cfg = tiny_config(tmp_path, tiny_corpus, data__sources=[{"path": str(f)} for f in files])
    prep(cfg)
    a = json.loads((Path(prepped.run_dir) / "prep" / "manifest.json").read_text())
    b = json.loads((tmp_path / "prep" / "manifest.json").read_text())
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert a["tokenizer_hash"] == b["tokenizer_hash"]


def test_tokenizer_engines_write_identical_shards(ray_cluster, prepped, tiny_corpus, tmp_path):
    """tiktoken (auto, the default here) and the tokenizers library produce byte-identical output."""
    from rayllm.prep.stage import run as prep

    cfg = tiny_config(tmp_path, tiny_corpus)
    cfg.data.tokenizer.engine = "tokenizers"
    prep(cfg)
    a = json.loads((Path(prepped.run_dir) / "prep" / "manifest.json").read_text())
    b = json.loads((tmp_path / "prep" / "manifest.json").read_text())
    assert (a["tokenizer_engine"], b["tokenizer_engine"]) == ("tiktoken", "tokenizers")
    assert a["tokenizer_hash"] == b["tokenizer_hash"]
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_mixed_formats_skip_policy_and_loaded_gpt2_tokenizer(ray_cluster, tmp_path):
    """txt + jsonl.gz + parquet in one run, bad files skipped and counted, GPT-2 vocabulary loaded."""
    from serve_helpers import write_gpt2_tokenizer

    from rayllm.prep.stage import run as prep

    src = tmp_path / "src"
    src.mkdir()
    verses = [{"text": f"And God said, Let there be light {i}: and there was light."} for i in range(300)]
    (src / "kjv.jsonl.gz").write_bytes(gzip.compress("\n".join(map(json.dumps, verses)).encode()))
    pq.write_table(
        pa.table({"text": [f"{c} 第{i}章" for i, c in enumerate(CHINESE * 50)]}), src / "zh.parquet"
    )
    (src / "broken.jsonl").write_text('{"text": "fine enough text here"}\n{oops\n')
    (src / "blob.txt").write_bytes(b"\x00\x01binary")
    tok = tmp_path / "gpt2"
    write_gpt2_tokenizer(tok)
    cfg = tiny_config(
        tmp_path / "run",
        src,
        data__sources=[{"path": str(src / "*")}],
        data__on_error="skip",
        data__tokenizer={"path": str(tok)},
    )
    summary = prep(cfg)
    m = json.loads((tmp_path / "run" / "prep" / "manifest.json").read_text())
    assert m["vocab_size"] == 50257 and m["eos_id"] == 50256
    assert m["dropped"]["malformed_json"] == 1 and m["dropped"]["binary_file"] == 1
    assert summary["documents_kept"] == 300 + 200 + 1
    assert m["documents_read"] == summary["documents_kept"] + sum(m["dropped"].values())


def test_minhash_drops_near_duplicates(ray_cluster, tiny_corpus, tmp_path):
    """Paragraphs differing by one word are near duplicates; exact dedup keeps them, MinHash does not."""
    from rayllm.prep.stage import run as prep

    src = tmp_path / "src"
    src.mkdir()
    base = (tiny_corpus / "hamlet_gut.txt").read_text(encoding="utf-8").split("\n\n")
    paragraphs = [p for p in base if len(p) > 200][:60]
    edited = [p.replace(" the ", " a ", 1) for p in paragraphs]
    assert sum(a != b for a, b in zip(paragraphs, edited, strict=True)) > 30
    (src / "a.txt").write_text("\n\n".join(paragraphs), encoding="utf-8")
    (src / "b.txt").write_text("\n\n".join(edited), encoding="utf-8")
    exact = prep(tiny_config(tmp_path / "exact", src, data__tokenizer={"vocab_size": 300}))
    near = prep(
        tiny_config(
            tmp_path / "near", src, data__clean={"dedup": "minhash"}, data__tokenizer={"vocab_size": 300}
        )
    )
    changed = sum(a != b for a, b in zip(paragraphs, edited, strict=True))
    assert exact["dropped"].get("duplicate", 0) == 60 - changed
    assert near["dropped"].get("near_duplicate", 0) >= changed - 2
    assert near["documents_kept"] <= 62


def test_document_boundaries_as_position_ids(tmp_path):
    from rayllm.prep.pack import Packer, position_ids
    from rayllm.prep.shards import ShardWriter

    blocks = np.array([[5, 6, 0, 7, 8, 9], [1, 0, 0, 2, 3, 0]], dtype=np.int32)
    assert position_ids(blocks, eos_id=0).tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 0, 0, 1, 2]]
    packer = Packer(ShardWriter(tmp_path / "train", block_len=6), shard_rows=2, boundaries_eos=0)
    packer.add(blocks.reshape(-1))
    assert packer.finish() == 0 and packer.blocks == 2
    table = pq.read_table(tmp_path / "train" / "shard-00000.parquet")
    assert table.column_names == ["input_ids", "position_ids"]
    assert table.column("position_ids").to_pylist()[1] == [0, 1, 0, 0, 1, 2]


def test_a_bad_fine_tuning_example_fails_with_file_and_line_or_is_counted(tmp_path: Path):
    f = tmp_path / "chat.jsonl"
    good = '{"prompt": "hi", "completion": "hello"}'
    f.write_text(f'{good}\n{{"messages": [{{"role": "user", "content": "hi"}}]}}\n', encoding="utf-8")
    sft = {**item(f), "sft": True}
    with pytest.raises(DataError, match=r"chat\.jsonl:2: .*last message must be the assistant's"):
        docs(sft)
    kept = docs(sft, on_error="skip")
    assert [bool(d["reason"]) for d in kept] == [False, True]


def test_a_killed_prep_leaves_nothing_train_reads_and_a_rerun_redoes_only_unfinished_buckets(
    ray_cluster, prepped, tiny_corpus, tmp_path
):
    """What prep killed mid-run leaves (some buckets' markers, a shard cut mid-write, no manifest):
    train refuses it in one line, and a re-run redoes only the buckets without a sound marker and
    ends byte-identical to a clean prep. (`bench/bench_faults.py` kills a real prep process mid-run;
    this pins the states it can leave.)"""
    import json
    import os
    import subprocess
    import sys

    from conftest import tiny_config

    from rayllm.prep.stage import run as prep

    cfg = tiny_config(tmp_path, tiny_corpus)
    prep(cfg)
    out = tmp_path / "prep"
    (out / "manifest.json").unlink()  # killed before the manifest: the last file prep writes
    (out / "buckets" / "complete.json").unlink()  # ... and before the last bucket
    markers = sorted((out / "buckets").glob("b*.json"))
    n_buckets = json.loads((out / "plan.json").read_text())["buckets"]
    markers[0].unlink()  # a bucket killed after its shards, before its marker
    first = sorted((out / "train").glob("b00001-*.parquet"))[0]
    first.write_bytes(first.read_bytes()[:100])  # a shard that differs from its marker's sha256
    (out / "train" / "b00002-00099.parquet.tmp").write_bytes(b"cut mid-write")
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    train = subprocess.run(
        [sys.executable, "-m", "rayllm", "train", "-r", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert train.returncode == 2 and "manifest.json not found" in train.stderr, train.stderr[-2000:]
    prep(cfg)
    clean = json.loads((Path(prepped.run_dir) / "prep" / "manifest.json").read_text())
    again = json.loads((out / "manifest.json").read_text())
    assert again["buckets_reused"] == len(markers) - 2 and len(markers) <= n_buckets
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in clean["shards"]]
    assert not list(out.rglob("*.tmp"))
    for key in ("documents_read", "documents_kept", "dropped", "tokens_by_split", "blocks", "sources"):
        assert again[key] == clean[key], key
    # A changed config starts afresh: nothing of the other plan is trusted.
    prep(tiny_config(tmp_path, tiny_corpus, data__seq_len=48))
    assert json.loads((out / "manifest.json").read_text())["buckets_reused"] == 0


@pytest.mark.parametrize("strategy", ["SORT_SHUFFLE_PULL_BASED", "SHUFFLE_V2"])
def test_grouping_by_bucket_hands_each_group_whole_to_one_call(ray_cluster, strategy):
    """Both shuffles prep uses (range-partitioned sort up to SMALL_SORT_BINS bins, hash beyond): every
    bucket's rows reach one call together, and partitions left empty (odd buckets) call nothing."""
    import ray.data

    from rayllm.prep.stage import _grouped

    keys = [k for k in range(0, 50, 2) for _ in range(k % 7 + 1)]
    ds = ray.data.from_arrow(
        [pa.table({"bucket": keys[i::6], "x": list(range(len(keys)))[i::6]}) for i in range(6)]
    )

    def sizes(group: pa.Table) -> pa.Table:
        return pa.table({"bucket": [group.column("bucket")[0].as_py()], "rows": [group.num_rows]})

    ctx = ray.data.DataContext.get_current()
    saved = ctx.shuffle_strategy
    ctx.shuffle_strategy = getattr(ray.data.context.ShuffleStrategy, strategy)
    try:
        out = _grouped(ds, "bucket", 50, 6, sizes, {}).take_all()
    finally:
        ctx.shuffle_strategy = saved
    assert sorted((r["bucket"], r["rows"]) for r in out) == [(k, k % 7 + 1) for k in range(0, 50, 2)]


def test_shards_are_the_same_at_any_parallelism_and_binning(
    ray_cluster, prepped, tiny_corpus, tmp_path, monkeypatch
):
    """One CPU and one bin of files, or every file its own bin at full parallelism: byte-identical
    shards, because a bucket's output depends only on its documents."""
    import ray.data

    from rayllm.prep import stage
    from rayllm.prep.stage import run as prep

    clean = json.loads((Path(prepped.run_dir) / "prep" / "manifest.json").read_text())
    ctx = ray.data.DataContext.get_current()
    limits = ctx.execution_options.resource_limits
    try:
        ctx.execution_options.resource_limits = ray.data.ExecutionResources(cpu=1)
        monkeypatch.setattr(stage, "_bins", lambda items: stage.file_bins(items, 1))
        one = prep(tiny_config(tmp_path / "one", tiny_corpus))
    finally:
        ctx.execution_options.resource_limits = limits
    monkeypatch.setattr(stage, "_bins", lambda items: stage.file_bins(items, len(items)))
    prep(tiny_config(tmp_path / "many", tiny_corpus))
    for run in ("one", "many"):
        m = json.loads((tmp_path / run / "prep" / "manifest.json").read_text())
        assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in clean["shards"]], run
        assert (m["documents_kept"], m["dropped"]) == (clean["documents_kept"], clean["dropped"])
    assert one["buckets"] == clean["buckets"] >= 8


def test_shards_are_the_same_on_a_3_node_cluster(prepped, tiny_corpus, tmp_path):
    """Three simulated nodes of one CPU each (its own Ray, in its own process): the buckets spread
    over the nodes and the shards equal the single-node run's."""
    import os
    import subprocess
    import sys

    script = Path(__file__).parent / "prep_cluster_scenario.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(tiny_corpus), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "RAYLLM_PROGRESS": "0"},
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{"sha256"')]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(lines[-1])
    clean = json.loads((Path(prepped.run_dir) / "prep" / "manifest.json").read_text())
    assert got["sha256"] == [s["sha256"] for s in clean["shards"]]
    assert got["nodes"] >= 2


def test_source_weights_set_the_mix(ray_cluster, tiny_corpus, tmp_path):
    """Weights repeat deduplicated documents: a whole weight repeats each exactly, a fraction keeps
    that share of them (by hash); the manifest reports each source's share against its weight's."""
    from rayllm.prep.stage import run as prep

    cfg = tiny_config(
        tmp_path,
        tiny_corpus,
        data__sources=[
            {"path": str(tiny_corpus / "hamlet_gut.txt"), "weight": 2.0},
            {"path": str(tiny_corpus / "macbeth_gut.txt"), "weight": 0.5},
            {"path": str(tiny_corpus / "chinese.txt"), "weight": 3.0},
        ],
    )
    prep(cfg)
    m = json.loads((tmp_path / "prep" / "manifest.json").read_text())
    hamlet, macbeth, chinese = m["sources"]
    assert sum(s["tokens"] for s in m["sources"]) == m["tokens"]
    assert sum(s["share"] for s in m["sources"]) == pytest.approx(1.0, abs=1e-5)
    assert hamlet["tokens"] == 2 * hamlet["deduplicated_tokens"] > 0
    assert chinese["tokens"] == 3 * chinese["deduplicated_tokens"] and chinese["documents"] == len(CHINESE)
    # About half of macbeth's documents (by hash; a few hundred documents of very uneven length).
    assert 0.35 < macbeth["tokens"] / macbeth["deduplicated_tokens"] < 0.65
    assert m["dropped"]["downsampled"] > 0
    for s in m["sources"]:
        assert abs(s["share"] - s["weighted_share"]) < 0.05, s


def test_max_docs_keeps_the_documents_of_smallest_key(ray_cluster, tiny_corpus, tmp_path):
    from rayllm.prep.stage import run as prep

    summary = prep(tiny_config(tmp_path, tiny_corpus, data__max_docs=300))
    m = json.loads((tmp_path / "prep" / "manifest.json").read_text())
    assert summary["documents_kept"] == 300
    assert m["dropped"]["beyond_max_docs"] > 0
    assert m["documents_read"] == m["documents_kept"] + sum(m["dropped"].values())


# ---------------------------------------------------------------------------- Hugging Face datasets
def _hf_datasets(root: Path) -> dict[str, Path]:
    """The three layouts users keep datasets in, written by the datasets library itself."""
    import datasets

    rows = {"text": [f"{CHINESE[i % 4]} 第{i}段。Some English, too: line {i}." for i in range(120)]}
    rows["id"] = list(range(120))
    ds = datasets.Dataset.from_dict(rows)
    paths = {"saved": root / "saved", "dict": root / "dict", "hub": root / "hub"}
    ds.save_to_disk(str(paths["saved"]))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(10))}).save_to_disk(str(paths["dict"]))
    (paths["hub"] / "data").mkdir(parents=True)
    ds.to_parquet(str(paths["hub"] / "data" / "train-00000-of-00001.parquet"))
    ds.select(range(5)).to_parquet(str(paths["hub"] / "data" / "test-00000-of-00001.parquet"))
    return paths


def test_hf_dataset_sources_read_every_layout_and_split(tmp_path: Path):
    from rayllm.config import DataConfig
    from rayllm.prep.sources import file_items

    paths = _hf_datasets(tmp_path)
    counts = {}
    for name, split in (("saved", None), ("dict", None), ("dict", "test"), ("hub", None), ("hub", "test")):
        cfg = DataConfig(sources=[{"path": str(paths[name]), "format": "hf", "split": split}])
        items = file_items(cfg)
        assert {it["format"] for it in items} <= {"arrow", "parquet"}
        counts[(name, split)] = sum(len(docs(it)) for it in items)
    assert counts == {
        ("saved", None): 120,
        ("dict", None): 120,
        ("dict", "test"): 10,
        ("hub", None): 120,
        ("hub", "test"): 5,
    }
    with pytest.raises(
        DataError, match=r"data.sources\[0\].path: .*dict has no split 'validation' \(splits: train, test\)"
    ):
        file_items(DataConfig(sources=[{"path": str(paths["dict"]), "format": "hf", "split": "validation"}]))
    with pytest.raises(DataError, match=r"no column 'content' \(columns: text, id\)"):
        items = file_items(
            DataConfig(sources=[{"path": str(paths["hub"]), "format": "hf", "text_field": "content"}])
        )
        docs(items[0])


def test_prep_from_a_hugging_face_dataset(ray_cluster, tmp_path):
    from rayllm.prep.stage import run as prep

    paths = _hf_datasets(tmp_path / "ds")
    cfg = tiny_config(
        tmp_path / "run", tmp_path, data__sources=[{"path": str(paths["dict"]), "format": "hf"}]
    )
    summary = prep(cfg)
    assert summary["documents_in"] == 120 and summary["documents_kept"] == 120
