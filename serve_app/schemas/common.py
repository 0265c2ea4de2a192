"""Types shared by every endpoint family: image sizes, output files, adapter references."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

IMAGE_SIZE_PRESETS: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}

ImageSizePreset = Literal["square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3", "landscape_16_9"]


class InputModel(BaseModel):
    """Base of request bodies: unknown fields are ignored, as fal does (clients send extras)."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class ImageSize(BaseModel):
    """A custom size; both sides must be multiples of 8 (the VAE downsamples by 8)."""

    width: int = Field(512, gt=0, le=14142)
    height: int = Field(512, gt=0, le=14142)

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"must be a multiple of 8 (got {v}); try {v - v % 8} or {v - v % 8 + 8}")
        return v


def size_of(image_size: ImageSize | ImageSizePreset) -> tuple[int, int]:
    """(width, height) of a preset name or a custom size."""
    if isinstance(image_size, ImageSize):
        return image_size.width, image_size.height
    return IMAGE_SIZE_PRESETS[image_size]


class LoraWeight(InputModel):
    path: str = Field(description="URL, HF repo id, or a file in an HF repo")
    scale: float = 1.0


class File(BaseModel):
    url: str
    content_type: str | None = None
    file_name: str | None = None
    file_size: int | None = None


class Image(File):
    width: int | None = None
    height: int | None = None
