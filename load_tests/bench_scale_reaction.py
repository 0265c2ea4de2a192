"""Time from a load step to a new replica serving: our queue-aware policy against Serve's default.

Two copies of the stack on one Ray cluster with 4 fake GPUs, identical but for the policy of their
StableDiffusion deployment (1 GPU per replica, 1 to 2 replicas, `max_ongoing_requests` 4,
`target_ongoing_requests` 2, `upscale_delay_s` 1): `QueueAwarePolicy` (in-flight requests plus the
jobs waiting in the store, read every second by the controller) and Serve's default (in-flight
requests as handles and replicas report them, every 10 s by default). Each round, for each copy in
turn: at t0 a backlog of queued jobs and 8 closed-loop sync clients arrive; measured are the time
until Serve runs a second replica and until a response comes from it (the
`x-diffusion-serve-replica` header); then the load stops and the copy scales back to 1 before the
next measurement.

    python -m load_tests.bench_scale_reaction --out bench_results/scale_reaction.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

POLICIES = ("queue_aware", "serve_default")


def start(work: Path) -> str:
    import ray
    from ray import serve

    from serve_app.app import assemble
    from serve_app.config import AppConfig
    from tests.conftest import free_port

    ray.init(num_cpus=8, num_gpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    idle = {"ray_actor_options": {"num_cpus": 0}}
    for name in POLICIES:
        store_url = f"sqlite://{work / f'jobs-{name}.sqlite3'}"
        config = AppConfig(profile="demo", auth={"open": True}, files={"directory": str(work / f"files-{name}")}, queue={"store_url": store_url})
        autoscaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "upscale_delay_s": 1, "downscale_delay_s": 5}
        if name == "queue_aware":
            autoscaling["policy"] = {"policy_function": "serve_app.autoscaling:QueueAwarePolicy", "policy_kwargs": {"store_url": store_url, "apps": ["fal-ai/lora"]}}
        sd = {"ray_actor_options": {"num_cpus": 0.5, "num_gpus": 1}, "max_ongoing_requests": 4, "autoscaling_config": autoscaling}
        serve.run(assemble(config, sd, idle, idle), name=name, route_prefix=f"/{name}")
    return f"http://127.0.0.1:{port}"


def running_sd_replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments["StableDiffusion"]
    return status.replica_states.get("RUNNING", 0)


def measure(client: httpx.Client, app: str, backlog: int) -> dict:
    body = {"model_name": "runwayml/stable-diffusion-v1-5", "prompt": "a lighthouse", "image_size": {"width": 128, "height": 128}}
    first = client.post(f"/{app}/fal-ai/lora", json={**body, "num_inference_steps": 4}).headers["x-diffusion-serve-replica"]
    stop = threading.Event()
    marks: dict[str, float] = {}
    t0 = time.perf_counter()
    jobs = [client.post(f"/{app}/queue/fal-ai/lora", json={**body, "num_inference_steps": 20 + i % 7, "seed": i}).json() for i in range(backlog)]

    def sync_client(seed: int) -> None:
        while not stop.is_set():
            response = client.post(f"/{app}/fal-ai/lora", json={**body, "num_inference_steps": 10, "seed": seed})
            if response.headers.get("x-diffusion-serve-replica", first) != first and "serving" not in marks:
                marks["serving"] = time.perf_counter() - t0

    threads = [threading.Thread(target=sync_client, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    deadline = t0 + 300
    while "serving" not in marks and time.perf_counter() < deadline:
        if "running" not in marks and running_sd_replicas(app) >= 2:
            marks["running"] = time.perf_counter() - t0
        time.sleep(0.2)
    stop.set()
    for thread in threads:
        thread.join()
    for job in jobs:  # the backlog drains before the next measurement
        client.put(job["cancel_url"])
    while running_sd_replicas(app) > 1:
        time.sleep(1)
    return {"replica_running_s": marks.get("running"), "new_replica_serving_s": marks.get("serving")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--backlog", type=int, default=100, help="jobs queued at the step")
    parser.add_argument("--out", type=Path, default=Path("bench_results/scale_reaction.json"))
    args = parser.parse_args()
    base = start(Path(tempfile.mkdtemp(prefix="bench-scale-")))
    rounds = []
    with httpx.Client(base_url=base, timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        for r in range(args.rounds):
            result = {name: measure(client, name, args.backlog) for name in POLICIES}
            rounds.append(result)
            print(f"round {r + 1}: {json.dumps(result)}", file=sys.stderr)

    def med(name: str, key: str) -> float | None:
        values = [r[name][key] for r in rounds if r[name][key] is not None]
        return statistics.median(values) if values else None

    summary = {
        "config": {k: str(v) for k, v in vars(args).items()},
        "median_s": {name: {key: med(name, key) for key in ("replica_running_s", "new_replica_serving_s")} for name in POLICIES},
        "rounds": rounds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}, indent=2))


if __name__ == "__main__":
    main()
