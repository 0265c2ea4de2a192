"""The StableDiffusion deployment: SD1.5 and SDXL text-to-image, image-to-image and inpainting.

Requests carry a routing key (base model, plus the LoRA set when there is one) as their
`@serve.multiplexed` model id, so Serve routes them to a replica that already holds that model and
those adapters; the weights themselves sit in a per-replica LRU of base models (`ModelCache`). The three modes share one set of weights (`from_pipe`).
Jobs queue in a keyed batcher; each batch is one pipeline call in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.adapters import ClusterWeights
from deployments.common.batcher import BatchLimits, KeyedBatcher
from deployments.common.compat import cache_processor_signatures, sd15_clip_skip_embeddings
from deployments.common.controlnets import (
    LoadedControlNets,
    ResolvedControlNet,
    control_batch,
    mask_tensor,
    resolve_controlnet,
)
from deployments.common.devices import select_device
from deployments.common.embeddings import LoadedEmbeddings, ResolvedEmbedding
from deployments.common.generation import StepLatents, expand, finish
from deployments.common.ip_adapters import LoadedIPAdapters, ResolvedIPAdapter, ip_adapter_kwargs
from deployments.common.jobs import ImageJob, JobInputError, JobResult, Mode, ModelRef
from deployments.common.lora import LoadedAdapters, ResolvedLora, is_mixable
from deployments.common.model_cache import ModelCache
from deployments.common.model_sources import ModelRegistry, ResolvedModel, WeightsSource
from deployments.common.safety import SafetyChecker
from deployments.common.schedulers import (
    SchedulerChoice,
    build_scheduler,
    scheduler_label,
    unsupported_schedule_argument,
)
from deployments.common.weights_cache import LocalWeights, WeightsCache, WeightsProvider, content_name
from serve_app.config import AppConfig

logger = logging.getLogger("diffusion_serve.stable_diffusion")



@dataclass(frozen=True)
class Adapters:
    """A job's adapters, resolved to local files named by content."""

    loras: list[ResolvedLora]
    embeddings: list[ResolvedEmbedding]
    controlnets: list[ResolvedControlNet]
    ip_adapters: list[ResolvedIPAdapter] = field(default_factory=list)

    @property
    def mixed_loras(self) -> bool:
        """Plain LoRAs ride the per-image mixer, so they do not split batches."""
        return all(lora.mixable for lora in self.loras)

    def key(self) -> tuple:
        """The part of the batch key the adapters make: equal content, equal key."""
        return (
            "mixed" if self.mixed_loras else tuple((lora.name, lora.scale) for lora in self.loras),
            tuple((e.name, e.tokens) for e in self.embeddings),
            tuple(c.name for c in self.controlnets),
            tuple(self.ip_adapters),
        )


def split_by_lora_budget(batch: list[tuple[Any, ImageJob, Adapters]], capacity: int) -> list[list]:
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


@dataclass
class SDModel:
    """One base model's weights, seen through the three pipelines that share them."""

    resolved: ResolvedModel
    pipelines: dict[Mode, Any]
    default_scheduler: Any
    adapters: LoadedAdapters
    embeddings: LoadedEmbeddings
    controlnets: LoadedControlNets
    ip_adapters: LoadedIPAdapters


