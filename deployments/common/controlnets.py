"""ControlNets: loaded by content, checked against the base model, masked per image.

A ControlNet file comes through the weights provider like any adapter (URL, data URI, HF repo),
so it is downloaded once per cluster and validated before it is opened. Its configuration comes,
in order, from the request's `config_url`, from the HF repo's `config.json`, or from the base
model itself: a standard ControlNet is a copy of its base UNet's encoder, so
`ControlNetModel.from_unet` describes it exactly. A file whose tensors do not fit that shape is
for another base model, and the user hears so.

Each loaded base model keeps an LRU of ControlNets on its device. A batch runs one pipeline made
with `from_pipe` (no copy of the base weights) around a `MaskedMultiControlNet`, which applies
each ControlNet's per-image mask to its residuals, something diffusers does not offer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ControlNetModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from safetensors import safe_open
from safetensors.torch import load_file

from deployments.common.jobs import JobInputError
from deployments.common.weights_cache import HF_FILE, WeightsProvider, content_name

logger = logging.getLogger("diffusion_serve.controlnet")

# A key every ControlNet in the diffusers layout has; the original (A1111) layout has none.
DIFFUSERS_MARKER = "controlnet_cond_embedding.conv_in.weight"


@dataclass(frozen=True)
class ResolvedControlNet:
    name: str  # content digest of the weights and the configuration
    weights: Path
    config: str | None  # config.json text, when not derived from the base model


def controlnet_name(weights_digest: str, config: str | None) -> str:
    if config is None:
        return weights_digest
    return weights_digest + "-" + hashlib.sha256(config.encode()).hexdigest()[:12]


def hub_config(repo: str, field: tuple, subfolder: str | None = None) -> str:
    """The `config.json` of a ControlNet repo on the Hugging Face hub (cached by huggingface_hub)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, "config.json", subfolder=subfolder)).read_text()
    except Exception as exc:  # noqa: BLE001 - reported to the user
        raise JobInputError(field, f"could not fetch config.json of {repo} from the Hugging Face hub ({type(exc).__name__})", "url_unreachable") from None


async def resolve_controlnet(weights: WeightsProvider, path: str, config: str | None, variant: str | None, field: tuple) -> ResolvedControlNet:
    """The local weights file of a ControlNet `path` and its configuration (see the module doc)."""
    default = f"diffusion_pytorch_model.{variant}.safetensors" if variant else "diffusion_pytorch_model.safetensors"
    file = await weights.get(path, field, default)
    hub = HF_FILE.match(path)
    if config is None and hub and not path.startswith(("http://", "https://", "data:")):
        folder = str(Path(hub.group("file")).parent) if hub.group("file") else "."
        config = await asyncio.to_thread(hub_config, hub.group("repo"), field, None if folder == "." else folder)
    return ResolvedControlNet(controlnet_name(await asyncio.to_thread(content_name, file), config), file, config)


def parse_config(text: str, field: tuple) -> dict[str, Any]:
    try:
        config = json.loads(text)
    except json.JSONDecodeError:
        raise JobInputError(field, "the ControlNet config is not JSON; give the URL of its config.json", "controlnet_config_invalid") from None
    if not isinstance(config, dict):
        raise JobInputError(field, "the ControlNet config must be a JSON object (a diffusers config.json)", "controlnet_config_invalid")
    return config


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


