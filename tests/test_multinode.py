"""A real multi-node Ray cluster on one machine: `ray start --head` (no CPUs or GPUs of its own, as on
KubeRay) and two GPU workers (fake GPUs), each its own raylet with its own weights cache directory,
as each pod has its own disk. `cluster/production.yaml` goes on it with `serve deploy`, changed only
where one machine differs from a real cluster:

- tiny stand-ins for every model (the demo profile's resolution) and the test's API key;
- the job store (and the queue-aware policy's view of it) on a Redis of the test's own;
- two Router and two StableDiffusion replicas, at most one per node, so both workers serve;
- one HTTP proxy, on the head: every node here shares one IP and port 8000 (on a real cluster
  `EveryNode` puts one on each node).

What it shows: replicas on both workers answer requests; an adapter is downloaded once for the
whole cluster and stored once on each node that uses it; the routers on both nodes answer for jobs
in one shared store, whichever of them took the job, and share each key's rate limit; and when a
worker node dies (its processes SIGKILLed at once), every accepted job still ends with its image,
served by the node that is left.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from deployments.tiny_models import ensure_tiny_model
from serve_app.queue import open_store
from tests.conftest import ALLOWED_NETWORK, AUTH_HEADERS, LIMITED_KEY, TEST_AUTH, free_port, results_when_done
from tests.private_redis import PrivateRedis, needs_redis_server
from tests.serve_cluster import ROOT, RayNodes

pytestmark = [pytest.mark.slow, needs_redis_server]

WORKERS = ("worker-a", "worker-b")
SMALL = {"model_name": "runwayml/stable-diffusion-v1-5", "prompt": "a lighthouse", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 2}


def production_on_one_machine(workdir: Path, port: int, store_url: str) -> Path:
    config = yaml.safe_load((ROOT / "cluster" / "production.yaml").read_text())
    config["proxy_location"] = "HeadOnly"
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    (app,) = config["applications"]
    args = app["args"]
    args.update(profile="demo", network=ALLOWED_NETWORK, auth={**args["auth"], **TEST_AUTH}, files={**args["files"], "directory": str(workdir / "files")})
    # Leases of 5 s rather than 30: the node-loss test waits one out.
    args["queue"] = {**args["queue"], "store_url": store_url, "lease_s": 5.0}
    assert "weights" not in args, "production.yaml sets no weights cache: each node resolves its own"
    by_name = {d["name"]: d for d in app["deployments"]}
    for deployment in by_name.values():
        policy = (deployment.get("autoscaling_config") or {}).get("policy")
        if policy and "store_url" in policy.get("policy_kwargs", {}):
            policy["policy_kwargs"]["store_url"] = store_url
    for name in ("Router", "StableDiffusion"):
        by_name[name].pop("autoscaling_config")
        by_name[name].update(num_replicas=2, max_replicas_per_node=1)
    # Two requests at a time per SD replica: a burst of eight spills over to the other node.
    by_name["StableDiffusion"]["max_ongoing_requests"] = 2
    path = workdir / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Cluster:
    def __init__(self, nodes: RayNodes, http: httpx.Client, workdir: Path, store_url: str) -> None:
        self.nodes = nodes
        self.http = http
        self.workdir = workdir
        self.store_url = store_url

    def node_names(self) -> dict[str, str]:
        """node_id -> the name the test gave it (`head` for the one without a label)."""
        return {n["node_id"]: n["labels"].get("diffusion-serve/node", "head") for n in self.nodes.nodes()}

    def replica_nodes(self) -> dict[str, list[str]]:
        """The node of every RUNNING replica, per deployment."""
        names = self.node_names()
        deployments = self.nodes.serve_details()["applications"]["diffusion-serve"]["deployments"]
        return {name: sorted(names[r["node_id"]] for r in d["replicas"] if r["state"] == "RUNNING") for name, d in deployments.items()}

    def node_cache(self, worker: str) -> Path:
        return self.workdir / worker / "weights"

    def counter(self, node: str, name: str, **labels: str) -> float:
        """The sum of one counter over the processes on one node, from that node's metrics agent."""
        text = self.nodes.metrics(node)
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        )


def wait_until_deployed(cluster: Cluster, timeout_s: float = 420) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            app = cluster.nodes.serve_details().get("applications", {}).get("diffusion-serve")
            if app and app["status"] == "RUNNING" and cluster.http.get("/health").status_code == 200:
                return
            if app and app["status"] in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise AssertionError(f"the application failed: {app.get('message')}")
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"the application was not RUNNING in {timeout_s} s: {cluster.nodes.serve_details()}")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    import shutil
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="ds-nodes-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    redis_server = PrivateRedis(workdir).start()
    nodes = RayNodes(workdir)
    port = free_port()
    try:
        nodes.start_head("--num-cpus=0", "--num-gpus=0", '--system-config={"metrics_report_interval_ms":1000}')
        for worker in WORKERS:
            # A node's own disk: the replicas there resolve the (unset) weights cache from it. The
            # head, where Serve builds the app, sets none, so none is fixed into the app's args.
            nodes.add_worker(worker, "--num-cpus=8", "--num-gpus=2", env={"DIFFUSION_SERVE_WEIGHTS__CACHE_DIR": str(workdir / worker / "weights")})
        nodes.serve_deploy(production_on_one_machine(workdir, port, redis_server.url))
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH_HEADERS, timeout=120) as http:
            running = Cluster(nodes, http, workdir, redis_server.url)
            wait_until_deployed(running)
            yield running
    finally:
        nodes.kill()
        redis_server.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def test_router_and_stable_diffusion_replicas_run_on_both_workers(cluster):
    placed = cluster.replica_nodes()
    assert placed["Router"] == list(WORKERS) and placed["StableDiffusion"] == list(WORKERS), placed
    assert len(placed["AdapterFetcher"]) == 1 and placed["LCM"] and placed["Flux"] == []  # FLUX waits at zero
    assert cluster.http.post("/fal-ai/lcm", json={"prompt": "a boat", "image_size": {"width": 64, "height": 64}}).status_code == 200


