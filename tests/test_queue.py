"""fal's queue over HTTPS: the stock `fal_client` submits, polls, streams and fetches; every state's
body, code and URL as the protocol says; cancel, errors and ownership; signed webhooks, retried
after failures, that never hold up the queue; a killed router or model replica loses no job.
The store-dependent tests run twice: on the main app (SQLite) and on a second app whose job store
is the real Redis at 127.0.0.1:6379.

(The store itself is tested on SQLite and Redis in test_job_store.py; the dispatcher's leases,
cancels and timeouts in test_dispatcher.py.)
"""

from __future__ import annotations

import asyncio
import datetime
import json
import time
import uuid
from dataclasses import dataclass

import httpx
import pytest

from tests.conftest import IMAGE_HOST, LIMITED_KEY, results_when_done
from tests.test_fal_client import run_client
from tests.test_job_store import REDIS
from tests.webhook_receiver import WebhookReceiver, verify

pytestmark = pytest.mark.slow

@dataclass
class QueueApp:
    """The stack's queue on one store: the main app (SQLite) or a second app on the real Redis."""

    http: httpx.Client
    app_name: str
    store_url: str
    base: str  # the app's base URL (the stock client's hosts point here)

    def open_store(self):
        from serve_app.queue import open_store

        return open_store(self.store_url)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("redis", marks=pytest.mark.skipif(not REDIS, reason="no Redis at 127.0.0.1:6379"))])
def queue_app(request, stack, http, files_dir, test_ca):
    if request.param == "sqlite":
        yield QueueApp(http, "diffusion-serve", f"sqlite://{files_dir.parent / 'jobs.sqlite3'}", stack)
        return
    import redis
    from ray import serve

    from serve_app.app import assemble
    from serve_app.config import AppConfig
    from tests.conftest import ALLOWED_NETWORK, AUTH_HEADERS, FAST_WEBHOOKS, TEST_AUTH

    prefix = f"test-queue-{uuid.uuid4().hex[:8]}:"
    store_url = f"redis://127.0.0.1:6379/0#{prefix}"
    config = AppConfig(
        profile="demo",
        files={"directory": str(files_dir)},
        weights={"cache_dir": str(files_dir.parent / "weights-rq")},
        auth=TEST_AUTH,
        network=ALLOWED_NETWORK,
        webhooks=FAST_WEBHOOKS,
        queue={"store_url": store_url, "lease_s": 3.0, "dispatch_slots": 16},
    )
    idle = {"ray_actor_options": {"num_cpus": 0}}  # this app's LCM and FLUX replicas are not used here
    serve.run(assemble(config, {"ray_actor_options": {"num_gpus": 0.5, "num_cpus": 1}}, idle, idle), name="queue-redis", route_prefix="/rq")
    with httpx.Client(base_url=f"{stack}/rq", timeout=120, verify=test_ca.ssl_context(), headers=AUTH_HEADERS) as client:
        yield QueueApp(client, "queue-redis", store_url, f"{stack}/rq")
    serve.delete("queue-redis")
    server = redis.Redis(host="127.0.0.1", port=6379)
    for key in server.scan_iter(match=f"{prefix}*"):
        server.delete(key)


@pytest.fixture
def qhttp(queue_app) -> httpx.Client:
    return queue_app.http


SMALL = {"model_name": "runwayml/stable-diffusion-v1-5", "prompt": "a cat", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 3}


def wait_done(http, status_url: str, timeout_polls: int = 600) -> dict:
    for _ in range(timeout_polls):
        response = http.get(status_url, params={"logs": "1"})
        if response.status_code == 200:
            return response.json()
        assert response.status_code == 202, response.text
        time.sleep(0.05)
    raise AssertionError("the job never completed")


def test_the_stock_client_subscribes_with_logs_and_gets_the_result(queue_app, test_ca):
    out = run_client(
        queue_app.base,
        test_ca,
        """
        import json, fal_client
        updates = []
        result = fal_client.subscribe(
            "fal-ai/lora",
            arguments={"model_name": "runwayml/stable-diffusion-v1-5", "prompt": "a cat", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 4, "seed": 9},
            with_logs=True,
            on_queue_update=lambda update: updates.append(update),
        )
        messages = [log["message"] for update in updates if isinstance(update, (fal_client.InProgress, fal_client.Completed)) for log in (update.logs or [])]
        print(json.dumps({"seed": result["seed"], "width": result["images"][0]["width"], "messages": messages}))
        """,
    )
    assert out["seed"] == 9 and out["width"] == 64
    assert "step 4/4" in out["messages"], out["messages"]


