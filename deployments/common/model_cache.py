"""A replica's loaded base models: an LRU that loads each at most once, however many ask at once.

Serve's `@serve.multiplexed` decides where requests go (by base model plus adapter set, for
affinity); this cache decides what stays in memory. Keeping the two apart lets many routing keys
(one base model with many LoRA sets) share one copy of the weights.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

logger = logging.getLogger("diffusion_serve.models")

Model = TypeVar("Model")


class ModelCache(Generic[Model]):
    def __init__(self, capacity: int, load: Callable[[str], Awaitable[Model]], on_evict: Callable[[], None] | None = None) -> None:
        self.capacity = capacity
        self._load = load
        self._on_evict = on_evict
        self._models: OrderedDict[str, Model] = OrderedDict()
        self._loading: dict[str, asyncio.Future[Model]] = {}
        self.loads = 0

    def __contains__(self, key: str) -> bool:
        return key in self._models

    async def get(self, key: str) -> Model:
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        if key in self._loading:
            return await asyncio.shield(self._loading[key])
        future: asyncio.Future[Model] = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        try:
            model = await self._load(key)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # waiters re-raise it; a failed load is never cached
            raise
        finally:
            del self._loading[key]
        self.loads += 1
        self._models[key] = model
        while len(self._models) > self.capacity:
            evicted, _ = self._models.popitem(last=False)
            logger.info("evicted base model %s", evicted)
            if self._on_evict:
                self._on_evict()
        future.set_result(model)
        return model
