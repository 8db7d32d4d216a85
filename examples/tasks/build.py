"""Build the translation and summarization task files from real offline data on this machine.

- ``translate-en-zh``, ``translate-en-de``: human translations of user-interface and help strings from
  the gettext catalogs (``/usr/share/locale/<lang>/LC_MESSAGES/*.mo``), sentence-like entries only;
- ``summarize-code``: CPython standard-library functions (their docstring removed) -> the first line of
  their docstring.

Train and test are split by source file (a whole catalog, a whole module), never by line, so no test
example comes from a file seen in training. Every row is ``{"prompt", "completion"}``; the QA and code
sets beside this script are written by hand. Run:

    .venv/bin/python examples/tasks/build.py            # writes examples/tasks/<task>/{train,test}.jsonl
"""

from __future__ import annotations

import argparse
import ast
import gettext
import hashlib
import json
import re
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEST_SHARE = 0.15  # of the source files
FORMAT = re.compile(r"%[-+ #0-9.]*[a-zA-Z]|\{[^}]*\}|<[^>]+>|&\w+;|_[A-Za-z]|\\|\t")
LANGS = {"zh": ("zh_CN", "Chinese"), "de": ("de", "German")}


def _test_file(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 2**32 < TEST_SHARE


def translation_pairs(locale: str) -> dict[str, list[tuple[str, str]]]:
    """Sentence-like (3 to 25 words, no format specifiers or markup) entries per catalog file."""
    out: dict[str, list[tuple[str, str]]] = {}
    for mo in sorted(Path("/usr/share/locale", locale, "LC_MESSAGES").glob("*.mo")):
        try:
            catalog = gettext.GNUTranslations(mo.open("rb"))._catalog  # type: ignore[attr-defined]
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        pairs = []
        for source, target in catalog.items():
            if not isinstance(source, str) or not source or not target or "\x00" in source:
                continue
            source, target = " ".join(source.split()), " ".join(target.split())
            if not 3 <= len(source.split()) <= 25 or FORMAT.search(source) or FORMAT.search(target):
                continue
            if source == target or len(target) < 2:
                continue
            pairs.append((source, target))
        if pairs:
            out[mo.name] = pairs
    return out


def docstring_pairs() -> dict[str, list[tuple[str, str]]]:
    """Standard-library functions with a one-line docstring summary, per module file."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out: dict[str, list[tuple[str, str]]] = {}
    for py in sorted(stdlib.glob("*.py")):
        try:
            source = py.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError):
            continue
        pairs = []
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            summary = doc.strip().splitlines()[0].strip() if doc else ""
            if not 4 <= len(summary.split()) <= 20:
                continue
            node.body = node.body[1:] or [ast.Pass()]  # without its docstring
            code = ast.unparse(node)
            if 80 <= len(code) <= 1200:
                pairs.append((code, summary))
        if pairs:
            out[py.name] = pairs
    return out


def write(
    task: str, by_file: dict[str, list[tuple[str, str]]], prompt: str, limits: tuple[int, int], out: Path
) -> None:
    folder = out / task
    folder.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    split: dict[str, list[dict[str, str]]] = {"train": [], "test": []}
    for name, pairs in sorted(by_file.items()):
        part = split["test" if _test_file(name) else "train"]
        for source, target in pairs:
            if source in seen:  # the same string in two catalogs would leak across the split
                continue
            seen.add(source)
            part.append({"prompt": prompt.format(source), "completion": target, "source": name})
    for part, cap in zip(("train", "test"), limits, strict=True):
        rows = sorted(split[part], key=lambda r: hashlib.sha256(r["prompt"].encode()).hexdigest())[:cap]
        with (folder / f"{part}.jsonl").open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{task}/{part}.jsonl: {len(rows)} of {len(split[part])} rows")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=2000, help="rows kept per training file")
    ap.add_argument("--test", type=int, default=200, help="rows kept per test file")
    ap.add_argument("--out", type=Path, default=HERE, help="folder of the task folders")
    args = ap.parse_args()
    limits = (args.train, args.test)
    for lang, (locale, name) in LANGS.items():
        pairs = translation_pairs(locale)
        if not pairs:
            raise SystemExit(f"no gettext catalogs in /usr/share/locale/{locale}: translation needs them")
        write(f"translate-en-{lang}", pairs, f"Translate into {name}: {{}}", limits, args.out)
    summarize = "Summarize in one line what this Python function does:\n{}"
    write("summarize-code", docstring_pairs(), summarize, limits, args.out)


if __name__ == "__main__":
    main()