def test_the_stock_client_submits_then_polls_status_and_result(stack, test_ca):
    out = run_client(
        stack,
        test_ca,
        """
        import json, fal_client
        from PIL import Image
        image = fal_client.encode_image(Image.new("RGB", (64, 64), (200, 30, 30)))
        handle = fal_client.submit("fal-ai/lora/image-to-image", arguments={
            "model_name": "runwayml/stable-diffusion-v1-5", "prompt": "a cat", "num_inference_steps": 4, "seed": 3, "image_url": image,
        })
        statuses = [type(status).__name__ for status in handle.iter_events(with_logs=True, interval=0.05)]
        result = handle.get()
        again = fal_client.result("fal-ai/lora/image-to-image", handle.request_id)
        status = fal_client.status("fal-ai/lora", handle.request_id, with_logs=True)
        print(json.dumps({"statuses": statuses, "seed": result["seed"], "same": again == result, "final": type(status).__name__,
                          "metrics": status.metrics}))
        """,
    )
    assert out["statuses"][-1] == "Completed" and out["final"] == "Completed" and out["same"] and out["seed"] == 3
    assert out["metrics"]["inference_time"] > 0


def test_the_stock_async_client_subscribes(stack, test_ca):
    out = run_client(
        stack,
        test_ca,
        """
        import asyncio, json, fal_client
        async def main():
            result = await fal_client.subscribe_async("fal-ai/lcm", arguments={"prompt": "a cat", "image_size": {"width": 64, "height": 64}, "seed": 4})
            return {"seed": result["seed"], "steps": result["num_inference_steps"]}
        print(json.dumps(asyncio.run(main())))
        """,
    )
    assert out == {"seed": 4, "steps": 4}


def test_the_stock_client_cancels_and_its_start_timeout_ends_a_job_that_waited_too_long(stack, test_ca):
    """Behind a backlog (more jobs than the router's dispatch slots), `handle.cancel()` ends a
    queued job with 499, and `submit(start_timeout=...)` one that is not started in time with 504
    `request_timeout`: what the stock client raises is what fal's would."""
    out = run_client(
        stack,
        test_ca,
        """
        import json, fal_client
        job = {"model_name": "runwayml/stable-diffusion-v1-5", "prompt": "a cat", "image_size": {"width": 256, "height": 256}}
        backlog = [fal_client.submit("fal-ai/lora", arguments={**job, "num_inference_steps": 20 + i % 5, "seed": i}) for i in range(24)]
        timed = fal_client.submit("fal-ai/lora", arguments={**job, "num_inference_steps": 4}, start_timeout=1.5)
        cancelled = fal_client.submit("fal-ai/lora", arguments={**job, "num_inference_steps": 4})
        cancelled.cancel()
        outcomes = {}
        for name, handle in (("timed", timed), ("cancelled", cancelled)):
            try:
                handle.get()
                outcomes[name] = "ran"
            except fal_client.client.FalClientHTTPError as error:
                outcomes[name] = [error.status_code, error.error_type]
        outcomes["backlog"] = sorted(handle.get()["seed"] for handle in backlog)
        print(json.dumps(outcomes))
        """,
    )
    assert out["timed"] == [504, "request_timeout"] and out["cancelled"] == [499, "client_cancelled"]
    assert out["backlog"] == list(range(24))  # the backlog itself ran


def test_submit_answers_fals_fields_with_absolute_urls(qhttp):
    response = qhttp.post("/queue/fal-ai/lora", json=SMALL)
    assert response.status_code == 200, response.text
    out = response.json()
    request_id = out["request_id"]
    assert out["status"] == "IN_QUEUE" and out["gateway_request_id"] == request_id and out["queue_position"] >= 0
    base = f"{qhttp.base_url}".rstrip("/") + f"/queue/fal-ai/lora/requests/{request_id}"
    assert (out["response_url"], out["status_url"], out["cancel_url"]) == (base, f"{base}/status", f"{base}/cancel")
    done = wait_done(qhttp, out["status_url"])
    assert done["status"] == "COMPLETED" and done["metrics"]["inference_time"] > 0
    assert [log["message"] for log in done["logs"]] == ["step 1/3", "step 2/3", "step 3/3"]
    assert {"level", "source", "timestamp"} <= set(done["logs"][0])
    assert qhttp.get(out["status_url"]).json()["logs"] is None  # logs only when asked for
    result = qhttp.get(out["response_url"])
    assert result.status_code == 200 and result.json()["images"][0]["width"] == 64
    # The long form (with the endpoint's path) reaches the same request.
    assert qhttp.get(f"/queue/fal-ai/lora/image-to-image/requests/{request_id}").json() == result.json()


