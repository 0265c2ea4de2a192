"""The dispatcher on a real SQLite store, with stand-in endpoints (plain coroutines, no model):
progress into logs, results and errors as outcomes, cancel while running, lease loss and expiry,
start timeouts, and no job ever lost when a dispatcher dies.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import BaseModel

from serve_app.config import QueueSettings
from serve_app.errors import FalError, InputError
from serve_app.queue.dispatcher import Dispatcher, Endpoint
from serve_app.queue.sqlite_store import SqliteJobStore
from serve_app.queue.store import JobState, NewJob
from tests.private_redis import PrivateRedis, needs_redis_server

pytestmark = pytest.mark.asyncio(loop_scope="session")


class Body(BaseModel):
    steps: int = 3
    fail: str | None = None
    hold: bool = False


class Output(BaseModel):
    done: int


class FakeResult:
    inference_time_s = 0.25


class FakeRun:
    def __init__(self, steps: int) -> None:
        self.output = Output(done=steps)
        self.result = FakeResult()


class StandIn:
    """A stand-in model endpoint: reports `steps` steps, can fail, or hold until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.cancelled = 0
        self.runs: dict[str, int] = {}

    async def run(self, body: Body, base_url: str, request_id: str, progress) -> FakeRun:
        self.started.set()
        for step in range(1, body.steps + 1):
            await progress(step, body.steps)
        if body.fail == "input":
            raise InputError(["body", "steps"], "too many", "value_error")
        if body.fail == "fal":
            raise FalError(503, "replica went away", "runner_disconnected")
        if body.fail == "once":
            self.runs[request_id] = self.runs.get(request_id, 0) + 1
            if self.runs[request_id] == 1:
                raise FalError(503, "the model replica running this request went away; retry", "runner_disconnected")
        if body.fail == "bug":
            raise RuntimeError("boom")
        if body.hold:
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        return FakeRun(body.steps)


def settings(**overrides) -> QueueSettings:
    return QueueSettings(**{"lease_s": 0.6, "poll_interval_s": 0.01, "dispatch_slots": 2, **overrides})


@pytest.fixture
async def world(tmp_path):
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    stand_in = StandIn()
    endpoints = {"test/app": Endpoint(Body, stand_in.run)}
    dispatchers: list[Dispatcher] = []

    def dispatcher(name: str = "router-1", **overrides) -> Dispatcher:
        d = Dispatcher(store, endpoints, settings(**overrides), name)
        d.start()
        dispatchers.append(d)
        return d

    yield store, stand_in, dispatcher
    for d in dispatchers:
        await d.stop()
    await store.close()


async def submit(store, **body) -> str:
    record = await store.submit(NewJob(app="test/app", endpoint="test/app", payload=Body(**body).model_dump_json().encode(), key_id="k"))
    return record.request_id


async def completed(store, request_id: str, timeout: float = 10.0):
    for _ in range(int(timeout / 0.02)):
        record = await store.get(request_id)
        if record.state is JobState.COMPLETED:
            return record
        await asyncio.sleep(0.02)
    raise AssertionError(f"{request_id} never completed: {record}")


async def test_a_job_runs_with_progress_logs_metrics_and_its_output(world):
    store, _, dispatcher = world
    dispatcher()
    record = await completed(store, await submit(store, steps=3))
    assert record.status_code == 200 and json.loads(record.result) == {"done": 3}
    assert [e["message"] for e in record.logs] == ["step 1/3", "step 2/3", "step 3/3"]
    assert record.metrics == {"inference_time": 0.25}


@pytest.mark.parametrize("fail, code, error_type", [("input", 422, None), ("fal", 503, "runner_disconnected"), ("bug", 500, "internal_error")])
async def test_failures_become_the_jobs_result_in_fals_shapes(world, fail, code, error_type):
    store, _, dispatcher = world
    dispatcher()
    record = await completed(store, await submit(store, fail=fail))
    body = json.loads(record.result)
    assert record.status_code == code
    assert body["detail"][0]["loc"] == ["body", "steps"] if fail == "input" else body["error_type"] == error_type


async def test_a_job_whose_model_replica_died_runs_again(world):
    store, stand_in, dispatcher = world
    dispatcher()
    record = await completed(store, await submit(store, fail="once"))
    assert record.status_code == 200 and record.attempts == 2 and record.gateway_request_id != record.request_id


async def test_a_job_whose_model_replica_keeps_dying_ends_after_its_attempts_and_no_retry_at_once(world):
    store, _, dispatcher = world
    dispatcher(max_attempts=2)
    record = await completed(store, await submit(store, fail="fal"))
    assert record.status_code == 503 and record.attempts == 2
    once = await store.submit(NewJob(app="test/app", endpoint="test/app", payload=Body(fail="once").model_dump_json().encode(), key_id="k", no_retry=True))
    done = await completed(store, once.request_id)
    assert done.status_code == 503 and done.attempts == 1


async def test_a_payload_the_schema_refuses_is_a_422_result(world):
    store, _, dispatcher = world
    dispatcher()
    record = await store.submit(NewJob(app="test/app", endpoint="test/app", payload=b'{"steps": "many"}', key_id="k"))
    done = await completed(store, record.request_id)
    assert done.status_code == 422 and json.loads(done.result)["detail"][0]["loc"] == ["body", "steps"]