def _load_unet(source: WeightsSource, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    if source.kind == "single_file":
        return UNet2DConditionModel.from_single_file(source.location, torch_dtype=dtype)
    try:
        return UNet2DConditionModel.from_pretrained(source.location, variant=source.variant, torch_dtype=dtype, use_safetensors=True)
    except OSError:
        # A full pipeline repo keeps its UNet in a subfolder.
        return UNet2DConditionModel.from_pretrained(
            source.location, subfolder="unet", variant=source.variant, torch_dtype=dtype, use_safetensors=True
        )


def _load_error(field: str, what: str, exc: Exception) -> JobInputError:
    reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    return JobInputError((field,), f"{what} could not be loaded: {reason}", "model_load_error")


def load_sd_model(
    resolved: ResolvedModel, device: torch.device, dtype: torch.dtype, max_loras: int = 32, max_controlnets: int = 4
) -> SDModel:
    from diffusers import (
        AutoPipelineForImage2Image,
        AutoPipelineForInpainting,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    cache_processor_signatures()
    cls = StableDiffusionXLPipeline if resolved.architecture == "sdxl" else StableDiffusionPipeline
    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if cls is StableDiffusionPipeline:
        kwargs.update(safety_checker=None, requires_safety_checker=False)  # ours runs after decoding
    if resolved.unet is not None:
        try:
            kwargs["unet"] = _load_unet(resolved.unet, dtype)
        except Exception as exc:  # noqa: BLE001 - any load failure is the user's unet_name
            raise _load_error("unet_name", f"unet {resolved.ref.unet_name!r}", exc) from None
    base = resolved.base
    name = f"model {resolved.ref.model_name!r}"
    try:
        if base.kind == "single_file":
            pipe = cls.from_single_file(base.location, **kwargs)
        else:
            pipe = cls.from_pretrained(base.location, variant=base.variant, use_safetensors=True, **kwargs)
    except Exception as exc:  # noqa: BLE001
        if base.variant and "variant" in str(exc).lower():
            raise _load_error("variant", f"variant {base.variant!r} of {name}", exc) from None
        raise _load_error("model_name", name, exc) from None
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    pipelines: dict[Mode, Any] = {
        "text-to-image": pipe,
        "image-to-image": AutoPipelineForImage2Image.from_pipe(pipe),
        "inpaint": AutoPipelineForInpainting.from_pipe(pipe),
    }
    for p in pipelines.values():
        p.set_progress_bar_config(disable=True)
    logger.info("loaded %s (%s) on %s as %s", resolved.ref.model_name, resolved.architecture, device, dtype)
    return SDModel(
        resolved,
        pipelines,
        pipe.scheduler,
        LoadedAdapters(pipe, max_loras),
        LoadedEmbeddings(pipe),
        LoadedControlNets(pipe, device, dtype, max_controlnets),
        LoadedIPAdapters(pipe),
    )


def _prompt_kwargs(pipe, job: ImageJob, prompts: list[str], negatives: list[str]) -> dict[str, Any]:
    clip_skip = job.clip_skip or None
    if not job.prompt_weighting:
        if clip_skip and not hasattr(pipe, "text_encoder_2"):
            return sd15_clip_skip_embeddings(pipe, prompts, negatives, clip_skip)  # see compat.py
        return {"prompt": prompts, "negative_prompt": negatives, "clip_skip": clip_skip}
    from deployments.common.prompt_weighting import encode_prompts

    return encode_prompts(pipe, prompts, negatives, clip_skip=clip_skip, do_classifier_free_guidance=job.guidance_scale > 1)


def _fields(name: str, n: int) -> list[tuple]:
    return [(name, i, "path") for i in range(n)]


def _controlnet_kwargs(pipe, job: ImageJob, items) -> dict[str, Any]:
    """Per-ControlNet images (one per batch item), scales, schedule and masks."""
    images = [control_batch(per_item) for per_item in items.control_images]
    pipe.controlnet.masks = [mask_tensor(masks, job.height, job.width) for masks in items.control_masks]
    return {
        "image" if job.mode == "text-to-image" else "control_image": images,
        "controlnet_conditioning_scale": [c.conditioning_scale for c in job.controlnets],
        "control_guidance_start": [c.start for c in job.controlnets],
        "control_guidance_end": [c.end for c in job.controlnets],
        "guess_mode": job.controlnet_guess_mode,
    }


def _activate_loras(model: SDModel, jobs: list[ImageJob], per_job: list[Adapters]) -> None:
    """Plain LoRAs: the per-image mixer, even for a single set (its stacked hook costs less per
    layer than peft's adapter loop). Others: peft's path, one set per call."""
    if per_job[0].mixed_loras:
        per_image = [adapters.loras for job, adapters in zip(jobs, per_job) for _ in range(job.num_images)]
        fields = [_fields("loras", len(loras)) for loras in per_image]
        model.adapters.activate_per_image(per_image, fields)
    else:
        model.adapters.activate(per_job[0].loras, _fields("loras", len(per_job[0].loras)))


def run_sd_batch(model: SDModel, jobs: list[ImageJob], safety: SafetyChecker, per_job: list[Adapters] | None = None) -> list[JobResult]:
    """One pipeline call for jobs that share a batch key: the same embeddings and ControlNets;
    LoRAs may differ per job (see lora.py)."""
    started = time.monotonic()
    job = jobs[0]
    per_job = per_job or [Adapters([], [], [])] * len(jobs)
    adapters = per_job[0]
    model.embeddings.activate(adapters.embeddings, _fields("embeddings", len(adapters.embeddings)))
    _activate_loras(model, jobs, per_job)
    model.ip_adapters.activate(adapters.ip_adapters, [("ip_adapter", i) for i in range(len(adapters.ip_adapters))])
    if adapters.controlnets:
        pipe = model.controlnets.pipeline(job.mode, adapters.controlnets, _fields("controlnets", len(adapters.controlnets)))
    else:
        pipe = model.pipelines[job.mode]
    choice = SchedulerChoice(job.scheduler, job.prediction_type, job.rescale_betas_snr_zero)
    bad = unsupported_schedule_argument(model.default_scheduler, choice, bool(job.timesteps), bool(job.sigmas))
    if bad:
        label = scheduler_label(model.default_scheduler, choice)
        raise JobInputError((bad,), f"the scheduler {label} does not accept custom {bad}; pick another scheduler or use method 'default'")
    pipe.scheduler = build_scheduler(model.default_scheduler, choice)

    items = expand(jobs)
    kwargs: dict[str, Any] = {
        "num_inference_steps": job.num_inference_steps,
        "guidance_scale": job.guidance_scale,
        "generator": items.generators,
        "eta": job.eta,
        "output_type": "latent",
        **_prompt_kwargs(pipe, job, items.prompts, items.negative_prompts),
    }
    if job.timesteps:
        kwargs["timesteps"] = list(job.timesteps)
    if job.sigmas:
        kwargs["sigmas"] = list(job.sigmas)
    if job.mode == "text-to-image":
        kwargs.update(height=job.height, width=job.width)
    else:
        kwargs.update(image=items.images, strength=job.strength)
    if job.mode == "inpaint":
        kwargs.update(mask_image=items.masks, height=job.height, width=job.width)
    if adapters.controlnets:
        kwargs.update(_controlnet_kwargs(pipe, job, items))
    if adapters.ip_adapters:
        kwargs.update(ip_adapter_kwargs(pipe, model.ip_adapters, items.ip_images, items.ip_masks, job.guidance_scale, job.height, job.width))
    step_latents = StepLatents() if job.debug_per_pass_latents else None
    if step_latents:
        kwargs["callback_on_step_end"] = step_latents
    try:
        latents = pipe(**kwargs).images
    except ValueError as exc:
        # diffusers rejects some combinations only when called (e.g. a timestep schedule the
        # scheduler cannot follow); those are the request's fault, not the server's.
        raise JobInputError((), f"the pipeline rejected these settings: {exc}", "invalid_settings") from None
    return finish(pipe, latents, jobs, items, safety, started, step_latents)


@serve.deployment(name="StableDiffusion", max_ongoing_requests=64, graceful_shutdown_timeout_s=600)
class StableDiffusion:
    """SD1.5/SDXL replicas: `generate(job)` with the multiplexed model id set to `job.routing_key()`."""

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
        self.batcher: KeyedBatcher[tuple[SDModel, ImageJob, Adapters], JobResult] = KeyedBatcher(
            self._run_batch, limits, executor=self.torch_thread
        )

        async def load(model_key: str) -> SDModel:
            resolved = await self.registry.resolve(ModelRef.from_key(model_key))
            return await asyncio.get_running_loop().run_in_executor(
                self.torch_thread,
                load_sd_model,
                resolved,
                self.device,
                self.dtype,
                self.config.max_loras_per_model,
                self.config.max_controlnets_per_model,
            )

        # What stays in memory: base models, LRU.
        self.models: ModelCache[SDModel] = ModelCache(self.config.max_models_per_replica, load, self._free_device_memory)

        async def advertise(routing_key: str) -> str:
            return routing_key  # the weights live in self.models; this only tells Serve's router

        # Where requests go: Serve routes a routing key (base model + LoRA set) to replicas that
        # advertised it, so LoRA requests find their adapters already injected.
        self.get_routing_key = serve.multiplexed(max_num_models_per_replica=self.config.max_routing_keys_per_replica)(advertise)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        logger.info("StableDiffusion replica on %s (%s), profile %s", self.device, self.dtype, self.config.profile)

    def _free_device_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _init_torch_thread(self) -> None:
        if self.device.type == "cpu" and self.config.device.cpu_threads:
            torch.set_num_threads(self.config.device.cpu_threads)  # per thread under OpenMP

    def _run_batch(self, items: list[tuple[SDModel, ImageJob, Adapters]]) -> list[JobResult]:
        model = items[0][0]
        results: list[JobResult] = []
        for run in split_by_lora_budget(items, model.adapters.capacity):
            results += run_sd_batch(model, [job for _, job, _ in run], self.safety, [adapters for _, _, adapters in run])
        return results

    async def _resolve_loras(self, job: ImageJob) -> list[ResolvedLora]:
        """Local files for the job's LoRAs (fetched once per node), named by content."""
        files = await asyncio.gather(
            *(self.weights.get(path, ("loras", i, "path")) for i, (path, _) in enumerate(job.loras))
        )
        merged: dict[str, ResolvedLora] = {}
        for file, (_, scale) in zip(files, job.loras):
            name = f"lora_{await asyncio.to_thread(content_name, file)}"
            previous = merged.get(name)
            mixable = previous.mixable if previous else await asyncio.to_thread(is_mixable, file)
            merged[name] = ResolvedLora(name, file, scale + (previous.scale if previous else 0.0), mixable)
        return list(merged.values())

    async def _resolve_embeddings(self, job: ImageJob) -> list[ResolvedEmbedding]:
        files = await asyncio.gather(
            *(self.weights.get(path, ("embeddings", i, "path"), "learned_embeds.safetensors") for i, (path, _) in enumerate(job.embeddings))
        )
        return [
            ResolvedEmbedding(await asyncio.to_thread(content_name, file), file, tokens)
            for file, (_, tokens) in zip(files, job.embeddings)
        ]

    async def _resolve_controlnets(self, job: ImageJob) -> list[ResolvedControlNet]:
        return list(
            await asyncio.gather(
                *(resolve_controlnet(self.weights, c.path, c.config, c.variant, ("controlnets", i, "path")) for i, c in enumerate(job.controlnets))
            )
        )

    async def _resolve_ip_adapters(self, job: ImageJob) -> list[ResolvedIPAdapter]:
        async def resolve(i: int, a) -> ResolvedIPAdapter:
            field = ("ip_adapter", i)
            source = a.path
            if not a.path.startswith(("http://", "https://", "data:")) and a.path.count("/") == 1:
                source = "/".join(p for p in (a.path, a.model_subfolder, a.weight_name or "ip-adapter.safetensors") if p)
            weights, encoder = await asyncio.gather(
                self.weights.get(source, (*field, "path"), "ip-adapter.safetensors"),
                self.registry.image_encoder(a.path, a.model_subfolder, a.image_encoder_path, a.image_encoder_subpath, field),
            )
            return ResolvedIPAdapter(await asyncio.to_thread(content_name, weights), weights, encoder, a.scale, a.scale_json)

        return list(await asyncio.gather(*(resolve(i, a) for i, a in enumerate(job.ip_adapters))))

    async def generate(self, job: ImageJob) -> JobResult:
        await self.get_routing_key(serve.get_multiplexed_model_id() or job.routing_key())
        model = await self.models.get(job.model.key())
        loras, embeddings, controlnets, ip_adapters = await asyncio.gather(
            self._resolve_loras(job), self._resolve_embeddings(job), self._resolve_controlnets(job), self._resolve_ip_adapters(job)
        )
        adapters = Adapters(loras, embeddings, controlnets, ip_adapters)
        # Adapters join the batch key by content (and scale/tokens), not by how they were spelled.
        key = (*job.batch_key(), *adapters.key())
        result = await self.batcher.submit(key, (model, job, adapters), job.cost(), job.num_images)
        result.replica = self.replica_id
        return result

    async def check_health(self) -> None:
        """Serve's health probe: the event loop answers, so batching is not stalled."""
