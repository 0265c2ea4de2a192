"""Load tests for a diffusion-serve cluster, through fal's public API as fal's clients use it.

Users (default weights):
  QueueUser      (4) POST /queue/fal-ai/lora, polls its status_url every 0.1 s until 200 (as
                     fal_client.subscribe does), then GETs its response_url; each call is a
                     request and so is the whole wait: QUEUE "/queue/fal-ai/lora [submit to result]"
  SyncUser       (2) POST /fal-ai/lora, the image in the response
  MixedLoraUser  (2) POST /fal-ai/lora with 0-2 LoRAs of LOAD_LORA_URLS at random scales, named
                     by how many it carries ("/fal-ai/lora [2 LoRAs]"); off unless LOAD_LORA_URLS
                     is set
  RealtimeUser   (1) WS /fal-ai/lcm/realtime: one socket per user, a msgpack frame out, the
                     output and the timings frame back, one WS request per round trip

Against the demo cluster (`serve run cluster/demo.yaml`), from the repository root:

    .venv/bin/locust -f load_tests/locustfile.py --headless --host http://localhost:8000 \\
        -u 8 -r 2 -t 60s --stop-timeout 30 --csv bench_results/locust --html bench_results/locust.html

writes bench_results/locust_stats.csv (with _stats_history, _failures and _exceptions) and the
HTML report; --stop-timeout lets calls in flight at the end finish and be counted. Only some
users: append their class names (`... QueueUser RealtimeUser`). With a load shape, leave out -u,
-r and -t (the shape sets the users and ends the run):

    LOAD_SHAPE=spike .venv/bin/locust -f load_tests/locustfile.py --headless --host http://localhost:8000 \\
        --stop-timeout 30 --csv bench_results/spike --html bench_results/spike.html

Environment:
  FAL_KEY                  API key, sent as `Authorization: Key <key>` (none: an open cluster)
  SSL_CERT_FILE            CA bundle that signs the cluster's certificate (HTTPS and WSS)
  LOAD_MODEL               model_name for fal-ai/lora (runwayml/stable-diffusion-v1-5)
  LOAD_IMAGE_SIZE          WIDTHxHEIGHT or one of fal's presets such as square_hd (64x64)
  LOAD_STEPS               num_inference_steps for fal-ai/lora (4); LCM keeps its 4
  LOAD_LORA_URLS           comma-separated LoRA URLs (or HF ids) the cluster may fetch, for MixedLoraUser
  LOAD_LORAS_PER_REQUEST   how many LoRAs a MixedLoraUser request carries, MIN-MAX (0-2)
  LOAD_TIMEOUT_S           longest wait for one call, a queued job or a realtime output (300)
  LOAD_SHAPE               step, spike or none (none); their parameters: load_tests/shapes.py
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import msgpack
from locust import HttpUser, User, between, task
from locust.clients import ResponseContextManager
from locust.env import Environment
from requests import Response
from websockets.exceptions import WebSocketException
from websockets.sync.client import ClientConnection, connect

from load_tests.shapes import SHAPES, env_number

POLL_INTERVAL_S = 0.1  # fal_client's queue polling interval
PROMPTS = [
    "photo of a red fox in the snow, highly detailed",
    "a lighthouse on a cliff at sunset, oil painting",
    "portrait of an astronaut, studio lighting",
    "a bowl of ramen, top view, food photography",
]


def _image_size(raw: str) -> dict[str, int] | str:
    match = re.fullmatch(r"(\d+)x(\d+)", raw.strip())
    return {"width": int(match[1]), "height": int(match[2])} if match else raw.strip()


def _count_range(raw: str) -> tuple[int, int]:
    low, _, high = raw.partition("-")
    try:
        bounds = int(low), int(high or low)
    except ValueError:
        raise SystemExit(f"LOAD_LORAS_PER_REQUEST={raw!r}: expected MIN-MAX, e.g. 0-2") from None
    if not 0 <= bounds[0] <= bounds[1]:
        raise SystemExit(f"LOAD_LORAS_PER_REQUEST={raw!r}: expected 0 <= MIN <= MAX")
    return bounds


@dataclass(frozen=True)
class Settings:
    """What every user sends and how long it waits, read once from the environment."""

    api_key: str | None
    ca_file: str | None
    model: str
    image_size: dict[str, int] | str
    steps: int
    lora_urls: tuple[str, ...]
    loras_per_request: tuple[int, int]
    timeout_s: float

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        return cls(
            api_key=env.get("FAL_KEY") or None,
            ca_file=env.get("SSL_CERT_FILE") or None,
            model=env.get("LOAD_MODEL", "runwayml/stable-diffusion-v1-5"),
            image_size=_image_size(env.get("LOAD_IMAGE_SIZE", "64x64")),
            steps=int(env_number("LOAD_STEPS", 4, positive=True)),
            lora_urls=tuple(url.strip() for url in env.get("LOAD_LORA_URLS", "").split(",") if url.strip()),
            loras_per_request=_count_range(env.get("LOAD_LORAS_PER_REQUEST", "0-2")),
            timeout_s=env_number("LOAD_TIMEOUT_S", 300, positive=True),
        )

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Key {self.api_key}"} if self.api_key else {}

    def lora_body(self, **fields: Any) -> dict[str, Any]:
        """A fal-ai/lora input with a random prompt and seed."""
        body = {"model_name": self.model, "prompt": random.choice(PROMPTS), "image_size": self.image_size,
                "num_inference_steps": self.steps, "seed": random.randrange(2**31)}
        return {**body, **fields}


SETTINGS = Settings.from_env()

# Locust runs the first LoadTestShape it finds here, so only the chosen one is bound.
_shape = os.environ.get("LOAD_SHAPE", "none").strip().lower()
if _shape != "none":
    if _shape not in SHAPES:
        raise SystemExit(f"LOAD_SHAPE={_shape!r}: expected one of {', '.join([*SHAPES, 'none'])}")
    LoadShape = SHAPES[_shape]


class CallFailed(Exception):
    """A step failed; it is already in locust's stats, this ends the flow it belongs to."""


