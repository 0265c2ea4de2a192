"""One pipeline call serves many LoRA sets: each image gets its own adapters at its own scales.

These run the engine in-process (no Ray) on the tiny SD1.5 stand-in and its tiny LoRAs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deployments.common.jobs import ImageJob, ModelRef
from deployments.common.lora import ResolvedLora, is_mixable
from deployments.common.model_sources import ModelRegistry
from deployments.common.replica import split_by_lora_budget
from deployments.common.safety import SafetyChecker
from deployments.stable_diffusion import Adapters, load_sd_model, run_sd_batch
from deployments.tiny_models import ensure_tiny_model
from serve_app.config import AppConfig


def lora(name: str, scale: float) -> ResolvedLora:
    path = next(ensure_tiny_model(name).glob("*.safetensors"))
    return ResolvedLora(f"lora_{name}", path, scale, is_mixable(path))


@pytest.fixture(scope="module")
def model():
    resolved = __import__("asyncio").run(ModelRegistry(AppConfig()).resolve(ModelRef("runwayml/stable-diffusion-v1-5")))
    return load_sd_model(resolved, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def safety():
    return SafetyChecker("tiny:safety-checker", torch.device("cpu"), torch.float32)


def job(model, seed: int, **kw) -> ImageJob:
    base = dict(request_id="t", model=model.resolved.ref, mode="text-to-image", prompt="photo of a cat", negative_prompt="blurry",
                seed=seed, num_images=1, width=64, height=64, num_inference_steps=3, guidance_scale=5.0)
    base.update(kw)
    return ImageJob(**base)


def run(model, safety, jobs_and_loras, **kw) -> list[np.ndarray]:
    jobs = [job(model, seed, **kw) for seed, _ in jobs_and_loras]
    results = run_sd_batch(model, jobs, safety, [Adapters(loras, [], []) for _, loras in jobs_and_loras])
    return [image.astype(int) for result in results for image in result.images]


SETS = {
    "a": [lora("sd15-lora-a", 0.8)],
    "b+kohya": [lora("sd15-lora-b", 0.6), lora("sd15-lora-kohya", 1.0)],  # kohya also trains the text encoder
    "none": [],
}


@pytest.mark.parametrize("prompt_weighting", [False, True])
def test_each_image_of_a_mixed_batch_equals_its_request_alone(model, safety, prompt_weighting):
    kw = {"prompt_weighting": prompt_weighting}
    if prompt_weighting:  # past 77 tokens: the text encoder sees two windows per image
        kw["prompt"] = "(photo:1.3) of a cat, " + ", ".join(["red car"] * 40)
    alone = {name: run(model, safety, [(5, loras)], **kw)[0] for name, loras in SETS.items()}
    mixed = run(model, safety, [(5, SETS["a"]), (5, SETS["b+kohya"]), (5, SETS["none"])], **kw)
    for name, image in zip(SETS, mixed):
        assert np.abs(image - alone[name]).max() <= 1, name  # float summation order only
    assert np.abs(alone["a"] - alone["none"]).mean() > 1 and np.abs(alone["b+kohya"] - alone["a"]).mean() > 1


def test_the_mixer_computes_what_peft_computes(model, safety):
    """Reference: peft's own path (the set active for the whole call)."""
    loras = SETS["b+kohya"]
    model.adapters.activate(loras, [("loras", i, "path") for i in range(len(loras))])
    pipe = model.pipelines["text-to-image"]
    peft_image = pipe(prompt=["photo of a cat"], negative_prompt=["blurry"], num_inference_steps=3, guidance_scale=5.0,
                      height=64, width=64, generator=[torch.Generator("cpu").manual_seed(5)], output_type="np").images[0]
    through_peft = np.round(peft_image * 255).astype(int)
    through_mixer = run(model, safety, [(5, loras)])[0]
    assert np.abs(through_mixer - through_peft).max() <= 1
    assert np.abs(through_peft - run(model, safety, [(5, [])])[0]).mean() > 1


def test_scale_zero_is_exactly_no_lora(model, safety):
    base = run(model, safety, [(6, [])])[0]
    assert np.array_equal(run(model, safety, [(6, [lora("sd15-lora-a", 0.0)])])[0], base)  # folded scales
    beside = run(model, safety, [(6, []), (6, SETS["a"])])[0]  # the same call shape without the zero LoRA
    assert np.array_equal(run(model, safety, [(6, [lora("sd15-lora-a", 0.0)]), (6, SETS["a"])])[0], beside)


def test_images_of_one_job_share_its_loras(model, safety):
    mixed = run(model, safety, [(7, SETS["a"]), (7, [])], num_images=2)
    assert len(mixed) == 4
    alone = run(model, safety, [(7, SETS["a"])], num_images=2)
    assert np.abs(mixed[0] - alone[0]).max() <= 1 and np.abs(mixed[1] - alone[1]).max() <= 1


def test_a_batch_whose_loras_exceed_the_loaded_budget_runs_in_parts():
    items = [(None, None, Adapters([lora("sd15-lora-a", 1.0), lora("sd15-lora-b", 1.0)], [], [])),
             (None, None, Adapters([lora("sd15-lora-kohya", 1.0)], [], [])),
             (None, None, Adapters([lora("sd15-lora-a", 1.0)], [], []))]
    assert [len(run) for run in split_by_lora_budget(items, 2)] == [1, 2]
    assert [len(run) for run in split_by_lora_budget(items, 3)] == [3]
