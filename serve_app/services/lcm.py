"""Serving `fal-ai/lcm`: 4-step latent consistency, over HTTP and the realtime WebSocket.

The LCM deployment runs the same replica code as StableDiffusion; what makes a job LCM is
decided here: the `model` value names an LCM-distilled model or a base model plus an LCM-LoRA
(operator config, `lcm_models`), the scheduler is LCM's, and the defaults are fal's.
"""

from __future__ import annotations

import secrets

import numpy as np

from deployments.common.jobs import ImageJob, JobResult, Mode, ModelRef
from serve_app.errors import InputError
from serve_app.files import publish_images
from serve_app.schemas.common import size_of
from serve_app.schemas.lcm import LcmInput, LcmOutput
from serve_app.services.dispatch import EndpointService, Progress, Run, run_job
from serve_app.services.source_images import check_pixels, check_scale, check_strength, fetch_sources, fit

MAX_INPUT_SIDE = 1024  # fal scales larger inputs down to this, keeping the aspect


def paste_outside_mask(generated: np.ndarray, original: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`inpaint_mask_only`: the original's pixels wherever the mask is black."""
    alpha = (mask.astype(np.float32) / 255.0)[..., None]
    return np.clip(generated * alpha + original * (1 - alpha) + 0.5, 0, 255).astype(np.uint8)


class LcmService(EndpointService):
    def _check(self, body: LcmInput) -> None:
        if body.mask_url and not body.image_url:
            raise InputError(["body", "mask_url"], "a mask needs the image it masks: set image_url too", "value_error")
        if body.controlnet_inpaint:
            raise InputError(["body", "controlnet_inpaint"], "ControlNet inpainting is not served by this server; leave it false", "not_supported")
        check_scale(body.lora_scale, ["body", "lora_scale"])
        if body.num_images > self.config.limits.max_images_per_request:
            raise InputError(["body", "num_images"], f"at most {self.config.limits.max_images_per_request} images per request", "value_error")
        if body.image_url:
            check_strength(body.strength, body.num_inference_steps, ["body", "strength"])

    async def _inputs(self, body: LcmInput, base_url: str) -> tuple[Mode, np.ndarray | None, np.ndarray | None, int, int]:
        size = size_of(body.image_size) if body.image_size is not None else None
        if not body.image_url:
            width, height = size or (512, 512)
            check_pixels(self.config.limits, width, height, ["body", "image_size"])
            return "text-to-image", None, None, width, height
        sources = await fetch_sources(self.inputs, body.image_url, body.mask_url, base_url)
        image = fit(sources.image, size, longest=MAX_INPUT_SIDE)
        height, width = image.shape[:2]
        check_pixels(self.config.limits, width, height, ["body", "image_url"])
        mask = fit(sources.mask, (width, height)) if sources.mask is not None else None
        return ("inpaint" if mask is not None else "image-to-image"), image, mask, width, height

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

    async def run(
        self, body: LcmInput, base_url: str, request_id: str, sync_mode: bool | None = None, progress: Progress | None = None
    ) -> Run[LcmOutput]:
        """`sync_mode` overrides the body's (realtime frames always carry their images inline)."""
        sync = body.sync_mode if sync_mode is None else sync_mode

        def publish(job: ImageJob, result: JobResult) -> LcmOutput:
            images = result.images
            if body.inpaint_mask_only and job.mask is not None:
                images = [paste_outside_mask(pixels, job.image, job.mask) for pixels in images]
            return LcmOutput(
                images=publish_images(self.store, images, "jpeg", sync, base_url),
                timings={"inference": result.inference_time_s},
                seed=result.seed,
                num_inference_steps=body.num_inference_steps,
                request_id=body.request_id,
                nsfw_content_detected=result.has_nsfw_concepts,
            )

        try:
            job = self.job(body, base_url, request_id)
            return await run_job(self.model, job, publish, self.config.limits.request_timeout_s, request_id, progress)
        except InputError as exc:
            if exc.loc[:3] == ["body", "loras", 0]:  # the replica speaks of `loras`; this endpoint of `lora_url`
                raise InputError(["body", "lora_url"], exc.msg, exc.type) from None
            raise
