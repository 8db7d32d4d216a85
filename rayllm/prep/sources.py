"""Sources: resolve paths / globs / URIs to files, and read each file into document rows.

``file_items`` lists every input file once, in the driver; prep's Ray Data tasks then call
``read_file`` on each file of their bin, so every error can name its file and line. Bad input either
raises ``DataError`` (``on_error: fail``, the default) or becomes a row with a ``reason`` so that the
driver counts it; nothing vanishes.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rayllm.config import DataConfig, SourceConfig
from rayllm.errors import DataError
from rayllm.runtime import filesystem, is_uri, resolve_pkg

COMPRESSED = (".gz", ".zst", ".zstd", ".bz2", ".lz4")
FORMATS = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".arrow": "arrow",
}
# Formats read a record batch at a time from the open file, never whole into memory.
COLUMNAR = ("parquet", "arrow")
_BLANK = re.compile(rb"^[ \t\r\f\v]*$")
# What ``read_file`` yields per document (and per counted bad-input row).
ROW_SCHEMA = pa.schema(
    [
        ("text", pa.large_string()),  # one file's documents may hold more than 2 GiB of text
        ("doc", pa.string()),
        ("reason", pa.string()),
        ("note", pa.string()),
        ("source", pa.int64()),
        ("weight", pa.float64()),
    ]
)


def infer_format(path: str) -> str:
    name = path.lower()
    for ext in COMPRESSED:
        name = name.removesuffix(ext)
    return FORMATS.get(Path(name).suffix, "txt")


def list_files(src: SourceConfig, index: int) -> list[str]:
    """Every file a source names, sorted so that listing order never changes the result."""
    path = resolve_pkg(src.path)
    where = f"data.sources[{index}].path"
    if src.format == "hf":
        return hf_files(path, src.split, where)
    if is_uri(path):
        fs, base = filesystem(path)
        scheme = path.split("://", 1)[0] + "://"
        if any(c in base for c in "*?["):
            root = base[: min(base.find(c) for c in "*?[" if c in base)].rsplit("/", 1)[0]
            infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
            files = [i.path for i in infos if i.is_file and fnmatch.fnmatch(i.path, base)]
        else:
            info = fs.get_file_info(base)
            if info.type == pafs.FileType.Directory:
                infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
                files = [i.path for i in infos if i.is_file]
            else:
                files = [base] if info.type == pafs.FileType.File else []
        files = [scheme + f for f in files]
    elif any(c in path for c in "*?["):
        files = [f for f in glob.glob(os.path.expanduser(path), recursive=True) if os.path.isfile(f)]
    elif os.path.isdir(path):
        files = [str(p) for p in Path(path).rglob("*") if p.is_file() and not p.name.startswith(".")]
    elif os.path.isfile(path):
        files = [path]
    else:
        raise DataError(f"{where}: {src.path} does not exist")
    if not files:
        raise DataError(f"{where}: {src.path} matches no files")
    return sorted(os.path.abspath(f) if not is_uri(f) else f for f in files)


def hf_files(path: str, split: str | None, where: str) -> list[str]:
    """The data files of one split of a Hugging Face dataset, found the way ``datasets`` finds them:
    a ``save_to_disk`` folder (one Dataset, or a DatasetDict's split folder) lists its Arrow files in
    ``state.json``; any other folder (or ``hf://datasets/...``) is resolved by the library's own
    split patterns (``data/train-00000-of-00002.parquet``, ``train/*.jsonl``, ...)."""
    from datasets.data_files import EmptyDatasetError, get_data_patterns, resolve_pattern

    fs, base = filesystem(path)
    exists = fs.get_file_info(base).type == pafs.FileType.Directory

    def read_json(name: str) -> Any | None:
        info = fs.get_file_info(f"{base}/{name}")
        if info.type != pafs.FileType.File:
            return None
        with fs.open_input_stream(f"{base}/{name}") as f:
            return json.loads(f.read())

    if not exists and not path.startswith("hf://"):
        raise DataError(f"{where}: {path} is not a folder (format hf reads a Hugging Face dataset folder)")
    splits = read_json("dataset_dict.json")
    if splits is not None:  # DatasetDict.save_to_disk: one folder per split
        names = splits.get("splits", [])
        wanted = split or "train"
        if wanted not in names:
            listed = ", ".join(names)
            raise DataError(f"{where}: {path} has no split {wanted!r} (splits: {listed}); set split")
        return hf_files(f"{path.rstrip('/')}/{wanted}", None, where)
    state = read_json("state.json")
    if state is not None:  # Dataset.save_to_disk
        saved = state.get("_split")
        if split and saved and split != saved:
            raise DataError(f"{where}: {path} holds split {saved!r}, not {split!r}")
        return [f"{path.rstrip('/')}/{f['filename']}" for f in state.get("_data_files", [])]
    try:
        patterns = get_data_patterns(path)
    except EmptyDatasetError:
        raise DataError(f"{where}: {path} holds no data files a Hugging Face dataset reads") from None
    wanted = split or "train"
    if wanted not in patterns:
        names = ", ".join(str(k) for k in patterns)
        raise DataError(f"{where}: {path} has no split {wanted!r} (splits: {names}); set split")
    files = sorted({f for p in patterns[wanted] for f in resolve_pattern(p, path)})
    unreadable = [f for f in files if infer_format(f) not in ("jsonl", "parquet", "arrow")]
    if unreadable:
        raise DataError(
            f"{where}: {unreadable[0]}: only parquet, json/jsonl and arrow files are read from a "
            "Hugging Face dataset; convert it with datasets (to_parquet)"
        )
    return files


def file_items(cfg: DataConfig) -> list[dict[str, Any]]:
    """One row per input file: what ``read_file`` needs to turn it into documents."""
    if not cfg.sources:
        raise DataError("data.sources is empty: name at least one file, directory, glob or URI")
    items = []
    for i, src in enumerate(cfg.sources):
        files = list_files(src, i)
        formats = [infer_format(f) if src.format in (None, "hf") else src.format for f in files]
        if cfg.task == "sft" and any(fmt != "jsonl" for fmt in formats):
            raise DataError(f"data.sources[{i}]: data.task=sft reads jsonl examples; {src.path} is not jsonl")
        fs, _ = filesystem(files[0])
        sizes = [info.size or 0 for info in fs.get_file_info([filesystem(f)[1] for f in files])]
        mtimes = [info.mtime_ns or 0 for info in fs.get_file_info([filesystem(f)[1] for f in files])]
        for f, size, mtime, fmt in zip(files, sizes, mtimes, formats, strict=True):
            items.append(
                {
                    "path": f,
                    "bytes": size,
                    "mtime_ns": mtime,
                    "source": i,
                    "format": fmt,
                    "split_on": src.split_on,
                    "text_field": src.text_field,
                    "id_field": src.id_field or "",
                    "weight": src.weight,
                    "sft": cfg.task == "sft",
                }
            )
    return items


class _Reader:
    """Reads one file under the configured error policy; yields document rows."""

    def __init__(self, item: dict[str, Any], on_error: str, invalid_utf8: str) -> None:
        self.item = item
        self.path = item["path"]
        self.on_error = on_error
        self.invalid_utf8 = invalid_utf8

    def row(self, text: str, where: str, reason: str = "") -> dict[str, Any]:
        # "utf8_replaced" is a note on a kept document, every other reason drops it.
        note = reason if reason == "utf8_replaced" else ""
        return {
            "text": text,
            "doc": f"{self.path}:{where}",
            "reason": "" if note else reason,
            "note": note,
            "source": self.item["source"],
            "weight": self.item["weight"],
        }

    def bad(self, reason: str, where: str, message: str, fix: str = "") -> dict[str, Any]:
        """Fail with file and line, or (``on_error: skip``) return a counted drop row."""
        if self.on_error == "fail":
            hint = fix or "set data.on_error=skip to skip and count such input"
            raise DataError(f"{self.path}:{where}: {message}; {hint}")
        return self.row("", where, reason)

    def read_bytes(self) -> bytes:
        fs, p = filesystem(self.path)
        compression = "detect" if self.path.lower().endswith(COMPRESSED) else None
        with fs.open_input_stream(p, compression=compression) as f:
            return f.read()

    def decode(self, raw: bytes, line: int) -> tuple[str | None, str]:
        """Decode under ``data.invalid_utf8``; returns (text or None to skip, reason)."""
        try:
            return raw.decode("utf-8"), ""
        except UnicodeDecodeError as e:
            if self.invalid_utf8 == "replace":
                return raw.decode("utf-8", errors="replace"), "utf8_replaced"
            if self.invalid_utf8 == "skip":
                return None, "invalid_utf8"
            raise DataError(
                f"{self.path}:{line}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                "set data.invalid_utf8=replace or skip"
            ) from None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        fmt = self.item["format"]
        if fmt in COLUMNAR:
            yield from self.columnar(fmt)
            return
        try:
            raw = self.read_bytes()
        except (OSError, pa.ArrowException) as e:
            yield self.bad("unreadable_file", "0", f"cannot read file ({e})")
            return
        if b"\x00" in raw[:65536]:
            yield self.bad("binary_file", "1", "binary file (NUL byte found), not text")
            return
        if not raw.strip():
            yield self.bad("empty_file", "1", "file is empty")
            return
        if fmt == "txt":
            yield from self.txt(raw)
        else:
            yield from self.jsonl(raw)

    def txt(self, raw: bytes) -> Iterator[dict[str, Any]]:
        lines = raw.split(b"\n")
        split_on = self.item["split_on"]
        if split_on == "file":
            groups = [(1, lines)]
        elif split_on == "line":
            groups = [(i + 1, [ln]) for i, ln in enumerate(lines) if not _BLANK.match(ln)]
        else:
            groups, start, cur = [], 0, []
            for i, ln in enumerate(lines):
                if _BLANK.match(ln):
                    if cur:
                        groups.append((start, cur))
                    cur = []
                else:
                    if not cur:
                        start = i + 1
                    cur.append(ln)
            if cur:
                groups.append((start, cur))
        for line_no, group in groups:
            text, reason = self._decode_lines(group, line_no)
            if text is None:
                yield self.row("", str(line_no), reason)
            else:
                yield self.row(text, str(line_no), reason)

    def _decode_lines(self, group: list[bytes], first_line: int) -> tuple[str | None, str]:
        try:
            return b"\n".join(group).decode("utf-8"), ""
        except UnicodeDecodeError:
            pass
        # Find the exact bad line for the message, then apply the policy to the whole document.
        for k, ln in enumerate(group):
            try:
                ln.decode("utf-8")
            except UnicodeDecodeError:
                _, reason = self.decode(ln, first_line + k)
                if reason == "invalid_utf8":
                    return None, reason
                break
        return b"\n".join(group).decode("utf-8", errors="replace"), "utf8_replaced"

    def jsonl(self, raw: bytes) -> Iterator[dict[str, Any]]:
        field, id_field = self.item["text_field"], self.item["id_field"]
        for i, line in enumerate(raw.split(b"\n"), start=1):
            if _BLANK.match(line):
                continue
            text, reason = self.decode(line, i)
            if text is None:
                yield self.row("", str(i), reason)
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                yield self.bad("malformed_json", str(i), f"malformed JSON ({e.msg} at column {e.colno})")
                continue
            if self.item.get("sft"):
                messages = sft_messages(obj)
                if isinstance(messages, str):
                    yield self.bad("malformed_example", str(i), messages)
                else:
                    yield self.row(json.dumps(messages, ensure_ascii=False), str(i), reason)
                continue
            if not isinstance(obj, dict) or field not in obj:
                yield self.bad(
                    "missing_field",
                    str(i),
                    f"missing text field {field!r}",
                    "set the source's text_field, or data.on_error=skip",
                )
                continue
            value = obj[field]
            if not isinstance(value, str):
                yield self.bad(
                    "missing_field", str(i), f"field {field!r} is {type(value).__name__}, not text"
                )
                continue
            where = f"{i}" + (f"#{obj[id_field]}" if id_field and id_field in obj else "")
            yield self.row(value, where, reason)

    def columnar(self, fmt: str) -> Iterator[dict[str, Any]]:
        """Parquet (a row group at a time) or Arrow IPC, stream or file format as ``datasets`` writes
        them (a record batch at a time): the text column only, never the whole file in memory."""
        field = self.item["text_field"]
        try:
            if self.path.lower().endswith(COMPRESSED):  # no random access: decompressed in memory
                f = pa.BufferReader(self.read_bytes())
            else:
                fs, p = filesystem(self.path)
                f = fs.open_input_file(p)
        except (OSError, pa.ArrowException) as e:
            yield self.bad("unreadable_file", "0", f"cannot read file ({e})")
            return
        with f:
            try:
                batches, names = _record_batches(f, fmt, field)
            except (OSError, pa.ArrowException) as e:
                yield self.bad("unreadable_file", "0", f"not a readable {fmt} file ({e})")
                return
            if field not in names:
                yield self.bad(
                    "missing_field",
                    "0",
                    f"no column {field!r} (columns: {', '.join(names)})",
                    "set the source's text_field",
                )
                return
            i = 0
            try:
                for batch in batches:
                    for value in batch.column(field).to_pylist():
                        if isinstance(value, str):
                            yield self.row(value, f"row{i}")
                        else:
                            yield self.bad(
                                "missing_field", f"row{i}", f"column {field!r} is null or not text"
                            )
                        i += 1
            except (OSError, pa.ArrowException) as e:
                yield self.bad("unreadable_file", f"row{i}", f"{fmt} file cut short or corrupt ({e})")


def _record_batches(f: Any, fmt: str, field: str) -> tuple[Iterator[Any], list[str]]:
    """(record batches holding ``field`` where present, the file's column names)."""
    if fmt == "parquet":
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        return (pf.iter_batches(columns=[field], batch_size=8192) if field in names else iter(())), names
    try:
        reader = pa.ipc.open_stream(f)  # Dataset.save_to_disk writes the stream format
    except pa.ArrowInvalid:
        f.seek(0)
        file_reader = pa.ipc.open_file(f)
        batches = (file_reader.get_batch(k) for k in range(file_reader.num_record_batches))
        return batches, file_reader.schema.names
    return iter(reader), reader.schema.names


def sft_messages(obj: Any) -> list[dict[str, str]] | str:
    """A fine-tuning example as chat messages ending with the answer, or what is wrong with it."""
    if isinstance(obj, dict) and isinstance(obj.get("messages"), list):
        messages = obj["messages"]
        if not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            return "'messages' must be a non-empty list of {role, content} strings"
        if messages[-1]["role"] != "assistant":
            return "the last message must be the assistant's (the answer the loss is on)"
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if (
        isinstance(obj, dict)
        and isinstance(obj.get("prompt"), str)
        and isinstance(obj.get("completion"), str)
    ):
        return [
            {"role": "user", "content": obj["prompt"]},
            {"role": "assistant", "content": obj["completion"]},
        ]
    return "a fine-tuning example needs 'messages' or string fields 'prompt' and 'completion'"


def read_file(item: dict[str, Any], on_error: str, invalid_utf8: str) -> Iterator[dict[str, Any]]:
    """``flat_map`` body: one input file -> its document rows (and counted drop rows)."""
    yield from _Reader(item, on_error, invalid_utf8)
