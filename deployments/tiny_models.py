"""Random-weight stand-ins for the real models, built offline in the exact diffusers layout.

No machine of ours can download weights, yet the loading code must stay the real one
(`from_pretrained`, HF ids, variants, single UNets). So we build the real architectures at toy
widths: the same classes, configs and file layout as the hub repos, seeded so that every build
writes byte-identical files. A 64x64 image takes ~0.1 s on a CPU.

Each stand-in is a named builder; `ensure_tiny_model(name)` builds it once into a cache directory
(guarded by a file lock, written atomically) and returns its path. LCM and FLUX stand-ins join by
adding builders to `BUILDERS`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

# Bump when any builder changes: the cache directory is keyed by it.
TINY_MODELS_VERSION = "6"

# A small vocabulary is enough: CLIP's byte-level BPE falls back to single characters.
_WORDS = (
    "a an the of in on at with and photo portrait painting of cat dog car red blue green queen king "
    "medieval castle night city street las vegas mustang classic silver hair face eyes detailed "
    "head shot crown age spots wrinkles cartoon illustration worst low quality normal high best "
    "nsfw blurry landscape mountain sky sun sea forest tree flower house man woman girl boy robot"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-unicode table (printable stand-ins for every byte)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A deterministic CLIP BPE vocabulary: every byte, plus whole-word merges for `_WORDS`."""
    chars = list(_bytes_to_unicode().values())
    vocab: list[str] = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    seen = set(vocab)
    for word in sorted(set(_WORDS)):
        # Merge left to right: "c a t</w>" -> "ca t</w>" -> "cat</w>".
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            merged = pair[0] + pair[1]
            if pair not in merges:
                merges.append(pair)
            if merged not in seen:
                seen.add(merged)
                vocab.append(merged)
            symbols = [merged] + symbols[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def _tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _vocab_size() -> int:
    return len(_clip_vocab_and_merges()[0])


def _text_config(projection_dim: int = 32, hidden_size: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=_vocab_size() - 2,
        eos_token_id=_vocab_size() - 1,
        pad_token_id=_vocab_size() - 1,
        hidden_size=hidden_size,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=_vocab_size(),
        projection_dim=projection_dim,
        hidden_act="gelu",
        max_position_embeddings=77,
    )


def _vae():
    """Four blocks, as in the real VAE: three downsamplings, the real 8x latent scale."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=64,
        # The real VAE attends over the whole latent in its mid block; at toy width that
        # attention would dominate a 1024x1024 decode, so the stand-in leaves it out.
        mid_block_add_attention=False,
    )


def _unet(seed: int, **architecture):
    """A UNet at toy width; attention only at 1/4 latent resolution keeps 1024x1024 affordable."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(16, 16, 32),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        **architecture,
    )


def _sd15_unet(seed: int):
    return _unet(seed, cross_attention_dim=32, attention_head_dim=4)


def _sdxl_unet(seed: int):
    return _unet(
        seed,
        attention_head_dim=(2, 2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 + text_encoder_2 projection (32)
        cross_attention_dim=64,  # text_encoder (32) + text_encoder_2 (32)
    )


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    # The real SD1.5/SDXL schedule: scaled_linear betas, 1000 steps, leading spacing.
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
    )


def _save_with_fp16_variant(model, out: Path) -> None:
    """Save fp32 weights plus an fp16 variant, as hub repos ship (`variant="fp16"` loads it).

    The variant goes first from a copy: configs are shared between variants and the last save
    writes them, so the fp32 save must come last (and the fp32 weights never round-trip fp16).
    """
    import copy

    import torch

    copy.deepcopy(model).to(torch.float16).save_pretrained(out, safe_serialization=True, variant="fp16")
    model.save_pretrained(out, safe_serialization=True)


