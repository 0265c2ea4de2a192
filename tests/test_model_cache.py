"""A replica's base-model LRU loads each model once, never caches failures, and evicts the coldest."""

from __future__ import annotations

import asyncio

import pytest

from deployments.common.model_cache import ModelCache


async def test_concurrent_requests_for_a_new_model_load_it_once():
    calls = []

    async def load(key: str) -> str:
        calls.append(key)
        await asyncio.sleep(0.05)
        return f"model {key}"

    cache = ModelCache(2, load)
    results = await asyncio.gather(*(cache.get("a") for _ in range(10)))
    assert results == ["model a"] * 10 and calls == ["a"]


async def test_a_failed_load_is_not_cached():
    attempts = []

    async def load(key: str) -> str:
        attempts.append(key)
        if len(attempts) == 1:
            raise ValueError("weights not found")
        return "ok"

    cache = ModelCache(2, load)
    with pytest.raises(ValueError):
        await cache.get("a")
    assert await cache.get("a") == "ok" and len(attempts) == 2


async def test_the_least_recently_used_model_is_evicted():
    evictions = []

    async def load(key: str) -> str:
        return key

    cache = ModelCache(2, load, on_evict=lambda: evictions.append(1))
    await cache.get("a")
    await cache.get("b")
    await cache.get("a")  # b is now the coldest
    await cache.get("c")
    assert "a" in cache and "c" in cache and "b" not in cache and evictions == [1]
