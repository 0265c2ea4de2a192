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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from ray import serve

from deployments.common.compat import cache_processor_signatures, sd15_clip_skip_embeddings
from deployments.common.controlnets import (
    LoadedControlNets,
    ResolvedControlNet,
    control_batch,
    mask_tensor,
    resolve_controlnet,
)
from deployments.common.embeddings import LoadedEmbeddings, ResolvedEmbedding
from deployments.common.generation import StepCallback, denoise, expand, finish, pipelines_for_modes
from deployments.common.ip_adapters import LoadedIPAdapters, ResolvedIPAdapter, ip_adapter_kwargs
from deployments.common.jobs import ImageJob, JobInputError, JobResult, Mode
from deployments.common.lora import LoadedAdapters, ResolvedLora, lora_batch_key
from deployments.common.model_sources import ResolvedModel, WeightsSource
from deployments.common.replica import ModelReplica
from deployments.common.safety import SafetyChecker
from deployments.common.schedulers import (
    SchedulerChoice,
    build_scheduler,
    scheduler_label,
    unsupported_schedule_argument,
)
from deployments.common.weights_cache import content_name

logger = logging.getLogger("diffusion_serve.stable_diffusion")



@dataclass(frozen=True)
class Adapters:
    """A job's adapters, resolved to local files named by content."""

    loras: list[ResolvedLora]
    embeddings: list[ResolvedEmbedding]
    controlnets: list[ResolvedControlNet]
    ip_adapters: list[ResolvedIPAdapter] = field(default_factory=list)

    def key(self) -> tuple:
        """The part of the batch key the adapters make: equal content, equal key."""
        return (
            lora_batch_key(self.loras),
            tuple((e.name, e.tokens) for e in self.embeddings),
            tuple(c.name for c in self.controlnets),
            tuple(self.ip_adapters),
        )


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
    pipelines = pipelines_for_modes(pipe)
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


def run_sd_batch(
    model: SDModel,
    jobs: list[ImageJob],
    safety: SafetyChecker,
    per_job: list[Adapters] | None = None,
    on_step: Callable[[int, int], bool | None] | None = None,
) -> list[JobResult]:
    """One pipeline call for jobs that share a batch key: the same embeddings and ControlNets;
    LoRAs may differ per job (see lora.py)."""
    started = time.monotonic()
    job = jobs[0]
    per_job = per_job or [Adapters([], [], [])] * len(jobs)
    adapters = per_job[0]
    model.embeddings.activate(adapters.embeddings, _fields("embeddings", len(adapters.embeddings)))
    model.adapters.activate_for_jobs([adapters.loras for adapters in per_job], [job.num_images for job in jobs])
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
    step_latents = StepCallback(job.debug_per_pass_latents, on_step)
    if step_latents:
        kwargs["callback_on_step_end"] = step_latents
    latents = denoise(pipe, kwargs)
    return finish(pipe, latents, jobs, items, safety, started, step_latents)


class StableDiffusionReplica(ModelReplica[SDModel, Adapters]):
    """SD1.5/SDXL replicas: `generate(job)` with the multiplexed model id set to `job.routing_key()`.
    LoRAs, embeddings, ControlNets and IP-Adapters come with a job."""

    family = "StableDiffusion"

    def load_model(self, resolved: ResolvedModel) -> SDModel:
        return load_sd_model(resolved, self.device, self.dtype, self.config.max_loras_per_model, self.config.max_controlnets_per_model)

    def run_batch(self, model: SDModel, jobs: list[ImageJob], adapters: list[Adapters], on_step=None) -> list[JobResult]:
        return run_sd_batch(model, jobs, self.safety, adapters, on_step)

    async def resolve_adapters(self, job: ImageJob) -> Adapters:
        loras, embeddings, controlnets, ip_adapters = await asyncio.gather(
            self.resolve_loras(job), self._resolve_embeddings(job), self._resolve_controlnets(job), self._resolve_ip_adapters(job)
        )
        return Adapters(loras, embeddings, controlnets, ip_adapters)

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


# Two deployments of the same replica class: the SD family, and LCM (LCM-distilled models, or
# base models plus an LCM-LoRA, small enough to share a GPU). The router decides what a job holds.
StableDiffusion = serve.deployment(name="StableDiffusion", max_ongoing_requests=64, graceful_shutdown_timeout_s=600)(StableDiffusionReplica)
LCM = serve.deployment(name="LCM", max_ongoing_requests=64, graceful_shutdown_timeout_s=120)(StableDiffusionReplica)