def build_sd15(out: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    unet = _sd15_unet(seed=0)
    torch.manual_seed(1)
    vae = _vae()
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(_text_config())
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_tokenizer(),
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    _save_with_fp16_variant(pipe, out)


def build_sdxl(out: Path) -> None:
    import torch
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = _sdxl_unet(seed=10)
    torch.manual_seed(11)
    vae = _vae()
    torch.manual_seed(12)
    text_encoder = CLIPTextModel(_text_config())
    torch.manual_seed(13)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config())
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=_tokenizer(),
        tokenizer_2=_tokenizer(),
        unet=unet,
        scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
    _save_with_fp16_variant(pipe, out)


def build_sd15_unet_alt(out: Path) -> None:
    """A second SD1.5 UNet (other seed), to exercise `unet_name`."""
    _save_with_fp16_variant(_sd15_unet(seed=100), out)


def build_sdxl_unet_alt(out: Path) -> None:
    """A second SDXL UNet (other seed), to exercise `unet_name`."""
    _save_with_fp16_variant(_sdxl_unet(seed=110), out)


def _calibration_images() -> list:
    """Images the tiny SD1.5 and SDXL stand-ins actually make, for calibrating the checker."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    images = []
    for cls, name in ((StableDiffusionPipeline, "sd15"), (StableDiffusionXLPipeline, "sdxl")):
        pipe = cls.from_pretrained(ensure_tiny_model(name))
        pipe.set_progress_bar_config(disable=True)
        for seed in range(12):
            out = pipe("photo of a cat", height=64, width=64, num_inference_steps=4,
                       generator=torch.Generator().manual_seed(seed), output_type="np")
            images.append((out.images[0] * 255).round().astype("uint8"))
    return images


def build_safety_checker(out: Path) -> None:
    """The real `StableDiffusionSafetyChecker` class at toy width, with its CLIP image processor.

    Random weights flag nothing meaningful, so the thresholds are calibrated at build time on
    images the tiny pipelines make: concept 0 fires on the top third of them, every other concept
    never does. What gets flagged is arbitrary but deterministic, which is what tests need to show
    that flagged images turn black and the others pass untouched.
    """
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
        cosine_distance,
    )
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(20)
    config = CLIPConfig(
        text_config=_text_config().to_dict(),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            image_size=32,
            patch_size=8,
            projection_dim=32,
        ),
        projection_dim=32,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        checker.concept_embeds.copy_(torch.randn(17, 32))
        checker.special_care_embeds.copy_(torch.randn(3, 32))
    processor = CLIPImageProcessor(
        crop_size={"height": 32, "width": 32},
        size={"shortest_edge": 32},
        do_center_crop=True,
        do_resize=True,
        do_normalize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    clip_input = processor(_calibration_images(), return_tensors="pt").pixel_values
    with torch.no_grad():
        embeds = checker.visual_projection(checker.vision_model(clip_input)[1])
        concept = cosine_distance(embeds, checker.concept_embeds)
        special = cosine_distance(embeds, checker.special_care_embeds)
        never = concept.max(dim=0).values + 1.0
        never[0] = torch.quantile(concept[:, 0], 2 / 3)
        checker.concept_embeds_weights.copy_(never)
        checker.special_care_embeds_weights.copy_(special.max(dim=0).values + 1.0)
    checker.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)


# --- the original single-file (LDM) layout ---------------------------------------------------
# Civitai-style checkpoints are one .safetensors file in the original Stable Diffusion layout.
# diffusers only converts that layout *to* its own, so the SD1.5 stand-in is written out in it here
# (the inverse of diffusers' `convert_ldm_*_checkpoint`), and tests load it back through
# `from_single_file`, the path production uses for checkpoint URLs.

_UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def _rename(rest: str, pairs) -> str:
    for new, old in pairs:
        rest = rest.replace(new, old)
    return rest


def _ldm_unet_key(key: str, config) -> str:
    """A diffusers UNet2DConditionModel key in the original `model.diffusion_model.` layout."""
    per_down = config["layers_per_block"] + 1
    parts = key.split(".")
    for fixed, ldm in _UNET_FIXED.items():
        if key.startswith(fixed + "."):
            return f"{ldm}.{key[len(fixed) + 1:]}"
    if parts[0] == "down_blocks":
        block, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":  # down_blocks.b.downsamplers.0.conv.w
            return f"input_blocks.{(block + 1) * per_down}.0.op.{'.'.join(parts[5:])}"
        layer, rest = int(parts[3]), ".".join(parts[4:])
        index = 1 + block * per_down + layer
        return f"input_blocks.{index}.0.{_rename(rest, _UNET_RESNET)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
    if parts[0] == "mid_block":
        layer, rest = int(parts[2]), ".".join(parts[3:])
        return f"middle_block.{2 * layer}.{_rename(rest, _UNET_RESNET)}" if parts[1] == "resnets" else f"middle_block.1.{rest}"
    if parts[0] == "up_blocks":
        block, kind = int(parts[1]), parts[2]
        per_up = config["layers_per_block"] + 1
        has_attention = "CrossAttn" in config["up_block_types"][block]
        if kind == "upsamplers":  # up_blocks.b.upsamplers.0.conv.w
            return f"output_blocks.{block * per_up + per_up - 1}.{2 if has_attention else 1}.conv.{'.'.join(parts[5:])}"
        layer, rest = int(parts[3]), ".".join(parts[4:])
        index = block * per_up + layer
        return f"output_blocks.{index}.0.{_rename(rest, _UNET_RESNET)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
    raise KeyError(f"no LDM name for UNet key {key}")


def _ldm_vae_key(key: str, num_blocks: int) -> str:
    """A diffusers AutoencoderKL key in the original `first_stage_model.` layout."""
    fixed = {"conv_norm_out": "norm_out"}
    parts = key.split(".")
    coder = parts[0]
    if parts[1] in ("down_blocks", "up_blocks"):
        block = int(parts[2]) if coder == "encoder" else num_blocks - 1 - int(parts[2])
        stage = "down" if coder == "encoder" else "up"
        if parts[3] in ("downsamplers", "upsamplers"):
            return f"{coder}.{stage}.{block}.{'downsample' if stage == 'down' else 'upsample'}.{'.'.join(parts[5:])}"
        rest = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
        return f"{coder}.{stage}.{block}.block.{parts[4]}.{rest}"
    if parts[1] == "mid_block":
        if parts[2] == "resnets":
            return f"{coder}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}".replace("conv_shortcut", "nin_shortcut")
        raise KeyError("the stand-in VAE has no mid-block attention")
    if coder in ("encoder", "decoder") and parts[1] in fixed:
        return f"{coder}.{fixed[parts[1]]}.{'.'.join(parts[2:])}"
    return key  # conv_in, conv_out, quant_conv, post_quant_conv keep their names


def build_sd15_single_file(out: Path) -> None:
    """The SD1.5 stand-in as one `sd15.safetensors` in the original (LDM/civitai) layout."""
    from safetensors.torch import load_file, save_file

    source = ensure_tiny_model("sd15")
    unet_config = json.loads((source / "unet" / "config.json").read_text())
    vae_blocks = len(json.loads((source / "vae" / "config.json").read_text())["block_out_channels"])
    checkpoint = {}
    for key, tensor in load_file(source / "unet" / "diffusion_pytorch_model.safetensors").items():
        checkpoint[f"model.diffusion_model.{_ldm_unet_key(key, unet_config)}"] = tensor
    for key, tensor in load_file(source / "vae" / "diffusion_pytorch_model.safetensors").items():
        checkpoint[f"first_stage_model.{_ldm_vae_key(key, vae_blocks)}"] = tensor
    for key, tensor in load_file(source / "text_encoder" / "model.safetensors").items():
        checkpoint[f"cond_stage_model.transformer.text_model.{key.removeprefix('text_model.')}"] = tensor
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sorted(checkpoint.items())}, out / "sd15.safetensors")


# --- LoRAs for the stand-ins -------------------------------------------------------------------

_LORA_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
_LORA_TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _random_lora(model, seed: int, targets: list[str], rank: int = 4) -> dict:
    """Random (non-zero) LoRA weights for `model`, as a peft state dict."""
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.5)  # strong enough to see, not enough to blow up the tiny models
    return get_peft_model_state_dict(model)


def _kohya_module(prefix: str, peft_key: str) -> str:
    module = peft_key.rsplit(".lora_", 1)[0]
    return f"{prefix}_{module.replace('.', '_')}"


def _to_kohya(state: dict, prefix: str, rank: int = 4) -> dict:
    """peft LoRA keys -> kohya/A1111 names (`lora_unet_..._to_q.lora_down.weight` + `.alpha`)."""
    import torch

    out = {}
    for key, tensor in state.items():
        module = _kohya_module(prefix, key)
        out[f"{module}.{'lora_down' if '.lora_A.' in key else 'lora_up'}.weight"] = tensor
        out[f"{module}.alpha"] = torch.tensor(float(rank))
    return out


def _build_lora(out: Path, architecture: str, seed: int, kohya: bool) -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors.torch import save_file

    cls = StableDiffusionXLPipeline if architecture == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(ensure_tiny_model(architecture if architecture == "sdxl" else "sd15"))
    unet = _random_lora(pipe.unet, seed, _LORA_UNET_TARGETS)
    out.mkdir(parents=True, exist_ok=True)
    if not kohya:
        cls.save_lora_weights(out, unet_lora_layers=convert_state_dict_to_diffusers(unet), safe_serialization=True)
        return
    # Kohya files (what civitai serves) usually train the text encoder(s) too.
    state = _to_kohya(unet, "lora_unet")
    encoders = [("lora_te1" if architecture == "sdxl" else "lora_te", pipe.text_encoder)]
    if architecture == "sdxl":
        encoders.append(("lora_te2", pipe.text_encoder_2))
    for offset, (prefix, encoder) in enumerate(encoders, start=1):
        text = _random_lora(encoder, seed + offset, _LORA_TEXT_TARGETS)
        state.update(_to_kohya({f"text_model.{k.removeprefix('text_model.')}": v for k, v in text.items()}, prefix))
    save_file({k: v.contiguous() for k, v in sorted(state.items())}, out / "lora.safetensors")


def _build_embedding(out: Path, architecture: str, seed: int) -> None:
    """A two-vector textual-inversion embedding: A1111 `emb_params` (SD1.5) or clip_l + clip_g (SDXL)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    state = (
        {"clip_l": torch.randn(2, 32, generator=g), "clip_g": torch.randn(2, 32, generator=g)}
        if architecture == "sdxl"
        else {"emb_params": torch.randn(2, 32, generator=g)}
    )
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "embedding.safetensors")


