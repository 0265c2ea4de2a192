"""LCM realtime and FLUX benchmarks: the stack against the bare diffusers pipeline, side by side.

  lcm_bare       the tiny LCM stand-in (SD1.5 flavour), one call at a time (4 steps, guidance 1)
  lcm_realtime   the same frame through `WS /fal-ai/lcm/realtime`: one msgpack frame in, the
                 output (JPEG data URI) and the timings frame back
  flux_bare      the tiny FLUX stand-in, one call at a time (28 steps, guidance 3.5)
  flux_http      `POST /fal-ai/flux-lora` with the same settings
Calls alternate bare / stack one by one so drift hits both; the paired differences' median is
reported. Target: a realtime round trip adds at most 15 ms to the bare LCM call.

    python -m load_tests.bench_realtime --out bench_results/realtime.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import httpx
import msgpack
import torch
from websockets.sync.client import connect

from load_tests.bench_foundation import start_stack


def bare_lcm(args):
    from diffusers import DiffusionPipeline

    from deployments.tiny_models import ensure_tiny_model

    pipe = DiffusionPipeline.from_pretrained(ensure_tiny_model("sd15-lcm"), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def call(seed: int) -> None:
        pipe(prompt=[f"a cat {seed}"], negative_prompt=[""], height=args.lcm_size, width=args.lcm_size, num_inference_steps=4,
             guidance_scale=1.0, generator=[torch.Generator().manual_seed(seed)])

    return call


def bare_flux(args):
    from diffusers import FluxPipeline

    from deployments.tiny_models import ensure_tiny_model

    pipe = FluxPipeline.from_pretrained(ensure_tiny_model("flux"))
    pipe.set_progress_bar_config(disable=True)

    def call(seed: int) -> None:
        pipe(prompt=[f"a fox {seed}"], height=args.flux_size, width=args.flux_size, num_inference_steps=28, guidance_scale=3.5,
             generator=[torch.Generator().manual_seed(seed)])

    return call


def paired(bare, stack, n: int) -> dict:
    bare_ms, stack_ms = [], []
    for i in range(n):
        started = time.perf_counter()
        bare(1000 + i)
        bare_ms.append(1000 * (time.perf_counter() - started))
        started = time.perf_counter()
        stack(1000 + i)
        stack_ms.append(1000 * (time.perf_counter() - started))
    return {
        "bare_p50_ms": statistics.median(bare_ms),
        "stack_p50_ms": statistics.median(stack_ms),
        "added_ms_paired_median": statistics.median(s - b for s, b in zip(stack_ms, bare_ms)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lcm-size", type=int, default=512)
    parser.add_argument("--flux-size", type=int, default=256)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench_results/realtime.json"))
    args = parser.parse_args()
    args.max_wait_ms, args.no_batching = 50.0, False
    torch.set_num_threads(args.threads)
    lcm, flux = bare_lcm(args), bare_flux(args)
    base = start_stack(args)
    ws = connect(base.replace("http://", "ws://") + "/fal-ai/lcm/realtime", max_size=2**26)
    frame = {"prompt": "a cat", "image_size": {"width": args.lcm_size, "height": args.lcm_size}, "enable_safety_checks": False}

    def realtime(seed: int) -> None:
        ws.send(msgpack.packb({**frame, "prompt": f"a cat {seed}", "seed": seed}))
        output = msgpack.unpackb(ws.recv(), raw=False)
        assert output["images"], output
        json.loads(ws.recv())  # the timings frame

    client = httpx.Client(base_url=base, timeout=300)

    def flux_http(seed: int) -> None:
        response = client.post("/fal-ai/flux-lora", json={"prompt": f"a fox {seed}", "seed": seed, "image_size": {"width": args.flux_size, "height": args.flux_size},
                                                          "enable_safety_checker": False})
        response.raise_for_status()

    for warm in range(3):
        lcm(warm), realtime(warm), flux(warm), flux_http(warm)
    summary = {
        "config": {k: str(v) for k, v in vars(args).items()},
        "lcm_realtime": paired(lcm, realtime, args.requests),
        "flux_http": paired(flux, flux_http, max(10, args.requests // 3)),
    }
    summary["targets"] = {"realtime_adds_at_most_15ms": summary["lcm_realtime"]["added_ms_paired_median"] <= 15}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
