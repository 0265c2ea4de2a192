"""Shared fixtures: one real Ray cluster (fake GPUs) and one deployed stack per test session.

Ray takes ~10 s to start on two cores, so every integration test shares the cluster; the stack
(Router + StableDiffusion on a fake GPU, tiny models, demo profile) is deployed once and served
over HTTPS with a certificate from a CA made here, as fal's clients only speak https.
"""

from __future__ import annotations

import base64
import collections
import datetime
import hashlib
import io
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

IMAGE_HOST = "127.0.0.2"  # loopback, but a different address from the server's: only it is allowed
ALLOWED_NETWORK = {"allowed_networks": [f"{IMAGE_HOST}/32"], "timeout_s": 3.0}  # input images, adapters, webhooks
FAST_WEBHOOKS = {"max_attempts": 4, "retry_window_s": 1.4, "timeout_s": 2.0, "poll_interval_s": 0.05}  # waits 0.2, 0.4, 0.8 s


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def results_when_done(http: httpx.Client, jobs: list[dict], timeout_s: float) -> dict[str, httpx.Response]:
    """Poll submitted jobs (fal's submit replies) until each is COMPLETED, then read its result;
    a poll that fails (a router that just died) is tried again at the next round. The results of
    the jobs that ended within `timeout_s`, by request id."""
    import time

    results: dict[str, httpx.Response] = {}
    deadline = time.monotonic() + timeout_s
    while len(results) < len(jobs) and time.monotonic() < deadline:
        for job in jobs:
            if job["request_id"] in results:
                continue
            try:
                if http.get(job["status_url"]).status_code == 200:
                    results[job["request_id"]] = http.get(job["response_url"])
            except httpx.HTTPError:
                continue
        time.sleep(0.2)
    return results


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


@dataclass(frozen=True)
class TestCA:
    ca_file: Path
    cert_file: Path
    key_file: Path

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


def make_test_ca(directory: Path) -> TestCA:
    """A throwaway CA and a server certificate for localhost / 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "diffusion-serve test CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca = TestCA(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    ca.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    ca.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ca.key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return ca


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory) -> TestCA:
    return make_test_ca(tmp_path_factory.mktemp("tls"))


class ImageServer:
    """A real HTTP server on 127.0.0.2 serving registered bytes (and a slow and a huge path)."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, str]] = {}
        self.hits: collections.Counter[str] = collections.Counter()
        files, hits = self.files, self.hits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                hits[self.path] += 1
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


# The test stack requires keys, as production does: TEST_KEY (what the fal-client tests send as
# FAL_KEY) and LIMITED_KEY (two requests a minute). Only their hashes are configured.
TEST_KEY = "test-key-id:test-key-secret"
LIMITED_KEY = "limited-key:slow-secret"
TEST_AUTH = {
    "keys": [
        {"id": "test-key-id", "sha256": hashlib.sha256(TEST_KEY.encode()).hexdigest()},
        {"id": "limited-key", "sha256": hashlib.sha256(LIMITED_KEY.encode()).hexdigest(), "requests_per_minute": 2},
    ]
}
AUTH_HEADERS = {"Authorization": f"Key {TEST_KEY}"}


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """The session's Ray cluster; yields the URL where its metrics agent serves Prometheus text
    (every process's metrics, reported each second)."""
    import ray

    port = free_port()
    ray.init(num_cpus=8, num_gpus=4, include_dashboard=False, log_to_driver=False, _metrics_export_port=port,
             _system_config={"metrics_report_interval_ms": 1000})
    yield f"http://127.0.0.1:{port}/metrics"
    ray.shutdown()


@pytest.fixture
def serve_workdir() -> Iterator[Path]:
    """A folder for a `serve run` cluster of a test's own (tests/serve_cluster.py): short, as
    Ray's socket paths under it must fit 107 bytes."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="ds-serve-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def files_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("files")


@pytest.fixture(scope="session")
def stack(ray_cluster, files_dir, test_ca) -> Iterator[str]:
    """The demo stack over real HTTPS; the SD replica is scheduled on a (fake) GPU."""
    from ray import serve

    from serve_app.app import assemble
    from serve_app.config import AppConfig

    port = free_port()
    serve.start(
        http_options={
            "host": "127.0.0.1",
            "port": port,
            "ssl_keyfile": str(test_ca.key_file),
            "ssl_certfile": str(test_ca.cert_file),
        }
    )
    config = AppConfig(
        profile="demo",
        files={"directory": str(files_dir)},
        network=ALLOWED_NETWORK,
        webhooks=FAST_WEBHOOKS,
        limits={"max_input_image_bytes": 2 * 1024 * 1024, "max_pixels": 1024 * 1024},
        batching={"max_wait_ms": 30.0},
        weights={"cache_dir": str(files_dir.parent / "weights"), "max_file_bytes": 4 * 1024 * 1024},
        realtime={"idle_timeout_s": 6.0},
        auth=TEST_AUTH,
        # A short lease (the fault tests wait one out) and 16 dispatch slots (the queue tests fill them).
        queue={"store_url": f"sqlite://{files_dir.parent / 'jobs.sqlite3'}", "lease_s": 3.0, "dispatch_slots": 16},
    )
    # SD and FLUX take a whole (fake) GPU each, LCM half of one, as in production.yaml.
    app = assemble(
        config,
        {"ray_actor_options": {"num_gpus": 1, "num_cpus": 1}},
        {"ray_actor_options": {"num_gpus": 0.5, "num_cpus": 1}},
        {"ray_actor_options": {"num_gpus": 1, "num_cpus": 1}},
    )
    serve.run(app, name="diffusion-serve", route_prefix="/")
    url = f"https://localhost:{port}"
    yield url
    serve.shutdown()


@pytest.fixture(scope="session")
def http(stack, test_ca) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack, timeout=120, verify=test_ca.ssl_context(), headers=AUTH_HEADERS) as client:
        yield client
