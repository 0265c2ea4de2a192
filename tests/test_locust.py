"""The load tests in load_tests/locustfile.py run headless against the session's HTTPS stack.

One user of each type (queue submit-and-poll, sync, mixed LoRAs, realtime WebSocket) runs for a
few seconds: every type gets answers, none fails, and the CSV and HTML reports are written. The
step and spike shapes, picked with LOAD_SHAPE, set the user count and end the run themselves.
Locust runs in a subprocess, as operators run it: it monkey-patches the interpreter with gevent.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deployments.tiny_models import ensure_tiny_model
from tests.conftest import TEST_KEY

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
USER_TYPES = ["QueueUser", "SyncUser", "MixedLoraUser", "RealtimeUser"]


def run_locust(stack, test_ca, prefix: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """The headless command of the locustfile's docstring, with the test key and CA."""
    clean_env = {name: value for name, value in os.environ.items() if not name.startswith("LOAD_")}  # the shell's settings stay out
    completed = subprocess.run(
        [sys.executable, "-m", "locust", "-f", "load_tests/locustfile.py", "--headless", "--host", stack,
         "--csv", str(prefix), "--html", f"{prefix}.html", "--stop-timeout", "60", *args],
        cwd=ROOT, env={**clean_env, "FAL_KEY": TEST_KEY, "SSL_CERT_FILE": str(test_ca.ca_file), **env},
        capture_output=True, text=True, timeout=240,
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]  # locust exits 1 on any failure
    return completed


def stats(prefix: Path) -> dict[tuple[str, str], tuple[int, int]]:
    """(type, name) -> (requests, failures) from locust's _stats.csv."""
    with open(f"{prefix}_stats.csv", newline="") as f:
        return {(row["Type"], row["Name"]): (int(row["Request Count"]), int(row["Failure Count"])) for row in csv.DictReader(f)}


def user_levels(prefix: Path) -> list[int]:
    """The user counts the run went through, from locust's once-a-second _stats_history.csv
    (without the zeros before the first user starts and after the last stops)."""
    with open(f"{prefix}_stats_history.csv", newline="") as f:
        counts = [int(row["User Count"]) for row in csv.DictReader(f) if row["Name"] == "Aggregated"]
    return [count for count, _ in itertools.groupby(count for count in counts if count)]


@pytest.fixture(scope="module")
def lora_urls(image_server) -> dict[str, str]:
    """Tiny SD1.5 LoRAs by path; no other test uses these paths, so their hits are this test's."""
    paths = {f"/locust/{name}.safetensors": name for name in ("sd15-lora-a", "sd15-lora-b", "sd15-lora-kohya")}
    return {
        path: image_server.add(path, next(ensure_tiny_model(name).glob("*.safetensors")).read_bytes(), "application/octet-stream")
        for path, name in paths.items()
    }


def test_every_user_type_gets_answers_without_a_failure(stack, test_ca, image_server, lora_urls, tmp_path):
    one_of_each = json.dumps([{"user_class_name": name, "fixed_count": 1} for name in USER_TYPES])
    prefix = tmp_path / "locust"
    run_locust(stack, test_ca, prefix, "-u", "4", "-r", "4", "-t", "12s", "--config-users", one_of_each,
               LOAD_LORA_URLS=",".join(lora_urls.values()), LOAD_LORAS_PER_REQUEST="1-2")

    counts = stats(prefix)
    requests = {key: sent for key, (sent, _) in counts.items()}
    assert counts[("", "Aggregated")][1] == 0, counts
    # Queue: each job's submit, its result and the whole wait are one request apiece; it polled meanwhile.
    jobs = requests[("QUEUE", "/queue/fal-ai/lora [submit to result]")]
    assert jobs > 0
    assert requests[("GET", "/queue/fal-ai/lora/requests/[id]")] == jobs
    # (The run's end may cut the last job's wait short: at most one submit more than results.)
    assert jobs <= requests[("POST", "/queue/fal-ai/lora")] <= jobs + 1
    assert requests[("GET", "/queue/fal-ai/lora/requests/[id]/status")] >= jobs
    assert requests[("POST", "/fal-ai/lora")] > 0
    # Mixed LoRAs: named by how many each carried (1-2 here), and the cluster fetched the files.
    mixed = {name: sent for (_, name), sent in requests.items() if name.startswith("/fal-ai/lora [")}
    assert sum(mixed.values()) > 0 and set(mixed) <= {"/fal-ai/lora [1 LoRA]", "/fal-ai/lora [2 LoRAs]"}, mixed
    assert sum(image_server.hits[path] for path in lora_urls) > 0
    # Realtime: one socket per user, one WS request per round trip.
    assert requests[("WS", "/fal-ai/lcm/realtime [connect]")] == 1
    assert requests[("WS", "/fal-ai/lcm/realtime")] > 0
    assert "/queue/fal-ai/lora [submit to result]" in Path(f"{prefix}.html").read_text()


@pytest.mark.parametrize(
    "shape, env, expected",
    [
        # 1 user, a second after 4 s, held 4 s
        ("step", {"LOAD_STEP_USERS": "1", "LOAD_STEP_S": "4", "LOAD_STEP_MAX_USERS": "2", "LOAD_STEP_HOLD_S": "4"}, [1, 2]),
        # 1 user for 4 s, 3 for 4 s, 1 for 4 s
        ("spike", {"LOAD_SPIKE_BASE_USERS": "1", "LOAD_SPIKE_USERS": "3", "LOAD_SPIKE_AT_S": "4", "LOAD_SPIKE_S": "4",
                   "LOAD_SPIKE_RECOVER_S": "4"}, [1, 3, 1]),
    ],
)
def test_a_load_shape_sets_the_users_and_ends_the_run(stack, test_ca, tmp_path, shape, env, expected):
    prefix = tmp_path / shape
    run_locust(stack, test_ca, prefix, "SyncUser", LOAD_SHAPE=shape, **env)  # no -u, -r or -t: the shape decides
    assert user_levels(prefix) == expected
    assert stats(prefix)[("POST", "/fal-ai/lora")][0] > 0
