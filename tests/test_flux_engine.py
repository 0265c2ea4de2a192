"""The FLUX engine: the tiny FLUX.1-dev stand-in, and `run_flux_batch` on it (in-process, no Ray).

FLUX shares its batching with SD (per-image seeds, decoding, the safety checker, the per-image
LoRA mixer), so the properties here are SD's: an image depends on its own seed, prompt and LoRAs,
never on the other images of its call.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors

from deployments.common.jobs import ImageJob, JobInputError, ModelRef, Tiling
from deployments.common.lora import ResolvedLora, is_mixable
from deployments.common.safety import SafetyChecker
from deployments.flux import load_flux_model, run_flux_batch
from deployments.tiny_flux import build_flux, build_flux_lora
from deployments.tiny_models import directory_digest, ensure_tiny_model
from tests.conftest import noise_image, square_mask


@pytest.fixture(scope="module")
def model():
    return load_flux_model(str(ensure_tiny_model("flux")), torch.device("cpu"), torch.float32, name="black-forest-labs/FLUX.1-dev")


@pytest.fixture(scope="module")
def safety():
    return SafetyChecker("tiny:safety-checker", torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> dict[str, ResolvedLora]:
    """The stand-in's LoRA, and a second one (another seed) to mix with it."""
    other = tmp_path_factory.mktemp("flux-lora-b")
    build_flux_lora(other, seed=91)
    files = {"a": ensure_tiny_model("flux-lora") / "pytorch_lora_weights.safetensors", "b": other / "pytorch_lora_weights.safetensors"}
    return {name: ResolvedLora(f"lora_{name}", path, 1.0, is_mixable(path)) for name, path in files.items()}


def scaled(lora: ResolvedLora, scale: float) -> ResolvedLora:
    return ResolvedLora(lora.name, lora.path, scale, lora.mixable)


def job(seed: int = 1, **kw) -> ImageJob:
    base = {"request_id": "t", "model": ModelRef("black-forest-labs/FLUX.1-dev"), "mode": "text-to-image", "prompt": "photo of a cat",
            "negative_prompt": "", "seed": seed, "num_images": 1, "width": 64, "height": 64, "num_inference_steps": 3, "guidance_scale": 3.5}
    return ImageJob(**{**base, **kw})


def images(model, safety, *jobs: ImageJob, loras: list[list[ResolvedLora]] | None = None) -> list[np.ndarray]:
    results = run_flux_batch(model, list(jobs), safety, loras)
    return [image.astype(int) for result in results for image in result.images]


def image(model, safety, loras: list[ResolvedLora] = (), **kw) -> np.ndarray:
    return images(model, safety, job(**kw), loras=[list(loras)])[0]


# --- the stand-in ---------------------------------------------------------------------------


def test_building_twice_writes_identical_files(tmp_path):
    build_flux(tmp_path / "a")
    build_flux(tmp_path / "b")
    assert directory_digest(tmp_path / "a") == directory_digest(tmp_path / "b")


def test_the_stand_in_has_flux_dev_layout():
    path = ensure_tiny_model("flux")
    config = {name: json.loads((path / name / "config.json").read_text()) for name in ("transformer", "vae", "text_encoder", "text_encoder_2")}
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert {"transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"} <= set(index)
    vae = config["vae"]
    assert vae["latent_channels"] == 16 and 2 ** (len(vae["block_out_channels"]) - 1) == 8
    assert (vae["scaling_factor"], vae["shift_factor"]) == (0.3611, 0.1159)
    transformer = config["transformer"]
    assert transformer["in_channels"] == 16 * 4 and transformer["guidance_embeds"]  # packed 2x2; guidance-distilled
    assert transformer["joint_attention_dim"] == config["text_encoder_2"]["d_model"]  # T5 tokens
    assert transformer["pooled_projection_dim"] == config["text_encoder"]["hidden_size"]  # CLIP's pooled output
    assert sum(transformer["axes_dims_rope"]) == transformer["attention_head_dim"]
    assert json.loads((path / "scheduler" / "scheduler_config.json").read_text())["use_dynamic_shifting"]


