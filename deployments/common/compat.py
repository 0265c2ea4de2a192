"""Version gaps between the libraries we pin, bridged in one place.

diffusers 0.42's SD1.5 pipelines apply `clip_skip` through `text_encoder.text_model.final_layer_norm`,
but transformers 5 flattened `CLIPTextModel` (its `final_layer_norm` sits on the model itself), so
any request with `clip_skip` would raise AttributeError. We expose the old path as a plain
namespace: not a submodule, so weights, `state_dict` and device moves are untouched.
"""

from __future__ import annotations

from types import SimpleNamespace


def restore_clip_text_model_path(text_encoder) -> None:
    if text_encoder is None or hasattr(text_encoder, "text_model"):
        return
    if hasattr(text_encoder, "final_layer_norm"):
        object.__setattr__(text_encoder, "text_model", SimpleNamespace(final_layer_norm=text_encoder.final_layer_norm))
