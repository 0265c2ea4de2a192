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
