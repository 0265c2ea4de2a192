"""Which Ray Serve settings shave the stack's fixed cost at one client? Side by side, in one run.

Deploys the same application several times in one Serve instance, each copy with different
per-process settings in its replicas' `runtime_env` (they are read when a replica starts), and
sends single requests to the copies in turn, so machine drift hits all alike:

  plain      Ray Serve's defaults
  threads    user code on the replica's event loop, and the handle's router on it too
             (RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0, RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0)
  inline     results up to 4 MiB returned inline instead of through the object store
             (RAY_max_direct_call_object_size)
  both       threads + inline

    python -m load_tests.bench_serve_tuning --out bench_results/serve_tuning.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import httpx

from load_tests.bench_foundation import post

THREADS = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}
INLINE = {"RAY_max_direct_call_object_size": str(4 * 1024 * 1024)}
VARIANTS = {"plain": {}, "threads": THREADS, "inline": INLINE, "both": {**THREADS, **INLINE}}


def deploy(args) -> str:
    import ray
    from ray import serve

    from deployments.adapters import AdapterFetcher
    from deployments.flux import Flux
    from deployments.stable_diffusion import LCM, StableDiffusion
    from serve_app.config import AppConfig
    from serve_app.router import Router
    from tests.conftest import free_port

    ray.init(num_cpus=2 * len(VARIANTS) + 2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = AppConfig(profile="demo", auth={"open": True}, device={"cpu_threads": args.threads}, batching={"max_wait_ms": 50}).model_dump(mode="json")
    for name, env in VARIANTS.items():
        options = {"num_cpus": 1, "runtime_env": {"env_vars": env}}
        fetcher = AdapterFetcher.bind(settings)
        model = StableDiffusion.options(ray_actor_options=options).bind(settings, fetcher)
        idle = {"num_cpus": 0}  # present because the router needs them; not measured
        lcm, flux = LCM.options(ray_actor_options=idle).bind(settings, fetcher), Flux.options(ray_actor_options=idle).bind(settings, fetcher)
        serve.run(Router.options(ray_actor_options=options).bind(model, lcm, flux, settings), name=name, route_prefix=f"/{name}")
    return f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--requests", type=int, default=60, help="requests per variant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--format", default="jpeg")
    parser.add_argument("--out", type=Path, default=Path("bench_results/serve_tuning.json"))
    args = parser.parse_args()
    base = deploy(args)
    clients = {name: httpx.Client(base_url=f"{base}/{name}", timeout=300) for name in VARIANTS}
    latencies: dict[str, list[float]] = {name: [] for name in VARIANTS}
    phases: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for name, client in clients.items():  # warm up: model load, first-call allocations
        for i in range(3):
            post(client, args, i)
    for i in range(args.requests):
        for name, client in clients.items():
            latencies[name].append(1000 * post(client, args, 100 + i, phases[name])[0])
    summary = {
        name: {
            "p50_ms": statistics.median(latencies[name]),
            "inference_p50_ms": statistics.median(p["inference"] for p in phases[name]),
            "overhead_p50_ms": statistics.median(l_ - p["inference"] for l_, p in zip(latencies[name], phases[name])),
            "phases_p50_ms": {k: statistics.median(p[k] for p in phases[name]) for k in phases[name][0]},
        }
        for name in VARIANTS
    }
    for name in VARIANTS:
        summary[name]["overhead_vs_plain_ms"] = summary[name]["overhead_p50_ms"] - summary["plain"]["overhead_p50_ms"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()}, "variants": summary}, indent=2))
    print(json.dumps({n: {k: (round(v, 2) if isinstance(v, float) else v) for k, v in s.items() if k != "phases_p50_ms"} for n, s in summary.items()}, indent=2), file=sys.stdout)


if __name__ == "__main__":
    main()