def test_the_t5_tokenizer_has_t5s_special_tokens(model):
    tokenizer = model.pipelines["text-to-image"].tokenizer_2
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer("photo of a zebra", padding="max_length", max_length=12).input_ids
    assert ids[-1] == 0 and 1 in ids and 2 not in ids  # unknown words fall back to letters, then </s>, then padding


# --- run_flux_batch -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["text-to-image", "image-to-image", "inpaint"])
def test_each_mode_returns_images_of_the_asked_size(model, safety, mode):
    kw = {"mode": mode, "width": 128, "height": 64, "num_images": 2}
    if mode != "text-to-image":
        kw.update(image=noise_image(128, 64), strength=0.8)
    if mode == "inpaint":
        kw["mask"] = square_mask(128, 64)
    (result,) = run_flux_batch(model, [job(**kw)], safety, [[]])
    assert [im.shape for im in result.images] == [(64, 128, 3)] * 2
    assert result.has_nsfw_concepts == [False, False] and result.batch_size == 1


def test_the_seed_decides_the_image(model, safety):
    first = image(model, safety, seed=5)
    assert np.array_equal(first, image(model, safety, seed=5))
    assert np.abs(first - image(model, safety, seed=6)).mean() > 5
    two = images(model, safety, job(seed=5, num_images=2))
    assert np.array_equal(two[0], first) and np.abs(two[1] - image(model, safety, seed=6)).max() <= 1  # image i: seed + i


@pytest.mark.parametrize("mode", ["text-to-image", "image-to-image", "inpaint"])
def test_an_image_is_the_same_alone_or_in_a_batch(model, safety, mode):
    def inputs(k: int) -> dict:
        """Each job its own input image and mask."""
        if mode == "text-to-image":
            return {}
        mask = square_mask(64, 64) if k % 2 else 255 - square_mask(64, 64)
        # 4 steps at strength 0.5 skip 2; diffusers rounds the skipped steps down (3 at 0.7 skip none).
        extra = {"mask": mask} if mode == "inpaint" else {}
        return {"mode": mode, "image": noise_image(64, 64, seed=k), "strength": 0.5, "num_inference_steps": 4, **extra}

    jobs = [job(seed=7, **inputs(0)), job(seed=8, prompt="red car at night", **inputs(1)), job(seed=9, num_images=2, **inputs(2))]
    batched = images(model, safety, *jobs)
    alone = [im for j in jobs for im in images(model, safety, j)]
    assert all(np.abs(b - a).max() <= 1 for b, a in zip(batched, alone, strict=True))  # float summation order only
    if mode != "text-to-image":  # the input image steers the result
        assert np.abs(alone[0] - images(model, safety, job(seed=7, **{**inputs(0), "image": noise_image(64, 64, seed=99)}))[0]).mean() > 1


def test_guidance_and_prompt_change_the_image(model, safety):
    base = image(model, safety)
    assert not np.array_equal(base, image(model, safety, guidance_scale=5.0))
    assert not np.array_equal(base, image(model, safety, prompt="red car at night"))


def test_a_lora_changes_the_image_and_scale_zero_is_none(model, safety, loras):
    base = image(model, safety)
    assert np.abs(image(model, safety, [loras["a"]]) - base).mean() > 2
    assert np.array_equal(image(model, safety, [scaled(loras["a"], 0.0)]), base)
    assert np.array_equal(image(model, safety), base)  # the adapter does not linger


def test_jobs_with_different_loras_in_one_call_each_equal_their_solo_run(model, safety, loras):
    sets = {"a": [loras["a"]], "b at 0.6": [scaled(loras["b"], 0.6)], "a+b": [loras["a"], loras["b"]], "none": []}
    alone = {name: image(model, safety, chosen, seed=3) for name, chosen in sets.items()}
    mixed = images(model, safety, *[job(seed=3) for _ in sets], loras=list(sets.values()))
    for name, im in zip(sets, mixed, strict=True):
        assert np.abs(im - alone[name]).max() <= 1, name
    assert min(np.abs(alone[x] - alone[y]).mean() for x in sets for y in sets if x < y) > 1


