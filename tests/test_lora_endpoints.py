"""fal-ai/lora over real HTTP against a real Ray Serve stack with the tiny models."""

from __future__ import annotations

import concurrent.futures as cf
import io

import numpy as np
import pytest
from PIL import Image

from deployments.common.schedulers import SCHEDULERS
from tests.conftest import data_uri, noise_image, png_bytes, square_mask

pytestmark = pytest.mark.slow

SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
SD15 = "runwayml/stable-diffusion-v1-5"
SEED_SAMPLE = {
    "model_name": SDXL,
    "prompt": "Photo of a european medieval 40 year old queen, silver hair, highly detailed face, detailed eyes, "
    "head shot, intricate crown, age spots, wrinkles",
    "negative_prompt": "cartoon, painting, illustration, (worst quality, low quality, normal quality:2)",
    "loras": [],
    "embeddings": [],
    "controlnets": [],
    "ip_adapter": [],
    "image_size": "square_hd",
    "num_inference_steps": 30,
    "guidance_scale": 7.5,
    "image_format": "jpeg",
    "num_images": 1,
    "tile_width": 4096,
    "tile_height": 4096,
    "tile_stride_width": 2048,
    "tile_stride_height": 2048,
}


def small(**overrides) -> dict:
    body = {"model_name": SD15, "prompt": "photo of a cat", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 4, "seed": 7}
    body.update(overrides)
    return body


def fetch_image(http, image: dict) -> np.ndarray:
    if image["url"].startswith("data:"):
        import base64

        data = base64.b64decode(image["url"].split(",", 1)[1])
    else:
        response = http.get(image["url"])
        assert response.status_code == 200
        data = response.content
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_seed_input_sample_returns_a_1024_image_with_the_documented_fields(http):
    response = http.post("/fal-ai/lora", json=SEED_SAMPLE)
    assert response.status_code == 200, response.text
    out = response.json()
    assert set(out) >= {"images", "seed", "has_nsfw_concepts"}
    (image,) = out["images"]
    assert (image["width"], image["height"]) == (1024, 1024)
    assert image["content_type"] == "image/jpeg" and image["file_name"].endswith(".jpg")
    assert image["file_size"] > 0
    pixels = fetch_image(http, image)
    assert pixels.shape == (1024, 1024, 3)
    assert isinstance(out["seed"], int) and out["has_nsfw_concepts"] == [False]
    assert response.headers["x-fal-request-id"]


def test_output_files_have_unguessable_names_and_missing_ones_are_404(http):
    out = http.post("/fal-ai/lora", json=small(num_images=2)).json()
    names = [im["file_name"] for im in out["images"]]
    assert len(set(names)) == 2 and all(len(n.split(".")[0]) >= 20 for n in names)
    assert http.get("/files/AAAAAAAAAAAAAAAAAAAAAA.png").status_code == 404
    assert http.get("/files/..%2F..%2Fetc%2Fpasswd").status_code == 404


def test_sync_mode_returns_data_uris(http):
    out = http.post("/fal-ai/lora", json=small(sync_mode=True)).json()
    assert out["images"][0]["url"].startswith("data:image/png;base64,")
    assert fetch_image(http, out["images"][0]).shape == (64, 64, 3)


@pytest.mark.parametrize("model", [SD15, SDXL])
def test_same_seed_same_image_and_other_seed_other_image(http, model):
    a = fetch_image(http, http.post("/fal-ai/lora", json=small(model_name=model, seed=11)).json()["images"][0])
    b = fetch_image(http, http.post("/fal-ai/lora", json=small(model_name=model, seed=11)).json()["images"][0])
    c = fetch_image(http, http.post("/fal-ai/lora", json=small(model_name=model, seed=12)).json()["images"][0])
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_every_scheduler_makes_an_image(http, scheduler):
    response = http.post("/fal-ai/lora", json=small(scheduler=scheduler, guidance_scale=1.5))
    assert response.status_code == 200, response.text
    assert fetch_image(http, response.json()["images"][0]).shape == (64, 64, 3)


def test_schedulers_change_the_image(http):
    euler = fetch_image(http, http.post("/fal-ai/lora", json=small(scheduler="Euler")).json()["images"][0])
    ddim = fetch_image(http, http.post("/fal-ai/lora", json=small(scheduler="DDIM")).json()["images"][0])
    assert not np.array_equal(euler, ddim)


