"""The Serve configs operators run are valid for Ray and build the application they describe."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.app import build_app
from serve_app.config import AppConfig

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


@pytest.mark.parametrize("name, profile", [("demo.yaml", "demo"), ("production.yaml", "production")])
def test_serve_config_is_valid_and_builds(name, profile):
    schema = ServeDeploySchema.model_validate(yaml.safe_load((CLUSTER / name).read_text()))
    (app,) = schema.applications
    assert app.import_path == "serve_app.app:build_app" and app.route_prefix == "/"
    config = AppConfig.from_args(app.args)
    assert config.profile == profile
    assert {d.name for d in app.deployments} == {"Router", "StableDiffusion", "LCM", "Flux", "AdapterFetcher"}
    build_app(app.args)  # the same call `serve run` makes


def test_demo_asks_for_no_gpu_production_one_per_sd_replica_and_half_per_lcm_replica():
    demo = yaml.safe_load((CLUSTER / "demo.yaml").read_text())["applications"][0]["deployments"]
    prod = yaml.safe_load((CLUSTER / "production.yaml").read_text())["applications"][0]["deployments"]
    gpus = lambda deployments: {d["name"]: d.get("ray_actor_options", {}).get("num_gpus", 0) for d in deployments}  # noqa: E731
    assert gpus(demo)["StableDiffusion"] == gpus(demo)["LCM"] == 0
    assert gpus(prod)["StableDiffusion"] == 1
    assert 0 < gpus(prod)["LCM"] < 1  # LCM replicas share a GPU
    flux = next(d for d in prod if d["name"] == "Flux")
    assert gpus(prod)["Flux"] == 1 and flux["autoscaling_config"]["min_replicas"] == 0  # scale to zero
    sd = next(d for d in prod if d["name"] == "StableDiffusion")
    assert sd["max_ongoing_requests"] > sd["autoscaling_config"]["target_ongoing_requests"]


def test_the_demo_fits_a_two_core_machine():
    """`serve run cluster/demo.yaml` on a fresh 2-CPU box: every replica must be schedulable
    (Ray counts logical CPUs; the AdapterFetcher asks for none)."""
    demo = yaml.safe_load((CLUSTER / "demo.yaml").read_text())["applications"][0]["deployments"]
    total = sum(d.get("num_replicas", 1) * d.get("ray_actor_options", {}).get("num_cpus", 1) for d in demo)
    assert total <= 2, total


def test_unknown_settings_are_rejected():
    with pytest.raises(ValueError):
        AppConfig.from_args({"profile": "demo", "batchng": {}})


@pytest.mark.parametrize("name", ["demo.yaml", "production.yaml"])
def test_model_replicas_get_the_same_environment_as_assembled_apps(name):
    from serve_app.app import MODEL_REPLICA_ENV

    deployments = yaml.safe_load((CLUSTER / name).read_text())["applications"][0]["deployments"]
    for name in ("StableDiffusion", "LCM", "Flux"):
        model = next(d for d in deployments if d["name"] == name)
        assert model["ray_actor_options"]["runtime_env"]["env_vars"] == MODEL_REPLICA_ENV


SERVED_APPS = {"StableDiffusion": ["fal-ai/lora"], "LCM": ["fal-ai/lcm"], "Flux": ["fal-ai/flux-lora"]}


def test_production_scales_each_model_on_its_own_queue_and_the_router_on_cpu():
    """The queue-aware policies read the same store the routers write (their `store_url` is the
    app's), each for the apps its deployment serves; FLUX scales to zero; the dispatch slots can
    feed every model replica; the policies import and construct as Serve's controller does."""
    from ray.serve.config import AutoscalingConfig

    from serve_app.autoscaling import QueueAwarePolicy, RouterCpuPolicy

    (app,) = yaml.safe_load((CLUSTER / "production.yaml").read_text())["applications"]
    config = AppConfig.from_args(app["args"])
    deployments = {d["name"]: d for d in app["deployments"]}
    for name, apps in SERVED_APPS.items():
        scaling = AutoscalingConfig(**deployments[name]["autoscaling_config"])
        assert scaling.policy.policy_function == "serve_app.autoscaling:QueueAwarePolicy"
        policy = scaling.policy.get_policy()(**scaling.policy.policy_kwargs)
        assert isinstance(policy, QueueAwarePolicy) and policy.store_url == config.queue.store_url and policy.apps == apps
        assert scaling.downscale_delay_s >= 300 and deployments[name]["graceful_shutdown_timeout_s"] >= 120
    assert AutoscalingConfig(**deployments["Flux"]["autoscaling_config"]).min_replicas == 0
    router = AutoscalingConfig(**deployments["Router"]["autoscaling_config"])
    assert router.min_replicas >= 1 and isinstance(router.policy.get_policy()(**router.policy.policy_kwargs), RouterCpuPolicy)
    model_capacity = sum(deployments[n]["max_ongoing_requests"] * deployments[n]["autoscaling_config"]["max_replicas"] for n in SERVED_APPS)
    assert config.queue.dispatch_slots * router.min_replicas >= model_capacity  # one router can keep every replica busy
