"""Synchronous runs under the same per-key running limit as queued jobs.

`queue.max_running_per_key` caps the jobs one key has running at once. Queued jobs wait for a
free place (the dispatcher's claim skips a key at its limit); a synchronous call cannot wait
without holding a connection, so it is refused with 429 and `Retry-After` instead (fal's clients
retry 429s). A key's running count is its queued jobs running anywhere in the cluster (the
store's count) plus its synchronous calls in flight on this router replica: with N router
replicas a key can hold up to N times the limit in sync calls in the worst case, as with rates.
"""

from __future__ import annotations

import collections

from serve_app.auth import Caller
from serve_app.errors import FalError
from serve_app.queue.store import JobStore

RETRY_AFTER_S = 1


class SyncRunLimit:
    def __init__(self, store: JobStore, max_running_per_key: int | None) -> None:
        self.store = store
        self.limit = max_running_per_key
        self._in_flight: collections.Counter[str] = collections.Counter()

    async def enter(self, caller: Caller) -> None:
        """Count a sync call in, or refuse it with 429 when its key is at its running limit."""
        if self.limit is None:
            return
        self._in_flight[caller.key_id] += 1  # before the await: concurrent calls see each other
        running = await self.store.running(caller.key_id) + self._in_flight[caller.key_id]
        if running > self.limit:
            self.leave(caller)
            raise FalError(
                429,
                f"this key already has {self.limit} request(s) running, its limit; retry when one ends, or submit "
                "through the queue (POST /queue/...) where jobs wait their turn",
                "rate_limited",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )

    def leave(self, caller: Caller) -> None:
        if self.limit is None:
            return
        self._in_flight[caller.key_id] -= 1
        if self._in_flight[caller.key_id] <= 0:
            del self._in_flight[caller.key_id]

    def in_flight(self, key_id: str) -> int:
        return self._in_flight.get(key_id, 0)
