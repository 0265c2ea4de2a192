"""fal-ai/flux-lora over HTTP: three modes with fal's defaults and output fields, LoRAs, streaming."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deployments.tiny_models import ensure_tiny_model
from tests.conftest import data_uri, noise_image, png_bytes, square_mask
from tests.test_fal_client import run_client
from tests.test_lcm import pixels

pytestmark = pytest.mark.slow

SMALL = {"prompt": "a red fox in the snow", "image_size": {"width": 64, "height": 48}, "num_inference_steps": 4}


def flux(http, route: str = "", **body) -> dict:
    response = http.post(f"/fal-ai/flux-lora{route}", json={**SMALL, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_defaults_and_output_fields(http):
    response = http.post("/fal-ai/flux-lora", json={"prompt": "a red fox in the snow", "num_inference_steps": 2, "seed": 11})
    assert response.status_code == 200, response.text
    out = response.json()
    assert set(out) == {"images", "timings", "seed", "has_nsfw_concepts", "prompt"}
    (image,) = out["images"]
    assert (image["width"], image["height"], image["content_type"]) == (1024, 768, "image/jpeg")  # landscape_4_3, jpeg
    assert out["seed"] == 11 and out["prompt"] == "a red fox in the snow" and out["has_nsfw_concepts"] == [False]


def test_deterministic_by_seed_and_guidance_matters(http):
    first = pixels(http, flux(http, seed=1)["images"][0])
    assert np.array_equal(first, pixels(http, flux(http, seed=1)["images"][0]))
    assert np.abs(first - pixels(http, flux(http, seed=2)["images"][0])).mean() > 1
    assert np.abs(first - pixels(http, flux(http, seed=1, guidance_scale=9.0)["images"][0])).mean() > 0.5


def test_image_to_image_and_inpainting_follow_the_input(http):
    source = data_uri(png_bytes(noise_image(80, 64, seed=3)))
    out = flux(http, "/image-to-image", image_url=source, image_size=None, strength=0.5, output_format="png")
    assert (out["images"][0]["width"], out["images"][0]["height"], out["images"][0]["content_type"]) == (80, 64, "image/png")
    mask = data_uri(png_bytes(square_mask(80, 64)))
    out = flux(http, "/inpainting", image_url=source, mask_url=mask, image_size=None)
    assert (out["images"][0]["width"], out["images"][0]["height"]) == (80, 64)


def test_loras_change_the_image_and_stay_deterministic(http, image_server):
    url = image_server.add("/flux/lora.safetensors", (ensure_tiny_model("flux-lora") / "pytorch_lora_weights.safetensors").read_bytes())
    base = pixels(http, flux(http, seed=5)["images"][0])
    with_lora = pixels(http, flux(http, seed=5, loras=[{"path": url, "scale": 1.0}])["images"][0])
    assert np.abs(base - with_lora).mean() > 0.5
    assert np.array_equal(with_lora, pixels(http, flux(http, seed=5, loras=[{"path": url, "scale": 1.0}])["images"][0]))
    assert np.array_equal(base, pixels(http, flux(http, seed=5, loras=[{"path": url, "scale": 0.0}])["images"][0]))


def test_stream_yields_a_progress_event_per_step_then_the_result(http):
    with http.stream("POST", "/fal-ai/flux-lora/stream", json={**SMALL, "seed": 7}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line.removeprefix("data: ")) for line in response.iter_lines() if line.startswith("data: ")]
    progress, result = events[:-1], events[-1]
    assert [e["step"] for e in progress] == [1, 2, 3, 4] and progress[-1]["message"] == "step 4/4"
    assert result["seed"] == 7 and len(result["images"]) == 1


def test_the_stock_fal_client_streams(stack, test_ca):
    out = run_client(
        stack,
        test_ca,
        """
        import json, fal_client
        events = list(fal_client.stream("fal-ai/flux-lora", arguments={"prompt": "a red fox", "image_size": {"width": 64, "height": 48}, "num_inference_steps": 3, "seed": 2}))
        print(json.dumps({"steps": [e.get("step") for e in events[:-1]], "seed": events[-1]["seed"]}))
        """,
    )
    assert out == {"steps": [1, 2, 3], "seed": 2}


@pytest.mark.parametrize(
    "route, body, loc",
    [
        ("", {"image_size": {"width": 72, "height": 64}}, ["body", "image_size"]),
        ("", {"num_inference_steps": 51}, ["body", "num_inference_steps"]),
        ("", {"num_images": 5}, ["body", "num_images"]),
        ("", {"guidance_scale": 40}, ["body", "guidance_scale"]),
        ("", {"loras": [{"path": "http://10.0.0.1/x.safetensors", "scale": 1}]}, ["body", "loras", 0, "path"]),
        ("/image-to-image", {}, ["body", "image_url"]),
        ("/inpainting", {"image_url": "data:image/png;base64,AAAA"}, ["body", "mask_url"]),
        ("/stream", {"prompt": ""}, ["body", "prompt"]),
    ],
)
def test_bad_inputs_are_422_on_the_field(http, route, body, loc):
    response = http.post(f"/fal-ai/flux-lora{route}", json={**SMALL, **body})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == loc