def test_the_status_stream_sends_events_until_completed(qhttp):
    request_id = qhttp.post("/queue/fal-ai/lora", json=SMALL).json()["request_id"]
    with qhttp.stream("GET", f"/queue/fal-ai/lora/requests/{request_id}/status/stream", params={"logs": "true"}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line.removeprefix("data: ")) for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1]["status"] == "COMPLETED" and all(e["request_id"] == request_id for e in events)


def test_a_request_that_fails_in_the_model_completes_with_its_error(qhttp):
    out = qhttp.post("/queue/fal-ai/lora", json={**SMALL, "model_name": "/no/such/model"}).json()
    done = wait_done(qhttp, out["status_url"])
    assert done["status"] == "COMPLETED" and done["error_type"] == "validation_error"
    result = qhttp.get(out["response_url"])
    assert result.status_code == 422 and result.json()["detail"][0]["loc"] == ["body", "model_name"]


def test_bad_submits_are_refused_at_once(http):
    response = http.post("/queue/fal-ai/lora", json={"prompt": "a cat"})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "model_name"]
    assert http.post("/queue/fal-ai/nope", json=SMALL).status_code == 404
    for url, kind in [("not a url", "url_invalid"), ("http://169.254.169.254/latest/meta-data", "url_forbidden"), ("http://localhost:6379/", "url_forbidden")]:
        response = http.post("/queue/fal-ai/lora", params={"fal_webhook": url}, json=SMALL)
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["query", "fal_webhook"] and response.json()["detail"][0]["type"] == kind
    response = http.post("/queue/fal-ai/lora", json=SMALL, headers={"X-Fal-Queue-Priority": "urgent"})
    assert response.status_code == 422


def test_unknown_or_someone_elses_requests_are_404(http, stack, test_ca):
    assert http.get("/queue/fal-ai/lora/requests/no-such-id/status").status_code == 404
    assert http.get("/queue/fal-ai/lora/requests/no-such-id").status_code == 404
    assert http.put("/queue/fal-ai/lora/requests/no-such-id/cancel").json() == {"status": "NOT_FOUND"}
    mine = http.post("/queue/fal-ai/lora", json=SMALL).json()
    with httpx.Client(verify=test_ca.ssl_context(), headers={"Authorization": f"Key {LIMITED_KEY}"}) as other:
        assert other.get(mine["status_url"]).status_code == 404
    assert http.get(mine["status_url"].replace("fal-ai/lora", "fal-ai/lcm")).status_code == 404  # ids belong to their app


def test_cancel_a_queued_request_ends_it_with_499_and_a_finished_one_is_already_completed(qhttp):
    # Many jobs ahead keep the last one queued long enough to cancel it.
    for _ in range(20):
        qhttp.post("/queue/fal-ai/lora", json={**SMALL, "num_inference_steps": 10})
    last = qhttp.post("/queue/fal-ai/lora", json=SMALL).json()
    cancel = qhttp.put(last["cancel_url"])
    assert cancel.status_code == 202 and cancel.json() == {"status": "CANCELLATION_REQUESTED"}
    done = wait_done(qhttp, last["status_url"])
    assert done["error_type"] == "client_cancelled"
    result = qhttp.get(last["response_url"])
    assert result.status_code == 499 and result.json()["error_type"] == "client_cancelled"
    assert qhttp.put(last["cancel_url"]).json() == {"status": "ALREADY_COMPLETED"}


def test_result_before_completion_is_400(qhttp):
    for _ in range(10):
        qhttp.post("/queue/fal-ai/lora", json={**SMALL, "num_inference_steps": 10})
    last = qhttp.post("/queue/fal-ai/lora", json=SMALL).json()
    early = qhttp.get(last["response_url"])
    assert early.status_code == 400 and early.json() == {"detail": "Request is still in progress"}
    status = qhttp.get(last["status_url"])
    assert status.status_code == 202 and status.json()["status"] in ("IN_QUEUE", "IN_PROGRESS")
    wait_done(qhttp, last["status_url"])


