"""Foundation benchmark: the full stack against the bare diffusers pipeline, side by side in one run.

Measures, on the tiny SDXL stand-in:
  bare_single   the bare pipeline called one request at a time (latency p50, images/s)
  bare_batch8   the bare pipeline with 8 prompts per call (images/s)
  stack_c1      the whole stack over HTTP, 1 client (latency p50)
  stack_c8      the whole stack over HTTP, 8 concurrent clients (images/s)
Within a round, single requests alternate bare/stack call by call, and the batched measurements
follow each other; medians over rounds of the per-round differences and ratios are reported, as
the targets are stated in them (these machines are noisy; never compare figures across runs):
  stack_c1 p50 - bare_single p50 <= 20 ms      stack_c8 images/s >= 0.85 x bare_batch8 images/s

    python -m load_tests.bench_foundation --out bench_results/foundation.json
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import httpx
import torch

SDXL = "stabilityai/stable-diffusion-xl-base-1.0"


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def bare_pipeline():
    from diffusers import StableDiffusionXLPipeline

    from deployments.tiny_models import ensure_tiny_model

    pipe = StableDiffusionXLPipeline.from_pretrained(ensure_tiny_model("sdxl"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bare_call(pipe, args, n: int, seed: int) -> None:
    import numpy as np

    from serve_app.files import encode_image

    out = pipe(
        prompt=[f"photo {seed + i}" for i in range(n)],
        negative_prompt=[""] * n,
        height=args.size,
        width=args.size,
        num_inference_steps=args.steps,
        guidance_scale=7.5,
        generator=[torch.Generator().manual_seed(seed + i) for i in range(n)],
    )
    if args.bare_encodes:
        for image in out.images:
            encode_image(np.asarray(image), args.format)


def measure_bare_batch(pipe, args) -> dict:
    calls = 5  # as many pipeline calls as the stack makes for 40 requests at batch 8
    started = time.perf_counter()
    for i in range(calls):
        bare_call(pipe, args, 8, i * 8)
    elapsed = time.perf_counter() - started
    return {"images_per_s": 8 * calls / elapsed, "call_ms": 1000 * elapsed / calls}


def stack_body(args, seed: int, **extra) -> dict:
    return {
        **extra,
        "model_name": SDXL,
        "prompt": f"photo {seed}",
        "image_size": {"width": args.size, "height": args.size},
        "num_inference_steps": args.steps,
        "guidance_scale": 7.5,
        "seed": seed,
        "image_format": args.format,
    }


def post(client: httpx.Client, args, seed: int, timings: list | None = None, **extra) -> tuple[float, int]:
    started = time.perf_counter()
    response = client.post("/fal-ai/lora", json=stack_body(args, seed, **extra))
    response.raise_for_status()
    elapsed = time.perf_counter() - started
    if timings is not None:
        phases = {k: float(v) for k, v in re.findall(r"(\w+);dur=([\d.]+)", response.headers["server-timing"])}
        phases["outside_router"] = 1000 * elapsed - phases["input"] - phases["model"] - phases["publish"]
        phases["router_to_replica"] = phases["model"] - phases["inference"]
        timings.append(phases)
    return elapsed, int(response.headers["x-diffusion-serve-batch-size"])


def measure_single(pipe, client: httpx.Client, args) -> dict:
    """Bare and stack one request at a time, alternating call by call so drift hits both alike."""
    bare, stack, timings = [], [], []
    for i in range(args.requests):
        started = time.perf_counter()
        bare_call(pipe, args, 1, i)
        bare.append(time.perf_counter() - started)
        stack.append(post(client, args, i, timings)[0])
    return {
        "bare_single": {"p50_ms": 1000 * statistics.median(bare), "p90_ms": 1000 * percentile(bare, 0.9), "images_per_s": len(bare) / sum(bare)},
        "stack_c1": {"p50_ms": 1000 * statistics.median(stack), "p90_ms": 1000 * percentile(stack, 0.9), "images_per_s": len(stack) / sum(stack)},
        "paired_overhead_ms": [1000 * (s_ - b_) for s_, b_ in zip(stack, bare)],
        "stack_c1_phases_ms": {k: statistics.median(t[k] for t in timings) for k in timings[0]},
    }


def measure_stack_concurrent(client: httpx.Client, args, clients: int, total: int | None = None, extra=None) -> dict:
    """Closed loop: `clients` threads, each sending its next request when the last one returns.

    `extra(i)` adds fields to request i (LoRAs, say)."""
    total = total or max(args.requests, clients * 5)
    started = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda seed: post(client, args, seed, **(extra(seed) if extra else {})), range(total)))
    elapsed = time.perf_counter() - started
    latencies = [r[0] for r in results]
    return {
        "p50_ms": 1000 * statistics.median(latencies),
        "p90_ms": 1000 * percentile(latencies, 0.9),
        "images_per_s": total / elapsed,
        "mean_batch_size": statistics.mean(r[1] for r in results),
    }


def start_stack(args, **config_overrides) -> str:
    import ray
    from ray import serve

    from serve_app.app import assemble
    from serve_app.config import AppConfig
    from tests.conftest import free_port

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = AppConfig(
        profile="demo",
        auth={"open": True},
        device={"cpu_threads": args.threads},
        batching={"max_wait_ms": args.max_wait_ms, "enabled": not args.no_batching},
        **config_overrides,
    )
    serve.run(assemble(config, {"ray_actor_options": {"num_cpus": 1}}), name="bench", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--requests", type=int, default=20, help="requests per measurement per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads, bare and replica alike")
    parser.add_argument("--max-wait-ms", type=float, default=50.0)
    parser.add_argument("--no-batching", action="store_true")
    parser.add_argument("--format", choices=["jpeg", "png"], default="jpeg", help="output format (the seed sample's is jpeg)")
    parser.add_argument("--bare-encodes", action="store_true", help="charge image encoding to the bare pipeline too")
    parser.add_argument("--out", type=Path, default=Path("bench_results/foundation.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    pipe = bare_pipeline()
    url = start_stack(args)
    rounds = []
    with httpx.Client(base_url=url, timeout=300, limits=httpx.Limits(max_connections=64)) as client:
        # Warm up both sides: model load, first-call allocations, connection setup.
        bare_call(pipe, args, 8, 0)
        for _ in range(3):
            client.post("/fal-ai/lora", json=stack_body(args, 0)).raise_for_status()
        for r in range(args.rounds):
            result = {
                **measure_single(pipe, client, args),
                "bare_batch8": measure_bare_batch(pipe, args),
                "stack_c8": measure_stack_concurrent(client, args, 8),
            }
            rounds.append(result)
            shown = {k: {m: round(v, 2) for m, v in d.items()} for k, d in result.items() if isinstance(d, dict) and k != "stack_c1_phases_ms"}
            print(f"round {r + 1}: " + json.dumps(shown), file=sys.stderr)

    def med(key: str, metric: str) -> float:
        return statistics.median(r[key][metric] for r in rounds)

    summary = {
        "config": {**vars(args), "out": str(args.out), "cpu_count": os.cpu_count(), "torch": torch.__version__},
        "bare_single_p50_ms": med("bare_single", "p50_ms"),
        "stack_c1_p50_ms": med("stack_c1", "p50_ms"),
        # Median over every (stack call - the bare call just before it) pair of every round.
        "stack_c1_overhead_ms": statistics.median(d for r in rounds for d in r["paired_overhead_ms"]),
        "stack_c1_overhead_ms_per_round": [statistics.median(r["paired_overhead_ms"]) for r in rounds],
        "stack_c1_phases_ms": {k: statistics.median(r["stack_c1_phases_ms"][k] for r in rounds) for k in rounds[0]["stack_c1_phases_ms"]},
        "bare_single_images_per_s": med("bare_single", "images_per_s"),
        "bare_batch8_images_per_s": med("bare_batch8", "images_per_s"),
        "stack_c8_images_per_s": med("stack_c8", "images_per_s"),
        "stack_c8_mean_batch_size": med("stack_c8", "mean_batch_size"),
        "stack_c8_vs_bare_batch8": statistics.median(r["stack_c8"]["images_per_s"] / r["bare_batch8"]["images_per_s"] for r in rounds),
        "rounds": rounds,
    }
    summary["targets"] = {
        "c1_overhead_within_20ms": summary["stack_c1_overhead_ms"] <= 20.0,
        "c8_at_least_85pct_of_bare_batch8": summary["stack_c8_vs_bare_batch8"] >= 0.85,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("rounds",)}, indent=2))


if __name__ == "__main__":
    main()
