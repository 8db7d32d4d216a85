"""`rayllm <stage>`: a thin typer/rich layer over the stage functions.

Parsing and printing only. The stage verbs come from the stage table (``rayllm.stages``), so the CLI,
Python users and Ray job entrypoints run the same ``run(cfg)`` functions. User errors print one
line and exit 2.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rayllm.config import RunConfig, load_config
from rayllm.errors import find_user_error, one_line
from rayllm.rundir import RunDir
from rayllm.stages import NAMES, STAGES, Stage

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="Fast, elastic LLM training on Ray: prep -> tune -> train -> eval -> serve.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console(stderr=True)
out = Console()

ConfigOpt = Annotated[
    list[str] | None,
    typer.Option("--config", "-c", help="YAML config file; repeat to merge (later files win)."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override one field: section.key=value (value parsed as YAML)."),
]
RunDirOpt = Annotated[str | None, typer.Option("--run-dir", "-r", help="Run directory (overrides run_dir).")]
UntilOpt = Annotated[str | None, typer.Option(help=f"run: stop after this stage: {' | '.join(NAMES)}.")]
ServeOpt = Annotated[bool, typer.Option("--serve", help="run: end by serving the model (until stopped).")]


@app.callback()
def _options(
    ctx: typer.Context,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", help="Ray's own logs on the console, and a traceback with every error."
        ),
    ] = False,
) -> None:
    ctx.obj = {"verbose": verbose}  # the commands read it through _verbose(ctx)
    if not verbose and not isinstance(sys.stdout, WithoutRayNotices):
        sys.stdout = WithoutRayNotices(sys.stdout)


class WithoutRayNotices:
    """stdout without the notices Ray's driver prints about its own internals (the raylet's
    messages arrive on stdout, not through a logger); ``--verbose`` keeps them. Whole lines are
    held until their newline, then passed on or dropped."""

    NOTICES = (
        # Serve's controller ends itself inside its graceful_shutdown task, on every serve.shutdown().
        re.compile(r"^(\x1b\[[0-9;]*m)?\(raylet\)(\x1b\[0m)? Task ServeController\.graceful_shutdown failed"),
        # The raylet's advice when many workers start at once (a stage's actor pools and vLLM's do).
        re.compile(r"^(\x1b\[[0-9;]*m)?\(raylet\)(\x1b\[0m)? WARNING: \d+ PYTHON worker processes have been"),
    )

    def __init__(self, stream: Any) -> None:
        self._stream, self._line = stream, ""

    def write(self, text: str) -> int:
        self._line += text
        *whole, self._line = self._line.split("\n")
        kept = [line for line in whole if not any(n.match(line) for n in self.NOTICES)]
        if kept:
            self._stream.write("\n".join(kept) + "\n")
        return len(text)

    def flush(self) -> None:
        if self._line and not any(n.match(self._line) for n in self.NOTICES):
            self._stream.write(self._line)
            self._line = ""
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ... of the real stream
        return getattr(self._stream, name)


def _verbose(ctx: typer.Context) -> bool:
    """``--verbose`` of this invocation: the app's callback keeps it in the root context."""
    return bool((ctx.find_root().obj or {}).get("verbose"))


def _load(
    ctx: typer.Context, config: list[str] | None, sets: list[str] | None, run_dir: str | None
) -> RunConfig:
    more = ["cluster.verbose=true"] if _verbose(ctx) else []
    return _run(ctx, lambda: load_config(config or [], [*(sets or []), *more], run_dir))


