"""Every kind of bad input, through the CLI as a user runs it: one line naming the file, line or field,
exit code 2, no traceback; also when the error is raised inside a Ray Data task on the cluster.

The CLI processes join the session's Ray (RAY_ADDRESS) instead of starting their own: the errors
still happen in Ray Data tasks on real Ray workers, in a few seconds per case.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard
from ray_head import free_port

GOOD = "A line of plain text that is long enough to keep.\n\n" * 20


def _unreadable(d: Path) -> Path:
    """A file whose read fails with an OS error. Permissions stop every user but root, who reads
    anything; for root, /proc/self/mem is a regular file whose read fails (EIO) the same way."""
    if os.geteuid() == 0:
        return Path("/proc/self/mem")
    f = d / "locked.txt"
    f.write_text(GOOD)
    f.chmod(0)
    return f


def _write(name: str, content: bytes) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        (d / name).write_bytes(content)
        return d / name

    return make


zst = zstandard.ZstdCompressor().compress(GOOD.encode())
gz = gzip.compress(b'{"text": "hello there, a json line"}\n' * 50)
SOURCES: list[tuple[str, Callable[[Path], Path], str, str]] = [
    ("invalid bytes", _write("latin.txt", b"fine line\n\ncaf\xe9 au lait\n"), "txt",
     r"latin\.txt:3: invalid UTF-8"),
    ("binary data", _write("blob.txt", b"abc\x00\x01\x02" * 50), "txt", r"blob\.txt:1: binary file"),
    ("empty file", _write("empty.txt", b" \n\n"), "txt", r"empty\.txt:1: file is empty"),
    ("missing file", lambda d: d / "nope.txt", "txt",
     r"data\.sources\[0\]\.path: .*nope\.txt does not exist"),
    ("unreadable file", _unreadable, "txt", r": cannot read file \("),
    ("malformed jsonl", _write("bad.jsonl", b'{"text": "ok, a fine line"}\n{"text": oops\n'), "jsonl",
     r"bad\.jsonl:2: malformed JSON"),
    ("wrong field", _write("field.jsonl", b'{"body": "the text is elsewhere"}\n'), "jsonl",
     r"field\.jsonl:1: missing text field 'text'.* text_field"),
    ("malformed parquet", _write("bad.parquet", b"PAR1 this is not parquet PAR1"), "parquet",
     r"bad\.parquet:0: not a readable parquet file"),
    ("corrupt gzip stream", _write("c.jsonl.gz", gz[: len(gz) // 2]), "jsonl",
     r"c\.jsonl\.gz:0: cannot read file"),
    ("corrupt zstd stream", _write("c.txt.zst", zst[:10] + b"\xff" * 40 + zst[50:]), "txt",
     r"c\.txt\.zst:0: cannot read file"),
]  # fmt: skip


@pytest.fixture(scope="module")
def cli_env(ray_cluster) -> dict[str, str]:
    """The environment of a user's shell whose RAY_ADDRESS is the session's cluster."""
    return {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}


def rayllm(env: dict[str, str], *args: str) -> tuple[int, list[str]]:
    proc = subprocess.run(
        [sys.executable, "-m", "rayllm", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.returncode, [ln for ln in proc.stderr.splitlines() if ln.strip()]


def one_line_exit_2(result: tuple[int, list[str]], pattern: str) -> None:
    code, lines = result
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and re.search(pattern, lines[0]), lines[0]


def in_process(*args: str) -> tuple[int, list[str]]:
    """The same CLI, run in this process (typer's runner) on the session's Ray: no interpreter start."""
    from typer.testing import CliRunner

    from rayllm.cli import app

    result = CliRunner().invoke(app, list(args))
    unexpected = result.exception is not None and not isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.stderr and not unexpected, (result.exception, result.stderr[-3000:])
    return result.exit_code, [ln for ln in result.stderr.splitlines() if ln.strip()]


@pytest.mark.parametrize(("make", "fmt", "pattern"), [s[1:] for s in SOURCES], ids=[s[0] for s in SOURCES])
def test_bad_source_is_one_line_and_exit_2(cli_env, tmp_path, make, fmt, pattern):
    """The first case as a user's process; the rest in process, the same code path after start-up."""
    src = make(tmp_path)
    args = ("prep", "-r", str(tmp_path / "run"), "--set", f"data.sources=[{{path: '{src}', format: {fmt}}}]")
    first = make is SOURCES[0][1]
    one_line_exit_2(rayllm(cli_env, *args) if first else in_process(*args), pattern)


def test_folders_that_are_not_what_they_claim(cli_env, prepped, tmp_path):
    """A tokenizer, checkpoint or model folder that is not one: the field and the folder named. The
    first as a user's process, the rest in process (the same code path after start-up)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "text.txt").write_text(GOOD)
    prep = [
        "prep",
        "-r",
        str(tmp_path / "run"),
        "--set",
        f"data.sources=[{{path: '{tmp_path / 'text.txt'}'}}]",
    ]
    one_line_exit_2(
        rayllm(cli_env, *prep, "--set", f"data.tokenizer.path={empty}"),
        r"data\.tokenizer\.path: cannot load a tokenizer from .*empty",
    )
    one_line_exit_2(
        in_process("export", str(tmp_path / "run"), "--checkpoint", str(empty)),
        r"empty: not a rayllm train checkpoint",
    )
    one_line_exit_2(
        in_process("eval", "-r", str(tmp_path / "run"), "--set", f"eval.model_dir={empty}"),
        r"eval\.model_dir=.*empty: not a Hugging Face model folder",
    )
    data = Path(prepped.run_dir) / "prep"
    one_line_exit_2(
        in_process("train", "-r", str(tmp_path / "run"), "--set", f"train.data_dir={data}",
               "--set", f"model.path={empty}"),
        r"model\.path: .*empty is not a Hugging Face model folder",
    )  # fmt: skip


def test_skip_policy_counts_what_it_skips(cli_env, tmp_path):
    """The same bad inputs with data.on_error=skip: the run goes on and every drop is counted."""
    import json

    for _, make, _, _ in SOURCES:
        if make is not _unreadable:
            with contextlib.suppress(OSError):
                make(tmp_path)
    (tmp_path / "good.txt").write_text(GOOD + "\n\nAnother paragraph that survives.\n")
    glob = f"data.sources=[{{path: '{tmp_path}/*.txt'}}, {{path: '{tmp_path}/*.jsonl', format: jsonl}}]"
    code, lines = rayllm(
        cli_env, "prep", "-r", str(tmp_path / "run"), "--set", glob, "--set", "data.on_error=skip",
        "--set", "data.invalid_utf8=skip", "--set", "data.seq_len=8", "--set", "data.val_fraction=0",
        "--set", "data.tokenizer.vocab_size=300",
    )  # fmt: skip
    assert code == 0, lines
    m = json.loads((tmp_path / "run" / "prep" / "manifest.json").read_text())
    assert m["dropped"]["binary_file"] == 1 and m["dropped"]["empty_file"] == 1
    assert m["dropped"]["malformed_json"] == 1 and m["dropped"]["missing_field"] == 1
    assert m["dropped"]["invalid_utf8"] == 1
    assert m["documents_read"] == m["documents_kept"] + sum(m["dropped"].values())


FLASH = ["--set", "model.attention=flash_attention_2"]  # not installed on CPU machines
FLASH_ERROR = r"model\.attention=flash_attention_2: FlashAttention2 .*; use sdpa"


def _from_prepped(prepped) -> list[str]:
    data = Path(prepped.run_dir) / "prep"
    sets = [f"train.data_dir={data}", "train.max_failures=0"]
    return ["-c", str(data / "config.yaml"), *(x for s in sets for x in ("--set", s))]


def test_errors_inside_train_workers(cli_env, prepped, tmp_path):
    """A user error raised in a Ray Train worker, far from the CLI, still ends as one line, exit 2."""
    base = _from_prepped(prepped)
    one_line_exit_2(rayllm(cli_env, "train", "-r", str(tmp_path / "train"), *base, *FLASH), FLASH_ERROR)


@pytest.mark.slow
def test_errors_inside_tune_trials_and_serve_replicas(cli_env, prepped, tmp_path):
    """The same inside a Ray Tune trial's workers; a model folder whose weights do not read is named
    before a Serve replica tries it (vLLM there loses the reason)."""
    from serve_helpers import make_tiny_gpt2

    base = _from_prepped(prepped)
    trial = ["--set", "tune.space={model.attention: [flash_attention_2]}", "--set", "tune.num_samples=1"]
    one_line_exit_2(rayllm(cli_env, "tune", "-r", str(tmp_path / "tune"), *base, *trial), FLASH_ERROR)

    broken = make_tiny_gpt2(tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    port = ["--set", f"serve.port={free_port()}", "--set", f"serve.model_dir={broken}"]
    one_line_exit_2(
        rayllm(cli_env, "serve", "-r", str(tmp_path / "serve"), *port),
        r"serve\.model_dir=.*broken: model\.safetensors is not a readable safetensors file \(",
    )


@pytest.mark.parametrize(
    ("package", "args", "pattern"),
    [
        ("gguf", ["import", "{tmp}/model.gguf"], r"model\.gguf: reading GGUF needs the gguf package"),
        ("optuna", ["tune", "-r", "{tmp}/run", "--set", "tune.search=optuna",
                    "--set", "tune.space={train.optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}}"],
         r"tune\.search=optuna needs the optuna package"),
    ],
)  # fmt: skip
def test_a_missing_optional_engine_is_named(tmp_path, package, args, pattern):
    """A package that only one path needs (GGUF reading, Optuna's search) is named when it is missing."""
    blocked = tmp_path / "blocked" / package
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text(f"raise ImportError('blocked for this test', name={package!r})\n")
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "blocked"), "RAY_ADDRESS": "127.0.0.1:1"}
    one_line_exit_2(rayllm(env, *(a.replace("{tmp}", str(tmp_path)) for a in args)), pattern)
