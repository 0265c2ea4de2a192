"""LoRAs: which ones a loaded model holds.

Files come through `weights_cache.resolve_weights_file` (URL, data URI, HF id), named by their
content digest, so the same bytes under two URLs are one adapter.

Each loaded base model keeps an LRU of adapters already injected (diffusers/peft, both diffusers
and kohya naming): switching among hot LoRAs is `set_adapters`, milliseconds, not a reload.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from deployments.common.jobs import JobInputError

logger = logging.getLogger("diffusion_serve.lora")



@dataclass(frozen=True)
class ResolvedLora:
    name: str  # adapter name: derived from the file's content digest
    path: Path
    scale: float


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
        try:
            self.pipe.load_lora_weights(str(lora.path), adapter_name=lora.name)
        except Exception as exc:  # noqa: BLE001 - a LoRA that does not fit is the request's fault
            self._forget(lora.name)
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise JobInputError(field, f"this LoRA does not fit the base model ({reason}); is it for the other architecture?", "lora_incompatible") from None
        # diffusers skips keys that fit nothing; a LoRA must land in the UNet to be one.
        if lora.name not in self.pipe.get_list_adapters().get("unet", []):
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