class RealtimeFailure(Exception):
    """An x-fal-error frame, or an output that is not what fal's realtime protocol sends."""


FAILURES = (CallFailed, RealtimeFailure, OSError, WebSocketException, ValueError)  # TimeoutError is an OSError


@contextmanager
def reported(environment: Environment, request_type: str, name: str) -> Iterator[dict[str, int]]:
    """Times the block and reports it as one request, a failure if it raised one of FAILURES.
    Set `length` in the yielded dict to report the response size."""
    result = {"length": 0}
    started = time.perf_counter()
    exception = None
    try:
        yield result
    except FAILURES as exc:
        exception = exc
    environment.events.request.fire(request_type=request_type, name=name, response_time=1000 * (time.perf_counter() - started),
                                    response_length=result["length"], exception=exception, context={})


Check = Callable[[dict[str, Any]], str | None]  # what is wrong with a JSON body, if anything


def has_images(body: dict[str, Any]) -> str | None:
    return None if body.get("images") else f"no images in the output: {json.dumps(body)[:300]}"


def has_queue_urls(body: dict[str, Any]) -> str | None:
    missing = {"status_url", "response_url", "cancel_url"} - body.keys()
    return f"the submit answer lacks {sorted(missing)}" if missing else None


class FalHttpUser(HttpUser):
    """An HTTP client with the key and CA of SETTINGS that fails a call on any unexpected answer."""

    abstract = True
    wait_time = between(1, 3)

    def on_start(self) -> None:
        self.client.headers.update(SETTINGS.headers)
        if SETTINGS.ca_file:
            self.client.verify = SETTINGS.ca_file

    def call(self, method: str, url: str, name: str, *, json_body: dict[str, Any] | None = None, expect: tuple[int, ...] = (200,),
             check: Check | None = None) -> Response:
        """One reported request; raises CallFailed (after reporting the failure) unless the status is
        in `expect` and `check` finds nothing wrong with the JSON body."""
        with self.client.request(method, url, name=name, json=json_body, timeout=SETTINGS.timeout_s, catch_response=True) as response:
            problem = self._problem(response, expect, check)
            if problem:
                response.failure(problem)
            else:
                response.success()
        if problem:
            raise CallFailed(f"{name}: {problem}")
        return response

    @staticmethod
    def _problem(response: ResponseContextManager, expect: tuple[int, ...], check: Check | None) -> str | None:
        if response.status_code not in expect:
            return str(response.error) if response.error else f"HTTP {response.status_code}: {response.text[:300]}"
        try:
            body = response.json()
        except ValueError:
            return f"HTTP {response.status_code} without a JSON body"
        return check(body) if check else None


