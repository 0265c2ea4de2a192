"""Where a `model_name` (or `unet_name`) comes from: the model registry.

A name is, in order: an operator alias; a local path (a diffusers directory or a single
`.safetensors` file); an http(s) URL of a single-file checkpoint (downloaded once per node through
the validated weights cache); or a Hugging Face repo id.
The demo profile serves every non-local name with a tiny random-weight stand-in of the matching
architecture and says so loudly in the logs; the production profile fetches the real weights.

Architecture (`sd` or `sdxl`): the request's `model_architecture`, else the alias's, else the
model's own files (`model_index.json`), else whether "xl" appears in the name.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from deployments.common.jobs import JobInputError, ModelRef
from deployments.common.weights_cache import WeightsProvider
from deployments.tiny_models import ensure_tiny_model
from serve_app.config import AppConfig

logger = logging.getLogger("diffusion_serve.models")

Architecture = Literal["sd", "sdxl"]
HF_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class WeightsSource:
    """Something `from_pretrained` or `from_single_file` can open."""

    location: str  # local directory, local file, or HF repo id
    kind: Literal["pretrained", "single_file"]
    variant: str | None = None
    stand_in: bool = False


@dataclass(frozen=True)
class ResolvedModel:
    ref: ModelRef
    architecture: Architecture
    base: WeightsSource
    unet: WeightsSource | None = None


def _model_index_class(directory: Path) -> str | None:
    index = directory / "model_index.json"
    if index.is_file():
        return json.loads(index.read_text()).get("_class_name")
    return None


def _architecture_from_class(class_name: str | None) -> Architecture | None:
    if not class_name:
        return None
    return "sdxl" if "XL" in class_name else "sd"


def _guess_from_name(name: str) -> Architecture:
    return "sdxl" if "xl" in name.lower() else "sd"


def _is_url(name: str) -> bool:
    return name.startswith(("http://", "https://"))


def _hub_folder(repo: str, subpath: str | None, field: tuple) -> Path:
    """A folder of a hub repo (weights as safetensors only), through huggingface_hub's cache."""
    from huggingface_hub import snapshot_download

    patterns = [f"{subpath}/*.json", f"{subpath}/*.safetensors"] if subpath else ["*.json", "*.safetensors"]
    try:
        root = Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - reported to the user
        raise JobInputError(field, f"could not fetch {repo}/{subpath or ''} from the Hugging Face hub ({type(exc).__name__})", "url_unreachable") from None
    folder = root / subpath if subpath else root
    if not (folder / "config.json").is_file():
        raise JobInputError(field, f"{repo}/{subpath or ''} holds no image encoder (config.json)", "ip_adapter_encoder_invalid")
    return folder


def _local_path(name: str) -> Path | None:
    if name.startswith(("/", "./", "../", "~")):
        path = Path(name).expanduser()
        return path if path.exists() else None
    return None


