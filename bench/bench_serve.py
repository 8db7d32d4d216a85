"""Serve benchmark: `rayllm serve` (Ray Serve LLM over vLLM) against vLLM's in-process ceiling and a
naive server, same model, same run.

The baseline is vLLM's offline ``LLM.generate`` on the same prompts, sampling settings and batch
size (no HTTP, no Serve): what the engine does alone, the faster of its two CPU layouts, measured in
turn: the model in the engine's process (``uni``, vLLM's default for one device) and in a worker
process of its own (``mp``, what Ray Serve LLM runs on CPUs). Neither won reliably on 2 cores, so
the bench measures both each run. The server has to keep at least
``TARGET`` of it over HTTP. The naive server is what a first attempt looks like (FastAPI +
``model.generate`` under a lock, streamed with ``TextIteratorStreamer``), reported for scale. The two
servers get the same load from this process (asyncio + httpx, only 127.0.0.1): ``--clients``
concurrent streaming clients with fixed prompts and output lengths, bounded by ``--requests`` and
``--time-limit``, plus ``--malformed`` bad requests mixed in, of which none may get a 5xx. Each
contestant computes on ``--threads`` cores (torch threads; vLLM's OpenMP threads bound to them).

Prints progress to stderr and ends with ONE line of JSON on stdout: tokens/s, p50/p99 latency and
time to first token per server, ``ratio`` (ours / offline vLLM tokens/s) and ``target``.

    python bench/bench_serve.py                       # a small random GPT-2-shaped model, a few minutes
    python bench/bench_serve.py --model-dir runs/x/train/export
    python bench/bench_serve.py --isolate             # Ray's own processes kept off the engine's core
    python bench/bench_serve.py --app ray-openai-direct  # Ray Serve LLM's own app, without rayllm's layer

It starts a local Ray: run it when no other Ray runs on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field

ROOT = Path(__file__).resolve().parent.parent
TARGET = 0.8
PROMPTS = [
    "The old man looked out over the sea and said",
    "Once upon a time, in a kingdom far away, there lived",
    "def fibonacci(n):\n    ",
    "To be, or not to be, that is the question:",
    "The best way to learn a new language is",
    "In the beginning God created the heaven and the earth. And",
    "Ray Serve scales model serving by",
    "Her favourite book was",
]


def log(msg: str) -> None:
    print(f"[bench_serve] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------ naive server
class NaiveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    max_tokens: int = Field(16, ge=1, le=1024)
    temperature: float = Field(1.0, ge=0, le=2)
    seed: int = 0
    ignore_eos: bool = False
    stream: bool = False
    stream_options: dict[str, bool] | None = None  # usage is always sent


def naive_server(model_dir: str, port: int, threads: int) -> None:
    """One request at a time: a lock around ``model.generate``, streamed through TextIteratorStreamer."""
    import torch
    import uvicorn
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import StreamingResponse
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/completions")
    def completions(body: NaiveRequest) -> StreamingResponse:
        ids = tok(body.prompt, return_tensors="pt").input_ids
        if ids.shape[1] + body.max_tokens > model.config.max_position_embeddings:
            raise HTTPException(400, "prompt + max_tokens exceed the context")

        def events() -> Iterator[str]:
            with lock:
                torch.manual_seed(body.seed)
                streamer = TextIteratorStreamer(tok, skip_prompt=True)
                kwargs = {
                    "input_ids": ids,
                    "max_new_tokens": body.max_tokens,
                    "min_new_tokens": body.max_tokens if body.ignore_eos else 0,
                    "do_sample": body.temperature > 0,
                    "temperature": body.temperature or None,
                    "top_p": None,
                    "top_k": None,
                    "pad_token_id": tok.eos_token_id,
                    "streamer": streamer,
                }
                result: list[Any] = []
                worker = threading.Thread(target=lambda: result.append(model.generate(**kwargs)))
                worker.start()
                for text in streamer:
                    if text:
                        yield f"data: {json.dumps({'choices': [{'index': 0, 'text': text}]})}\n\n"
                worker.join()
            usage = {"completion_tokens": int(result[0].shape[1] - ids.shape[1])}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ------------------------------------------------------------------------------------------- load
def malformed(i: int) -> tuple[str, bytes]:
    """A rotating set of bad requests: each must be answered 4xx, never 5xx."""
    cases: list[tuple[str, Any]] = [
        ("/v1/completions", b'{"prompt": "unterminated'),
        ("/v1/completions", {"prompt": 12345}),
        ("/v1/completions", {"prompt": "x", "max_tokens": -5}),
        ("/v1/completions", {"prompt": "x", "max_tokens": 10**9}),
        ("/v1/completions", {"prompt": "x", "temperature": -1}),
        ("/v1/completions", {"prompt": "x", "model": "no-such-model"}),
        ("/v1/completions", {"prompt": "x", "max_tokens": "many"}),
        ("/v1/completions", {"prompt": "x " * 70_000, "max_tokens": 10}),  # over any context here
        ("/v1/chat/completions", {"messages": []}),
        ("/v1/completions", b'{"prompt": "' + b"a" * 2_000_000 + b'"}'),
    ]
    path, body = cases[i % len(cases)]
    return path, body if isinstance(body, bytes) else json.dumps(body).encode()


async def one_request(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, float]:
    start = time.perf_counter()
    first: float | None = None
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"latency": end - start, "ttft": (first or end) - start, "tokens": tokens}


async def run_load(url: str, args: argparse.Namespace) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8)
    results: list[dict[str, float]] = []
    errors: list[str] = []
    statuses: Counter[int] = Counter()
    next_index = iter(range(args.requests))
    deadline = time.monotonic() + args.time_limit
    bad_per_good = args.malformed / max(args.requests, 1)
    bad_sent: set[int] = set()

    async with httpx.AsyncClient(
        base_url=url, timeout=args.time_limit + 60, limits=limits, trust_env=False
    ) as c:

        async def send_bad(i: int) -> None:
            bad_sent.add(i)
            path, content = malformed(i)
            try:
                r = await c.post(path, content=content, headers={"content-type": "application/json"})
                statuses[r.status_code] += 1
            except httpx.HTTPError as e:
                statuses[599] += 1
                errors.append(f"malformed request {i}: {type(e).__name__}: {e}")

        async def client_loop() -> None:
            for i in next_index:
                if time.monotonic() > deadline:
                    return
                body = {
                    "prompt": PROMPTS[i % len(PROMPTS)],
                    "max_tokens": args.max_tokens,
                    "temperature": 0.8,
                    "seed": i,
                    "ignore_eos": True,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    **({"model": args.model} if args.model else {}),
                }
                try:
                    results.append(await one_request(c, body))
                except Exception as e:
                    errors.append(f"{type(e).__name__}: {e}")
                for j in range(int(i * bad_per_good), int((i + 1) * bad_per_good)):
                    await send_bad(j)  # interleaved with the generation load

        start = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(args.clients)))
        wall = time.perf_counter() - start
        for j in sorted(set(range(args.malformed)) - bad_sent):  # requests cut short by the time limit
            await send_bad(j)

    latencies = sorted(r["latency"] for r in results)
    ttfts = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {
        "requests": len(results),
        "generated_tokens": int(tokens),
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1) if wall else 0.0,
        "latency_p50_s": round(percentile(latencies, 50), 3),
        "latency_p99_s": round(percentile(latencies, 99), 3),
        "ttft_p50_s": round(percentile(ttfts, 50), 3),
        "ttft_p99_s": round(percentile(ttfts, 99), 3),
        "errors": len(errors),
        "first_errors": errors[:3],
        "malformed_4xx": sum(n for s, n in statuses.items() if 400 <= s < 500),
        "malformed_5xx": sum(n for s, n in statuses.items() if s >= 500),
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"naive server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"naive server at {url} not healthy after {timeout_s:.0f} s")


async def warm_up(url: str, max_tokens: int, model: str | None = None) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120, trust_env=False) as c:
        body = {"prompt": PROMPTS[0], "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
        body.update({"model": model} if model else {})
        await one_request(c, {**body, "stream_options": {"include_usage": True}})


# --------------------------------------------------------------------------------------- phases
def bench_naive(model_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, __file__, "--naive-server", "--model-dir", model_dir, "--port", str(port)]
    cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, env=env)
    try:
        wait_healthy(url, proc)
        asyncio.run(warm_up(url, 4))
        log(f"naive server up on {url}; loading it")
        return asyncio.run(run_load(url, args))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def replica_rss_mb() -> float:
    """Resident memory of the vLLM replicas: each Serve replica process (Ray titles it
    ``ray::ServeReplica:<app>:RayllmServer...``, or ``...:LLMServer...`` in Ray's own app) and vLLM's
    engine-core child under it. Found by title, so it works without Ray's dashboard (the state API
    needs it)."""
    import psutil

    procs = [
        p
        for p in psutil.process_iter(["cmdline"])
        if re.search(r"ServeReplica:[^:]+:\w*Server:", " ".join(p.info["cmdline"] or []))
    ]
    procs += [c for p in procs for c in p.children(recursive=True)]
    return sum(p.memory_info().rss for p in procs) / 2**20


def ray_openai_app(cfg: Any, model_dir: str) -> tuple[str, str]:
    """Ray Serve LLM's own ``build_openai_app`` over the LLMConfig rayllm builds (no rayllm layer):
    what the serving path costs without rayllm's layer. Returns the base URL, once it answers, and
    the model name that every request to it has to carry."""
    from ray import serve
    from ray.serve.llm import build_openai_app

    from rayllm.runtime import init_ray
    from rayllm.serve.deployment import _fallback_chat, llm_config
    from rayllm.serve.preflight import model_name

    init_ray(cfg.cluster)
    serve.start(http_options={"host": "127.0.0.1", "port": cfg.serve.port})
    name = model_name(cfg.serve, model_dir)
    config = llm_config(cfg.serve, model_dir, name, _fallback_chat(model_dir))
    app = build_openai_app({"llm_configs": [config]})
    serve.run(app, name="ray-openai", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{cfg.serve.port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            body = {"model": name, "prompt": "Hi", "max_tokens": 2}
            if httpx.post(f"{url}/v1/completions", json=body, timeout=10, trust_env=False).status_code == 200:
                return url, name
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"Ray Serve LLM's app at {url} did not answer within 600 s")


def bench_ours(model_dir: str, run_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    # Ray Serve LLM reads this as it is imported: set it first.
    if args.app == "ray-openai-direct":
        os.environ["RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING"] = "1"
    import ray

    from rayllm.config import RunConfig
    from rayllm.serve import stage as rayllm_serve

    cfg = RunConfig.model_validate(
        {
            "run_dir": run_dir,
            "serve": {
                "model_dir": model_dir,
                "port": free_port(),
                "max_batch": args.clients,
                "cpus_per_replica": args.threads,
            },
            "cluster": {
                "num_cpus": os.cpu_count() or 2,
                "object_store_gb": 0.3,
                "dashboard": False,
                "env_vars": {"VLLM_CPU_OMP_THREADS_BIND": cores(args.threads)},
            },
        }
    )
    affinity = os.sched_getaffinity(0)
    if args.isolate:  # inherited by every process Ray starts from here; vLLM binds its threads itself
        os.sched_setaffinity(0, set(range((os.cpu_count() or 1) - args.threads)))
    try:
        t0 = time.perf_counter()
        if args.app == "rayllm":
            url = rayllm_serve.start(cfg)
        else:
            url, args.model = ray_openai_app(cfg, model_dir)
        start_s = time.perf_counter() - t0
        asyncio.run(warm_up(url, 4, args.model))
        log(f"{args.app} up on {url} in {start_s:.1f} s; loading it")
        figures = asyncio.run(run_load(url, args))
        return {**figures, "start_s": round(start_s, 1), "replica_rss_mb": round(replica_rss_mb(), 1)}
    finally:
        try:
            rayllm_serve.shutdown()
        finally:
            ray.shutdown()
            os.sched_setaffinity(0, affinity)


def cores(threads: int) -> str:
    """vLLM's CPU thread binding for ``threads`` cores (the last ones: Ray's own processes start on 0)."""
    n = os.cpu_count() or 1
    return f"{n - threads}-{n - 1}"


def offline(model_dir: str, args: argparse.Namespace) -> None:
    """vLLM alone, in this process: the same prompts, sampling and batch size as the servers' load."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model_dir,
        dtype="float32",
        enforce_eager=True,
        max_num_seqs=args.clients,
        kv_cache_memory_bytes=1 << 30,
        seed=0,
        distributed_executor_backend=args.executor,
    )
    n = args.requests
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    params = [
        SamplingParams(temperature=0.8, seed=i, max_tokens=args.max_tokens, ignore_eos=True) for i in range(n)
    ]
    llm.generate(prompts[:4], params[:4], use_tqdm=False)  # warm-up, as the servers get one
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print("RESULT " + json.dumps({"requests": n, "generated_tokens": tokens, "wall_s": round(wall, 2),
                      "tokens_per_s": round(tokens / wall, 1)}))  # fmt: skip


