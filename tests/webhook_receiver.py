"""A real HTTP server that receives webhooks, as a user's app would, and verifies them as fal's
docs tell receivers to: the ED25519 signature over `request_id \\n user_id \\n timestamp \\n
sha256(body)` against the keys of a JWKS document, and a timestamp within 300 s.

Each path can be told to fail its first N tries (HTTP 500) or to answer slowly.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)


def verify(delivery: Delivery, jwks: dict[str, Any]) -> bool:
    """fal's recipe: any key of the JWKS verifies the hex signature, and the timestamp is fresh."""
    h = {k.lower(): v for k, v in delivery.headers.items()}
    if abs(time.time() - int(h["x-fal-webhook-timestamp"])) > 300:
        return False
    message = "\n".join(
        [h["x-fal-webhook-request-id"], h["x-fal-webhook-user-id"], h["x-fal-webhook-timestamp"], hashlib.sha256(delivery.body).hexdigest()]
    ).encode()
    signature = bytes.fromhex(h["x-fal-webhook-signature"])
    for key in jwks["keys"]:
        x = key["x"]
        public = Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(x + "=" * (-len(x) % 4)))
        try:
            public.verify(signature, message)
            return True
        except InvalidSignature:
            continue
    return False


@dataclass
class WebhookReceiver:
    host: str
    deliveries: list[Delivery] = field(default_factory=list)  # the answered-2xx ones and the failed ones
    failures: dict[str, int] = field(default_factory=dict)  # path -> tries still to fail
    delays: dict[str, float] = field(default_factory=dict)  # path -> seconds to wait before answering
    tries: dict[str, int] = field(default_factory=dict)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                path = self.path
                with receiver._lock:
                    receiver.tries[path] = receiver.tries.get(path, 0) + 1
                    fail = receiver.failures.get(path, 0) > 0
                    if fail:
                        receiver.failures[path] -= 1
                time.sleep(receiver.delays.get(path, 0.0))
                if fail:
                    self.send_response(500)
                    self.end_headers()
                    return
                receiver.deliveries.append(Delivery(path, dict(self.headers.items()), body, time.time()))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer((self.host, 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def received(self, path: str) -> list[Delivery]:
        return [d for d in self.deliveries if d.path == path]

    def wait_for(self, path: str, timeout_s: float = 60.0) -> Delivery:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            got = self.received(path)
            if got:
                return got[0]
            time.sleep(0.05)
        raise AssertionError(f"no webhook reached {path} within {timeout_s} s (tries: {self.tries.get(path, 0)})")
