"""What the serve stage checks before Ray starts: the model folder, the API keys, the address.

Kept apart from ``deployment.py``, whose Ray Serve LLM and vLLM imports take seconds: a refusal here
is one line at once.
"""

from __future__ import annotations

import os
from pathlib import Path

from rayllm.config import RunConfig, ServeConfig
from rayllm.errors import ConfigError, RunDirError
from rayllm.rundir import RunDir
from rayllm.runtime import is_loopback

KEYS_FILE_ENV = "RAYLLM_API_KEYS_FILE"


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


def check(cfg: RunConfig) -> tuple[str, list[str]]:
    """The model folder and the API keys ``cfg.serve`` names, or one line saying what to fix."""
    model_dir = resolve_model_dir(cfg.serve, cfg.run_dir)
    keys = api_keys(cfg.serve)
    check_exposure(cfg.serve, keys)
    return model_dir, keys
