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


def eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    m, s = divmod(int(seconds + 0.5), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class FollowMetrics:
    """Follows ``path`` (appended jsonl) while a stage of ``total`` steps runs; a context manager.

    Lines already in the file when it starts (a resumed run's earlier steps) are not shown again;
    the time left is estimated from the steps this run has made.
    """

    def __init__(self, path: Path, total: int, label: str, console: Console | None = None) -> None:
        self.path, self.total, self.label = path, total, label
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
        if not self.path.is_file():
            return
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n")
        if end < 0:
            return  # no whole line yet
        self.offset += end + 1
        for line in chunk[: end + 1].decode("utf-8", "replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                self._show(record)

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
