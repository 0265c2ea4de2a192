"""Base models live in per-replica LRUs behind @serve.multiplexed: requests follow their model.

A second application on the shared cluster: two StableDiffusion replicas, each on half a fake GPU
(the main stack holds 2.5 of the cluster's 4) and holding one base model at most, so a model that bounced between replicas would reload every time.
"""

from __future__ import annotations

import collections

import httpx
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_replicas(stack, files_dir, test_ca):
    from ray import serve

    from serve_app.app import assemble
    from serve_app.config import AppConfig
    from tests.conftest import AUTH_HEADERS, IMAGE_HOST, TEST_AUTH

    config = AppConfig(
        profile="demo",
        files={"directory": str(files_dir)},
        max_models_per_replica=1,
        network={"allowed_networks": [f"{IMAGE_HOST}/32"]},
        weights={"cache_dir": str(files_dir.parent / "weights-mx")},
        auth=TEST_AUTH,
        queue={"store_url": f"sqlite://{files_dir.parent / 'jobs-mx.sqlite3'}"},
    )
    idle = {"ray_actor_options": {"num_cpus": 0}}  # this app's LCM and FLUX replicas are not used here
    app = assemble(config, {"num_replicas": 2, "ray_actor_options": {"num_gpus": 0.5, "num_cpus": 1}}, idle, idle)
    serve.run(app, name="multiplexing", route_prefix="/mx")
    with httpx.Client(base_url=f"{stack}/mx", timeout=120, verify=test_ca.ssl_context(), headers=AUTH_HEADERS) as client:
        yield client
    serve.delete("multiplexing")


def body(model: str, seed: int) -> dict:
    return {"model_name": model, "prompt": "photo of a cat", "image_size": {"width": 64, "height": 64},
            "num_inference_steps": 2, "seed": seed}


def test_requests_stick_to_the_replica_that_holds_their_model(two_replicas):
    models = ["runwayml/stable-diffusion-v1-5", "stabilityai/stable-diffusion-xl-base-1.0"]
    served = collections.defaultdict(list)
    for i in range(12):
        model = models[i % 2]
        response = two_replicas.post("/fal-ai/lora", json=body(model, i))
        assert response.status_code == 200, response.text
        served[model].append(response.headers["x-diffusion-serve-replica"])
    replicas = {model: set(ids) for model, ids in served.items()}
    # Warm-up may try either replica first; after that each model stays where it is loaded.
    assert all(len(set(ids[2:])) == 1 for ids in served.values()), served
    assert set(served[models[0]][2:]).isdisjoint(served[models[1]][2:]), replicas


def test_requests_with_the_same_lora_set_stick_to_one_replica(two_replicas, image_server):
    from deployments.tiny_models import ensure_tiny_model

    def url(name: str) -> str:
        return image_server.add(f"/mx/{name}", next(ensure_tiny_model(name).glob("*.safetensors")).read_bytes())

    sets = {"a": [{"path": url("sd15-lora-a"), "scale": 1.0}], "b": [{"path": url("sd15-lora-b"), "scale": 1.0}]}
    served = collections.defaultdict(list)
    for i in range(12):
        name = "ab"[i % 2]
        response = two_replicas.post("/fal-ai/lora", json={**body("runwayml/stable-diffusion-v1-5", i), "loras": sets[name]})
        assert response.status_code == 200, response.text
        served[name].append(response.headers["x-diffusion-serve-replica"])
    assert all(len(set(ids[2:])) == 1 for ids in served.values()), served
