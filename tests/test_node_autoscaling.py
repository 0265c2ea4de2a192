"""Node autoscaling, simulated: Ray's fake multi-node provider (what `ray.cluster_utils.AutoscalingCluster`
drives) launches and removes real raylets on this machine as if they were cloud VMs, with the
autoscaler v2 that the RayService runs. The head stands in for the cpu worker group; the node types
are the RayService's `gpu` and `gpu-large` groups, labelled as there, and the app is the RayService's
own serveConfigV2 (cluster/render_kuberay.py), with its label selectors, changed only where one
machine differs (tiny models, a private Redis, local directories, one proxy, short delays).

What it shows: the pending SD and LCM replicas bring up a `gpu` node; a FLUX request, with FLUX at
zero replicas, brings up a `gpu-large` node and is answered from it; once FLUX is idle its replica
goes and then the node goes, while the `gpu` node that SD needs stays.

AutoscalingCluster itself is not started: its start() and shutdown() run `ray stop --force`, which
would take the test session's cluster down too, and its base config (fake_multi_node/example.yaml)
is not in Ray's wheel. The test writes the same provider config and starts the head with it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from cluster.render_kuberay import POOL_LABEL, serve_config_text
from tests.conftest import ALLOWED_NETWORK, AUTH_HEADERS, TEST_AUTH, free_port
from tests.private_redis import PrivateRedis, needs_redis_server
from tests.serve_cluster import ROOT, RayNodes

pytestmark = [pytest.mark.slow, needs_redis_server]

FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"  # the provider's own


def fake_provider_config(gcs_address: str) -> dict:
    """fake_multi_node/example.yaml's shape, with the RayService's GPU groups as node types."""
    def gpu_group(pool: str, gpus: int) -> dict:
        return {"resources": {"CPU": 8, "GPU": gpus, "object_store_memory": 300_000_000}, "labels": {POOL_LABEL: pool},
                "node_config": {}, "min_workers": 0, "max_workers": 1}

    return {
        "cluster_name": "diffusion-serve-fake",
        "max_workers": 2,
        "provider": {
            # Ray's fake provider, loaded as an external one: as `fake_multinode` the autoscaler
            # would read its defaults from example.yaml, which the wheel lacks.
            "type": "external", "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
            "use_node_id_as_ip": True, "disable_node_updaters": True, "disable_launch_config_check": True,
            "gcs_address": gcs_address,  # not the default 6379: that is the machine's Redis
            "launch_multiple": True, "head_node_id": FAKE_HEAD_NODE_ID,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 4}, "node_config": {}, "max_workers": 0},
            "gpu": gpu_group("gpu", 2),
            "gpu-large": gpu_group("gpu-large", 1),
        },
        "head_node_type": "ray.head.default",
        "auth": {}, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,  # the RayService gives a gpu-large node 60 s
        "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }


def rayservice_app_on_one_machine(workdir: Path, port: int, store_url: str) -> Path:
    config = yaml.safe_load(serve_config_text((ROOT / "cluster" / "production.yaml").read_text()))
    config["proxy_location"] = "HeadOnly"  # the fake nodes share one IP and port
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    (app,) = config["applications"]
    args = app["args"]
    args.update(profile="demo", network=ALLOWED_NETWORK, auth={**args["auth"], **TEST_AUTH}, files={**args["files"], "directory": str(workdir / "files")})
    args["queue"] = {**args["queue"], "store_url": store_url}
    args["weights"] = {**args["weights"], "cache_dir": str(workdir / "weights")}
    by_name = {d["name"]: d for d in app["deployments"]}
    assert {d["ray_actor_options"]["label_selector"][POOL_LABEL] for d in by_name.values()} == {"cpu", "gpu", "gpu-large"}
    for deployment in by_name.values():
        scaling = deployment.get("autoscaling_config") or {}
        if "store_url" in (scaling.get("policy") or {}).get("policy_kwargs", {}):
            scaling["policy"]["policy_kwargs"].update(store_url=store_url, poll_interval_s=0.5)
    for name in ("Router", "StableDiffusion", "LCM"):
        by_name[name]["autoscaling_config"].update(max_replicas=1)  # the load here is FLUX's
    by_name["Flux"]["autoscaling_config"].update(look_back_period_s=2, upscale_delay_s=1, downscale_delay_s=5, downscale_to_zero_delay_s=5)
    by_name["Flux"]["graceful_shutdown_timeout_s"] = 10
    path = workdir / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Nodes:
    """Which worker nodes are alive, by pool label, sampled every half second."""

    def __init__(self, cluster: RayNodes) -> None:
        self.cluster = cluster
        self.samples: list[dict[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def alive(self) -> dict[str, int]:
        pools: dict[str, int] = {}
        for node in self.cluster.nodes():
            pool = node["labels"].get(POOL_LABEL)
            if node["state"] == "ALIVE" and pool and not node["is_head_node"]:
                pools[pool] = pools.get(pool, 0) + 1
        return pools

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self.alive())
            except httpx.HTTPError:
                pass
            self._stop.wait(0.5)

    def wait_for(self, wanted: dict[str, int], timeout_s: float, why: str) -> None:
        deadline = time.monotonic() + timeout_s
        while (now := self.alive()) != wanted:
            assert time.monotonic() < deadline, f"{why}: alive worker nodes {now}, wanted {wanted}"
            time.sleep(0.5)

    def __enter__(self) -> Nodes:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture()
def autoscaling_cluster() -> Iterator[tuple[RayNodes, int]]:
    import shutil
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="ds-fake-", dir="/tmp"))
    redis_server = PrivateRedis(workdir).start()
    nodes = RayNodes(workdir, env={
        "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
        "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
        "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    })
    port = free_port()
    provider = workdir / "autoscaling.json"
    provider.write_text(json.dumps(fake_provider_config(nodes.address)))
    try:
        nodes.start_head(
            "--num-cpus=4", "--num-gpus=0", f"--labels={POOL_LABEL}=cpu", f"--autoscaling-config={provider}",
            env={"RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID},
        )
        nodes.serve_deploy(rayservice_app_on_one_machine(workdir, port, redis_server.url))
        yield nodes, port
    finally:
        nodes.kill()
        redis_server.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def test_a_flux_request_adds_a_gpu_large_node_and_idleness_removes_it(autoscaling_cluster):
    cluster, port = autoscaling_cluster
    flux_job = {"prompt": "a harbour", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 4}
    with Nodes(cluster) as nodes, httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH_HEADERS, timeout=300) as http:
        # SD and LCM (min one replica each, label gpu) are pending until the autoscaler adds a gpu node.
        nodes.wait_for({"gpu": 1}, 240, "no gpu node for the pending SD and LCM replicas")
        deadline = time.monotonic() + 300
        while (app := cluster.serve_details().get("applications", {}).get("diffusion-serve", {})).get("status") != "RUNNING":
            assert time.monotonic() < deadline and app.get("status") != "DEPLOY_FAILED", app
            time.sleep(1)
        assert http.post("/fal-ai/lora", json={"model_name": "runwayml/stable-diffusion-v1-5", "prompt": "a boat", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 2}).status_code == 200
        assert nodes.alive() == {"gpu": 1}  # FLUX is at zero: no gpu-large node yet

        # The load: FLUX requests bring up its replica, which needs a gpu-large node.
        replies: list[httpx.Response] = []
        load = [threading.Thread(target=lambda seed=seed: replies.append(http.post("/fal-ai/flux-lora", json={**flux_job, "seed": seed}))) for seed in range(2)]
        for thread in load:
            thread.start()
        nodes.wait_for({"gpu": 1, "gpu-large": 1}, 240, "the FLUX load added no gpu-large node")
        for thread in load:
            thread.join()
        assert [r.status_code for r in replies] == [200, 200], [r.text[:300] for r in replies]
        assert all(r.json()["images"] for r in replies)
        flux_nodes = {r["node_id"] for r in cluster.serve_details()["applications"]["diffusion-serve"]["deployments"]["Flux"]["replicas"]}
        large = {n["node_id"] for n in cluster.nodes() if n["labels"].get(POOL_LABEL) == "gpu-large" and n["state"] == "ALIVE"}
        assert flux_nodes == large, (flux_nodes, large)

        # Idle: FLUX goes back to zero replicas, then its node is removed; the gpu node stays for SD.
        nodes.wait_for({"gpu": 1}, 240, "the idle gpu-large node was not removed")
    assert {"gpu": 1, "gpu-large": 1} in nodes.samples
