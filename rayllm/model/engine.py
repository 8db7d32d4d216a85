"""vLLM's engine settings for a model, one rule for every stage that runs vLLM (serve's Ray Serve LLM
replicas, eval's Ray Data LLM processor), so that both generate alike on the same device."""

from __future__ import annotations

from typing import Any

DTYPES = {"auto": "auto", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# vLLM on CPUs reserves 92% of the node's memory for its KV cache unless told a size.
CPU_KV_CACHE_GB = 1.0


def resolve_dtype(dtype: str, gpu: bool) -> str:
    """eval's precision: ``auto`` is bf16 on GPUs, fp32 on CPUs (where bf16 matmuls are slow)."""
    return ("bf16" if gpu else "fp32") if dtype == "auto" else dtype


def vllm_engine_kwargs(
    *,
    dtype: str,
    gpus: float,
    max_num_seqs: int | None = None,
    max_model_len: int | None = None,
    enforce_eager: bool | None = None,
    kv_cache_gb: float | None = None,
    stream_interval: int = 1,
) -> dict[str, Any]:
    """vLLM's ``engine_kwargs``: ``dtype`` auto is fp32 on CPUs (vLLM's own choice elsewhere), eager
    on CPUs (compiling costs 1-2 minutes a start there), a bounded KV cache on CPUs."""
    gpu = gpus > 0
    engine: dict[str, Any] = {
        "dtype": DTYPES[dtype] if dtype != "auto" or gpu else "float32",
        "enforce_eager": (not gpu) if enforce_eager is None else enforce_eager,
        "seed": 0,
        "stream_interval": stream_interval,
    }
    if max_num_seqs:
        engine["max_num_seqs"] = max_num_seqs
    if max_model_len:
        engine["max_model_len"] = max_model_len
    if kv_cache_gb or not gpu:
        engine["kv_cache_memory_bytes"] = int((kv_cache_gb or CPU_KV_CACHE_GB) * 2**30)
    if gpu:
        engine["tensor_parallel_size"] = max(1, int(gpus))
    return engine


def vllm_bundles(cpus: float, gpus: float) -> list[dict[str, float]]:
    """The placement group bundles of one engine: a GPU per tensor-parallel rank, or CPUs only."""
    if gpus > 0:
        return [{"CPU": cpus, "GPU": 1}] * max(1, int(gpus))
    return [{"CPU": cpus}]
