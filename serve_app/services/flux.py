"""Serving `fal-ai/flux-lora` (text to image), `/image-to-image`, `/inpainting`, and `/stream`.

Turns a validated request into an `ImageJob` for the FLUX deployment (the operator's FLUX model,
`flux_model`), calls it, publishes the images. `/stream` calls the deployment's streaming method:
a progress event per denoising step, then the output.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image as PILImage
from ray.serve.handle import DeploymentHandle

from deployments.common.jobs import ImageJob, JobResult, Mode, ModelRef
from serve_app.config import AppConfig
from serve_app.errors import InputError
from serve_app.files import InputFiles, InputImage, OutputStore, publish_images
from serve_app.schemas.common import size_of
from serve_app.schemas.flux import SIDE_MULTIPLE, FluxImageToImageInput, FluxInpaintInput, FluxOutput, FluxTextToImageInput
from serve_app.services.dispatch import call_model, stream_model

FluxInput = FluxTextToImageInput | FluxImageToImageInput | FluxInpaintInput


@dataclass
class FluxRun:
    output: FluxOutput
    result: JobResult
    phases_ms: dict[str, float]


def _fit(image: InputImage, size: tuple[int, int] | None) -> np.ndarray:
    """The input at `size`, else at its own size rounded down to multiples of 16."""
    width, height = size or (max(SIDE_MULTIPLE, image.size[0] - image.size[0] % SIDE_MULTIPLE), max(SIDE_MULTIPLE, image.size[1] - image.size[1] % SIDE_MULTIPLE))
    if (width, height) == image.size:
        return image.pixels
    resample = PILImage.Resampling.LANCZOS if image.pixels.ndim == 3 else PILImage.Resampling.NEAREST
    return np.asarray(PILImage.fromarray(image.pixels).resize((width, height), resample))


class FluxService:
    def __init__(self, model: DeploymentHandle, config: AppConfig, inputs: InputFiles, store: OutputStore) -> None:
        self.model = model
        self.config = config
        self.inputs = inputs
        self.store = store

    def _check(self, body: FluxInput) -> None:
        if len(body.loras) > self.config.limits.max_loras:
            raise InputError(["body", "loras"], f"at most {self.config.limits.max_loras} LoRAs per request", "value_error")
        for i, lora in enumerate(body.loras):
            if not math.isfinite(lora.scale) or abs(lora.scale) > 10:
                raise InputError(["body", "loras", i, "scale"], "scale must be a number between -10 and 10", "value_error")
        if isinstance(body, FluxImageToImageInput):
            steps = body.num_inference_steps
            if int(steps * body.strength) < 1:
                raise InputError(["body", "strength"], f"strength {body.strength} leaves no denoising step out of {steps}; use at least {1 / steps:.3f}", "value_error")

    async def _inputs(self, mode: Mode, body: FluxInput, base_url: str) -> tuple[np.ndarray | None, np.ndarray | None, int, int]:
        size = size_of(body.image_size) if body.image_size is not None else None
        if mode == "text-to-image":
            width, height = size  # type: ignore[misc]
            self._check_pixels(width, height, ["body", "image_size"])
            return None, None, width, height
        fetches = [self.inputs.image(body.image_url, ["body", "image_url"], base_url)]  # type: ignore[union-attr]
        if mode == "inpaint":
            fetches.append(self.inputs.image(body.mask_url, ["body", "mask_url"], base_url, mode="L"))  # type: ignore[union-attr]
        loaded = await asyncio.gather(*fetches)
        if mode == "inpaint" and loaded[1].size != loaded[0].size:
            raise InputError(
                ["body", "mask_url"],
                f"mask is {loaded[1].size[0]}x{loaded[1].size[1]} but the image is {loaded[0].size[0]}x{loaded[0].size[1]}; they must match",
                "mask_size_mismatch",
            )
        image = _fit(loaded[0], size)
        height, width = image.shape[:2]
        self._check_pixels(width, height, ["body", "image_url"])
        mask = _fit(loaded[1], (width, height)) if mode == "inpaint" else None
        return image, mask, width, height

    def _check_pixels(self, width: int, height: int, loc: list[str | int]) -> None:
        limit = self.config.limits.max_pixels
        if width * height > limit:
            raise InputError(loc, f"{width}x{height} is {width * height} pixels; this server allows at most {limit}", "image_too_large")

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

    async def run(self, mode: Mode, body: FluxInput, base_url: str, request_id: str) -> FluxRun:
        t0 = time.perf_counter()
        job = await self.job(mode, body, base_url, request_id)
        t1 = time.perf_counter()
        result: JobResult = await call_model(self.model, "generate", job, job.routing_key(), self.config.limits.request_timeout_s, request_id)
        t2 = time.perf_counter()
        output = await asyncio.to_thread(self._output, body, result, base_url)
        t3 = time.perf_counter()
        phases = {"input": t1 - t0, "model": t2 - t1, "inference": result.inference_time_s, "publish": t3 - t2}
        return FluxRun(output, result, {k: 1000 * v for k, v in phases.items()})

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
