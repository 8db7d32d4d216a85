"""The driver's progress display follows a metrics file while a stage writes it (no Ray needed)."""

from __future__ import annotations

import io
import json
import os
import pty
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from rayllm import progress
from rayllm.progress import FollowMetrics


def append(path: Path, **record: object) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def test_plain_lines_one_per_logged_step_skipping_a_resumed_runs_past(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress, "POLL_S", 0.05)
    metrics = tmp_path / "metrics.jsonl"
    append(metrics, step=10, loss=9.0, tokens_per_second=1.0)  # before this run: not shown again
    quiet = Console(file=io.StringIO(), force_terminal=False)
    with FollowMetrics(metrics, total=40, label="train", console=quiet):
        append(metrics, step=10, event="resume", time=95.0)
        append(metrics, step=20, loss=5.25, tokens_per_second=12345.6, mfu=0.123, val_loss=5.5, time=100.0)
        time.sleep(0.3)
        append(metrics, step=25, val_loss=5.0)  # validation only: shown on the next step's line
        with metrics.open("a") as f:
            f.write('{"step": 30, "loss": 4.5')  # half a line: waits for the rest
        time.sleep(0.3)
        with metrics.open("a") as f:
            f.write(', "tokens_per_second": 20000, "time": 112.5}\n')
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2, lines
    # ETA from the times rank 0 wrote the records since this run resumed: 10 steps in 5 s with 20
    # left, then 20 steps in 17.5 s with 10 left.
    first = "train step 20/40 (50%)  loss 5.2500  val 5.5000  12,346 tok/s  MFU 12.3%  eta 0m10s"
    assert lines == [first, "train step 30/40 (75%)  loss 4.5000  val 5.0000  20,000 tok/s  eta 0m09s"]


def test_terminal_renders_a_progress_bar(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress, "POLL_S", 0.05)
    metrics = tmp_path / "metrics.jsonl"
    screen = io.StringIO()
    term = Console(file=screen, force_terminal=True, width=120)
    with FollowMetrics(metrics, total=8, label="train", console=term):
        append(metrics, step=4, loss=3.0, tokens_per_second=100.0)
        time.sleep(0.3)
    shown = screen.getvalue()
    assert "train" in shown and "4/8" in shown and "loss 3.0000" in shown and "━" in shown
    assert capsys.readouterr().out == ""  # no plain lines beside the live display


def test_a_pseudo_terminal_gets_the_live_display_and_a_pipe_the_plain_lines(tmp_path):
    """Which one is chosen by what stderr is: the CLI's console is the process's stderr."""
    metrics = tmp_path / "metrics.jsonl"
    script = (
        "import json, sys, time\nfrom pathlib import Path\nfrom rayllm import progress\n"
        "progress.POLL_S = 0.05\np = Path(sys.argv[1])\n"
        "with progress.FollowMetrics(p, total=2, label='train'):\n"
        "    p.write_text(json.dumps({'step': 2, 'loss': 1.5}) + '\\n'); time.sleep(0.3)\n"
    )
    piped = subprocess.run(
        [sys.executable, "-c", script, str(metrics)], capture_output=True, text=True, timeout=60, check=True
    )
    assert piped.stdout.startswith("train step 2/2 (100%)  loss 1.5000") and "━" not in piped.stderr
    metrics.unlink()
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(metrics)],
        stdin=follower, stdout=subprocess.PIPE, stderr=follower, env={**os.environ, "TERM": "xterm"},
    )  # fmt: skip
    os.close(follower)
    stdout, _ = proc.communicate(timeout=60)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert proc.returncode == 0 and stdout == b""
    assert "━" in shown.decode("utf-8", "replace") and b"2/2" in shown


def test_counted_work_plain_lines_and_a_bar_on_a_terminal(capsys):
    """eval's answers and programs: plain lines (at most one per every_s, one at the end) off a
    terminal; a bar on one, with no plain lines beside it."""
    from rayllm.progress import Count

    quiet = Console(file=io.StringIO(), force_terminal=False)
    with Count(4, "eval: generating", "answers", console=quiet, every_s=0.0) as c:
        c.advance(1)
        c.advance(2)
        c.advance(1)
    lines = [x.rsplit("  ", 1)[0] for x in capsys.readouterr().out.splitlines()]
    assert lines == [
        "eval: generating 1/4 answers (25%)",
        "eval: generating 3/4 answers (75%)",
        "eval: generating 4/4 answers (100%)",
    ]
    screen = io.StringIO()
    with Count(
        10, "eval qa: testing", "programs", console=Console(file=screen, force_terminal=True, width=100)
    ) as c:
        c.advance(7)
    assert "eval qa: testing" in screen.getvalue() and "7/10" in screen.getvalue()
    assert capsys.readouterr().out == ""


def test_tune_trials_table_on_a_terminal(tmp_path, monkeypatch):
    """tune's live table: each trial's settings, latest step, loss and metric from its run folder."""
    from rayllm.progress import FollowTrials

    monkeypatch.setattr(progress, "POLL_S", 0.05)
    for name, lr, loss, val in (("t000", 3e-3, 4.5, 4.75), ("t001", 3e-5, 7.25, None)):
        (tmp_path / name / "train").mkdir(parents=True)
        (tmp_path / name / "trial.json").write_text(json.dumps({"params": {"train.optimizer.lr": lr}}))
        append(tmp_path / name / "train" / "metrics.jsonl", step=2, loss=loss)
        if val is not None:
            append(tmp_path / name / "train" / "metrics.jsonl", step=4, val_loss=val)
    screen = io.StringIO()
    with FollowTrials(tmp_path, "val_loss", 16, console=Console(file=screen, force_terminal=True, width=120)):
        time.sleep(0.4)
    shown = screen.getvalue()
    assert "tune trials" in shown and "lr=0.003" in shown and "lr=3e-05" in shown
    assert "4/16" in shown and "4.7500" in shown and "7.2500" in shown and "2/16" in shown
