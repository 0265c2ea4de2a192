"""Autoscaling under a step load, for real: a cluster with 4 (fake) GPUs runs the demo profile
with production's scaling shape (a whole GPU per SD and FLUX replica, FLUX scaled to zero, the
queue-aware policy on both); a load of sync calls and a queued backlog drives StableDiffusion from
1 replica to 3 and FLUX from 0 to 1, and after the load both go back to their minimum, with every
request answered and every job completed along the way.

The cluster is its own `serve run` (RAY_OVERRIDE_RESOURCES gives it the GPUs), with Serve's
metric push intervals shortened so that the test takes a minute or two rather than ten; replica
counts are read from Ray's dashboard API, as `serve status` reads them.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import free_port
from tests.serve_cluster import ROOT, ServeRun, dashboard_headers, wait_until_serving

pytestmark = pytest.mark.slow

DASHBOARD = "http://127.0.0.1:8265"


def scaling_config(workdir: Path, port: int) -> Path:
    config = yaml.safe_load((ROOT / "cluster" / "demo.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    (app,) = config["applications"]
    store_url = f"sqlite://{workdir / 'jobs.sqlite3'}"
    app["args"].update(
        files={"directory": str(workdir / "files")},
        weights={"cache_dir": str(workdir / "weights")},
        queue={"store_url": store_url, "dispatch_slots": 16},
    )

    def queue_aware(apps: list[str], **limits) -> dict:
        return {
            "target_ongoing_requests": 2,
            "look_back_period_s": 2,
            "upscale_delay_s": 1,
            "downscale_delay_s": 8,
            **limits,
            "policy": {"policy_function": "serve_app.autoscaling:QueueAwarePolicy", "policy_kwargs": {"store_url": store_url, "apps": apps, "poll_interval_s": 0.5}},
        }

    by_name = {d["name"]: d for d in app["deployments"]}
    for name in ("StableDiffusion", "Flux"):
        by_name[name].pop("num_replicas", None)
        by_name[name]["ray_actor_options"].update(num_gpus=1, num_cpus=0.25)
        by_name[name]["graceful_shutdown_timeout_s"] = 60  # a scale-down drains the replica's batches
    # A replica takes 4 requests at once; more spill over to the other replicas (Serve routes a
    # model's requests to the replicas that hold it until they are full).
    by_name["StableDiffusion"]["max_ongoing_requests"] = 4
    by_name["StableDiffusion"]["autoscaling_config"] = queue_aware(["fal-ai/lora"], min_replicas=1, max_replicas=3)
    by_name["Flux"]["autoscaling_config"] = queue_aware(["fal-ai/flux-lora"], min_replicas=0, initial_replicas=0, max_replicas=1, downscale_to_zero_delay_s=8)
    router = by_name["Router"]
    router.pop("num_replicas", None)
    router["autoscaling_config"] = {
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 64,
        "policy": {"policy_function": "serve_app.autoscaling:RouterCpuPolicy", "policy_kwargs": {"target_utilization": 0.9}},
    }
    path = workdir / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def running_replicas(http_port: int) -> dict[str, int] | None:
    """RUNNING replicas per deployment of our app, from the dashboard (None until it answers for us)."""
    try:
        details = httpx.get(f"{DASHBOARD}/api/serve/applications/", headers=dashboard_headers(), timeout=5).json()
    except (httpx.HTTPError, json.JSONDecodeError):
        return None
    if (details.get("http_options") or {}).get("port") != http_port:
        return None  # someone else's dashboard
    app = details.get("applications", {}).get("diffusion-serve")
    if not app:
        return None
    return {name: sum(r["state"] == "RUNNING" for r in d["replicas"]) for name, d in app["deployments"].items()}


class Watcher:
    """Samples the replica counts every second in the background."""

    def __init__(self, http_port: int) -> None:
        self.http_port = http_port
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            counts = running_replicas(self.http_port)
            if counts is not None:
                self.samples.append((time.monotonic(), counts))
            self._stop.wait(1.0)

    def start(self) -> Watcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, deployment: str) -> int:
        return max((counts.get(deployment, 0) for _, counts in self.samples), default=0)

    def now(self, deployment: str) -> int | None:
        return self.samples[-1][1].get(deployment, 0) if self.samples else None


def test_a_step_load_scales_sd_up_to_three_and_flux_from_zero_and_both_back_with_no_request_failing(serve_workdir):
    port = free_port()
    fast_metrics = {
        "RAY_OVERRIDE_RESOURCES": json.dumps({"CPU": 8, "GPU": 4}),
        "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
        "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    }
    run = ServeRun(scaling_config(serve_workdir, port), serve_workdir, env=fast_metrics)
    sd_job = {"model_name": "runwayml/stable-diffusion-v1-5", "prompt": "a harbour", "image_size": {"width": 128, "height": 128}}
    flux_job = {"prompt": "a harbour", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 4}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as http:
        run.start()
        watcher = Watcher(port)
        try:
            wait_until_serving(http, run)
            watcher.start()
            deadline = time.monotonic() + 120
            while watcher.now("StableDiffusion") != 1:
                assert time.monotonic() < deadline, f"the app never came up with one SD replica: {watcher.samples[-3:]}\n{run.tail()}"
                time.sleep(0.5)
            assert watcher.now("Flux") == 0  # scaled to zero from the start

            # The step: a backlog in the queue (incompatible step counts: no batch merges them) and
            # four clients making sync calls until SD has its third replica.
            jobs = [http.post("/queue/fal-ai/lora", json={**sd_job, "num_inference_steps": 20 + i % 7, "seed": i}) for i in range(60)]
            flux_jobs = [http.post("/queue/fal-ai/flux-lora", json={**flux_job, "seed": i}) for i in range(2)]
            assert all(r.status_code == 200 for r in jobs + flux_jobs), [r.text for r in jobs + flux_jobs if r.status_code != 200][:2]
            sync_codes: list[int] = []
            replicas_seen: set[str] = set()
            loaded = threading.Event()

            def client(seed: int) -> None:
                while not loaded.is_set():
                    response = http.post("/fal-ai/lora", json={**sd_job, "num_inference_steps": 8, "seed": seed})
                    sync_codes.append(response.status_code)
                    replicas_seen.add(response.headers.get("x-diffusion-serve-replica", ""))

            clients = [threading.Thread(target=client, args=(seed,)) for seed in range(4)]
            for thread in clients:
                thread.start()
            deadline = time.monotonic() + 240
            while watcher.peak("StableDiffusion") < 3 or watcher.peak("Flux") < 1:
                assert time.monotonic() < deadline, f"no scale-up: {watcher.samples[-3:]}\n{run.tail()}"
                time.sleep(0.5)
            time.sleep(5)  # the new replicas serve part of the load
            loaded.set()
            for thread in clients:
                thread.join()

            # Every queued job completes, with its image.
            for response in jobs + flux_jobs:
                status_url, response_url = response.json()["status_url"], response.json()["response_url"]
                for _ in range(3000):
                    if http.get(status_url).status_code == 200:
                        break
                    time.sleep(0.1)
                result = http.get(response_url)
                assert result.status_code == 200 and result.json()["images"], result.text[:300]
            assert sync_codes and set(sync_codes) == {200}, sync_codes

            # A trickle: back to the minimum, FLUX to zero, and the replicas that go drain first (a
            # request in flight on one finishes before it stops).
            scaled_down = threading.Event()
            trickle_codes: list[int] = []

            def trickle() -> None:
                while not scaled_down.is_set():
                    trickle_codes.append(http.post("/fal-ai/lora", json={**sd_job, "num_inference_steps": 12}).status_code)

            trickler = threading.Thread(target=trickle)
            trickler.start()
            try:
                deadline = time.monotonic() + 180
                while not (watcher.now("StableDiffusion") == 1 and watcher.now("Flux") == 0):
                    assert time.monotonic() < deadline, f"no scale-down: {watcher.samples[-3:]}\n{run.tail()}"
                    time.sleep(0.5)
            finally:
                scaled_down.set()
                trickler.join()
            assert trickle_codes and set(trickle_codes) == {200}, trickle_codes
        finally:
            watcher.stop()
            run.kill()
    assert watcher.peak("StableDiffusion") >= 3 and watcher.peak("Flux") == 1
    assert len(replicas_seen - {""}) >= 2, replicas_seen  # sync calls were served by more than the first replica
