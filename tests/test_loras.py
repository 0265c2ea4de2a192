"""LoRAs over HTTP: any number with scales, both file formats, fetched once, refused clearly."""

from __future__ import annotations

import concurrent.futures as cf
import pickle

import numpy as np
import pytest

from deployments.tiny_models import ensure_tiny_model
from tests.conftest import data_uri
from tests.test_lora_endpoints import fetch_image, small

pytestmark = pytest.mark.slow

SDXL = "stabilityai/stable-diffusion-xl-base-1.0"


def lora_file(name: str) -> bytes:
    directory = ensure_tiny_model(name)
    return next(directory.glob("*.safetensors")).read_bytes()


@pytest.fixture(scope="module")
def lora_urls(image_server) -> dict[str, str]:
    names = ["sd15-lora-a", "sd15-lora-b", "sd15-lora-kohya", "sdxl-lora-a", "sdxl-lora-kohya"]
    return {name: image_server.add(f"/api/download/models/{name}", lora_file(name), "application/octet-stream") for name in names}


def image(http, **overrides) -> np.ndarray:
    response = http.post("/fal-ai/lora", json=small(**overrides))
    assert response.status_code == 200, response.text
    return fetch_image(http, response.json()["images"][0])


def test_two_loras_with_scales_change_the_image_and_stay_deterministic(http, lora_urls):
    base = image(http, seed=3)
    loras = [{"path": lora_urls["sd15-lora-a"], "scale": 0.8}, {"path": lora_urls["sd15-lora-b"], "scale": 0.6}]
    first = image(http, seed=3, loras=loras)
    assert not np.array_equal(first, base)
    assert np.array_equal(first, image(http, seed=3, loras=loras))
    other_scales = [{"path": lora_urls["sd15-lora-a"], "scale": 0.8}, {"path": lora_urls["sd15-lora-b"], "scale": 1.2}]
    assert not np.array_equal(first, image(http, seed=3, loras=other_scales))


def test_scale_zero_equals_no_lora_and_no_lora_after_a_lora_is_clean(http, lora_urls):
    base = image(http, seed=4)
    assert np.array_equal(base, image(http, seed=4, loras=[{"path": lora_urls["sd15-lora-a"], "scale": 0.0}]))
    image(http, seed=4, loras=[{"path": lora_urls["sd15-lora-a"], "scale": 1.0}])
    assert np.array_equal(base, image(http, seed=4))  # the adapter does not linger


def test_switching_between_hot_loras_gives_each_its_own_image(http, lora_urls):
    a = [{"path": lora_urls["sd15-lora-a"], "scale": 1.0}]
    b = [{"path": lora_urls["sd15-lora-b"], "scale": 1.0}]
    ref_a, ref_b = image(http, seed=5, loras=a), image(http, seed=5, loras=b)
    for _ in range(2):
        assert np.array_equal(image(http, seed=5, loras=b), ref_b)
        assert np.array_equal(image(http, seed=5, loras=a), ref_a)


@pytest.mark.parametrize("model, name", [(None, "sd15-lora-kohya"), (SDXL, "sdxl-lora-a"), (SDXL, "sdxl-lora-kohya")])
def test_diffusers_and_kohya_formats_load_on_both_architectures(http, lora_urls, model, name):
    extra = {"model_name": model} if model else {}
    base = image(http, seed=6, **extra)
    assert not np.array_equal(base, image(http, seed=6, loras=[{"path": lora_urls[name], "scale": 1.0}], **extra))


def test_a_lora_given_as_a_data_uri(http, lora_urls):
    by_url = image(http, seed=7, loras=[{"path": lora_urls["sd15-lora-b"], "scale": 1.0}])
    inline = image(http, seed=7, loras=[{"path": data_uri(lora_file("sd15-lora-b"), "application/octet-stream"), "scale": 1.0}])
    assert np.array_equal(by_url, inline)  # same bytes, same adapter


def test_sixteen_concurrent_requests_for_a_new_lora_download_it_once(http, image_server):
    url = image_server.add("/api/download/models/fresh", lora_file("sd15-lora-kohya"), "application/octet-stream")
    with cf.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda i: http.post("/fal-ai/lora", json=small(seed=i, loras=[{"path": url, "scale": 0.7}])), range(16)))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200][:1]
    assert image_server.hits["/api/download/models/fresh"] == 1


def assert_lora_422(response, index: int, type_: str) -> None:
    assert response.status_code == 422, response.text
    (detail,) = response.json()["detail"]
    assert detail["loc"] == ["body", "loras", index, "path"], detail
    assert detail["type"] == type_, detail


@pytest.mark.parametrize(
    "path, body, type_",
    [
        ("/lora/missing", None, "url_http_error"),
        ("/lora/page", b"<html>please log in</html>", "weights_invalid"),
        ("/lora/pickled.ckpt", pickle.dumps({"state_dict": {}}, protocol=4), "weights_pickled"),
        ("/lora/huge", b"\0" * (5 * 1024 * 1024), "url_too_large"),
    ],
)
def test_bad_lora_files_point_at_the_entry(http, image_server, lora_urls, path, body, type_):
    url = image_server.add(path, body) if body is not None else f"http://127.0.0.2:{image_server.port}{path}"
    loras = [{"path": lora_urls["sd15-lora-a"], "scale": 1.0}, {"path": url, "scale": 1.0}]
    assert_lora_422(http.post("/fal-ai/lora", json=small(loras=loras)), 1, type_)


def test_a_lora_for_the_other_architecture_is_refused(http, lora_urls):
    response = http.post("/fal-ai/lora", json=small(loras=[{"path": lora_urls["sdxl-lora-a"], "scale": 1.0}]))
    assert_lora_422(response, 0, "lora_incompatible")
    assert "architecture" in response.json()["detail"][0]["msg"]


@pytest.mark.parametrize("path", ["http://169.254.169.254/latest/meta-data/x", "http://10.0.0.7/lora.safetensors", "/etc/passwd", "file:///etc/passwd"])
def test_forbidden_or_local_paths_are_refused(http, path):
    response = http.post("/fal-ai/lora", json=small(loras=[{"path": path, "scale": 1.0}]))
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "loras", 0, "path"]


def test_the_replica_keeps_serving_after_bad_loras(http):
    assert http.post("/fal-ai/lora", json=small()).status_code == 200


def test_requests_with_different_lora_sets_share_a_batch_and_keep_their_own_images(http, lora_urls):
    """Plain LoRAs do not split batches: each image gets its own set inside one pipeline call."""
    sets = [
        [{"path": lora_urls["sd15-lora-a"], "scale": 0.9}],
        [{"path": lora_urls["sd15-lora-b"], "scale": 0.7}, {"path": lora_urls["sd15-lora-kohya"], "scale": 0.5}],
        [],
    ]
    solo = [image(http, seed=9, loras=loras) for loras in sets]
    with cf.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda i: http.post("/fal-ai/lora", json=small(seed=9, loras=sets[i % 3])), range(6)))
    assert all(r.status_code == 200 for r in responses), responses[0].text
    assert max(int(r.headers["x-diffusion-serve-batch-size"]) for r in responses) > 1
    for i, response in enumerate(responses):
        batched = fetch_image(http, response.json()["images"][0]).astype(int)
        assert np.abs(batched - solo[i % 3]).max() <= 1  # float summation order only
        assert np.abs(batched - solo[(i + 1) % 3]).mean() > 1
