"""Admission: a full queue answers submits with 429 and `Retry-After` (fal's clients retry them),
and synchronous runs pass the same running limit as queued jobs: a key at
`queue.max_running_per_key` (its queued jobs running anywhere plus its sync calls on this
router) gets 429 on a sync call; other keys, and the key's non-running requests, pass.

The router's real admission middleware runs here in front of a stand-in app (a route that holds
until released, in place of a model), on a real SQLite job store.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from serve_app.auth import Authenticator, Caller, hash_key
from serve_app.config import AuthSettings, NetworkPolicy, QueueSettings
from serve_app.errors import FalError
from serve_app.queue.dispatcher import Endpoint
from serve_app.queue.service import QueueService
from serve_app.queue.sqlite_store import SqliteJobStore
from serve_app.queue.store import NewJob
from serve_app.queue.sync_admission import SyncRunLimit
from serve_app.router import AuthMiddleware

pytestmark = pytest.mark.asyncio(loop_scope="session")

ALICE, BOB = "alice:s3cret", "bob:s3cret"


@pytest.fixture
async def store(tmp_path):
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    yield store
    await store.close()


async def run_queued_job(store, key_id: str) -> None:
    await store.submit(NewJob(app="fal-ai/lora", endpoint="fal-ai/lora", payload=b"{}", key_id=key_id))
    assert (await store.claim("router-1", lease_s=30)).key_id == key_id


async def test_a_full_queue_refuses_submits_with_429_and_retry_after(store):
    from serve_app.schemas.lora import LoraTextToImageInput

    queue = QueueService(store, {"fal-ai/lora": Endpoint(LoraTextToImageInput, None)}, QueueSettings(max_queued=4, max_queued_per_key=2), NetworkPolicy())
    body = b'{"model_name": "runwayml/stable-diffusion-v1-5", "prompt": "a cat"}'

    async def submit(key_id: str):
        return await queue.submit("fal-ai/lora", body, {}, {}, Caller(key_id), "http://router")

    for key_id in ("alice", "alice", "bob"):
        assert (await submit(key_id)).status_code == 200
    refusals = []
    for key_id in ("alice", "bob", "carol"):  # alice is at her own limit; bob's job fills the queue
        try:
            assert (await submit(key_id)).status_code == 200
        except FalError as refused:
            refusals.append((key_id, refused))
    assert [key_id for key_id, _ in refusals] == ["alice", "carol"]
    for (_, refused), reason in zip(refusals, ("this key", "full"), strict=True):
        assert refused.status_code == 429 and refused.headers["Retry-After"].isdigit() and reason in refused.detail


async def test_a_key_at_its_limit_is_refused_and_others_pass(store):
    limit = SyncRunLimit(store, max_running_per_key=2)
    alice, bob = Caller("alice"), Caller("bob")
    await run_queued_job(store, "alice")  # one queued job running somewhere in the cluster
    await limit.enter(alice)  # and one sync call here: two, the limit
    with pytest.raises(FalError) as refused:
        await limit.enter(alice)
    assert refused.value.status_code == 429 and refused.value.headers["Retry-After"] == "1" and "queue" in refused.value.detail
    await limit.enter(bob)
    await limit.leave(alice)
    await limit.enter(alice)  # a place came free
    assert limit.in_flight("alice") == 1 and limit.in_flight("bob") == 1


async def test_router_replicas_on_one_store_share_a_keys_running_limit(store):
    """Two replicas (two SyncRunLimits) on one store: the key's limit is the key's, not each
    replica's; a replica that dies (stops renewing) stops counting once its calls expire."""
    first, second = (SyncRunLimit(store, max_running_per_key=2, holder=name, ttl_s=0.6) for name in ("router-1", "router-2"))
    alice = Caller("alice")
    await first.enter(alice)
    await second.enter(alice)
    with pytest.raises(FalError):
        await first.enter(alice)
    with pytest.raises(FalError):
        await second.enter(alice)
    await second.leave(alice)
    await first.enter(alice)  # the place second gave back
    first._renewer.cancel()  # first dies with two calls in flight: nothing renews them
    await asyncio.sleep(0.8)
    await second.enter(alice)
    await second.enter(alice)
    assert second.in_flight("alice") == 2


async def test_without_a_limit_nothing_is_counted(store):
    limit = SyncRunLimit(store, max_running_per_key=None)
    for _ in range(50):
        await limit.enter(Caller("alice"))
    assert limit.in_flight("alice") == 0


@pytest.fixture
async def router_front(store):
    """The admission middleware in front of a stand-in app whose sync route holds until released."""
    release = asyncio.Event()
    started = asyncio.Semaphore(0)

    async def hold(request):
        started.release()
        await release.wait()
        return JSONResponse({"done": True})

    async def status(request):
        return JSONResponse({"status": "IN_QUEUE"})

    app = Starlette(routes=[Route("/fal-ai/lora", hold, methods=["POST"]), Route("/queue/fal-ai/lora/requests/x/status", status)])
    app.add_middleware(AuthMiddleware)
    app.state.authenticator = Authenticator(AuthSettings(keys=[{"id": "alice", "sha256": hash_key(ALICE)}, {"id": "bob", "sha256": hash_key(BOB)}]))
    app.state.sync_runs = SyncRunLimit(store, max_running_per_key=1)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as client:
        yield client, started, release


async def test_over_http_a_second_sync_call_of_a_key_is_429_until_the_first_ends(router_front):
    client, started, release = router_front
    alice, bob = {"Authorization": f"Key {ALICE}"}, {"Authorization": f"Key {BOB}"}
    first = asyncio.create_task(client.post("/fal-ai/lora", headers=alice, json={}))
    await started.acquire()
    second = await client.post("/fal-ai/lora", headers=alice, json={})
    assert second.status_code == 429 and second.headers["retry-after"] == "1"
    assert second.json()["error_type"] == "rate_limited" and "limit" in second.json()["detail"]
    assert (await client.get("/queue/fal-ai/lora/requests/x/status", headers=alice)).status_code == 200  # polls are not runs
    other = asyncio.create_task(client.post("/fal-ai/lora", headers=bob, json={}))
    await started.acquire()  # bob's call runs beside alice's
    release.set()
    assert (await first).status_code == 200 and (await other).status_code == 200
    assert (await client.post("/fal-ai/lora", headers=alice, json={})).status_code == 200  # her place came free


async def test_a_store_that_cannot_be_reached_lets_sync_calls_through():
    class DownStore:
        async def enter_sync_run(self, *args):
            raise ConnectionError("redis is down")

        async def leave_sync_run(self, *args):
            raise ConnectionError("redis is down")

        async def renew_sync_runs(self, *args):
            raise ConnectionError("redis is down")

    limit = SyncRunLimit(DownStore(), max_running_per_key=1)
    await limit.enter(Caller("alice"))
    await limit.leave(Caller("alice"))  # neither refused nor raised: serving beats limiting here
    assert limit.in_flight("alice") == 0
