"""GCS fault tolerance, for real: the multi-node cluster of test_multinode.py with the GCS kept in
Redis (`RAY_REDIS_ADDRESS`, what the RayService's gcsFaultToleranceOptions sets), and the head
SIGKILLed (GCS, dashboard, Serve controller, the proxy) mid-queue, then started again at the same
address. The workers' replicas live through it, not restarted; the app comes back without a
redeploy; every job accepted before the crash ends with its image.

On one machine the only HTTP proxy is the head's (see test_multinode.py), so requests wait for
the head to come back; on a real cluster the workers' proxies keep serving meanwhile.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import httpx
import pytest

from tests.conftest import AUTH_HEADERS, free_port, results_when_done
from tests.private_redis import PrivateRedis, needs_redis_server
from tests.serve_cluster import RayNodes
from tests.test_multinode import SMALL, WORKERS, Cluster, production_on_one_machine, wait_until_deployed

pytestmark = [pytest.mark.slow, needs_redis_server]


def replica_ids(cluster: Cluster) -> dict[str, set[str]]:
    deployments = cluster.nodes.serve_details()["applications"]["diffusion-serve"]["deployments"]
    return {name: {r["replica_id"] for r in d["replicas"] if r["state"] == "RUNNING"} for name, d in deployments.items()}


def test_the_head_dies_and_comes_back_and_the_workers_replicas_and_the_queue_live_through_it():
    workdir = Path(tempfile.mkdtemp(prefix="ds-gcsft-", dir="/tmp"))
    redis_server = PrivateRedis(workdir).start()
    gcs_store = redis_server.url.rsplit("/", 1)[0].removeprefix("redis://")  # db 0 for the GCS,
    jobs_url = redis_server.url.rsplit("/", 1)[0] + "/1"  # db 1 for the jobs, as on KubeRay
    nodes = RayNodes(workdir)
    port = free_port()
    try:
        nodes.start_head("--num-cpus=0", "--num-gpus=0", env={"RAY_REDIS_ADDRESS": gcs_store})
        for worker in WORKERS:
            nodes.add_worker(worker, "--num-cpus=8", "--num-gpus=2", env={"DIFFUSION_SERVE_WEIGHTS__CACHE_DIR": str(workdir / worker / "weights")})
        nodes.serve_deploy(production_on_one_machine(workdir, port, jobs_url))
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH_HEADERS, timeout=120) as http:
            cluster = Cluster(nodes, http, workdir, jobs_url)
            wait_until_deployed(cluster)
            before = replica_ids(cluster)
            jobs = [http.post("/queue/fal-ai/lora", json={**SMALL, "num_inference_steps": 12, "seed": seed}).json() for seed in range(6)]

            nodes.kill_head()
            with pytest.raises(httpx.HTTPError):
                http.get("/health", timeout=5)  # the proxy went with the head
            nodes.restart_head()
            wait_until_deployed(cluster)

            after = replica_ids(cluster)
            for name in ("Router", "StableDiffusion", "LCM", "AdapterFetcher"):
                assert after[name] == before[name], (name, before[name], after[name])  # the same replicas, never restarted
            results = results_when_done(http, jobs, 180)
            assert len(results) == len(jobs), f"{len(jobs) - len(results)} jobs accepted before the crash never ended"
            assert sorted(r.json()["seed"] for r in results.values()) == list(range(6))
            assert http.post("/fal-ai/lora", json=SMALL).status_code == 200
    finally:
        nodes.kill()
        redis_server.kill()
        shutil.rmtree(workdir, ignore_errors=True)
