"""What the router sends a model deployment, and what comes back: plain data, no HTTP.

A job is one request's worth of work after validation and input-file resolution. Its
`batch_key()` names every setting that must be equal for jobs to share one pipeline call; what
may differ per item (prompts, seeds, input images, safety checking) stays out; output encoding
is the router's business.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Mode = Literal["text-to-image", "image-to-image", "inpaint"]


class JobInputError(Exception):
    """A bad input found by a model deployment; `field` is the path inside the request body."""

    def __init__(self, field: tuple[str | int, ...], msg: str, type: str = "value_error") -> None:
        super().__init__(field, msg, type)
        self.field = tuple(field)
        self.msg = msg
        self.type = type

    def __str__(self) -> str:
        return f"{'.'.join(map(str, self.field))}: {self.msg}"


@dataclass(frozen=True)
class ModelRef:
    """Which weights a job needs; `key()` is the multiplexed model id replicas are routed by."""

    model_name: str
    unet_name: str | None = None
    variant: str | None = None
    architecture: Literal["sd", "sdxl"] | None = None

    def key(self) -> str:
        parts = [self.model_name, self.unet_name or "", self.variant or "", self.architecture or ""]
        return "|".join(parts)

    @classmethod
    def from_key(cls, key: str) -> ModelRef:
        model_name, unet_name, variant, architecture = key.split("|")
        return cls(model_name, unet_name or None, variant or None, architecture or None)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Tiling:
    """VAE tiling in pixels: tiles of `width` x `height`, stepping by the strides."""

    width: int = 4096
    height: int = 4096
    stride_width: int = 2048
    stride_height: int = 2048


@dataclass(frozen=True)
class ControlNetInput:
    """One ControlNet of a job; its image (and mask) already at the job's size."""

    path: str
    image: np.ndarray = field(compare=False, repr=False)  # HxWx3 uint8
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)  # HxW uint8, white = steer here
    config: str | None = None  # config.json text fetched from config_url
    variant: str | None = None
    conditioning_scale: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def settings(self) -> tuple:
        """What must be equal for two jobs to share a pipeline call (the images may differ)."""
        return (self.conditioning_scale, self.start, self.end)


@dataclass(frozen=True)
class IPAdapterInput:
    """One IP-Adapter of a job: where its weights and image encoder are, and its images."""

    path: str
    images: tuple[np.ndarray, ...] = field(compare=False, repr=False)  # HxWx3 uint8 each
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)  # HxW uint8 at the job's size
    model_subfolder: str | None = None
    weight_name: str | None = None
    image_encoder_path: str | None = None
    image_encoder_subpath: str | None = None
    image_encoder_weight_name: str | None = None
    scale: float = 1.0
    scale_json: str | None = None  # per-block scales, as JSON text

    def settings(self) -> tuple:
        # With a mask diffusers attends to each reference image separately, without one to all
        # together: whether there is one is a per-call setting.
        return (self.scale, self.scale_json, len(self.images), self.mask is not None)


@dataclass
class ImageJob:
    request_id: str
    model: ModelRef
    mode: Mode
    prompt: str
    negative_prompt: str
    seed: int
    num_images: int
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    clip_skip: int = 0
    scheduler: str | None = None
    timesteps: tuple[int, ...] | None = None
    sigmas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    rescale_betas_snr_zero: bool = False
    eta: float = 0.0
    prompt_weighting: bool = False
    loras: tuple[tuple[str, float], ...] = ()  # (path as the user gave it, scale)
    lcm_lora: str | None = None  # an operator-configured LCM-LoRA, applied at scale 1 before `loras`
    embeddings: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (path, tokens)
    controlnets: tuple[ControlNetInput, ...] = ()
    controlnet_guess_mode: bool = False
    ip_adapters: tuple[IPAdapterInput, ...] = ()
    tiling: Tiling = field(default_factory=Tiling)
    strength: float = 1.0
    image: np.ndarray | None = None  # HxWx3 uint8, already at (width, height)
    mask: np.ndarray | None = None  # HxW uint8, white = repaint
    enable_safety_checker: bool = False
    debug_latents: bool = False
    debug_per_pass_latents: bool = False

    def routing_key(self) -> str:
        """The multiplexed model id: the base model, plus the adapter set when there is one, so that
        requests for a LoRA set (or ControlNets, IP-Adapters) reach replicas that already hold it.
        Requests without adapters go to any replica that holds the base model."""
        adapters = (
            sorted(self.loras) + ([(self.lcm_lora, 1.0)] if self.lcm_lora else []),
            sorted(c.path for c in self.controlnets),
            sorted((a.path, a.model_subfolder, a.weight_name) for a in self.ip_adapters),
        )
        if not any(adapters):
            return self.model.key()
        digest = hashlib.sha256(repr(adapters).encode()).hexdigest()[:16]
        return f"{self.model.key()}@{digest}"

    def batch_key(self) -> tuple:
        """Everything that is one value per pipeline call. Jobs with equal keys may share a call.

        The model deployment adds the adapters (LoRAs, embeddings, ControlNets, IP-Adapters) by
        content once it has resolved them to files."""
        return (
            self.model.key(),
            self.mode,
            self.width,
            self.height,
            self.num_inference_steps,
            self.guidance_scale,
            self.clip_skip,
            self.scheduler,
            self.timesteps,
            self.sigmas,
            self.prediction_type,
            self.rescale_betas_snr_zero,
            self.eta,
            self.prompt_weighting,
            self.tiling,
            self.strength if self.mode != "text-to-image" else None,
            # Per-pass latents are collected by a step callback for the whole call.
            self.debug_per_pass_latents,
            tuple(c.settings() for c in self.controlnets),
            self.controlnet_guess_mode if self.controlnets else None,
            tuple(a.settings() for a in self.ip_adapters),
        )

    def cost(self) -> float:
        """Work in pixel-steps: what the batch budget is counted in."""
        steps = len(self.timesteps) if self.timesteps else len(self.sigmas) if self.sigmas else self.num_inference_steps
        if self.mode != "text-to-image":
            steps = max(1, int(steps * self.strength))
        return float(self.width * self.height * steps * self.num_images)

    def image_seeds(self) -> list[int]:
        """Image i of a job uses seed + i, so an image never depends on its batch neighbours."""
        return [(self.seed + i) % (2**63) for i in range(self.num_images)]


@dataclass
class JobResult:
    """Raw pixels (HxWx3 uint8): encoding is CPU work, done by the router, not on a GPU replica."""

    images: list[np.ndarray]
    has_nsfw_concepts: list[bool]
    seed: int
    debug_latents: bytes | None = None
    debug_per_pass_latents: bytes | None = None
    batch_size: int = 1  # jobs that shared the pipeline call
    inference_time_s: float = 0.0
    replica: str = ""  # which replica served it (for operators, and for tests of routing)
