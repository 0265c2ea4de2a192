"""ControlNets over HTTP: any number, each with its image, mask, scale and schedule; refused clearly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deployments.tiny_models import ensure_tiny_model
from tests.conftest import data_uri, noise_image, png_bytes, square_mask
from tests.test_lora_endpoints import fetch_image, small

pytestmark = pytest.mark.slow

SDXL = "stabilityai/stable-diffusion-xl-base-1.0"


def controlnet_file(name: str) -> bytes:
    return (ensure_tiny_model(name) / "diffusion_pytorch_model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def cn(image_server) -> dict[str, str]:
    """URLs of the tiny ControlNets, their config, and conditioning images (a 'pose' and an 'edge' map)."""
    urls = {name: image_server.add(f"/controlnet/{name}.safetensors", controlnet_file(name), "application/octet-stream") for name in ("sd15-controlnet", "sdxl-controlnet")}
    urls["config"] = image_server.add("/controlnet/config.json", (ensure_tiny_model("sd15-controlnet") / "config.json").read_bytes(), "application/json")
    pose = np.zeros((64, 64, 3), np.uint8)
    pose[16:48, 24:40] = 255  # a figure in the middle
    edges = np.zeros((64, 64, 3), np.uint8)
    edges[::8] = edges[1::8] = 255  # horizontal lines
    urls["pose"] = image_server.add("/controlnet/pose.png", png_bytes(pose))
    urls["edges"] = image_server.add("/controlnet/edges.png", png_bytes(edges))
    return urls


def differ(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference in 8-bit levels."""
    return float(np.abs(a.astype(float) - b.astype(float)).mean())


def image(http, **overrides) -> np.ndarray:
    response = http.post("/fal-ai/lora", json=small(**overrides))
    assert response.status_code == 200, response.text
    return fetch_image(http, response.json()["images"][0])


def controlnet(cn, image_key: str = "pose", **fields) -> dict:
    return {"path": cn["sd15-controlnet"], "image_url": cn[image_key], **fields}


def test_a_controlnet_steers_the_image_by_its_conditioning_image(http, cn):
    base = image(http, seed=21)
    posed = image(http, seed=21, controlnets=[controlnet(cn)])
    assert differ(posed, base) > 1
    assert np.array_equal(posed, image(http, seed=21, controlnets=[controlnet(cn)]))  # deterministic by seed
    assert differ(posed, image(http, seed=21, controlnets=[controlnet(cn, "edges")])) > 1


def test_conditioning_scale_zero_equals_no_controlnet(http, cn):
    assert np.array_equal(image(http, seed=22), image(http, seed=22, controlnets=[controlnet(cn, conditioning_scale=0.0)]))


def test_two_controlnets_combine_and_each_keeps_its_own_schedule(http, cn):
    one = image(http, seed=23, controlnets=[controlnet(cn)])
    both = image(http, seed=23, controlnets=[controlnet(cn), controlnet(cn, "edges", conditioning_scale=0.7)])
    assert differ(one, both) > 0.5
    late = image(http, seed=23, controlnets=[controlnet(cn), controlnet(cn, "edges", conditioning_scale=0.7, start_percentage=0.5)])
    assert differ(late, both) > 0.5
    # A ControlNet active for no step at all does nothing.
    idle = image(http, seed=23, controlnets=[controlnet(cn), controlnet(cn, "edges", start_percentage=0.99, end_percentage=1.0)])
    assert np.array_equal(idle, one)


def test_guess_mode_changes_the_result(http, cn):
    normal = image(http, seed=24, controlnets=[controlnet(cn)])
    assert differ(normal, image(http, seed=24, controlnets=[controlnet(cn)], controlnet_guess_mode=True)) > 0.5


def test_a_mask_confines_the_controlnet(http, cn, image_server):
    black = image_server.add("/controlnet/black-mask.png", png_bytes(np.zeros((64, 64), np.uint8)))
    half = image_server.add("/controlnet/half-mask.png", png_bytes(square_mask(64, 64)))
    base = image(http, seed=25)
    assert np.array_equal(base, image(http, seed=25, controlnets=[controlnet(cn, mask_url=black)]))
    unmasked = image(http, seed=25, controlnets=[controlnet(cn)])
    masked = image(http, seed=25, controlnets=[controlnet(cn, mask_url=half)])
    assert differ(masked, unmasked) > 0.5 and differ(masked, base) > 0.5


def test_controlnets_drive_image_to_image_and_inpainting(http, cn):
    source = data_uri(png_bytes(noise_image(64, 64, seed=3)))
    for route, extra in [("image-to-image", {}), ("inpaint", {"mask_url": data_uri(png_bytes(square_mask(64, 64)))})]:
        body = small(image_url=source, **extra)
        body.pop("image_size")
        plain = http.post(f"/fal-ai/lora/{route}", json=body)
        steered = http.post(f"/fal-ai/lora/{route}", json={**body, "controlnets": [controlnet(cn)]})
        assert plain.status_code == steered.status_code == 200, steered.text
        assert differ(fetch_image(http, plain.json()["images"][0]), fetch_image(http, steered.json()["images"][0])) > 0.5


