"""Prometheus metrics, scraped from Ray's metrics agent while the stack serves: every metric the
README lists is there, tagged with its deployment, and moves by what the traffic made.

Each figure is compared with a scrape taken before the traffic (other tests share the stack), and
the agent is polled until the replicas have reported (they do each second in the test cluster).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import msgpack
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.test_loras import lora_file
from tests.test_realtime import FRAME, receive_result, session

pytestmark = pytest.mark.slow

APP = {"application": "diffusion-serve"}
SD = {**APP, "deployment": "StableDiffusion"}


class Scrape:
    def __init__(self, text: str) -> None:
        self.samples = [sample for family in text_string_to_metric_families(text) for sample in family.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sum over every series of `name` whose labels include `labels`."""
        return sum(s.value for s in self.samples if s.name == name and labels.items() <= s.labels.items())

    def has(self, name: str, **labels: str) -> bool:
        return any(s.name == name and labels.items() <= s.labels.items() for s in self.samples)


def scrape(url: str) -> Scrape:
    return Scrape(httpx.get(url, timeout=10).text)


def small(**overrides) -> dict:
    return {"model_name": "runwayml/stable-diffusion-v1-5", "prompt": "a cat", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 3, **overrides}


def test_every_metric_is_exported_with_values_that_follow_the_traffic(ray_cluster, http, stack, test_ca, image_server):
    metrics_url = ray_cluster
    before = scrape(metrics_url)

    # A base model no replica has loaded yet (the demo profile gives it a tiny stand-in): a load and
    # a multiplex miss, then hits. A LoRA at a new URL: a weights-cache miss and its bytes.
    fresh_model = f"metrics-probe/sd15-{uuid.uuid4().hex[:8]}"
    lora = lora_file("sd15-lora-b")
    lora_url = image_server.add(f"/metrics-probe/{uuid.uuid4().hex}.safetensors", lora, "application/octet-stream")
    assert http.post("/fal-ai/lora", json=small(model_name=fresh_model, model_architecture="sd")).status_code == 200
    assert http.post("/fal-ai/lora", json=small(model_name=fresh_model, model_architecture="sd", loras=[{"path": lora_url, "scale": 0.7}])).status_code == 200
    with ThreadPoolExecutor(6) as pool:  # a burst of compatible jobs: they may share pipeline calls
        burst = list(pool.map(lambda seed: http.post("/fal-ai/lora", json=small(seed=seed, num_images=2)).status_code, range(6)))
    assert burst == [200] * 6
    assert http.post("/fal-ai/lora", json={"prompt": "no model"}).status_code == 422
    assert http.post("/fal-ai/lcm", json={"prompt": "a cat", "image_size": {"width": 64, "height": 64}}).status_code == 200
    queued = http.post("/queue/fal-ai/lora", json=small(seed=99)).json()
    for _ in range(600):
        if http.get(queued["status_url"]).status_code == 200:
            break
        time.sleep(0.05)

    async def one_realtime_frame() -> None:
        async with session(stack, test_ca) as ws:
            await ws.send(msgpack.packb(FRAME))
            await receive_result(ws)

    asyncio.run(one_realtime_frame())

    def delta(after: Scrape, name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    expected = {  # (metric, labels) -> at least this much more than before
        ("ray_diffusion_serve_requests_total", (*APP.items(), ("endpoint", "fal-ai/lora"), ("mode", "sync"), ("outcome", "ok"))): 8,
        ("ray_diffusion_serve_requests_total", (*APP.items(), ("endpoint", "fal-ai/lora"), ("mode", "sync"), ("outcome", "invalid"))): 1,
        ("ray_diffusion_serve_requests_total", (*APP.items(), ("endpoint", "fal-ai/lcm"), ("mode", "sync"), ("outcome", "ok"))): 1,
        ("ray_diffusion_serve_requests_total", (*APP.items(), ("endpoint", "fal-ai/lora"), ("mode", "queue"), ("outcome", "ok"))): 1,
        ("ray_diffusion_serve_requests_total", (*APP.items(), ("endpoint", "fal-ai/lcm/realtime"), ("mode", "realtime"), ("outcome", "ok"))): 1,
        ("ray_diffusion_serve_request_seconds_count", (*APP.items(), ("endpoint", "fal-ai/lora"), ("mode", "sync"))): 9,
        ("ray_diffusion_serve_request_seconds_count", (*APP.items(), ("endpoint", "fal-ai/lora"), ("mode", "queue"))): 1,
        ("ray_diffusion_serve_queue_wait_seconds_count", (*APP.items(), ("endpoint", "fal-ai/lora"))): 1,
        ("ray_diffusion_serve_inference_seconds_count", tuple(SD.items())): 1,
        ("ray_diffusion_serve_batch_size_count", tuple(SD.items())): 1,
        ("ray_diffusion_serve_images_total", tuple(SD.items())): 2 + 12 + 1,
        ("ray_diffusion_serve_images_total", (*APP.items(), ("deployment", "LCM"))): 2,  # the sync call and the realtime frame
        ("ray_diffusion_serve_model_loads_total", tuple(SD.items())): 1,
        ("ray_diffusion_serve_model_load_seconds_count", tuple(SD.items())): 1,
        ("ray_diffusion_serve_multiplex_lookups_total", (*SD.items(), ("result", "miss"))): 1,
        ("ray_diffusion_serve_multiplex_lookups_total", (*SD.items(), ("result", "hit"))): 1,
        ("ray_diffusion_serve_weights_cache_misses_total", ()): 1,
        ("ray_diffusion_serve_weights_cache_fetched_bytes_total", ()): len(lora),
    }
    deadline = time.monotonic() + 60
    while True:
        after = scrape(metrics_url)
        short = {key: (delta(after, key[0], **dict(key[1])), least) for key, least in expected.items() if delta(after, key[0], **dict(key[1])) < least}
        if not short:
            break
        assert time.monotonic() < deadline, f"metrics that did not move as far as the traffic: {short}"
        time.sleep(1)

    # Latencies and sizes are plausible, not just counted.
    assert delta(after, "ray_diffusion_serve_request_seconds_sum", endpoint="fal-ai/lora", mode="sync", **APP) > 0
    assert delta(after, "ray_diffusion_serve_inference_seconds_sum", **SD) > 0
    batches, jobs = delta(after, "ray_diffusion_serve_batch_size_count", **SD), delta(after, "ray_diffusion_serve_batch_size_sum", **SD)
    assert jobs >= batches >= 1  # a pipeline call holds one job or more
    assert after.has("ray_diffusion_serve_queue_depth", queue_app="fal-ai/lora", serving_deployment="StableDiffusion", **APP)
    assert after.value("ray_diffusion_serve_queue_depth", queue_app="fal-ai/flux-lora", serving_deployment="Flux", **APP) >= 0
    memory = [s.value for s in after.samples if s.name == "ray_diffusion_serve_device_memory_bytes" and s.labels.get("deployment") == "StableDiffusion"]
    assert memory and min(memory) > 50 * 2**20  # a replica with torch and a model loaded holds more than 50 MB
