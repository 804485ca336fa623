"""Architecture inference: read a network's config back from the names and shapes of its weights.

Stable Diffusion single-file checkpoints carry no config, but the CompVis layout (see `unet.py`,
`autoencoder.py`) determines it: level boundaries are where the downsampling convs are, widths are
output-channel counts, attention levels are where spatial transformers are. `shapes` maps keys
with the `model.diffusion_model.` / `first_stage_model.` prefix already removed to tensor shapes,
so this works from a safetensors header alone, without reading any weight.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

from service.ldm.config import AutoencoderConfig, UNetConfig

Shapes = Mapping[str, tuple[int, ...]]


def _shape(shapes: Shapes, key: str, what: str, ndim: int | None = None) -> tuple[int, ...]:
    if key not in shapes:
        raise ValueError(f"weights do not look like {what}: missing {key!r}")
    shape = tuple(shapes[key])
    if ndim is not None and len(shape) != ndim:
        raise ValueError(f"weights do not look like {what}: {key!r} has shape {shape}, expected {ndim}-D")
    return shape


def _indices(shapes: Shapes, prefix: str) -> list[int]:
    """Sorted distinct integers i of keys `{prefix}{i}.…`; they must be 0..n-1 without holes."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = sorted({int(m.group(1)) for key in shapes if (m := pattern.match(key))})
    if found != list(range(len(found))):
        raise ValueError(f"non-contiguous indices under {prefix!r}: {found}")
    return found


def _transformer_depth(shapes: Shapes, prefix: str) -> int:
    return len(_indices(shapes, f"{prefix}.transformer_blocks."))


