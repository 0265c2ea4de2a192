"""Who may call: API keys (fal's `Key` and `Bearer` schemes), short-lived tokens, rate limits.

Keys are configured as sha256 hashes (`auth.keys`), never in clear, so a leaked config or log
holds nothing a client could send; a key is known by its `id` in logs and limits. fal keys are
`id:secret` or a single token: we hash whatever the client sends after the scheme word.

Tokens (`POST /tokens/`) let a browser open the realtime socket without holding a key: an HMAC
over the caller's id, the apps it may open and an expiry, checked by every router replica with
the same secret. `open` mode (the demo's) lets everyone in, explicitly.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import secrets
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

from serve_app.config import ApiKey, AuthSettings
from serve_app.errors import FalError
from serve_app.rate_limits import LocalRateLimiter, RateLimiter

ANONYMOUS = "anonymous"
MAX_TOKEN_TTL_S = 3600


def hash_key(key: str) -> str:
    """What `auth.keys[].sha256` holds for a key."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: a configured key's id (or `anonymous` in open mode)."""

    key_id: str
    requests_per_minute: float | None = None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Authenticator:
    def __init__(self, settings: AuthSettings, limiter: RateLimiter | None = None) -> None:
        self.settings = settings
        self._by_hash: dict[str, ApiKey] = {key.sha256.lower(): key for key in settings.keys}
        if settings.token_secret is not None:
            secret = settings.token_secret.get_secret_value().encode()
        else:
            # Every replica derives the same secret from the same config; set auth.token_secret to
            # keep tokens valid across key rotations.
            secret = hashlib.sha256(b"diffusion-serve tokens\n" + "\n".join(sorted(self._by_hash)).encode()).digest()
        self._token_key = secret
        self.limiter: RateLimiter = limiter or LocalRateLimiter()

    # --- keys -------------------------------------------------------------------------------

    def caller_from_header(self, authorization: str | None) -> Caller:
        """The caller an `Authorization` header names; 401 when keys are required and it names none."""
        if self.settings.open:
            return Caller(ANONYMOUS, self.settings.default_requests_per_minute)
        if not self._by_hash:
            raise FalError(401, "this server has no API keys configured: the operator must set auth.keys (or auth.open for a demo)", "unauthorized")
        if not authorization:
            raise FalError(401, "missing credentials: send 'Authorization: Key <your key>'", "unauthorized")
        scheme, _, credential = authorization.strip().partition(" ")
        if scheme.lower() not in ("key", "bearer") or not credential.strip():
            raise FalError(401, "unsupported Authorization header: use 'Key <your key>' or 'Bearer <your key>'", "unauthorized")
        key = self._by_hash.get(hash_key(credential.strip()))
        if key is None:
            raise FalError(401, "invalid API key", "unauthorized")
        return Caller(key.id, key.requests_per_minute if key.requests_per_minute is not None else self.settings.default_requests_per_minute)

    async def admit(self, caller: Caller) -> None:
        """429 with `Retry-After` when the caller is over its rate (fal's clients retry 429s)."""
        if caller.requests_per_minute is None:
            return
        wait = await self.limiter.admit(caller.key_id, caller.requests_per_minute)
        if wait > 0:
            raise FalError(
                429, f"rate limit of {caller.requests_per_minute:g} requests per minute reached; retry in {math.ceil(wait)} s", "rate_limited",
                headers={"Retry-After": str(math.ceil(wait))},
            )

    # --- tokens -----------------------------------------------------------------------------

    def issue_token(self, caller: Caller, allowed_apps: list[str], ttl_s: float) -> str:
        payload = {"sub": caller.key_id, "apps": allowed_apps, "exp": int(time.time() + min(ttl_s, MAX_TOKEN_TTL_S)), "n": secrets.token_hex(4)}
        body = _b64(json.dumps(payload, separators=(",", ":")).encode())
        return f"{body}.{_b64(hmac.new(self._token_key, body.encode(), hashlib.sha256).digest())}"

    def caller_from_token(self, token: str, app: str) -> Caller:
        """The caller a token was issued to, if it is genuine, unexpired and allows `app`
        (`owner/alias` or the bare alias, as fal's JS client asks)."""
        body, _, signature = token.partition(".")
        expected = _b64(hmac.new(self._token_key, body.encode(), hashlib.sha256).digest())
        if not signature or not hmac.compare_digest(signature, expected):
            raise FalError(401, "invalid token", "unauthorized")
        payload = json.loads(_unb64(body))
        if payload["exp"] < time.time():
            raise FalError(401, "the token has expired: ask POST /tokens/ for a new one", "unauthorized")
        alias = app.split("/", 1)[-1]
        if not set(payload["apps"]) & {app, alias}:
            raise FalError(401, f"the token does not allow {app!r}", "unauthorized")
        key = next((k for k in self.settings.keys if k.id == payload["sub"]), None)
        per_minute = key.requests_per_minute if key and key.requests_per_minute is not None else self.settings.default_requests_per_minute
        return Caller(payload["sub"], per_minute)

    def caller_of_socket(self, headers: Mapping[str, str], query: Mapping[str, str], app: str) -> Caller:
        """A realtime socket's caller: its `Authorization` header, else its `fal_jwt_token`."""
        token = query.get("fal_jwt_token")
        if token and not headers.get("authorization"):
            return Caller(ANONYMOUS) if self.settings.open else self.caller_from_token(token, app)
        return self.caller_from_header(headers.get("authorization"))


def main(argv: list[str]) -> int:
    """`python -m serve_app.auth new [ID]`: a fresh key and its config entry; `hash KEY`: its sha256."""
    if len(argv) >= 1 and argv[0] == "new":
        key_id = argv[1] if len(argv) > 1 else secrets.token_hex(4)
        key = f"{key_id}:{secrets.token_urlsafe(24)}"
        print(f"key (give it to the client, it is not stored): {key}")
        print(f"config entry:  auth: {{keys: [{{id: {key_id}, sha256: {hash_key(key)}}}]}}")
        return 0
    if len(argv) == 2 and argv[0] == "hash":
        print(hash_key(argv[1]))
        return 0
    print(main.__doc__)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