def test_the_mixer_computes_what_peft_computes(model, safety, loras):
    """Reference: peft's own LoRA path, one set active for the whole pipeline call."""
    chosen = [loras["a"], scaled(loras["b"], 0.6)]
    model.adapters.activate(chosen, [("loras", i, "path") for i in range(len(chosen))])
    pipe = model.pipelines["text-to-image"]
    reference = pipe(prompt=["photo of a cat"], num_inference_steps=3, guidance_scale=3.5, height=64, width=64,
                     generator=[torch.Generator("cpu").manual_seed(4)], output_type="np").images[0]
    assert np.abs(image(model, safety, chosen, seed=4) - np.round(reference * 255)).max() <= 1


def test_the_safety_checker_runs_on_the_images_that_ask_for_it(model, safety):
    checked, unchecked = run_flux_batch(model, [job(seed=1, num_images=3, enable_safety_checker=True), job(seed=1, num_images=3)], safety)
    assert len(checked.has_nsfw_concepts) == 3 and unchecked.has_nsfw_concepts == [False] * 3
    for flagged, im in zip(checked.has_nsfw_concepts, checked.images):
        assert not flagged or not im.any()  # flagged images come back black


def test_vae_tiling_decodes_the_16_channel_latents_to_the_same_size(model, safety):
    tiled = image(model, safety, width=128, height=128, tiling=Tiling(width=64, height=64, stride_width=32, stride_height=32))
    whole = image(model, safety, width=128, height=128)
    assert tiled.shape == whole.shape == (128, 128, 3)
    assert np.abs(tiled - whole).mean() < 20  # blended tiles of a random VAE: close, not equal


def test_debug_latents_are_unpacked_to_the_vaes_layout(model, safety):
    (result,) = run_flux_batch(model, [job(width=128, height=64, num_images=2, debug_latents=True, debug_per_pass_latents=True)], safety)
    assert load_safetensors(result.debug_latents)["latents"].shape == (2, 16, 8, 16)
    assert load_safetensors(result.debug_per_pass_latents)["latents"].shape == (3, 2, 16, 8, 16)


def test_sizes_flux_cannot_make_are_refused_with_a_size_it_can(model, safety):
    with pytest.raises(JobInputError) as err:
        run_flux_batch(model, [job(width=72, height=64)], safety)
    assert err.value.field == ("image_size",) and "try 64x64 or 80x64" in err.value.msg


def test_settings_the_pipeline_rejects_are_the_requests_fault(model, safety):
    with pytest.raises(JobInputError) as err:
        run_flux_batch(model, [job(mode="image-to-image", image=noise_image(64, 64), strength=1.5)], safety)
    assert err.value.type == "invalid_settings" and "strength" in err.value.msg


def test_half_precision_means_bfloat16_in_all_three_pipelines():
    """FLUX overflows float16; and the image-to-image and inpainting pipelines share its weights
    without casting them."""
    loaded = load_flux_model(str(ensure_tiny_model("flux")), torch.device("cpu"), torch.float16)
    for pipe in loaded.pipelines.values():
        assert {pipe.transformer.dtype, pipe.text_encoder.dtype, pipe.text_encoder_2.dtype, pipe.vae.dtype} == {torch.bfloat16}
    assert len({id(pipe.transformer) for pipe in loaded.pipelines.values()}) == 1


def test_a_model_that_does_not_load_names_the_users_model(tmp_path):
    with pytest.raises(JobInputError) as err:
        load_flux_model(str(tmp_path / "missing"), torch.device("cpu"), torch.float32, name="someone/flux-finetune")
    assert err.value.field == ("model_name",) and err.value.type == "model_load_error" and "someone/flux-finetune" in err.value.msg
