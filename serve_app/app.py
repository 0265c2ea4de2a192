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
from deployments.flux import Flux
from deployments.stable_diffusion import LCM, StableDiffusion
from serve_app.config import AppConfig
from serve_app.router import Router

logger = logging.getLogger("diffusion_serve.app")

# Model replicas return raw pixels (a 1024x1024 image is 3 MB). Returns up to this size travel
# inline in the reply instead of through the object store: measured ~2 ms less per request at
# 256x256 on the CI machine (load_tests/bench_serve_tuning.py). The Serve configs set the same.
MODEL_REPLICA_ENV = {"RAY_max_direct_call_object_size": str(32 * 1024 * 1024)}


def with_model_replica_env(options: dict[str, Any] | None) -> dict[str, Any]:
    """Deployment options with `MODEL_REPLICA_ENV` added to the replicas' runtime_env."""
    options = dict(options or {})
    actor = dict(options.get("ray_actor_options") or {})
    runtime_env = dict(actor.get("runtime_env") or {})
    runtime_env["env_vars"] = {**MODEL_REPLICA_ENV, **(runtime_env.get("env_vars") or {})}
    actor["runtime_env"] = runtime_env
    options["ray_actor_options"] = actor
    return options


def assemble(
    config: AppConfig,
    stable_diffusion_options: dict[str, Any] | None = None,
    lcm_options: dict[str, Any] | None = None,
    flux_options: dict[str, Any] | None = None,
) -> Application:
    """The application graph: Router -> StableDiffusion, LCM, Flux -> AdapterFetcher, from one config."""
    if config.is_demo:
        logger.warning(
            "DEMO PROFILE: every model name is served by tiny random-weight stand-ins; images are noise. "
            "Use cluster/production.yaml for real weights."
        )
    # Only what was set travels to the replicas; defaults and the environment resolve in each
    # replica's own process, so node-local settings (the weights cache under ~, a per-node
    # DIFFUSION_SERVE_WEIGHTS__CACHE_DIR) stay the node's own.
    settings = config.model_dump(mode="json", exclude_unset=True)
    fetcher = AdapterFetcher.bind(settings)
    stable_diffusion = StableDiffusion.options(**with_model_replica_env(stable_diffusion_options))
    lcm = LCM.options(**with_model_replica_env(lcm_options))
    flux = Flux.options(**with_model_replica_env(flux_options))
    return Router.bind(stable_diffusion.bind(settings, fetcher), lcm.bind(settings, fetcher), flux.bind(settings, fetcher), settings)


def build_app(args: dict[str, Any] | None = None) -> Application:
    """`import_path` target of the Serve configs: `args` are the YAML's application args."""
    return assemble(AppConfig.from_args(args))
