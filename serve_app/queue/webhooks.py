"""Webhooks: when a job submitted with `?fal_webhook=URL` completes, POST its outcome to URL.

The store owns a delivery from the start: it is created in the same atomic step that completes
the job, claimed with a lease by a deliverer in some router replica, and tried again with
doubling delays (by default 10 tries over 2 hours, fal's schedule) until the receiver answers
2xx. So a crash or restart loses none, and a receiver that is down or slow only delays its own
deliveries: deliverers run apart from the dispatchers that run jobs.

Every try is signed as fal signs: ED25519 over `request_id \\n user_id \\n timestamp \\n
sha256_hex(body)`, hex in `X-Fal-Webhook-Signature`, freshly timestamped (receivers reject
timestamps more than 300 s off). The public keys are a JWKS at `GET /.well-known/jwks.json`.
Every URL is checked against the network policy at submit and again at each try.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import random
import sys
import time
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from serve_app import url_guard
from serve_app.config import WebhookSettings
from serve_app.errors import InputError
from serve_app.queue.claiming import Claimer
from serve_app.queue.store import JobRecord, JobStore, now
from serve_app.url_guard import NetworkPolicy, UrlFetchError

logger = logging.getLogger("diffusion_serve.webhooks")

MAX_URL_LENGTH = 2048
LEASE_SLACK_S = 5.0  # a delivery's lease outlasts its try's timeout (which bounds the whole try) by this much
SHARED_KEY_NAME = "webhook-signing-key"


# --- what is sent ---------------------------------------------------------------------------


def webhook_body(record: JobRecord, max_payload_bytes: int) -> bytes:
    """fal's envelope: `status` OK with the output as `payload`, or ERROR with the error body and
    `error: "Invalid status code: N"`; a result too large (or not JSON) goes as `payload: null`
    with `payload_error` saying why."""
    code = record.status_code or 500
    ok = code < 400
    envelope: dict[str, Any] = {
        "request_id": record.request_id,
        "gateway_request_id": record.gateway_request_id,
        "status": "OK" if ok else "ERROR",
        "payload": None,
        "error": None if ok else f"Invalid status code: {code}",
    }
    result = record.result or b"null"
    if len(result) > max_payload_bytes:
        envelope["payload_error"] = (
            f"the result is {len(result)} bytes, over this server's webhook limit of {max_payload_bytes}; fetch it from the queue's result URL"
        )
    else:
        try:
            envelope["payload"] = json.loads(result)
        except ValueError:
            envelope["payload_error"] = "the result could not be parsed as JSON"
    return json.dumps(envelope).encode()


def retry_delays(settings: WebhookSettings) -> list[float]:
    """The waits between tries: doubling, summing to `retry_window_s` (14 s, 28 s, ... 1 h for
    fal's 10 tries over 2 hours)."""
    gaps = settings.max_attempts - 1
    if gaps == 0:
        return []
    first = settings.retry_window_s / (2**gaps - 1)
    return [first * 2**i for i in range(gaps)]


# --- signing ---------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _private_key(text: str) -> Ed25519PrivateKey:
    raw = base64.urlsafe_b64decode(text.strip().replace("+", "-").replace("/", "_") + "=" * (-len(text.strip()) % 4))
    if len(raw) != 32:
        raise ValueError("a webhook signing key is 32 bytes, base64 encoded: make one with `python -m serve_app.queue.webhooks new-key`")
    return Ed25519PrivateKey.from_private_bytes(raw)


def new_key() -> str:
    """A fresh signing key as `webhooks.signing_keys` holds it (base64 of the raw 32 bytes)."""
    from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat

    raw = Ed25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return base64.b64encode(raw).decode()


class Signer:
    """Signs with the first key; publishes all of them (so receivers accept both sides of a rotation)."""

    def __init__(self, keys: list[Ed25519PrivateKey]) -> None:
        if not keys:
            raise ValueError("a signer needs at least one key")
        self.keys = keys

    def sign(self, request_id: str, user_id: str, timestamp: str, body: bytes) -> str:
        message = "\n".join([request_id, user_id, timestamp, hashlib.sha256(body).hexdigest()]).encode()
        return self.keys[0].sign(message).hex()

    def headers(self, request_id: str, user_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        stamp = str(int(time.time()) if timestamp is None else timestamp)
        return {
            "Content-Type": "application/json",
            "X-Fal-Webhook-Request-Id": request_id,
            "X-Fal-Webhook-User-Id": user_id,
            "X-Fal-Webhook-Timestamp": stamp,
            "X-Fal-Webhook-Signature": self.sign(request_id, user_id, stamp, body),
        }

    def jwks(self) -> dict[str, Any]:
        keys = []
        for key in self.keys:
            public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            keys.append({"kty": "OKP", "crv": "Ed25519", "x": _b64url(public), "kid": hashlib.sha256(public).hexdigest()[:16], "use": "sig", "alg": "EdDSA"})
        return {"keys": keys}


class SigningKeys:
    """The configured keys, else one key made once and kept in the job store, so that every
    router sharing the store signs alike and the JWKS survives restarts. Loaded on first use."""

    def __init__(self, settings: WebhookSettings, store: JobStore) -> None:
        self.settings = settings
        self.store = store
        self._signer: Signer | None = None
        self._lock = asyncio.Lock()

    async def signer(self) -> Signer:
        if self._signer is None:
            async with self._lock:
                if self._signer is None:
                    if self.settings.signing_keys:
                        keys = [_private_key(secret.get_secret_value()) for secret in self.settings.signing_keys]
                    else:
                        shared = await self.store.shared_value(SHARED_KEY_NAME, new_key().encode())
                        keys = [_private_key(shared.decode())]
                    self._signer = Signer(keys)
        return self._signer


# --- submit-time check -----------------------------------------------------------------------


async def check_webhook_url(url: str, policy: NetworkPolicy) -> str:
    """A 422 at `["query", "fal_webhook"]` for a URL we could never deliver to: malformed, not
    http(s), or resolving to an address the network policy forbids."""
    if len(url) > MAX_URL_LENGTH:
        raise InputError(["query", "fal_webhook"], f"the webhook URL is longer than {MAX_URL_LENGTH} characters", "url_invalid")
    try:
        await url_guard.check_url(url, policy, subject="The webhook URL")
    except UrlFetchError as exc:
        raise InputError(["query", "fal_webhook"], exc.msg, exc.type) from None
    return url


# --- delivery --------------------------------------------------------------------------------


class Deliverer:
    """Up to `settings.concurrency` deliveries at once per router replica, claimed due first by one
    claimer (serve_app/queue/claiming.py); `wake()` when a job with a webhook ends here."""

    def __init__(self, store: JobStore, settings: WebhookSettings, policy: NetworkPolicy, keys: SigningKeys, worker: str) -> None:
        self.store = store
        self.settings = settings
        self.policy = policy
        self.keys = keys
        self.worker = worker
        self.delays = retry_delays(settings)
        self.claimer = Claimer(f"webhook deliverer {worker}", self._claim, self.deliver, settings.concurrency, settings.poll_interval_s)

    def start(self) -> None:
        self.claimer.start()

    def wake(self) -> None:
        self.claimer.wake()

    async def stop(self) -> None:
        await self.claimer.stop()

    async def _claim(self) -> JobRecord | None:
        return await self.store.claim_webhook(self.worker, self.settings.timeout_s + LEASE_SLACK_S)

    async def deliver(self, record: JobRecord) -> None:
        """One try (the store counted it when this loop claimed it), and what it leads to."""
        assert record.webhook_url
        shown = url_guard.redact_url(record.webhook_url)
        body = webhook_body(record, self.settings.max_payload_bytes)
        signer = await self.keys.signer()
        final = False
        try:
            status = await url_guard.post(
                record.webhook_url, body, signer.headers(record.request_id, record.key_id, body), self.policy, self.settings.timeout_s
            )
            error = None if 200 <= status < 300 else f"the receiver answered HTTP {status}"
        except UrlFetchError as exc:
            error = exc.msg
            final = exc.type in ("url_invalid", "url_forbidden")  # no later try can succeed
        attempt = record.webhook_attempts
        if error is None:
            logger.info("request %s: webhook delivered to %s (try %d)", record.request_id, shown, attempt)
            await self.store.webhook_attempted(record.request_id, self.worker, True, None, None)
            return
        if final or attempt >= self.settings.max_attempts:
            logger.warning("request %s: webhook to %s failed for good after %d tries: %s", record.request_id, shown, attempt, error)
            await self.store.webhook_attempted(record.request_id, self.worker, False, error, None)
            return
        delay = self.delays[attempt - 1] * random.uniform(0.9, 1.1)  # jitter: receivers that come back are not stampeded
        logger.warning("request %s: webhook to %s failed (try %d): %s; next try in %.0f s", record.request_id, shown, attempt, error, delay)
        await self.store.webhook_attempted(record.request_id, self.worker, False, error, now() + delay)


def main(argv: list[str]) -> int:
    """`python -m serve_app.queue.webhooks new-key`: a signing key for `webhooks.signing_keys`."""
    if argv == ["new-key"]:
        print(new_key())
        return 0
    print(main.__doc__)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
