"""fal-ai/lcm over HTTP: 4-step latent consistency in three modes, fal's defaults and output fields."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from deployments.tiny_models import ensure_tiny_model
from tests.conftest import data_uri, noise_image, png_bytes, square_mask

pytestmark = pytest.mark.slow


def lcm(http, **body) -> dict:
    response = http.post("/fal-ai/lcm", json={"prompt": "a black cat with glowing eyes", "image_size": {"width": 64, "height": 64}, **body})
    assert response.status_code == 200, response.text
    return response.json()


def pixels(http, image: dict) -> np.ndarray:
    if image["url"].startswith("data:"):
        data = base64.b64decode(image["url"].split(",", 1)[1])
    else:
        data = http.get(image["url"]).content
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def test_the_seed_sample_defaults_and_output_fields(http):
    response = http.post("/fal-ai/lcm", json={"prompt": "a black cat with glowing eyes, cute, adorable, disney, pixar", "seed": 42, "request_id": "abc"})
    assert response.status_code == 200, response.text
    out = response.json()
    assert set(out) == {"images", "timings", "seed", "num_inference_steps", "request_id", "nsfw_content_detected"}
    assert out["seed"] == 42 and out["num_inference_steps"] == 4 and out["request_id"] == "abc"
    (image,) = out["images"]
    assert (image["width"], image["height"], image["content_type"]) == (512, 512, "image/jpeg")  # 512x512 by default
    assert out["nsfw_content_detected"] == [False] and out["timings"]["inference"] > 0


def test_both_models_are_deterministic_by_seed(http):
    for model in ("sdv1-5", "sdxl"):
        first = pixels(http, lcm(http, model=model, seed=3)["images"][0])
        assert np.array_equal(first, pixels(http, lcm(http, model=model, seed=3)["images"][0]))
        assert np.abs(first - pixels(http, lcm(http, model=model, seed=4)["images"][0])).mean() > 1


def test_image_to_image_follows_the_input_and_large_inputs_are_scaled_to_1024(http):
    gradient = np.broadcast_to(np.linspace(0, 255, 1600, dtype=np.uint8)[None, :, None], (800, 1600, 3)).copy()
    wide = data_uri(png_bytes(gradient))
    out = lcm(http, image_url=wide, strength=0.5, image_size=None, sync_mode=True)
    assert (out["images"][0]["width"], out["images"][0]["height"]) == (1024, 512)
    small = data_uri(png_bytes(noise_image(96, 64, seed=2)))
    weak = pixels(http, lcm(http, image_url=small, strength=0.25, image_size=None, seed=5)["images"][0])
    strong = pixels(http, lcm(http, image_url=small, strength=1.0, image_size=None, seed=5)["images"][0])
    source = noise_image(96, 64, seed=2).astype(int)
    assert np.abs(weak - source).mean() < np.abs(strong - source).mean()


def test_inpainting_and_inpaint_mask_only_keeps_the_outside(http):
    source = noise_image(64, 64, seed=6)
    mask = square_mask(64, 64)
    body = {"image_url": data_uri(png_bytes(source)), "mask_url": data_uri(png_bytes(mask)), "image_size": None, "seed": 7, "strength": 1.0}
    plain = pixels(http, lcm(http, **body)["images"][0])
    kept = pixels(http, lcm(http, **body, inpaint_mask_only=True)["images"][0])
    outside = mask == 0
    # JPEG blurs edges: compare away from the mask border.
    inner = np.zeros_like(outside)
    inner[4:-4, 4:-4] = True
    far = outside & inner & (np.abs(np.arange(64)[:, None] - 32) > 20)
    assert np.abs(kept[far] - source.astype(int)[far]).mean() < np.abs(plain[far] - source.astype(int)[far]).mean()


def test_a_lora_url_changes_the_image(http, image_server):
    url = image_server.add("/lcm/lora.safetensors", (ensure_tiny_model("sd15-lora-a") / "pytorch_lora_weights.safetensors").read_bytes())
    base = pixels(http, lcm(http, seed=8)["images"][0])
    with_lora = pixels(http, lcm(http, seed=8, lora_url=url, lora_scale=1.0)["images"][0])
    assert np.abs(base - with_lora).mean() > 1
    assert np.array_equal(base, pixels(http, lcm(http, seed=8, lora_url=url, lora_scale=0.0)["images"][0]))


def test_safety_checks_on_by_default_report_per_image(http):
    out = lcm(http, num_images=2, seed=9)
    assert len(out["images"]) == 2 and len(out["nsfw_content_detected"]) == 2


@pytest.mark.parametrize(
    "body, loc",
    [
        ({"prompt": ""}, ["body", "prompt"]),
        ({"model": "sd3"}, ["body", "model"]),
        ({"num_inference_steps": 0}, ["body", "num_inference_steps"]),
        ({"mask_url": "data:image/png;base64,AAAA"}, ["body", "mask_url"]),
        ({"controlnet_inpaint": True}, ["body", "controlnet_inpaint"]),
        ({"image_url": "http://169.254.169.254/x.png"}, ["body", "image_url"]),
        ({"image_size": {"width": 4096, "height": 4096}}, ["body", "image_size"]),
        ({"lora_url": "http://10.0.0.1/lora.safetensors"}, ["body", "lora_url"]),
    ],
)
def test_bad_inputs_are_422_on_the_field(http, body, loc):
    response = http.post("/fal-ai/lcm", json={"prompt": "a cat", "image_size": {"width": 64, "height": 64}, **body})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == loc