def infer_unet_config(shapes: Shapes, family: Literal["sd1", "sd2", "sdxl", "upscale-x4"]) -> UNetConfig:
    """UNetConfig of CompVis-layout UNet weights (`model.diffusion_model.` stripped).

    `family` supplies what shapes cannot tell: how channels split into heads (SD 1.x: 8 heads
    everywhere; SD 2.x and SDXL: heads of width 64). SD 1/2 UNets have one transformer depth; SDXL's
    differ per level (base 0, 2, 10; refiner 0, 4, 4, 0) and carry the additional embedding
    `label_emb`. The x4 upscaler (SD 2's text encoder) has 8 heads everywhere as SD 1.x, a class
    embedding of the low-res noise level (`label_emb.weight`, an nn.Embedding), and levels whose first
    attention attends to the text (`attn1.to_k` takes the context's width: see `_cross_only_levels`).
    Raises ValueError for anything else (e.g. res-block counts that differ per level).
    """
    what = {"sdxl": "an SDXL UNet", "upscale-x4": "an x4 upscaler UNet"}.get(
        family, "a Stable Diffusion UNet"
    )
    mc, in_channels = _shape(shapes, "input_blocks.0.0.weight", what, ndim=4)[:2]
    out_channels = _shape(shapes, "out.2.weight", what, ndim=4)[0]
    if _shape(shapes, "time_embed.0.weight", what, ndim=2) != (4 * mc, mc):
        raise ValueError(f"weights do not look like {what}: time_embed.0 is not ({4 * mc}, {mc})")
    adm_in_channels, num_classes = _label_emb(shapes, 4 * mc, family)

    # Input blocks: split the res blocks into levels at the downsamplers (`.0.op`).
    levels: list[list[int]] = [[]]
    for i in _indices(shapes, "input_blocks.")[1:]:
        if f"input_blocks.{i}.0.op.weight" in shapes:
            levels.append([])
        elif f"input_blocks.{i}.0.in_layers.2.weight" in shapes:
            levels[-1].append(i)
        else:
            raise ValueError(
                f"weights do not look like {what}: input_blocks.{i} is neither res block nor downsample"
            )
    num_res_blocks = len(levels[0])
    if num_res_blocks == 0 or any(len(level) != num_res_blocks for level in levels):
        raise ValueError(f"unsupported UNet: res blocks per level differ ({[len(lv) for lv in levels]})")

    channel_mult: list[int] = []
    attention_levels: list[int] = []
    level_depths: list[int] = []
    for n, blocks in enumerate(levels):
        width = _shape(shapes, f"input_blocks.{blocks[0]}.0.out_layers.3.weight", what, ndim=4)[0]
        if width % mc:
            raise ValueError(f"level {n} width {width} is not a multiple of model_channels {mc}")
        channel_mult.append(width // mc)
        has_attention = [f"input_blocks.{i}.1.proj_in.weight" in shapes for i in blocks]
        if any(has_attention) != all(has_attention):
            raise ValueError(f"unsupported UNet: only some blocks of level {n} have attention")
        depths = {_transformer_depth(shapes, f"input_blocks.{i}.1") for i in blocks if has_attention[0]}
        if len(depths) > 1:
            raise ValueError(
                f"unsupported UNet: transformer depth varies within level {n} ({sorted(depths)})"
            )
        level_depths.append(depths.pop() if depths else 0)
        if all(has_attention):
            attention_levels.append(n)

    num_output = len(_indices(shapes, "output_blocks."))
    if num_output != len(levels) * (num_res_blocks + 1):
        raise ValueError(
            f"weights do not look like {what}: {num_output} output blocks for {len(levels)} levels"
        )

    mid = "middle_block.1"
    proj_in = _shape(shapes, f"{mid}.proj_in.weight", what)
    middle_depth = _transformer_depth(shapes, mid)
    used = {level_depths[n] for n in attention_levels} | {middle_depth}
    if 0 in used or (family != "sdxl" and len(used) != 1):
        raise ValueError(f"unsupported UNet: transformer depth varies or is zero ({sorted(used)})")
    context_dim = _shape(shapes, f"{mid}.transformer_blocks.0.attn2.to_k.weight", what, ndim=2)[1]

    # SD 1.x and the x4 upscaler set num_heads: 8; SD 2.x and SDXL set num_head_channels: 64.
    if family not in ("sd1", "sd2", "sdxl", "upscale-x4"):
        raise ValueError(f"family must be 'sd1', 'sd2', 'sdxl' or 'upscale-x4', got {family!r}")
    num_heads, head_dim = (8, None) if family in ("sd1", "upscale-x4") else (None, 64)
    cfg = UNetConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=mc,
        channel_mult=tuple(channel_mult),
        num_res_blocks=num_res_blocks,
        attention_levels=tuple(attention_levels),
        transformer_depth=middle_depth,
        context_dim=context_dim,
        num_heads=num_heads,
        head_dim=head_dim,
        use_linear_projection=len(proj_in) == 2,
        level_depths=tuple(level_depths) if family == "sdxl" else (),
        adm_in_channels=adm_in_channels,
        num_classes=num_classes,
        cross_only_levels=_cross_only_levels(shapes, levels, attention_levels, context_dim),
    )
    for n in (*attention_levels, len(channel_mult) - 1):  # the last level's width is the middle's
        ch = mc * channel_mult[n]
        h, d = cfg.heads_for(ch)
        if h * d != ch or h == 0:
            raise ValueError(f"{ch} attention channels do not split into {family} heads")
    return cfg


def _cross_only_levels(
    shapes: Shapes, levels: list[list[int]], attention_levels: list[int], context_dim: int
) -> tuple[int, ...]:
    """Levels whose `attn1` attends to the context: its `to_k` takes the context's width, not the
    level's. Where the two widths are equal the shapes cannot tell, and self-attention is taken (the
    released upscaler's only such level, its last, is self-attention). Every block of a level must agree."""
    found = []
    for n in attention_levels:
        keys = [f"input_blocks.{i}.1.transformer_blocks.0.attn1.to_k.weight" for i in levels[n]]
        widths = {_shape(shapes, key, "a UNet", ndim=2) for key in keys}
        cross = {rows != cols and cols == context_dim for rows, cols in widths}
        if len(cross) > 1:
            raise ValueError(
                f"unsupported UNet: only some blocks of level {n} attend to the context in attn1"
            )
        if cross.pop():
            found.append(n)
    return tuple(found)


