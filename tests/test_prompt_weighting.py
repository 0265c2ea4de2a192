"""How `prompt_weighting: true` reads prompts and turns them into embeddings for SD1.5 and SDXL.

The parser follows AUTOMATIC1111's attention grammar; the encoder feeds the result to diffusers
pipelines as `prompt_embeds` & co. Without weights and within 77 tokens it must give exactly what
diffusers' own `encode_prompt` gives, so switching the option on changes nothing for plain prompts.
Everything runs on the tiny random-weight stand-ins, whose tokenizer spends about one token per
character, so a 100-character prompt is already past CLIP's 77 tokens.
"""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from deployments.common.prompt_weighting import BREAK, encode_prompts, parse_weighted_prompt
from deployments.tiny_models import ensure_tiny_model

SOFTER = 1 / 1.1
# Words outside the stand-in vocabulary cost a token per character: this is well over 77 tokens.
LONG_PROMPT = "a queen wearing emerald jewellery, intricate gold embroidery, soft window light, " * 2
NEGATIVE = "blurry, low quality"


# --- The grammar ------------------------------------------------------------------------------


def test_explicit_weight_and_square_brackets():
    assert parse_weighted_prompt("a (red:1.5) cat, [blurry]") == [
        ("a ", 1.0),
        ("red", 1.5),
        (" cat, ", 1.0),
        ("blurry", SOFTER),
    ]


def test_round_brackets_multiply_by_1_1_and_nesting_multiplies():
    assert parse_weighted_prompt("(cat)") == [("cat", 1.1)]
    assert parse_weighted_prompt("((cat))") == [("cat", pytest.approx(1.21))]
    assert parse_weighted_prompt("[[cat]]") == [("cat", pytest.approx(SOFTER**2))]
    assert parse_weighted_prompt("((cat:1.5) dog)") == [("cat", pytest.approx(1.65)), (" dog", 1.1)]
    assert parse_weighted_prompt("[(cat:2)]") == [("cat", pytest.approx(2 * SOFTER))]


def test_a_colon_without_a_number_is_text():
    assert parse_weighted_prompt("(time: noon)") == [("time: noon", 1.1)]
    assert parse_weighted_prompt("[cat:1.5]") == [("cat:1.5", SOFTER)]


def test_escaped_brackets_are_literal_but_still_weighted_by_their_group():
    assert parse_weighted_prompt(r"\(cat\) \[dog\]") == [("(cat) [dog]", 1.0)]
    assert parse_weighted_prompt(r"(smile \(happy\))") == [("smile (happy)", 1.1)]


def test_unbalanced_brackets_are_lenient():
    # An unclosed group still weights everything after it ...
    assert parse_weighted_prompt("a (red cat") == [("a ", 1.0), ("red cat", 1.1)]
    assert parse_weighted_prompt("a [red cat") == [("a ", 1.0), ("red cat", SOFTER)]
    # ... while a closing bracket or weight with nothing to close is plain text.
    assert parse_weighted_prompt("a) red] cat") == [("a) red] cat", 1.0)]
    assert parse_weighted_prompt("cat:1.5)") == [("cat:1.5)", 1.0)]


def test_equal_weights_merge_and_empty_prompt_is_one_empty_run():
    assert parse_weighted_prompt("(a)(b) c") == [("ab", 1.1), (" c", 1.0)]
    assert parse_weighted_prompt("(a:1.0) b") == [("a b", 1.0)]
    assert parse_weighted_prompt("") == [("", 1.0)]


def test_break_is_a_marker_only_as_an_upper_case_word():
    assert parse_weighted_prompt("a cat BREAK a dog") == [("a cat", 1.0), BREAK, ("a dog", 1.0)]
    assert parse_weighted_prompt("(cat BREAK dog)") == [("cat", 1.1), BREAK, ("dog", 1.1)]
    assert parse_weighted_prompt("a break, BREAKFAST") == [("a break, BREAKFAST", 1.0)]


# --- Encoding -----------------------------------------------------------------------------------

PIPELINE_CLASSES = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


@pytest.fixture(scope="module", params=sorted(PIPELINE_CLASSES))
def pipe(request):
    pipe = PIPELINE_CLASSES[request.param].from_pretrained(ensure_tiny_model(request.param))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def is_sdxl(pipe) -> bool:
    return isinstance(pipe, StableDiffusionXLPipeline)


