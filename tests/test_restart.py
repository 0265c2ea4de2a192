"""The whole `serve run` killed and started again on the same SQLite job store: no accepted job is
lost, and a webhook that was still being retried is delivered after the restart.

This is what an operator's machine going down looks like: the `serve run` process, its Ray
cluster (GCS, raylet, the router and model replicas) all die at once with SIGKILL, mid-queue. The
cluster here is its own, started by `serve run` from the demo profile (RAY_ADDRESS=local), apart
from the test session's shared cluster; it serves plain HTTP on a port of its own.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import ALLOWED_NETWORK, IMAGE_HOST, free_port
from tests.serve_cluster import ROOT, ServeRun, wait_until_serving
from tests.webhook_receiver import WebhookReceiver, verify

pytestmark = pytest.mark.slow

@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver(IMAGE_HOST).start()
    yield receiver
    receiver.stop()


def demo_config_on(workdir: Path, port: int) -> Path:
    """cluster/demo.yaml with its own port, job store, files and caches, and two dispatch slots
    (so that jobs wait in the queue while others run)."""
    config = yaml.safe_load((ROOT / "cluster" / "demo.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    (app,) = config["applications"]
    app["args"].update(
        files={"directory": str(workdir / "files")},
        weights={"cache_dir": str(workdir / "weights")},
        network=ALLOWED_NETWORK,
        queue={"store_url": f"sqlite://{workdir / 'jobs.sqlite3'}", "lease_s": 3.0, "dispatch_slots": 2},
        webhooks={"max_attempts": 10, "retry_window_s": 120.0, "poll_interval_s": 0.1},  # tries at ~0.2, 0.5, 1, 2, 4, 8 s...
    )
    path = workdir / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def attempts_of(database: Path, request_ids: list[str]) -> list[int]:
    import asyncio

    from serve_app.queue import open_store

    async def read() -> list[int]:
        store = open_store(f"sqlite://{database}")
        records = [await store.get(request_id) for request_id in request_ids]
        await store.close()
        return [record.attempts for record in records]

    return asyncio.run(read())


def test_a_killed_and_restarted_serve_run_loses_no_job_and_no_webhook(serve_workdir, receiver):
    port = free_port()
    run = ServeRun(demo_config_on(serve_workdir, port), serve_workdir)
    hook = f"/hook/{uuid.uuid4().hex}"
    receiver.failures[hook] = 1_000  # the receiver is down (500s) until the cluster has been killed
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        run.start()
        try:
            wait_until_serving(http, run)
            # Incompatible jobs (their step counts differ), so each runs alone: 2 at a time, the rest wait.
            job = {"model_name": "runwayml/stable-diffusion-v1-5", "prompt": "a lighthouse", "image_size": {"width": 256, "height": 256}}
            submitted = [http.post("/queue/fal-ai/lora", params={"fal_webhook": receiver.url(hook)} if i == 0 else None,
                                   json={**job, "num_inference_steps": 40 + i, "seed": i}).json() for i in range(10)]
            assert all(s["status"] == "IN_QUEUE" for s in submitted), submitted

            def states() -> list[str]:
                return [http.get(s["status_url"]).json()["status"] for s in submitted]

            deadline = time.monotonic() + 180
            while not (receiver.tries.get(hook, 0) >= 1 and "IN_QUEUE" in states()):
                assert time.monotonic() < deadline, f"no job finished in time:\n{run.tail()}"
                time.sleep(0.05)
            before = states()  # the jobs run for a second or more: this is still true at the kill
            finished_before = [s for s, state in zip(submitted, before, strict=True) if state == "COMPLETED"]
            assert submitted[0] in finished_before and "IN_QUEUE" in before, before
        finally:
            run.kill()

        receiver.failures[hook] = 0  # the receiver is back while the cluster is down
        run.start()
        try:
            wait_until_serving(http, run)
            results = {}
            deadline = time.monotonic() + 300
            while len(results) < len(submitted):
                assert time.monotonic() < deadline, f"jobs never ended after the restart: {states()}\n{run.tail()}"
                for s in submitted:
                    if s["request_id"] not in results and http.get(s["status_url"]).status_code == 200:
                        results[s["request_id"]] = http.get(s["response_url"])
                time.sleep(0.2)
            # Every job ended with its own image, the ones finished before the kill included.
            assert all(r.status_code == 200 and r.json()["images"] for r in results.values()), [r.text[:200] for r in results.values()]
            assert sorted(r.json()["seed"] for r in results.values()) == list(range(len(submitted)))
            assert all(http.get(r.json()["images"][0]["url"].replace(f"http://127.0.0.1:{port}", "")).status_code == 200 for r in results.values())

            # The webhook that failed before the kill arrives, signed with the key kept in the store.
            delivery = receiver.wait_for(hook, timeout_s=120)
            assert delivery.json["request_id"] == submitted[0]["request_id"] and delivery.json["status"] == "OK"
            assert verify(delivery, http.get("/.well-known/jwks.json").json())
            assert receiver.tries[hook] >= 2
            # The jobs that were running when the cluster died ran again (a second attempt).
            running_before = [s["request_id"] for s, state in zip(submitted, before, strict=True) if state == "IN_PROGRESS"]
            assert running_before and all(n >= 2 for n in attempts_of(serve_workdir / "jobs.sqlite3", running_before)), before
        finally:
            run.kill()
