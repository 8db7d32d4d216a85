"""The CLI: every stage of the table is a verb that runs that stage; user errors print one line, exit 2."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rayllm.cli import app
from rayllm.stages import NAMES

runner = CliRunner()
# What each stage says first about an empty run dir: proof that its verb reached its own entry function.
FIRST_COMPLAINT = {
    "prep": "data.sources is empty",
    "tune": "tune.space is empty",
    "train": "prep/manifest.json not found",
    "eval": "train/summary.json not found",
    "serve": "train/summary.json not found",
}


@pytest.mark.parametrize("stage", NAMES)
def test_every_stage_is_a_verb_that_runs_it(stage: str, tmp_path: Path):
    result = runner.invoke(app, [stage, "--run-dir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert FIRST_COMPLAINT[stage] in result.output


def test_verbose_shows_the_traceback_and_unexpected_errors_keep_theirs(tmp_path: Path, monkeypatch):
    bad = ["train", "--set", "train.deepspeed.zero_stage=4", "--run-dir", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, "-m", "rayllm", "--verbose", *bad], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "Traceback" in proc.stderr, proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith("error: ")  # the one line still ends it

    import rayllm.prep.stage

    def broken(cfg):  # a bug, not bad input: the CLI must not shrink it to one line
        raise RuntimeError("a bug in a stage")

    monkeypatch.setattr(rayllm.prep.stage, "run", broken)
    result = runner.invoke(app, ["prep", "--run-dir", str(tmp_path)])
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)


def test_config_error_is_one_line_exit_2(tmp_path: Path):
    """A real process: bad config -> exit 2, one error line naming the field, no traceback."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rayllm",
            "train",
            "--set",
            "train.deepspeed.zero_stage=4",
            "--run-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "train.deepspeed.zero_stage" in lines[0] and "Traceback" not in proc.stderr


def test_missing_run_artifacts_exit_2(tmp_path: Path):
    result = runner.invoke(app, ["train", "--run-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "manifest.json not found" in result.output and "rayllm prep" in result.output
    result = runner.invoke(app, ["export", str(tmp_path)])
    assert result.exit_code == 2 and "no train checkpoint" in result.output
    result = runner.invoke(app, ["eval", "--run-dir", str(tmp_path)])
    assert result.exit_code == 2 and "rayllm train" in result.output
    result = runner.invoke(app, ["eval", "--run-dir", str(tmp_path), "--set", f"eval.model_dir={tmp_path}"])
    assert (
        result.exit_code == 2
        and "eval.model_dir=" in result.output
        and "not a Hugging Face model folder" in result.output
    )


def test_missing_source_path_exit_2(tmp_path: Path):
    result = runner.invoke(
        app, ["prep", "--run-dir", str(tmp_path), "--set", f"data.sources=[{{path: {tmp_path}/none.txt}}]"]
    )
    assert result.exit_code == 2
    assert "data.sources[0].path" in result.output and "does not exist" in result.output


def test_unknown_verb_is_usage_error():
    result = runner.invoke(app, ["frobnicate"])
    assert result.exit_code == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "--set", "eval.tasks=[{name: c, file: x.jsonl, kind: code, samples: 2, temperature: 0}]"],
         "samples=2 needs temperature > 0"),
        (["eval", "--set", "eval.tasks=[{name: c, file: x.jsonl, kind: code, samples: 2, k: [5]}]"],
         r"k=\[5\] is more than samples=2"),
        (["eval", "--set", "eval.tasks=[{name: a, file: x, kind: qa}, {name: a, file: y, kind: qa}]"],
         r"names must be unique .*\['a'\] repeat"),
        (["submit", "prep", "--until", "prep", "--address", "http://127.0.0.1:9"],
         "--until and --serve belong to `rayllm submit run`"),
        (["tune", "--set", "tune.grid_order=sorted"], "tune.grid_order: got 'sorted'; input should be"),
        (["tune", "--set", "tune.metric=loss"], r"tune.metric: got 'loss'; .*'train_loss'"),
        (["tune", "--set", "tune.grace_period=500"],
         r"tune: grace_period=500 is longer than a trial \(max_steps=100\)$"),
        (["train", "--set", "train.stop_at=500"], r"train: stop_at=500 is past the run's max_steps=300$"),
    ],
)  # fmt: skip
def test_settings_that_cannot_work_are_one_line_exit_2(tmp_path: Path, args: list[str], message: str):
    proc = subprocess.run(
        [sys.executable, "-m", "rayllm", *args, "--run-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert re.search(message, lines[0]) and "Traceback" not in proc.stderr


def test_stdout_drops_rays_own_notices_and_keeps_everything_else():
    """Without --verbose the CLI's stdout drops the raylet's notices about Serve's shutdown, which Ray
    prints (colored, in two writes) on every serve.shutdown(), and about many workers starting at
    once; other lines, other raylet lines included, pass whole and in order."""
    import io

    from rayllm.cli import WithoutRayNotices

    sink = io.StringIO()
    quiet = WithoutRayNotices(sink)
    print("train step 1/2 (50%)  loss 1.0000", file=quiet, flush=True)
    print(
        "\x1b[33m(raylet)\x1b[0m Task ServeController.graceful_shutdown failed. There are infinite retries "
        "remaining, so the task will be retried. Error: The actor is dead because it was killed by "
        "`ray.kill`.",
        file=quiet,
    )
    print(
        "\x1b[33m(raylet)\x1b[0m WARNING: 10 PYTHON worker processes have been started on node: abc with "
        "address: 192.0.2.2, which is 5x the maximum expected startup concurrency (2).",
        file=quiet,
    )
    quiet.write("partial ")
    quiet.flush()
    print("line, then 中文", file=quiet)
    print("(raylet) A worker died or was killed while executing a task", file=quiet, flush=True)
    assert sink.getvalue() == (
        "train step 1/2 (50%)  loss 1.0000\npartial line, then 中文\n"
        "(raylet) A worker died or was killed while executing a task\n"
    )