def _run(ctx: typer.Context, fn: Callable[[], Any]) -> Any:
    """Run a stage; user errors (also when raised inside Ray workers) become one line + exit 2."""
    try:
        return fn()
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None
    except Exception as e:
        user = find_user_error(e)
        if user is None:
            raise
        if _verbose(ctx):
            console.print_exception()
        console.print(f"[bold red]error:[/] {escape(one_line(user))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _table(title: str, summary: dict[str, Any]) -> None:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column("key", style="cyan")
    t.add_column("value")
    for k, v in summary.items():
        if isinstance(v, float):
            v = f"{v:,.4g}"
        elif isinstance(v, int):
            v = f"{v:,}"
        elif isinstance(v, dict | list):
            v = json.dumps(v, ensure_ascii=False)
            v = v if len(v) < 120 else v[:117] + "..."
        t.add_row(k, str(v))
    out.print(t)


def _add_stage_verb(stage: Stage) -> None:
    """``rayllm <stage>``: load the config, run the stage's entry function, print its summary."""

    def verb(
        ctx: typer.Context, config: ConfigOpt = None, set_: SetOpt = None, run_dir: RunDirOpt = None
    ) -> None:
        cfg = _load(ctx, config, set_, run_dir)
        _table(stage.name, _run(ctx, lambda: stage.entry(cfg)))

    verb.__doc__ = f"{stage.help} ({stage.library})"
    app.command(stage.name)(verb)


for _stage in STAGES:
    _add_stage_verb(_stage)


@app.command()
def export(
    ctx: typer.Context,
    run_dir: Annotated[str, typer.Argument(help="Run directory with train checkpoints.")],
    out_dir: Annotated[str | None, typer.Option("--out", help="Default: <run_dir>/train/export.")] = None,
    checkpoint: Annotated[
        str | None,
        typer.Option(help="A checkpoint folder (train/ray/train/checkpoint_*) instead of the latest."),
    ] = None,
) -> None:
    """Consolidate the last ZeRO checkpoint (any stage) into a plain Hugging Face safetensors folder."""
    from rayllm.train.export import export_run

    path = _run(ctx, lambda: export_run(run_dir, out_dir, checkpoint))
    out.print(f"exported {path}")


@app.command("import")
def import_(
    ctx: typer.Context,
    source: Annotated[
        str, typer.Argument(help="A .gguf file (or pkg://package/file.gguf) or a Hugging Face model folder.")
    ],
    out_dir: Annotated[str | None, typer.Option("--out", help="Default: models/<file name>.")] = None,
) -> None:
    """A pretrained model as a plain Hugging Face folder that model.path, eval and serve load offline."""
    from rayllm.model.imports import import_model

    path = _run(ctx, lambda: import_model(source, Path(out_dir) if out_dir else None))
    out.print(f"imported {path}")


@app.command()
def submit(
    ctx: typer.Context,
    stage: Annotated[str, typer.Argument(help=" | ".join([*NAMES, "run", "demo"]))],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    run_dir: RunDirOpt = None,
    address: Annotated[str | None, typer.Option(help="Ray dashboard address, default $RAY_ADDRESS.")] = None,
    wait: Annotated[bool, typer.Option(help="Follow the job's logs until it ends.")] = True,
    until: UntilOpt = None,
    serve: ServeOpt = False,
) -> None:
    """Submit a stage, or the whole chain (`run`), as a Ray job to a cluster (Ray Jobs API)."""
    cfg = _load(ctx, config, set_, run_dir)  # validate here, before anything reaches the cluster
    from rayllm.jobs import submit as run_submit

    result = _run(
        ctx, lambda: run_submit(cfg, stage, config or [], set_ or [], run_dir, address, wait, until, serve)
    )
    _table("job", result)
    if result.get("status") == "FAILED":
        raise typer.Exit(1)


job_app = typer.Typer(no_args_is_help=True, help="Follow, inspect and stop jobs sent by `rayllm submit`.")
app.add_typer(job_app, name="job")
AddressOpt = Annotated[str | None, typer.Option(help="Ray dashboard address, default $RAY_ADDRESS.")]
JobIdArg = Annotated[str, typer.Argument(help="Job id printed by `rayllm submit`.")]


@job_app.command("status")
def job_status(ctx: typer.Context, job_id: JobIdArg, address: AddressOpt = None) -> None:
    """State, exit code and Ray's message for a submitted job."""
    from rayllm import jobs

    _table("job", _run(ctx, lambda: jobs.status(job_id, address)))


@job_app.command("logs")
def job_logs(
    ctx: typer.Context,
    job_id: JobIdArg,
    address: AddressOpt = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until the job ends.")] = False,
) -> None:
    """Print what a job has written so far; with --follow, stream it until the job ends."""
    from rayllm import jobs

    if not follow:
        sys.stdout.write(_run(ctx, lambda: jobs.logs(job_id, address)))
        return
    result = _run(ctx, lambda: jobs.follow(job_id, address))
    _table("job", result)
    if result["status"] == "FAILED":
        raise typer.Exit(1)


@job_app.command("stop")
def job_stop(ctx: typer.Context, job_id: JobIdArg, address: AddressOpt = None) -> None:
    """Stop a job (SIGTERM to its entrypoint, then SIGKILL) and wait until it has ended."""
    from rayllm import jobs

    _table("job", _run(ctx, lambda: jobs.stop(job_id, address)))


@app.command("run")
def run_chain(
    ctx: typer.Context,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    run_dir: RunDirOpt = None,
    until: UntilOpt = None,
    serve: ServeOpt = False,
) -> None:
    """The whole chain, resumable: prep -> tune (with tune.space) -> train -> eval [-> serve].

    Stages whose config fields and inputs did not change since they last finished are skipped; an
    interrupted train resumes from its checkpoint.
    """
    cfg = _load(ctx, config, set_, run_dir)
    from rayllm import pipeline

    _run(ctx, lambda: pipeline.run(cfg, until=until, serve=serve, console=console))
    _status_table(RunDir.of(cfg).root, _run(ctx, lambda: pipeline.status(cfg)))


@app.command()
def status(
    ctx: typer.Context,
    run_dir: Annotated[str, typer.Argument(help="The run directory.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Each stage's state in a run dir (done / stale / interrupted / missing) and its headline figures.

    Compared with the config `rayllm run` last saved there, or with --config/--set when given.
    """
    saved = Path(run_dir) / "run" / "config.yaml"
    files = config or ([str(saved)] if saved.is_file() else [])
    cfg = _load(ctx, files, set_, run_dir)
    from rayllm import pipeline

    _status_table(Path(run_dir), _run(ctx, lambda: pipeline.status(cfg)))


def _status_table(root: Path, rows: list[dict[str, Any]]) -> None:
    t = Table(title=f"rayllm status {root}", title_justify="left")
    t.add_column("stage", style="cyan")
    t.add_column("state")
    t.add_column("figures")
    for row in rows:
        figures = {k: v for k, v in row.items() if k not in ("stage", "state") and v is not None}
        shown = ", ".join(f"{k}={v:,.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
        style = "green" if row["state"] == "done" else "yellow" if row["state"] != "missing" else "red"
        t.add_row(row["stage"], f"[{style}]{escape(row['state'])}[/]", escape(shown[:150]))
    out.print(t)


@app.command()
def demo(
    ctx: typer.Context, config: ConfigOpt = None, set_: SetOpt = None, run_dir: RunDirOpt = None
) -> None:
    """The whole pipeline on the embedded Shakespeare corpus: prep, train, eval, serve one request."""
    cfg = _load(ctx, config or [_default_config()], set_, run_dir)
    from rayllm.pipeline import demo as run_demo

    t0 = time.time()
    summary = _run(ctx, lambda: run_demo(cfg, console=out))
    summary["seconds_total"] = round(time.time() - t0, 1)
    _table("demo", summary)


def _default_config() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(here, "examples", "configs", "shakespeare-cpu.yaml")


def main() -> None:
    from rayllm.runtime import DEFAULT_ENV

    for key, value in DEFAULT_ENV.items():  # quiet DeepSpeed/transformers in this process too
        os.environ.setdefault(key, value)
    if not os.path.exists("/dev/nvidiactl"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    app(prog_name="rayllm")
