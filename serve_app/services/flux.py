"""Serving `fal-ai/flux-lora` (text to image), `/image-to-image`, `/inpainting`, and `/stream`.

Turns a validated request into an `ImageJob` for the FLUX deployment (the operator's FLUX model,
`flux_model`), calls it, publishes the images. `/stream` calls the deployment's streaming method:
a progress event per denoising step, then the output.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from deployments.common.jobs import ImageJob, JobResult, Mode, ModelRef
from serve_app.errors import InputError
from serve_app.files import publish_images
from serve_app.schemas.common import size_of
from serve_app.schemas.flux import SIDE_MULTIPLE, FluxImageToImageInput, FluxInpaintInput, FluxOutput, FluxTextToImageInput
from serve_app.services.dispatch import EndpointService, Progress, Run, run_job, stream_model
from serve_app.services.source_images import check_pixels, check_scale, check_strength, fetch_sources, fit

FluxInput = FluxTextToImageInput | FluxImageToImageInput | FluxInpaintInput


class FluxService(EndpointService):
    def _check(self, body: FluxInput) -> None:
        if len(body.loras) > self.config.limits.max_loras:
            raise InputError(["body", "loras"], f"at most {self.config.limits.max_loras} LoRAs per request", "value_error")
        for i, lora in enumerate(body.loras):
            check_scale(lora.scale, ["body", "loras", i, "scale"])
        if isinstance(body, FluxImageToImageInput):
            check_strength(body.strength, body.num_inference_steps, ["body", "strength"])

    async def _inputs(self, mode: Mode, body: FluxInput, base_url: str) -> tuple[np.ndarray | None, np.ndarray | None, int, int]:
        size = size_of(body.image_size) if body.image_size is not None else None
        if mode == "text-to-image":
            width, height = size  # type: ignore[misc]
            check_pixels(self.config.limits, width, height, ["body", "image_size"])
            return None, None, width, height
        mask_url = body.mask_url if mode == "inpaint" else None  # type: ignore[union-attr]
        sources = await fetch_sources(self.inputs, body.image_url, mask_url, base_url)  # type: ignore[union-attr]
        image = fit(sources.image, size, multiple=SIDE_MULTIPLE)  # FLUX packs 2x2 latent patches
        height, width = image.shape[:2]
        check_pixels(self.config.limits, width, height, ["body", "image_url"])
        mask = fit(sources.mask, (width, height)) if sources.mask is not None else None
        return image, mask, width, height

    async def job(self, mode: Mode, body: FluxInput, base_url: str, request_id: str) -> ImageJob:
        self._check(body)
        image, mask, width, height = await self._inputs(mode, body, base_url)
        return ImageJob(
            request_id=request_id,
            model=ModelRef(self.config.flux_model),
            mode=mode,
            prompt=body.prompt,
            negative_prompt="",
            seed=body.seed if body.seed is not None else secrets.randbelow(2**32),
            num_images=body.num_images,
            width=width,
            height=height,
            num_inference_steps=body.num_inference_steps,
            guidance_scale=body.guidance_scale,
            loras=tuple((lora.path, lora.scale) for lora in body.loras),
            strength=getattr(body, "strength", 1.0) if mode != "text-to-image" else 1.0,
            image=image,
            mask=mask,
            enable_safety_checker=body.enable_safety_checker,
        )

    def _output(self, body: FluxInput, result: JobResult, base_url: str) -> FluxOutput:
        return FluxOutput(
            images=publish_images(self.store, result.images, body.output_format, body.sync_mode, base_url),
            timings={"inference": result.inference_time_s},
            seed=result.seed,
            has_nsfw_concepts=result.has_nsfw_concepts,
            prompt=body.prompt,
        )

    async def run(self, mode: Mode, body: FluxInput, base_url: str, request_id: str, progress: Progress | None = None) -> Run[FluxOutput]:
        def publish(job: ImageJob, result: JobResult) -> FluxOutput:
            return self._output(body, result, base_url)

        job = self.job(mode, body, base_url, request_id)
        return await run_job(self.model, job, publish, self.config.limits.request_timeout_s, request_id, progress)

    async def stream(self, body: FluxTextToImageInput, base_url: str, request_id: str) -> AsyncIterator[dict[str, Any]]:
        """Progress events (`{"type": "progress", "step", "total", "message"}`), then the output."""
        job = await self.job("text-to-image", body, base_url, request_id)
        async for event in stream_model(self.model, "generate_stream", job, job.routing_key(), self.config.limits.request_timeout_s, request_id):
            if isinstance(event, JobResult):
                output = await asyncio.to_thread(self._output, body, event, base_url)
                yield output.model_dump(mode="json")
            else:
                step, total = event
                yield {"type": "progress", "step": step, "total": total, "message": f"step {step}/{total}"}
