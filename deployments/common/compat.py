"""Version gaps between the libraries we pin, bridged in one place, and one diffusers hot spot.

Attention processors' signatures: diffusers' `Attention.forward` calls
`inspect.signature(self.processor.__call__)` on every attention call to filter its keyword
arguments; that costs ~0.14 ms a call, ~9% of a tiny SDXL step on CPU and hundreds of calls per
image on real models. `cache_processor_signatures` stores each processor class's signature on its
`__call__` (`__signature__`, which `inspect` returns as is): same answer, computed once.

clip_skip:

diffusers 0.42's SD1.5 pipelines apply `clip_skip` through `text_encoder.text_model.final_layer_norm`,
but transformers 5 flattened `CLIPTextModel` (its `final_layer_norm` sits on the model itself), so
any SD1.5 request with `clip_skip` would raise AttributeError. Patching a `text_model` attribute
back in is not an option: diffusers' LoRA loader takes its presence to mean the old layout and then
maps text-encoder LoRA keys wrongly. So for SD1.5 with `clip_skip` we encode the prompts here, as
diffusers' `encode_prompt` does (the negative prompt is not clip-skipped there either), and hand
the pipeline embeddings.
"""

from __future__ import annotations

import torch


def _final_layer_norm(text_encoder) -> torch.nn.Module:
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm


@torch.no_grad()
def sd15_clip_skip_embeddings(pipe, prompts: list[str], negative_prompts: list[str], clip_skip: int) -> dict[str, torch.Tensor]:
    encoder, tokenizer = pipe.text_encoder, pipe.tokenizer

    def ids(texts: list[str]) -> torch.Tensor:
        tokens = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
        return tokens.input_ids.to(encoder.device)

    hidden = encoder(ids(prompts), output_hidden_states=True).hidden_states[-(clip_skip + 1)]
    prompt_embeds = _final_layer_norm(encoder)(hidden)
    negative_embeds = encoder(ids(negative_prompts))[0]
    return {"prompt_embeds": prompt_embeds.to(encoder.dtype), "negative_prompt_embeds": negative_embeds.to(encoder.dtype)}


def cache_processor_signatures() -> None:
    """Precompute `inspect.signature` for every diffusers attention processor class (see above)."""
    import inspect

    from diffusers.models import attention_processor

    for value in vars(attention_processor).values():
        call = getattr(value, "__call__", None) if isinstance(value, type) else None
        if call is None or not inspect.isfunction(call) or hasattr(call, "__signature__"):
            continue
        call.__signature__ = inspect.signature(call)
