"""The one table of stages: the CLI verbs, the Ray job entrypoint and `rayllm run` all read it.

Every stage is a module with one entry function, ``run(cfg: RunConfig) -> dict``, that writes
``<run_dir>/<name>/`` and returns the summary it wrote there. Rows are in pipeline order.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rayllm.config import PER_TRIAL, RunConfig, marked
from rayllm.errors import RayllmError

ENTRY = "run"


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # holds ``run(cfg)``
    library: str  # the Ray library doing the work
    help: str
    summary_keys: tuple[str, ...]  # headline figures of its summary.json, in display order
    reads: tuple[str, ...]  # the config sections/fields it depends on (its fingerprint in `rayllm run`)
    consumes: tuple[str, ...] = ()  # the stages whose outputs it reads
    ignores: dict[str, bool] | None = None  # a field mark (rayllm.config): such fields in ``reads``
    # cannot change its outputs
    runs_if: str = ""  # a config field that must be non-empty for `rayllm run` to run it
    tuned: bool = False  # runs with the best tune trial's settings when there was a search
    reads_files: bool = False  # its fingerprint also covers the size and time of every input file
    resume_flag: str = ""  # the bool field that lets it continue from its checkpoint: `rayllm run`
    # sets it false when a field that is not marked RESUMABLE changed
    server: bool = False  # serves until stopped: never up to date, always started

    def config_fields(self, raw: dict[str, Any]) -> dict[str, Any]:
        """What of ``cfg.dump()`` this stage depends on: ``reads``, less the fields it ignores."""
        out: dict[str, Any] = {path: _at(raw, path) for path in self.reads}
        return without(out, marked(self.ignores) if self.ignores else set())

    @property
    def entry(self) -> Callable[..., dict[str, Any]]:
        return getattr(importlib.import_module(self.module), ENTRY)


STAGES: tuple[Stage, ...] = (
    Stage(
        "prep",
        "rayllm.prep.stage",
        "Ray Data",
        "Read, clean, dedup, build the vocabulary, tokenize and pack text into parquet blocks.",
        ("documents_kept", "tokens", "blocks", "vocab_size", "tokens_per_second"),
        ("data",),
        reads_files=True,
    ),
    Stage(
        "tune",
        "rayllm.tune",
        "Ray Tune",
        "Search optimizer / learning-rate settings with Ray Tune, ASHA promoting the best trials.",
        ("trials", "trials_stopped_early", "best_value", "best_params"),
        ("model", "train", "tune"),
        ("prep",),
        # A trial sets its own steps, storage and export; a longer final train is not a new search.
        ignores=PER_TRIAL,
        runs_if="tune.space",
    ),
    Stage(
        "train",
        "rayllm.train.stage",
        "Ray Train + DeepSpeed",
        "Train with Ray Train + DeepSpeed ZeRO; resumes from the run's last checkpoint; exports HF weights.",
        ("steps", "val_loss_last", "tokens_per_second", "mfu", "export_dir"),
        ("model", "train"),
        ("prep", "tune"),
        tuned=True,
        resume_flag="train.resume",
    ),
    Stage(
        "eval",
        "rayllm.eval.stage",
        "Ray Data",
        "Perplexity and token accuracy on the validation split; downstream task metrics (eval.tasks).",
        ("loss", "perplexity", "token_accuracy", "tasks"),
        ("eval",),
        ("prep", "train"),
        tuned=True,
    ),
    Stage(
        "serve",
        "rayllm.serve.stage",
        "Ray Serve",
        "Serve the exported model over an OpenAI-compatible HTTP API (Ray Serve) until Ctrl-C.",
        ("url", "model"),
        ("serve",),
        ("train",),
        tuned=True,
        server=True,
    ),
)
NAMES = tuple(s.name for s in STAGES)


def get(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise RayllmError(f"unknown stage {name!r}: choose one of {', '.join(NAMES)}")


def run_stage(name: str, cfg: RunConfig) -> dict[str, Any]:
    return get(name).entry(cfg)


def _at(raw: dict[str, Any], path: str) -> Any:
    node: Any = raw
    for part in path.split("."):
        node = node[part]
    return node


def without(fields: dict[str, Any], paths: set[str]) -> dict[str, Any]:
    """``fields`` (keyed by config paths, values nested dicts) less the dotted ``paths`` inside them."""
    out = {}
    for key, value in fields.items():
        if key in paths:
            continue
        inner = {p[len(key) + 1 :] for p in paths if p.startswith(key + ".")}
        out[key] = without(value, inner) if inner and isinstance(value, dict) else value
    return out
