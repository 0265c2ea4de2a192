"""Tiny stand-ins are real diffusers models; the production loading path opens them like hub repos."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from deployments.common.devices import select_device
from deployments.common.jobs import ImageJob, JobInputError, ModelRef, Tiling
from deployments.common.model_sources import ModelRegistry
from deployments.common.safety import SafetyChecker
from deployments.common.vae_decode import decode_latents
from deployments.stable_diffusion import load_sd_model, run_sd_batch
from deployments.tiny_models import build_sd15, directory_digest, ensure_tiny_model
from serve_app.config import AppConfig


def test_building_twice_writes_identical_files(tmp_path):
    build_sd15(tmp_path / "a")
    build_sd15(tmp_path / "b")
    assert directory_digest(tmp_path / "a") == directory_digest(tmp_path / "b")


@pytest.mark.parametrize("name, pipeline", [("sd15", "StableDiffusionPipeline"), ("sdxl", "StableDiffusionXLPipeline")])
def test_stand_ins_use_the_real_layout_and_8x_vae(name, pipeline):
    path = ensure_tiny_model(name)
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == pipeline
    vae = json.loads((path / "vae" / "config.json").read_text())
    assert 2 ** (len(vae["block_out_channels"]) - 1) == 8
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (path / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists()
    if name == "sdxl":
        assert {"text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"} <= set(index)


def _job(model: ModelRef, **kw) -> ImageJob:
    base = dict(request_id="t", model=model, mode="text-to-image", prompt="photo of a cat", negative_prompt="", seed=3,
                num_images=1, width=64, height=64, num_inference_steps=3, guidance_scale=5.0)
    base.update(kw)
    return ImageJob(**base)


def _add_to_hub(cache, repo_id: str, source) -> None:
    """Lay `source` out as the cached snapshot of `repo_id`, as huggingface_hub would."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(source, repo / "snapshots" / ("0" * 40), ignore=shutil.ignore_patterns(".complete"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)


