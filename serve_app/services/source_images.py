"""What every endpoint family checks the same way: its source image and mask, sizes, strengths, scales.

`fal-ai/lora`, `fal-ai/lcm` and `fal-ai/flux-lora` all take an `image_url` (image to image) and
a `mask_url` (inpainting) that must match it; all need sides a multiple of the VAE's (or FLUX's
packed) stride, a pixel count within the operator's limit, a strength that leaves at least one
denoising step, and adapter scales that are finite. One place says how, in one voice.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image as PILImage

from serve_app.config import Limits
from serve_app.errors import InputError
from serve_app.files import InputFiles, InputImage

Loc = list[str | int]


@dataclass
class SourceImages:
    image: InputImage
    mask: InputImage | None


async def fetch_sources(inputs: InputFiles, image_url: str, mask_url: str | None, base_url: str) -> SourceImages:
    """The image (and mask, as one channel) fetched at once; a mask must have the image's size."""
    fetches = [inputs.image(image_url, ["body", "image_url"], base_url)]
    if mask_url:
        fetches.append(inputs.image(mask_url, ["body", "mask_url"], base_url, mode="L"))
    loaded = await asyncio.gather(*fetches)
    image, mask = loaded[0], (loaded[1] if mask_url else None)
    if mask is not None and mask.size != image.size:
        raise InputError(
            ["body", "mask_url"],
            f"mask is {mask.size[0]}x{mask.size[1]} but the image is {image.size[0]}x{image.size[1]}; they must match",
            "mask_size_mismatch",
        )
    return SourceImages(image, mask)


def fit(image: InputImage, size: tuple[int, int] | None = None, multiple: int = 8, longest: int | None = None) -> np.ndarray:
    """The pixels at `size`; else at the image's own size, scaled down so no side exceeds
    `longest`, with sides rounded down to `multiple`. Masks resize without blending."""
    if size is None:
        width, height = image.size
        factor = min(1.0, longest / max(width, height)) if longest else 1.0
        width, height = max(multiple, int(width * factor)), max(multiple, int(height * factor))
        size = (width - width % multiple, height - height % multiple)
    if size == image.size:
        return image.pixels
    resample = PILImage.Resampling.LANCZOS if image.pixels.ndim == 3 else PILImage.Resampling.NEAREST
    return np.asarray(PILImage.fromarray(image.pixels).resize(size, resample))


def check_pixels(limits: Limits, width: int, height: int, loc: Loc) -> None:
    if width * height > limits.max_pixels:
        raise InputError(loc, f"{width}x{height} is {width * height} pixels; this server allows at most {limits.max_pixels}", "image_too_large")
    if width < 8 or height < 8:
        raise InputError(loc, "images must be at least 8x8 pixels", "image_too_small")


def check_strength(strength: float, steps: int, loc: Loc) -> None:
    """Image to image runs `int(steps * strength)` steps: none at all is a request for nothing."""
    if int(steps * strength) < 1:
        name = loc[-1]
        raise InputError(loc, f"{name} {strength} leaves no denoising step out of {steps}; use at least {1 / steps:.3f} or more steps", "value_error")


def check_scale(value: float, loc: Loc, bound: float = 10.0) -> None:
    if not math.isfinite(value) or abs(value) > bound:
        raise InputError(loc, f"must be a number between -{bound:g} and {bound:g}", "value_error")