class QueueUser(FalHttpUser):
    weight = 4

    @task
    def submit_and_poll(self) -> None:
        with reported(self.environment, "QUEUE", "/queue/fal-ai/lora [submit to result]") as result:
            result["length"] = len(self.through_queue().content)

    def through_queue(self) -> Response:
        job = self.call("POST", "/queue/fal-ai/lora", "/queue/fal-ai/lora", json_body=SETTINGS.lora_body(), check=has_queue_urls).json()
        deadline = time.monotonic() + SETTINGS.timeout_s
        while self.call("GET", job["status_url"], "/queue/fal-ai/lora/requests/[id]/status", expect=(200, 202)).status_code == 202:
            if time.monotonic() > deadline:
                # Abandoned by this user, the job must not keep a replica busy either.
                self.call("PUT", job["cancel_url"], "/queue/fal-ai/lora/requests/[id]/cancel", expect=(202, 400))
                raise CallFailed(f"the job was not done after {SETTINGS.timeout_s:g} s; cancelled")
            time.sleep(POLL_INTERVAL_S)
        return self.call("GET", job["response_url"], "/queue/fal-ai/lora/requests/[id]", check=has_images)


class SyncUser(FalHttpUser):
    weight = 2

    @task
    def generate(self) -> None:
        with suppress(CallFailed):  # reported by call
            self.call("POST", "/fal-ai/lora", "/fal-ai/lora", json_body=SETTINGS.lora_body(), check=has_images)


class MixedLoraUser(FalHttpUser):
    """Requests whose LoRA sets differ, so batches mix adapters and replicas swap them."""

    weight = 2
    abstract = not SETTINGS.lora_urls  # nothing to mix without LoRA files

    @task
    def generate(self) -> None:
        low, high = SETTINGS.loras_per_request
        chosen = random.sample(SETTINGS.lora_urls, min(random.randint(low, high), len(SETTINGS.lora_urls)))
        loras = [{"path": url, "scale": round(random.uniform(0.3, 1.2), 2)} for url in chosen]
        name = f"/fal-ai/lora [{len(loras)} LoRA{'' if len(loras) == 1 else 's'}]"
        with suppress(CallFailed):  # reported by call
            self.call("POST", "/fal-ai/lora", name, json_body=SETTINGS.lora_body(loras=loras), check=has_images)


if MixedLoraUser.abstract:
    logging.getLogger("locustfile").warning("MixedLoraUser is off: set LOAD_LORA_URLS to comma-separated LoRA URLs to run it")


class RealtimeUser(User):
    """One socket per user, as a drawing app keeps one open; a closed socket is opened again."""

    weight = 1
    wait_time = between(0.1, 0.5)  # a client sends as its user draws; the server idles out silent sockets

    def on_start(self) -> None:
        self.socket = ExitStack()  # holds the open socket as a with-block would, across tasks
        self.ws: ClientConnection | None = None

    def on_stop(self) -> None:
        self.socket.close()

    @task
    def round_trip(self) -> None:
        if self.ws is None:
            with reported(self.environment, "WS", "/fal-ai/lcm/realtime [connect]"):
                self.ws = self.socket.enter_context(self.connect())
            if self.ws is None:
                return
        frame = {"prompt": random.choice(PROMPTS), "image_size": SETTINGS.image_size, "seed": random.randrange(2**31),
                 "request_id": uuid.uuid4().hex}
        with reported(self.environment, "WS", "/fal-ai/lcm/realtime") as result:
            try:
                self.ws.send(msgpack.packb(frame))
                result["length"] = self.receive_output(frame["request_id"])
            except FAILURES:
                self.socket.close()  # a late output must not answer the next frame: connect again
                self.ws = None
                raise

    def connect(self) -> ClientConnection:
        url = re.sub(r"^http", "ws", self.host.rstrip("/")) + "/fal-ai/lcm/realtime"
        context = ssl.create_default_context(cafile=SETTINGS.ca_file) if url.startswith("wss:") else None
        return connect(url, ssl=context, additional_headers=SETTINGS.headers, open_timeout=SETTINGS.timeout_s, max_size=2**26)

    def receive_output(self, request_id: str) -> int:
        """The output frame's size, after checking it and the timings frame that follows it."""
        message = self.ws.recv(timeout=SETTINGS.timeout_s)
        if isinstance(message, str):
            frame = json.loads(message)
            if isinstance(frame, dict) and frame.get("type") == "x-fal-error":
                raise RealtimeFailure(f"{frame.get('error')}: {frame.get('reason')}")
            raise RealtimeFailure(f"expected the output, got {message[:300]}")
        output = msgpack.unpackb(message, raw=False)
        if not isinstance(output, dict) or not output.get("images") or output.get("request_id") != request_id:
            raise RealtimeFailure(f"not the output for {request_id}: {str(output)[:300]}")
        control = json.loads(self.ws.recv(timeout=SETTINGS.timeout_s))
        if not isinstance(control, dict) or control.get("action") != "timings":
            raise RealtimeFailure(f"expected the timings frame, got {control}")
        return len(message)

