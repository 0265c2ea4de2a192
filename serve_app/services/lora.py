"""Serving `fal-ai/lora` and its image-to-image and inpaint variants.

Turns a validated request into an `ImageJob`: checks what needs the operator's limits, fetches and
decodes input images, picks a seed, then calls the StableDiffusion deployment and publishes the
images. Engine code never sees HTTP; this class never sees a tensor.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets

import numpy as np
from PIL import Image as PILImage

from deployments.common.jobs import ControlNetInput, ImageJob, IPAdapterInput, JobResult, Mode, ModelRef, Tiling
from serve_app.errors import InputError
from serve_app.files import InputImage, data_uri, publish_images
from serve_app.schemas.common import File, size_of
from serve_app.schemas.lora import LoraImageToImageInput, LoraInpaintInput, LoraOutput, LoraTextToImageInput
from serve_app.services.dispatch import EndpointService, Progress, Run, run_job
from serve_app.services.source_images import check_pixels, check_scale, check_strength, fetch_sources, fit

LoraInput = LoraTextToImageInput | LoraImageToImageInput | LoraInpaintInput

TOKEN = re.compile(r"^\S{1,64}$")
IC_LIGHT = ("ic_light_model_url", "ic_light_model_background_image_url", "ic_light_image_url")


async def _none() -> None:
    return None


def _fit(image: InputImage, width: int, height: int) -> np.ndarray:
    """A conditioning image or mask at the output's size (what the pipeline would resize it to)."""
    if image.size == (width, height):
        return image.pixels
    return np.asarray(PILImage.fromarray(image.pixels).resize((width, height), PILImage.Resampling.BILINEAR))


def _shrink(image: InputImage, longest: int) -> np.ndarray:
    width, height = image.size
    if max(width, height) <= longest:
        return image.pixels
    factor = longest / max(width, height)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return np.asarray(PILImage.fromarray(image.pixels).resize(size, PILImage.Resampling.LANCZOS))


