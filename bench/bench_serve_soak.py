"""Serve soak test: 32 concurrent clients for 10 minutes, malformed requests mixed in, on 127.0.0.1.

Clients cycle through streaming completions, plain completions and chat completions; every tenth
request of each client is one of ``bench_serve.malformed``'s bad requests, which must get a 4xx.
Reports p50/p99 latency, status counts (no 5xx allowed), the replica's resident memory after the
warm-up and at the end (flat within 10%), and ends with one JSON line: ``ratio`` = well-formed
requests served (HTTP 200, complete) / well-formed requests sent, ``target`` 1.0.

    .venv/bin/python bench/bench_serve_soak.py [--minutes 10] [--clients 32]

It starts a local Ray: run it when no other Ray runs on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import PROMPTS, default_model, free_port, log, malformed, percentile, replica_rss_mb

FAILURES: list[str] = []  # why well-formed requests failed, for the report


def good_request(i: int) -> tuple[str, dict[str, Any]]:
    prompt = PROMPTS[i % len(PROMPTS)]
    kind = i % 3
    if kind == 0:
        return "/v1/completions", {"prompt": prompt, "max_tokens": 32, "stream": True, "seed": i}
    if kind == 1:
        return "/v1/completions", {"prompt": prompt, "max_tokens": 32, "seed": i}
    return "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], "max_tokens": 32}


async def send_good(c: httpx.AsyncClient, path: str, body: dict[str, Any]) -> int:
    """Status of one well-formed request; a stream counts only when it ends with [DONE] and no error."""
    if not body.get("stream"):
        r = await c.post(path, json=body)
        if r.status_code >= 500:
            FAILURES.append(f"HTTP {r.status_code}: {r.text[:200]}")
        return r.status_code if r.status_code != 200 or r.json().get("choices") else 598
    async with c.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code
        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    if not lines or lines[-1] != "data: [DONE]":
        FAILURES.append(f"stream ended without [DONE] after {len(lines)} events")
        return 597
    errors = [json.loads(ln[6:])["error"] for ln in lines[:-1] if "error" in json.loads(ln[6:])]
    if errors:
        FAILURES.append(f"error event: {errors[0]}")
        return 597
    return 200


async def soak(url: str, clients: int, seconds: float) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    good: Counter[int] = Counter()
    bad: Counter[int] = Counter()
    latencies: list[float] = []
    memory: list[tuple[float, float]] = []
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, trust_env=False) as c:

        async def client(k: int) -> None:
            i = k
            while time.monotonic() < deadline:
                i += clients
                if i % 10 == k % 10:
                    path, content = malformed(i)
                    try:
                        r = await c.post(path, content=content, headers={"content-type": "application/json"})
                        bad[r.status_code] += 1
                    except httpx.HTTPError:
                        bad[599] += 1
                    continue
                path, body = good_request(i)
                t0 = time.perf_counter()
                try:
                    status = await send_good(c, path, body)
                except httpx.HTTPError:
                    status = 599
                good[status] += 1
                if status == 200:
                    latencies.append(time.perf_counter() - t0)

        async def sample_memory() -> None:
            start = time.monotonic()
            while time.monotonic() < deadline:
                memory.append((round(time.monotonic() - start), round(replica_rss_mb(), 1)))
                await asyncio.sleep(30)

        await asyncio.gather(sample_memory(), *(client(k) for k in range(clients)))
    memory.append((round(seconds), round(replica_rss_mb(), 1)))
    latencies.sort()
    return {"good": good, "bad": bad, "latencies": latencies, "memory": memory}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=32)
    args = ap.parse_args()

    import ray

    from rayllm.config import RunConfig
    from rayllm.serve import stage

    work = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    model_dir, model = default_model(work / "model")
    cfg = RunConfig.model_validate(
        {
            "run_dir": str(work / "run"),
            "serve": {"model_dir": model_dir, "port": free_port(), "max_batch": 16, "max_queue": 64},
            "cluster": {"address": "local", "num_cpus": os.cpu_count() or 2, "object_store_gb": 0.3},
        }
    )
    try:
        url = stage.start(cfg)
        log(f"{model} served at {url}; warming up")
        asyncio.run(soak(url, args.clients, 20))  # allocator and caches reach their working size
        log(f"soaking: {args.clients} clients for {args.minutes:g} min")
        r = asyncio.run(soak(url, args.clients, args.minutes * 60))
        health = httpx.get(f"{url}/health", timeout=10, trust_env=False).json()
    finally:
        stage.shutdown()
        ray.shutdown()
    sent, served = sum(r["good"].values()), r["good"][200]
    five = sum(n for s, n in {**r["good"], **r["bad"]}.items() if s >= 500)
    rss0, rss1 = r["memory"][0][1], r["memory"][-1][1]
    print(f"well-formed: {sent} sent, {served} served, statuses {dict(r['good'])}", file=sys.stderr)
    print(f"malformed: statuses {dict(r['bad'])}", file=sys.stderr)
    for failure in FAILURES[:5]:
        print(f"failed: {failure}", file=sys.stderr)
    print(f"replica RSS MB over time: {r['memory']}", file=sys.stderr)
    print(
        json.dumps(
            {
                "bench": "serve_soak",
                "model": model,
                "minutes": args.minutes,
                "clients": args.clients,
                "sent": sent,
                "served": served,
                "malformed_sent": sum(r["bad"].values()),
                "malformed_4xx": sum(n for s, n in r["bad"].items() if 400 <= s < 500),
                "http_5xx": five,
                "latency_p50_s": round(percentile(r["latencies"], 50), 3),
                "latency_p99_s": round(percentile(r["latencies"], 99), 3),
                "rss_start_mb": rss0,
                "rss_end_mb": rss1,
                "rss_growth": round(rss1 / rss0 - 1, 4),
                "replica": {k: health[k] for k in ("requests", "rejected", "timed_out")},
                "ratio": round(served / max(sent, 1), 4),
                "target": 1.0,
            }
        )
    )


if __name__ == "__main__":
    main()
