"""The product's Prometheus metrics, in one place so that code, dashboard and README agree.

They are Ray Serve metrics (`ray.serve.metrics`): every process records its own, Ray's metrics
agent on each node exports them (prefixed `ray_`, counters suffixed `_total`) at the node's
metrics port, and Serve adds `deployment`, `replica` and `application` tags. Outside a Ray worker
(unit tests, scripts) they are no-ops. Label values are bounded sets (endpoint ids, outcomes,
never model names or URLs a client sent), so a busy cluster cannot blow up the series count.

| metric | kind | labels | recorded by |
|---|---|---|---|
| diffusion_serve_requests | counter | endpoint, mode (sync, queue, realtime), outcome | router |
| diffusion_serve_request_seconds | histogram | endpoint, mode | router (sync: the call; queue: submit to completion) |
| diffusion_serve_queue_wait_seconds | histogram | endpoint | router (submit to start) |
| diffusion_serve_queue_depth | gauge | queue_app, serving_deployment | router (jobs waiting in the store) |
| diffusion_serve_inference_seconds | histogram | | model replica (one pipeline call) |
| diffusion_serve_batch_size | histogram | | model replica (jobs in one pipeline call) |
| diffusion_serve_images | counter | | model replica |
| diffusion_serve_model_loads | counter | | model replica |
| diffusion_serve_model_load_seconds | histogram | | model replica |
| diffusion_serve_multiplex_lookups | counter | result (hit, miss) | model replica (was the base model already loaded?) |
| diffusion_serve_device_memory_bytes | gauge | device | model replica |
| diffusion_serve_weights_cache_* | counters, histogram | cache | weights caches (adapters; see weights_cache.py) |
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("diffusion_serve.metrics")

LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800]
BATCH_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64]
LOAD_BUCKETS = [0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600]


class _NoOp:
    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None: ...

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None: ...

    def set(self, value: float, tags: dict[str, str] | None = None) -> None: ...


def _metric(kind: str, name: str, description: str, tag_keys: tuple[str, ...] = (), **options: Any):
    try:
        import ray

        if ray.is_initialized():
            from ray.serve import metrics

            return getattr(metrics, kind)(name, description=description, tag_keys=tag_keys or None, **options)
    except Exception:  # noqa: BLE001 - metrics must never break serving
        logger.warning("metric %s unavailable", name, exc_info=True)
    return _NoOp()


@dataclass(frozen=True)
class Metrics:
    requests: Any
    request_seconds: Any
    queue_wait_seconds: Any
    queue_depth: Any
    inference_seconds: Any
    batch_size: Any
    images: Any
    model_loads: Any
    model_load_seconds: Any
    multiplex_lookups: Any
    device_memory_bytes: Any


@functools.cache
def metrics() -> Metrics:
    """This process's metrics, made on first use (inside the replica, after Ray is up)."""
    return Metrics(
        requests=_metric("Counter", "diffusion_serve_requests", "requests by endpoint, way in and outcome", ("endpoint", "mode", "outcome")),
        request_seconds=_metric(
            "Histogram", "diffusion_serve_request_seconds", "end-to-end latency: a sync call, or a queued job from submit to completion",
            ("endpoint", "mode"), boundaries=LATENCY_BUCKETS,
        ),
        queue_wait_seconds=_metric(
            "Histogram", "diffusion_serve_queue_wait_seconds", "time a queued job waited before it started", ("endpoint",), boundaries=LATENCY_BUCKETS
        ),
        queue_depth=_metric("Gauge", "diffusion_serve_queue_depth", "jobs waiting in the durable queue", ("queue_app", "serving_deployment")),
        inference_seconds=_metric("Histogram", "diffusion_serve_inference_seconds", "one pipeline call on a model replica", boundaries=LATENCY_BUCKETS),
        batch_size=_metric("Histogram", "diffusion_serve_batch_size", "jobs in one pipeline call", boundaries=BATCH_BUCKETS),
        images=_metric("Counter", "diffusion_serve_images", "images made"),
        model_loads=_metric("Counter", "diffusion_serve_model_loads", "base models loaded into a replica"),
        model_load_seconds=_metric("Histogram", "diffusion_serve_model_load_seconds", "time to load a base model", boundaries=LOAD_BUCKETS),
        multiplex_lookups=_metric(
            "Counter", "diffusion_serve_multiplex_lookups", "a request's base model on the replica it reached: hit (loaded) or miss", ("result",)
        ),
        device_memory_bytes=_metric(
            "Gauge", "diffusion_serve_device_memory_bytes", "memory a model replica holds: CUDA allocated, or the process's resident set on CPU", ("device",)
        ),
    )


def record_request(endpoint: str, mode: str, outcome: str, seconds: float | None = None) -> None:
    """One request's end: its count by outcome and, when given, its end-to-end latency."""
    tags = {"endpoint": endpoint, "mode": mode}
    metrics().requests.inc(tags={**tags, "outcome": outcome})
    if seconds is not None:
        metrics().request_seconds.observe(seconds, tags=tags)


def outcome_of(status_code: int) -> str:
    """A bounded label for an HTTP status."""
    if status_code < 400:
        return "ok"
    return {401: "unauthorized", 404: "not_found", 422: "invalid", 429: "rejected", 499: "cancelled", 504: "timeout"}.get(
        status_code, "client_error" if status_code < 500 else "error"
    )
