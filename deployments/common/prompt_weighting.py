"""fal's `prompt_weighting: true` for SD1.5 and SDXL: A1111/civitai weighting syntax and long prompts.

Prompts copied from civitai are written for AUTOMATIC1111's web UI: `(word:1.3)` to stress a word,
`[word]` to soften it, and often far more than CLIP's 77 tokens. Plain diffusers reads the brackets
as text and silently truncates at 77 tokens. With `prompt_weighting` on we instead build the text
embeddings ourselves and hand them to the pipeline as `prompt_embeds` & co.:

1. `parse_weighted_prompt` turns the text into (fragment, weight) runs with A1111's grammar.
2. Each fragment is tokenized on its own and every token carries its run's weight.
3. The token stream is cut into windows of 75 tokens; each window is framed as BOS + tokens + EOS
   and padded to 77 exactly as the pipeline's tokenizer pads (`pad_token_id`: EOS for SD1.5's
   tokenizer, "!" for SDXL's second one), so an unweighted prompt of up to 75 tokens yields the
   very ids diffusers would feed the encoder.
4. Every window goes through the text encoder(s) on its own; the layer picked follows diffusers'
   `encode_prompt` (including `clip_skip`), and the windows are concatenated along the sequence
   axis (the UNet's cross-attention accepts any length).
5. Weights are applied A1111-style: each token's hidden state is multiplied by its weight, then the
   window is rescaled so its mean is what it was before weighting. This keeps the overall
   magnitude the UNet was trained on while shifting emphasis between tokens.

Every item of a batch, positive and negative, is padded with empty windows (the encoding of "")
to the same number of windows, because the pipeline concatenates negative and positive embeddings
into one batch for classifier-free guidance.

`BREAK` (upper case, a word on its own) closes the current window, as in A1111, so that what
follows starts a fresh 75-token window. It never creates an empty window: a leading, trailing or
repeated `BREAK` is a no-op. Windows are otherwise cut at exactly 75 tokens (A1111's "move the cut
back to the last comma" heuristic is not implemented).

Where this departs from, or deliberately copies, diffusers:

* An empty (or blank) negative prompt counts as "no negative prompt": with SDXL's
  `force_zeros_for_empty_prompt` its embeddings are zeros, as diffusers does for
  `negative_prompt=None` (fal sends "" for a missing negative prompt; a list of strings has no None).
* Like diffusers 0.42's `encode_prompt`, `clip_skip` applies to the positive prompt only: the
  negative prompt always uses the default layer (last for SD1.5, penultimate for SDXL). Copying this
  keeps images identical whether or not `prompt_weighting` is on for a prompt without weights.
* The pooled SDXL embedding comes from the first window of text_encoder_2 and is unweighted (it
  comes out of the encoder, not from the hidden states the weights scale), as in A1111.
* LoRA `lora_scale` on the text encoder (diffusers' `cross_attention_kwargs={"scale": ...}`) is not
  applied here; adapters set with `set_adapters` act on the text encoder as usual.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import get_module_execution_device

from deployments.common.lora import rows_per_image

# The marker `parse_weighted_prompt` emits for the `BREAK` keyword, spelled as A1111 spells it.
BREAK: tuple[str, float] = ("BREAK", -1.0)

# Below this fraction of a window's mean magnitude, its mean counts as zero (see `_apply_weights`).
_MEAN_FLOOR = 1e-3

_ROUND_MULTIPLIER = 1.1
_SQUARE_MULTIPLIER = 1 / 1.1

_ATTENTION = re.compile(
    r"""
      \\[()\[\]\\]                              # \( \) \[ \] \\ : the character itself
    | \\                                        # any other backslash: itself
    | \(
    | \[
    | :\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)       # ":1.3)" closes a `(text:1.3)` group
    | \)
    | \]
    | [^\\()\[\]:]+                             # plain text
    | :                                         # a colon that starts no weight
    """,
    re.VERBOSE,
)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")


def parse_weighted_prompt(text: str) -> list[tuple[str, float]]:
    """Split `text` into (fragment, weight) runs using AUTOMATIC1111's attention grammar.

    `(x:1.3)` sets weight 1.3, `(x)` multiplies by 1.1, `[x]` divides by 1.1, and nested groups
    multiply. `\\(` `\\)` `\\[` `\\]` are literal brackets. Like A1111 the grammar never fails: an
    unclosed `(` or `[` still weights everything after it, and a stray `)` or `]` is literal text.
    A standalone `BREAK` becomes the `BREAK` marker (weight -1, never multiplied). Adjacent runs of
    equal weight are merged; the result is never empty (`""` gives `[("", 1.0)]`).

    >>> parse_weighted_prompt("a (red:1.5) cat, [blurry]")
    [('a ', 1.0), ('red', 1.5), (' cat, ', 1.0), ('blurry', 0.9090909090909091)]
    """
    runs: list[list] = []  # mutable [fragment, weight] pairs, multiplied in place
    open_round: list[int] = []
    open_square: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        for run in runs[start:]:
            if tuple(run) != BREAK:
                run[1] *= multiplier

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            runs.append([token[1:] or token, 1.0])
        elif token == "(":
            open_round.append(len(runs))
        elif token == "[":
            open_square.append(len(runs))
        elif weight is not None and open_round:
            multiply_from(open_round.pop(), float(weight))
        elif token == ")" and open_round:
            multiply_from(open_round.pop(), _ROUND_MULTIPLIER)
        elif token == "]" and open_square:
            multiply_from(open_square.pop(), _SQUARE_MULTIPLIER)
        else:
            runs.extend(_split_breaks(token))

    for start in open_round:
        multiply_from(start, _ROUND_MULTIPLIER)
    for start in open_square:
        multiply_from(start, _SQUARE_MULTIPLIER)
    return _merge_runs([(fragment, weight) for fragment, weight in runs])


def _split_breaks(text: str) -> list[list]:
    """Plain text as runs of weight 1, with a `BREAK` marker wherever the keyword stands alone."""
    runs: list[list] = []
    for i, part in enumerate(_BREAK_WORD.split(text)):
        if i > 0:
            runs.append(list(BREAK))
        runs.append([part, 1.0])
    return runs


def _merge_runs(runs: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Drop empty fragments and join neighbours of equal weight (`BREAK` markers stay apart)."""
    merged: list[tuple[str, float]] = []
    for fragment, weight in runs:
        if not fragment:
            continue
        previous = merged[-1] if merged else None
        mergeable = previous is not None and BREAK not in (previous, (fragment, weight))
        if mergeable and previous[1] == weight:
            merged[-1] = (previous[0] + fragment, weight)
        else:
            merged.append((fragment, weight))
    return merged or [("", 1.0)]


