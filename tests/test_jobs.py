"""A real local head: joined as Ray's own tools join one, and Ray Jobs submitted to it; user errors
before and inside a job, auth, cluster YAMLs."""

from __future__ import annotations

import http.server
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from ray_head import BIN, free_port, ray_head
from typer.testing import CliRunner

from rayllm import jobs
from rayllm.cli import app
from rayllm.config import load_config
from rayllm.errors import RayllmError

ROOT = Path(__file__).resolve().parents[1]


def write_corpus(path: Path) -> Path:
    """A few hundred distinct short English and Chinese lines."""
    nouns = ["river", "castle", "garden", "letter", "forest", "window", "market", "harbor"]
    places = ["北京", "上海", "学校", "公园", "图书馆", "海边", "山上", "市场"]
    lines = []
    for i in range(200):
        lines.append(f"The {nouns[i % 8]} near the {nouns[(i * 3 + 1) % 8]} was quiet on day {i}.")
        lines.append(f"第{i}天，我们一起去了{places[i % 8]}，看见了{places[(i * 5 + 2) % 8]}的朋友。")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_config(tmp: Path, source: str) -> Path:
    cfg = {
        "data": {
            "sources": [{"path": source, "format": "txt", "split_on": "line"}],
            "tokenizer": {"vocab_size": 300, "sample_docs": 1000},
            "seq_len": 16,
            "val_fraction": 0.2,
        },
        "cluster": {"object_store_gb": 0.2},
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def head() -> Iterator[tuple[str, Path]]:
    """(dashboard URL, RAY_TMPDIR) of one `ray start --head` (auth off) for this module's tests: it is
    the current cluster only for processes whose RAY_TMPDIR is that folder (Ray's socket paths have
    a length cap, hence a short folder in /tmp)."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rh-", dir="/tmp"))
    with ray_head(ray_tmpdir=ray_tmp, RAY_AUTH_MODE="disabled") as url:
        yield url, ray_tmp


def test_a_running_head_is_joined_and_address_local_starts_a_private_one(head, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i} of a small corpus, 第{i}行" for i in range(300)), encoding="utf-8")
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "sources": [{"path": str(corpus), "split_on": "line"}],
                    "tokenizer": {"vocab_size": 300},
                    "seq_len": 16,
                    "val_fraction": 0.1,
                },
                "cluster": {"object_store_gb": 0.2, "num_cpus": 1, "dashboard": False},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_"))}
    env.update(RAY_TMPDIR=str(head[1]), RAY_AUTH_MODE="disabled")
    prep = [sys.executable, "-m", "rayllm", "prep", "-c", str(config)]
    joined = subprocess.run(
        [*prep, "-r", str(tmp_path / "a")], env=env, capture_output=True, text=True, timeout=300
    )
    assert joined.returncode == 0, joined.stderr[-3000:]
    lines = [ln for ln in joined.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, joined.stderr  # one line says so; nothing else is printed
    assert re.fullmatch(r"rayllm: joining the Ray head already running at \S+:\d+ \(.*\)", lines[0])
    assert "cluster.address: local" in lines[0]
    private = subprocess.run(
        [*prep, "-r", str(tmp_path / "b"), "--set", "cluster.address=local"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert private.returncode == 0, private.stderr[-3000:]
    assert "joining" not in private.stderr and "Traceback" not in private.stderr
    for run in ("a", "b"):
        assert (tmp_path / run / "prep" / "manifest.json").is_file()


def test_prep_job_end_to_end(head, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    url = head[0]
    config = write_config(tmp_path, str(write_corpus(tmp_path / "corpus.txt")))
    run_dir = tmp_path / "run"
    cfg = load_config([config], [], str(run_dir))

    result = jobs.submit(cfg, "prep", [str(config)], ["data.clean.min_chars=2"], str(run_dir), url, True)
    printed = capsys.readouterr().out
    assert result["status"] == "SUCCEEDED", printed[-3000:]
    assert result["address"] == url and result["seconds"] > 0
    assert result["entrypoint"].startswith("python jobs/run_stage.py prep --config .rayllm-submit/")
    assert "--set data.clean.min_chars=2" in result["entrypoint"]
    manifest = json.loads((run_dir / "prep" / "manifest.json").read_text())
    assert manifest["tokens"] > 0 and manifest["vocab_size"] <= 300
    assert '"tokens":' in printed  # the summary JSON, streamed from the job's stdout
    assert not (ROOT / jobs.STAGING / result["job_id"]).exists()  # staged configs go after the upload
    assert jobs.status(result["job_id"], url)["exit_code"] == 0

    # The chain as one job (`rayllm submit run --until prep`): it records its stages in run/state.json.
    chain = jobs.submit(cfg, "run", [str(config)], [], str(tmp_path / "chain"), url, True, until="prep")
    assert chain["status"] == "SUCCEEDED", capsys.readouterr().out[-3000:]
    assert " run --config " in chain["entrypoint"] and chain["entrypoint"].endswith(
        "--until prep --run-dir " + str(tmp_path / "chain")
    )
    state = json.loads((tmp_path / "chain" / "run" / "state.json").read_text())
    assert {k: v["status"] for k, v in state.items()} == {"prep": "done"}
    with pytest.raises(RayllmError, match="--until and --serve belong to `rayllm submit run`"):
        jobs.submit(cfg, "prep", [str(config)], [], str(run_dir), url, False, until="prep")

    # A user error inside the job: one `error:` line, exit code 2, the job FAILED.
    gone = tmp_path / "gone.yaml"
    gone.write_text(yaml.safe_dump({"data": {"sources": [{"path": str(tmp_path / "missing.txt")}]}}))
    cfg = load_config([config, gone], [], str(run_dir))
    failed = jobs.submit(cfg, "prep", [str(config), str(gone)], [], str(run_dir), url, False)
    info = jobs.follow(failed["job_id"], url)
    assert info["status"] == "FAILED" and info["exit_code"] == 2
    log_lines = jobs.logs(failed["job_id"], url).splitlines()
    assert any(line.startswith("error: ") and "missing.txt" in line for line in log_lines)
    assert "Traceback" not in "\n".join(log_lines)

    # A queued or running job can be stopped.
    cfg = load_config([config], [], str(tmp_path / "run2"))
    running = jobs.submit(cfg, "prep", [str(config)], [], str(tmp_path / "run2"), url, False)
    assert jobs.stop(running["job_id"], url)["status"] == "STOPPED"
    for fn in (jobs.status, jobs.follow, jobs.logs):
        with pytest.raises(RayllmError, match="no job 'nope'"):
            fn("nope", url)

    # A client with token auth on still works against a head with auth disabled.
    listed = f"jobs.client({url!r}).list_jobs()"
    probe = f"from rayllm import jobs; print(sum(bool(j.submission_id) for j in {listed}))"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "unused"}
    r = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "4", r.stderr[-2000:]  # the 4 jobs above

    # An invalid config never reaches the cluster: the CLI exits 2 before submitting.
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {seq_len: 4}\n")
    before = len(jobs.client(url).list_jobs())
    r = CliRunner().invoke(app, ["submit", "prep", "-c", str(bad), "--address", url])
    assert r.exit_code == 2
    assert "data.seq_len" in r.output
    assert len(jobs.client(url).list_jobs()) == before


@pytest.mark.slow
def test_token_auth_head(tmp_path: Path):
    """Ray 2.60 token auth, end to end through the CLI: one clear line without the token, a job with it."""
    token = secrets.token_hex(16)
    config = write_config(tmp_path, str(write_corpus(tmp_path / "corpus.txt")))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_"))}
    with ray_head(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token) as url:
        cmd = [str(BIN / "rayllm"), "submit", "prep", "-c", str(config), "-r", str(tmp_path / "run"),
               "--address", url]  # fmt: skip
        denied = subprocess.run(cmd, env=base, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert denied.returncode == 2, denied.stderr[-2000:]
        assert "requires token authentication" in denied.stderr and "RAY_AUTH_MODE=token" in denied.stderr
        assert "Traceback" not in denied.stderr

        env = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
        ok = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
        assert "SUCCEEDED" in ok.stdout
    assert json.loads((tmp_path / "run" / "prep" / "manifest.json").read_text())["tokens"] > 0


# ---------------------------------------------------------------------------------- without Ray
def test_no_address_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = write_config(tmp_path, str(tmp_path / "corpus.txt"))
    r = CliRunner().invoke(app, ["submit", "prep", "-c", str(config)])
    assert r.exit_code == 2
    assert "no Ray cluster address" in r.output and "RAY_ADDRESS" in r.output
    with pytest.raises(RayllmError, match="dashboard address"):
        jobs.resolve_address("auto")
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:8265")
    assert jobs.resolve_address() == "http://10.1.2.3:8265"


class _AuthServer(http.server.BaseHTTPRequestHandler):
    """Answers as a Ray 2.60 dashboard with token auth does (aiohttp middleware)."""

    status = 401

    def do_GET(self) -> None:
        body = b"Unauthorized: Missing authentication token"
        if self.status == 403:
            body = b"Forbidden: Invalid authentication token"
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(("code", "mode", "expect"), [
    (401, None, "requires token authentication \\(HTTP 401\\): set RAY_AUTH_MODE=token"),
    (401, "token", "RAY_AUTH_MODE=token is set, but no token was found"),
    (403, "token", "rejected this machine's auth token"),
])  # fmt: skip
def test_auth_errors_say_how_to_fix(code: int, mode: str | None, expect: str, monkeypatch):
    if mode:
        monkeypatch.setenv("RAY_AUTH_MODE", mode)
    else:
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    handler = type("Handler", (_AuthServer,), {"status": code})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(RayllmError, match=expect) as err:
            jobs.client(f"http://127.0.0.1:{server.server_address[1]}")
        assert "auth_token" in str(err.value)
    finally:
        server.shutdown()
        server.server_close()


def test_unreachable_address(monkeypatch):
    with pytest.raises(RayllmError, match="cannot reach the Ray Jobs API"):
        jobs.client(f"http://127.0.0.1:{free_port()}")


def test_run_dir_for_jobs():
    assert jobs._job_run_dir("runs/x", "http://127.0.0.1:8265") == str(Path("runs/x").resolve())
    assert jobs._job_run_dir("/mnt/shared/runs/x", "http://head:8265") == "/mnt/shared/runs/x"
    with pytest.raises(RayllmError, match="--run-dir /mnt/shared/runs/x"):
        jobs._job_run_dir("runs/x", "http://10.0.0.5:8265")


def test_entrypoint_user_error_exits_2(tmp_path: Path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {workers: 3, global_batch: 16, micro_batch: 8}\n")
    assert jobs.entrypoint(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: invalid config") and "global_batch" in err[0]


def test_run_stage_script_help():
    r = subprocess.run([sys.executable, str(ROOT / jobs.ENTRYPOINT), "-h"], capture_output=True, text=True)
    assert r.returncode == 0 and "{prep,tune,train,eval,serve,run,demo}" in r.stdout


# ---------------------------------------------------------------------------------- cluster YAMLs
def _load(rel: str) -> dict:
    doc = yaml.safe_load((ROOT / rel).read_text(encoding="utf-8"))
    assert isinstance(doc, dict), rel
    return doc


def test_every_cluster_yaml_parses():
    files = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "cluster").rglob("*.yaml"))
    assert len(files) >= 5, files
    for rel in files:
        _load(rel)


@pytest.mark.parametrize("rel", ["cluster/aws.yaml", "cluster/gcp.yaml"])
def test_launcher_configs(rel: str):
    doc = _load(rel)
    assert doc["provider"]["type"] in ("aws", "gcp")
    types = doc["available_node_types"]
    assert doc["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != doc["head_node_type"]}
    gpu = [v for v in workers.values() if v["resources"].get("GPU")]
    cpu = [v for v in workers.values() if not v["resources"].get("GPU")]
    assert gpu and cpu
    for t in workers.values():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= doc["max_workers"]
    assert doc["docker"]["image"].startswith("rayproject/ray:2.60.0-py311")
    setup = " ".join(doc["setup_commands"])
    assert "pip install" in setup and "rayllm" in setup
    starts = " ".join(doc["head_start_ray_commands"] + doc["worker_start_ray_commands"])
    assert "ray start --head" in starts and "--address=$RAY_HEAD_IP:6379" in starts


IMAGE = "ghcr.io/YOUR_ORG/rayllm:0.1.0-gpu"


def _check_group(group: dict, head: bool) -> None:
    assert isinstance(group["rayStartParams"], dict)
    containers = group["template"]["spec"]["containers"]
    assert containers[0]["image"] == IMAGE  # built from cluster/Dockerfile
    assert containers[0]["resources"]["limits"]
    if not head:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == "2.60.0"
    _check_group(spec["headGroupSpec"], head=True)
    assert spec["workerGroupSpecs"]
    for g in spec["workerGroupSpecs"]:
        _check_group(g, head=False)


def test_kuberay_manifests():
    dockerfile = (ROOT / "cluster/Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0-py311-gpu" in dockerfile and IMAGE in dockerfile
    cluster = _load("cluster/kuberay/raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    _check_cluster_spec(cluster["spec"])
    assert any(
        g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
        for g in cluster["spec"]["workerGroupSpecs"]
    )

    job = _load("cluster/kuberay/rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["entrypoint"].startswith("python jobs/run_stage.py train --config ")
    assert "working_dir" in yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    _check_cluster_spec(job["spec"]["rayClusterSpec"])

    svc = _load("cluster/kuberay/rayservice.yaml")
    assert (svc["apiVersion"], svc["kind"]) == ("ray.io/v1", "RayService")
    serve = yaml.safe_load(svc["spec"]["serveConfigV2"])
    app_cfg = serve["applications"][0]
    assert app_cfg["import_path"] == "rayllm.serve.deployment:app_builder"
    assert app_cfg["args"]["model_dir"]
    assert serve["http_options"]["host"] == "0.0.0.0" and app_cfg["args"]["api_keys_file"]  # not open
    _check_cluster_spec(svc["spec"]["rayClusterConfig"])


def test_gpu_multinode_config_validates():
    cfg = load_config([ROOT / "examples/configs/gpu-multinode.yaml"])
    assert cfg.train.use_gpu and cfg.train.gpus_per_worker == 1 and cfg.train.cpus_per_worker == 8
    assert cfg.train.worker_range == (16, 16)
    assert cfg.serve.host == "0.0.0.0" and cfg.serve.api_keys_file  # a network address needs keys
    assert cfg.train.deepspeed.zero_stage == 3 and cfg.train.deepspeed.precision == "bf16"
    assert cfg.model.family == "llama" and cfg.model.attention == "flash_attention_2"
    assert Path(cfg.run_dir).is_absolute()
