"""Shared fixtures: one real Ray cluster (fake GPUs) and one deployed stack per test session.

Ray takes ~10 s to start on two cores, so every integration test shares the cluster; the stack
(Router + StableDiffusion on a fake GPU, tiny models, demo profile) is deployed once.
"""

from __future__ import annotations

import base64
import io
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

IMAGE_HOST = "127.0.0.2"  # loopback, but a different address from the server's: only it is allowed


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def noise_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)


def square_mask(width: int, height: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    return mask


class ImageServer:
    """A real HTTP server on 127.0.0.2 serving registered bytes (and a slow and a huge path)."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, str]] = {}
        files = self.files

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path not in files:
                    self.send_response(404)
                    self.end_headers()
                    return
                body, mime = files[self.path]
                self.send_response(200)
                self.send_header("Content-Type", mime)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer((IMAGE_HOST, 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, path: str, body: bytes, mime: str = "image/png") -> str:
        self.files[path] = (body, mime)
        return f"http://{IMAGE_HOST}:{self.port}{path}"


@pytest.fixture(scope="session")
def image_server() -> Iterator[ImageServer]:
    server = ImageServer()
    yield server
    server.server.shutdown()


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    import ray

    ray.init(num_cpus=6, num_gpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def files_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("files")


@pytest.fixture(scope="session")
def stack(ray_cluster, files_dir) -> Iterator[str]:
    """The demo stack over real HTTP; the SD replica is scheduled on a (fake) GPU."""
    from ray import serve

    from serve_app.app import assemble
    from serve_app.config import AppConfig

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = AppConfig(
        profile="demo",
        files={"directory": str(files_dir)},
        network={"allowed_networks": [f"{IMAGE_HOST}/32"], "timeout_s": 3.0},
        limits={"max_input_image_bytes": 2 * 1024 * 1024, "max_pixels": 1024 * 1024},
        batching={"max_wait_ms": 30.0},
    )
    app = assemble(config, {"ray_actor_options": {"num_gpus": 1, "num_cpus": 1}})
    serve.run(app, name="diffusion-serve", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    yield url
    serve.shutdown()


@pytest.fixture(scope="session")
def http(stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack, timeout=120) as client:
        yield client
