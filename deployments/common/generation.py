"""The family-independent half of a batched pipeline call.

`expand` turns jobs into per-image items (prompt, negative prompt, one seeded generator each, input
image and mask); the family's code calls its pipeline for latents (`denoise`); `finish` decodes,
runs the safety checker and splits the pixels back into one result per job (the router encodes). Each image
owns a CPU generator seeded `seed + i`, so its noise (initial and per-step) is the same whether
its job ran alone or beside others.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save as safetensors_bytes

from deployments.common.images import to_pil_mask, to_pil_rgb
from deployments.common.jobs import ImageJob, JobInputError, JobResult, Mode
from deployments.common.safety import SafetyChecker, blacken
from deployments.common.vae_decode import decode_latents


@dataclass
class BatchItems:
    prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)
    generators: list[torch.Generator] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    masks: list[Image.Image] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)  # index of the job each item belongs to
    # Per ControlNet k: each item's conditioning image and mask (None: the whole image).
    control_images: list[list[Image.Image]] = field(default_factory=list)
    control_masks: list[list[Image.Image | None]] = field(default_factory=list)
    # Per item, per IP-Adapter k: its images and mask.
    ip_images: list[list[list[Image.Image]]] = field(default_factory=list)
    ip_masks: list[list[Image.Image | None]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)


def expand(jobs: list[ImageJob]) -> BatchItems:
    items = BatchItems()
    items.control_images = [[] for _ in jobs[0].controlnets]
    items.control_masks = [[] for _ in jobs[0].controlnets]
    for index, job in enumerate(jobs):
        image = to_pil_rgb(job.image) if job.image is not None else None
        mask = to_pil_mask(job.mask) if job.mask is not None else None
        controls = [(to_pil_rgb(c.image), to_pil_mask(c.mask) if c.mask is not None else None) for c in job.controlnets]
        ip_images = [[to_pil_rgb(im) for im in a.images] for a in job.ip_adapters]
        ip_masks = [to_pil_mask(a.mask) if a.mask is not None else None for a in job.ip_adapters]
        for seed in job.image_seeds():
            for k, (control, control_mask) in enumerate(controls):
                items.control_images[k].append(control)
                items.control_masks[k].append(control_mask)
            items.ip_images.append(ip_images)
            items.ip_masks.append(ip_masks)
            items.prompts.append(job.prompt)
            items.negative_prompts.append(job.negative_prompt)
            items.generators.append(torch.Generator("cpu").manual_seed(seed))
            items.owners.append(index)
            if image is not None:
                items.images.append(image)
            if mask is not None:
                items.masks.append(mask)
    return items


def pipelines_for_modes(pipe) -> dict[Mode, Any]:
    """A loaded text-to-image pipeline and its image-to-image and inpainting siblings, sharing
    its weights (AutoPipeline's `from_pipe` keeps each module's dtype; the family classes' own
    `from_pipe` casts to its `torch_dtype` argument, float32 when not given)."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    pipelines: dict[Mode, Any] = {
        "text-to-image": pipe,
        "image-to-image": AutoPipelineForImage2Image.from_pipe(pipe),
        "inpaint": AutoPipelineForInpainting.from_pipe(pipe),
    }
    for p in pipelines.values():
        p.set_progress_bar_config(disable=True)
    return pipelines


def denoise(pipe, kwargs: dict) -> torch.Tensor:
    """Run a pipeline up to its final latents (`finish` decodes them). Settings diffusers rejects
    only when called (a timestep schedule the scheduler cannot follow, ...) are the request's
    fault, not the server's."""
    try:
        return pipe(**{**kwargs, "output_type": "latent"}).images
    except ValueError as exc:
        raise JobInputError((), f"the pipeline rejected these settings: {exc}", "invalid_settings") from None


class StepCallback:
    """A `callback_on_step_end`: reports each finished denoising step (for progress and cancels:
    when `on_step` answers True the pipeline skips its remaining steps, through diffusers'
    `interrupt`) and, for `debug_per_pass_latents`, keeps every step's latents."""

    def __init__(self, keep_latents: bool = False, on_step: Callable[[int, int], bool | None] | None = None) -> None:
        self.keep_latents = keep_latents
        self.on_step = on_step
        self.steps: list[torch.Tensor] = []

    def __bool__(self) -> bool:
        return self.keep_latents or self.on_step is not None

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        if self.keep_latents:
            self.steps.append(callback_kwargs["latents"].detach().to("cpu", torch.float32).clone())
        if self.on_step is not None and self.on_step(step + 1, int(getattr(pipe, "num_timesteps", 0) or 0)):
            pipe._interrupt = True  # every caller of this call has gone
        return callback_kwargs


def _latents_file(latents: torch.Tensor) -> bytes:
    return safetensors_bytes({"latents": latents.contiguous()})


def finish(
    pipe,
    latents: torch.Tensor,
    jobs: list[ImageJob],
    items: BatchItems,
    safety: SafetyChecker,
    started: float,
    step_latents: StepCallback | None = None,
) -> list[JobResult]:
    decoded = decode_latents(pipe.vae, latents, jobs[0].tiling)
    images: list[Image.Image] = pipe.image_processor.postprocess(decoded, output_type="pil")
    cpu_latents = latents.detach().to("cpu", torch.float32)
    per_step = torch.stack(step_latents.steps) if step_latents and step_latents.steps else None
    elapsed = time.monotonic() - started
    # One safety-checker call for every image whose job asked for it.
    checked = [i for i, owner in enumerate(items.owners) if jobs[owner].enable_safety_checker]
    flags = [False] * len(images)
    for i, flagged in zip(checked, safety.flags([images[i] for i in checked])):
        flags[i] = flagged
    images = [blacken(im) if flagged else im for im, flagged in zip(images, flags)]
    results = []
    for index, job in enumerate(jobs):
        mine = [i for i, owner in enumerate(items.owners) if owner == index]
        results.append(
            JobResult(
                images=[np.asarray(images[i], dtype=np.uint8) for i in mine],
                has_nsfw_concepts=[flags[i] for i in mine],
                seed=job.seed,
                debug_latents=_latents_file(cpu_latents[mine]) if job.debug_latents else None,
                debug_per_pass_latents=_latents_file(per_step[:, mine]) if per_step is not None and job.debug_per_pass_latents else None,
                batch_size=len(jobs),
                inference_time_s=elapsed,
            )
        )
    return results
