"""Tiled latent decoding: large images decoded in overlapping latent tiles, blended linearly.

The autoencoder's decoder holds activations of 128-512 channels at every pixel, and its middle
self-attention spans every latent position: a 2048x2048 output from the x4 upscaler (512x512 latents)
would need hundreds of GB at once. Decoding tiles of `tile` latents, overlapping by `overlap`, bounds
that by the tile's size whatever the image's. The tiles' pixels are blended with weights that ramp
linearly across each overlap (1 inside a tile, towards 0 at an edge shared with a neighbour), so no
seam shows. It is an approximation: each tile's attention and group norms see only that tile (as in
diffusers' `AutoencoderKL.tiled_decode`); images that fit in one tile are decoded whole, exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .config import DECODE_TILE as DECODE_TILE

Tensor = torch.Tensor


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` covering `size` with at least `overlap` shared between neighbours."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return [*starts, size - tile]  # the last tile ends at the edge


def _ramp(length: int, start: int, end: int, size: int, overlap: int) -> Tensor:
    """Blend weights along one axis of a tile covering [start, end) of `size` (pixels)."""
    w = torch.ones(length)
    if overlap <= 0:
        return w
    ramp = (torch.arange(overlap, dtype=torch.float32) + 0.5) / overlap  # (0, 1), never exactly 0
    if start > 0:
        w[:overlap] = torch.minimum(w[:overlap], ramp)
    if end < size:
        w[-overlap:] = torch.minimum(w[-overlap:], ramp.flip(0))
    return w


def decode_tiled(decode: Callable[[Tensor], Tensor], z: Tensor, tile: int, overlap: int) -> Tensor:
    """`decode` ((B, C, h, w) latents -> (B, 3, f*h, f*w) pixels) over tiles of at most tile x tile
    latents; whole when the latent fits one tile."""
    _, _, h, w = z.shape
    if h <= tile and w <= tile:
        return decode(z)
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, {tile}), got {overlap}")
    out: Tensor | None = None
    weight: Tensor | None = None
    f = 0
    for top in tile_starts(h, tile, overlap):
        for left in tile_starts(w, tile, overlap):
            part = decode(z[:, :, top : top + tile, left : left + tile])  # (B, 3, f*th, f*tw)
            th, tw = min(tile, h), min(tile, w)
            if out is None:
                f = part.shape[-1] // tw
                out = torch.zeros(z.shape[0], part.shape[1], f * h, f * w, dtype=torch.float32)
                weight = torch.zeros(1, 1, f * h, f * w)
            assert weight is not None
            wy = _ramp(f * th, f * top, f * (top + th), f * h, f * overlap)
            wx = _ramp(f * tw, f * left, f * (left + tw), f * w, f * overlap)
            mask = wy[:, None] * wx[None, :]  # (f*th, f*tw)
            ys, xs = slice(f * top, f * (top + th)), slice(f * left, f * (left + tw))
            out[:, :, ys, xs] += part.float().cpu() * mask
            weight[:, :, ys, xs] += mask
    assert out is not None and weight is not None
    return out / weight
