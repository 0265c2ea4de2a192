"""What a status poll reads from the job store: the whole record, or the record without its bodies.

A job submitted with a data-URI input image (`payload`) and run with `sync_mode` (a data-URI
result) carries megabytes that a status poll never shows; fal's client polls every 0.1 s. Side by
side in one run, on SQLite and on the Redis at 127.0.0.1:6379 (skipped if it does not answer),
alternating reads of one completed job with a 2 MB payload and a 1 MB result:
  full    store.get(id)                              (what status polls read before)
  light   store.get(id, bodies=False, logs=False)    (what they read now)
Reported: p50 per read and full / light.

    python -m load_tests.bench_status_reads --out bench_results/status_reads.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from serve_app.queue.store import NewJob, Outcome

PAYLOAD = b'{"image_url": "data:image/png;base64,' + b"A" * 2_000_000 + b'"}'
RESULT = b'{"images": [{"url": "data:image/jpeg;base64,' + b"B" * 1_000_000 + b'"}]}'


async def measure(store, reads: int) -> dict:
    record = await store.submit(NewJob(app="fal-ai/lora", endpoint="fal-ai/lora/image-to-image", payload=PAYLOAD, key_id="k"))
    await store.claim("w", 30)
    for step in range(20):
        await store.append_log(record.request_id, {"message": f"step {step + 1}/20"})
    await store.finish(record.request_id, "w", Outcome(200, RESULT))
    times: dict[str, list[float]] = {"full": [], "light": []}
    for _ in range(reads):
        for kind, kwargs in (("full", {}), ("light", {"bodies": False, "logs": False})):
            started = time.perf_counter()
            await store.get(record.request_id, **kwargs)
            times[kind].append(1000 * (time.perf_counter() - started))
    p50 = {kind: statistics.median(values) for kind, values in times.items()}
    return {"p50_ms": p50, "full_over_light": p50["full"] / p50["light"]}


async def main(reads: int) -> dict:
    from serve_app.queue.redis_store import RedisJobStore
    from serve_app.queue.sqlite_store import SqliteJobStore

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = SqliteJobStore(Path(tmp) / "jobs.sqlite3")
        results["sqlite"] = await measure(sqlite, reads)
        await sqlite.close()
    redis_store = RedisJobStore("redis://127.0.0.1:6379/0", prefix=f"bench-{uuid.uuid4().hex[:8]}:")
    try:
        results["redis"] = await measure(redis_store, reads)
    except OSError as exc:
        results["redis"] = {"skipped": str(exc)}
    finally:
        keys = [key async for key in redis_store.redis.scan_iter(match=f"{redis_store.prefix}*")]
        if keys:
            await redis_store.redis.delete(*keys)
        await redis_store.close()
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=300)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = asyncio.run(main(args.reads))
    print(json.dumps(out, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2))