async def test_cancelling_a_running_job_stops_it_and_ends_it_with_499(world):
    store, stand_in, dispatcher = world
    dispatcher()
    request_id = await submit(store, hold=True)
    await asyncio.wait_for(stand_in.started.wait(), 5)
    assert await store.cancel(request_id) == "requested"
    record = await completed(store, request_id)
    assert record.status_code == 499 and json.loads(record.result)["error_type"] == "client_cancelled"
    assert stand_in.cancelled == 1  # the model call itself was cancelled, not left running


async def test_a_long_job_keeps_its_lease_past_the_lease_time(world):
    store, stand_in, dispatcher = world
    dispatcher(lease_s=0.3)
    request_id = await submit(store, hold=True)
    await asyncio.wait_for(stand_in.started.wait(), 5)
    await asyncio.sleep(1.0)  # three lease times
    record = await store.get(request_id)
    assert record.state is JobState.IN_PROGRESS and record.attempts == 1  # renewed, never requeued
    stand_in.release.set()
    assert (await completed(store, request_id)).status_code == 200


async def test_a_job_whose_router_died_runs_again_elsewhere(world):
    store, stand_in, dispatcher = world
    request_id = await submit(store, steps=2)
    await store.claim("dead-router", lease_s=0.2)  # claimed by a router that then died
    dispatcher("live-router")
    record = await completed(store, request_id)
    assert record.status_code == 200 and record.attempts == 2 and record.gateway_request_id != request_id


async def test_a_no_retry_job_whose_router_died_ends_with_503(world):
    store, _, dispatcher = world
    record = await store.submit(NewJob(app="test/app", endpoint="test/app", payload=b"{}", key_id="k", no_retry=True))
    await store.claim("dead-router", lease_s=0.2)
    dispatcher("live-router")
    done = await completed(store, record.request_id)
    assert done.status_code == 503 and json.loads(done.result)["error_type"] == "runner_disconnected" and done.attempts == 1


async def test_a_job_that_cannot_start_in_time_ends_with_504(world):
    store, _, dispatcher = world
    # No dispatcher serves this app, so the job waits past its start timeout.
    record = await store.submit(NewJob(app="other/app", endpoint="other/app", payload=b"{}", key_id="k", start_timeout_s=0.2))
    dispatcher()
    done = await completed(store, record.request_id)
    assert done.status_code == 504 and json.loads(done.result)["error_type"] == "request_timeout"


async def test_jobs_queued_while_no_dispatcher_ran_are_all_served_in_order(world):
    store, _, dispatcher = world
    ids = [await submit(store, steps=1) for _ in range(6)]
    dispatcher(dispatch_slots=1)
    records = [await completed(store, request_id) for request_id in ids]
    assert all(r.status_code == 200 for r in records)
    assert [r.request_id for r in sorted(records, key=lambda r: r.started_at)] == ids  # FIFO


@needs_redis_server
async def test_every_job_ends_when_redis_is_killed_and_restarted_under_running_jobs(tmp_path):
    """A private Redis (append-only file on) dies with SIGKILL while jobs run and while more wait,
    and comes back a second later: renewals, claims and final writes that failed meanwhile are
    tried again, no dispatcher slot dies, and every job ends with its output."""
    from serve_app.queue.redis_store import RedisJobStore

    server = PrivateRedis(tmp_path).start()
    store = RedisJobStore(server.url)
    stand_in = StandIn()
    dispatcher = Dispatcher(store, {"test/app": Endpoint(Body, stand_in.run)}, settings(lease_s=1.0, dispatch_slots=2), "router-1")
    try:
        held = [await submit(store, hold=True) for _ in range(2)]  # both slots busy
        waiting = [await submit(store, steps=2) for _ in range(3)]
        dispatcher.start()
        await asyncio.wait_for(stand_in.started.wait(), 5)
        await asyncio.sleep(0.2)
        server.kill()
        stand_in.release.set()  # the held jobs end while Redis is down: their outcomes must wait
        await asyncio.sleep(1.0)
        server.start()
        later = [await submit(store, steps=1) for _ in range(2)]  # both slots still serve
        records = [await completed(store, request_id, timeout=30) for request_id in held + waiting + later]
        assert [r.status_code for r in records] == [200] * 7, [(r.status_code, r.result) for r in records]
    finally:
        await dispatcher.stop()
        await store.close()
        server.kill()


async def test_a_woken_dispatcher_claims_at_once_rather_than_at_its_next_poll(world):
    """The router that queues a job wakes its own dispatcher: with polls 60 s apart, the job still
    runs as soon as it is queued. (An idle claimer's polls also back off, to 4x the interval.)"""
    store, _, dispatcher = world
    d = dispatcher(poll_interval_s=60.0)
    await asyncio.sleep(0.1)  # the claimer found nothing and is waiting out its poll
    request_id = await submit(store, steps=2)
    d.wake()
    assert (await completed(store, request_id, timeout=10.0)).status_code == 200
    assert d.claimer.max_interval_s == 240.0
