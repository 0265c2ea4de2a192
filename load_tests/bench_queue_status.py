"""The status path: how many status polls one router replica answers while queued jobs run.

fal's Python client polls every 0.1 s, so a status read must be a store read, never a model call.
Side by side in one run, 8 polling threads for a fixed time each:
  health_idle     GET /health (the proxy + router floor), no jobs
  status_idle     GET /queue/.../status?logs=1 of a finished job, no jobs running
  status_busy     the same while a backlog of queued jobs runs on the model replica
Reported: polls per second, p50/p99 latency, and status_busy / status_idle and status / health.

    python -m load_tests.bench_queue_status --out bench_results/queue_status.json
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from load_tests.bench_foundation import start_stack

JOB = {"model_name": "runwayml/stable-diffusion-v1-5", "prompt": "a cat", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 20}


def poll(base: str, path: str, seconds: float, threads: int) -> dict:
    def worker() -> list[float]:
        latencies = []
        with httpx.Client(base_url=base, timeout=30) as client:
            stop = time.monotonic() + seconds
            while time.monotonic() < stop:
                started = time.perf_counter()
                response = client.get(path)
                response.raise_for_status()
                latencies.append(1000 * (time.perf_counter() - started))
        return latencies

    with cf.ThreadPoolExecutor(threads) as pool:
        runs = list(pool.map(lambda _: worker(), range(threads)))
    latencies = sorted(x for run in runs for x in run)
    return {
        "polls_per_s": len(latencies) / seconds,
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[int(0.99 * (len(latencies) - 1))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--threads", type=int, default=8, help="polling clients")
    parser.add_argument("--backlog", type=int, default=200, help="jobs queued for the busy phase")
    parser.add_argument("--out", type=Path, default=Path("bench_results/queue_status.json"))
    args = parser.parse_args()
    store = Path(tempfile.mkdtemp()) / "jobs.sqlite3"
    base = start_stack(argparse.Namespace(threads=1, max_wait_ms=50.0, no_batching=False), queue={"store_url": f"sqlite://{store}"})
    with httpx.Client(base_url=base, timeout=120) as client:
        finished = client.post("/queue/fal-ai/lora", json=JOB).json()
        while client.get(finished["status_url"]).status_code != 200:
            time.sleep(0.1)
        status_path = finished["status_url"].removeprefix(base) + "?logs=1"
        summary: dict = {"config": {k: str(v) for k, v in vars(args).items()}}
        summary["health_idle"] = poll(base, "/health", args.seconds, args.threads)
        summary["status_idle"] = poll(base, status_path, args.seconds, args.threads)
        backlog = [client.post("/queue/fal-ai/lora", json={**JOB, "seed": i}).json() for i in range(args.backlog)]
        summary["status_busy"] = poll(base, status_path, args.seconds, args.threads)
        done = sum(client.get(job["status_url"]).status_code == 200 for job in backlog)
    summary["busy_jobs_completed_during_phase"] = done
    summary["ratios"] = {
        "status_busy_over_idle": summary["status_busy"]["polls_per_s"] / summary["status_idle"]["polls_per_s"],
        "status_idle_over_health": summary["status_idle"]["polls_per_s"] / summary["health_idle"]["polls_per_s"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