@dataclass(frozen=True)
class _TextBranch:
    """One tokenizer/text-encoder pair: SD1.5 has one, SDXL two (SDXL's refiner only the second)."""

    tokenizer: object
    text_encoder: torch.nn.Module


# A window's tokens without BOS/EOS, each with its weight.
_Window = list[tuple[int, float]]


def _text_branches(pipe) -> list[_TextBranch]:
    """The pipeline's tokenizer/encoder pairs in diffusers' order (hidden states concatenate so)."""
    names = [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")]
    branches = [
        _TextBranch(getattr(pipe, tokenizer, None), getattr(pipe, encoder, None)) for tokenizer, encoder in names
    ]
    branches = [b for b in branches if b.tokenizer is not None and b.text_encoder is not None]
    if not branches:
        raise ValueError(f"{type(pipe).__name__} has no CLIP tokenizer/text encoder to weight prompts with")
    return branches


def _is_sdxl(pipe) -> bool:
    """SDXL pipelines (and only they) have a second text encoder slot, even when it is empty."""
    return hasattr(pipe, "text_encoder_2")


def _tokenize_fragment(pipe, tokenizer, fragment: str) -> list[int]:
    """Token ids of one fragment, without BOS/EOS and without truncation.

    Multi-vector textual-inversion tokens are expanded first, as diffusers' `encode_prompt` does.
    """
    if hasattr(pipe, "maybe_convert_prompt"):
        fragment = pipe.maybe_convert_prompt(fragment, tokenizer)
    # verbose=False: a long fragment is expected here, not the "longer than 77" mistake it warns of.
    return tokenizer(fragment, add_special_tokens=False, truncation=False, verbose=False).input_ids


def _weighted_windows(pipe, tokenizer, text: str) -> list[_Window]:
    """`text`'s weighted tokens cut into windows that fit CLIP's context once BOS/EOS are added."""
    size = tokenizer.model_max_length - 2
    windows: list[_Window] = []
    start_new = True
    for fragment, weight in parse_weighted_prompt(text):
        if (fragment, weight) == BREAK:
            start_new = True
            continue
        for token in _tokenize_fragment(pipe, tokenizer, fragment):
            if start_new or len(windows[-1]) == size:
                windows.append([])
                start_new = False
            windows[-1].append((token, weight))
    return windows or [[]]


def _frame_window(tokenizer, window: _Window) -> tuple[list[int], list[float], list[int]]:
    """BOS + tokens + EOS, padded to `model_max_length` the way the tokenizer itself pads.

    Returns ids, per-position weights (1 for BOS/EOS/padding) and the attention mask the tokenizer
    would give (1 up to and including EOS).
    """
    length = tokenizer.model_max_length
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = [tokenizer.bos_token_id] + [token for token, _ in window] + [tokenizer.eos_token_id]
    weights = [1.0] + [weight for _, weight in window] + [1.0]
    padding = length - len(ids)
    return ids + [pad_id] * padding, weights + [1.0] * padding, [1] * len(ids) + [0] * padding


def _frame_batch(tokenizer, texts_windows: list[list[_Window]], n_windows: int):
    """Every text's windows, padded with empty ones to `n_windows`, stacked as (B * n_windows, 77)."""
    ids, weights, mask = [], [], []
    for windows in texts_windows:
        for window in windows + [[]] * (n_windows - len(windows)):
            window_ids, window_weights, window_mask = _frame_window(tokenizer, window)
            ids.append(window_ids)
            weights.append(window_weights)
            mask.append(window_mask)
    return torch.tensor(ids), torch.tensor(weights), torch.tensor(mask)


def _select_layer(output, text_encoder, clip_skip: int | None, sdxl: bool) -> torch.Tensor:
    """The hidden states diffusers' `encode_prompt` would use for this `clip_skip`.

    SD1.5: the last layer (already normalised), or with clip_skip=n the layer n before it, passed
    through `final_layer_norm`. SDXL: the penultimate layer, un-normalised, n further back with
    clip_skip=n. clip_skip None and 0 both mean "no skip".
    """
    clip_skip = clip_skip or 0
    if sdxl:
        return output.hidden_states[-(clip_skip + 2)]
    if clip_skip == 0:
        return output.last_hidden_state
    return _final_layer_norm(text_encoder)(output.hidden_states[-(clip_skip + 1)])


def _final_layer_norm(text_encoder) -> torch.nn.Module:
    """CLIP's final LayerNorm under transformers 4 (`.text_model.final_layer_norm`) or 5 (flattened).

    diffusers 0.42.1 still reaches for `text_encoder.text_model`, which transformers 5 removed, so
    its own SD1.5 `encode_prompt(clip_skip=...)` raises AttributeError; this module must not.
    """
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm


def _apply_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale each token by its weight, then restore each window's mean (A1111's normalisation).

    The mean restoration keeps the overall level of the embeddings where the UNet expects it, so
    a weight shifts emphasis between tokens rather than making the whole prompt louder. When a
    window's mean is ~0 next to its typical magnitude (a bias-free final LayerNorm gives exactly
    that, as in random-weight stand-ins) the ratio of means is noise, so such a window keeps the
    plain per-token scaling. Computed in float32 so fp16 encoders keep the ratio's precision; a
    window whose weights are all 1 comes back bit-identical.
    """
    original = hidden.float()
    weighted = original * weights.to(original.device, torch.float32).unsqueeze(-1)
    original_mean = original.mean(dim=(1, 2), keepdim=True)
    weighted_mean = weighted.mean(dim=(1, 2), keepdim=True)
    floor = _MEAN_FLOOR * original.abs().mean(dim=(1, 2), keepdim=True)
    meaningful = (original_mean.abs() > floor) & (weighted_mean.abs() > floor)
    ratio = torch.where(meaningful, original_mean / torch.where(meaningful, weighted_mean, 1.0), 1.0)
    return (weighted * ratio).to(hidden.dtype)


def _encode_branch(
    branch: _TextBranch, texts_windows: list[list[_Window]], n_windows: int, clip_skip: int | None, sdxl: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One encoder's weighted embeddings (B, n_windows * 77, D) and, if it has one, its pooled output.

    The pooled output is taken, as diffusers does, from an encoder whose first output is 2-D
    (`text_embeds` of CLIPTextModelWithProjection), and from each text's first window.
    """
    encoder = branch.text_encoder
    ids, weights, mask = _frame_batch(branch.tokenizer, texts_windows, n_windows)
    device = get_module_execution_device(encoder)
    # diffusers passes the mask to SD1.5's encoder only when its config asks for it; SDXL never.
    use_mask = not sdxl and getattr(encoder.config, "use_attention_mask", False)
    with rows_per_image(n_windows):  # each text's windows are consecutive rows (for mixed LoRAs)
        output = encoder(ids.to(device), attention_mask=mask.to(device) if use_mask else None, output_hidden_states=True)
    hidden = _apply_weights(_select_layer(output, encoder, clip_skip, sdxl), weights)
    batch = len(texts_windows)
    embeds = hidden.reshape(batch, -1, hidden.shape[-1])
    pooled = output[0] if output[0].ndim == 2 else None
    if pooled is not None:
        pooled = pooled.reshape(batch, n_windows, -1)[:, 0]
    return embeds, pooled


