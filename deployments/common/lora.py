"""LoRAs: which ones a loaded model holds, and how one pipeline call serves many LoRA sets.

Files come through `weights_cache.resolve_weights_file` (URL, data URI, HF id), named by their
content digest, so the same bytes under two URLs are one adapter.

Each loaded base model keeps an LRU of adapters already injected by diffusers/peft (diffusers and
kohya naming): a hot LoRA costs nothing to switch to.

Batches mix LoRA sets. peft applies one adapter set to a whole call, so requests with different
LoRAs could never share a batch, and under round-robin LoRA traffic every call ran one request.
Instead, peft's own LoRA path stays off and a forward hook on every LoRA layer adds, for each
image of the batch, that image's adapters at that image's scales, in one stacked computation
(the adapters' A matrices side by side, per-image coefficients on their rank columns, then the B
matrices): S-LoRA/punica-style batching; an image's result does not depend on its neighbours
beyond float rounding. Adapters peft computes differently (DoRA, LoRA biases) are not
mixed: their set stays part of the batch key and peft applies them. A call whose images all
share one set also goes through peft, whose per-layer cost is lower.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import OrderedDict
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from deployments.common.jobs import JobInputError

logger = logging.getLogger("diffusion_serve.lora")

# Keys of LoRA flavours that are not `B @ A` (DoRA magnitudes, biases): peft computes those.
UNMIXABLE_MARKERS = ("dora_scale", "lora_magnitude_vector", "lora_B.bias", "lora_up.bias", ".diff_b", ".diff")


@dataclass(frozen=True)
class ResolvedLora:
    name: str  # adapter name: derived from the file's content digest
    path: Path
    scale: float
    mixable: bool = True  # plain B @ A everywhere: may share a batch with other LoRA sets


def is_mixable(path: Path) -> bool:
    """Whether every tensor of the file is a plain LoRA factor (or alpha)."""
    with safe_open(str(path), "pt") as f:
        return not any(marker in key for key in f.keys() for marker in UNMIXABLE_MARKERS)


def lora_batch_key(loras: list[ResolvedLora]) -> tuple | str:
    """Plain LoRAs ride the per-image mixer, so they do not split batches; others are one set per call."""
    if all(lora.mixable for lora in loras):
        return "mixed"
    return tuple((lora.name, lora.scale) for lora in loras)


class LoadedAdapters:
    """The adapters injected into one loaded model, least recently used first."""

    def __init__(self, pipe, capacity: int) -> None:
        self.pipe = pipe
        self.capacity = capacity
        self._loaded: OrderedDict[str, Path] = OrderedDict()
        self.mixer = LoraMixer(pipe)

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
        # diffusers skips keys that fit nothing; a LoRA must land in the denoiser to be one.
        adapters = self.pipe.get_list_adapters()
        if lora.name not in adapters.get("unet", []) + adapters.get("transformer", []):
            self._forget(lora.name)
            raise JobInputError(field, "no key of this LoRA fits a layer of the base model; is it for the other architecture?", "lora_incompatible")
        self._loaded[lora.name] = lora.path
        self.mixer.install()

    def _forget(self, name: str) -> None:
        try:
            self.pipe.delete_adapters(name)
        except Exception:  # noqa: BLE001, S110 - it may not have been registered at all
            pass
        self._loaded.pop(name, None)

    def _ensure_loaded(self, loras: list[ResolvedLora], fields: list[tuple]) -> None:
        """Load what is missing, then evict the coldest adapters the call does not need."""
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

    def activate(self, loras: list[ResolvedLora], fields: list[tuple]) -> None:
        """peft's path: exactly `loras` (with their scales) active for the whole call."""
        self.mixer.batch = None
        self._ensure_loaded(loras, fields)
        if loras:
            self.pipe.enable_lora()
            self.pipe.set_adapters([lora.name for lora in loras], adapter_weights=[lora.scale for lora in loras])
        elif self._loaded:
            self.pipe.disable_lora()

    def activate_for_jobs(self, per_job: list[list[ResolvedLora]], images_per_job: list[int]) -> None:
        """A call's LoRAs, job by job (their files are the request's `loras[i].path`). Plain LoRAs go
        through the mixer, even one set for the whole call (its stacked hook costs less per layer
        than peft's adapter loop); other kinds through peft, one set for the call (such sets stay
        in the batch key, so every job of the call has the same one)."""

        def fields(loras: list[ResolvedLora]) -> list[tuple]:
            return [("loras", i, "path") for i in range(len(loras))]

        if all(lora.mixable for loras in per_job for lora in loras):
            per_image = [loras for loras, n in zip(per_job, images_per_job) for _ in range(n)]
            self.activate_per_image(per_image, [fields(loras) for loras in per_image])
        else:
            self.activate(per_job[0], fields(per_job[0]))

    def activate_per_image(self, per_image: list[list[ResolvedLora]], fields: list[list[tuple]]) -> None:
        """The mixed path: image i of the call gets `per_image[i]`, each at its own scale."""
        needed: dict[str, tuple[ResolvedLora, tuple]] = {}
        for loras, image_fields in zip(per_image, fields):
            for lora, field in zip(loras, image_fields):
                needed.setdefault(lora.name, (lora, field))
        self._ensure_loaded([lora for lora, _ in needed.values()], [field for _, field in needed.values()])
        if self._loaded:
            self.pipe.disable_lora()  # peft adds nothing; the mixer's hooks add each image's set
        names = list(needed)
        scales = torch.zeros(len(per_image), len(names))
        for i, loras in enumerate(per_image):
            for lora in loras:
                scales[i, names.index(lora.name)] += lora.scale
        self.mixer.batch = MixedBatch(names, scales) if names else None


