"""The status stream (`GET .../status/stream`): `data:` events whenever the status changes,
`: ping` comments through silences (fal's JS client gives up after 15 s without a byte), closed
after COMPLETED. On the real queue service and SQLite store; the job is moved along by hand."""

from __future__ import annotations

import asyncio
import json

import pytest

from serve_app.auth import Caller
from serve_app.config import NetworkPolicy, QueueSettings
from serve_app.queue import service
from serve_app.queue.dispatcher import Endpoint
from serve_app.queue.service import QueueService
from serve_app.queue.sqlite_store import SqliteJobStore
from serve_app.queue.store import Outcome
from serve_app.schemas.lora import LoraTextToImageInput

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_events_on_each_change_pings_in_silences_and_the_end_after_completed(tmp_path, monkeypatch):
    monkeypatch.setattr(service, "STREAM_PING_S", 0.3)
    monkeypatch.setattr(service, "STREAM_POLL_S", 0.05)
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    queue = QueueService(store, {"fal-ai/lora": Endpoint(LoraTextToImageInput, None)}, QueueSettings(), NetworkPolicy())
    caller = Caller("alice")
    submitted = await queue.submit("fal-ai/lora", b'{"model_name": "m", "prompt": "a cat"}', {}, {}, caller, "http://router")
    request_id = json.loads(submitted.body)["request_id"]
    events = await queue.status_stream("fal-ai/lora", request_id, "1", caller, "http://router")
    seen: list[str] = []

    async def read() -> None:
        async for chunk in events:
            seen.append(chunk)

    reader = asyncio.create_task(read())
    await asyncio.sleep(0.5)  # queued, nothing changes: a ping
    await store.claim("router-1", 30)
    await store.append_log(request_id, {"message": "step 1/2"})
    await asyncio.sleep(0.2)
    await store.finish(request_id, "router-1", Outcome(200, b'{"images": []}', {"inference_time": 0.1}))
    await asyncio.wait_for(reader, 5)  # the stream ends by itself after COMPLETED
    await store.close()

    statuses = [json.loads(chunk.removeprefix("data: ")) for chunk in seen if chunk.startswith("data: ")]
    assert [s["status"] for s in statuses][0] == "IN_QUEUE" and {s["status"] for s in statuses[1:-1]} == {"IN_PROGRESS"}
    assert statuses[-2]["logs"] == [{"message": "step 1/2"}]  # (started and its first log line: one event or two)
    assert statuses[-1]["status"] == "COMPLETED" and statuses[-1]["metrics"] == {"inference_time": 0.1}
    assert len({json.dumps(s) for s in statuses}) == len(statuses)  # only changes are sent
    assert ": ping\n\n" in seen[: seen.index(next(c for c in seen if "IN_PROGRESS" in c))]
    assert all(chunk.endswith("\n\n") for chunk in seen)
