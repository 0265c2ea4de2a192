"""The FLUX family (FLUX.1-dev): text-to-image, image-to-image and inpainting, with LoRAs.

FLUX differs from SD where the shared code would notice. Its transformer denoises 16-channel
latents packed 2x2 into tokens; they are unpacked here, and the shared `finish` decodes them as
it decodes SD's. FLUX.1-dev is guidance-distilled: `guidance_scale` is an input of the
transformer, not classifier-free guidance, so there is one forward pass per image and no negative
prompt, and each prompt goes once through CLIP (pooled) and T5 (per token). For the LoRA mixer
this means that every row the transformer and the text encoders see is one image, which is what it
assumes. Everything else (per-image seeds, decoding and tiling, the safety checker, LoRAs mixed
per image) is the machinery SD uses: generation.py and lora.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from ray import serve

from deployments.common.generation import StepCallback, denoise, expand, finish, pipelines_for_modes
from deployments.common.jobs import ImageJob, JobInputError, JobResult, Mode, ModelRef
from deployments.common.lora import LoadedAdapters, ResolvedLora, lora_batch_key
from deployments.common.replica import ModelReplica
from deployments.common.safety import SafetyChecker
from deployments.tiny_models import ensure_tiny_model

logger = logging.getLogger("diffusion_serve.flux")

# The VAE's 8x times the transformer's 2x2 packing: image sides must be multiples of this.
SIDE_MULTIPLE = 16


@dataclass
class FluxModel:
    """One FLUX checkpoint's weights, seen through the three pipelines that share them."""

    name: str
    pipelines: dict[Mode, Any]
    adapters: LoadedAdapters


def load_flux_model(location: str, device: torch.device, dtype: torch.dtype, max_loras: int = 32, name: str | None = None) -> FluxModel:
    """Load a FLUX pipeline from a diffusers directory or HF repo id; `name` is what errors call it
    (the user's `model_name`, not the local path it resolved to)."""
    from diffusers import FluxPipeline

    if dtype == torch.float16:
        dtype = torch.bfloat16  # FLUX's activations overflow fp16 (black images); it is made for bf16
    name = name or location
    try:
        pipe = FluxPipeline.from_pretrained(location, torch_dtype=dtype, use_safetensors=True)
    except Exception as exc:  # noqa: BLE001 - any load failure is the user's model_name
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise JobInputError(("model_name",), f"model {name!r} could not be loaded: {reason}", "model_load_error") from None
    pipe.to(device)
    pipelines = pipelines_for_modes(pipe)
    logger.info("loaded FLUX model %s on %s as %s", name, device, dtype)
    return FluxModel(name, pipelines, LoadedAdapters(pipe, max_loras))


def _check_size(job: ImageJob) -> None:
    """diffusers would quietly round other sizes down and return a smaller image."""
    w, h = job.width, job.height
    if w % SIDE_MULTIPLE or h % SIDE_MULTIPLE:
        down = f"{max(SIDE_MULTIPLE, w - w % SIDE_MULTIPLE)}x{max(SIDE_MULTIPLE, h - h % SIDE_MULTIPLE)}"
        up = f"{w + -w % SIDE_MULTIPLE}x{h + -h % SIDE_MULTIPLE}"
        raise JobInputError(("image_size",), f"FLUX needs width and height that are multiples of {SIDE_MULTIPLE} (got {w}x{h}); try {down} or {up}")


def _unpack(pipe, latents: torch.Tensor, job: ImageJob) -> torch.Tensor:
    """(images, tokens, 64) -> (images, 16, height / 8, width / 8): the VAE's layout."""
    return pipe._unpack_latents(latents, job.height, job.width, pipe.vae_scale_factor)


def run_flux_batch(
    model: FluxModel,
    jobs: list[ImageJob],
    safety: SafetyChecker,
    per_job_loras: list[list[ResolvedLora]] | None = None,
    on_step: Callable[[int, int], bool | None] | None = None,
) -> list[JobResult]:
    """One pipeline call for jobs that share a batch key (mode, size, steps, guidance, strength);
    their prompts, seeds, images and LoRAs may differ. `per_job_loras[i]` are job i's LoRAs,
    resolved to files; the caller keeps a call's distinct LoRAs within `model.adapters.capacity`."""
    started = time.monotonic()
    job = jobs[0]
    _check_size(job)
    model.adapters.activate_for_jobs(per_job_loras or [[] for _ in jobs], [j.num_images for j in jobs])
    pipe = model.pipelines[job.mode]
    items = expand(jobs)
    kwargs: dict[str, Any] = {
        "prompt": items.prompts,
        "generator": items.generators,
        "guidance_scale": job.guidance_scale,
        "num_inference_steps": job.num_inference_steps,
        "height": job.height,
        "width": job.width,
    }
    if job.mode != "text-to-image":
        kwargs.update(image=items.images, strength=job.strength)
    if job.mode == "inpaint":
        kwargs["mask_image"] = items.masks
    step_latents = StepCallback(job.debug_per_pass_latents, on_step)
    if step_latents:
        kwargs["callback_on_step_end"] = step_latents
    latents = _unpack(pipe, denoise(pipe, kwargs), job)
    if step_latents.steps:
        step_latents.steps = [_unpack(pipe, step, job) for step in step_latents.steps]
    return finish(pipe, latents, jobs, items, safety, started, step_latents)


@dataclass(frozen=True)
class FluxAdapters:
    loras: list[ResolvedLora]

    def key(self) -> tuple:
        return (lora_batch_key(self.loras),)


class FluxReplica(ModelReplica[FluxModel, FluxAdapters]):
    """FLUX replicas: the operator's FLUX model (`flux_model`), LoRAs per job."""

    family = "Flux"

    async def resolve_model(self, ref: ModelRef) -> tuple[str, str]:
        """(where to load from, what to call it). The demo profile serves the tiny stand-in."""
        name = ref.model_name
        if self.config.is_demo:
            location = str(ensure_tiny_model("flux"))
            logger.warning("DEMO PROFILE: FLUX model %r is served by the tiny random-weight stand-in at %s", name, location)
            return location, name
        alias = self.config.models.get(name)
        return (alias.source if alias else name), name

    def load_model(self, resolved: tuple[str, str]) -> FluxModel:
        location, name = resolved
        return load_flux_model(location, self.device, self.dtype, self.config.max_loras_per_model, name)

    async def resolve_adapters(self, job: ImageJob) -> FluxAdapters:
        return FluxAdapters(await self.resolve_loras(job))

    def run_batch(self, model: FluxModel, jobs: list[ImageJob], adapters: list[FluxAdapters], on_step=None) -> list[JobResult]:
        return run_flux_batch(model, jobs, self.safety, [a.loras for a in adapters], on_step)


# Scale to zero in production (cluster/production.yaml): FLUX needs a whole large GPU.
Flux = serve.deployment(name="Flux", max_ongoing_requests=32, graceful_shutdown_timeout_s=600)(FluxReplica)
