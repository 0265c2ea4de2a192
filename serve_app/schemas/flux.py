"""Wire schemas of `fal-ai/flux-lora`, `/image-to-image`, `/inpainting` (and `/stream`).

Defaults follow fal's published API (`shared/spec/endpoints.md`): landscape_4_3, 28 steps,
guidance 3.5 (FLUX.1-dev's distilled guidance, not classifier-free guidance), JPEG, safety
checker on. FLUX packs 2x2 latent patches, so sides are multiples of 16.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from serve_app.schemas.common import Image, ImageSize, ImageSizePreset, InputModel, LoraWeight

MAX_SEED = 2**63 - 1
SIDE_MULTIPLE = 16


class FluxTextToImageInput(InputModel):
    prompt: str = Field(min_length=1)
    image_size: ImageSize | ImageSizePreset = "landscape_4_3"
    num_inference_steps: int = Field(28, ge=1, le=50)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    loras: list[LoraWeight] = Field(default_factory=list)
    guidance_scale: float = Field(3.5, ge=0, le=35)
    sync_mode: bool = False
    num_images: int = Field(1, ge=1, le=4)
    enable_safety_checker: bool = True
    output_format: Literal["jpeg", "png"] = "jpeg"

    @field_validator("image_size")
    @classmethod
    def _multiple_of_16(cls, v: ImageSize | ImageSizePreset) -> ImageSize | ImageSizePreset:
        if isinstance(v, ImageSize):
            for side in (v.width, v.height):
                if side % SIDE_MULTIPLE:
                    raise ValueError(f"FLUX needs sides that are multiples of {SIDE_MULTIPLE} (got {side}); try {side - side % 16 or 16} or {side - side % 16 + 16}")
        return v


class FluxImageToImageInput(FluxTextToImageInput):
    image_size: ImageSize | ImageSizePreset | None = Field(None, description="default: the input image's size")
    image_url: str = Field(min_length=1)
    strength: float = Field(0.85, ge=0.01, le=1)


class FluxInpaintInput(FluxImageToImageInput):
    mask_url: str = Field(min_length=1)


class FluxOutput(InputModel):
    images: list[Image]
    timings: dict[str, float]
    seed: int
    has_nsfw_concepts: list[bool]
    prompt: str
