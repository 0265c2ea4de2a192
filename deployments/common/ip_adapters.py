"""IP-Adapters: reference images that steer generation through extra cross-attention.

An adapter is one safetensors file in h94/IP-Adapter's layout (`image_proj.*`, and
`ip_adapter.{1,3,5,...}.to_{k,v}_ip.weight`, one pair per cross-attention layer of the UNet)
plus the CLIP image encoder it was trained with (a transformers directory). Files come through the
weights cache; the adapter is named by the digest of its weights.

diffusers keeps one set of IP-Adapters per UNet (it swaps the attention processors), so a batch
makes exactly its set active: loading when the set changes, only rescaling when it does not, and
unloading for a batch without any (the UNet is then exactly as it was). The img2img and inpaint
pipelines made with `from_pipe` share the UNet, so they see the same set.

Reference images are encoded here, per batch item, and passed as `ip_adapter_image_embeds`:
diffusers' `ip_adapter_image` would give every item of a call the same references, and it tiles
embeddings across the batch too, so the pipeline being called is taught to take them per item.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open

from deployments.common.jobs import JobInputError

logger = logging.getLogger("diffusion_serve.ip_adapters")

# Image-projection variants by a key only they have; the value says what they read from the encoder.
_IMAGE_EMBEDS = "image_embeds"  # the projected CLS embedding (IP-Adapter)
_HIDDEN_STATES = "hidden_states"  # the penultimate layer's tokens (IP-Adapter Plus, Full Face)


@dataclass(frozen=True)
class ResolvedIPAdapter:
    """One adapter of a request, with local files. Hashable, so a tuple of them can join a batch key.

    `scale_json` is a diffusers per-block scale (`{"down": {"block_2": [0.0, 1.0]}, "up": ...}`,
    blocks not named get 0); when given it replaces `scale`. It is kept as canonical JSON text:
    pass a dict or a JSON string."""

    name: str  # content digest of the weights file
    weights: Path  # a local .safetensors file
    encoder: Path  # a local CLIP image-encoder directory (config.json + model.safetensors)
    scale: float = 1.0
    scale_json: dict | str | None = None  # stored as canonical JSON text

    def __post_init__(self) -> None:
        if self.scale_json is not None:
            value = json.loads(self.scale_json) if isinstance(self.scale_json, str) else self.scale_json
            object.__setattr__(self, "scale_json", json.dumps(value, sort_keys=True))

    @property
    def scale_config(self) -> float | dict:
        """What `set_ip_adapter_scale` takes for this adapter."""
        return json.loads(self.scale_json) if isinstance(self.scale_json, str) else float(self.scale)


@dataclass(frozen=True)
class _Spec:
    """What an adapter file needs, read from its header: which encoder output, and of what width."""

    reads: str  # _IMAGE_EMBEDS or _HIDDEN_STATES
    encoder_dim: int


class _ImageEncoder:
    """A CLIP vision tower and its preprocessing, on the pipeline's device and dtype."""

    def __init__(self, directory: Path, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        self.model = CLIPVisionModelWithProjection.from_pretrained(directory, use_safetensors=True, dtype=dtype).to(device).eval()
        if (directory / "preprocessor_config.json").exists():
            self.processor = CLIPImageProcessor.from_pretrained(directory)
        else:
            # h94/IP-Adapter ships no preprocessor config; diffusers then uses CLIP's defaults at
            # the encoder's resolution, and so do we.
            size = self.model.config.image_size
            self.processor = CLIPImageProcessor(size=size, crop_size=size)

    def dim(self, reads: str) -> int:
        return self.model.config.projection_dim if reads == _IMAGE_EMBEDS else self.model.config.hidden_size

    @torch.no_grad()
    def encode(self, images: list[Image.Image], reads: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings, unconditional embeddings) for `images`, as diffusers' `encode_image` makes them."""
        pixels = self.processor([im.convert("RGB") for im in images], return_tensors="pt").pixel_values
        pixels = pixels.to(self.model.device, self.model.dtype)
        if reads == _IMAGE_EMBEDS:
            embeds = self.model(pixels).image_embeds
            return embeds, torch.zeros_like(embeds)
        hidden = self.model(pixels, output_hidden_states=True).hidden_states[-2]
        uncond = self.model(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
        return hidden, uncond


def _expected_ip_layers(unet) -> dict[str, tuple[int, int]]:
    """`ip_adapter.*` keys this UNet takes and their shapes, numbered as diffusers converts them."""
    channels = list(unet.config.block_out_channels)
    cross_dim = unet.config.cross_attention_dim
    expected: dict[str, tuple[int, int]] = {}
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor") or "motion_modules" in name:
            continue
        parts = name.split(".")
        if parts[0] == "mid_block":
            hidden = channels[-1]
        elif parts[0] == "up_blocks":
            hidden = channels[::-1][int(parts[1])]
        else:
            hidden = channels[int(parts[1])]
        for kind in ("to_k_ip", "to_v_ip"):
            expected[f"{key_id}.{kind}.weight"] = (hidden, cross_dim)
        key_id += 2
    return expected


def _read_state_dict(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The file as `load_ip_adapter` takes a dict: {"image_proj": {...}, "ip_adapter": {...}}."""
    state: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for key in f.keys():
            group, _, rest = key.partition(".")
            if group in state:
                state[group][rest] = f.get_tensor(key)
    return state


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _image_projection(proj: dict[str, tuple], field: tuple) -> tuple[_Spec, int]:
    """What the adapter's image projection reads from the encoder, and how wide its tokens are."""
    if "perceiver_resampler.proj_in.weight" in proj or not {"proj.weight", "latents", "proj.3.weight"} & set(proj):
        msg = "FaceID IP-Adapters need face embeddings (insightface), which this server does not compute; use an image-based IP-Adapter"
        raise JobInputError(field, msg, "ip_adapter_unsupported")
    try:
        if "proj.weight" in proj:  # IP-Adapter: the CLS embedding -> 4 tokens
            return _Spec(_IMAGE_EMBEDS, proj["proj.weight"][1]), proj["proj.weight"][0] // 4
        if "latents" in proj:  # Plus: a resampler over the encoder's tokens
            return _Spec(_HIDDEN_STATES, proj["proj_in.weight"][1]), proj["proj_out.weight"][0]
        return _Spec(_HIDDEN_STATES, proj["proj.0.weight"][1]), proj["proj.3.weight"][0]  # Full Face: an MLP over them
    except (KeyError, IndexError):
        msg = "the IP-Adapter's image_proj.* keys are incomplete; the file is damaged or of an unknown kind"
        raise JobInputError(field, msg, "ip_adapter_invalid") from None


def _check_scale_json(config, field: tuple) -> None:
    """Per-block scales are numbers under down/mid/up (diffusers checks the block names)."""
    def numbers(value) -> bool:
        if isinstance(value, dict):
            return all(numbers(v) for v in value.values())
        if isinstance(value, list):
            return all(numbers(v) for v in value)
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if not isinstance(config, dict) or not set(config) <= {"down", "mid", "up"} or not numbers(config):
        msg = "scale_json must map 'down', 'mid' and 'up' to a number, or to {'block_N': number or [number per layer]}"
        raise JobInputError(field, msg, "ip_adapter_scale_invalid")


class LoadedIPAdapters:
    """The IP-Adapters loaded into one pipeline's UNet, and the image encoders they read with."""

    def __init__(self, pipe, max_encoders: int = 2) -> None:
        self.pipe = pipe
        self.max_encoders = max_encoders
        self._active: tuple[ResolvedIPAdapter, ...] = ()
        self._loaded_names: tuple[str, ...] = ()
        self._specs: dict[str, _Spec] = {}
        self._encoders: OrderedDict[Path, _ImageEncoder] = OrderedDict()
        self._expected: dict[str, tuple[int, int]] | None = None

    @property
    def active(self) -> tuple[ResolvedIPAdapter, ...]:
        return self._active

    # --- checks: everything a request can get wrong is found before the UNet is touched --------

    def _spec(self, adapter: ResolvedIPAdapter, field: tuple) -> _Spec:
        if adapter.name in self._specs:
            return self._specs[adapter.name]
        path_field = (*field, "path")
        try:
            with safe_open(str(adapter.weights), framework="pt", device="cpu") as f:
                shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        except Exception as exc:  # noqa: BLE001 - an unreadable file is the request's
            msg = f"not a readable safetensors file ({_first_line(exc)}); IP-Adapters must be .safetensors"
            raise JobInputError(path_field, msg, "ip_adapter_invalid") from None
        proj = {k.removeprefix("image_proj."): s for k, s in shapes.items() if k.startswith("image_proj.")}
        layers = {k.removeprefix("ip_adapter."): s for k, s in shapes.items() if k.startswith("ip_adapter.")}
        if not proj or not layers:
            msg = "not an IP-Adapter file: expected image_proj.* and ip_adapter.* keys (h94/IP-Adapter layout)"
            raise JobInputError(path_field, msg, "ip_adapter_invalid")
        spec, out_dim = _image_projection(proj, path_field)
        cross_dim = self.pipe.unet.config.cross_attention_dim
        if self._expected is None:
            self._expected = _expected_ip_layers(self.pipe.unet)
        expected = self._expected
        given = {k: s for k, s in layers.items() if k.endswith((".to_k_ip.weight", ".to_v_ip.weight"))}
        if out_dim != cross_dim or given != expected:
            missing, extra = len(set(expected) - set(given)), len(set(given) - set(expected))
            wrong = sum(1 for k in set(given) & set(expected) if given[k] != expected[k])
            reason = (
                f"it makes {out_dim}-wide image tokens for {len(given) // 2} attention layers; "
                f"this base model's UNet takes {cross_dim}-wide tokens in {len(expected) // 2} layers "
                f"({missing} missing, {extra} extra, {wrong} of another shape)"
            )
            msg = f"this IP-Adapter does not fit the base model: {reason}; is it for the other architecture?"
            raise JobInputError(path_field, msg, "ip_adapter_incompatible")
        self._specs[adapter.name] = spec
        return spec

    def _encoder(self, directory: Path, field: tuple) -> _ImageEncoder:
        if directory in self._encoders:
            self._encoders.move_to_end(directory)
            return self._encoders[directory]
        try:
            encoder = _ImageEncoder(directory, self.pipe.unet.device, self.pipe.unet.dtype)
        except Exception as exc:  # noqa: BLE001 - a directory that is not a CLIP vision model
            msg = f"the image encoder could not be loaded ({_first_line(exc)}); it must be a CLIPVisionModelWithProjection in safetensors"
            raise JobInputError((*field, "image_encoder_path"), msg, "ip_adapter_encoder_invalid") from None
        self._encoders[directory] = encoder
        return encoder

    def _evict_encoders(self, keep: set[Path]) -> None:
        """Keep at most `max_encoders` (more only while the active set needs them)."""
        for directory in list(self._encoders):
            if len(self._encoders) <= self.max_encoders:
                break
            if directory not in keep:
                del self._encoders[directory]

    def _check(self, adapter: ResolvedIPAdapter, field: tuple) -> None:
        spec = self._spec(adapter, field)
        if adapter.scale_json is not None:
            _check_scale_json(adapter.scale_config, (*field, "scale_json"))
        encoder = self._encoder(adapter.encoder, field)
        if encoder.dim(spec.reads) != spec.encoder_dim:
            what = "projected embeddings" if spec.reads == _IMAGE_EMBEDS else "hidden states"
            raise JobInputError(
                (*field, "image_encoder_path"),
                f"this image encoder gives {encoder.dim(spec.reads)}-wide {what}, the IP-Adapter reads {spec.encoder_dim}-wide ones; "
                "use the image encoder the adapter was trained with (ViT-H for the SD1.5 and '_vit-h' SDXL adapters, "
                "ViT-bigG for the other SDXL ones)",
                "ip_adapter_encoder_incompatible",
            )

    # --- loading ----------------------------------------------------------------------------------

    def _unload(self, force: bool = False) -> None:
        if self._loaded_names or force:
            self.pipe.unload_ip_adapter()
        self._loaded_names = ()
        self._active = ()

    def _load(self, adapters: list[ResolvedIPAdapter], fields: list[tuple]) -> None:
        states = [_read_state_dict(a.weights) for a in adapters]
        had_feature_extractor = hasattr(self.pipe, "feature_extractor")
        feature_extractor = getattr(self.pipe, "feature_extractor", None)
        quiet = logging.getLogger("diffusers.loaders.ip_adapter")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # "image_encoder is not loaded": we encode images ourselves
        try:
            names = [a.weights.name for a in adapters]
            self.pipe.load_ip_adapter(states, subfolder=[""] * len(states), weight_name=names, image_encoder_folder=None)
        except Exception as exc:
            # The checks passed, so this is unexpected; leave the UNet as it was either way.
            self._unload(force=True)
            if len(adapters) == 1:
                msg = f"this IP-Adapter could not be loaded ({_first_line(exc)}); is it for the other architecture?"
                raise JobInputError((*fields[0], "path"), msg, "ip_adapter_incompatible") from exc
            raise
        finally:
            quiet.setLevel(level)
            if had_feature_extractor and feature_extractor is None and self.pipe.feature_extractor is not None:
                self.pipe.register_modules(feature_extractor=None)  # load_ip_adapter adds a default one
        self._loaded_names = tuple(a.name for a in adapters)

    def _set_scales(self, adapters: list[ResolvedIPAdapter], fields: list[tuple]) -> None:
        configs = [a.scale_config for a in adapters]
        for i, (config, field) in enumerate(zip(configs, fields)):
            if isinstance(config, dict):  # per-block scales name blocks, which must exist
                try:
                    self.pipe.set_ip_adapter_scale([1.0] * i + [config] + [1.0] * (len(configs) - i - 1))
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    self._unload()
                    example = "{'down': {'block_2': [0.0, 1.0]}, 'up': {'block_0': [0.0, 1.0, 0.0]}}"
                    msg = f"{exc}; name blocks that have attention layers, one scale per layer, e.g. {example}"
                    raise JobInputError((*field, "scale_json"), msg, "ip_adapter_scale_invalid") from None
        self.pipe.set_ip_adapter_scale(configs)

    def activate(self, adapters: list[ResolvedIPAdapter], fields: list[tuple]) -> None:
        """Make exactly `adapters` (in this order, with their scales) the UNet's IP-Adapters.

        `fields[i]` is where adapter i sits in the request, e.g. `("ip_adapter", i)`; errors name
        `(*fields[i], "path" | "image_encoder_path" | "scale_json")`. An empty list unloads them.
        After an error no IP-Adapter is half-loaded: the UNet holds the previous set or none."""
        for adapter, field in zip(adapters, fields, strict=True):
            self._check(adapter, field)
        names = tuple(a.name for a in adapters)
        if names != self._loaded_names:
            self._unload()
            if adapters:
                self._load(adapters, fields)
        if adapters:
            self._set_scales(adapters, fields)
        self._active = tuple(adapters)
        self._evict_encoders(keep={a.encoder for a in adapters})

    # --- per-item inputs ----------------------------------------------------------------------

    def encode(self, index: int, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """Active adapter `index`'s embeddings of `images`: (num_images, ...) and the unconditional twin."""
        adapter = self._active[index]
        spec = self._specs[adapter.name]
        return self._encoder(adapter.encoder, ("ip_adapter", index)).encode(images, spec.reads)


class _PerItemEmbeds(list):
    """`ip_adapter_image_embeds` that already hold one row per batch item (negatives first)."""


def _accept_per_item_embeds(pipe) -> None:
    """Let this pipeline instance take embeddings per item.

    diffusers takes `ip_adapter_image_embeds` to be one prompt's and tiles them `batch_size` times;
    given one row per item, item 0 of a two-item batch would attend to both items' references. The
    SD/SDXL pipelines (t2i, img2img, inpaint) all prepare them in `prepare_ip_adapter_image_embeds`,
    so this instance's copy passes ours through as they are and leaves any other input to diffusers."""
    if getattr(pipe, "_ip_embeds_per_item", False):
        return
    original = pipe.prepare_ip_adapter_image_embeds

    def prepare(ip_adapter_image, ip_adapter_image_embeds, device, num_images_per_prompt, do_classifier_free_guidance):
        if not isinstance(ip_adapter_image_embeds, _PerItemEmbeds):
            return original(ip_adapter_image, ip_adapter_image_embeds, device, num_images_per_prompt, do_classifier_free_guidance)
        rows = num_images_per_prompt * (2 if do_classifier_free_guidance else 1)  # diffusers passes batch * per-prompt
        if any(e.shape[0] != rows for e in ip_adapter_image_embeds):
            raise ValueError(
                f"IP-Adapter embeddings have {ip_adapter_image_embeds[0].shape[0]} rows, the call needs {rows}: "
                "call with num_images_per_prompt=1 and the guidance_scale the embeddings were made for"
            )
        return [e.to(device) for e in ip_adapter_image_embeds]

    pipe.prepare_ip_adapter_image_embeds = prepare
    pipe._ip_embeds_per_item = True


def ip_adapter_kwargs(
    pipe,
    adapters: LoadedIPAdapters,
    images: list[list[list[Image.Image]]],
    masks: list[list[Image.Image | None]] | None,
    guidance_scale: float,
    height: int,
    width: int,
) -> dict[str, Any]:
    """Kwargs for calling `pipe` so that each batch item gets its own reference images (and masks).

    `pipe` is the pipeline about to be called (t2i, or one made from it with `from_pipe`), with
    one prompt per item and `num_images_per_prompt=1`. `images[item][adapter]` are one item's
    reference images for one active adapter; `masks[item][adapter]` its mask (white = where the
    adapter acts) or None. Returns `ip_adapter_image_embeds` and, when any item has a mask,
    `cross_attention_kwargs` (merge it with yours, do not replace it); an empty dict when no
    adapter is active.

    One pipeline call holds one tensor per adapter, so every item must have the same number of
    images for a given adapter. For an item's image not to depend on its neighbours, the batch
    key must also say, per adapter, whether a mask is given: with a mask diffusers attends to each
    reference image separately (and sums), without one to all of them together; items without a
    mask get an all-white one here. Encoding runs item by item for the same reason.

    Classifier-free guidance is on when the pipeline will use it (`guidance_scale > 1` and a UNet
    without guidance embedding); the embeddings then carry the unconditional half first."""
    active = adapters.active
    if not active:
        return {}
    if any(len(per_item) != len(active) for per_item in images):
        raise ValueError(f"each item needs reference images for each of the {len(active)} active IP-Adapters")
    _accept_per_item_embeds(pipe)
    unet = adapters.pipe.unet
    cfg = guidance_scale > 1 and unet.config.time_cond_proj_dim is None
    embeds = _PerItemEmbeds()
    counts: list[int] = []
    for j in range(len(active)):
        per_item = [item[j] for item in images]
        count = len(per_item[0])
        if count == 0 or any(len(ims) != count for ims in per_item):
            raise ValueError(f"IP-Adapter {j}: every item of a batch needs the same (non-zero) number of reference images")
        encoded = [adapters.encode(j, ims) for ims in per_item]
        positive = torch.stack([e for e, _ in encoded])  # (items, images, ...)
        if cfg:
            positive = torch.cat([torch.stack([u for _, u in encoded]), positive])
        embeds.append(positive.to(unet.device))
        counts.append(count)
    kwargs: dict[str, Any] = {"ip_adapter_image_embeds": embeds}
    if masks and any(m is not None for item in masks for m in item):
        kwargs["cross_attention_kwargs"] = {"ip_adapter_masks": _masks(masks, counts, cfg, height, width, unet.device)}
    return kwargs


def _masks(
    masks: list[list[Image.Image | None]], counts: list[int], cfg: bool, height: int, width: int, device
) -> list[torch.Tensor | None]:
    """Per adapter: None when no item masks it, else (batch, images, height, width) in 0/1."""
    from diffusers.image_processor import IPAdapterMaskProcessor

    processor = IPAdapterMaskProcessor()
    out: list[torch.Tensor | None] = []
    for j, count in enumerate(counts):
        per_item = [item[j] if j < len(item) else None for item in masks]
        if all(m is None for m in per_item):
            out.append(None)
            continue
        white = Image.new("L", (width, height), 255)
        # One preprocess call per item keeps every item's mask independent of its neighbours.
        tensors = [processor.preprocess([m if m is not None else white], height=height, width=width) for m in per_item]
        mask = torch.cat(tensors).repeat(1, count, 1, 1)  # (items, images, H, W): one mask for all images
        if cfg:
            mask = torch.cat([mask, mask])
        out.append(mask.to(device))
    return out
