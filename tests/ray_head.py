"""A real Ray head started with `ray start --head` on free loopback ports, stopped by PID afterwards."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

BIN = Path(sys.executable).parent


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: the sockets are held together, so none is handed out twice (one at
    a time, the kernel once gave the dashboard and the client server the same port)."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answered: 401 from a head with token auth
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"Ray head not ready after {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def _kill_head(proc: subprocess.Popen, temp_dir: Path) -> None:
    """Stop exactly the processes this head started, including workers that run in their own sessions.

    SIGTERM first; after a job, raylet and leftover detached actors can take half a minute to go,
    so whatever is still there after two seconds is killed by PID (waiting longer only cost the
    suite 5 s per head). A job driver that Ray re-parented (e.g. after a stop) is found by its
    working directory, which lies inside this head's temp dir.
    """
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    family += _processes_under(temp_dir, exclude={p.pid for p in family})
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(psutil.NoSuchProcess):
        family.append(psutil.Process(proc.pid))
    _, alive = psutil.wait_procs(family, timeout=2)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    psutil.wait_procs(alive, timeout=10)


def _processes_under(temp_dir: Path, exclude: set[int]) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["pid", "cwd"]):
        cwd = p.info.get("cwd") or ""
        if p.info["pid"] not in exclude and cwd.startswith(str(temp_dir)):
            found.append(p)
    return found


@contextlib.contextmanager
def ray_head(ray_tmpdir: Path | None = None, **auth: str) -> Iterator[str]:
    """A Ray head with the Jobs API on free loopback ports and the venv first on PATH (jobs' python).

    With ``ray_tmpdir`` (short: Ray's socket paths have a length cap) the head is started as a plain
    `ray start --head` is, so that it becomes the "current cluster" that `ray.init()` finds, for
    processes whose ``RAY_TMPDIR`` is that folder (and for no one else on this machine).
    """
    tmp = ray_tmpdir or Path(tempfile.mkdtemp(prefix="rl-", dir="/tmp"))
    gcs, dash, client, agent = free_ports(4)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_"))}
    env.update(auth, PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    if ray_tmpdir is not None:
        env["RAY_TMPDIR"] = str(tmp)
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}",
        "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        "--include-dashboard=true", "--num-cpus=2", "--object-store-memory=200000000",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
        *([] if ray_tmpdir else [f"--temp-dir={tmp}"]),
    ]  # fmt: skip
    log = tmp / "head.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{dash}"
        _wait_ready(url, proc, log)
        # `ray start` names the current cluster only after the dashboard answers.
        current = tmp / "ray" / "ray_current_cluster"
        deadline = time.time() + 60
        while ray_tmpdir is not None and not current.is_file():
            assert time.time() < deadline, f"{current} never appeared"
            time.sleep(0.2)
        yield url
    finally:
        _kill_head(proc, tmp)
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
