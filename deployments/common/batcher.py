"""A keyed batcher: groups compatible jobs into one pipeline call, one call at a time.

Ray Serve's `@serve.batch` groups only by multiplexed model id, but two jobs may share a diffusion
call only when every pipeline-level setting matches (size, steps, scheduler, guidance, ...). So
jobs queue under their compatibility key; the oldest key is served first (FIFO across keys), and
its batch closes when the next job would exceed the cost budget, when it holds `max_items` items,
or `max_wait_s` after its first job arrived. The call itself runs in a worker thread so the event
loop (health checks, multiplexing, more arrivals) never stalls.

Waiting is adaptive: a batch also closes as soon as it holds as many jobs as the key's recent
demand, the jobs of the batch that just finished plus those that queued meanwhile (the clients
just served tend to come back). An idle replica (demand: one job) therefore runs a lone job at
once, while a busy one waits, up to `max_wait_s`, for its clients to return.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Pending(Generic[Item]):
    item: Item
    cost: float
    size: int
    arrived: float
    future: asyncio.Future = field(repr=False)


@dataclass(frozen=True)
class BatchLimits:
    max_cost: float
    max_items: int
    max_wait_s: float


class KeyedBatcher(Generic[Item, Result]):
    """`await submit(key, item, cost, size)` returns that item's result from `run_batch`.

    `run_batch(items)` is synchronous (it runs in a thread) and returns one result per item, in
    order; a result that is an Exception is raised to that item's caller alone. If `run_batch`
    itself raises, every item of that batch gets the error.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Item]], Sequence[Result | BaseException]],
        limits: BatchLimits,
        executor: Executor | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._executor = executor  # where calls run; None: asyncio's default thread pool
        self._limits = limits
        self._queues: OrderedDict[Hashable, list[_Pending[Item]]] = OrderedDict()
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._demand: dict[Hashable, int] = {}

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    async def submit(self, key: Hashable, item: Item, cost: float, size: int = 1) -> Result:
        loop = asyncio.get_running_loop()
        pending = _Pending(item, cost, size, time.monotonic(), loop.create_future())
        self._queues.setdefault(key, []).append(pending)
        self._wakeup.set()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work())
        try:
            return await pending.future
        except asyncio.CancelledError:
            # The caller went away: drop the job if it has not started.
            queue = self._queues.get(key)
            if queue and pending in queue:
                queue.remove(pending)
                if not queue:
                    del self._queues[key]
            raise

    def _oldest_key(self) -> Hashable | None:
        if not self._queues:
            return None
        return min(self._queues, key=lambda k: self._queues[k][0].arrived)

    def _is_ready(self, key: Hashable, queue: list[_Pending[Item]]) -> bool:
        """Full, or as large as the key's recent demand (no reason to expect more)."""
        cost = sum(p.cost for p in queue)
        items = sum(p.size for p in queue)
        full = cost >= self._limits.max_cost or items >= self._limits.max_items
        return full or len(queue) >= self._demand.get(key, 1)

    def _take(self, key: Hashable) -> list[_Pending[Item]]:
        """The longest FIFO prefix of the key's queue that fits the budget (at least one job)."""
        queue = self._queues[key]
        taken: list[_Pending[Item]] = [queue[0]]
        cost, items = queue[0].cost, queue[0].size
        for p in queue[1:]:
            if cost + p.cost > self._limits.max_cost or items + p.size > self._limits.max_items:
                break
            taken.append(p)
            cost += p.cost
            items += p.size
        del queue[: len(taken)]
        if not queue:
            del self._queues[key]
        return taken

    async def _work(self) -> None:
        while True:
            free_since = time.monotonic()
            key = self._oldest_key()
            if key is None:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=60)
                except asyncio.TimeoutError:
                    if not self._queues:
                        return  # idle: a new submit starts a fresh worker
                continue
            # Jobs that queued while a call ran may still wait (briefly) for their usual company:
            # the wait counts from when the worker became free, not only from arrival.
            deadline = max(self._queues[key][0].arrived, free_since) + self._limits.max_wait_s
            while key in self._queues and not self._is_ready(key, self._queues[key]):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
                except asyncio.TimeoutError:
                    break
            if key not in self._queues:  # every job of the key was cancelled while waiting
                continue
            batch = [p for p in self._take(key) if not p.future.done()]
            if batch:
                await self._run(batch)
            self._demand[key] = max(1, len(batch) + len(self._queues.get(key, ())))

    async def _run(self, batch: list[_Pending[Item]]) -> None:
        try:
            loop = asyncio.get_running_loop()
            results: Sequence[Any] = await loop.run_in_executor(self._executor, self._run_batch, [p.item for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
        except BaseException as exc:  # noqa: BLE001 - every caller must hear about it
            results = [exc] * len(batch)
        for p, result in zip(batch, results):
            if p.future.done():
                continue
            if isinstance(result, BaseException):
                p.future.set_exception(result)
            else:
                p.future.set_result(result)
