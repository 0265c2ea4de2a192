"""Serving `fal-ai/lcm`: 4-step latent consistency, over HTTP and the realtime WebSocket.

The LCM deployment runs the same replica code as StableDiffusion; what makes a job LCM is
decided here: the `model` value names an LCM-distilled model or a base model plus an LCM-LoRA
(operator config, `lcm_models`), the scheduler is LCM's, and the defaults are fal's.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image as PILImage
from ray.serve.handle import DeploymentHandle

from deployments.common.jobs import ImageJob, JobResult, Mode, ModelRef
from serve_app.config import AppConfig
from serve_app.errors import InputError
from serve_app.files import InputFiles, InputImage, OutputStore, publish_images
from serve_app.schemas.common import size_of
from serve_app.schemas.lcm import LcmInput, LcmOutput
from serve_app.services.dispatch import call_model

MAX_INPUT_SIDE = 1024  # fal scales larger inputs down to this, keeping the aspect


@dataclass
class LcmRun:
    output: LcmOutput
    result: JobResult
    phases_ms: dict[str, float]


def _fit_input(image: InputImage, size: tuple[int, int] | None) -> np.ndarray:
    """The input at the requested size, else at most 1024 px a side; sides rounded down to 8."""
    width, height = image.size
    if size is None:
        factor = min(1.0, MAX_INPUT_SIDE / max(width, height))
        width, height = max(8, int(width * factor)), max(8, int(height * factor))
        width, height = width - width % 8, height - height % 8
    else:
        width, height = size
    if (width, height) == image.size:
        return image.pixels
    resample = PILImage.Resampling.LANCZOS if image.pixels.ndim == 3 else PILImage.Resampling.NEAREST
    return np.asarray(PILImage.fromarray(image.pixels).resize((width, height), resample))


def paste_outside_mask(generated: np.ndarray, original: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`inpaint_mask_only`: the original's pixels wherever the mask is black."""
    alpha = (mask.astype(np.float32) / 255.0)[..., None]
    return np.clip(generated * alpha + original * (1 - alpha) + 0.5, 0, 255).astype(np.uint8)


class LcmService:
    def __init__(self, model: DeploymentHandle, config: AppConfig, inputs: InputFiles, store: OutputStore) -> None:
        self.model = model
        self.config = config
        self.inputs = inputs
        self.store = store

    def _check(self, body: LcmInput) -> None:
        if body.mask_url and not body.image_url:
            raise InputError(["body", "mask_url"], "a mask needs the image it masks: set image_url too", "value_error")
        if body.controlnet_inpaint:
            raise InputError(["body", "controlnet_inpaint"], "ControlNet inpainting is not served by this server; leave it false", "not_supported")
        if not math.isfinite(body.lora_scale) or abs(body.lora_scale) > 10:
            raise InputError(["body", "lora_scale"], "must be a number between -10 and 10", "value_error")
        if body.num_images > self.config.limits.max_images_per_request:
            raise InputError(["body", "num_images"], f"at most {self.config.limits.max_images_per_request} images per request", "value_error")
        if body.image_url and int(body.num_inference_steps * body.strength) < 1:
            raise InputError(
                ["body", "strength"],
                f"strength {body.strength} leaves no denoising step out of {body.num_inference_steps}; use at least {1 / body.num_inference_steps:.3f}",
                "value_error",
            )

    async def _inputs(self, body: LcmInput, base_url: str) -> tuple[Mode, np.ndarray | None, np.ndarray | None, int, int]:
        size = size_of(body.image_size) if body.image_size is not None else None
        if not body.image_url:
            width, height = size or (512, 512)
            self._check_pixels(width, height, ["body", "image_size"])
            return "text-to-image", None, None, width, height
        fetches = [self.inputs.image(body.image_url, ["body", "image_url"], base_url)]
        if body.mask_url:
            fetches.append(self.inputs.image(body.mask_url, ["body", "mask_url"], base_url, mode="L"))
        loaded = await asyncio.gather(*fetches)
        if body.mask_url and loaded[1].size != loaded[0].size:
            raise InputError(
                ["body", "mask_url"],
                f"mask is {loaded[1].size[0]}x{loaded[1].size[1]} but the image is {loaded[0].size[0]}x{loaded[0].size[1]}; they must match",
                "mask_size_mismatch",
            )
        image = _fit_input(loaded[0], size)
        height, width = image.shape[:2]
        self._check_pixels(width, height, ["body", "image_url"])
        mask = _fit_input(loaded[1], (width, height)) if body.mask_url else None
        return ("inpaint" if mask is not None else "image-to-image"), image, mask, width, height

    def _check_pixels(self, width: int, height: int, loc: list[str | int]) -> None:
        limit = self.config.limits.max_pixels
        if width * height > limit:
            raise InputError(loc, f"{width}x{height} is {width * height} pixels; this server allows at most {limit}", "image_too_large")

    async def job(self, body: LcmInput, base_url: str, request_id: str) -> ImageJob:
        self._check(body)
        model = self.config.lcm_models.get(body.model)
        if model is None:
            raise InputError(["body", "model"], f"this server has no LCM model {body.model!r}; ask the operator to configure lcm_models", "value_error")
        mode, image, mask, width, height = await self._inputs(body, base_url)
        return ImageJob(
            request_id=request_id,
            model=ModelRef(model.source, architecture=model.architecture),
            mode=mode,
            prompt=body.prompt,
            negative_prompt=body.negative_prompt,
            seed=body.seed if body.seed is not None else secrets.randbelow(2**32),
            num_images=body.num_images,
            width=width,
            height=height,
            num_inference_steps=body.num_inference_steps,
            guidance_scale=body.guidance_scale,
            scheduler="LCM",
            loras=((body.lora_url, body.lora_scale),) if body.lora_url else (),
            lcm_lora=model.lcm_lora,
            strength=body.strength if mode != "text-to-image" else 1.0,
            image=image,
            mask=mask,
            enable_safety_checker=body.enable_safety_checks,
        )

    async def run(self, body: LcmInput, base_url: str, request_id: str, sync_mode: bool | None = None) -> LcmRun:
        t0 = time.perf_counter()
        job = await self.job(body, base_url, request_id)
        t1 = time.perf_counter()
        try:
            result: JobResult = await call_model(self.model, "generate", job, job.routing_key(), self.config.limits.request_timeout_s, request_id)
        except InputError as exc:
            if exc.loc[:3] == ["body", "loras", 0]:  # the replica speaks of `loras`; this endpoint of `lora_url`
                raise InputError(["body", "lora_url"], exc.msg, exc.type) from None
            raise
        t2 = time.perf_counter()
        images = result.images
        if body.inpaint_mask_only and job.mask is not None:
            images = [paste_outside_mask(pixels, job.image, job.mask) for pixels in images]
        sync = body.sync_mode if sync_mode is None else sync_mode
        published = await asyncio.to_thread(publish_images, self.store, images, "jpeg", sync, base_url)
        t3 = time.perf_counter()
        output = LcmOutput(
            images=published,
            timings={"inference": result.inference_time_s},
            seed=result.seed,
            num_inference_steps=body.num_inference_steps,
            request_id=body.request_id,
            nsfw_content_detected=result.has_nsfw_concepts,
        )
        phases = {"input": t1 - t0, "model": t2 - t1, "inference": result.inference_time_s, "publish": t3 - t2}
        return LcmRun(output, result, {k: 1000 * v for k, v in phases.items()})
