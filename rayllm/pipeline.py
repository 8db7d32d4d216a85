"""`rayllm run`: the stages of the table as one resumable chain, and `rayllm demo` on top of it.

prep -> tune (when ``tune.space`` is set) -> train (with the best trial's settings) -> eval ->
serve (with ``--serve``), in one Ray session. Each stage's fingerprint is a hash of the config fields
it reads and of the fingerprints of the stages it consumes (prep: also the size and time of every
input file), recorded in ``<run_dir>/run/state.json``. A stage whose fingerprint and outputs match
the record is skipped with one line saying so; a changed field re-runs that stage and, through the
chain, every later one. An interrupted train resumes from its checkpoint when nothing that shapes
the training changed, and starts over when something did.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

from rich.console import Console

from rayllm.config import RESUMABLE, RunConfig, marked
from rayllm.errors import ConfigError
from rayllm.rundir import RunDir
from rayllm.runtime import ray_session
from rayllm.stages import NAMES, STAGES, Stage, get, without
from rayllm.tracking import Tracked

DEMO_PROMPT = "ROMEO:\n"


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _source_stats(cfg: RunConfig) -> list[tuple[str, int, int]]:
    """(path, bytes, mtime) of every prep input: an edited corpus re-runs prep."""
    from rayllm.prep.sources import file_items
    from rayllm.runtime import filesystem

    out = []
    for item in file_items(cfg.data):
        fs, path = filesystem(item["path"])
        info = fs.get_file_info(path)
        out.append((item["path"], int(info.size or 0), int(info.mtime_ns or 0)))
    return out


def _raw(cfg: RunConfig) -> dict[str, Any]:
    raw = cfg.dump()
    raw["serve"]["api_keys"] = len(raw["serve"]["api_keys"])  # a changed key is no reason to re-run
    return raw


def plan(cfg: RunConfig, best: RunConfig | None = None) -> dict[str, dict[str, Any]]:
    """Each stage's inputs (config fields it reads, upstream fingerprints) and fingerprint.

    ``best`` is ``cfg`` with the best tune trial's settings: what train and the stages after it run
    with, while prep and tune are fingerprinted on the config as given."""
    given, tuned = _raw(cfg), _raw(best or cfg)
    out: dict[str, dict[str, Any]] = {}
    for stage in STAGES:
        inputs: dict[str, Any] = {"config": stage.config_fields(tuned if stage.tuned else given)}
        inputs["upstream"] = {u: out[u]["fingerprint"] for u in stage.consumes if _wanted(get(u), cfg)}
        if stage.reads_files:
            inputs["sources"] = _hash(_source_stats(cfg))
        out[stage.name] = {"inputs": inputs, "fingerprint": _hash(inputs)}
        if stage.resume_flag:
            # What its checkpoint's training depends on: a change elsewhere continues from it.
            same = without(inputs["config"], marked(RESUMABLE))
            out[stage.name]["identity"] = _hash({**same, **inputs["upstream"]})
    return out


def _changed(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two recorded inputs."""
    keys = sorted(set(old) | set(new))
    out: list[str] = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        name = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):  # config fields by their own names
            out += _changed(a, b, "" if name == "config" else f"{name}.")
        elif a != b:
            out.append(name)
    return out


def status(cfg: RunConfig) -> list[dict[str, Any]]:
    """Each stage's state against ``cfg``: done, stale (what changed), interrupted, missing, or off."""
    rd = RunDir.of(cfg)
    record = rd.run_state()
    best = _with_best(cfg, rd) if cfg.tune.space and rd.summary("tune") else None
    rows = []
    for name, want in plan(cfg, best).items():
        stage = get(name)
        seen = record.get(name)
        summary = rd.summary(name)
        if not _wanted(stage, cfg):
            state = "off"
        elif seen is None:
            state = "done (outside rayllm run)" if summary else "missing"
        elif seen.get("status") != "done":
            state = "interrupted"
        elif seen["fingerprint"] != want["fingerprint"]:
            state = "stale: " + ", ".join(_changed(seen["inputs"], want["inputs"])[:4])
        else:
            state = "done" if summary else "missing (outputs gone)"
        figures = {k: summary.get(k) for k in stage.summary_keys} if summary else {}
        rows.append({"stage": name, "state": state, **figures})
    return rows


def _wanted(stage: Stage, cfg: RunConfig) -> bool:
    return not stage.runs_if or bool(_field(cfg, stage.runs_if))


def _field(cfg: RunConfig, path: str) -> Any:
    section, name = path.split(".")
    return getattr(getattr(cfg, section), name)


def _with_field(cfg: RunConfig, path: str, value: Any) -> RunConfig:
    section, name = path.split(".")
    return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update={name: value})})


