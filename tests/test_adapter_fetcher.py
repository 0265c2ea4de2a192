"""The AdapterFetcher downloads each adapter once per cluster, whichever replicas ask."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
import ray
from ray import serve

from deployments.tiny_models import ensure_tiny_model
from tests.conftest import IMAGE_HOST

pytestmark = pytest.mark.slow


def lora_bytes(name: str) -> bytes:
    return next(ensure_tiny_model(name).glob("*.safetensors")).read_bytes()


@ray.remote(num_cpus=0)
def replica_like_fetch(fetcher, node_dir: str, url: str, copies: int, force_other_node: bool = False, node_cache_bytes: int = 10**9) -> list[str]:
    """What a model replica does: ask through ClusterWeights, from its own process and node cache."""
    from deployments.adapters import ClusterWeights
    from deployments.common.weights_cache import WeightsCache
    from serve_app.url_guard import NetworkPolicy

    cache = WeightsCache(node_dir, NetworkPolicy(allowed_networks=[f"{IMAGE_HOST}/32"]), node_cache_bytes, 10**8)
    weights = ClusterWeights(fetcher, cache)
    if force_other_node:
        weights.node_id = "some-other-node"  # as if the fetcher lived elsewhere: bytes are pulled

    async def run():
        return await asyncio.gather(*(weights.get(url, ("loras", 0, "path")) for _ in range(copies)))

    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in asyncio.run(run())]


@pytest.fixture()
def fetcher(stack):
    return serve.get_deployment_handle("AdapterFetcher", app_name="diffusion-serve")


def test_two_processes_asking_at_once_cause_one_download(fetcher, image_server, tmp_path):
    url = image_server.add("/fetcher/once.safetensors", lora_bytes("sd15-lora-b"), "application/octet-stream")
    results = ray.get([replica_like_fetch.remote(fetcher, str(tmp_path / f"node{i}"), url, 8) for i in range(2)])
    assert image_server.hits["/fetcher/once.safetensors"] == 1
    assert {d for r in results for d in r} == {hashlib.sha256(lora_bytes("sd15-lora-b")).hexdigest()}


def test_a_replica_on_another_node_pulls_the_bytes_once(fetcher, image_server, tmp_path):
    url = image_server.add("/fetcher/far.safetensors", lora_bytes("sd15-lora-a"), "application/octet-stream")
    (digests,) = ray.get([replica_like_fetch.remote(fetcher, str(tmp_path / "far-node"), url, 3, True)])
    assert set(digests) == {hashlib.sha256(lora_bytes("sd15-lora-a")).hexdigest()}
    assert image_server.hits["/fetcher/far.safetensors"] == 1
    assert len([p for p in (tmp_path / "far-node").iterdir() if p.suffix == ".safetensors"]) == 1


def test_the_fetcher_reads_only_its_own_files(fetcher):
    with pytest.raises(Exception, match="only fetched weights"):
        fetcher.read.remote("/etc/passwd", 0, 100).result()


def test_fetch_errors_reach_the_caller_with_the_field(fetcher):
    from deployments.common.jobs import JobInputError

    with pytest.raises(JobInputError) as err:
        fetcher.fetch.remote("http://10.0.0.1/x.safetensors", ("loras", 2, "path"), "x").result()
    assert err.value.field == ("loras", 2, "path") and err.value.type == "url_forbidden"


def test_the_fetcher_reports_its_cache_counters(fetcher, image_server, tmp_path):
    before = fetcher.stats.remote().result()
    url = image_server.add("/fetcher/stats.safetensors", lora_bytes("sd15-lora-kohya"), "application/octet-stream")
    ray.get([replica_like_fetch.remote(fetcher, str(tmp_path / "stats-node"), url, 1)])
    ray.get([replica_like_fetch.remote(fetcher, str(tmp_path / "stats-node-2"), url, 1)])
    after = fetcher.stats.remote().result()
    assert after["misses"] - before["misses"] == 1 and after["hits"] - before["hits"] >= 1
    assert after["bytes_fetched"] - before["bytes_fetched"] == len(lora_bytes("sd15-lora-kohya"))


def test_an_evicted_adapter_is_fetched_again(stack, image_server, tmp_path):
    """A cluster whose caches hold one adapter at a time: asking for A, B, then A downloads A twice,
    and every answer is the right file."""
    from deployments.adapters import AdapterFetcher

    a, b = lora_bytes("sd15-lora-a"), lora_bytes("sd15-lora-b")
    budget = max(len(a), len(b)) * 3 // 2
    config = {
        "network": {"allowed_networks": [f"{IMAGE_HOST}/32"]},
        "weights": {"cache_dir": str(tmp_path / "small-fetcher"), "max_cache_bytes": budget},
    }
    small = serve.run(AdapterFetcher.options(name="SmallFetcher").bind(config), name="small-fetcher", route_prefix=None)
    try:
        urls = [image_server.add(f"/fetcher/evict-{name}.safetensors", data, "application/octet-stream") for name, data in (("a", a), ("b", b))]
        for url, data in [(urls[0], a), (urls[1], b), (urls[0], a)]:
            (digests,) = ray.get([replica_like_fetch.remote(small, str(tmp_path / "node"), url, 1, False, budget)])
            assert digests == [hashlib.sha256(data).hexdigest()]
        assert image_server.hits["/fetcher/evict-a.safetensors"] == 2
        assert image_server.hits["/fetcher/evict-b.safetensors"] == 1
        assert small.stats.remote().result()["evictions"] >= 2
    finally:
        serve.delete("small-fetcher")