def _encode_texts(
    branches: list[_TextBranch],
    windows_per_branch: list[list[list[_Window]]],
    n_windows: int,
    clip_skip: int | None,
    sdxl: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All branches' embeddings concatenated on the feature axis.

    They end up where diffusers puts them: the last encoder's dtype (text_encoder_2's for SDXL) and
    its execution device (the accelerator even when model offloading parks its weights on the CPU).
    """
    target = branches[-1].text_encoder
    device, dtype = get_module_execution_device(target), target.dtype
    embeds, pooled = [], None
    for branch, texts_windows in zip(branches, windows_per_branch):
        branch_embeds, branch_pooled = _encode_branch(branch, texts_windows, n_windows, clip_skip, sdxl)
        embeds.append(branch_embeds.to(device, dtype))
        if pooled is None and branch_pooled is not None:
            pooled = branch_pooled.to(device, dtype)
    return torch.cat(embeds, dim=-1), pooled


def _zero_empty(texts: list[str], embeds: torch.Tensor, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the embeddings of blank texts: SDXL's `force_zeros_for_empty_prompt` for negatives."""
    empty = torch.tensor([not text.strip() for text in texts], device=embeds.device)
    return embeds.masked_fill(empty[:, None, None], 0), pooled.masked_fill(empty[:, None], 0)


