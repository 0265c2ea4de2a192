"""LoRA benchmark: 8 distinct LoRAs, two per request, round robin, against no LoRAs, in one run.

On the tiny SDXL stand-in through the whole stack over HTTP. Rounds alternate a no-LoRA phase and
a hot-LoRA phase (every LoRA already downloaded and injected), at 1 client and at 8 concurrent
clients; the cold cost is the first request naming two LoRAs the cluster has never seen (download,
validation, injection) against the same request once hot.
Target: hot LoRA throughput >= 0.8x the no-LoRA throughput.

    python -m load_tests.bench_loras --out bench_results/loras.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from deployments.tiny_models import _build_lora
from load_tests.bench_foundation import measure_stack_concurrent, post, start_stack
from tests.conftest import IMAGE_HOST, ImageServer

N_LORAS = 8


def lora_pair(i: int, urls: list[str]) -> list[dict]:
    return [{"path": urls[i % N_LORAS], "scale": 0.8}, {"path": urls[(i + 1) % N_LORAS], "scale": 0.5}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--requests", type=int, default=16, help="requests per phase per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-wait-ms", type=float, default=50.0)
    parser.add_argument("--format", default="jpeg")
    parser.add_argument("--out", type=Path, default=Path("bench_results/loras.json"))
    args = parser.parse_args()
    args.no_batching = False
    torch.set_num_threads(args.threads)

    files = Path(tempfile.mkdtemp(prefix="bench-loras-"))
    server = ImageServer()
    urls = []
    for i in range(N_LORAS + 2):  # two spare LoRAs for the cold measurement
        _build_lora(files / str(i), "sdxl", 1000 + i, kohya=False)
        urls.append(server.add(f"/lora/{i}.safetensors", (files / str(i) / "pytorch_lora_weights.safetensors").read_bytes()))
    cold_pair, urls = urls[N_LORAS:], urls[:N_LORAS]

    base = start_stack(args, network={"allowed_networks": [f"{IMAGE_HOST}/32"]}, weights={"cache_dir": str(files / "cache")})
    rounds = []
    with httpx.Client(base_url=base, timeout=300, limits=httpx.Limits(max_connections=64)) as client:
        for _ in range(3):
            post(client, args, 0)
        started = time.perf_counter()
        post(client, args, 1, loras=[{"path": u, "scale": 0.7} for u in cold_pair])
        cold_ms = 1000 * (time.perf_counter() - started)
        hot_same = statistics.median(1000 * post(client, args, 2 + i, loras=[{"path": u, "scale": 0.7} for u in cold_pair])[0] for i in range(5))
        plain = statistics.median(1000 * post(client, args, 10 + i)[0] for i in range(5))
        for i in range(N_LORAS):  # warm every LoRA
            post(client, args, 20 + i, loras=lora_pair(i, urls))
        for r in range(args.rounds):
            result = {}
            for clients in (1, 8):
                total = args.requests if clients == 1 else 5 * clients
                result[f"none_c{clients}"] = measure_stack_concurrent(client, args, clients, total)
                result[f"loras_c{clients}"] = measure_stack_concurrent(client, args, clients, total, lambda i: {"loras": lora_pair(i, urls)})
            rounds.append(result)
            print(f"round {r + 1}: " + json.dumps({k: {m: round(v, 2) for m, v in d.items()} for k, d in result.items()}), file=sys.stderr)

    def ratio(clients: int) -> float:
        return statistics.median(r[f"loras_c{clients}"]["images_per_s"] / r[f"none_c{clients}"]["images_per_s"] for r in rounds)

    summary = {
        "config": {k: str(v) for k, v in vars(args).items()},
        "cold_first_request_ms": cold_ms,
        "same_request_hot_ms": hot_same,
        "no_lora_request_ms": plain,
        "hot_vs_none_c1": ratio(1),
        "hot_vs_none_c8": ratio(8),
        "mean_batch_c8": {k: statistics.median(r[f"{k}_c8"]["mean_batch_size"] for r in rounds) for k in ("none", "loras")},
        "rounds": rounds,
    }
    summary["targets"] = {"hot_at_least_0.8x_c1": summary["hot_vs_none_c1"] >= 0.8, "hot_at_least_0.8x_c8": summary["hot_vs_none_c8"] >= 0.8}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("rounds", "config")}, indent=2))


if __name__ == "__main__":
    main()
