"""The AdapterFetcher deployment: every adapter or checkpoint file is downloaded once per cluster.

Model replicas do not download weights themselves. They ask the fetcher, a single CPU
replica that de-duplicates concurrent requests for the same source, fetches through the SSRF
guard, validates and stores by content digest. A model replica on the same node then hard-links
the file into its node cache (no copy); one on another node pulls the bytes once, in chunks, into
its own node cache. Data URIs need no network and stay with the replica.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import serve

from deployments.common.weights_cache import WeightsCache, file_digest, resolve_weights_file
from serve_app.config import AppConfig

CHUNK_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class FetchedFile:
    digest: str
    size: int
    path: str  # on the fetcher's node
    node_id: str


@serve.deployment(name="AdapterFetcher", num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
class AdapterFetcher:
    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.config = AppConfig.from_args(config)
        w = self.config.weights
        self.cache = WeightsCache(w.cache_dir / "fetched", self.config.network, w.max_cache_bytes, w.max_file_bytes, w.download_timeout_s, w.allow_pickle)
        self.node_id = ray.get_runtime_context().get_node_id()

    async def fetch(self, source: str, field: tuple, default_file: str) -> FetchedFile:
        path = await resolve_weights_file(source, field, self.cache, default_file)
        digest = await asyncio.to_thread(file_digest, path)
        return FetchedFile(digest, path.stat().st_size, str(path), self.node_id)

    async def read(self, path: str, offset: int, length: int) -> bytes:
        """A chunk of a fetched file, for replicas on other nodes."""
        resolved = Path(path).resolve()
        if resolved.parent != self.cache.directory.resolve():
            raise PermissionError("only fetched weights can be read")
        with open(resolved, "rb") as f:
            f.seek(offset)
            return f.read(min(length, CHUNK_BYTES))

    def stats(self) -> dict[str, float]:
        """The fetcher's cache counters (also exported to Prometheus through Ray's metrics agent)."""
        return dict(self.cache.metrics.counts)


class ClusterWeights:
    """The model replicas' side: sources go through the AdapterFetcher, files land on this node."""

    def __init__(self, fetcher, node_cache: WeightsCache) -> None:
        self.fetcher = fetcher
        self.node_cache = node_cache
        self.node_id = ray.get_runtime_context().get_node_id()

    async def get(self, source: str, field: tuple, default_file: str = "pytorch_lora_weights.safetensors") -> Path:
        if source.startswith("data:"):
            return await resolve_weights_file(source, field, self.node_cache, default_file)
        cached = self.node_cache.cached(source)
        if cached is not None:
            return cached
        info: FetchedFile = await self.fetcher.fetch.remote(source, field, default_file)
        local = self.node_cache.path_of(info.digest)
        if local is None and info.node_id == self.node_id:
            local = self.node_cache.link_in(source, Path(info.path), info.digest, info.size)
        if local is None:
            local = await self._pull(source, info, field)
        return local

    async def _pull(self, source: str, info: FetchedFile, field: tuple) -> Path:
        """Copy a file the fetcher holds on another node into this node's cache."""
        fd, name = tempfile.mkstemp(prefix=".pull-", dir=self.node_cache.directory)
        with os.fdopen(fd, "wb") as f:
            for offset in range(0, info.size, CHUNK_BYTES):
                f.write(await self.fetcher.read.remote(info.path, offset, CHUNK_BYTES))
        return await self.node_cache._admit(Path(name), info.digest, info.size, source, field, shown=source.split("?")[0])
