"""Wire schemas of `fal-ai/lora`, `fal-ai/lora/image-to-image` and `fal-ai/lora/inpaint`.

Field names, defaults and ranges follow fal's published API (`shared/spec/endpoints.md`): clients
send exactly these. Checks that need the operator's configuration (pixel limit) or the model
(scheduler support for custom timesteps) happen later, still before any GPU work.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from serve_app.schemas.common import File, Image, ImageSize, ImageSizePreset, InputModel, LoraWeight

SchedulerName = Literal[
    "DPM++ 2M",
    "DPM++ 2M Karras",
    "DPM++ 2M SDE",
    "DPM++ 2M SDE Karras",
    "Euler",
    "Euler A",
    "Euler (trailing timesteps)",
    "LCM",
    "LCM (trailing timesteps)",
    "DDIM",
    "TCD",
]

MAX_SEED = 2**63 - 1


class Embedding(InputModel):
    path: str
    tokens: list[str] = Field(default_factory=lambda: ["<s0>", "<s1>"])


class ControlNet(InputModel):
    path: str
    image_url: str
    mask_url: str | None = None
    conditioning_scale: float = 1.0
    start_percentage: float = Field(0.0, ge=0, le=1)
    end_percentage: float = Field(1.0, ge=0, le=1)
    config_url: str | None = None
    variant: str | None = None
    ip_adapter_index: int | None = None


class IPAdapter(InputModel):
    ip_adapter_image_url: str | list[str]
    ip_adapter_mask_url: str | None = None
    path: str
    model_subfolder: str | None = None
    weight_name: str | None = None
    insight_face_model_path: str | None = None
    image_encoder_path: str | None = None
    image_encoder_subpath: str | None = None
    image_encoder_weight_name: str | None = None
    unconditional_noising_factor: float = 0.0
    image_projection_shortcut: bool = False
    scale: float = 1.0
    scale_json: dict | None = None


class ScheduleOverride(InputModel):
    """`{"method": "default"}` lets the scheduler choose; `{"method": "array", "array": [...]}` overrides."""

    method: Literal["default", "array"] = "default"
    array: list

    @property
    def values(self) -> list | None:
        return list(self.array) if self.method == "array" else None


class TimestepsInput(ScheduleOverride):
    array: list[int] = Field(default_factory=list)

    @field_validator("array")
    @classmethod
    def _in_training_range(cls, v: list[int]) -> list[int]:
        if any(t < 0 or t > 999 for t in v):
            raise ValueError("timesteps must lie in 0..999 (the models' 1000 training steps)")
        if len(v) > 150:
            raise ValueError("at most 150 timesteps")
        return v


class SigmasInput(ScheduleOverride):
    array: list[float] = Field(default_factory=list)

    @field_validator("array")
    @classmethod
    def _non_negative(cls, v: list[float]) -> list[float]:
        if any(s < 0 or s != s for s in v):
            raise ValueError("sigmas must be non-negative numbers")
        if len(v) > 151:
            raise ValueError("at most 151 sigmas")
        return v


class LoraTextToImageInput(InputModel):
    """Input of `fal-ai/lora`."""

    model_name: str = Field(min_length=1, description="HF id, URL of a single-file checkpoint, or an alias")
    unet_name: str | None = None
    variant: str | None = None
    prompt: str = Field(min_length=1)
    negative_prompt: str = ""
    prompt_weighting: bool = False
    loras: list[LoraWeight] = Field(default_factory=list)
    embeddings: list[Embedding] = Field(default_factory=list)
    controlnets: list[ControlNet] = Field(default_factory=list)
    controlnet_guess_mode: bool = False
    ip_adapter: list[IPAdapter] = Field(default_factory=list)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    image_size: ImageSize | ImageSizePreset = "square_hd"
    num_inference_steps: int = Field(30, ge=1, le=150)
    guidance_scale: float = Field(7.5, ge=0, le=20)
    clip_skip: int = Field(0, ge=0, le=2)
    model_architecture: Literal["sd", "sdxl"] | None = None
    scheduler: SchedulerName | None = None
    timesteps: TimestepsInput = Field(default_factory=TimestepsInput)
    sigmas: SigmasInput = Field(default_factory=SigmasInput)
    prediction_type: Literal["v_prediction", "epsilon"] = "epsilon"
    rescale_betas_snr_zero: bool = False
    eta: float = Field(0.0, ge=0, le=1)
    image_format: Literal["jpeg", "png"] = "png"
    num_images: int = Field(1, ge=1, le=8)
    enable_safety_checker: bool = False
    tile_width: int = Field(4096, ge=128, le=4096)
    tile_height: int = Field(4096, ge=128, le=4096)
    tile_stride_width: int = Field(2048, ge=64, le=2048)
    tile_stride_height: int = Field(2048, ge=64, le=2048)
    debug_latents: bool = False
    debug_per_pass_latents: bool = False
    ic_light_model_url: str | None = None
    ic_light_model_background_image_url: str | None = None
    ic_light_image_url: str | None = None
    sync_mode: bool = Field(False, description="return images as data URIs instead of stored files")

    @field_validator("sigmas")
    @classmethod
    def _not_with_timesteps(cls, v: SigmasInput, info: ValidationInfo) -> SigmasInput:
        timesteps = info.data.get("timesteps")
        if v.method == "array" and timesteps is not None and timesteps.method == "array":
            raise ValueError("set either timesteps or sigmas, not both")
        return v

    @field_validator("timesteps", "sigmas")
    @classmethod
    def _array_not_empty(cls, v: TimestepsInput | SigmasInput) -> TimestepsInput | SigmasInput:
        if v.method == "array" and not v.array:
            raise ValueError('method "array" needs a non-empty array; use method "default" otherwise')
        return v


class LoraImageToImageInput(LoraTextToImageInput):
    """Input of `fal-ai/lora/image-to-image`: the output follows the input image's size."""

    image_size: None = Field(None, exclude=True, description="not used: the output follows image_url")
    image_url: str = Field(min_length=1)
    noise_strength: float = Field(0.5, ge=0, le=1, description="1.0 is pure noise, 0 keeps the image")


class LoraInpaintInput(LoraImageToImageInput):
    """Input of `fal-ai/lora/inpaint`: white mask pixels are repainted."""

    mask_url: str = Field(min_length=1)


class LoraOutput(InputModel):
    images: list[Image]
    seed: int
    has_nsfw_concepts: list[bool]
    debug_latents: File | None = None
    debug_per_pass_latents: File | None = None