def run(
    cfg: RunConfig,
    until: str | None = None,
    serve: bool = False,
    console: Console | None = None,
    after: Callable[[RunConfig], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run the chain up to ``until`` (default eval; serve with ``serve``), skipping stages that are
    up to date. ``after`` runs last inside the same Ray session (the demo's one request)."""
    console = console or Console(stderr=True)
    rd = RunDir.of(cfg)
    last = until or ("serve" if serve else "eval")
    if last not in NAMES:
        raise ConfigError(f"--until {last!r}: choose one of {', '.join(NAMES)}")
    rd.start_stage(cfg, "run")
    summaries: dict[str, Any] = {}
    given = cfg
    best: RunConfig | None = None
    tracked = Tracked.open(cfg, "run")  # the stages' tracker runs nest under this one
    with tracked or nullcontext(), ray_session(cfg.cluster, use_gpu=cfg.train.use_gpu):
        for stage in STAGES[: NAMES.index(last) + 1]:
            if not _wanted(stage, cfg):
                console.print(f"[dim]{stage.name}: off ({stage.runs_if} is empty)[/]")
                continue
            if stage.tuned and best is None and "tune" in summaries:
                cfg = best = _with_best(given, rd)
            want = plan(given, best)[stage.name]
            seen = rd.run_state().get(stage.name) or {}
            if not stage.server and _up_to_date(rd, stage.name, seen, want):
                console.print(
                    f"[green]{stage.name}[/]: up to date (fingerprint {want['fingerprint']}), skipped"
                )
                summaries[stage.name] = rd.summary(stage.name)
                continue
            reason = _reason(seen, want)
            console.print(f"[bold]{stage.name}[/] ({stage.library}): {reason}")
            stage_cfg = cfg
            if stage.resume_flag and seen and seen.get("identity") != want["identity"]:
                stage_cfg = _with_field(cfg, stage.resume_flag, False)
            _record(rd, stage.name, want, "running")
            summaries[stage.name] = stage.entry(stage_cfg)
            _record(rd, stage.name, want, "done")
        if after is not None:
            summaries["after"] = after(cfg)
    return summaries


def _up_to_date(rd: RunDir, name: str, seen: dict[str, Any], want: dict[str, Any]) -> bool:
    return (
        seen.get("status") == "done"
        and seen.get("fingerprint") == want["fingerprint"]
        and bool(rd.summary(name))
    )


def _reason(seen: dict[str, Any], want: dict[str, Any]) -> str:
    if not seen:
        return "running"
    if seen.get("status") != "done":
        return "interrupted before, running again (train resumes from its last checkpoint)"
    changed = _changed(seen["inputs"], want["inputs"])
    return f"changed ({', '.join(changed[:4])}{', ...' if len(changed) > 4 else ''}), running again"


def _record(rd: RunDir, name: str, want: dict[str, Any], status_: str) -> None:
    state = rd.run_state()
    state[name] = {**want, "status": status_, "time": round(time.time(), 1)}
    rd.write_run_state(state)


def _with_best(cfg: RunConfig, rd: RunDir) -> RunConfig:
    """The config with the best tune trial's settings (tune/summary.json), for the train stage."""
    from rayllm.tune import best_config

    return best_config(cfg, rd.read_summary("tune")["best_params"])


# --------------------------------------------------------------------------------------------- demo
def demo(cfg: RunConfig, console: Console | None = None) -> dict[str, Any]:
    """`rayllm demo`: the chain up to eval, then Ray Serve answers one request and stops."""
    console = console or Console()

    def one_request(cfg: RunConfig) -> dict[str, Any]:
        import httpx

        from rayllm.serve import stage as serve

        console.rule(f"[bold]serve[/]: Ray Serve LLM (vLLM), OpenAI-compatible API on {cfg.serve.host}")
        url = serve.start(cfg)
        try:
            model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
            reply = httpx.post(
                f"{url}/v1/completions",
                json={"model": model, "prompt": DEMO_PROMPT, "max_tokens": 48, "temperature": 0.8, "seed": 0},
                timeout=120,
            )
            reply.raise_for_status()
        finally:
            serve.shutdown()
        sample = reply.json()["choices"][0]["text"]
        console.print(f"[bold]sample[/] for {DEMO_PROMPT!r}:\n{DEMO_PROMPT}{sample}")
        return {"url": url, "sample": DEMO_PROMPT + sample}

    s = run(cfg, until="eval", console=console, after=one_request)
    p, t, e = s["prep"], s["train"], s["eval"]
    summary = {
        "documents_kept": p["documents_kept"],
        "tokens": p["tokens"],
        "train_loss_first": t["train_loss_first"],
        "train_loss_last": t["train_loss_last"],
        "val_loss_first": t["val_loss_first"],
        "val_loss_last": t["val_loss_last"],
        "eval_perplexity": e["perplexity"],
        "tokens_per_second": t["tokens_per_second"],
        "mfu": t["mfu"],
        **s["after"],
        "export_dir": t["export_dir"],
        "run_dir": str(RunDir.of(cfg).root),
    }
    RunDir.of(cfg).write_summary("demo", summary)
    return summary