class ModelRegistry:
    """Resolves model references for one replica; downloads only in the production profile."""

    def __init__(self, config: AppConfig, weights: WeightsProvider | None = None) -> None:
        self.config = config
        self.weights = weights

    async def _download(self, url: str, field: tuple[str, ...]) -> Path:
        if self.weights is None:
            raise JobInputError(field, "URL checkpoints are not enabled on this server", "model_load_error")
        return await self.weights.get(url, field)

    async def resolve(self, ref: ModelRef) -> ResolvedModel:
        name, variant, declared = ref.model_name, ref.variant, ref.architecture
        alias = self.config.models.get(name)
        if alias is not None:
            name = alias.source
            variant = variant or alias.variant
            declared = declared or alias.architecture
        base, detected = await self._base_source(name, variant, declared)
        architecture: Architecture = declared or detected or _guess_from_name(ref.model_name if alias is None else name)
        if base.stand_in:
            # LCM-distilled models (by name) get the LCM stand-in: the same UNet plus LCM's guidance embedding.
            tiny = ("sdxl" if architecture == "sdxl" else "sd15") + ("-lcm" if "lcm" in name.lower() else "")
            base = WeightsSource(str(ensure_tiny_model(tiny)), "pretrained", variant, True)
            logger.warning(
                "DEMO PROFILE: model %r is served by the tiny random-weight %s stand-in at %s. "
                "Images are noise, not %r. Use the production profile for real weights.",
                ref.model_name, architecture.upper(), base.location, ref.model_name,
            )
        unet = await self._unet_source(ref.unet_name, architecture, variant) if ref.unet_name else None
        return ResolvedModel(ref, architecture, base, unet)

    async def _base_source(
        self, name: str, variant: str | None, declared: Architecture | None
    ) -> tuple[WeightsSource, Architecture | None]:
        local = _local_path(name)
        if local is not None:
            if local.is_dir():
                return WeightsSource(str(local), "pretrained", variant), _architecture_from_class(_model_index_class(local))
            if local.suffix != ".safetensors":
                raise JobInputError(("model_name",), f"local checkpoint {name!r} is not a .safetensors file", "model_load_error")
            return WeightsSource(str(local), "single_file", variant), None
        if name.startswith(("/", "./", "../", "~")):
            raise JobInputError(("model_name",), f"no model at local path {name!r}", "model_load_error")
        if not (_is_url(name) or HF_REPO_ID.match(name)):
            raise JobInputError(
                ("model_name",),
                f"{name!r} is neither an alias, a local path, an http(s) URL nor a Hugging Face id (owner/name)",
                "model_load_error",
            )
        if self.config.is_demo:
            return WeightsSource(name, "pretrained", variant, stand_in=True), None
        if _is_url(name):
            path = await self._download(name, ("model_name",))
            return WeightsSource(str(path), "single_file", variant), None
        return WeightsSource(name, "pretrained", variant), declared or await asyncio.to_thread(self._hub_architecture, name)

    def _hub_architecture(self, repo_id: str) -> Architecture | None:
        """Read the repo's model_index.json through huggingface_hub (cached like the weights)."""
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(repo_id, "model_index.json")
        except Exception as exc:  # noqa: BLE001 - reported to the user below
            raise JobInputError(
                ("model_name",),
                f"model {repo_id!r} could not be found on the Hugging Face hub ({type(exc).__name__}); "
                "check the id, or that the repo holds a diffusers pipeline (model_index.json)",
                "model_load_error",
            ) from None
        return _architecture_from_class(_model_index_class(Path(path).parent))

    async def lcm_lora(self, source: str, architecture: Architecture | None) -> Path:
        """The operator's LCM-LoRA for a base model (the demo profile: a tiny stand-in LoRA)."""
        if self.config.is_demo:
            return ensure_tiny_model("sdxl-lcm-lora" if architecture == "sdxl" else "sd15-lcm-lora") / "pytorch_lora_weights.safetensors"
        if self.weights is None:
            raise JobInputError(("model",), "LCM-LoRAs need the weights cache", "model_load_error")
        return await self.weights.get(source, ("model",), "pytorch_lora_weights.safetensors")

    async def image_encoder(
        self, adapter_path: str, subfolder: str | None, encoder_path: str | None, encoder_subpath: str | None, field: tuple
    ) -> Path:
        """The CLIP image-encoder directory an IP-Adapter reads reference images with: the request's
        `image_encoder_path` (HF repo, with `image_encoder_subpath`), else the adapter repo's own
        `<model_subfolder>/image_encoder` (h94/IP-Adapter's layout, as diffusers assumes). The demo
        profile serves every encoder with the tiny stand-in."""
        if self.config.is_demo:
            path = ensure_tiny_model("tiny-image-encoder")
            logger.warning("DEMO PROFILE: IP-Adapter image encoder %r is the tiny random-weight stand-in at %s", encoder_path or adapter_path, path)
            return path
        if encoder_path is None:
            if _is_url(adapter_path) or adapter_path.startswith("data:") or not HF_REPO_ID.match(adapter_path):
                raise JobInputError((*field, "image_encoder_path"), "an IP-Adapter given by URL needs image_encoder_path (a Hugging Face repo)", "ip_adapter_encoder_missing")
            encoder_path, encoder_subpath = adapter_path, "/".join(p for p in (subfolder, "image_encoder") if p)
        alias = self.config.models.get(encoder_path)
        local = _local_path(alias.source) if alias else None
        if local is not None:
            return local / encoder_subpath if encoder_subpath else local
        if not HF_REPO_ID.match(encoder_path):
            raise JobInputError((*field, "image_encoder_path"), f"{encoder_path!r} is not a Hugging Face repo id (owner/name) or an alias", "ip_adapter_encoder_invalid")
        return await asyncio.to_thread(_hub_folder, encoder_path, encoder_subpath, (*field, "image_encoder_path"))

    async def _unet_source(self, unet_name: str, architecture: Architecture, variant: str | None) -> WeightsSource:
        local = _local_path(unet_name)
        if local is not None:
            kind = "pretrained" if local.is_dir() else "single_file"
            return WeightsSource(str(local), kind, variant)
        if self.config.is_demo:
            path = ensure_tiny_model("sdxl-unet-alt" if architecture == "sdxl" else "sd15-unet-alt")
            logger.warning("DEMO PROFILE: unet %r is served by a tiny random-weight stand-in at %s", unet_name, path)
            return WeightsSource(str(path), "pretrained", variant, stand_in=True)
        if _is_url(unet_name):
            return WeightsSource(str(await self._download(unet_name, ("unet_name",))), "single_file", variant)
        if HF_REPO_ID.match(unet_name):
            return WeightsSource(unet_name, "pretrained", variant)
        raise JobInputError(("unet_name",), f"{unet_name!r} is neither a local path, a URL nor a Hugging Face id", "model_load_error")

