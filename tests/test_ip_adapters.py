"""IP-Adapters on the tiny SD1.5 and SDXL stand-ins: what a reference image does, per batch item.

No Ray: `LoadedIPAdapters` and `ip_adapter_kwargs` are driven the way the deployment drives
them, one prompt per item, one seeded CPU generator per item, 64x64, three steps.

"Batch-invariant" here means equal to 1e-4: the base pipeline itself differs by ~1e-6 between
batch sizes on a CPU (matmul blocking depends on the batch), while an item attending to a
neighbour's reference moves its latents by ~1e-2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from deployments.common.ip_adapters import LoadedIPAdapters, ResolvedIPAdapter, ip_adapter_kwargs
from deployments.common.jobs import JobInputError
from deployments.tiny_models import ensure_tiny_model

SIZE = 64
GUIDANCE = 5.0


def reference(seed: int) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((SIZE, SIZE, 3)) * 255).astype(np.uint8))


def adapter(architecture: str = "sd15", scale: float = 1.0, scale_json: dict | None = None, **overrides) -> ResolvedIPAdapter:
    fields = dict(
        name=f"{architecture}-ip",
        weights=ensure_tiny_model(f"{architecture}-ip-adapter") / "ip-adapter.safetensors",
        encoder=ensure_tiny_model("tiny-image-encoder"),
        scale=scale,
        scale_json=scale_json,
    )
    return ResolvedIPAdapter(**{**fields, **overrides})


def load(architecture: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if architecture == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(ensure_tiny_model("sdxl"))
    else:
        pipe = StableDiffusionPipeline.from_pretrained(ensure_tiny_model("sd15"), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd15():
    return load("sd15")


@pytest.fixture(scope="module")
def sdxl():
    return load("sdxl")


@pytest.fixture
def ip(sd15):
    loaded = LoadedIPAdapters(sd15)
    yield loaded
    loaded.activate([], [])


def generate(pipe, seeds, ip: LoadedIPAdapters | None = None, refs=None, masks=None, call=None, steps=3, **extra) -> np.ndarray:
    """One batched call as the deployment makes it; `refs[item]` is the item's image per adapter."""
    kwargs = ip_adapter_kwargs(call or pipe, ip, [[[r] for r in per_item] for per_item in refs], masks, GUIDANCE, SIZE, SIZE) if ip else {}
    out = (call or pipe)(
        prompt=["photo of a cat"] * len(seeds),
        negative_prompt=["blurry"] * len(seeds),
        num_inference_steps=steps,
        guidance_scale=GUIDANCE,
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        output_type="latent",
        **({"height": SIZE, "width": SIZE} if call is None else {}),
        **kwargs,
        **extra,
    )
    return out.images.numpy()


def test_the_reference_image_steers_the_image_and_stays_deterministic(sd15, ip):
    base = generate(sd15, [1])
    ip.activate([adapter()], [("ip_adapter", 0)])
    steered = generate(sd15, [1], ip, [[reference(10)]])
    assert np.abs(steered - base).mean() > 0.05
    assert not np.allclose(steered, generate(sd15, [1], ip, [[reference(11)]]), atol=1e-2)  # another reference, another image
    assert np.array_equal(steered, generate(sd15, [1], ip, [[reference(10)]]))


def test_scale_zero_is_exactly_no_adapter(sd15, ip):
    base = generate(sd15, [2, 3])
    ip.activate([adapter(scale=0.0)], [("ip_adapter", 0)])
    # diffusers skips an adapter whose scale is 0, and the text attention is computed as before.
    assert np.array_equal(generate(sd15, [2, 3], ip, [[reference(10)], [reference(11)]]), base)


def test_each_item_of_a_batch_gets_its_own_reference(sd15, ip):
    ip.activate([adapter()], [("ip_adapter", 0)])
    batch = generate(sd15, [4, 5], ip, [[reference(10)], [reference(11)]])
    alone = [generate(sd15, [4], ip, [[reference(10)]])[0], generate(sd15, [5], ip, [[reference(11)]])[0]]
    for item, single in zip(batch, alone):
        np.testing.assert_allclose(item, single, atol=1e-4)
    # Swapping the references swaps what each item becomes.
    swapped = generate(sd15, [4], ip, [[reference(11)]])[0]
    assert np.abs(swapped - alone[0]).max() > 1e-2


