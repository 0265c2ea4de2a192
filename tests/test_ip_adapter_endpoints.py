"""IP-Adapters over HTTP: reference images steer the image; per request, per image, refused clearly."""

from __future__ import annotations

import concurrent.futures as cf

import numpy as np
import pytest

from deployments.tiny_models import ensure_tiny_model
from tests.conftest import data_uri, noise_image, png_bytes
from tests.test_lora_endpoints import fetch_image, small

pytestmark = pytest.mark.slow

SDXL = "stabilityai/stable-diffusion-xl-base-1.0"


def adapter_file(name: str) -> bytes:
    return (ensure_tiny_model(name) / "ip-adapter.safetensors").read_bytes()


@pytest.fixture(scope="module")
def ip(image_server) -> dict[str, str]:
    urls = {name: image_server.add(f"/ip/{name}.safetensors", adapter_file(name), "application/octet-stream") for name in ("sd15-ip-adapter", "sdxl-ip-adapter")}
    urls["cat"] = image_server.add("/ip/cat.png", png_bytes(noise_image(96, 64, seed=31)))
    urls["dog"] = image_server.add("/ip/dog.png", png_bytes(noise_image(64, 64, seed=32)))
    return urls


def differ(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(float) - b.astype(float)).mean())


def image(http, **overrides) -> np.ndarray:
    response = http.post("/fal-ai/lora", json=small(**overrides))
    assert response.status_code == 200, response.text
    return fetch_image(http, response.json()["images"][0])


def adapter(ip, reference="cat", **fields) -> dict:
    return {"path": ip["sd15-ip-adapter"], "ip_adapter_image_url": ip[reference], **fields}


def test_a_reference_image_steers_the_result_deterministically(http, ip):
    base = image(http, seed=41)
    steered = image(http, seed=41, ip_adapter=[adapter(ip)])
    assert differ(steered, base) > 0.5
    assert np.array_equal(steered, image(http, seed=41, ip_adapter=[adapter(ip)]))
    assert differ(steered, image(http, seed=41, ip_adapter=[adapter(ip, "dog")])) > 0.1


def test_scale_zero_equals_no_adapter_and_nothing_lingers(http, ip):
    base = image(http, seed=42)
    assert np.array_equal(base, image(http, seed=42, ip_adapter=[adapter(ip, scale=0.0)]))
    image(http, seed=42, ip_adapter=[adapter(ip)])
    assert np.array_equal(base, image(http, seed=42))


def test_several_reference_images_a_mask_and_per_block_scales(http, ip, image_server):
    one = image(http, seed=43, ip_adapter=[adapter(ip)])
    two = image(http, seed=43, ip_adapter=[{**adapter(ip), "ip_adapter_image_url": [ip["cat"], ip["dog"]]}])
    assert differ(one, two) > 0.1
    black = image_server.add("/ip/black.png", png_bytes(np.zeros((64, 64), np.uint8)))
    assert np.array_equal(image(http, seed=43), image(http, seed=43, ip_adapter=[adapter(ip, ip_adapter_mask_url=black)]))
    blocks = image(http, seed=43, ip_adapter=[adapter(ip, scale_json={"down": {"block_2": [0.0]}, "up": {"block_0": [1.0]}})])
    assert differ(blocks, one) > 0.01


def test_requests_with_different_references_share_a_batch(http, ip):
    solo = {ref: image(http, seed=44, ip_adapter=[adapter(ip, ref)]) for ref in ("cat", "dog")}
    refs = ["cat", "dog"] * 3
    with cf.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda ref: http.post("/fal-ai/lora", json=small(seed=44, ip_adapter=[adapter(ip, ref)])), refs))
    assert all(r.status_code == 200 for r in responses)
    assert max(int(r.headers["x-diffusion-serve-batch-size"]) for r in responses) > 1
    for ref, response in zip(refs, responses):
        assert np.abs(fetch_image(http, response.json()["images"][0]).astype(int) - solo[ref]).max() <= 1


def test_ip_adapters_with_controlnets_img2img_and_sdxl(http, ip, image_server):
    source = data_uri(png_bytes(noise_image(64, 64, seed=5)))
    body = small(image_url=source)
    body.pop("image_size")
    plain = http.post("/fal-ai/lora/image-to-image", json=body)
    steered = http.post("/fal-ai/lora/image-to-image", json={**body, "ip_adapter": [adapter(ip)]})
    assert plain.status_code == steered.status_code == 200, steered.text
    assert differ(fetch_image(http, plain.json()["images"][0]), fetch_image(http, steered.json()["images"][0])) > 0.1
    control = {"path": image_server.add("/ip/cn.safetensors", (ensure_tiny_model("sd15-controlnet") / "diffusion_pytorch_model.safetensors").read_bytes()), "image_url": ip["dog"]}
    assert differ(image(http, seed=45, controlnets=[control]), image(http, seed=45, controlnets=[control], ip_adapter=[adapter(ip)])) > 0.1
    on_sdxl = {"path": ip["sdxl-ip-adapter"], "ip_adapter_image_url": ip["cat"]}
    assert differ(image(http, seed=45, model_name=SDXL), image(http, seed=45, model_name=SDXL, ip_adapter=[on_sdxl])) > 0.1


def assert_422(response, loc: list, type_: str) -> None:
    assert response.status_code == 422, response.text
    (detail,) = response.json()["detail"]
    assert detail["loc"] == loc and detail["type"] == type_, detail


@pytest.mark.parametrize(
    "fields, loc, type_",
    [
        ({"path": "SDXL"}, ["body", "ip_adapter", 0, "path"], "ip_adapter_incompatible"),
        ({"ip_adapter_image_url": "http://169.254.169.254/x.png"}, ["body", "ip_adapter", 0, "ip_adapter_image_url"], "url_forbidden"),
        ({"ip_adapter_image_url": []}, ["body", "ip_adapter", 0, "ip_adapter_image_url"], "value_error"),
        ({"insight_face_model_path": "buffalo_l"}, ["body", "ip_adapter", 0, "insight_face_model_path"], "not_supported"),
        ({"unconditional_noising_factor": 0.5}, ["body", "ip_adapter", 0, "unconditional_noising_factor"], "not_supported"),
        ({"scale": float("1e12")}, ["body", "ip_adapter", 0, "scale"], "value_error"),
        ({"scale_json": {"down": {"block_2": "high"}}}, ["body", "ip_adapter", 0, "scale_json"], "ip_adapter_scale_invalid"),
    ],
)
def test_bad_ip_adapter_entries_point_at_the_field(http, ip, fields, loc, type_):
    if fields.get("path") == "SDXL":
        fields = {**fields, "path": ip["sdxl-ip-adapter"]}
    assert_422(http.post("/fal-ai/lora", json=small(ip_adapter=[adapter(ip, **fields)])), loc, type_)


def test_a_lora_file_is_not_an_ip_adapter(http, ip, image_server):
    lora = image_server.add("/ip/lora.safetensors", next(ensure_tiny_model("sd15-lora-a").glob("*.safetensors")).read_bytes())
    assert_422(http.post("/fal-ai/lora", json=small(ip_adapter=[adapter(ip, path=lora)])), ["body", "ip_adapter", 0, "path"], "ip_adapter_invalid")


def test_the_replica_keeps_serving_after_bad_ip_adapters(http, ip):
    assert http.post("/fal-ai/lora", json=small(ip_adapter=[adapter(ip)])).status_code == 200
    assert http.post("/fal-ai/lora", json=small()).status_code == 200
