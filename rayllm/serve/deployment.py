"""The Ray Serve deployment and application: ``LLMServer`` replicas behind an OpenAI-compatible API.

Each replica loads the model once and runs one continuous batch (``engine.py``). Requests enter that
batch through ``@serve.batch``, which groups arrivals within ``serve.batch_wait_ms`` into one prefill
of up to ``serve.max_batch`` sequences; replicas scale between ``serve.replicas.min`` and ``max`` on
``target_ongoing_requests``.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from rayllm.config import RunConfig, ServeConfig, validate_config
from rayllm.errors import ConfigError, RunDirError
from rayllm.rundir import RunDir, model_folder
from rayllm.runtime import is_loopback, worker_env
from rayllm.serve.engine import Engine, GenerationStream
from rayllm.serve.http import build_api
from rayllm.serve.openai import OpenAIHandler

APP_NAME = "rayllm"
KEYS_FILE_ENV = "RAYLLM_API_KEYS_FILE"


def _sequence_count(groups: list[list[Any]]) -> int:
    return sum(len(g) for g in groups)


@serve.deployment(name="LLMServer")
@serve.ingress()
class LLMServer:
    """One replica: the engine, the OpenAI handler over it, and the HTTP routes."""

    def __init__(
        self, serve_cfg: dict[str, Any], model_dir: str, model_name: str, api_keys: list[str]
    ) -> None:
        self.cfg = ServeConfig.model_validate(serve_cfg)
        self.api_keys = api_keys
        device = "cuda" if self.cfg.gpus_per_replica > 0 and torch.cuda.is_available() else "cpu"
        self.engine = Engine(model_dir, device=device, dtype=self.cfg.dtype, max_batch=self.cfg.max_batch)
        self.handler = OpenAIHandler(self.engine, self.cfg, model_name, self._submit)
        self._admit.set_max_batch_size(self.cfg.max_batch)
        self._admit.set_batch_wait_timeout_s(self.cfg.batch_wait_ms / 1000)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self.handler, self.api_keys)

    async def check_health(self) -> None:
        self.engine.check_health()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, batch_size_fn=_sequence_count)
    async def _admit(self, groups: list[list[Any]]) -> list[None]:
        """Dynamic batching: arrivals within ``batch_wait_ms`` start together in one prefill."""
        for group in groups:
            self.engine.add(group)
        return [None] * len(groups)

    async def _submit(self, stream: GenerationStream) -> None:
        size = self.cfg.max_batch
        seqs = stream.sequences
        await asyncio.gather(*(self._admit(seqs[i : i + size]) for i in range(0, len(seqs), size)))


# ---------------------------------------------------------------------------------- app building
def resolve_model_dir(serve_cfg: ServeConfig, run_dir: str | None) -> str:
    """``serve.model_dir``, else the run's exported model (``train/summary.json`` ``export_dir``)."""
    if not serve_cfg.model_dir and not run_dir:
        raise RunDirError("no model: set serve.model_dir, or a run_dir whose train stage exported a model")
    return RunDir.of(RunConfig(run_dir=run_dir or ".")).model_dir(serve_cfg.model_dir, "serve.model_dir")


def model_name(serve_cfg: ServeConfig, model_dir: str) -> str:
    return serve_cfg.model_name or Path(model_dir).name


def api_keys(serve_cfg: ServeConfig) -> list[str]:
    """``serve.api_keys`` plus the lines of ``serve.api_keys_file`` (default ``$RAYLLM_API_KEYS_FILE``)."""
    keys = [k.get_secret_value().strip() for k in serve_cfg.api_keys]
    path = serve_cfg.api_keys_file or os.environ.get(KEYS_FILE_ENV)
    if path:
        field = "serve.api_keys_file" if serve_cfg.api_keys_file else f"${KEYS_FILE_ENV}"
        try:
            lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise ConfigError(f"{field}: cannot read the API key file {path} ({e.strerror})") from None
        from_file = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not from_file:
            raise ConfigError(f"{field}: {path} holds no API key (one per line)")
        keys += from_file
    return keys


def check_exposure(serve_cfg: ServeConfig, keys: list[str]) -> None:
    """Refuse to put a model on a network address without keys unless told so explicitly."""
    if keys or serve_cfg.allow_unauthenticated or is_loopback(serve_cfg.host):
        return
    raise ConfigError(
        f"serve.host={serve_cfg.host} lets anyone who reaches port {serve_cfg.port} use the model: set "
        f"serve.api_keys or serve.api_keys_file (or ${KEYS_FILE_ENV}), or serve.allow_unauthenticated=true"
    )


def build_app(serve_cfg: ServeConfig, model_dir: str) -> Application:
    """The Serve application for ``model_dir`` with replicas, resources and batching from ``serve_cfg``."""
    model_dir = model_folder(Path(model_dir).expanduser(), f"model_dir={model_dir}", "serve.model_dir")
    keys = api_keys(serve_cfg)
    check_exposure(serve_cfg, keys)
    replicas = serve_cfg.replicas
    gpu = serve_cfg.gpus_per_replica > 0
    return LLMServer.options(
        autoscaling_config={
            "min_replicas": replicas.min,
            "initial_replicas": max(replicas.min, 1),
            "max_replicas": replicas.max,
            "target_ongoing_requests": replicas.target_ongoing_requests,
            "upscale_delay_s": replicas.upscale_delay_s,
            "downscale_delay_s": replicas.downscale_delay_s,
        },
        # Running plus queued requests reach the replica, which answers 429 past serve.max_queue;
        # the headroom lets those answers out instead of queueing them at Serve's proxy.
        max_ongoing_requests=2 * (serve_cfg.max_batch + serve_cfg.max_queue) + 1,
        ray_actor_options={
            "num_cpus": serve_cfg.cpus_per_replica,
            "num_gpus": serve_cfg.gpus_per_replica,
            "runtime_env": {"env_vars": worker_env(use_gpu=gpu)},
        },
        health_check_period_s=10,
        health_check_timeout_s=60,
    ).bind(
        serve_cfg.model_dump(mode="json", exclude={"api_keys"}),
        model_dir,
        model_name(serve_cfg, model_dir),
        keys,
    )


def app_builder(args: dict[str, Any]) -> Application:
    """Import path for Serve's own tools: ``serve run rayllm.serve.deployment:app_builder model_dir=/path``.

    ``args`` are ``serve`` section fields (``max_batch=8``, ``replicas.max=2``) plus an optional
    ``run_dir`` whose exported model is served when ``model_dir`` is not given. Serve's
    ``http_options``, not these args, choose the address, and an application cannot see them: without
    a loopback ``host`` among the args the model counts as reachable from the network and needs keys.
    """
    raw: dict[str, Any] = {}
    for key, value in args.items():
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    run_dir = raw.pop("run_dir", None)
    cfg = validate_config({"serve": raw}, origin="serve application args").serve
    if "host" not in raw and not cfg.allow_unauthenticated and not api_keys(cfg):
        raise ConfigError(
            "serve application args: the address comes from Serve's http_options, which the application "
            "cannot see: set api_keys_file (or $" + KEYS_FILE_ENV + "), or host: 127.0.0.1 when "
            "http_options.host is loopback, or allow_unauthenticated: true"
        )
    return build_app(cfg, resolve_model_dir(cfg, run_dir))
