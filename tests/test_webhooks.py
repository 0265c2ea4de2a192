"""Webhook deliveries without Ray: a real SQLite store, real deliverers and a real HTTP receiver
that verifies signatures as fal's docs say. The envelope's shape, fal's retry schedule, signing
and the JWKS, URL checks, retries after failures, a receiver that is down or slow, and a
deliverer that dies mid-try. (End to end over the queue's HTTP routes: test_queue.py.)
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import pytest_asyncio

from serve_app.config import WebhookSettings
from serve_app.errors import InputError
from serve_app.queue.sqlite_store import SqliteJobStore
from serve_app.queue.store import JobRecord, JobState, NewJob, Outcome
from serve_app.queue.webhooks import LEASE_SLACK_S, Deliverer, Signer, SigningKeys, _private_key, check_webhook_url, new_key, retry_delays, webhook_body
from serve_app.url_guard import NetworkPolicy
from tests.conftest import IMAGE_HOST, free_port
from tests.webhook_receiver import Delivery, WebhookReceiver, verify

POLICY = NetworkPolicy(allowed_networks=[f"{IMAGE_HOST}/32"])
FAST = WebhookSettings(max_attempts=4, retry_window_s=1.4, timeout_s=1.0, concurrency=4, poll_interval_s=0.05)


def completed(status_code: int, body: bytes) -> JobRecord:
    return JobRecord(
        request_id="r1", app="fal-ai/lora", endpoint="fal-ai/lora", payload=b"", key_id="alice", base_url="", priority="normal",
        webhook_url="https://example.com/hook", no_retry=False, start_deadline=None, runner_hint=None, state=JobState.COMPLETED,
        gateway_request_id="g2", status_code=status_code, result=body,
    )


def test_the_envelope_carries_the_output_or_the_error_as_fal_sends_it():
    ok = json.loads(webhook_body(completed(200, b'{"images": [{"url": "u"}], "seed": 3}'), 1 << 20))
    assert ok == {"request_id": "r1", "gateway_request_id": "g2", "status": "OK", "payload": {"images": [{"url": "u"}], "seed": 3}, "error": None}
    failed = json.loads(webhook_body(completed(422, b'{"detail": [{"loc": ["body", "prompt"], "msg": "m", "type": "t"}]}'), 1 << 20))
    assert failed["status"] == "ERROR" and failed["error"] == "Invalid status code: 422"
    assert failed["payload"] == {"detail": [{"loc": ["body", "prompt"], "msg": "m", "type": "t"}]}
    big = json.loads(webhook_body(completed(200, b'{"images": "' + b"x" * 5000 + b'"}'), 2048))
    assert big["payload"] is None and "over this server's webhook limit" in big["payload_error"] and big["status"] == "OK"


def test_fals_schedule_is_ten_tries_over_two_hours_with_doubling_waits():
    delays = retry_delays(WebhookSettings())
    assert len(delays) == 9 and sum(delays) == pytest.approx(7200)
    assert all(b == pytest.approx(2 * a) for a, b in zip(delays, delays[1:]))
    assert delays[0] == pytest.approx(14.09, abs=0.01) and retry_delays(WebhookSettings(max_attempts=1)) == []


def test_a_signature_verifies_with_the_published_keys_and_only_for_its_body():
    old, current = _private_key(new_key()), _private_key(new_key())
    signer = Signer([current, old])
    jwks = signer.jwks()
    assert [k["kty"] for k in jwks["keys"]] == ["OKP", "OKP"] and all(k["crv"] == "Ed25519" and k["alg"] == "EdDSA" for k in jwks["keys"])
    body = b'{"status": "OK"}'
    delivery = Delivery("/", signer.headers("r1", "alice", body), body, time.time())
    assert verify(delivery, jwks)
    assert verify(delivery, {"keys": jwks["keys"][:1]})  # signed with the first key
    assert not verify(Delivery("/", delivery.headers, b'{"status": "ERROR"}', 0), jwks)  # another body
    stale = Delivery("/", signer.headers("r1", "alice", body, timestamp=int(time.time()) - 600), body, 0)
    assert not verify(stale, jwks)  # receivers reject timestamps 300 s off
    assert not verify(delivery, Signer([_private_key(new_key())]).jwks())  # someone else's keys


async def test_without_configured_keys_every_router_on_a_store_signs_with_the_same_kept_key(tmp_path):
    first, second = SqliteJobStore(tmp_path / "jobs.sqlite3"), SqliteJobStore(tmp_path / "jobs.sqlite3")
    a, b = await SigningKeys(WebhookSettings(), first).signer(), await SigningKeys(WebhookSettings(), second).signer()
    assert a.jwks() == b.jwks()
    configured = await SigningKeys(WebhookSettings(signing_keys=[new_key()]), first).signer()
    assert configured.jwks() != a.jwks()
    with pytest.raises(ValueError, match="32 bytes"):
        _private_key("dG9vIHNob3J0")
    await first.close()
    await second.close()


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("not a url", "url_invalid"),
        ("ftp://example.com/hook", "url_invalid"),
        ("http://127.0.0.1:9/hook", "url_forbidden"),  # loopback
        ("http://169.254.169.254/latest/meta-data", "url_forbidden"),  # the cloud metadata service
        ("http://10.1.2.3/hook", "url_forbidden"),
        ("http://[::ffff:127.0.0.1]/hook", "url_forbidden"),
        ("https://example.com/" + "x" * 3000, "url_invalid"),
    ],
)
async def test_webhook_urls_we_must_not_or_cannot_call_are_refused_at_submit(url, kind):
    with pytest.raises(InputError) as refused:
        await check_webhook_url(url, POLICY)
    (detail,) = refused.value.detail()
    assert detail["loc"] == ["query", "fal_webhook"] and detail["type"] == kind and detail["msg"]


async def test_an_address_the_operator_allows_is_accepted():
    assert await check_webhook_url(f"http://{IMAGE_HOST}:8080/hook?token=1", POLICY) == f"http://{IMAGE_HOST}:8080/hook?token=1"


# --- delivery against a real receiver ---------------------------------------------------------


@pytest.fixture
def receiver():
    receiver = WebhookReceiver(IMAGE_HOST).start()
    yield receiver
    receiver.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def store(tmp_path):
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    yield store
    await store.close()


async def completed_job(store, url: str, outcome: Outcome = Outcome(200, b'{"seed": 1}')) -> str:
    record = await store.submit(NewJob(app="fal-ai/lora", endpoint="fal-ai/lora", payload=b"{}", key_id="alice", webhook_url=url))
    await store.claim("w", 30)
    await store.finish(record.request_id, "w", outcome)
    return record.request_id


async def wait_state(store, request_id: str, state: str, timeout_s: float = 20.0) -> JobRecord:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        record = await store.get(request_id)
        if record.webhook_state == state:
            return record
        await asyncio.sleep(0.05)
    raise AssertionError(f"webhook of {request_id} never became {state}: {record.webhook_state} after {record.webhook_attempts} tries")


def deliverer(store, settings: WebhookSettings = FAST, name: str = "router-1") -> Deliverer:
    return Deliverer(store, settings, POLICY, SigningKeys(settings, store), name)


async def test_a_completed_job_is_delivered_signed_and_verifiable(store, receiver):
    request_id = await completed_job(store, receiver.url("/done"))
    worker = deliverer(store)
    worker.start()
    try:
        record = await wait_state(store, request_id, "delivered")
        got = receiver.wait_for("/done", 5)
        assert got.json == {"request_id": request_id, "gateway_request_id": request_id, "status": "OK", "payload": {"seed": 1}, "error": None}
        assert got.headers["X-Fal-Webhook-User-Id"] == "alice" and got.headers["Content-Type"] == "application/json"
        assert verify(got, (await worker.keys.signer()).jwks())
        assert record.webhook_attempts == 1
    finally:
        await worker.stop()


async def test_a_failing_receiver_is_tried_again_with_growing_waits_until_it_answers(store, receiver):
    receiver.failures["/flaky"] = 2
    request_id = await completed_job(store, receiver.url("/flaky"), Outcome(422, b'{"detail": [{"loc": ["body"], "msg": "m", "type": "t"}]}'))
    worker = deliverer(store)
    worker.start()
    try:
        record = await wait_state(store, request_id, "delivered")
    finally:
        await worker.stop()
    assert record.webhook_attempts == 3 and receiver.tries["/flaky"] == 3
    assert receiver.received("/flaky")[0].json["status"] == "ERROR"
    # Waits of 0.2 s then 0.4 s (x0.9..1.1): the third try came no sooner than ~0.54 s after the first.
    first_try_at = (await store.get(request_id)).finished_at
    assert receiver.received("/flaky")[0].at - first_try_at >= 0.5


async def test_a_receiver_that_stays_down_is_given_up_on_after_its_tries(store):
    down = f"http://{IMAGE_HOST}:{free_port(IMAGE_HOST)}/hook"  # nothing listens there
    request_id = await completed_job(store, down)
    worker = deliverer(store)
    worker.start()
    try:
        record = await wait_state(store, request_id, "failed")
    finally:
        await worker.stop()
    assert record.webhook_attempts == FAST.max_attempts and "could not reach" in record.webhook_error
    assert "?" not in record.webhook_error


async def test_a_slow_receiver_holds_up_only_its_own_delivery(store, receiver):
    receiver.delays["/slow"] = 3.0  # past the 1 s timeout
    slow = await completed_job(store, receiver.url("/slow"))
    quick = await completed_job(store, receiver.url("/quick"))
    worker = deliverer(store)
    worker.start()
    try:
        await wait_state(store, quick, "delivered", timeout_s=3.0)
        assert (await store.get(slow)).webhook_state == "pending"
        record = await wait_state(store, slow, "failed", timeout_s=30)
    finally:
        await worker.stop()
    assert "did not answer within 1 s" in record.webhook_error


async def test_a_delivery_whose_router_died_mid_try_is_made_by_another_after_a_restart(tmp_path, receiver):
    receiver.delays["/after-restart"] = 5.0
    settings = WebhookSettings(max_attempts=3, retry_window_s=1.0, timeout_s=1.0, concurrency=1, poll_interval_s=0.05)
    first = SqliteJobStore(tmp_path / "jobs.sqlite3")
    request_id = await completed_job(first, receiver.url("/after-restart"))
    doomed = deliverer(first, settings, "router-a")
    doomed.start()
    while receiver.tries.get("/after-restart", 0) == 0:
        await asyncio.sleep(0.02)
    await doomed.stop()  # killed mid-try: the store still holds the delivery, leased to router-a
    await first.close()
    receiver.delays["/after-restart"] = 0.0
    second = SqliteJobStore(tmp_path / "jobs.sqlite3")  # a new router process on the same file
    survivor = deliverer(second, settings, "router-b")
    record = await second.get(request_id)
    assert record.webhook_state == "pending" and record.webhook_attempts == 1
    survivor.start()  # it takes the delivery once router-a's lease (1 s try + slack) has run out
    try:
        record = await wait_state(second, request_id, "delivered", timeout_s=LEASE_SLACK_S + 10)
    finally:
        await survivor.stop()
        await second.close()
    assert record.webhook_attempts == 2 and receiver.received("/after-restart")


async def test_a_woken_deliverer_delivers_at_once_and_its_slots_are_shared_by_one_claimer(store, receiver):
    """Deliveries are claimed by one loop (not one per slot), and a job that ended with a webhook
    on this router wakes it: with polls a minute apart, the delivery still goes out at once."""
    worker = deliverer(store, FAST.model_copy(update={"poll_interval_s": 60.0}))
    worker.start()
    try:
        await asyncio.sleep(0.1)  # the claimer found nothing and waits out its poll
        request_id = await completed_job(store, receiver.url("/woken"))
        worker.wake()
        assert (await wait_state(store, request_id, "delivered", timeout_s=10)).webhook_attempts == 1
        assert worker.claimer.slots == FAST.concurrency
    finally:
        await worker.stop()
