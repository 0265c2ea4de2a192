"""The safety checker shared by every model family: flagged images are replaced by black ones.

SD1.5's `StableDiffusionSafetyChecker` (a CLIP vision tower scored against concept embeddings)
runs after decoding, outside the pipelines, so SDXL, LCM and FLUX get the same check. It loads
lazily, on the first job that asks for it.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import torch
from PIL import Image

from deployments.tiny_models import ensure_tiny_model

logger = logging.getLogger("diffusion_serve.safety")


class SafetyChecker:
    def __init__(self, source: str, device: torch.device, dtype: torch.dtype) -> None:
        self.source = source
        self.device = device
        self.dtype = dtype
        self._model = None
        self._processor = None
        self._lock = threading.Lock()

    def _load(self) -> None:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        location = self.source
        if location.startswith("tiny:"):
            location = str(ensure_tiny_model(location.removeprefix("tiny:")))
            logger.warning("DEMO PROFILE: the safety checker is a tiny random-weight stand-in; what it flags is arbitrary")
        self._processor = CLIPImageProcessor.from_pretrained(location)
        model = StableDiffusionSafetyChecker.from_pretrained(location, use_safetensors=True)
        self._model = model.to(self.device, self.dtype).eval()

    def flags(self, images: list[Image.Image]) -> list[bool]:
        """Whether each image shows a flagged concept."""
        if not images:
            return []
        with self._lock:
            if self._model is None:
                self._load()
        clip_input = self._processor(images, return_tensors="pt").pixel_values.to(self.device, self.dtype)
        arrays = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
        with torch.no_grad():
            _, has_nsfw = self._model(clip_input=clip_input, images=arrays)
        return [bool(x) for x in has_nsfw]


def blacken(image: Image.Image) -> Image.Image:
    return Image.new("RGB", image.size, (0, 0, 0))
