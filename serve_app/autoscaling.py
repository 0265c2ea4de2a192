"""Autoscaling policies that see more than the few requests in flight.

Serve's default policy scales a deployment by the requests its handles have in flight. Ours put
most work in the durable queue: a router's dispatcher holds at most `dispatch_slots` jobs in flight
per router replica, and the rest wait in the store, invisible to Serve. `QueueAwarePolicy` adds
the jobs waiting for a deployment's apps to its in-flight requests, so a backlog of a thousand
jobs asks for `max_replicas`, not for what sixteen would. `RouterCpuPolicy` scales the router on
its CPU load (what limits a router is parsing, validation, image encoding and status polls),
reported by each router replica through `record_autoscaling_stats`.

Both run inside Serve's controller, which calls them every control-loop tick (0.1 s); Serve
applies min/max replicas, the up/downscale delays and smoothing to what they return. The queue is
read in a one-shot task at most every `poll_interval_s`, never in the tick itself. Configure them
per deployment in the Serve config:

    autoscaling_config:
      target_ongoing_requests: 8          # jobs (in flight + waiting) per replica
      policy:
        policy_function: serve_app.autoscaling:QueueAwarePolicy
        policy_kwargs: {store_url: "redis://...", apps: ["fal-ai/lora"]}
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

logger = logging.getLogger("ray.serve")

CPU_METRIC = "cpu_utilization"


def _replicas_for(workload: float, target_per_replica: float, current: int) -> float:
    if current == 0:
        return 1.0 if workload > 0 else 0.0  # from zero: one replica first, then by its load
    return workload / target_per_replica


class QueueAwarePolicy:
    """Replicas for a model deployment's work: its handles' requests in flight plus the jobs
    waiting for its apps in the job store, `target_ongoing_requests` per replica. It runs in the
    Serve controller, which reads the store's password from the environment (the head's)."""

    def __init__(self, store_url: str, apps: list[str], poll_interval_s: float = 1.0) -> None:
        self.store_url = store_url
        self.apps = list(apps)
        self.poll_interval_s = poll_interval_s
        self.queued = 0
        self._store = None
        self._task: asyncio.Task | None = None
        self._last_poll = 0.0

    async def _poll(self) -> None:
        try:
            if self._store is None:
                from serve_app.config import STORE_PASSWORD_ENV
                from serve_app.queue import open_store

                self._store = open_store(self.store_url, os.environ.get(STORE_PASSWORD_ENV) or None)
            self.queued = sum([await self._store.depth(app) for app in self.apps])
        except Exception as exc:  # noqa: BLE001 - keep the last figure; Serve's own count still applies
            logger.warning("queue-aware autoscaling: cannot read the queue depth of %s: %s", self.apps, exc)

    def _refresh(self) -> None:
        if self._task is not None and self._task.done():
            self._task = None
        now = time.monotonic()
        if self._task is None and now - self._last_poll >= self.poll_interval_s:
            self._last_poll = now
            self._task = asyncio.get_running_loop().create_task(self._poll())

    def __call__(self, ctx) -> tuple[float, dict[str, Any]]:
        self._refresh()
        workload = ctx.total_num_requests + self.queued
        desired = _replicas_for(workload, ctx.config.get_target_ongoing_requests(), ctx.current_num_replicas)
        return desired, {"queued_jobs": self.queued, "in_flight": ctx.total_num_requests}


class RouterCpuPolicy:
    """Router replicas for their CPU load: the sum of their utilizations (each a fraction of the
    CPUs it was given) over `target_utilization`, or their in-flight requests over
    `target_ongoing_requests`, whichever asks for more."""

    def __init__(self, target_utilization: float = 0.6) -> None:
        if not 0 < target_utilization <= 1:
            raise ValueError("target_utilization must be in (0, 1]")
        self.target_utilization = target_utilization

    def __call__(self, ctx) -> tuple[float, dict[str, Any]]:
        utilizations = (ctx.aggregated_metrics or {}).get(CPU_METRIC, {})
        busy = sum(utilizations.values())
        by_cpu = busy / self.target_utilization
        by_requests = ctx.total_num_requests / ctx.config.get_target_ongoing_requests()
        desired = max(by_cpu, by_requests, 1.0 if ctx.current_num_replicas == 0 else 0.0)
        return desired, {"cpu_busy": busy}


class CpuGauge:
    """This process's CPU use since the last reading, as a fraction of the CPUs Ray gave it
    (what a router replica reports for `RouterCpuPolicy`)."""

    def __init__(self) -> None:
        import psutil
        import ray

        self._process = psutil.Process()
        self._process.cpu_percent(None)  # the first reading starts the interval
        try:
            self._cpus = max(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0), 0.1)
        except Exception:  # noqa: BLE001 - outside a Ray worker
            self._cpus = 1.0

    def utilization(self) -> float:
        return self._process.cpu_percent(None) / 100.0 / self._cpus
