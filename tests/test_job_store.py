"""The durable job store's contract, run against SQLite and against the real Redis at 127.0.0.1:6379.

Order (FIFO within a priority, low behind normal, exact positions), leases (claim, renew, expiry
and retry with a new gateway id; no retry when asked), only the lease holder finishes a job,
cancel in each state, start deadlines, per-key limits, purging, durability across reopening, and
webhook deliveries (created with the completion, leased, retried, kept from purging while pending).
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import pytest_asyncio

from serve_app.queue.store import CANCELLED, AdmissionLimits, JobState, NewJob, Outcome, QueueFull
from tests.private_redis import PrivateRedis, needs_redis_server


def redis_answers() -> bool:
    import redis

    try:
        return bool(redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1).ping())
    except redis.exceptions.RedisError:
        return False


REDIS = redis_answers()
pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.skipif(not REDIS, reason="no Redis at 127.0.0.1:6379"))])
def reopen(request, tmp_path):
    """A function that opens (another handle on) the same store."""
    if request.param == "sqlite":
        from serve_app.queue.sqlite_store import SqliteJobStore

        yield lambda: SqliteJobStore(tmp_path / "jobs.sqlite3")
        return
    import redis

    from serve_app.queue.redis_store import RedisJobStore

    prefix = f"test-{uuid.uuid4().hex[:8]}:"  # a namespace per test on the shared server
    yield lambda: RedisJobStore("redis://127.0.0.1:6379/0", prefix=prefix)
    client = redis.Redis(host="127.0.0.1", port=6379)
    for key in client.scan_iter(match=f"{prefix}*"):
        client.delete(key)


@pytest_asyncio.fixture(loop_scope="session")
async def store(reopen):
    store = reopen()
    yield store
    await store.close()


def job(app: str = "fal-ai/lora", key: str = "alice", **fields) -> NewJob:
    return NewJob(app=app, endpoint=fields.pop("endpoint", app), payload=fields.pop("payload", b'{"prompt": "a cat"}'), key_id=key, **fields)


async def test_a_submitted_job_is_queued_with_its_fields(store):
    record = await store.submit(job(endpoint="fal-ai/lora/image-to-image", webhook_url="https://example.com/hook", runner_hint="h", base_url="https://me"))
    again = await store.get(record.request_id)
    assert again.state is JobState.IN_QUEUE and again.gateway_request_id == again.request_id
    assert (again.app, again.endpoint, again.payload) == ("fal-ai/lora", "fal-ai/lora/image-to-image", b'{"prompt": "a cat"}')
    assert again.webhook_url == "https://example.com/hook" and again.runner_hint == "h" and again.base_url == "https://me"
    assert again.attempts == 0
    assert await store.get(record.request_id, app="fal-ai/flux-lora") is None  # ids belong to their app
    assert await store.get("no-such-id") is None



async def test_fifo_within_a_priority_and_low_behind_normal_with_exact_positions(store):
    low = await store.submit(job(priority="low"))
    first, second = await store.submit(job()), await store.submit(job())
    assert [await store.position(r.request_id) for r in (first, second, low)] == [0, 1, 2]
    claimed = [(await store.claim("w", 30)).request_id for _ in range(3)]
    assert claimed == [first.request_id, second.request_id, low.request_id]
    assert await store.claim("w", 30) is None
    assert await store.position(first.request_id) is None  # no longer queued



async def test_claims_take_only_the_apps_asked_for(store):
    lora = await store.submit(job(app="fal-ai/lora"))
    flux = await store.submit(job(app="fal-ai/flux-lora"))
    assert (await store.claim("w", 30, apps={"fal-ai/flux-lora"})).request_id == flux.request_id
    assert await store.claim("w", 30, apps={"fal-ai/flux-lora"}) is None
    assert await store.depth("fal-ai/lora") == 1 and await store.depth() == 1
    assert (await store.claim("w", 30)).request_id == lora.request_id



async def test_a_key_at_its_running_limit_lets_other_keys_pass(store):
    a1, a2 = await store.submit(job(key="alice")), await store.submit(job(key="alice"))
    b1 = await store.submit(job(key="bob"))
    assert (await store.claim("w", 30, max_running_per_key=1)).request_id == a1.request_id
    assert (await store.claim("w", 30, max_running_per_key=1)).request_id == b1.request_id  # a2 waits
    assert await store.claim("w", 30, max_running_per_key=1) is None
    assert await store.running("alice") == 1 and await store.running() == 2
    await store.finish(a1.request_id, "w", Outcome(200, b"{}"))
    assert (await store.claim("w", 30, max_running_per_key=1)).request_id == a2.request_id



async def test_admission_limits_refuse_with_queue_full(store):
    limits = AdmissionLimits(max_queued=3, max_queued_per_key=2)
    await store.submit(job(key="alice"), limits)
    await store.submit(job(key="alice"), limits)
    with pytest.raises(QueueFull, match="this key"):
        await store.submit(job(key="alice"), limits)
    await store.submit(job(key="bob"), limits)
    with pytest.raises(QueueFull, match="full"):
        await store.submit(job(key="carol"), limits)



async def test_the_lease_holder_finishes_the_job_with_logs_and_metrics(store):
    record = await store.submit(job())
    claimed = await store.claim("router-1", 30)
    assert claimed.state is JobState.IN_PROGRESS and claimed.attempts == 1 and claimed.lease_owner == "router-1"
    await store.append_log(record.request_id, {"message": "step 1/2", "level": "INFO"})
    await store.append_log(record.request_id, {"message": "step 2/2", "level": "INFO"})
    assert await store.renew(record.request_id, "router-1", 30)
    assert not await store.renew(record.request_id, "router-2", 30)
    assert not await store.finish(record.request_id, "router-2", Outcome(200, b"{}"))  # not its lease
    assert await store.finish(record.request_id, "router-1", Outcome(200, b'{"images": []}', {"inference_time": 0.5}))
    done = await store.get(record.request_id)
    assert done.state is JobState.COMPLETED and done.status_code == 200 and done.result == b'{"images": []}'
    assert done.metrics == {"inference_time": 0.5} and [e["message"] for e in done.logs] == ["step 1/2", "step 2/2"]
    assert not await store.finish(record.request_id, "router-1", Outcome(500, b"{}"))  # finished once



async def test_an_expired_lease_requeues_the_job_at_the_head_with_a_new_gateway_id(store):
    first = await store.submit(job())
    later = await store.submit(job())
    await store.claim("dead-router", lease_s=0.05)
    await asyncio.sleep(0.1)
    assert await store.requeue_expired() == ([first.request_id], [])
    requeued = await store.get(first.request_id)
    assert requeued.state is JobState.IN_QUEUE
    assert requeued.gateway_request_id != first.request_id
    assert await store.position(first.request_id) == 0 and await store.position(later.request_id) == 1
    retried = await store.claim("live-router", 30)
    assert retried.request_id == first.request_id and retried.attempts == 2
    assert not await store.finish(first.request_id, "dead-router", Outcome(200, b"stale"))  # the dead worker's late result
    assert await store.finish(first.request_id, "live-router", Outcome(200, b"fresh"))
    assert (await store.get(first.request_id)).result == b"fresh"



async def test_a_no_retry_job_with_an_expired_lease_is_handed_back_not_requeued(store):
    record = await store.submit(job(no_retry=True))
    await store.claim("dead-router", lease_s=0.05)
    await asyncio.sleep(0.1)
    requeued, (expired,) = await store.requeue_expired()
    assert requeued == [] and expired.request_id == record.request_id and expired.state is JobState.IN_PROGRESS
    assert await store.claim("w", 30) is None
    assert await store.finish(record.request_id, None, Outcome(503, b'{"error_type": "runner_disconnected"}'))
    assert (await store.get(record.request_id)).status_code == 503
    assert await store.requeue_expired() == ([], [])



async def test_the_lease_holder_can_give_a_job_back_to_the_head_of_the_queue(store):
    first, later = await store.submit(job()), await store.submit(job())
    await store.claim("router-1", 30)
    assert not await store.release(first.request_id, "router-2")  # not its lease
    assert await store.release(first.request_id, "router-1")
    back = await store.get(first.request_id)
    assert back.state is JobState.IN_QUEUE and back.gateway_request_id != first.request_id
    assert await store.position(first.request_id) == 0 and await store.position(later.request_id) == 1
    assert (await store.claim("router-2", 30)).attempts == 2
    assert await store.running("alice") == 1  # counted once, by its new holder


async def test_a_job_that_has_had_its_attempts_is_handed_back_not_requeued(store):
    record = await store.submit(job())
    for attempt in (1, 2):
        await store.claim(f"router-{attempt}", lease_s=0.05)
        await asyncio.sleep(0.1)
        requeued, handed_back = await store.requeue_expired(max_attempts=2)
    (expired,) = handed_back
    assert requeued == [] and expired.request_id == record.request_id and expired.state is JobState.IN_PROGRESS and expired.attempts == 2
    assert await store.claim("w", 30) is None


async def test_cancel_in_each_state(store):
    queued, running, done = await store.submit(job()), await store.submit(job()), await store.submit(job())
    assert await store.cancel(queued.request_id) == "cancelled"
    cancelled = await store.get(queued.request_id)
    assert cancelled.state is JobState.COMPLETED and (cancelled.status_code, cancelled.result) == (CANCELLED.status_code, CANCELLED.body)
    assert (await store.claim("w", 30)).request_id == running.request_id  # the cancelled job never runs
    assert not await store.cancel_requested(running.request_id)
    assert await store.cancel(running.request_id) == "requested"
    assert await store.cancel_requested(running.request_id)
    await store.claim("w", 30)
    await store.finish(done.request_id, "w", Outcome(200, b"{}"))
    assert await store.cancel(done.request_id) == "already_completed"
    assert await store.cancel("no-such-id") == "not_found"
    assert await store.cancel(running.request_id, app="fal-ai/lcm") == "not_found"



async def test_queued_jobs_past_their_start_deadline_are_reported(store):
    hurried = await store.submit(job(start_timeout_s=0.05))
    await store.submit(job(start_timeout_s=60))
    await asyncio.sleep(0.1)
    assert [r.request_id for r in await store.expired_unstarted()] == [hurried.request_id]



async def test_completed_jobs_are_purged_after_the_retention(store):
    old, fresh, queued = await store.submit(job()), await store.submit(job()), await store.submit(job())
    for record in (old, fresh):
        await store.claim("w", 30)
    await store.append_log(old.request_id, {"message": "x"})
    await store.finish(old.request_id, "w", Outcome(200, b"{}"))
    await asyncio.sleep(0.2)
    await store.finish(fresh.request_id, "w", Outcome(200, b"{}"))
    assert await store.purge(older_than_s=0.1) == 1
    assert await store.get(old.request_id) is None
    assert await store.get(fresh.request_id) is not None and await store.get(queued.request_id) is not None



async def test_jobs_survive_reopening_the_store(reopen):
    first = reopen()
    queued, running = await first.submit(job()), await first.submit(job())
    await first.claim("w", 30)
    await first.close()
    second = reopen()
    assert (await second.get(queued.request_id)).state is JobState.IN_PROGRESS
    assert (await second.get(running.request_id)).state is JobState.IN_QUEUE
    assert await second.position(running.request_id) == 0
    await second.close()



async def test_concurrent_claims_hand_each_job_to_one_worker(reopen):
    stores = [reopen() for _ in range(4)]
    ids = {(await stores[0].submit(job())).request_id for _ in range(20)}

    async def drain(store, name):
        mine = []
        while (record := await store.claim(name, 30)) is not None:
            mine.append(record.request_id)
        return mine

    claimed = await asyncio.gather(*(drain(s, f"w{i}") for i, s in enumerate(stores)))
    flat = [request_id for part in claimed for request_id in part]
    assert sorted(flat) == sorted(ids)  # every job once, none twice
    for s in stores:
        await s.close()




async def test_a_job_with_a_webhook_gets_its_delivery_when_it_completes_by_any_path(store):
    hooked = [await store.submit(job(webhook_url=f"https://example.com/{i}")) for i in range(3)]
    plain = await store.submit(job())
    assert (await store.get(hooked[0].request_id)).webhook_state is None  # nothing to announce yet
    assert await store.claim_webhook("d", 30) is None
    for _ in range(2):
        await store.claim("w", 30)
    await store.finish(hooked[0].request_id, "w", Outcome(200, b'{"images": []}'))  # finished by its worker
    await store.finish(hooked[1].request_id, None, Outcome(504, b'{"detail": "late"}'))  # by housekeeping
    assert await store.cancel(hooked[2].request_id) == "cancelled"  # a queued one cancelled
    claimed = [await store.claim_webhook("d", 30) for _ in range(4)]
    assert [r.request_id for r in claimed[:3]] == [r.request_id for r in hooked] and claimed[3] is None  # oldest first, each once
    assert claimed[0].result == b'{"images": []}' and claimed[0].webhook_attempts == 1 and claimed[0].webhook_state == "pending"
    assert (await store.get(plain.request_id)).webhook_state is None


async def test_a_failed_delivery_is_due_again_at_its_retry_time_and_only_its_holder_reports(store):
    record = await store.submit(job(webhook_url="https://example.com/hook"))
    await store.cancel(record.request_id)
    await store.claim_webhook("d1", 30)
    assert not await store.webhook_attempted(record.request_id, "d2", True, None, None)  # not d2's to report
    assert await store.webhook_attempted(record.request_id, "d1", False, "HTTP 500", time.time() + 0.3)
    assert await store.claim_webhook("d1", 30) is None  # not due yet
    await asyncio.sleep(0.4)
    again = await store.claim_webhook("d2", 30)
    assert again.request_id == record.request_id and again.webhook_attempts == 2 and again.webhook_error == "HTTP 500"
    assert await store.webhook_attempted(record.request_id, "d2", True, None, None)
    done = await store.get(record.request_id)
    assert (done.webhook_state, done.webhook_attempts, done.webhook_error) == ("delivered", 2, None)
    assert await store.claim_webhook("d1", 0) is None


async def test_a_delivery_whose_deliverer_died_is_due_again_when_its_lease_ends(store):
    record = await store.submit(job(webhook_url="https://example.com/hook"))
    await store.cancel(record.request_id)
    await store.claim_webhook("dead", 0.3)  # and never reports
    assert await store.claim_webhook("alive", 30) is None
    await asyncio.sleep(0.4)
    assert (await store.claim_webhook("alive", 30)).request_id == record.request_id
    assert not await store.webhook_attempted(record.request_id, "dead", True, None, None)  # too late: it is alive's now
    assert await store.webhook_attempted(record.request_id, "alive", False, "gave up", None)
    assert (await store.get(record.request_id)).webhook_state == "failed"


async def test_a_job_is_not_purged_while_its_webhook_is_pending(store):
    pending, delivered = await store.submit(job(webhook_url="https://a.example/")), await store.submit(job(webhook_url="https://b.example/"))
    for record in (pending, delivered):
        await store.cancel(record.request_id)
    await store.claim_webhook("d", 30)
    await store.webhook_attempted(pending.request_id, "d", False, "HTTP 503", time.time() + 60)
    await store.claim_webhook("d", 30)
    await store.webhook_attempted(delivered.request_id, "d", True, None, None)
    await asyncio.sleep(0.2)
    assert await store.purge(older_than_s=0.1) == 1
    assert await store.get(delivered.request_id) is None
    assert (await store.get(pending.request_id)).webhook_state == "pending"


async def test_pending_deliveries_and_shared_values_survive_reopening_the_store(reopen):
    first = reopen()
    record = await first.submit(job(webhook_url="https://example.com/hook"))
    await first.cancel(record.request_id)
    assert await first.shared_value("key", b"one") == b"one"
    await first.close()
    second = reopen()
    assert await second.shared_value("key", b"two") == b"one"  # the first value stays
    assert (await second.claim_webhook("d", 30)).request_id == record.request_id
    await second.close()


async def test_the_store_is_chosen_by_url(tmp_path):
    from serve_app.queue import open_store
    from serve_app.queue.redis_store import RedisJobStore
    from serve_app.queue.sqlite_store import SqliteJobStore

    sqlite = open_store(f"sqlite://{tmp_path}/q.sqlite3")
    assert isinstance(sqlite, SqliteJobStore) and sqlite.path == tmp_path / "q.sqlite3"
    assert open_store("sqlite:///~/q.sqlite3").path.parent.name != "~"  # the home directory, expanded
    redis_store = open_store("redis://127.0.0.1:6379/0#mine:")
    assert isinstance(redis_store, RedisJobStore) and redis_store.prefix == "mine:"
    await redis_store.close()
    with pytest.raises(ValueError, match="sqlite:///"):
        open_store("postgres://localhost/jobs")


@needs_redis_server
async def test_a_redis_with_a_password_takes_it_from_the_settings_not_the_url(tmp_path, monkeypatch):
    """The password comes from the environment (a Secret), so the Serve config's store_url holds
    none; without it the server refuses, and says why."""
    import redis

    from serve_app.config import STORE_PASSWORD_ENV, AppConfig
    from serve_app.queue import open_store

    server = PrivateRedis(tmp_path, password="s3cret-pw").start()
    try:
        monkeypatch.setenv(STORE_PASSWORD_ENV, "s3cret-pw")
        settings = AppConfig.from_args({"queue": {"store_url": server.url}})
        monkeypatch.delenv(STORE_PASSWORD_ENV)  # a replica on a node without it gets it in its init args
        as_replicas_get_it = AppConfig.from_args(settings.model_dump(mode="json", exclude_unset=True)).queue
        assert "s3cret" not in repr(settings) and "s3cret" not in server.url
        store = open_store(as_replicas_get_it.store_url, as_replicas_get_it.store_password.get_secret_value())
        record = await store.submit(job())
        assert (await store.get(record.request_id)).request_id == record.request_id
        await store.close()
        unauthenticated = open_store(server.url)
        with pytest.raises(redis.exceptions.AuthenticationError):
            await unauthenticated.get(record.request_id)
        await unauthenticated.close()
    finally:
        server.kill()


@needs_redis_server
async def test_a_redis_killed_and_restarted_with_its_append_only_file_keeps_every_job(tmp_path):
    """A private Redis (AOF on, fsync always) is killed with SIGKILL mid-queue and started again:
    queued, running and completed jobs, their order and their logs are all still there."""
    from serve_app.queue.redis_store import RedisJobStore

    server = PrivateRedis(tmp_path).start()
    try:
        store = RedisJobStore(server.url)
        done, running, first, second = [await store.submit(job()) for _ in range(4)]
        await store.claim("w", 30)
        await store.finish(done.request_id, "w", Outcome(200, b'{"images": []}'))
        await store.claim("w", 30)
        await store.append_log(running.request_id, {"message": "step 1/4"})
        await store.close()
        server.kill()
        server.start()
        store = RedisJobStore(server.url)
        assert (await store.get(done.request_id)).result == b'{"images": []}'
        assert (await store.get(running.request_id)).logs == [{"message": "step 1/4"}]
        assert [await store.position(r.request_id) for r in (first, second)] == [0, 1]
        assert (await store.claim("w2", 30)).request_id == first.request_id
        await store.close()
    finally:
        server.kill()


async def test_a_token_bucket_is_shared_by_every_handle_and_refills_on_the_stores_clock(reopen):
    first, second = reopen(), reopen()
    waits = [await (first if i % 2 else second).take_token("rate:alice", 2, 10.0) for i in range(3)]
    assert waits[:2] == [0.0, 0.0] and 0 < waits[2] <= 0.1  # full at 2, then one token per 0.1 s
    assert await first.take_token("rate:bob", 2, 10.0) == 0.0  # buckets are by name
    await asyncio.sleep(0.15)
    assert await second.take_token("rate:alice", 2, 10.0) == 0.0
    await first.close()
    await second.close()


async def test_a_light_read_is_the_whole_record_but_the_bodies_and_logs(store):
    """What status polls read: every field but the payload and result (and the logs unless asked),
    the same on both stores, so a field the light read forgot would show here."""
    import dataclasses

    record = await store.submit(job(payload=b'{"image_url": "data:image/png;base64,' + b"A" * 100_000 + b'"}', webhook_url="https://hooks.example.com/x"))
    await store.claim("w", 30)
    await store.append_log(record.request_id, {"message": "step 1/2"})
    await store.finish(record.request_id, "w", Outcome(200, b'{"images": ["' + b"B" * 100_000 + b'"]}', {"inference_time": 0.5}))
    full = await store.get(record.request_id)
    light = await store.get(record.request_id, bodies=False, logs=False)
    assert light.payload == b"" and light.result is None and light.logs == []
    assert dataclasses.replace(full, payload=b"", result=None, logs=[]) == light
    assert (await store.get(record.request_id, bodies=False)).logs == [{"message": "step 1/2"}]
    assert await store.get(record.request_id, "fal-ai/flux-lora", bodies=False) is None  # another app's id
    assert await store.get("no-such-id", bodies=False) is None


async def test_sync_runs_count_across_holders_with_running_jobs_and_expire_with_their_holder(reopen):
    first, second = reopen(), reopen()
    await first.submit(job(key="alice"))
    await first.claim("w", 30)  # one queued job of alice's running
    assert await first.enter_sync_run("alice", "router-1", 3, 30)
    assert await second.enter_sync_run("alice", "router-2", 3, 0.5)
    assert not await first.enter_sync_run("alice", "router-1", 3, 30)  # 1 job + 2 sync calls: at 3
    assert await first.enter_sync_run("bob", "router-1", 3, 30)  # by key
    await second.leave_sync_run("alice", "router-2")
    assert await second.enter_sync_run("alice", "router-2", 3, 0.5)
    await asyncio.sleep(0.7)  # router-2 did not renew: its call no longer counts
    assert await first.enter_sync_run("alice", "router-1", 3, 30)
    await first.renew_sync_runs("router-1", {"alice": 0, "bob": 1}, 30)  # the true counts replace the store's
    assert await second.enter_sync_run("alice", "router-2", 3, 30) and await second.enter_sync_run("alice", "router-2", 3, 30)
    assert not await second.enter_sync_run("alice", "router-2", 3, 30)
    await first.close()
    await second.close()


async def test_a_keys_sync_calls_on_live_routers_hold_its_queued_jobs_back_too(store):
    first = await store.submit(job(key="alice"))
    assert await store.enter_sync_run("alice", "router-1", 1, 30)  # alice's one place: a sync call
    assert await store.claim("w", 30, max_running_per_key=1) is None  # her queued job waits
    await store.leave_sync_run("alice", "router-1")
    assert (await store.claim("w", 30, max_running_per_key=1)).request_id == first.request_id
    second = await store.submit(job(key="bob"))
    assert await store.enter_sync_run("bob", "router-2", 1, 0.3)
    assert await store.claim("w", 30, max_running_per_key=1) is None
    await asyncio.sleep(0.4)  # router-2 died (no renewal): its call no longer holds bob back
    assert (await store.claim("w", 30, max_running_per_key=1)).request_id == second.request_id