class LoraService(EndpointService):
    def _refuse_unserved(self, body: LoraInput) -> None:
        for name in IC_LIGHT:
            if getattr(body, name):
                raise InputError(["body", name], "IC-Light relighting is not served by this server", "not_supported")

    async def _inputs(self, mode: Mode, body: LoraInput, base_url: str) -> tuple[np.ndarray | None, np.ndarray | None, int, int]:
        """The source image and mask at their own size, sides rounded down to the VAE's 8."""
        if mode == "text-to-image":
            width, height = size_of(body.image_size)
            check_pixels(self.config.limits, width, height, ["body", "image_size"])
            return None, None, width, height
        sources = await fetch_sources(self.inputs, body.image_url, body.mask_url if mode == "inpaint" else None, base_url)
        check_pixels(self.config.limits, *sources.image.size, ["body", "image_url"])
        pixels = fit(sources.image)
        mask = fit(sources.mask) if sources.mask is not None else None
        return pixels, mask, pixels.shape[1], pixels.shape[0]

    def _strength(self, mode: Mode, body: LoraInput) -> float:
        if mode == "text-to-image":
            return 1.0
        steps = len(body.timesteps.array or body.sigmas.array) or body.num_inference_steps
        check_strength(body.noise_strength, steps, ["body", "noise_strength"])
        return body.noise_strength

    def _check_controlnets(self, body: LoraInput) -> None:
        if len(body.controlnets) > self.config.limits.max_controlnets:
            raise InputError(["body", "controlnets"], f"at most {self.config.limits.max_controlnets} ControlNets per request", "value_error")
        for i, c in enumerate(body.controlnets):
            check_scale(c.conditioning_scale, ["body", "controlnets", i, "conditioning_scale"])
            if c.start_percentage >= c.end_percentage:
                raise InputError(["body", "controlnets", i, "end_percentage"], "end_percentage must be greater than start_percentage", "value_error")
            if c.ip_adapter_index is not None:
                raise InputError(
                    ["body", "controlnets", i, "ip_adapter_index"], "InstantID ControlNets (ip_adapter_index) are not served by this server", "not_supported"
                )

    async def _controlnets(self, body: LoraInput, base_url: str, width: int, height: int) -> tuple[ControlNetInput, ...]:
        """Fetch every ControlNet's image, mask and config at once; images come at the output size."""

        async def one(i: int, c) -> ControlNetInput:
            loc = ["body", "controlnets", i]
            image, mask, config = await asyncio.gather(
                self.inputs.image(c.image_url, [*loc, "image_url"], base_url),
                self.inputs.image(c.mask_url, [*loc, "mask_url"], base_url, mode="L") if c.mask_url else _none(),
                self._config(c.config_url, [*loc, "config_url"], base_url) if c.config_url else _none(),
            )
            return ControlNetInput(
                path=c.path,
                image=_fit(image, width, height),
                mask=_fit(mask, width, height) if mask is not None else None,
                config=config,
                variant=c.variant,
                conditioning_scale=c.conditioning_scale,
                start=c.start_percentage,
                end=c.end_percentage,
            )

        return tuple(await asyncio.gather(*(one(i, c) for i, c in enumerate(body.controlnets))))

    def _check_ip_adapters(self, body: LoraInput) -> None:
        limits = self.config.limits
        if len(body.ip_adapter) > limits.max_ip_adapters:
            raise InputError(["body", "ip_adapter"], f"at most {limits.max_ip_adapters} IP-Adapters per request", "value_error")
        for i, a in enumerate(body.ip_adapter):
            loc: list[str | int] = ["body", "ip_adapter", i]
            urls = a.ip_adapter_image_url if isinstance(a.ip_adapter_image_url, list) else [a.ip_adapter_image_url]
            if not 1 <= len(urls) <= limits.max_ip_adapter_images:
                raise InputError([*loc, "ip_adapter_image_url"], f"give 1 to {limits.max_ip_adapter_images} reference images", "value_error")
            check_scale(a.scale, [*loc, "scale"])
            unserved = {
                "insight_face_model_path": (a.insight_face_model_path is not None, "FaceID IP-Adapters (insight_face_model_path) are not served by this server"),
                "unconditional_noising_factor": (a.unconditional_noising_factor != 0, "unconditional_noising_factor is not served by this server; leave it at 0"),
                "image_projection_shortcut": (a.image_projection_shortcut, "image_projection_shortcut is not served by this server; leave it false"),
                "image_encoder_weight_name": (
                    a.image_encoder_weight_name not in (None, "model.safetensors"),
                    "the image encoder is read from its folder's model.safetensors; leave image_encoder_weight_name empty",
                ),
            }
            for name, (refused, msg) in unserved.items():
                if refused:
                    raise InputError([*loc, name], msg, "not_supported")

    async def _ip_adapters(self, body: LoraInput, base_url: str, width: int, height: int) -> tuple[IPAdapterInput, ...]:
        """Fetch every IP-Adapter's reference images (at most 1024 px a side: the encoder sees 224) and mask."""

        async def one(i: int, a) -> IPAdapterInput:
            loc: list[str | int] = ["body", "ip_adapter", i]
            urls = a.ip_adapter_image_url if isinstance(a.ip_adapter_image_url, list) else [a.ip_adapter_image_url]
            image_locs = [[*loc, "ip_adapter_image_url", j] if isinstance(a.ip_adapter_image_url, list) else [*loc, "ip_adapter_image_url"] for j in range(len(urls))]
            images = await asyncio.gather(*(self.inputs.image(url, image_loc, base_url) for url, image_loc in zip(urls, image_locs)))
            mask = await self.inputs.image(a.ip_adapter_mask_url, [*loc, "ip_adapter_mask_url"], base_url, mode="L") if a.ip_adapter_mask_url else None
            return IPAdapterInput(
                path=a.path,
                images=tuple(_shrink(im, 1024) for im in images),
                mask=_fit(mask, width, height) if mask is not None else None,
                model_subfolder=a.model_subfolder,
                weight_name=a.weight_name,
                image_encoder_path=a.image_encoder_path,
                image_encoder_subpath=a.image_encoder_subpath,
                image_encoder_weight_name=a.image_encoder_weight_name,
                scale=a.scale,
                scale_json=json.dumps(a.scale_json, sort_keys=True) if a.scale_json is not None else None,
            )

        return tuple(await asyncio.gather(*(one(i, a) for i, a in enumerate(body.ip_adapter))))

    async def _config(self, url: str, loc: list[str | int], base_url: str) -> str:
        data = await self.inputs.read(url, loc, base_url, self.config.limits.max_config_bytes)
        try:
            text = data.decode()
            if not isinstance(json.loads(text), dict):
                raise ValueError
        except ValueError:
            raise InputError(loc, "expected the URL of a config.json (a JSON object)", "config_invalid") from None
        return text

    async def job(self, mode: Mode, body: LoraInput, base_url: str, request_id: str) -> ImageJob:
        self._refuse_unserved(body)
        if len(body.loras) > self.config.limits.max_loras:
            raise InputError(["body", "loras"], f"at most {self.config.limits.max_loras} LoRAs per request", "value_error")
        for i, lora in enumerate(body.loras):
            check_scale(lora.scale, ["body", "loras", i, "scale"])
        if len(body.embeddings) > self.config.limits.max_loras:
            raise InputError(["body", "embeddings"], f"at most {self.config.limits.max_loras} embeddings per request", "value_error")
        seen: set[str] = set()
        for i, embedding in enumerate(body.embeddings):
            if not embedding.tokens or not all(TOKEN.match(t) for t in embedding.tokens):
                raise InputError(["body", "embeddings", i, "tokens"], "tokens must be one or more words without spaces, like <s0>", "value_error")
            if seen & set(embedding.tokens):
                raise InputError(["body", "embeddings", i, "tokens"], "each token may belong to one embedding only", "value_error")
            seen |= set(embedding.tokens)
        if body.num_images > self.config.limits.max_images_per_request:
            raise InputError(["body", "num_images"], f"at most {self.config.limits.max_images_per_request} images per request", "value_error")
        self._check_controlnets(body)
        self._check_ip_adapters(body)
        strength = self._strength(mode, body)
        image, mask, width, height = await self._inputs(mode, body, base_url)
        controlnets, ip_adapters = await asyncio.gather(
            self._controlnets(body, base_url, width, height), self._ip_adapters(body, base_url, width, height)
        )
        return ImageJob(
            request_id=request_id,
            model=ModelRef(body.model_name, body.unet_name, body.variant, body.model_architecture),
            mode=mode,
            prompt=body.prompt,
            negative_prompt=body.negative_prompt,
            seed=body.seed if body.seed is not None else secrets.randbelow(2**32),
            num_images=body.num_images,
            width=width,
            height=height,
            num_inference_steps=body.num_inference_steps,
            guidance_scale=body.guidance_scale,
            clip_skip=body.clip_skip,
            scheduler=body.scheduler,
            timesteps=tuple(body.timesteps.values) if body.timesteps.values else None,
            sigmas=tuple(body.sigmas.values) if body.sigmas.values else None,
            prediction_type=body.prediction_type,
            rescale_betas_snr_zero=body.rescale_betas_snr_zero,
            eta=body.eta,
            prompt_weighting=body.prompt_weighting,
            loras=tuple((lora.path, lora.scale) for lora in body.loras),
            embeddings=tuple((e.path, tuple(e.tokens)) for e in body.embeddings),
            controlnets=controlnets,
            controlnet_guess_mode=body.controlnet_guess_mode,
            ip_adapters=ip_adapters,
            tiling=Tiling(body.tile_width, body.tile_height, body.tile_stride_width, body.tile_stride_height),
            strength=strength,
            image=image,
            mask=mask,
            enable_safety_checker=body.enable_safety_checker,
            debug_latents=body.debug_latents,
            debug_per_pass_latents=body.debug_per_pass_latents,
        )

    async def run(self, mode: Mode, body: LoraInput, base_url: str, request_id: str, progress: Progress | None = None) -> Run[LoraOutput]:
        def publish(job: ImageJob, result: JobResult) -> LoraOutput:
            return self.publish(result, body.image_format, body.sync_mode, base_url)

        job = self.job(mode, body, base_url, request_id)
        return await run_job(self.model, job, publish, self.config.limits.request_timeout_s, request_id, progress)

    def publish(self, result: JobResult, image_format: str, sync_mode: bool, base_url: str) -> LoraOutput:
        return LoraOutput(
            images=publish_images(self.store, result.images, image_format, sync_mode, base_url),
            seed=result.seed,
            has_nsfw_concepts=result.has_nsfw_concepts,
            debug_latents=self._latents_file(result.debug_latents, sync_mode, base_url),
            debug_per_pass_latents=self._latents_file(result.debug_per_pass_latents, sync_mode, base_url),
        )

    def _latents_file(self, data: bytes | None, sync_mode: bool, base_url: str) -> File | None:
        if data is None:
            return None
        content_type = "application/octet-stream"
        if sync_mode:
            return File(url=data_uri(data, content_type), content_type=content_type, file_name="latents.safetensors", file_size=len(data))
        name = self.store.save(data, "safetensors", content_type)
        return File(url=self.store.url(name, base_url), content_type=content_type, file_name=name, file_size=len(data))
