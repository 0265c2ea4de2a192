"""Decoded input arrays -> PIL images, as diffusers pipelines take them."""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_pil_rgb(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array, mode="RGB")


def to_pil_mask(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array, mode="L")
