"""FLUX.1-dev at toy width, and a LoRA for it: random weights in the exact diffusers layout.

Like the SD stand-ins (tiny_models.py), these keep the real classes, configs and file layout of
black-forest-labs/FLUX.1-dev, so loading, LoRA injection and decoding run the production code:
a guidance-distilled `FluxTransformer2DModel` over 2x2-packed 16-channel latents, a 16-channel VAE
with FLUX's scale and shift, CLIP (pooled) and T5 (per-token) text encoders, and the dynamically
shifted flow-matching schedule. Every part is seeded: two builds write identical bytes.
"""

from __future__ import annotations

import string
from pathlib import Path

from deployments.tiny_models import _WORDS, _random_lora, _text_config, _tokenizer, _vae, ensure_tiny_model

T5_WIDTH = 32  # the transformer's joint_attention_dim
CLIP_WIDTH = 32  # CLIPTextModel's pooled output: the transformer's pooled_projection_dim

# A LoRA as FLUX trainers (ai-toolkit, kohya) make them: both streams of the double blocks, the
# single blocks' attention and MLP input.
_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_mlp"]


def _t5_tokenizer():
    """T5's SentencePiece-style Unigram tokenizer over a small fixed vocabulary.

    The real special tokens sit at the real ids (<pad> 0, </s> 1, <unk> 2); whole words of the
    demo prompts are single pieces and any other word falls back to letters, as in the real one.
    """
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(f"\u2581{word}", -1.0) for word in sorted(set(_WORDS))]
    pieces += [(c, -5.0) for c in string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation]
    # No sentinel tokens (extra_ids): they serve T5's span-corruption training, not prompts.
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def _t5_encoder(vocab_size: int):
    """T5 v1.1's encoder (gated-GELU, relative attention buckets), at toy width."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=T5_WIDTH,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


def _flux_vae():
    """The SD stand-in's VAE (8x, four blocks) with FLUX's 16 latent channels, scale and shift,
    and, like FLUX's, no quant convolutions."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_config(
        _vae().config,
        latent_channels=16,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _transformer():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels, packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=CLIP_WIDTH,
        guidance_embeds=True,  # FLUX.1-dev is guidance-distilled: guidance is an input, not CFG
        axes_dims_rope=(4, 6, 6),  # (text/image id, row, column), summing to attention_head_dim
    )


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # FLUX.1-dev's scheduler_config.json: the shift grows with the image's token count.
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def build_flux(out: Path) -> None:
    import torch
    from diffusers import FluxPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(80)
    transformer = _transformer()
    torch.manual_seed(81)
    vae = _flux_vae()
    torch.manual_seed(82)
    text_encoder = CLIPTextModel(_text_config(projection_dim=CLIP_WIDTH, hidden_size=CLIP_WIDTH))
    tokenizer_2 = _t5_tokenizer()
    torch.manual_seed(83)
    text_encoder_2 = _t5_encoder(len(tokenizer_2))
    pipe = FluxPipeline(
        scheduler=_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.save_pretrained(out, safe_serialization=True)


def build_flux_lora(out: Path, seed: int = 90) -> None:
    """A rank-4 LoRA for the stand-in's transformer, in diffusers' FLUX LoRA format.

    A random model's velocity barely depends on its conditioning (the image is mostly the decoded
    noise), so the adapter is made 8x stronger than the SD ones: the image then shows it."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(ensure_tiny_model("flux") / "transformer")
    state = _random_lora(transformer, seed, _LORA_TARGETS)
    with torch.no_grad():
        state = {key: tensor * 8 if "lora_B" in key else tensor for key, tensor in state.items()}
    out.mkdir(parents=True, exist_ok=True)
    FluxPipeline.save_lora_weights(out, transformer_lora_layers=state, safe_serialization=True)