def test_a_mask_restricts_where_the_adapter_acts(sd15, ip):
    base = generate(sd15, [6])
    ip.activate([adapter()], [("ip_adapter", 0)])
    black = Image.new("L", (SIZE, SIZE), 0)
    # Black everywhere: the adapter adds exactly nothing.
    assert np.array_equal(generate(sd15, [6], ip, [[reference(10)]], masks=[[black]]), base)
    # White everywhere (one reference image): the same as no mask.
    white = Image.new("L", (SIZE, SIZE), 255)
    assert np.array_equal(generate(sd15, [6], ip, [[reference(10)]], masks=[[white]]), generate(sd15, [6], ip, [[reference(10)]]))

    # Left half white: at the first attention layer the image tokens reach only the left half.
    # (The toy UNet attends at 1/32 of the image, so later layers spread the change everywhere.)
    left = np.zeros((SIZE, SIZE), np.uint8)
    left[:, : SIZE // 2] = 255
    first = sd15.unet.down_blocks[2].attentions[0].transformer_blocks[0].attn2
    outputs: list[torch.Tensor] = []
    hook = first.register_forward_hook(lambda module, args, out: outputs.append(out.detach().clone()))
    try:
        generate(sd15, [6], ip, [[reference(10)]], masks=[[black]], steps=1)
        generate(sd15, [6], ip, [[reference(10)]], masks=[[Image.fromarray(left)]], steps=1)
    finally:
        hook.remove()
    untouched, masked = outputs[0], outputs[1]  # (2 for guidance, 2x2 tokens, channels)
    changed = (masked - untouched).abs().amax(dim=(0, 2)).reshape(2, 2)  # rows x columns of tokens
    assert torch.all(changed[:, 0] > 1e-3) and torch.all(changed[:, 1] == 0)


def test_items_without_a_mask_keep_their_image_beside_masked_ones(sd15, ip):
    ip.activate([adapter()], [("ip_adapter", 0)])
    alone = generate(sd15, [7], ip, [[reference(11)]])[0]
    black = Image.new("L", (SIZE, SIZE), 0)
    batch = generate(sd15, [8, 7], ip, [[reference(10)], [reference(11)]], masks=[[black], [None]])
    np.testing.assert_allclose(batch[1], alone, atol=1e-4)


def test_unloading_leaves_the_unet_exactly_as_it_was(sd15, ip):
    before = generate(sd15, [9, 10])
    processors = {name: type(p) for name, p in sd15.unet.attn_processors.items()}
    ip.activate([adapter()], [("ip_adapter", 0)])
    generate(sd15, [9, 10], ip, [[reference(10)], [reference(11)]])
    ip.activate([], [])
    assert np.array_equal(generate(sd15, [9, 10]), before)
    assert {name: type(p) for name, p in sd15.unet.attn_processors.items()} == processors
    assert sd15.unet.encoder_hid_proj is None and sd15.unet.config.encoder_hid_dim_type is None
    assert sd15.feature_extractor is None and sd15.image_encoder is None


def test_the_same_set_is_rescaled_not_reloaded(sd15, ip, monkeypatch):
    loads = []
    original = sd15.load_ip_adapter
    monkeypatch.setattr(sd15, "load_ip_adapter", lambda *a, **k: (loads.append(1), original(*a, **k))[1])
    ip.activate([adapter(scale=1.0)], [("ip_adapter", 0)])
    strong = generate(sd15, [11], ip, [[reference(10)]])
    ip.activate([adapter(scale=0.3)], [("ip_adapter", 0)])
    weak = generate(sd15, [11], ip, [[reference(10)]])
    assert len(loads) == 1
    assert not np.array_equal(strong, weak)


def test_per_block_scales_choose_where_the_adapter_acts(sd15, ip):
    base = generate(sd15, [12])
    ip.activate([adapter()], [("ip_adapter", 0)])
    everywhere = generate(sd15, [12], ip, [[reference(10)]])
    # Only the down block's attention (blocks not named get 0, as in diffusers/InstantStyle).
    ip.activate([adapter(scale_json={"down": {"block_2": [1.0]}})], [("ip_adapter", 0)])
    down_only = generate(sd15, [12], ip, [[reference(10)]])
    assert not np.array_equal(down_only, base) and not np.array_equal(down_only, everywhere)
    ip.activate([adapter(scale_json={"down": {"block_2": [0.0]}})], [("ip_adapter", 0)])
    assert np.array_equal(generate(sd15, [12], ip, [[reference(10)]]), base)


def test_a_scale_json_that_names_layers_wrongly_is_refused(sd15, ip):
    with pytest.raises(JobInputError) as error:
        ip.activate([adapter(scale_json={"up": {"block_0": [1.0, 1.0, 1.0]}})], [("ip_adapter", 0)])  # up block 0 has 2 layers
    assert error.value.field == ("ip_adapter", 0, "scale_json") and error.value.type == "ip_adapter_scale_invalid"
    assert "block_0" in error.value.msg
    assert sd15.unet.encoder_hid_proj is None  # nothing stays loaded
    for wrong in ({"down": {"block_2": ["strong"]}}, {"middle": 1.0}):
        with pytest.raises(JobInputError) as error:
            ip.activate([adapter(scale_json=wrong)], [("ip_adapter", 0)])
        assert error.value.field == ("ip_adapter", 0, "scale_json")


def test_an_sdxl_adapter_on_sd15_is_refused_and_the_pipeline_stays_as_it_was(sd15, ip):
    ip.activate([adapter()], [("ip_adapter", 0)])
    steered = generate(sd15, [13], ip, [[reference(10)]])
    fields = [("ip_adapter", 0), ("ip_adapter", 1)]
    with pytest.raises(JobInputError) as error:
        ip.activate([adapter(), adapter("sdxl")], fields)
    assert error.value.field == ("ip_adapter", 1, "path")
    assert error.value.type == "ip_adapter_incompatible"
    assert "other architecture" in error.value.msg
    # The check runs before the UNet is touched: the previous adapter is still there, unchanged.
    assert np.array_equal(generate(sd15, [13], ip, [[reference(10)]]), steered)


def test_an_image_encoder_of_the_wrong_width_is_refused(sd15, ip, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32, patch_size=8, projection_dim=16)
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(JobInputError) as error:
        ip.activate([adapter(encoder=tmp_path)], [("ip_adapter", 0)])
    assert error.value.field == ("ip_adapter", 0, "image_encoder_path")
    assert "16-wide" in error.value.msg and "32-wide" in error.value.msg


def test_a_file_that_is_not_an_ip_adapter_is_refused(sd15, ip):
    lora = next(ensure_tiny_model("sd15-lora-a").glob("*.safetensors"))
    with pytest.raises(JobInputError) as error:
        ip.activate([adapter(name="lora", weights=lora)], [("ip_adapter", 0)])
    assert error.value.field == ("ip_adapter", 0, "path") and error.value.type == "ip_adapter_invalid"


def test_two_adapters_each_with_their_own_images(sd15, ip):
    ip.activate([adapter()], [("ip_adapter", 0)])
    one = generate(sd15, [14], ip, [[reference(10)]])
    two_adapters = [adapter(), adapter(name="second", scale=0.5)]
    ip.activate(two_adapters, [("ip_adapter", 0), ("ip_adapter", 1)])
    both = generate(sd15, [14, 15], ip, [[reference(10), reference(11)], [reference(12), reference(13)]])
    assert not np.allclose(both[0], one[0], atol=1e-2)
    np.testing.assert_allclose(both[1], generate(sd15, [15], ip, [[reference(12), reference(13)]])[0], atol=1e-4)


def test_sdxl_works_the_same_way(sdxl):
    ip = LoadedIPAdapters(sdxl)
    base = generate(sdxl, [16, 17])
    ip.activate([adapter("sdxl")], [("ip_adapter", 0)])
    batch = generate(sdxl, [16, 17], ip, [[reference(10)], [reference(11)]])
    assert np.abs(batch - base).mean() > 0.05
    np.testing.assert_allclose(batch[1], generate(sdxl, [17], ip, [[reference(11)]])[0], atol=1e-4)
    with pytest.raises(JobInputError) as error:
        ip.activate([adapter("sd15")], [("ip_adapter", 0)])
    assert error.value.field == ("ip_adapter", 0, "path")
    ip.activate([], [])
    assert np.array_equal(generate(sdxl, [16, 17]), base)


def test_img2img_made_with_from_pipe_shares_the_adapter(sd15, ip):
    from diffusers import AutoPipelineForImage2Image

    img2img = AutoPipelineForImage2Image.from_pipe(sd15)
    img2img.set_progress_bar_config(disable=True)
    source = [reference(20), reference(21)]
    base = generate(sd15, [18, 19], call=img2img, image=source, strength=0.8)
    ip.activate([adapter()], [("ip_adapter", 0)])  # loaded through the text-to-image pipeline
    batch = generate(sd15, [18, 19], ip, [[reference(10)], [reference(11)]], call=img2img, image=source, strength=0.8)
    assert np.abs(batch - base).mean() > 0.05
    alone = generate(sd15, [19], ip, [[reference(11)]], call=img2img, image=source[1:], strength=0.8)
    np.testing.assert_allclose(batch[1], alone[0], atol=1e-4)
    ip.activate([], [])
    assert np.array_equal(generate(sd15, [18, 19], call=img2img, image=source, strength=0.8), base)


def test_resolved_adapters_are_hashable_and_equal_by_content():
    a = adapter(scale_json={"up": {"block_0": [0.0, 1.0]}, "down": {"block_2": [1.0]}})
    b = adapter(scale_json={"down": {"block_2": [1.0]}, "up": {"block_0": [0.0, 1.0]}})
    assert a == b and hash(a) == hash(b) and len({a, b, adapter()}) == 2
    assert a.scale_config == {"down": {"block_2": [1.0]}, "up": {"block_0": [0.0, 1.0]}}
    assert adapter(scale=0.7).scale_config == 0.7
