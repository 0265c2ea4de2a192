"""The autoscaling policies' decisions, on Serve's own `AutoscalingContext` and config and a real
SQLite job store: the queue-aware policy counts the jobs waiting for its deployment's apps (and
only those) on top of the requests in flight, wakes a deployment at zero for a queued job, and
keeps its last figure when the store cannot be read; the router's policy follows CPU load, and
requests in flight, whichever asks for more. (The whole loop, on a cluster: test_autoscaling.py.)
"""

from __future__ import annotations

import asyncio

import pytest
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from serve_app.autoscaling import CPU_METRIC, QueueAwarePolicy, RouterCpuPolicy
from serve_app.queue.sqlite_store import SqliteJobStore
from serve_app.queue.store import NewJob
from tests.private_redis import PrivateRedis, needs_redis_server

ASYNC = pytest.mark.asyncio(loop_scope="session")


def context(replicas: int, in_flight: float, target: float = 2.0, metrics: dict | None = None) -> AutoscalingContext:
    return AutoscalingContext(
        deployment_id=None, deployment_name="StableDiffusion", app_name="diffusion-serve",
        current_num_replicas=replicas, target_num_replicas=replicas, running_replicas=[],
        total_num_requests=in_flight, total_queued_requests=0.0, aggregated_metrics=metrics or {}, raw_metrics={},
        capacity_adjusted_min_replicas=0, capacity_adjusted_max_replicas=10, policy_state={},
        last_scale_up_time=None, last_scale_down_time=None, current_time=None,
        config=AutoscalingConfig(min_replicas=0, max_replicas=10, target_ongoing_requests=target),
    )


async def decide(policy: QueueAwarePolicy, ctx: AutoscalingContext) -> float:
    """Two ticks, as the controller makes them: the first starts the queue read, the second uses it."""
    policy(ctx)
    for _ in range(100):
        await asyncio.sleep(0.01)
        if policy._task is None or policy._task.done():
            break
    policy._last_poll = 0.0
    desired, state = policy(ctx)
    assert state["queued_jobs"] == policy.queued
    return desired


async def queue(store, app: str, n: int) -> None:
    for _ in range(n):
        await store.submit(NewJob(app=app, endpoint=app, payload=b"{}", key_id="k"))


@ASYNC
async def test_waiting_jobs_of_the_deployments_apps_count_on_top_of_requests_in_flight(tmp_path):
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    await queue(store, "fal-ai/lora", 10)
    await queue(store, "fal-ai/flux-lora", 30)  # another deployment's backlog: not ours
    policy = QueueAwarePolicy(f"sqlite://{tmp_path / 'jobs.sqlite3'}", ["fal-ai/lora"], poll_interval_s=0.0)
    assert await decide(policy, context(replicas=1, in_flight=4)) == (4 + 10) / 2
    assert QueueAwarePolicy("sqlite:///unused", ["fal-ai/lora"])(context(replicas=2, in_flight=4))[0] == 2.0  # nothing queued: Serve's figure
    await store.close()


@ASYNC
async def test_a_deployment_at_zero_wakes_for_a_queued_job_and_stays_at_zero_without_one(tmp_path):
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    policy = QueueAwarePolicy(f"sqlite://{tmp_path / 'jobs.sqlite3'}", ["fal-ai/flux-lora"], poll_interval_s=0.0)
    assert await decide(policy, context(replicas=0, in_flight=0)) == 0.0
    await queue(store, "fal-ai/flux-lora", 1)
    assert await decide(policy, context(replicas=0, in_flight=0)) == 1.0
    await store.close()


@ASYNC
async def test_an_unreadable_store_leaves_the_last_figure(tmp_path):
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    await queue(store, "fal-ai/lora", 6)
    policy = QueueAwarePolicy(f"sqlite://{tmp_path / 'jobs.sqlite3'}", ["fal-ai/lora"], poll_interval_s=0.0)
    assert await decide(policy, context(replicas=1, in_flight=0)) == 3.0

    class Broken:
        async def depth(self, app):
            raise ConnectionError("the store is restarting")

    policy._store = Broken()
    assert await decide(policy, context(replicas=1, in_flight=0)) == 3.0
    await store.close()


def test_the_router_scales_on_cpu_or_on_requests_whichever_asks_for_more():
    policy = RouterCpuPolicy(target_utilization=0.5)
    busy = context(replicas=2, in_flight=10, target=64, metrics={CPU_METRIC: {"r1": 0.9, "r2": 0.8}})
    assert policy(busy)[0] == pytest.approx(1.7 / 0.5)
    idle = context(replicas=2, in_flight=10, target=64, metrics={CPU_METRIC: {"r1": 0.05, "r2": 0.05}})
    assert policy(idle)[0] == pytest.approx(0.2)  # Serve's bounds keep min_replicas
    flooded = context(replicas=1, in_flight=256, target=64, metrics={CPU_METRIC: {"r1": 0.1}})
    assert policy(flooded)[0] == 4.0
    with pytest.raises(ValueError):
        RouterCpuPolicy(target_utilization=1.5)


@needs_redis_server
@ASYNC
async def test_the_queue_aware_policy_reads_a_password_protected_redis_with_the_password_from_the_environment(tmp_path, monkeypatch):
    from serve_app.config import STORE_PASSWORD_ENV
    from serve_app.queue.redis_store import RedisJobStore

    server = PrivateRedis(tmp_path, password="pw-for-the-controller").start()
    try:
        store = RedisJobStore(server.url, password="pw-for-the-controller")
        await queue(store, "fal-ai/lora", 6)
        await store.close()
        without = QueueAwarePolicy(server.url, ["fal-ai/lora"], poll_interval_s=0.0)
        assert await decide(without, context(replicas=1, in_flight=0)) == 0 / 2  # refused: the last figure, none
        monkeypatch.setenv(STORE_PASSWORD_ENV, "pw-for-the-controller")
        policy = QueueAwarePolicy(server.url, ["fal-ai/lora"], poll_interval_s=0.0)  # the controller's environment
        assert await decide(policy, context(replicas=1, in_flight=0)) == 6 / 2
        await policy._store.close()
    finally:
        server.kill()