def test_custom_timesteps_and_sigmas(http):
    r = http.post("/fal-ai/lora", json=small(scheduler="Euler", timesteps={"method": "array", "array": [999, 700, 400, 100]}))
    assert r.status_code == 200, r.text
    r = http.post("/fal-ai/lora", json=small(scheduler="Euler", sigmas={"method": "array", "array": [14.6, 6.0, 2.0, 0.5, 0.0]}))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("model", [SD15, SDXL])
def test_image_to_image_follows_the_input_size(http, image_server, model):
    url = image_server.add(f"/i2i-{model.split('/')[0]}.png", png_bytes(noise_image(96, 64)))
    body = small(model_name=model, image_url=url, noise_strength=0.5)
    del body["image_size"]
    response = http.post("/fal-ai/lora/image-to-image", json=body)
    assert response.status_code == 200, response.text
    image = response.json()["images"][0]
    assert (image["width"], image["height"]) == (96, 64)


@pytest.mark.parametrize("model", [SD15, SDXL])
def test_inpainting_repaints_only_near_the_mask(http, model):
    source = noise_image(64, 64, seed=3)
    body = small(model_name=model, image_url=data_uri(png_bytes(source)), mask_url=data_uri(png_bytes(square_mask(64, 64))), noise_strength=0.9)
    del body["image_size"]
    response = http.post("/fal-ai/lora/inpaint", json=body)
    assert response.status_code == 200, response.text
    out = fetch_image(http, response.json()["images"][0]).astype(int)
    inside = np.abs(out[24:40, 24:40] - source[24:40, 24:40]).mean()
    assert inside > 10  # the masked square was repainted


def test_own_store_urls_are_accepted_as_inputs(http):
    first = http.post("/fal-ai/lora", json=small()).json()["images"][0]
    body = small(image_url=first["url"], noise_strength=0.5)
    del body["image_size"]
    response = http.post("/fal-ai/lora/image-to-image", json=body)
    assert response.status_code == 200, response.text


def test_num_images_gives_distinct_images_each_reproducible(http):
    out = http.post("/fal-ai/lora", json=small(num_images=3, seed=100)).json()
    images = [fetch_image(http, im) for im in out["images"]]
    assert len(images) == 3 and out["has_nsfw_concepts"] == [False] * 3
    assert not np.array_equal(images[0], images[1])
    # Image i of seed s is image 0 of seed s + i (up to float summation order: the CPU's
    # convolutions pick their kernels by batch size).
    alone = fetch_image(http, http.post("/fal-ai/lora", json=small(seed=101)).json()["images"][0])
    assert np.abs(images[1].astype(int) - alone).max() <= 1


def test_concurrent_compatible_requests_share_batches_and_keep_their_images(http):
    reference = fetch_image(http, http.post("/fal-ai/lora", json=small(seed=42, prompt="red car")).json()["images"][0])
    bodies = [small(seed=42 + (i % 2) * 1000 + i, prompt=f"photo {i}") for i in range(7)] + [small(seed=42, prompt="red car")]
    with cf.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda b: http.post("/fal-ai/lora", json=b), bodies))
    assert all(r.status_code == 200 for r in responses)
    batch_sizes = [int(r.headers["x-diffusion-serve-batch-size"]) for r in responses]
    assert max(batch_sizes) > 1, batch_sizes  # batching happened
    # The reference request got the image it got alone, up to float summation order (a batch of
    # eight runs other convolution kernels than a batch of one): at most one level in 8 bits.
    batched = fetch_image(http, responses[-1].json()["images"][0]).astype(int)
    assert np.abs(batched - reference).max() <= 1 and (batched != reference).mean() < 0.01


def test_incompatible_requests_are_never_mixed(http):
    sizes = [(64, 64), (128, 64), (64, 128), (64, 64), (128, 64), (64, 128)]
    bodies = [small(image_size={"width": w, "height": h}, seed=i) for i, (w, h) in enumerate(sizes)]
    with cf.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda b: http.post("/fal-ai/lora", json=b), bodies))
    for (w, h), r in zip(sizes, responses):
        assert r.status_code == 200, r.text
        assert (r.json()["images"][0]["width"], r.json()["images"][0]["height"]) == (w, h)
        assert int(r.headers["x-diffusion-serve-batch-size"]) <= 2  # only the same-size twin can join


