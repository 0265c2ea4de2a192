"""Every bad input gets a clear 422 in fal's format, never a 500, and the replica keeps serving."""

from __future__ import annotations

import pytest

from tests.conftest import data_uri, noise_image, png_bytes, square_mask

pytestmark = pytest.mark.slow

SD15 = "runwayml/stable-diffusion-v1-5"


def small(**overrides) -> dict:
    body = {"model_name": SD15, "prompt": "photo of a cat", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 2, "seed": 1}
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not ...}


def i2i(**overrides) -> dict:
    body = small(**{"image_url": data_uri(png_bytes(noise_image(64, 64))), **overrides})
    body.pop("image_size")
    return body


def assert_422(response, loc: list, fragment: str = "") -> dict:
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail, detail
    hit = [d for d in detail if d["loc"][: len(loc)] == loc]
    assert hit, f"no error at {loc}: {detail}"
    assert all({"loc", "msg", "type"} <= set(d) for d in detail)
    assert fragment.lower() in hit[0]["msg"].lower(), hit[0]["msg"]
    assert response.headers.get("x-fal-request-id")
    return hit[0]


@pytest.mark.parametrize(
    "body, loc, fragment",
    [
        (small(prompt=...), ["body", "prompt"], "required"),
        (small(model_name=...), ["body", "model_name"], "required"),
        (small(image_size={"width": 60, "height": 64}), ["body", "image_size"], "multiple of 8"),
        (small(image_size="square_huge"), ["body", "image_size"], ""),
        (small(num_images=9), ["body", "num_images"], "8"),
        (small(num_images=0), ["body", "num_images"], ""),
        (small(num_inference_steps=0), ["body", "num_inference_steps"], ""),
        (small(num_inference_steps=151), ["body", "num_inference_steps"], "150"),
        (small(scheduler="Heun++"), ["body", "scheduler"], ""),
        (
            small(timesteps={"method": "array", "array": [999, 500]}, sigmas={"method": "array", "array": [1.0, 0.0]}),
            ["body", "sigmas"],
            "not both",
        ),
        (small(guidance_scale=25), ["body", "guidance_scale"], ""),
        (small(clip_skip=3), ["body", "clip_skip"], ""),
        (small(image_format="gif"), ["body", "image_format"], ""),
    ],
)
def test_schema_errors(http, body, loc, fragment):
    assert_422(http.post("/fal-ai/lora", json=body), loc, fragment)


def test_size_above_the_configured_pixel_limit(http):
    # The test stack allows 1024x1024 pixels at most.
    assert_422(http.post("/fal-ai/lora", json=small(image_size={"width": 2048, "height": 1024})), ["body", "image_size"], "at most")


def test_body_that_is_not_json(http):
    response = http.post("/fal-ai/lora", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422


def test_image_url_unreachable(http, image_server):
    url = f"http://127.0.0.2:{image_server.port}/missing.png"
    assert_422(http.post("/fal-ai/lora/image-to-image", json=i2i(image_url=url)), ["body", "image_url"], "404")


def test_image_url_that_is_not_an_image(http, image_server):
    url = image_server.add("/not-an-image.png", b"<html>hello</html>", "text/html")
    assert_422(http.post("/fal-ai/lora/image-to-image", json=i2i(image_url=url)), ["body", "image_url"], "not a readable image")


def test_image_url_too_large(http, image_server):
    url = image_server.add("/huge.png", b"\x89PNG" + b"\0" * (3 * 1024 * 1024))
    assert_422(http.post("/fal-ai/lora/image-to-image", json=i2i(image_url=url)), ["body", "image_url"], "limit")


def test_data_uri_too_large_or_malformed(http):
    huge = data_uri(b"\0" * (3 * 1024 * 1024))
    assert_422(http.post("/fal-ai/lora/image-to-image", json=i2i(image_url=huge)), ["body", "image_url"], "limit")
    assert_422(http.post("/fal-ai/lora/image-to-image", json=i2i(image_url="data:nonsense")), ["body", "image_url"], "data uri")


def test_image_whose_header_claims_too_many_pixels(http):
    # A 5000x5000 PNG is small on the wire but over the 4096x4096 decode limit.
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, format="PNG", optimize=True)
    assert_422(http.post("/fal-ai/lora/image-to-image", json=i2i(image_url=data_uri(buf.getvalue()))), ["body", "image_url"], "pixels")


@pytest.mark.parametrize(
    "url, kind",
    [
        ("http://127.0.0.1:8000/files/x.png", "loopback"),
        ("http://localhost/anything.png", "loopback"),
        ("http://10.1.2.3/x.png", "private"),
        ("http://192.168.0.10/x.png", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[::1]/x.png", "loopback"),
        ("file:///etc/passwd", ""),
    ],
)
def test_image_url_pointing_at_internal_addresses_is_refused(http, url, kind):
    hit = assert_422(http.post("/fal-ai/lora/image-to-image", json=i2i(image_url=url)), ["body", "image_url"], kind)
    assert hit["type"] in {"url_forbidden", "url_invalid"}


def test_mask_of_another_size(http):
    body = i2i(mask_url=data_uri(png_bytes(square_mask(32, 32))))
    assert_422(http.post("/fal-ai/lora/inpaint", json=body), ["body", "mask_url"], "must match")


def test_noise_strength_that_leaves_no_step(http):
    assert_422(http.post("/fal-ai/lora/image-to-image", json=i2i(noise_strength=0.1, num_inference_steps=2)), ["body", "noise_strength"], "no denoising step")


@pytest.mark.parametrize("name", ["/no/such/model", "not a model id!", "./missing-dir"])
def test_model_that_cannot_be_loaded_names_the_model(http, name):
    hit = assert_422(http.post("/fal-ai/lora", json=small(model_name=name)), ["body", "model_name"])
    assert name in hit["msg"]


def test_scheduler_that_cannot_follow_custom_timesteps(http):
    body = small(scheduler="Euler A", timesteps={"method": "array", "array": [999, 500, 100]})
    assert_422(http.post("/fal-ai/lora", json=body), ["body", "timesteps"], "does not accept")


def test_features_not_served_are_refused_not_ignored(http):
    body = small(ic_light_model_url="https://example.com/iclight.safetensors")
    assert_422(http.post("/fal-ai/lora", json=body), ["body", "ic_light_model_url"], "not served")


def test_the_replica_keeps_serving_after_bad_inputs(http):
    assert http.post("/fal-ai/lora", json=small()).status_code == 200


def test_image_url_with_nothing_listening(http):
    from tests.conftest import IMAGE_HOST, free_port

    url = f"http://{IMAGE_HOST}:{free_port(IMAGE_HOST)}/x.png"
    hit = assert_422(http.post("/fal-ai/lora/image-to-image", json=i2i(image_url=url)), ["body", "image_url"])
    assert hit["type"] == "url_unreachable"


@pytest.mark.parametrize(
    "method, path",
    [("get", "/no-such-route"), ("get", "/files/AAAAAAAAAAAAAAAAAAAAAA.png"), ("get", "/fal-ai/lora"), ("get", "/health")],
)
def test_every_response_carries_a_request_id(http, method, path):
    response = getattr(http, method)(path)
    assert response.headers.get("x-fal-request-id"), (path, response.status_code)