@pytest.fixture()
def offline_hub(tmp_path, monkeypatch):
    """A Hugging Face cache, hub offline, holding `test-org/tiny-sdxl` and the SD1.5 configs that
    diffusers' single-file loader fetches (`stable-diffusion-v1-5/stable-diffusion-v1-5`)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    _add_to_hub(cache, "test-org/tiny-sdxl", ensure_tiny_model("sdxl"))
    _add_to_hub(cache, "stable-diffusion-v1-5/stable-diffusion-v1-5", ensure_tiny_model("sd15"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


async def test_production_profile_loads_a_hub_id_through_huggingface_hub(offline_hub):
    registry = ModelRegistry(AppConfig(profile="production"))
    resolved = await registry.resolve(ModelRef("test-org/tiny-sdxl"))
    # No "xl" hint needed from the request: the architecture comes from the repo's model_index.json.
    assert resolved.architecture == "sdxl" and not resolved.base.stand_in
    device, dtype = select_device()
    model = load_sd_model(resolved, device, dtype)
    result = run_sd_batch(model, [_job(resolved.ref)], SafetyChecker("tiny:safety-checker", device, dtype))[0]
    assert result.images[0].shape == (64, 64, 3)


async def test_production_profile_names_a_missing_hub_model(offline_hub):
    registry = ModelRegistry(AppConfig(profile="production"))
    with pytest.raises(JobInputError) as err:
        await registry.resolve(ModelRef("test-org/does-not-exist"))
    assert err.value.field == ("model_name",) and "test-org/does-not-exist" in err.value.msg


async def test_aliases_and_local_paths(tmp_path):
    local = str(ensure_tiny_model("sd15"))
    config = AppConfig(profile="production", models={"house-style": {"source": local}})
    registry = ModelRegistry(config)
    by_alias = await registry.resolve(ModelRef("house-style"))
    assert by_alias.base.location == local and by_alias.architecture == "sd"
    assert (await registry.resolve(ModelRef(local))).base.kind == "pretrained"
    with pytest.raises(JobInputError):
        await registry.resolve(ModelRef(str(tmp_path / "nothing-here")))


async def test_demo_profile_guesses_architecture_from_the_name():
    registry = ModelRegistry(AppConfig(profile="demo"))
    assert (await registry.resolve(ModelRef("stabilityai/stable-diffusion-xl-base-1.0"))).architecture == "sdxl"
    assert (await registry.resolve(ModelRef("runwayml/stable-diffusion-v1-5"))).architecture == "sd"
    assert (await registry.resolve(ModelRef("SG161222/Realistic_Vision_V2.0", architecture="sdxl"))).architecture == "sdxl"
    assert (await registry.resolve(ModelRef("https://example.com/ckpt/juggernautXL.safetensors"))).architecture == "sdxl"


def test_tiled_decode_matches_the_whole_decode_closely():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(ensure_tiny_model("sd15"), subfolder="vae")
    latents = torch.randn(1, 4, 32, 24, generator=torch.Generator().manual_seed(0))
    whole = decode_latents(vae, latents, Tiling())
    tiled = decode_latents(vae, latents, Tiling(width=128, height=128, stride_width=64, stride_height=64))
    assert tiled.shape == whole.shape == (1, 3, 256, 192)
    # Tiles see less context at their borders; blending keeps the result close, not identical.
    assert not torch.equal(tiled, whole)
    assert (tiled - whole).abs().mean() < 0.1 * whole.abs().mean() + 0.05


async def test_production_profile_loads_a_single_file_checkpoint_by_url(tmp_path, image_server, offline_hub):
    """A civitai-style checkpoint URL: downloaded once through the guard into the weights cache,
    opened with `from_single_file`. Same weights as the diffusers-layout stand-in: same image."""
    from deployments.common.weights_cache import LocalWeights, WeightsCache
    from serve_app.url_guard import NetworkPolicy
    from tests.conftest import IMAGE_HOST

    single = ensure_tiny_model("sd15-single-file") / "sd15.safetensors"
    url = image_server.add("/api/download/models/4242", single.read_bytes(), "application/octet-stream")
    policy = NetworkPolicy(allowed_networks=[f"{IMAGE_HOST}/32"])
    config = AppConfig(profile="production", network=policy.model_dump(mode="json"))
    registry = ModelRegistry(config, LocalWeights(WeightsCache(tmp_path / "weights", policy, 10**9, 10**8)))
    resolved = await registry.resolve(ModelRef(url))
    assert resolved.base.kind == "single_file" and resolved.architecture == "sd"
    await registry.resolve(ModelRef(url))
    assert image_server.hits["/api/download/models/4242"] == 1

    device, dtype = select_device()
    safety = SafetyChecker("tiny:safety-checker", device, dtype)
    from_file = run_sd_batch(load_sd_model(resolved, device, dtype), [_job(resolved.ref)], safety)[0]
    local = await registry.resolve(ModelRef(str(ensure_tiny_model("sd15"))))
    from_dir = run_sd_batch(load_sd_model(local, device, dtype), [_job(local.ref)], safety)[0]
    assert np.array_equal(from_file.images[0], from_dir.images[0])


async def test_a_url_that_is_not_a_checkpoint_is_a_422_naming_the_model(tmp_path, image_server, offline_hub):
    """Valid safetensors, but no model in it: diffusers' converter rejects it, as a 422 naming it."""
    from safetensors.torch import save

    from deployments.common.weights_cache import LocalWeights, WeightsCache
    from serve_app.url_guard import NetworkPolicy
    from tests.conftest import IMAGE_HOST

    url = image_server.add("/ckpt/tiny-sd15.safetensors", save({"w": torch.zeros(4)}), "application/octet-stream")
    config = AppConfig(profile="production", network={"allowed_networks": [f"{IMAGE_HOST}/32"]})
    cache = WeightsCache(tmp_path, NetworkPolicy(allowed_networks=[f"{IMAGE_HOST}/32"]), 10**8, 10**7)
    registry = ModelRegistry(config, LocalWeights(cache))
    resolved = await registry.resolve(ModelRef(url, architecture="sd"))
    assert resolved.base.kind == "single_file" and resolved.base.location.startswith(str(tmp_path))
    await registry.resolve(ModelRef(url, architecture="sd"))
    assert image_server.hits["/ckpt/tiny-sd15.safetensors"] == 1
    device, dtype = select_device()
    with pytest.raises(JobInputError) as err:
        load_sd_model(resolved, device, dtype)
    assert err.value.field == ("model_name",) and url in err.value.msg


async def test_the_three_modes_share_one_set_of_weights():
    registry = ModelRegistry(AppConfig(profile="demo"))
    device, dtype = select_device()
    model = load_sd_model(await registry.resolve(ModelRef("stabilityai/stable-diffusion-xl-base-1.0")), device, dtype)
    t2i, i2i, inpaint = (model.pipelines[m] for m in ("text-to-image", "image-to-image", "inpaint"))
    assert t2i.unet is i2i.unet is inpaint.unet and t2i.vae is i2i.vae is inpaint.vae
    assert t2i.text_encoder_2 is inpaint.text_encoder_2