def test_safety_checker_blackens_exactly_the_flagged_images(http):
    flagged = clean = 0
    for seed in range(12):
        out = http.post("/fal-ai/lora", json=small(seed=seed, enable_safety_checker=True, image_format="png")).json()
        pixels = fetch_image(http, out["images"][0])
        if out["has_nsfw_concepts"][0]:
            flagged += 1
            assert pixels.max() == 0
        else:
            clean += 1
            unchecked = fetch_image(http, http.post("/fal-ai/lora", json=small(seed=seed)).json()["images"][0])
            assert np.array_equal(pixels, unchecked)
    assert flagged and clean  # the calibrated stand-in flags some images and passes others


def test_clip_skip_prompt_weighting_and_long_prompts_change_the_image(http):
    base = fetch_image(http, http.post("/fal-ai/lora", json=small()).json()["images"][0])
    skipped = http.post("/fal-ai/lora", json=small(clip_skip=2))
    assert skipped.status_code == 200, skipped.text
    assert not np.array_equal(base, fetch_image(http, skipped.json()["images"][0]))
    weighted = http.post("/fal-ai/lora", json=small(prompt="photo of a (cat:1.6)", prompt_weighting=True))
    assert weighted.status_code == 200, weighted.text
    assert not np.array_equal(base, fetch_image(http, weighted.json()["images"][0]))
    long_prompt = "photo of a cat " + "with intricate zigzag embroidery " * 12
    truncated = fetch_image(http, http.post("/fal-ai/lora", json=small(prompt=long_prompt)).json()["images"][0])
    full = http.post("/fal-ai/lora", json=small(prompt=long_prompt, prompt_weighting=True))
    assert full.status_code == 200, full.text
    assert not np.array_equal(truncated, fetch_image(http, full.json()["images"][0]))


def test_prediction_type_rescale_and_eta(http):
    base = fetch_image(http, http.post("/fal-ai/lora", json=small(scheduler="DDIM")).json()["images"][0])
    for extra in ({"prediction_type": "v_prediction"}, {"rescale_betas_snr_zero": True}, {"eta": 0.8}):
        r = http.post("/fal-ai/lora", json=small(scheduler="DDIM", **extra))
        assert r.status_code == 200, r.text
        assert not np.array_equal(base, fetch_image(http, r.json()["images"][0])), extra


def test_tiled_decoding_keeps_the_size(http):
    r = http.post("/fal-ai/lora", json=small(image_size={"width": 256, "height": 192}, tile_width=128, tile_height=128, tile_stride_width=64, tile_stride_height=64))
    assert r.status_code == 200, r.text
    assert fetch_image(http, r.json()["images"][0]).shape == (192, 256, 3)


def test_debug_latents_are_returned_as_files(http):
    from safetensors.numpy import load

    out = http.post("/fal-ai/lora", json=small(debug_latents=True, debug_per_pass_latents=True)).json()
    latents = load(http.get(out["debug_latents"]["url"]).content)["latents"]
    per_pass = load(http.get(out["debug_per_pass_latents"]["url"]).content)["latents"]
    assert latents.shape == (1, 4, 8, 8)
    assert per_pass.shape == (4, 1, 4, 8, 8)


def test_unet_name_and_variant_load_other_weights(http):
    base = fetch_image(http, http.post("/fal-ai/lora", json=small()).json()["images"][0])
    other_unet = http.post("/fal-ai/lora", json=small(unet_name="someone/custom-unet"))
    assert other_unet.status_code == 200, other_unet.text
    assert not np.array_equal(base, fetch_image(http, other_unet.json()["images"][0]))
    fp16 = http.post("/fal-ai/lora", json=small(variant="fp16"))
    assert fp16.status_code == 200, fp16.text
    missing = http.post("/fal-ai/lora", json=small(variant="int3"))
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["body", "variant"]


def test_model_architecture_picks_the_stand_in(http):
    # "xl" is not in this name, but the request says sdxl: the SDXL stand-in serves it.
    sd = fetch_image(http, http.post("/fal-ai/lora", json=small(model_name="SG161222/Realistic_Vision_V2.0")).json()["images"][0])
    xl = fetch_image(http, http.post("/fal-ai/lora", json=small(model_name="SG161222/Realistic_Vision_V2.0", model_architecture="sdxl")).json()["images"][0])
    sd_ref = fetch_image(http, http.post("/fal-ai/lora", json=small()).json()["images"][0])
    assert np.array_equal(sd, sd_ref) and not np.array_equal(sd, xl)


def test_openapi_documents_the_routes(http):
    spec = http.get("/openapi.json").json()
    assert {"/fal-ai/lora", "/fal-ai/lora/image-to-image", "/fal-ai/lora/inpaint"} <= set(spec["paths"])
