"""Per-key request rates: a token bucket per key, `requests_per_minute` on average with bursts of
up to a minute's worth, refusals answered with 429 and `Retry-After` (fal's clients retry 429s).

The buckets live in the job store, so every router replica takes from the same one: a key gets
its rate across the whole cluster (Redis), or across the routers of one node (SQLite), however the
proxy spreads its requests. If the store cannot be reached, each replica keeps its own buckets
until it can again (a key may then get up to N times its rate with N replicas), rather than
refusing every request.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from serve_app.queue.store import JobStore

logger = logging.getLogger("diffusion_serve.rate_limits")

STORE_WARNING_INTERVAL_S = 60.0


def take_from_bucket(tokens: float, elapsed_s: float, capacity: float, per_s: float) -> tuple[float, float]:
    """A bucket that held `tokens` `elapsed_s` ago, refilled and asked for one: (tokens left, 0)
    if it had one, else (tokens, seconds until it will). The Redis store runs the same in Lua."""
    tokens = min(capacity, tokens + max(0.0, elapsed_s) * per_s)
    if tokens >= 1:
        return tokens - 1, 0.0
    return tokens, (1 - tokens) / per_s


class RateLimiter(Protocol):
    async def admit(self, key_id: str, per_minute: float) -> float:
        """0 if admitted, else the seconds until the key's next request would be."""
        ...


class LocalRateLimiter:
    """Buckets in this process: the fallback, and what an Authenticator without a store uses."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, last refill)
        self._lock = threading.Lock()

    def take(self, key_id: str, per_minute: float) -> float:
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key_id, (per_minute, now))
            tokens, wait = take_from_bucket(tokens, now - last, per_minute, per_minute / 60.0)
            self._buckets[key_id] = (tokens, now)
            return wait

    async def admit(self, key_id: str, per_minute: float) -> float:
        return self.take(key_id, per_minute)


class SharedRateLimiter:
    """Buckets in the job store, shared by every router replica that uses it."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.fallback = LocalRateLimiter()
        self._last_warning = 0.0

    async def admit(self, key_id: str, per_minute: float) -> float:
        try:
            return await self.store.take_token(f"rate:{key_id}", per_minute, per_minute / 60.0)
        except Exception as exc:  # noqa: BLE001 - the store is down: limit per replica meanwhile
            if time.monotonic() - self._last_warning >= STORE_WARNING_INTERVAL_S:
                self._last_warning = time.monotonic()
                logger.warning("rate limits: the job store cannot be reached (%s); limiting per router replica until it can", exc)
            return self.fallback.take(key_id, per_minute)
