"""Image encoding for outputs and conversion of decoded inputs (arrays) to PIL."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from deployments.common.jobs import EncodedImage

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg"}

# fal saves JPEG at quality 95. PNG level 1 is ~5x faster than the default 6 for ~10% more bytes:
# on the hot path, latency wins.
JPEG_QUALITY = 95
PNG_COMPRESS_LEVEL = 1


def encode_image(image: Image.Image, fmt: str) -> EncodedImage:
    buf = io.BytesIO()
    if fmt == "jpeg":
        image.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return EncodedImage(buf.getvalue(), CONTENT_TYPES[fmt], "jpg" if fmt == "jpeg" else "png", image.width, image.height)


def to_pil_rgb(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array, mode="RGB")


def to_pil_mask(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array, mode="L")