# The pipeline keyword arguments each side fills: (sequence embeddings, SDXL pooled embedding).
_KWARG_NAMES = {
    "prompt": ("prompt_embeds", "pooled_prompt_embeds"),
    "negative_prompt": ("negative_prompt_embeds", "negative_pooled_prompt_embeds"),
}


def encode_prompts(
    pipe,
    prompts: list[str],
    negative_prompts: list[str],
    clip_skip: int | None,
    do_classifier_free_guidance: bool,
) -> dict[str, torch.Tensor]:
    """Weighted, unlimited-length text embeddings as keyword arguments for a diffusers SD/SDXL call.

    `prompts[i]` and `negative_prompts[i]` belong to image i (pass one entry per prompt; the pipeline
    repeats embeddings for `num_images_per_prompt` itself). Returns `prompt_embeds` and, when
    `do_classifier_free_guidance`, `negative_prompt_embeds`; SDXL pipelines also get
    `pooled_prompt_embeds` (and `negative_pooled_prompt_embeds`). All embeddings share one length,
    a multiple of 77. Pass `do_classifier_free_guidance` as the call's `guidance_scale > 1`: a
    pipeline that needs negatives it was not given would encode them itself at our length, which
    CLIP cannot do beyond 77 tokens.

    The result works for txt2img, img2img and inpainting pipelines alike (they share this prompt
    path); don't pass `prompt`, `negative_prompt` or `clip_skip` alongside it.
    """
    if not prompts:
        raise ValueError("encode_prompts needs at least one prompt")
    if do_classifier_free_guidance and len(negative_prompts) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(negative_prompts)} negative prompts")
    sdxl = _is_sdxl(pipe)
    branches = _text_branches(pipe)
    sides = {"prompt": prompts}
    if do_classifier_free_guidance:
        sides["negative_prompt"] = negative_prompts
    windows = {
        side: [[_weighted_windows(pipe, b.tokenizer, text) for text in texts] for b in branches]
        for side, texts in sides.items()
    }
    n_windows = max(len(w) for per_branch in windows.values() for per_text in per_branch for w in per_text)

    kwargs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for side, texts in sides.items():
            # diffusers applies clip_skip to the positive prompt only (see the module docstring).
            skip = clip_skip if side == "prompt" else None
            embeds, pooled = _encode_texts(branches, windows[side], n_windows, skip, sdxl)
            if side == "negative_prompt" and sdxl and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
                embeds, pooled = _zero_empty(texts, embeds, pooled)
            embeds_key, pooled_key = _KWARG_NAMES[side]
            kwargs[embeds_key] = embeds
            if sdxl:
                kwargs[pooled_key] = pooled
    return kwargs
