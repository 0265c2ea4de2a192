"""Synchronous runs under the same per-key running limit as queued jobs, across the cluster.

`queue.max_running_per_key` caps the jobs one key has running at once. Queued jobs wait for a
free place (the dispatcher's claim skips a key at its limit); a synchronous call cannot wait
without holding a connection, so it is refused with 429 and `Retry-After` instead (fal's clients
retry 429s). A key's running count is its queued jobs running anywhere plus its synchronous calls
in flight on every router replica: each replica counts its calls in the job store under its own
name and renews them every few seconds, so a replica that dies stops counting within `ttl_s`.
The dispatchers' claims count the same calls: a key whose places are taken by sync calls has its
queued jobs wait.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import uuid

from serve_app.auth import Caller
from serve_app.errors import FalError
from serve_app.queue.store import JobStore

logger = logging.getLogger("diffusion_serve.queue")

RETRY_AFTER_S = 1
HOLDER_TTL_S = 30.0


class SyncRunLimit:
    def __init__(self, store: JobStore, max_running_per_key: int | None, holder: str | None = None, ttl_s: float = HOLDER_TTL_S) -> None:
        self.store = store
        self.limit = max_running_per_key
        self.holder = holder or f"router-{uuid.uuid4().hex[:12]}"
        self.ttl_s = ttl_s
        self._in_flight: collections.Counter[str] = collections.Counter()
        self._renewer: asyncio.Task | None = None

    async def enter(self, caller: Caller) -> None:
        """Count a sync call in, or refuse it with 429 when its key is at its running limit."""
        if self.limit is None:
            return
        self._start_renewing()
        self._in_flight[caller.key_id] += 1  # before the await: a renewal meanwhile includes it
        try:
            admitted = await self.store.enter_sync_run(caller.key_id, self.holder, self.limit, self.ttl_s)
        except asyncio.CancelledError:
            self._forget(caller.key_id)
            raise
        except Exception as exc:  # noqa: BLE001 - the store is down: serve rather than refuse everyone
            logger.warning("sync run limit: the job store cannot be reached (%s); admitting the call", exc)
            admitted = True
        if not admitted:
            self._forget(caller.key_id)
            raise FalError(
                429,
                f"this key already has {self.limit} request(s) running, its limit; retry when one ends, or submit "
                "through the queue (POST /queue/...) where jobs wait their turn",
                "rate_limited",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )

    async def leave(self, caller: Caller) -> None:
        if self.limit is None:
            return
        self._forget(caller.key_id)
        try:
            await self.store.leave_sync_run(caller.key_id, self.holder)
        except Exception as exc:  # noqa: BLE001 - the next renewal writes the true count
            logger.warning("sync run limit: could not count a call out (%s); the next renewal corrects it", exc)

    def in_flight(self, key_id: str) -> int:
        return self._in_flight.get(key_id, 0)

    def _forget(self, key_id: str) -> None:
        self._in_flight[key_id] -= 1
        if self._in_flight[key_id] <= 0:
            del self._in_flight[key_id]

    def _start_renewing(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        """Keep this replica's count alive (and true) while it has calls in flight."""
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                await self.store.renew_sync_runs(self.holder, dict(self._in_flight), self.ttl_s)
            except Exception as exc:  # noqa: BLE001 - tried again at the next tick
                logger.warning("sync run limit: could not renew this replica's calls (%s)", exc)
            if not self._in_flight:
                return
