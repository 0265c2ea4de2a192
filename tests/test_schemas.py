"""The wire schemas carry fal's defaults and ranges (shared/spec/endpoints.md)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve_app.schemas.common import IMAGE_SIZE_PRESETS, size_of
from serve_app.schemas.lora import LoraImageToImageInput, LoraInpaintInput, LoraTextToImageInput


def test_text_to_image_defaults_match_fal():
    body = LoraTextToImageInput(model_name="runwayml/stable-diffusion-v1-5", prompt="x")
    assert (body.image_size, body.num_inference_steps, body.guidance_scale) == ("square_hd", 30, 7.5)
    assert (body.clip_skip, body.num_images, body.image_format, body.prediction_type) == (0, 1, "png", "epsilon")
    assert (body.tile_width, body.tile_height, body.tile_stride_width, body.tile_stride_height) == (4096, 4096, 2048, 2048)
    assert body.negative_prompt == "" and body.loras == [] and body.enable_safety_checker is False
    assert body.timesteps.method == "default" and body.sigmas.method == "default" and body.seed is None


def test_image_to_image_and_inpaint_defaults():
    i2i = LoraImageToImageInput(model_name="m/n", prompt="x", image_url="data:,")
    assert i2i.noise_strength == 0.5 and i2i.image_size is None
    with pytest.raises(ValidationError):
        LoraInpaintInput(model_name="m/n", prompt="x", image_url="data:,")  # mask_url is required


def test_presets_are_fal_sizes():
    assert IMAGE_SIZE_PRESETS == {
        "square_hd": (1024, 1024), "square": (512, 512), "portrait_4_3": (768, 1024),
        "portrait_16_9": (576, 1024), "landscape_4_3": (1024, 768), "landscape_16_9": (1024, 576),
    }
    assert size_of("portrait_16_9") == (576, 1024)


def test_unknown_fields_are_ignored_as_fal_does():
    body = LoraTextToImageInput.model_validate({"model_name": "m/n", "prompt": "x", "some_future_field": 1})
    assert not hasattr(body, "some_future_field")