def bench_offline(model_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    """Both executors in turn; the faster is the baseline, the other's tokens/s reported beside it."""
    runs = {executor: _offline_run(model_dir, args, executor) for executor in ("uni", "mp")}
    best = max(runs, key=lambda e: runs[e]["tokens_per_s"])
    by_executor = {e: r["tokens_per_s"] for e, r in runs.items()}
    return {**runs[best], "executor": best, "tokens_per_s_by_executor": by_executor}


def _offline_run(model_dir: str, args: argparse.Namespace, executor: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--offline", "--executor", executor, "--model-dir", model_dir]
    cmd += ["--threads", str(args.threads)]
    cmd += ["--clients", str(args.clients), "--requests", str(args.requests)]
    cmd += ["--max-tokens", str(args.max_tokens)]
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": cores(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"offline vLLM failed: {done.stderr[-2000:]}")
    # vLLM logs to stdout too: the figures are on the line marked RESULT
    return json.loads(next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))[7:])


def default_model(folder: Path) -> tuple[str, str]:
    sys.path.insert(0, str(ROOT / "tests"))
    from serve_helpers import make_tiny_gpt2

    shape = {"n_layer": 4, "n_head": 4, "n_embd": 128, "n_positions": 512}
    make_tiny_gpt2(folder, **shape)
    return str(folder), "random-gpt2-{n_layer}x{n_embd}".format(**shape)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", help="a Hugging Face causal-LM folder; default: a small random GPT-2")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=128, help="per server")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds of load per server")
    p.add_argument("--malformed", type=int, default=200, help="bad requests mixed into each server's load")
    p.add_argument("--threads", type=int, default=1, help="torch threads (and CPUs) per server")
    p.add_argument(
        "--isolate",
        action="store_true",
        help="keep Ray's processes (HAProxy, the replica's HTTP front end) and the load off the engine's "
        "cores, as the replica's CPU bundle intends; on 2 cores they otherwise share the engine's core",
    )
    p.add_argument(
        "--app",
        choices=("rayllm", "ray-openai", "ray-openai-direct"),
        default="rayllm",
        help="what serves in place of `rayllm serve`: Ray Serve LLM's own build_openai_app over the same "
        "LLMConfig, with its ingress replica (ray-openai) or with direct streaming like rayllm's "
        "(ray-openai-direct: no rayllm layer), to see what each serving path costs",
    )
    p.add_argument("--naive-server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--offline", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--executor", choices=("uni", "mp"), default="uni", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.model = None  # the model name the load sends; only Ray's own app asks for it (bench_ours sets it)
    if args.isolate and args.threads >= (os.cpu_count() or 1):
        p.error(f"--isolate needs more cores than --threads={args.threads} ({os.cpu_count()} here)")
    if args.naive_server:
        naive_server(args.model_dir, args.port, args.threads)
        return
    if args.offline:
        offline(args.model_dir, args)
        return

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        if args.model_dir:
            model_dir, name = str(Path(args.model_dir).resolve()), Path(args.model_dir).name
        else:
            model_dir, name = default_model(Path(tmp) / "model")
        log(f"model {name}: {args.clients} clients, {args.requests} x {args.max_tokens} tokens per server")
        ceiling = bench_offline(model_dir, args)
        log(f"offline vLLM: {ceiling}")
        naive = bench_naive(model_dir, args)
        log(f"naive: {naive}")
        ours = bench_ours(model_dir, str(Path(tmp) / "run"), args)
        log(f"ours: {ours}")
    ratio = ours["tokens_per_s"] / ceiling["tokens_per_s"]
    figures = {
        "bench": "serve",
        "model": name,
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "threads_per_server": args.threads,
        "isolated": args.isolate,
        "app": args.app,
        "ours": ours,
        "offline_vllm": ceiling,
        "naive": naive,
        "vs_naive": round(ours["tokens_per_s"] / naive["tokens_per_s"], 2) if naive["tokens_per_s"] else None,
        "malformed_per_server": args.malformed,
        "malformed_5xx": ours["malformed_5xx"],
        "ratio": round(ratio, 2),
        "target": TARGET,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