def test_queue_positions_under_load_count_down_in_fifo_order_with_low_priority_behind(http):
    """More jobs than the router's 16 dispatch slots: the rest wait with exact positions. Each sweep
    reads the statuses in reverse of the expected start order, so that in a FIFO queue what it sees
    is consistent even though jobs start while it reads: the waiting jobs are a tail of that order,
    their positions 0, 1, 2... rise along it, and no job's position ever goes up."""
    job = {**SMALL, "image_size": {"width": 256, "height": 256}}  # five step counts: a job batches only with its like

    def submit(i: int, priority: str) -> dict:
        return http.post("/queue/fal-ai/lora", json={**job, "num_inference_steps": 12 + i % 5, "seed": i}, headers={"X-Fal-Queue-Priority": priority}).json()

    normal = [submit(i, "normal") for i in range(20)]
    low = [submit(20 + i, "low") for i in range(4)]  # submitted before the last normal ones, run after them
    late_normal = [submit(24 + i, "normal") for i in range(4)]
    expected_order = normal + late_normal + low

    sweeps, last_position = [], {}
    while True:
        sweep = {}
        for index in reversed(range(len(expected_order))):
            status = http.get(expected_order[index]["status_url"]).json()
            sweep[index] = status.get("queue_position") if status["status"] == "IN_QUEUE" else status["status"]
        sweeps.append(sweep)
        if all(state == "COMPLETED" for state in sweep.values()):
            break
        waiting = [index for index in range(len(expected_order)) if isinstance(sweep[index], int)]
        assert waiting == list(range(len(expected_order) - len(waiting), len(expected_order))), sweep  # a tail of the order
        positions = [sweep[index] for index in waiting]
        assert positions == sorted(set(positions)), sweep
        for index in waiting:
            assert sweep[index] <= last_position.get(index, sweep[index]), (index, sweeps[-2:])
            last_position[index] = sweep[index]
        time.sleep(0.02)
    assert max(sum(isinstance(state, int) for state in sweep.values()) for sweep in sweeps) >= 8  # the load did queue jobs
    assert any(isinstance(sweep[len(expected_order) - 1], int) and sweep[len(expected_order) - 1] >= 4 for sweep in sweeps)  # lows waited behind normals


def test_cancelling_a_running_request_stops_it_between_denoising_steps(http):
    """The replica skips the remaining steps of a call whose callers all went away, so the next
    request does not wait for them (one StableDiffusion replica serves both)."""
    out = http.post("/queue/fal-ai/lora", json={**SMALL, "image_size": {"width": 256, "height": 256}, "num_inference_steps": 150}).json()
    logs: list = []
    for _ in range(600):
        logs = http.get(out["status_url"], params={"logs": "1"}).json().get("logs") or []
        if len(logs) >= 4:
            break
        time.sleep(0.05)
    stamps = [datetime.datetime.fromisoformat(entry["timestamp"]) for entry in logs]
    step_s = (stamps[-1] - stamps[0]).total_seconds() / (len(stamps) - 1)
    assert http.put(out["cancel_url"]).status_code == 202
    assert http.get(wait_done(http, out["status_url"])["response_url"]).status_code == 499
    started = time.monotonic()
    assert http.post("/fal-ai/lora", json={**SMALL, "num_inference_steps": 2}).status_code == 200
    waited = time.monotonic() - started
    remaining = (150 - len(logs)) * step_s
    assert waited < remaining / 3, (waited, remaining)  # it did not wait out the cancelled job's steps


@pytest.fixture(scope="module")
def receiver():
    receiver = WebhookReceiver(IMAGE_HOST).start()
    yield receiver
    receiver.stop()


def test_the_stock_client_submits_with_a_webhook_and_the_signed_outcome_arrives(queue_app, receiver, test_ca):
    path = f"/hook/{uuid.uuid4().hex}"
    out = run_client(
        queue_app.base,
        test_ca,
        f"""
        import json, fal_client
        handle = fal_client.submit("fal-ai/lora", arguments={json.dumps({**SMALL, "seed": 5})}, webhook_url={receiver.url(path)!r})
        print(json.dumps({{"request_id": handle.request_id}}))
        """,
    )
    got = receiver.wait_for(path)
    assert got.json["request_id"] == out["request_id"] and got.json["gateway_request_id"] == out["request_id"]
    assert got.json["status"] == "OK" and got.json["error"] is None and got.json["payload"]["seed"] == 5
    assert got.headers["X-Fal-Webhook-User-Id"] == "test-key-id"  # the key's id, never the key
    jwks = httpx.get(f"{queue_app.base}/.well-known/jwks.json", verify=test_ca.ssl_context())  # public: no key needed
    assert jwks.status_code == 200 and verify(got, jwks.json())
    result = queue_app.http.get(f"/queue/fal-ai/lora/requests/{out['request_id']}")
    assert result.json() == got.json["payload"]  # what the queue answers, delivered