def test_sdxl_controlnets_on_sdxl(http, cn):
    on_sdxl = {"path": cn["sdxl-controlnet"], "image_url": cn["pose"]}
    assert differ(image(http, seed=26, model_name=SDXL), image(http, seed=26, model_name=SDXL, controlnets=[on_sdxl])) > 0.5


def test_config_url_and_data_uri_weights_load_the_same_controlnet(http, cn):
    by_url = image(http, seed=27, controlnets=[controlnet(cn)])
    inline = {"path": data_uri(controlnet_file("sd15-controlnet"), "application/octet-stream"), "image_url": cn["pose"], "config_url": cn["config"]}
    assert np.array_equal(by_url, image(http, seed=27, controlnets=[inline]))


def test_concurrent_requests_with_different_control_images_batch_together(http, cn):
    """Control images are per image, so they do not split a batch; each result equals its solo run
    (up to one level of rounding: the ControlNet's convolutions sum in a batch-size-dependent order)."""
    import concurrent.futures as cf

    keys = ["pose", "edges"] * 3
    solo = {key: image(http, seed=28, controlnets=[controlnet(cn, key)]) for key in ("pose", "edges")}
    with cf.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda key: http.post("/fal-ai/lora", json=small(seed=28, controlnets=[controlnet(cn, key)])), keys))
    assert all(r.status_code == 200 for r in responses)
    assert max(int(r.headers["x-diffusion-serve-batch-size"]) for r in responses) > 1
    for key, response in zip(keys, responses):
        batched = fetch_image(http, response.json()["images"][0]).astype(int)
        assert np.abs(batched - solo[key]).max() <= 1
        assert differ(batched, solo["edges" if key == "pose" else "pose"]) > 1


def assert_422(response, loc: list, type_: str | None = None) -> dict:
    assert response.status_code == 422, response.text
    (detail,) = response.json()["detail"]
    assert detail["loc"] == loc, detail
    if type_:
        assert detail["type"] == type_, detail
    return detail


def test_a_controlnet_for_the_other_architecture_is_refused(http, cn):
    response = http.post("/fal-ai/lora", json=small(controlnets=[controlnet(cn), {"path": cn["sdxl-controlnet"], "image_url": cn["pose"]}]))
    detail = assert_422(response, ["body", "controlnets", 1, "path"], "controlnet_incompatible")
    assert "SDXL" in detail["msg"] and "SD1.5" in detail["msg"]


@pytest.mark.parametrize(
    "fields, loc, type_",
    [
        ({"image_url": "http://127.0.0.1:1/pose.png"}, ["body", "controlnets", 0, "image_url"], "url_forbidden"),
        ({"path": "http://10.1.2.3/cn.safetensors"}, ["body", "controlnets", 0, "path"], "url_forbidden"),
        ({"start_percentage": 0.6, "end_percentage": 0.4}, ["body", "controlnets", 0, "end_percentage"], "value_error"),
        ({"conditioning_scale": 1e9}, ["body", "controlnets", 0, "conditioning_scale"], "value_error"),
        ({"ip_adapter_index": 0}, ["body", "controlnets", 0, "ip_adapter_index"], "not_supported"),
        ({"config_url": data_uri(b"[1, 2]", "application/json")}, ["body", "controlnets", 0, "config_url"], "config_invalid"),
    ],
)
def test_bad_controlnet_entries_point_at_the_field(http, cn, fields, loc, type_):
    assert_422(http.post("/fal-ai/lora", json=small(controlnets=[controlnet(cn, **fields)])), loc, type_)


def test_a_config_that_does_not_fit_the_weights_is_refused(http, cn):
    config = json.loads((ensure_tiny_model("sd15-controlnet") / "config.json").read_text())
    config["block_out_channels"] = [8, 8, 16]
    response = http.post("/fal-ai/lora", json=small(controlnets=[controlnet(cn, config_url=data_uri(json.dumps(config).encode(), "application/json"))]))
    assert_422(response, ["body", "controlnets", 0, "path"], "controlnet_incompatible")


def test_too_many_controlnets_are_refused(http, cn):
    assert_422(http.post("/fal-ai/lora", json=small(controlnets=[controlnet(cn)] * 5)), ["body", "controlnets"], "value_error")


def test_the_replica_keeps_serving_after_bad_controlnets(http, cn):
    assert http.post("/fal-ai/lora", json=small(controlnets=[controlnet(cn)])).status_code == 200