class MixedBatch:
    """One pipeline call's LoRA sets: `scales[i, k]` is image i's scale of adapter `names[k]`."""

    def __init__(self, names: list[str], scales: torch.Tensor) -> None:
        self.names = names
        self.scales = scales
        # Every image with the same set (a lone request, or one set's batch): the scales fold
        # into B once per layer, and each call is two matmuls.
        self.uniform = bool((scales == scales[0]).all())
        self._stacks: dict[int, _Stack | None] = {}
        self._coefficients: dict[tuple[int, int], torch.Tensor] = {}

    def stack(self, layer) -> _Stack | None:
        key = id(layer)
        if key not in self._stacks:
            stack = _Stack.build(layer, self.names)
            if stack is not None and self.uniform:
                stack.fold(self.scales[0])
            self._stacks[key] = stack
        return self._stacks[key]

    def image_of_rows(self, n_rows: int, rows_per_image: int) -> torch.Tensor:
        """Which image each row of a layer's input belongs to. Rows are the images, or (classifier-
        free guidance) the images repeated: [unconditional..., conditional...], or, inside
        `rows_per_image(k)`, k consecutive rows per image."""
        images = self.scales.shape[0]
        if n_rows % (images * rows_per_image):
            raise RuntimeError(f"a LoRA layer saw {n_rows} rows for {images} images; cannot tell whose rows they are")
        return (torch.arange(n_rows) // rows_per_image) % images

    def coefficients(self, layer, stack: _Stack, n_rows: int) -> torch.Tensor:
        """(rows, ranks): each row's scale for each rank column of the stacked adapters."""
        rows_per_image = _ROWS_PER_IMAGE.get()
        key = (id(layer), n_rows, rows_per_image)
        cached = self._coefficients.get(key)
        if cached is None:
            per_row = self.scales[self.image_of_rows(n_rows, rows_per_image)][:, stack.adapter_of_column]
            cached = (per_row * stack.column_scaling).to(stack.a.device, stack.a.dtype)
            self._coefficients[key] = cached
        return cached


@dataclass
class _Stack:
    """One layer's adapters (those of the batch it has) side by side."""

    a: torch.Tensor  # (ranks, in[, k, k])
    b: torch.Tensor  # (out, ranks[, 1, 1])
    adapter_of_column: torch.Tensor  # (ranks,) index into the batch's names
    column_scaling: torch.Tensor  # (ranks,) peft's alpha / r (or / sqrt(r) for rsLoRA)
    conv: dict | None  # stride/padding/dilation of a convolutional A
    folded: bool = False  # the batch's (uniform) scales are already multiplied into b

    @classmethod
    def build(cls, layer, names: list[str]) -> _Stack | None:
        present = [(k, name) for k, name in enumerate(names) if name in layer.lora_A]
        if not present:
            return None
        a = torch.cat([layer.lora_A[name].weight for _, name in present], dim=0)
        b = torch.cat([layer.lora_B[name].weight for _, name in present], dim=1)
        columns, scaling = [], []
        for k, name in present:
            r = layer.r[name]
            alpha = layer.lora_alpha[name]
            columns += [k] * r
            scaling += [alpha / math.sqrt(r) if layer.use_rslora.get(name, False) else alpha / r] * r
        first = layer.lora_A[present[0][1]]
        conv = None
        if isinstance(first, torch.nn.Conv2d):
            conv = {"stride": first.stride, "padding": first.padding, "dilation": first.dilation}
        return cls(a, b, torch.tensor(columns), torch.tensor(scaling), conv)

    def fold(self, image_scales: torch.Tensor) -> None:
        """Multiply the one set of scales into B: `delta` then needs no coefficients."""
        columns = (image_scales[self.adapter_of_column] * self.column_scaling).to(self.b.device, self.b.dtype)
        self.b = self.b * (columns.view(1, -1, 1, 1) if self.conv is not None else columns)
        self.folded = True

    def delta(self, x: torch.Tensor, coefficients: torch.Tensor | None) -> torch.Tensor:
        x = x.to(self.a.dtype)
        if self.folded:
            if self.conv is not None:
                return F.conv2d(F.conv2d(x, self.a, **self.conv), self.b)
            return F.linear(F.linear(x, self.a), self.b)
        if self.conv is not None:
            h = F.conv2d(x, self.a, **self.conv) * coefficients[:, :, None, None]
            return F.conv2d(h, self.b)
        h = F.linear(x, self.a)
        h = h * coefficients.view(coefficients.shape[0], *([1] * (h.ndim - 2)), -1)
        return F.linear(h, self.b)


class LoraMixer:
    """Forward hooks on every LoRA layer of a pipeline's models; they act while `batch` is set."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.batch: MixedBatch | None = None
        self._hooked: set[int] = set()

    def install(self) -> None:
        """Hook LoRA layers not hooked yet (loading an adapter may wrap new layers)."""
        from peft.tuners.lora import LoraLayer

        for attr in ("unet", "transformer", "text_encoder", "text_encoder_2"):
            model = getattr(self.pipe, attr, None)
            if model is None:
                continue
            for module in model.modules():
                if isinstance(module, LoraLayer) and id(module) not in self._hooked:
                    module.register_forward_hook(self._hook, with_kwargs=True)
                    self._hooked.add(id(module))

    def _hook(self, layer, args, kwargs, output):
        batch = self.batch
        if batch is None:
            return None
        stack = batch.stack(layer)
        if stack is None:
            return None
        x = args[0] if args else kwargs["x"]
        coefficients = None if stack.folded else batch.coefficients(layer, stack, x.shape[0])
        return output + stack.delta(x, coefficients).to(output.dtype)


_ROWS_PER_IMAGE: ContextVar[int] = ContextVar("lora_rows_per_image", default=1)


@contextlib.contextmanager
def rows_per_image(k: int):
    """Tell the mixer that the encoder calls inside lay k consecutive rows per image (a long
    prompt's 77-token windows), so each row gets its own image's LoRAs."""
    token = _ROWS_PER_IMAGE.set(k)
    try:
        yield
    finally:
        _ROWS_PER_IMAGE.reset(token)
