"""Wire schemas of `fal-ai/lcm` (text to image, image to image, inpainting; also realtime).

One endpoint, three modes: `image_url` makes it image to image, `image_url` + `mask_url`
inpainting. Defaults and names follow fal's published API (`shared/spec/endpoints.md`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from serve_app.schemas.common import Image, ImageSize, ImageSizePreset, InputModel

MAX_SEED = 2**63 - 1


class LcmInput(InputModel):
    model: Literal["sdv1-5", "sdxl"] = "sdv1-5"
    prompt: str = Field(min_length=1)
    image_url: str | None = None
    mask_url: str | None = None
    strength: float = Field(0.8, gt=0, le=1)
    negative_prompt: str = ""
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    guidance_scale: float = Field(1.0, ge=0, le=20)
    num_inference_steps: int = Field(4, ge=1, le=24)
    image_size: ImageSize | ImageSizePreset | None = Field(None, description="512x512 for text to image; the input's size otherwise")
    sync_mode: bool = False
    num_images: int = Field(1, ge=1, le=8)
    enable_safety_checks: bool = True
    request_id: str = ""
    inpaint_mask_only: bool = False
    controlnet_inpaint: bool = False
    lora_url: str | None = None
    lora_scale: float = 1.0


class LcmOutput(InputModel):
    images: list[Image]
    timings: dict[str, float]
    seed: int
    num_inference_steps: int
    request_id: str
    nsfw_content_detected: list[bool]
