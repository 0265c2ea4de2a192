"""Latents -> pixels, with fal's rectangular VAE tiling.

Pipelines are called with `output_type="latent"` and decoded here, once for every model family,
so that tiling, debug latents and the safety checker sit in one place. diffusers' own tiling only
knows square tiles and an overlap factor; fal's API sets tile width, height and both strides, so
tiles are decoded one by one and blended with linear ramps where they overlap.
"""

from __future__ import annotations

import torch

from deployments.common.jobs import Tiling

LATENT_SCALE = 8


def _unscale(vae, latents: torch.Tensor) -> torch.Tensor:
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        channels = latents.shape[1]
        mean_t = torch.tensor(mean).view(1, channels, 1, 1).to(latents)
        std_t = torch.tensor(std).view(1, channels, 1, 1).to(latents)
        return latents * std_t / config.scaling_factor + mean_t
    shift = getattr(config, "shift_factor", None) or 0.0
    return latents / config.scaling_factor + shift


def _tile_starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def _ramp(length: int, overlap_before: int, overlap_after: int, device, dtype) -> torch.Tensor:
    """1 in the middle, rising linearly over the overlap with the previous/next tile."""
    w = torch.ones(length, device=device, dtype=dtype)
    if overlap_before > 0:
        w[:overlap_before] = torch.linspace(1 / (overlap_before + 1), 1, overlap_before + 1, device=device, dtype=dtype)[:-1]
    if overlap_after > 0:
        w[-overlap_after:] = torch.linspace(1, 1 / (overlap_after + 1), overlap_after + 1, device=device, dtype=dtype)[1:]
    return w


def _decode(vae, latents: torch.Tensor) -> torch.Tensor:
    return vae.decode(latents, return_dict=False)[0]


def _tiled_decode(vae, latents: torch.Tensor, tiling: Tiling) -> torch.Tensor:
    _, _, h, w = latents.shape
    th, tw = max(1, tiling.height // LATENT_SCALE), max(1, tiling.width // LATENT_SCALE)
    sh, sw = max(1, tiling.stride_height // LATENT_SCALE), max(1, tiling.stride_width // LATENT_SCALE)
    ys, xs = _tile_starts(h, th, sh), _tile_starts(w, tw, sw)
    out = None
    weight = None
    for iy, y in enumerate(ys):
        for ix, x in enumerate(xs):
            tile = _decode(vae, latents[:, :, y : y + th, x : x + tw])
            if out is None:
                out = torch.zeros(latents.shape[0], tile.shape[1], h * LATENT_SCALE, w * LATENT_SCALE, device=tile.device, dtype=tile.dtype)
                weight = torch.zeros(1, 1, h * LATENT_SCALE, w * LATENT_SCALE, device=tile.device, dtype=tile.dtype)
            ph, pw = tile.shape[2], tile.shape[3]
            before_y = (ys[iy - 1] + th - y) * LATENT_SCALE if iy > 0 else 0
            after_y = (y + th - ys[iy + 1]) * LATENT_SCALE if iy + 1 < len(ys) else 0
            before_x = (xs[ix - 1] + tw - x) * LATENT_SCALE if ix > 0 else 0
            after_x = (x + tw - xs[ix + 1]) * LATENT_SCALE if ix + 1 < len(xs) else 0
            wy = _ramp(ph, max(0, before_y), max(0, after_y), tile.device, tile.dtype)
            wx = _ramp(pw, max(0, before_x), max(0, after_x), tile.device, tile.dtype)
            mask = (wy[:, None] * wx[None, :])[None, None]
            py, px = y * LATENT_SCALE, x * LATENT_SCALE
            out[:, :, py : py + ph, px : px + pw] += tile * mask
            weight[:, :, py : py + ph, px : px + pw] += mask
    return out / weight


def needs_tiling(latents: torch.Tensor, tiling: Tiling) -> bool:
    _, _, h, w = latents.shape
    return h * LATENT_SCALE > tiling.height or w * LATENT_SCALE > tiling.width


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, tiling: Tiling) -> torch.Tensor:
    """Decode pipeline latents to images in [-1, 1], tiling when the image exceeds a tile."""
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:  # fp16 SDXL VAEs overflow; decode in fp32 (one batch at a time per replica)
        vae.to(torch.float32)
    try:
        latents = _unscale(vae, latents.to(vae.dtype))
        if needs_tiling(latents, tiling):
            return _tiled_decode(vae, latents, tiling)
        return _decode(vae, latents)
    finally:
        if upcast:
            vae.to(torch.float16)
