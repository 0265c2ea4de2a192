"""Builds the Serve application from a config: the entry point of `serve run` / `serve deploy`.

`cluster/demo.yaml` and `cluster/production.yaml` name `serve_app.app:build_app` as their import
path and pass the application settings as `args`; per-deployment resources (replicas, GPUs,
autoscaling) stay in the YAML's `deployments` section, where Serve reads them.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.serve import Application

from deployments.adapters import AdapterFetcher
from deployments.stable_diffusion import StableDiffusion
from serve_app.config import AppConfig
from serve_app.router import Router

logger = logging.getLogger("diffusion_serve.app")


def assemble(config: AppConfig, stable_diffusion_options: dict[str, Any] | None = None) -> Application:
    """The application graph: Router -> StableDiffusion -> AdapterFetcher, all from one config."""
    if config.is_demo:
        logger.warning(
            "DEMO PROFILE: every model name is served by tiny random-weight stand-ins; images are noise. "
            "Use cluster/production.yaml for real weights."
        )
    settings = config.model_dump(mode="json")
    fetcher = AdapterFetcher.bind(settings)
    stable_diffusion = StableDiffusion.options(**(stable_diffusion_options or {}))
    return Router.bind(stable_diffusion.bind(settings, fetcher), settings)


def build_app(args: dict[str, Any] | None = None) -> Application:
    """`import_path` target of the Serve configs: `args` are the YAML's application args."""
    return assemble(AppConfig.from_args(args))