def test_a_webhook_is_tried_again_after_failures_and_failed_jobs_are_announced_too(qhttp, receiver):
    path = f"/flaky/{uuid.uuid4().hex}"
    receiver.failures[path] = 2  # HTTP 500 twice, then 200
    out = qhttp.post("/queue/fal-ai/lora", params={"fal_webhook": receiver.url(path)}, json={**SMALL, "model_name": "/no/such/model"}).json()
    got = receiver.wait_for(path)
    assert receiver.tries[path] == 3
    assert got.json["status"] == "ERROR" and got.json["error"] == "Invalid status code: 422"
    assert got.json["payload"]["detail"][0]["loc"] == ["body", "model_name"]
    assert wait_done(qhttp, out["status_url"])["error_type"] == "validation_error"


def test_a_slow_webhook_receiver_does_not_hold_up_the_queue(qhttp, receiver):
    slow = f"/slow/{uuid.uuid4().hex}"
    receiver.delays[slow] = 6.0  # three times the 2 s the test stack gives a receiver
    hooked = qhttp.post("/queue/fal-ai/lora", params={"fal_webhook": receiver.url(slow)}, json=SMALL).json()
    wait_done(qhttp, hooked["status_url"])
    others = [qhttp.post("/queue/fal-ai/lora", json={**SMALL, "seed": i}).json() for i in range(3)]
    for other in others:
        assert wait_done(qhttp, other["status_url"])["status"] == "COMPLETED"
    assert receiver.tries.get(slow, 0) >= 1 and not receiver.received(slow)  # its receiver is still being waited for


def test_jobs_of_a_killed_router_are_run_again_and_none_is_lost(queue_app, qhttp):
    """Kill the router replica while it runs queued jobs: Serve starts a new one, the jobs' leases
    run out, and the new router's dispatcher runs them again. Every accepted job ends with its image."""
    import ray

    submitted = [qhttp.post("/queue/fal-ai/lora", json={**SMALL, "num_inference_steps": 20, "seed": i}).json() for i in range(6)]
    for _ in range(200):
        states = [qhttp.get(s["status_url"]).json()["status"] for s in submitted]
        if "IN_PROGRESS" in states:
            break
        time.sleep(0.05)
    (router,) = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"{queue_app.app_name}#Router" in a["name"]]
    ray.kill(ray.get_actor(router["name"], namespace=router["namespace"]), no_restart=True)

    results = results_when_done(qhttp, submitted, 180)  # polls the proxy sends to no router are tried again
    assert len(results) == len(submitted), "some accepted jobs never completed"
    assert all(r.status_code == 200 and r.json()["images"] for r in results.values()), [r.text[:200] for r in results.values()]
    assert sorted(r.json()["seed"] for r in results.values()) == list(range(6))

    async def attempts() -> list[int]:
        store = queue_app.open_store()  # the app's own store
        records = [await store.get(s["request_id"]) for s in submitted]
        await store.close()
        assert all(r.gateway_request_id != r.request_id for r in records if r.attempts > 1)  # a retry is a new gateway request
        return [r.attempts for r in records]

    assert max(asyncio.run(attempts())) >= 2  # the killed router's jobs really ran again


def test_a_job_whose_model_replica_is_killed_runs_again_on_the_new_one(queue_app, qhttp):
    """Kill the StableDiffusion replica under a running job: the router gives the job back to the
    queue (the replica's fault, not the request's), Serve starts a new replica, the job ends with
    its image on its second attempt."""
    import ray

    out = qhttp.post("/queue/fal-ai/lora", json={**SMALL, "image_size": {"width": 256, "height": 256}, "num_inference_steps": 60, "seed": 31}).json()
    for _ in range(600):
        if len(qhttp.get(out["status_url"], params={"logs": "1"}).json().get("logs") or []) >= 2:
            break
        time.sleep(0.05)
    (replica,) = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"{queue_app.app_name}#StableDiffusion" in a["name"]]
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    done = wait_done(qhttp, out["status_url"], timeout_polls=3000)
    result = qhttp.get(out["response_url"])
    assert result.status_code == 200 and result.json()["seed"] == 31, result.text[:300]

    async def attempts() -> int:
        store = queue_app.open_store()
        record = await store.get(out["request_id"])
        await store.close()
        return record.attempts

    assert asyncio.run(attempts()) == 2 and done["status"] == "COMPLETED"