class LoadedControlNets:
    """The ControlNets loaded beside one base model (least recently used first), and the
    ControlNet pipelines built around them from the base model's pipeline."""

    def __init__(self, base_pipe, device: torch.device, dtype: torch.dtype, capacity: int) -> None:
        self.base_pipe = base_pipe
        self.unet = base_pipe.unet
        self.device = device
        self.dtype = dtype
        self.capacity = capacity
        self._loaded: OrderedDict[str, ControlNetModel] = OrderedDict()
        self._pipelines: dict[tuple, Any] = {}

    def get(self, controlnet: ResolvedControlNet, field: tuple) -> ControlNetModel:
        model = self._loaded.get(controlnet.name)
        if model is None:
            model = self._load(controlnet, field)
            self._loaded[controlnet.name] = model
            while len(self._loaded) > self.capacity:
                evicted, _ = self._loaded.popitem(last=False)
                self._pipelines = {key: p for key, p in self._pipelines.items() if evicted not in key[1]}
        self._loaded.move_to_end(controlnet.name)
        return model

    def pipeline(self, mode: str, controlnets: list[ResolvedControlNet], fields: list[tuple]):
        """The pipeline for `mode` driven by these ControlNets (in order), sharing the base weights."""
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image

        nets = [self.get(c, f) for c, f in zip(controlnets, fields)]
        key = (mode, tuple(c.name for c in controlnets))
        pipe = self._pipelines.get(key)
        if pipe is None:
            auto = {"text-to-image": AutoPipelineForText2Image, "image-to-image": AutoPipelineForImage2Image, "inpaint": AutoPipelineForInpainting}[mode]
            pipe = auto.from_pipe(self.base_pipe, controlnet=MaskedMultiControlNet(nets))
            pipe.set_progress_bar_config(disable=True)
            self._pipelines[key] = pipe
        return pipe

    def _base_config(self) -> dict[str, Any]:
        with torch.device("meta"):
            return dict(ControlNetModel.from_unet(self.unet, load_weights_from_unet=False).config)

    def _load(self, controlnet: ResolvedControlNet, field: tuple) -> ControlNetModel:
        with safe_open(str(controlnet.weights), "pt") as f:
            keys = set(f.keys())
        config_field = (*field[:-1], "config_url")
        if DIFFUSERS_MARKER in keys:
            self._check_architecture("add_embedding.linear_1.weight" in keys, field)
            config = parse_config(controlnet.config, config_field) if controlnet.config else self._base_config()
            try:
                with torch.device("meta"):
                    model = ControlNetModel.from_config(config)
                model.load_state_dict(load_file(str(controlnet.weights)), strict=True, assign=True)
            except Exception as exc:  # noqa: BLE001 - shapes or keys that do not fit are the request's fault
                mismatch = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line or "Missing key" in line), _first_line(exc))
                raise JobInputError(
                    field,
                    f"this ControlNet does not fit the base model ({mismatch[:200]}); a ControlNet shaped "
                    "unlike its base model's UNet needs its config.json as config_url",
                    "controlnet_incompatible",
                ) from None
        else:
            model = self._from_original_layout(controlnet, field)
        self._check_fits(model, field)
        model.to(self.device, self.dtype).eval()
        logger.info("loaded ControlNet %s", controlnet.name[:12])
        return model

    def _from_original_layout(self, controlnet: ResolvedControlNet, field: tuple) -> ControlNetModel:
        """A1111/civitai files: diffusers converts them (and knows their standard configs)."""
        import tempfile

        try:
            if controlnet.config is None:
                return ControlNetModel.from_single_file(str(controlnet.weights))
            with tempfile.TemporaryDirectory() as config_dir:
                Path(config_dir, "config.json").write_text(controlnet.config)
                return ControlNetModel.from_single_file(str(controlnet.weights), config=config_dir)
        except Exception as exc:  # noqa: BLE001
            raise JobInputError(field, f"this file is not a ControlNet diffusers can read ({_first_line(exc)})", "controlnet_invalid") from None

    def _check_architecture(self, controlnet_is_sdxl: bool, field: tuple) -> None:
        base_is_sdxl = self.unet.config.addition_embed_type == "text_time"
        if controlnet_is_sdxl != base_is_sdxl:
            kind, base = ("SDXL", "SD1.5") if controlnet_is_sdxl else ("SD1.5", "SDXL")
            raise JobInputError(field, f"this ControlNet is for {kind} but the base model is {base}; pick a ControlNet made for {base}", "controlnet_incompatible")

    def _check_fits(self, model: ControlNetModel, field: tuple) -> None:
        self._check_architecture(model.config.addition_embed_type == "text_time", field)
        if model.config.cross_attention_dim != self.unet.config.cross_attention_dim:
            raise JobInputError(
                field,
                f"this ControlNet expects text features of width {model.config.cross_attention_dim} but the base model "
                f"makes {self.unet.config.cross_attention_dim}; it was made for another base model",
                "controlnet_incompatible",
            )


class MaskedMultiControlNet(MultiControlNetModel):
    """diffusers' MultiControlNetModel, plus a mask per ControlNet and image.

    `masks[k]` is None (no mask) or a float tensor (images, 1, H, W) in [0, 1]: the residuals of
    ControlNet k are multiplied by it, resized to each residual's resolution, so the ControlNet
    only steers the masked area. Set `masks` before each pipeline call."""

    def __init__(self, controlnets) -> None:
        super().__init__(controlnets)
        self.masks: list[torch.Tensor | None] = [None] * len(self.nets)

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale, **kwargs):
        down_total = mid_total = None
        for net, image, scale, mask in zip(self.nets, controlnet_cond, conditioning_scale, self.masks):
            down, mid = net(sample, timestep, encoder_hidden_states, image, scale, **{**kwargs, "return_dict": False})
            if mask is not None:
                down = [_apply_mask(r, mask) for r in down]
                mid = _apply_mask(mid, mask)
            if down_total is None:
                down_total, mid_total = list(down), mid
            else:
                down_total = [a + b for a, b in zip(down_total, down)]
                mid_total = mid_total + mid
        return down_total, mid_total


def _apply_mask(residual: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    rows = residual.shape[0]
    if rows != mask.shape[0]:  # classifier-free guidance: [unconditional, conditional] halves
        mask = mask.repeat(rows // mask.shape[0], 1, 1, 1)
    mask = F.interpolate(mask.to(residual.device, residual.dtype), size=residual.shape[-2:], mode="bilinear", align_corners=False)
    return residual * mask


def mask_tensor(masks: list, height: int, width: int) -> torch.Tensor | None:
    """Per-image masks (PIL "L" images or None = everywhere) as one (images, 1, H, W) tensor."""
    if all(m is None for m in masks):
        return None
    import numpy as np

    planes = [
        torch.ones(height, width) if m is None else torch.from_numpy(np.asarray(m.resize((width, height)), dtype=np.float32) / 255.0)
        for m in masks
    ]
    return torch.stack(planes)[:, None]


def control_batch(images: list) -> torch.Tensor:
    """One ControlNet's per-image conditioning images (PIL RGB) as a (images, 3, H, W) tensor in
    [0, 1]. A tensor, not a list: diffusers' pipelines disagree on how nested lists are ordered."""
    import numpy as np

    return torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1) for im in images])