def diffusers_encode(pipe, prompt: str, negative: str, clip_skip: int | None) -> dict[str, torch.Tensor]:
    """diffusers' own `encode_prompt`, returned under the same keys as `encode_prompts`.

    An empty negative is passed as None: that is what "no negative prompt" means to diffusers.
    diffusers 0.42.1's SD1.5 clip_skip path still reads `text_encoder.text_model.final_layer_norm`,
    which transformers 5 flattened away; a stand-in attribute lets it run for the comparison.
    """
    encoder = pipe.text_encoder
    if not hasattr(encoder, "text_model"):
        encoder.text_model = types.SimpleNamespace(final_layer_norm=encoder.final_layer_norm)
    try:
        out = pipe.encode_prompt(
            prompt=prompt,
            device=torch.device("cpu"),
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=negative or None,
            clip_skip=clip_skip,
        )
    finally:
        if isinstance(getattr(encoder, "text_model", None), types.SimpleNamespace):
            del encoder.text_model
    keys = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    return dict(zip(keys, out))


def run(pipe, **kwargs) -> np.ndarray:
    """A two-step 64x64 image with a fixed seed."""
    generator = torch.Generator().manual_seed(0)
    return pipe(num_inference_steps=2, height=64, width=64, output_type="np", generator=generator, **kwargs).images


@pytest.mark.parametrize("clip_skip", [None, 1])
@pytest.mark.parametrize("negative", ["", NEGATIVE])
def test_without_weights_embeddings_equal_diffusers(pipe, clip_skip, negative):
    ours = encode_prompts(pipe, ["a red cat"], [negative], clip_skip, do_classifier_free_guidance=True)
    theirs = diffusers_encode(pipe, "a red cat", negative, clip_skip)

    expected_keys = set(theirs) if is_sdxl(pipe) else {"prompt_embeds", "negative_prompt_embeds"}
    assert set(ours) == expected_keys
    for key in expected_keys:
        assert ours[key].shape == theirs[key].shape, key
        assert torch.allclose(ours[key], theirs[key], atol=1e-5), key


def test_clip_skip_like_diffusers_changes_the_prompt_but_not_the_negative(pipe):
    plain = encode_prompts(pipe, ["a red cat"], [NEGATIVE], None, do_classifier_free_guidance=True)
    skipped = encode_prompts(pipe, ["a red cat"], [NEGATIVE], 1, do_classifier_free_guidance=True)
    zero = encode_prompts(pipe, ["a red cat"], [NEGATIVE], 0, do_classifier_free_guidance=True)

    assert not torch.allclose(plain["prompt_embeds"], skipped["prompt_embeds"])
    assert torch.equal(plain["negative_prompt_embeds"], skipped["negative_prompt_embeds"])
    assert torch.equal(plain["prompt_embeds"], zero["prompt_embeds"])  # 0 means no skip


def test_an_empty_negative_is_zeros_for_sdxl_and_the_encoding_of_empty_text_for_sd15(pipe):
    kwargs = encode_prompts(pipe, ["a cat", "a dog"], ["", NEGATIVE], None, do_classifier_free_guidance=True)
    empty_negative, real_negative = kwargs["negative_prompt_embeds"]

    assert real_negative.any()
    if is_sdxl(pipe):  # the pipeline's force_zeros_for_empty_prompt, per item
        assert pipe.config.force_zeros_for_empty_prompt
        assert not empty_negative.any()
        assert not kwargs["negative_pooled_prompt_embeds"][0].any()
        assert kwargs["negative_pooled_prompt_embeds"][1].any()
    else:
        assert torch.allclose(empty_negative, diffusers_encode(pipe, "a cat", "", None)["negative_prompt_embeds"][0])


def test_without_guidance_only_the_prompt_is_encoded(pipe):
    kwargs = encode_prompts(pipe, ["a cat"], [], None, do_classifier_free_guidance=False)

    assert set(kwargs) == ({"prompt_embeds", "pooled_prompt_embeds"} if is_sdxl(pipe) else {"prompt_embeds"})


def token_position(pipe, prompt: str, word: str) -> int:
    """Where `word`'s (single) token sits in the framed sequence of `prompt` (BOS is position 0)."""
    ids = pipe.tokenizer(prompt).input_ids
    (word_id,) = pipe.tokenizer(word, add_special_tokens=False).input_ids
    return ids.index(word_id)


