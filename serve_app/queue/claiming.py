"""One claimer per kind of work per router replica: the dispatcher's jobs and the deliverer's
webhook deliveries are both claimed from the store by a single loop that runs what it claims in
up to `slots` tasks at once.

An idle claimer polls the store at `poll_interval_s`, backing off (doubling) to `IDLE_BACKOFF`
times that while nothing comes; `wake()` (this replica just queued a job, or completed one with a webhook)
makes it look at once. So an idle router costs the store a few reads a second, however many slots
it has, and work it took in itself starts without waiting for a poll.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

logger = logging.getLogger("diffusion_serve.queue")

T = TypeVar("T")

IDLE_BACKOFF = 4  # an idle claimer's polls slow down to this many poll intervals apart


class Claimer(Generic[T]):
    def __init__(
        self,
        name: str,
        claim: Callable[[], Awaitable[T | None]],
        run: Callable[[T], Awaitable[None]],
        slots: int,
        poll_interval_s: float,
    ) -> None:
        self.name = name
        self._claim = claim
        self._run = run
        self.slots = slots
        self.poll_interval_s = poll_interval_s
        self.max_interval_s = poll_interval_s * IDLE_BACKOFF
        self.running: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None
        self._woken = asyncio.Event()

    def start(self) -> None:
        self._free = asyncio.Semaphore(self.slots)
        self._loop_task = asyncio.get_running_loop().create_task(self._loop())

    def wake(self) -> None:
        self._woken.set()

    async def stop(self) -> None:
        tasks = [t for t in (self._loop_task, *self.running) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self) -> None:
        interval = self.poll_interval_s
        while True:
            await self._free.acquire()
            self._woken.clear()
            try:
                work = await self._claim()
            except Exception:  # noqa: BLE001 - a store hiccup must not stop the claimer
                logger.exception("%s: claim failed", self.name)
                work = None
            if work is None:
                self._free.release()
                try:
                    await asyncio.wait_for(self._woken.wait(), timeout=interval)
                    interval = self.poll_interval_s
                except asyncio.TimeoutError:
                    interval = min(interval * 2, self.max_interval_s)
                continue
            interval = self.poll_interval_s
            task = asyncio.get_running_loop().create_task(self._run_in_slot(work))
            self.running.add(task)
            task.add_done_callback(self.running.discard)

    async def _run_in_slot(self, work: T) -> None:
        try:
            await self._run(work)
        except Exception:  # noqa: BLE001 - the work's lease runs out and it is claimed again
            logger.exception("%s: work could not be ended", self.name)
        finally:
            self._free.release()
