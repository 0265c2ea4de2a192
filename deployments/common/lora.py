"""LoRAs: where their files come from, and which ones a loaded model holds.

A LoRA `path` is an http(s) URL (civitai-style download links included), a `data:` URI, a Hugging
Face repo id, or a file inside one (`owner/name/file.safetensors`). Every file lands in the
node's validated weights cache first (safetensors only, unless the operator allows pickles) and
is named by its content digest, so the same bytes under two URLs are one adapter.

Each loaded base model keeps an LRU of adapters already injected (diffusers/peft, both diffusers
and kohya naming): switching among hot LoRAs is `set_adapters`, milliseconds, not a reload.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from deployments.common.jobs import JobInputError
from deployments.common.weights_cache import WeightsCache

logger = logging.getLogger("diffusion_serve.lora")

HF_FILE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:/(?P<file>[\w./-]+\.safetensors))?$")


@dataclass(frozen=True)
class ResolvedLora:
    name: str  # adapter name: derived from the file's content digest
    path: Path
    scale: float


async def resolve_lora_file(path: str, field: tuple, cache: WeightsCache) -> Path:
    """A local, validated copy of the LoRA at `path` (see the module docstring for the forms)."""
    if path.startswith(("http://", "https://")):
        return await cache.fetch(path, field)
    if path.startswith("data:"):
        header, _, payload = path.partition(",")
        if ";base64" not in header:
            raise JobInputError(field, "a data: URI for weights must be base64-encoded", "data_uri_invalid")
        try:
            data = base64.b64decode(payload)
        except ValueError:
            raise JobInputError(field, "the data URI is not valid base64", "data_uri_invalid") from None
        return await cache.store(data, field)
    match = HF_FILE.match(path)
    if match and not path.startswith(("/", ".", "~")):
        return await asyncio.to_thread(_from_hub, match.group("repo"), match.group("file"), field, cache)
    raise JobInputError(
        field, "expected an http(s) URL, a data: URI, or a Hugging Face repo id (owner/name[/file.safetensors])", "lora_path_invalid"
    )


def _from_hub(repo: str, filename: str | None, field: tuple, cache: WeightsCache) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        local = hf_hub_download(repo, filename or "pytorch_lora_weights.safetensors")
    except Exception as exc:  # noqa: BLE001 - reported to the user
        raise JobInputError(
            field, f"could not fetch {repo}/{filename or 'pytorch_lora_weights.safetensors'} from the Hugging Face hub ({type(exc).__name__})", "url_unreachable"
        ) from None
    return cache.adopt(Path(local), field)


class LoadedAdapters:
    """The adapters injected into one loaded model, least recently used first."""

    def __init__(self, pipe, capacity: int) -> None:
        self.pipe = pipe
        self.capacity = capacity
        self._loaded: OrderedDict[str, Path] = OrderedDict()

    @property
    def names(self) -> list[str]:
        return list(self._loaded)

    def _load(self, lora: ResolvedLora, field: tuple) -> None:
        before = set(self.pipe.get_list_adapters().get("unet", [])) if self._loaded else set()
        try:
            self.pipe.load_lora_weights(str(lora.path), adapter_name=lora.name)
        except Exception as exc:  # noqa: BLE001 - a LoRA that does not fit is the request's fault
            self._forget(lora.name)
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise JobInputError(field, f"this LoRA does not fit the base model ({reason}); is it for the other architecture?", "lora_incompatible") from None
        adapters = self.pipe.get_list_adapters()
        if not any(lora.name in names for names in adapters.values()) or (
            lora.name not in adapters.get("unet", []) and set(adapters.get("unet", [])) == before
        ):
            self._forget(lora.name)
            raise JobInputError(field, "no key of this LoRA fits a layer of the base model; is it for the other architecture?", "lora_incompatible")
        self._loaded[lora.name] = lora.path

    def _forget(self, name: str) -> None:
        try:
            self.pipe.delete_adapters(name)
        except Exception:  # noqa: BLE001 - it may not have been registered at all
            pass
        self._loaded.pop(name, None)

    def activate(self, loras: list[ResolvedLora], fields: list[tuple]) -> None:
        """Make exactly `loras` (with their scales) active; load what is missing, evict the coldest."""
        for lora, field in zip(loras, fields):
            if lora.name in self._loaded:
                self._loaded.move_to_end(lora.name)
            else:
                self._load(lora, field)
        wanted = {lora.name for lora in loras}
        while len(self._loaded) > self.capacity:
            coldest = next((name for name in self._loaded if name not in wanted), None)
            if coldest is None:
                break
            self._forget(coldest)
        if loras:
            self.pipe.enable_lora()
            self.pipe.set_adapters([lora.name for lora in loras], adapter_weights=[lora.scale for lora in loras])
        elif self._loaded:
            self.pipe.disable_lora()