def _build_controlnet(out: Path, architecture: str, seed: int) -> None:
    """A ControlNet for the tiny base (diffusers layout: `config.json` + safetensors).

    `from_unet` copies the base UNet's encoder; its zero convolutions would make the ControlNet a
    no-op, so they get random weights, and its conditioning encoder a signal-preserving init: the
    control image then visibly steers the result."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(ensure_tiny_model(architecture) / "unet")
    controlnet = ControlNetModel.from_unet(unet)
    g = torch.Generator().manual_seed(seed)
    embedding = controlnet.controlnet_cond_embedding
    with torch.no_grad():
        # He-initialised conditioning encoder: at toy width the default init fades the control
        # image to almost nothing by the time it reaches the UNet's features.
        for conv in [embedding.conv_in, *embedding.blocks, embedding.conv_out]:
            fan_in = conv.weight[0].numel()
            gain = 2.0 if conv is not embedding.conv_out else 36.0  # control features ~ the latent's
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (gain / fan_in) ** 0.5)
            conv.bias.zero_()
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.2)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.05)
    controlnet.save_pretrained(out, safe_serialization=True)


def build_image_encoder(out: Path) -> None:
    """The CLIP vision tower IP-Adapters read images with (h94/IP-Adapter's `image_encoder`), at
    toy width, with its image processor, in the transformers layout."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(70)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    CLIPVisionModelWithProjection(config).eval().save_pretrained(out, safe_serialization=True)
    CLIPImageProcessor(
        crop_size={"height": 32, "width": 32},
        size={"shortest_edge": 32},
        do_center_crop=True,
        do_resize=True,
        do_normalize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    ).save_pretrained(out)


def _build_ip_adapter(out: Path, architecture: str, seed: int, image_embed_dim: int = 32) -> None:
    """An IP-Adapter (the original, 4 image tokens) as h94/IP-Adapter ships it: one safetensors.

    Keys follow the original numbering diffusers converts from: `image_proj.proj` / `.norm`, and
    `ip_adapter.{1,3,5,...}.to_{k,v}_ip` for each cross-attention layer in the UNet's processor
    order. Weights are larger than a trained adapter's so that the reference image visibly steers
    the toy UNet."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    unet = UNet2DConditionModel.from_pretrained(ensure_tiny_model(architecture) / "unet")
    cross_dim = unet.config.cross_attention_dim
    channels = list(unet.config.block_out_channels)
    g = torch.Generator().manual_seed(seed)
    state = {
        "image_proj.proj.weight": torch.randn(4 * cross_dim, image_embed_dim, generator=g) / image_embed_dim**0.5,
        "image_proj.proj.bias": torch.randn(4 * cross_dim, generator=g) * 0.1,
        "image_proj.norm.weight": 1.0 + torch.randn(cross_dim, generator=g) * 0.1,
        "image_proj.norm.bias": torch.randn(cross_dim, generator=g) * 0.1,
    }
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue  # self-attention gets no image tokens
        block = name.split(".")
        if block[0] == "mid_block":
            hidden = channels[-1]
        elif block[0] == "up_blocks":
            hidden = channels[::-1][int(block[1])]
        else:
            hidden = channels[int(block[1])]
        for kind in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{key_id}.{kind}.weight"] = torch.randn(hidden, cross_dim, generator=g) * 2.0 / cross_dim**0.5
        key_id += 2
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sorted(state.items())}, out / "ip-adapter.safetensors")


def _build_lcm(out: Path, architecture: str, seed: int) -> None:
    """An LCM-distilled stand-in (as SimianLuo/LCM_Dreamshaper_v7): the base's UNet plus the
    guidance embedding LCM distillation adds (`time_cond_proj_dim`), and the LCM scheduler."""
    import torch
    from diffusers import DiffusionPipeline, LCMScheduler, UNet2DConditionModel

    base = DiffusionPipeline.from_pretrained(ensure_tiny_model(architecture))
    unet = UNet2DConditionModel.from_config({**base.unet.config, "time_cond_proj_dim": 32})
    torch.manual_seed(seed)
    unet.time_embedding.cond_proj.reset_parameters()
    missing, _ = unet.load_state_dict(base.unet.state_dict(), strict=False)
    assert all(key.startswith("time_embedding.cond_proj") for key in missing), missing
    base.unet = unet
    base.register_modules(unet=unet, scheduler=LCMScheduler.from_config(base.scheduler.config))
    base.save_pretrained(out, safe_serialization=True)


def _elsewhere(module: str, function: str) -> Callable[[Path], None]:
    """A builder that lives in another module (imported when it runs: no import cycle)."""

    def build(out: Path) -> None:
        import importlib

        getattr(importlib.import_module(module), function)(out)

    return build


BUILDERS: dict[str, Callable[[Path], None]] = {
    "sd15": build_sd15,
    "sdxl": build_sdxl,
    "sd15-unet-alt": build_sd15_unet_alt,
    "sdxl-unet-alt": build_sdxl_unet_alt,
    "safety-checker": build_safety_checker,
    "sd15-single-file": build_sd15_single_file,
    # LoRAs: diffusers/peft format (two, to combine) and kohya/A1111 format, per architecture.
    "sd15-lora-a": lambda out: _build_lora(out, "sd15", 30, kohya=False),
    "sd15-lora-b": lambda out: _build_lora(out, "sd15", 31, kohya=False),
    "sd15-lora-kohya": lambda out: _build_lora(out, "sd15", 32, kohya=True),
    "sdxl-lora-a": lambda out: _build_lora(out, "sdxl", 40, kohya=False),
    "sdxl-lora-kohya": lambda out: _build_lora(out, "sdxl", 42, kohya=True),
    "sd15-embedding": lambda out: _build_embedding(out, "sd15", 50),
    "sdxl-embedding": lambda out: _build_embedding(out, "sdxl", 51),
    "sd15-controlnet": lambda out: _build_controlnet(out, "sd15", 60),
    "sdxl-controlnet": lambda out: _build_controlnet(out, "sdxl", 61),
    # LCM: distilled stand-ins, and LCM-LoRAs for the base stand-ins (the two ways to serve LCM).
    "sd15-lcm": lambda out: _build_lcm(out, "sd15", 90),
    "sdxl-lcm": lambda out: _build_lcm(out, "sdxl", 91),
    "sd15-lcm-lora": lambda out: _build_lora(out, "sd15", 92, kohya=False),
    "sdxl-lcm-lora": lambda out: _build_lora(out, "sdxl", 93, kohya=False),
    # FLUX.1-dev at toy width (CLIP + T5 encoders, flow-matching transformer) and a LoRA for it.
    "flux": _elsewhere("deployments.tiny_flux", "build_flux"),
    "flux-lora": _elsewhere("deployments.tiny_flux", "build_flux_lora"),
    # IP-Adapters: one CLIP image encoder (as h94/IP-Adapter's models/image_encoder) for both.
    "tiny-image-encoder": build_image_encoder,
    "sd15-ip-adapter": lambda out: _build_ip_adapter(out, "sd15", 71),
    "sdxl-ip-adapter": lambda out: _build_ip_adapter(out, "sdxl", 72),
}


def cache_root() -> Path:
    """Where stand-ins live: $DIFFUSION_SERVE_TINY_MODELS, else ~/.cache/diffusion-serve/."""
    base = os.environ.get("DIFFUSION_SERVE_TINY_MODELS")
    root = Path(base) if base else Path.home() / ".cache" / "diffusion-serve" / "tiny-models"
    import diffusers

    return root / f"v{TINY_MODELS_VERSION}-diffusers{diffusers.__version__}"


def ensure_tiny_model(name: str, root: Path | None = None) -> Path:
    """Build the stand-in `name` once (concurrent callers wait on a lock) and return its directory."""
    if name not in BUILDERS:
        raise KeyError(f"no tiny stand-in named {name!r}; known: {sorted(BUILDERS)}")
    root = root or cache_root()
    target = root / name
    if (target / ".complete").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / ".complete").exists():
            return target
        import torch

        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            with torch.random.fork_rng(devices=[]):
                BUILDERS[name](staging)
            (staging / ".complete").write_text(TINY_MODELS_VERSION)
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return target


def directory_digest(path: Path) -> str:
    """sha256 over every file's relative name and bytes: equal digests mean identical builds."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def main() -> None:
    """`python -m deployments.tiny_models`: build every stand-in and print where they are."""
    for name in BUILDERS:
        path = ensure_tiny_model(name)
        print(json.dumps({"name": name, "path": str(path), "sha256": directory_digest(path)[:16]}))


if __name__ == "__main__":
    main()
