"""What every model deployment's replica does, whatever the model family (SD, LCM, FLUX).

A replica owns one torch thread, a node-local weights cache fed by the AdapterFetcher, a model
registry, the safety checker, an LRU of loaded base models and a keyed batcher. A request
(`generate(job)`) is routed by its multiplexed id, finds its base model, resolves its adapters
to local files named by content, and joins a batch of compatible jobs; the batch runs on the
torch thread. A family says how to load a model (`load_model`), which adapters a job has
(`resolve_adapters`) and how to run a batch (`run_batch`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, Protocol, TypeVar

import psutil
import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.adapters import ClusterWeights
from deployments.common.batcher import BatchLimits, KeyedBatcher
from deployments.common.devices import select_device
from deployments.common.jobs import ImageJob, JobResult, ModelRef
from deployments.common.lora import ResolvedLora, is_mixable
from deployments.common.model_cache import ModelCache
from deployments.common.model_sources import ModelRegistry
from deployments.common.safety import SafetyChecker
from deployments.common.weights_cache import LocalWeights, WeightsCache, WeightsProvider, content_name
from serve_app.config import AppConfig
from serve_app.metrics import metrics

logger = logging.getLogger("diffusion_serve.replica")


class JobAdapters(Protocol):
    loras: list[ResolvedLora]

    def key(self) -> tuple: ...


Model = TypeVar("Model")
Progress = Callable[[int, int], None]  # (denoising steps done, total), called from the torch thread
StepHook = Callable[[int, int], bool]  # progress, answering True when the call should stop denoising
Adapters = TypeVar("Adapters", bound=JobAdapters)


def split_by_lora_budget(batch: list[tuple[Any, ImageJob, JobAdapters]], capacity: int) -> list[list]:
    """Consecutive runs of a batch whose LoRAs, together, fit the loaded-adapter LRU."""
    runs: list[list] = [[]]
    names: set[str] = set()
    for item in batch:
        mine = {lora.name for lora in item[2].loras}
        if runs[-1] and len(names | mine) > capacity:
            runs.append([])
            names = set()
        runs[-1].append(item)
        names |= mine
    return runs


class ModelReplica(Generic[Model, Adapters]):
    """The family-independent replica; subclasses are the Serve deployments' classes."""

    family = "model"

    def __init__(self, config: dict[str, Any] | None = None, fetcher: DeploymentHandle | None = None) -> None:
        self.config = AppConfig.from_args(config)
        self.device, self.dtype = select_device(self.config.device.cuda_dtype)
        # Every torch call of this replica (loading, LoRA injection, batches) runs on this one
        # thread: one thread drives the device, and on CPUs a second thread doing torch work
        # starts a second OpenMP team that fights the first for cores (measured: 2.5x slower).
        self.torch_thread = ThreadPoolExecutor(1, thread_name_prefix="torch", initializer=self._init_torch_thread)
        w = self.config.weights
        node_cache = WeightsCache(w.cache_dir / "node", self.config.network, w.max_cache_bytes, w.max_file_bytes, w.download_timeout_s, w.allow_pickle)
        # Through the cluster's AdapterFetcher when there is one: one download per cluster.
        self.weights: WeightsProvider = ClusterWeights(fetcher, node_cache) if fetcher else LocalWeights(node_cache)
        self.registry = ModelRegistry(self.config, self.weights)
        self.safety = SafetyChecker(self.config.safety_checker_source(), self.device, self.dtype)
        b = self.config.batching
        limits = BatchLimits(
            max_cost=b.max_cost if b.enabled else 0.0,
            max_items=b.max_images if b.enabled else 1,
            max_wait_s=b.max_wait_ms / 1000 if b.enabled else 0.0,
        )
        self.batcher: KeyedBatcher[tuple[Model, ImageJob, Adapters], JobResult] = KeyedBatcher(self._run_batch, limits, executor=self.torch_thread)

        async def load(model_key: str) -> Model:
            started = time.perf_counter()
            resolved = await self.resolve_model(ModelRef.from_key(model_key))
            model = await asyncio.get_running_loop().run_in_executor(self.torch_thread, self.load_model, resolved)
            metrics().model_loads.inc()
            metrics().model_load_seconds.observe(time.perf_counter() - started)
            self._record_device_memory()
            return model

        # What stays in memory: base models, LRU.
        self.models: ModelCache[Model] = ModelCache(self.config.max_models_per_replica, load, self._free_device_memory)

        async def advertise(routing_key: str) -> str:
            return routing_key  # the weights live in self.models; this only tells Serve's router

        # Where requests go: Serve routes a routing key (base model + adapter set) to replicas
        # that advertised it, so adapter requests find their adapters already loaded.
        self.get_routing_key = serve.multiplexed(max_num_models_per_replica=self.config.max_routing_keys_per_replica)(advertise)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        logger.info("%s replica on %s (%s), profile %s", self.family, self.device, self.dtype, self.config.profile)

    # --- what a family provides -------------------------------------------------------------

    async def resolve_model(self, ref: ModelRef):
        return await self.registry.resolve(ref)

    def load_model(self, resolved) -> Model:
        raise NotImplementedError

    async def resolve_adapters(self, job: ImageJob) -> Adapters:
        raise NotImplementedError

    def run_batch(self, model: Model, jobs: list[ImageJob], adapters: list[Adapters], on_step: StepHook | None = None) -> list[JobResult]:
        """One pipeline call; `on_step(done, total)` after each denoising step, when given; its
        True means every caller has gone: skip the remaining steps."""
        raise NotImplementedError

    def lora_capacity(self, model: Model) -> int:
        return model.adapters.capacity  # type: ignore[attr-defined]

    # --- shared ---------------------------------------------------------------------------

    def _free_device_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _init_torch_thread(self) -> None:
        if self.device.type == "cpu" and self.config.device.cpu_threads:
            torch.set_num_threads(self.config.device.cpu_threads)  # per thread under OpenMP

    def _record_device_memory(self) -> None:
        if self.device.type == "cuda":
            used = torch.cuda.memory_allocated(self.device)
        else:
            used = psutil.Process().memory_info().rss
        metrics().device_memory_bytes.set(used, tags={"device": str(self.device)})

    def _run_batch(self, items: list[tuple[Model, ImageJob, Adapters, Progress | None, threading.Event]]) -> list[JobResult]:
        started = time.perf_counter()
        results = self._run_batch_calls(items)
        metrics().inference_seconds.observe(time.perf_counter() - started)
        metrics().batch_size.observe(len(items))
        metrics().images.inc(sum(item[1].num_images for item in items))
        self._record_device_memory()
        return results

    def _run_batch_calls(self, items: list[tuple[Model, ImageJob, Adapters, Progress | None, threading.Event]]) -> list[JobResult]:
        model = items[0][0]
        results: list[JobResult] = []
        for run in split_by_lora_budget(items, self.lora_capacity(model)):
            sinks = [item[3] for item in run if item[3] is not None]
            cancelled = [item[4] for item in run]

            def on_step(done: int, total: int, sinks=sinks, cancelled=cancelled) -> bool:
                """Report the step; True (stop denoising) once every job of this call was cancelled."""
                for sink in sinks:
                    sink(done, total)
                return all(flag.is_set() for flag in cancelled)

            results += self.run_batch(model, [item[1] for item in run], [item[2] for item in run], on_step)
        return results

    async def resolve_loras(self, job: ImageJob) -> list[ResolvedLora]:
        """Local files for the job's LoRAs (fetched once per node), named by content."""
        files = list(await asyncio.gather(*(self.weights.get(path, ("loras", i, "path")) for i, (path, _) in enumerate(job.loras))))
        scales = [scale for _, scale in job.loras]
        if job.lcm_lora:  # the operator's LCM-LoRA: the base model's 4-step distillation
            files.insert(0, await self.registry.lcm_lora(job.lcm_lora, job.model.architecture))
            scales.insert(0, 1.0)
        merged: dict[str, ResolvedLora] = {}
        for file, scale in zip(files, scales):
            name = f"lora_{await asyncio.to_thread(content_name, file)}"
            previous = merged.get(name)
            mixable = previous.mixable if previous else await asyncio.to_thread(is_mixable, file)
            merged[name] = ResolvedLora(name, file, scale + (previous.scale if previous else 0.0), mixable)
        return list(merged.values())

    async def _submit(self, job: ImageJob, progress: Progress | None) -> JobResult:
        await self.get_routing_key(serve.get_multiplexed_model_id() or job.routing_key())
        metrics().multiplex_lookups.inc(tags={"result": "hit" if job.model.key() in self.models else "miss"})
        model = await self.models.get(job.model.key())
        adapters = await self.resolve_adapters(job)
        # Adapters join the batch key by content (and scale/tokens), not by how they were spelled.
        key = (*job.batch_key(), *adapters.key())
        cancelled = threading.Event()  # set when the caller goes away: its batch may stop early
        try:
            result = await self.batcher.submit(key, (model, job, adapters, progress, cancelled), job.cost(), job.num_images)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        result.replica = self.replica_id
        return result

    async def generate(self, job: ImageJob) -> JobResult:
        return await self._submit(job, None)

    async def generate_stream(self, job: ImageJob) -> AsyncIterator[tuple[int, int] | JobResult]:
        """`(step, total)` after each denoising step of the job's batch, then the result."""
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        task = asyncio.ensure_future(self._submit(job, lambda done, total: loop.call_soon_threadsafe(steps.put_nowait, (done, total))))
        try:
            while not task.done():
                getter = asyncio.ensure_future(steps.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            while not steps.empty():
                yield steps.get_nowait()
            yield task.result()
        finally:
            task.cancel()

    async def check_health(self) -> None:
        """Serve's health probe: the event loop answers, so batching is not stalled."""