def test_an_adapter_is_downloaded_once_per_cluster_and_stored_once_per_node(cluster, image_server):
    lora = next(ensure_tiny_model("sd15-lora-a").glob("*.safetensors")).read_bytes()
    url = image_server.add("/multinode/style.safetensors", lora, "application/octet-stream")
    def images(node: str) -> float:
        return cluster.counter(node, "ray_diffusion_serve_images_total", deployment="StableDiffusion")

    images_before = {w: images(w) for w in WORKERS}
    request = {**SMALL, "loras": [{"path": url, "scale": 0.8}]}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda seed: cluster.http.post("/fal-ai/lora", json={**request, "seed": seed}), range(8)))
    assert [r.status_code for r in replies] == [200] * 8, [r.text for r in replies if r.status_code != 200]

    # Both workers' SD replicas made some of the images (each node's metrics agent reports its own).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        made = {w: images(w) - images_before[w] for w in WORKERS}
        if sum(made.values()) >= 8:
            break
        time.sleep(1)
    assert sum(made.values()) == 8 and all(made.values()), made

    assert image_server.hits["/multinode/style.safetensors"] == 1  # once for the whole cluster
    digest = hashlib.sha256(lora).hexdigest()
    for worker in WORKERS:
        holding = [p for p in cluster.node_cache(worker).rglob("*.safetensors") if hashlib.sha256(p.read_bytes()).hexdigest() == digest]
        # The fetcher's node links its copy into the node cache; the other node pulled one copy.
        assert len({p.stat().st_ino for p in holding}) == 1, (worker, holding)


def test_routers_on_both_nodes_answer_for_jobs_in_the_one_store(cluster):
    def router_requests(node: str) -> float:
        return cluster.counter(node, "ray_serve_deployment_request_counter_total", deployment="Router")

    before = {w: router_requests(w) for w in WORKERS}
    submitted = [cluster.http.post("/queue/fal-ai/lora", json={**SMALL, "seed": seed}) for seed in range(6)]
    assert [r.status_code for r in submitted] == [200] * 6
    calls = len(submitted)
    for job in (r.json() for r in submitted):
        for _ in range(600):
            status = cluster.http.get(job["status_url"])
            calls += 1
            assert status.status_code in (200, 202), status.text  # whichever router answers knows the job
            if status.json()["status"] == "COMPLETED":
                break
            time.sleep(0.1)
        for _ in range(3):  # the result, read three times: by either router
            result = cluster.http.get(job["response_url"])
            calls += 1
            assert result.status_code == 200 and result.json()["images"][0]["width"] == 64
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        served = {w: router_requests(w) - before[w] for w in WORKERS}
        if sum(served.values()) >= calls:
            break
        time.sleep(1)
    # Every call reached one of the two routers, and both took a share: the router that took a job
    # and the one that answered for it were not always the same, yet every answer was right.
    assert sum(served.values()) == calls and all(served.values()), served


def test_a_keys_rate_limit_holds_across_the_routers_on_both_nodes(cluster):
    """LIMITED_KEY may make two requests a minute: the routers take from one bucket in Redis, so
    two of six get through, not two per router."""
    headers = {"Authorization": f"Key {LIMITED_KEY}"}
    codes = [cluster.http.get(f"/queue/fal-ai/lora/requests/{uuid.uuid4()}/status", headers=headers).status_code for _ in range(6)]
    assert codes.count(429) == 4 and codes.count(404) == 2, codes  # 404: admitted, no such job


def test_when_a_worker_node_dies_every_accepted_job_still_ends_with_its_image(cluster):
    """Last in this module: it takes worker-b away. Its router's claimed jobs wait out their lease
    and run again; its SD replica's job is given back; the router and SD on worker-a serve on."""
    jobs = [cluster.http.post("/queue/fal-ai/lora", json={**SMALL, "num_inference_steps": 12, "seed": seed}).json() for seed in range(8)]
    for _ in range(300):
        if any(cluster.http.get(j["status_url"]).json()["status"] == "IN_PROGRESS" for j in jobs):
            break
        time.sleep(0.05)
    cluster.nodes.kill_node("worker-b")

    results = results_when_done(cluster.http, jobs, 240)  # a poll that reached the dead router is tried again
    assert len(results) == len(jobs), f"{len(jobs) - len(results)} accepted jobs never ended"
    assert sorted(r.json()["seed"] for r in results.values()) == list(range(8))
    assert all(r.status_code == 200 and r.json()["images"] for r in results.values())

    async def attempts() -> list[int]:
        store = open_store(cluster.store_url)
        records = [await store.get(job["request_id"]) for job in jobs]
        await store.close()
        return [r.attempts for r in records]

    assert max(asyncio.run(attempts())) >= 2  # the dead node's share of the work really ran again
    # Ray marks the node dead once its health checks fail; Serve then drops its replicas.
    deadline = time.monotonic() + 120
    while True:
        states = {n["labels"].get("diffusion-serve/node"): n["state"] for n in cluster.nodes.nodes()}
        survivor = cluster.replica_nodes()
        if states["worker-b"] == "DEAD" and survivor["Router"] == survivor["StableDiffusion"] == ["worker-a"]:
            break
        assert time.monotonic() < deadline, (states, survivor)
        time.sleep(1)
    assert cluster.http.post("/fal-ai/lora", json=SMALL).status_code == 200
