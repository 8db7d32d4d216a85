"""Live progress of a long stage on the driver's console, fed by the run's own metrics file.

The workers already write every logged step to ``<stage>/metrics.jsonl`` (rank 0, flushed per
line); the driver follows that file from a thread, one read a second, so watching costs the
training nothing and works the same for a local run, a job on a cluster (the run directory is
shared) and a resumed run. On a terminal it is a ``rich`` progress bar; anywhere else (CI, job
logs, pipes) one plain line per logged step on stdout, which ``rayllm submit`` streams back.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

POLL_S = 1.0


def describe(record: dict[str, Any], last_val: float | None) -> str:
    """One step's figures as people read them: loss, latest validation loss, tokens/s, MFU."""
    parts = []
    if "loss" in record:
        parts.append(f"loss {record['loss']:.4f}")
    if last_val is not None:
        parts.append(f"val {last_val:.4f}")
    if "tokens_per_second" in record:
        parts.append(f"{record['tokens_per_second']:,.0f} tok/s")
    if "mfu" in record:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    return "  ".join(parts)


def new_records(path: Path, offset: int) -> tuple[int, list[dict[str, Any]]]:
    """The step records of the whole lines appended to a metrics file since ``offset`` (a line still
    being written waits for the next read), and the offset to read from next."""
    if not path.is_file():
        return offset, []
    with path.open("rb") as f:
        f.seek(offset)
        chunk = f.read()
    end = chunk.rfind(b"\n")
    if end < 0:
        return offset, []
    records = []
    for line in chunk[: end + 1].decode("utf-8", "replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return offset + end + 1, records


def eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    m, s = divmod(int(seconds + 0.5), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class FollowMetrics:
    """Follows ``path`` (appended jsonl) while a stage of ``total`` steps runs; a context manager.

    Lines already in the file when it starts (a resumed run's earlier steps) are not shown again;
    the time left is estimated from the steps this run has made. ``sinks`` get every new record
    (``rayllm.tracking``), from the same thread.
    """

    def __init__(
        self,
        path: Path,
        total: int,
        label: str,
        console: Console | None = None,
        sinks: Sequence[Callable[[dict[str, Any]], None]] = (),
    ) -> None:
        self.path, self.total, self.label, self.sinks = path, total, label, sinks
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal
        self.offset = path.stat().st_size if path.is_file() else 0
        self.last_val: float | None = None
        self.started: tuple[float, int] | None = None  # (time, step) of the first record seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name=f"rayllm-progress-{label}", daemon=True)
        self._progress: Progress | None = None
        self._task: Any = None

    def __enter__(self) -> FollowMetrics:
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[figures]}"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=self.total, figures="starting")
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self._read()  # the last lines, written just before the stage returned
        except OSError:
            pass  # a display never hides how the stage itself ended
        finally:
            if self._progress is not None:
                self._progress.stop()

    def _follow(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self._read()
            except OSError:  # the file may be replaced or not there yet: try again next second
                continue

    def _read(self) -> None:
        self.offset, records = new_records(self.path, self.offset)
        for record in records:
            self._show(record)
            for sink in self.sinks:  # experiment trackers: every record, whatever is shown
                sink(record)

    def _show(self, record: dict[str, Any]) -> None:
        step = record["step"]
        if "val_loss" in record:
            self.last_val = float(record["val_loss"])
        now = float(record.get("time", time.time()))  # when rank 0 wrote it, not when it was read
        if self.started is None or step < self.started[1]:  # first record, or a restart from a checkpoint
            self.started = (now, step)
        figures = describe(record, self.last_val)
        if self._progress is not None:
            self._progress.update(self._task, completed=step, figures=figures)
            return
        if "loss" not in record and step != 0:
            return  # a validation-only record: its figure shows on the next step's line
        t0, s0 = self.started
        left = max(0.0, (now - t0) / (step - s0) * (self.total - step)) if step > s0 else None
        share = 100 * step // max(self.total, 1)
        print(f"{self.label} step {step}/{self.total} ({share}%)  {figures}  eta {eta(left)}", flush=True)


class Count:
    """Progress of a stage that counts things done (eval's answers and scored programs): a ``rich``
    bar on a terminal, elsewhere one plain line every ``every_s`` seconds and one at the end.
    ``advance`` may be called from several threads."""

    def __init__(
        self, total: int, label: str, unit: str, console: Console | None = None, every_s: float = 10.0
    ):
        self.total, self.label, self.unit, self.every_s = total, label, unit, every_s
        self.console = console or Console(stderr=True)
        self.done, self.t0, self.shown = 0, time.time(), time.time()
        self._lock = threading.Lock()
        self._progress: Progress | None = None
        self._task: Any = None

    def __enter__(self) -> Count:
        if self.console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(self.unit),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=self.total)
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        if self._progress is not None:
            self._progress.stop()
        elif kind is None and self.total:
            self._line()

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            if self._progress is not None:
                self._progress.update(self._task, completed=self.done)
            elif time.time() - self.shown >= self.every_s and self.done < self.total:
                self.shown = time.time()
                self._line()

    def _line(self) -> None:
        share = 100 * self.done // max(self.total, 1)
        print(
            f"{self.label} {self.done}/{self.total} {self.unit} ({share}%)  {time.time() - self.t0:.0f} s",
            flush=True,
        )


class FollowTrials:
    """A live table of a search's trials on a terminal (tune): each trial's settings, its latest
    step, loss and searched metric, read from its own run folder once a second. Off a terminal the
    search's plain lines (a trial reaching a rung, a promotion) say the same, so this shows nothing."""

    def __init__(self, trials_dir: Path, metric: str, max_steps: int, console: Console | None = None) -> None:
        self.dir, self.metric, self.max_steps = trials_dir, metric, max_steps
        self.console = console or Console(stderr=True)
        self.rows: dict[str, dict[str, Any]] = {}
        self.offsets: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="rayllm-progress-tune", daemon=True)
        self._live: Any = None

    def __enter__(self) -> FollowTrials:
        if self.console.is_terminal:
            from rich.live import Live

            self._live = Live(self._table(), console=self.console, refresh_per_second=2)
            self._live.start()
            self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        if self._live is not None:
            self._stop.set()
            self._thread.join()
            self._live.stop()

    def _follow(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self._read()
                self._live.update(self._table())
            except OSError:
                continue

    def _read(self) -> None:
        for meta in sorted(self.dir.glob("*/trial.json")):
            name = meta.parent.name
            row = self.rows.setdefault(name, {"params": json.loads(meta.read_text()).get("params", {})})
            self.offsets[name], records = new_records(
                meta.parent / "train" / "metrics.jsonl", self.offsets.get(name, 0)
            )
            for record in records:
                row["step"] = max(row.get("step", 0), record["step"])
                row.update({k: record[k] for k in ("loss", self.metric) if k in record})

    def _table(self) -> Any:
        from rich.table import Table

        table = Table(title="tune trials", title_justify="left")
        for col in ("trial", "settings", "step", "loss", self.metric):
            table.add_column(col)
        for name, row in self.rows.items():
            settings = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in row["params"].items())
            figures = [f"{row[k]:.4f}" if k in row else "-" for k in ("loss", self.metric)]
            table.add_row(name, settings, f"{row.get('step', 0)}/{self.max_steps}", *figures)
        return table