async def test_sd15_clip_skip_matches_the_prompt_weighting_encoder_for_plain_prompts():
    """Two encoders of ours must agree where weighting changes nothing (both follow diffusers)."""
    from deployments.common.compat import sd15_clip_skip_embeddings
    from deployments.common.prompt_weighting import encode_prompts

    registry = ModelRegistry(AppConfig(profile="demo"))
    device, dtype = select_device()
    pipe = load_sd_model(await registry.resolve(ModelRef("runwayml/stable-diffusion-v1-5")), device, dtype).pipelines["text-to-image"]
    ours = sd15_clip_skip_embeddings(pipe, ["photo of a cat"], ["blurry"], clip_skip=1)
    weighted = encode_prompts(pipe, ["photo of a cat"], ["blurry"], clip_skip=1, do_classifier_free_guidance=True)
    assert torch.allclose(ours["prompt_embeds"], weighted["prompt_embeds"], atol=1e-5)
    assert torch.allclose(ours["negative_prompt_embeds"], weighted["negative_prompt_embeds"], atol=1e-5)


async def test_a_controlnet_named_by_hub_id_loads_with_the_repo_config(offline_hub, tmp_path):
    """`path: owner/name` fetches the repo's weights and config.json through huggingface_hub."""
    from deployments.common.controlnets import resolve_controlnet
    from deployments.common.jobs import ControlNetInput
    from deployments.common.weights_cache import LocalWeights, WeightsCache
    from deployments.stable_diffusion import Adapters

    _add_to_hub(offline_hub, "test-org/tiny-controlnet", ensure_tiny_model("sd15-controlnet"))
    config = AppConfig(profile="production")
    weights = LocalWeights(WeightsCache(tmp_path / "weights", config.network, 10**9, 10**9, 30, False))
    controlnet = await resolve_controlnet(weights, "test-org/tiny-controlnet", None, None, ("controlnets", 0, "path"))
    assert json.loads(controlnet.config)["_class_name"] == "ControlNetModel"
    device, dtype = select_device("float16")
    model = load_sd_model(await ModelRegistry(config).resolve(ModelRef(str(ensure_tiny_model("sd15")))), device, dtype)
    safety = SafetyChecker("tiny:safety-checker", device, dtype)
    control = ControlNetInput("test-org/tiny-controlnet", image=np.full((64, 64, 3), 255, np.uint8))
    job = _job(model.resolved.ref, controlnets=(control,))
    steered = run_sd_batch(model, [job], safety, [Adapters([], [], [controlnet])])[0].images[0]
    plain = run_sd_batch(model, [_job(model.resolved.ref)], safety)[0].images[0]
    assert np.abs(steered.astype(float) - plain).mean() > 0.5


async def test_an_ip_adapter_repo_gives_its_weights_and_its_image_encoder(offline_hub, tmp_path):
    """h94/IP-Adapter's layout: `models/<weight_name>` and `models/image_encoder/`, via huggingface_hub."""
    from deployments.common.weights_cache import LocalWeights, WeightsCache

    repo = tmp_path / "ip-repo"
    shutil.copytree(ensure_tiny_model("tiny-image-encoder"), repo / "models" / "image_encoder", ignore=shutil.ignore_patterns(".complete"))
    shutil.copy(ensure_tiny_model("sd15-ip-adapter") / "ip-adapter.safetensors", repo / "models" / "ip-adapter_sd15.safetensors")
    _add_to_hub(offline_hub, "test-org/tiny-ip-adapter", repo)
    config = AppConfig(profile="production")
    encoder = await ModelRegistry(config).image_encoder("test-org/tiny-ip-adapter", "models", None, None, ("ip_adapter", 0))
    assert (encoder / "config.json").is_file() and (encoder / "model.safetensors").is_file()
    weights = LocalWeights(WeightsCache(tmp_path / "weights", config.network, 10**9, 10**9, 30, False))
    file = await weights.get("test-org/tiny-ip-adapter/models/ip-adapter_sd15.safetensors", ("ip_adapter", 0, "path"))
    assert file.read_bytes() == (repo / "models" / "ip-adapter_sd15.safetensors").read_bytes()
    with pytest.raises(JobInputError) as missing:
        await ModelRegistry(config).image_encoder("https://example.com/ip.safetensors", None, None, None, ("ip_adapter", 0))
    assert missing.value.field == ("ip_adapter", 0, "image_encoder_path")
