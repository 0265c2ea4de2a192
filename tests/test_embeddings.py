"""Textual-inversion embeddings over HTTP: tokens bound per request, on SD1.5 and SDXL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save

from deployments.tiny_models import ensure_tiny_model
from tests.conftest import data_uri
from tests.test_lora_endpoints import fetch_image, small

pytestmark = pytest.mark.slow

SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
PROMPT = "photo of <s0><s1> cat"


def embedding_file(name: str) -> bytes:
    return (ensure_tiny_model(name) / "embedding.safetensors").read_bytes()


@pytest.fixture(scope="module")
def urls(image_server) -> dict[str, str]:
    return {n: image_server.add(f"/emb/{n}.safetensors", embedding_file(n), "application/octet-stream") for n in ("sd15-embedding", "sdxl-embedding")}


def image(http, **overrides) -> np.ndarray:
    response = http.post("/fal-ai/lora", json=small(**overrides))
    assert response.status_code == 200, response.text
    return fetch_image(http, response.json()["images"][0])


@pytest.mark.parametrize("model, name", [(None, "sd15-embedding"), (SDXL, "sdxl-embedding")])
def test_an_embedding_changes_images_whose_prompt_uses_its_tokens(http, urls, model, name):
    extra = {"model_name": model} if model else {}
    base = image(http, seed=8, prompt=PROMPT, **extra)
    with_embedding = image(http, seed=8, prompt=PROMPT, embeddings=[{"path": urls[name]}], **extra)
    assert not np.array_equal(base, with_embedding)
    assert np.array_equal(with_embedding, image(http, seed=8, prompt=PROMPT, embeddings=[{"path": urls[name]}], **extra))
    # A later request that did not ask for it does not inherit it, even with the same tokens.
    assert np.array_equal(base, image(http, seed=8, prompt=PROMPT, **extra))


def test_custom_tokens_and_a_data_uri(http, urls):
    by_url = image(http, seed=9, prompt="photo of <cat-a><cat-b>", embeddings=[{"path": urls["sd15-embedding"], "tokens": ["<cat-a>", "<cat-b>"]}])
    inline = image(http, seed=9, prompt="photo of <cat-a><cat-b>",
                   embeddings=[{"path": data_uri(embedding_file("sd15-embedding"), "application/octet-stream"), "tokens": ["<cat-a>", "<cat-b>"]}])
    assert np.array_equal(by_url, inline)


def test_embeddings_and_loras_together(http, urls, image_server):
    lora = image_server.add("/emb/lora-a", next(ensure_tiny_model("sd15-lora-a").glob("*.safetensors")).read_bytes())
    both = image(http, seed=10, prompt=PROMPT, embeddings=[{"path": urls["sd15-embedding"]}], loras=[{"path": lora, "scale": 1.0}])
    only_lora = image(http, seed=10, prompt=PROMPT, loras=[{"path": lora, "scale": 1.0}])
    assert not np.array_equal(both, only_lora)


def assert_embedding_422(response, loc: list, type_: str) -> None:
    assert response.status_code == 422, response.text
    (detail,) = response.json()["detail"]
    assert detail["loc"] == loc and detail["type"] == type_, detail


def test_an_sdxl_embedding_on_sd15_is_refused(http, urls):
    response = http.post("/fal-ai/lora", json=small(prompt=PROMPT, embeddings=[{"path": urls["sdxl-embedding"]}]))
    assert_embedding_422(response, ["body", "embeddings", 0, "path"], "embedding_incompatible")


def test_an_embedding_of_the_wrong_width_is_refused(http, image_server):
    url = image_server.add("/emb/wide.safetensors", save({"emb_params": torch.randn(2, 768)}))
    response = http.post("/fal-ai/lora", json=small(prompt=PROMPT, embeddings=[{"path": url}]))
    assert_embedding_422(response, ["body", "embeddings", 0, "path"], "embedding_incompatible")
    assert "768" in response.json()["detail"][0]["msg"] or "shape" in response.json()["detail"][0]["msg"]


def test_token_count_must_match_the_vectors(http, urls):
    response = http.post("/fal-ai/lora", json=small(prompt=PROMPT, embeddings=[{"path": urls["sd15-embedding"], "tokens": ["<only-one>"]}]))
    assert_embedding_422(response, ["body", "embeddings", 0, "path"], "embedding_incompatible")


@pytest.mark.parametrize("tokens", [[], ["has space"], ["<s0>", "<s0>"]])
def test_bad_tokens(http, urls, tokens):
    embeddings = [{"path": urls["sd15-embedding"], "tokens": tokens}]
    if tokens == ["<s0>", "<s0>"]:
        embeddings = [{"path": urls["sd15-embedding"], "tokens": ["<s0>", "<s1>"]}, {"path": urls["sd15-embedding"], "tokens": ["<s1>", "<s2>"]}]
    response = http.post("/fal-ai/lora", json=small(prompt=PROMPT, embeddings=embeddings))
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][:2] == ["body", "embeddings"]


def test_the_replica_keeps_serving_after_bad_embeddings(http):
    assert http.post("/fal-ai/lora", json=small()).status_code == 200