def _label_emb(shapes: Shapes, emb_dim: int, family: str) -> tuple[int, int]:
    """(input width of SDXL's added embedding `label_emb.0` (Linear, SiLU, Linear), classes of the x4
    upscaler's `label_emb` (an nn.Embedding)); zeros when absent."""
    if family == "upscale-x4":
        what = "an x4 upscaler UNet"
        classes, width = _shape(shapes, "label_emb.weight", what, ndim=2)
        if width != emb_dim:
            raise ValueError(
                f"weights do not look like {what}: label_emb.weight is not ({classes}, {emb_dim})"
            )
        return 0, classes
    if not any(key.startswith("label_emb.") for key in shapes):
        if family == "sdxl":
            raise ValueError("weights do not look like an SDXL UNet: no label_emb.0.0.weight")
        return 0, 0
    if family != "sdxl":
        raise ValueError("class-conditional UNets (label_emb) are only supported in SDXL checkpoints")
    what = "an SDXL UNet"
    rows, width = _shape(shapes, "label_emb.0.0.weight", what, ndim=2)
    if rows != emb_dim or _shape(shapes, "label_emb.0.2.weight", what, ndim=2) != (emb_dim, emb_dim):
        raise ValueError(f"weights do not look like {what}: label_emb does not map to {emb_dim} channels")
    return width, 0


def infer_autoencoder_config(shapes: Shapes) -> AutoencoderConfig:
    """AutoencoderConfig of CompVis-layout AutoencoderKL weights (`first_stage_model.` stripped)."""
    what = "a KL autoencoder"
    base, in_channels = _shape(shapes, "encoder.conv_in.weight", what, ndim=4)[:2]
    levels = _indices(shapes, "encoder.down.")
    if not levels:
        raise ValueError(f"weights do not look like {what}: no encoder.down.* keys")
    num_res_blocks = len(_indices(shapes, "encoder.down.0.block."))
    channel_mult: list[int] = []
    for i in levels:
        if len(_indices(shapes, f"encoder.down.{i}.block.")) != num_res_blocks:
            raise ValueError(f"unsupported autoencoder: res blocks per level differ (level {i})")
        width = _shape(shapes, f"encoder.down.{i}.block.0.conv1.weight", what, ndim=4)[0]
        if width % base:
            raise ValueError(f"level {i} width {width} is not a multiple of base_channels {base}")
        channel_mult.append(width // base)
    if _indices(shapes, "decoder.up.") != levels:
        raise ValueError(f"weights do not look like {what}: decoder and encoder levels differ")
    for i in levels:
        if len(_indices(shapes, f"decoder.up.{i}.block.")) != num_res_blocks + 1:
            raise ValueError(f"weights do not look like {what}: decoder.up.{i} has the wrong block count")

    # The file may name two latent widths (z_channels inside, embed_dim across quant_conv); SD has
    # one, and so does AutoencoderConfig.
    z = _shape(shapes, "post_quant_conv.weight", what, ndim=4)[0]
    expected = {
        "encoder.conv_out.weight": 2 * z,
        "quant_conv.weight": 2 * z,
        "decoder.conv_in.weight": None,  # checked for presence only
    }
    for key, rows in expected.items():
        shape = _shape(shapes, key, what, ndim=4)
        if rows is not None and shape[0] != rows:
            raise ValueError(f"unsupported autoencoder: {key} has {shape[0]} rows, expected {rows}")
    if _shape(shapes, "post_quant_conv.weight", what)[1] != z:
        raise ValueError("unsupported autoencoder: embed_dim differs from z_channels")
    if _shape(shapes, "decoder.conv_out.weight", what, ndim=4)[0] != in_channels:
        raise ValueError("unsupported autoencoder: decoder output channels differ from encoder input")
    return AutoencoderConfig(
        in_channels=in_channels,
        base_channels=base,
        channel_mult=tuple(channel_mult),
        num_res_blocks=num_res_blocks,
        latent_channels=z,
    )