def test_a_weight_scales_its_own_token_and_leaves_the_rest_nearly_alone(pipe):
    plain = encode_prompts(pipe, ["a red cat"], [], None, do_classifier_free_guidance=False)["prompt_embeds"][0]
    weighted = encode_prompts(pipe, ["a (red:1.5) cat"], [], None, do_classifier_free_guidance=False)
    weighted = weighted["prompt_embeds"][0]
    red = token_position(pipe, "a red cat", "red")

    change = (weighted - plain).norm(dim=-1) / plain.norm(dim=-1)
    others = torch.cat([change[:red], change[red + 1 :]])
    assert change[red] == pytest.approx(0.5, abs=0.02)  # scaled by 1.5, up to the mean restoration
    assert others.max() < 0.02  # the mean restoration nudges every token a little, at most


def test_weight_one_is_the_same_as_no_brackets(pipe):
    plain = encode_prompts(pipe, ["a red cat"], [NEGATIVE], None, do_classifier_free_guidance=True)
    neutral = encode_prompts(pipe, ["a (red:1.0) cat"], [NEGATIVE], None, do_classifier_free_guidance=True)

    for key in plain:
        assert torch.equal(plain[key], neutral[key]), key


def windows_needed(pipe, prompt: str) -> int:
    """How many 77-position windows `prompt` takes: 75 tokens each, plus BOS and EOS."""
    return math.ceil((len(pipe.tokenizer(prompt).input_ids) - 2) / 75)


def test_a_long_prompt_keeps_all_its_tokens_and_runs_end_to_end(pipe):
    windows = windows_needed(pipe, LONG_PROMPT)
    assert windows >= 2
    kwargs = encode_prompts(pipe, [LONG_PROMPT], [NEGATIVE], None, do_classifier_free_guidance=True)

    assert kwargs["prompt_embeds"].shape[1] == windows * 77
    assert kwargs["negative_prompt_embeds"].shape == kwargs["prompt_embeds"].shape
    image = run(pipe, **kwargs)
    truncated = run(pipe, prompt=LONG_PROMPT, negative_prompt=NEGATIVE)  # diffusers cuts at 77 tokens
    assert image.shape == truncated.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all()
    assert np.abs(image - truncated).max() > 1e-4


def test_break_starts_a_new_window(pipe):
    kwargs = encode_prompts(pipe, ["a cat BREAK a dog"], [""], None, do_classifier_free_guidance=True)
    joined = encode_prompts(pipe, ["a cat a dog"], [""], None, do_classifier_free_guidance=True)

    assert kwargs["prompt_embeds"].shape[1] == 2 * 77
    assert joined["prompt_embeds"].shape[1] == 77


def test_a_batch_shares_one_length_padded_with_empty_windows(pipe):
    short, long_ = "a red cat", LONG_PROMPT
    kwargs = encode_prompts(pipe, [short, "a dog"], [NEGATIVE, long_], None, do_classifier_free_guidance=True)
    alone = encode_prompts(pipe, [short], [NEGATIVE], None, do_classifier_free_guidance=True)
    empty = encode_prompts(pipe, [""], [NEGATIVE], None, do_classifier_free_guidance=True)

    # The long negative sets the length for every item, positive and negative alike.
    windows = windows_needed(pipe, long_)
    assert kwargs["prompt_embeds"].shape[:2] == kwargs["negative_prompt_embeds"].shape[:2] == (2, windows * 77)
    # A short item is its own encoding followed by encodings of "".
    first = kwargs["prompt_embeds"][0].split(77)
    assert torch.allclose(first[0], alone["prompt_embeds"][0], atol=1e-5)
    for padding in first[1:]:
        assert torch.allclose(padding, empty["prompt_embeds"][0], atol=1e-5)
    images = run(pipe, **kwargs)
    assert images.shape == (2, 64, 64, 3)
    # The pipeline repeats embeddings for several images per prompt by itself.
    assert run(pipe, num_images_per_prompt=2, **kwargs).shape == (4, 64, 64, 3)


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_img2img_and_inpaint_pipelines_accept_the_same_kwargs(pipe, task):
    image = Image.fromarray(np.full((64, 64, 3), 128, dtype=np.uint8))
    if task == "img2img":
        derived = AutoPipelineForImage2Image.from_pipe(pipe)
        inputs = {"image": image, "strength": 0.9}
    else:
        derived = AutoPipelineForInpainting.from_pipe(pipe)
        mask = Image.fromarray(np.pad(np.full((32, 32), 255, dtype=np.uint8), 16))
        inputs = {"image": image, "mask_image": mask, "strength": 0.9}
    derived.set_progress_bar_config(disable=True)
    kwargs = encode_prompts(derived, [LONG_PROMPT], [NEGATIVE], 1, do_classifier_free_guidance=True)

    images = run(derived, **inputs, **kwargs)
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()
