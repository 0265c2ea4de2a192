"""Textual-inversion embeddings: tokens bound to learned vectors, per loaded model.

A file is either a single-encoder embedding (A1111's `emb_params`, `string_to_param`, or one
tensor) for SD1.5, or an SDXL pair (`clip_l` for the first text encoder, `clip_g` for the second).
Its rows bind to the request's `tokens` (`["<s0>", "<s1>"]` by default), which the prompt then uses.

Bindings are per model and global to it, so exactly the batch's embeddings are bound for each call:
a request that did not ask for an embedding must not pick one up because its prompt happens to
contain `<s0>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from deployments.common.jobs import JobInputError


@dataclass(frozen=True)
class ResolvedEmbedding:
    name: str  # content digest of the file
    path: Path
    tokens: tuple[str, ...]


def _single_tensor(state: dict[str, torch.Tensor]) -> torch.Tensor | None:
    for key in ("emb_params", "string_to_param"):
        if key in state:
            return state[key]
    return next(iter(state.values())) if len(state) == 1 else None


class LoadedEmbeddings:
    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self._bound: dict[tuple[str, ...], str] = {}  # tokens -> embedding name
        self._encoders = [(pipe.tokenizer, pipe.text_encoder)]
        if getattr(pipe, "text_encoder_2", None) is not None:
            self._encoders.append((pipe.tokenizer_2, pipe.text_encoder_2))

    def _unload(self, tokens: tuple[str, ...]) -> None:
        for tokenizer, encoder in self._encoders:
            if all(t in tokenizer.get_vocab() for t in tokens):
                self.pipe.unload_textual_inversion(list(tokens), tokenizer=tokenizer, text_encoder=encoder)
        self._bound.pop(tokens, None)

    def _vectors(self, embedding: ResolvedEmbedding, field: tuple) -> list[torch.Tensor]:
        state = load_file(embedding.path)
        sdxl = len(self._encoders) == 2
        if "clip_l" in state and "clip_g" in state:
            if not sdxl:
                raise JobInputError(field, "this embedding is for SDXL (clip_l + clip_g); the base model is SD1.5", "embedding_incompatible")
            return [state["clip_l"], state["clip_g"]]
        single = _single_tensor(state)
        if single is None:
            raise JobInputError(field, "no embedding found in the file (expected emb_params, or clip_l and clip_g)", "embedding_invalid")
        if sdxl:
            raise JobInputError(field, "this embedding has one text encoder's vectors; SDXL needs clip_l and clip_g", "embedding_incompatible")
        return [single]

    def _load(self, embedding: ResolvedEmbedding, field: tuple) -> None:
        vectors = self._vectors(embedding, field)
        try:
            for (tokenizer, encoder), rows in zip(self._encoders, vectors):
                rows = rows.reshape(-1, rows.shape[-1])
                if rows.shape[0] != len(embedding.tokens):
                    raise ValueError(f"the embedding has {rows.shape[0]} vectors but {len(embedding.tokens)} tokens were given")
                self.pipe.load_textual_inversion(rows, token=list(embedding.tokens), tokenizer=tokenizer, text_encoder=encoder)
        except ValueError as exc:
            self._unload(embedding.tokens)
            reason = str(exc).strip().splitlines()[0][:200]
            raise JobInputError(field, f"this embedding does not fit the base model: {reason}", "embedding_incompatible") from None
        self._bound[embedding.tokens] = embedding.name

    def activate(self, embeddings: list[ResolvedEmbedding], fields: list[tuple]) -> None:
        """Bind exactly `embeddings`; unbind everything else."""
        wanted = {e.tokens: e.name for e in embeddings}
        for tokens, name in list(self._bound.items()):
            if wanted.get(tokens) != name:
                self._unload(tokens)
        for embedding, field in zip(embeddings, fields):
            if self._bound.get(embedding.tokens) != embedding.name:
                self._load(embedding, field)
