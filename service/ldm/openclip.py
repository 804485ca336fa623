"""Key maps between the two text-encoder layouts found in Stable Diffusion files.

SD 1.x files hold transformers' CLIP layout under `cond_stage_model.transformer.` (with or without
the `text_model.` level that older transformers releases had). SD 2.x files hold OpenCLIP's layout
under `cond_stage_model.model.`, with fused q/k/v projections; they are converted to the
`CLIPTextModel` layout at load time.
"""

from __future__ import annotations

import re

import torch

from .layout import normalize_hf_key

Tensor = torch.Tensor

# OpenCLIP keys that SD never uses: the contrastive head.
OPENCLIP_UNUSED = ("text_projection", "logit_scale")

_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")

# Per-layer renames (OpenCLIP name, transformers name); the fused attention is handled apart.
_LAYER_RENAMES = (
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("attn.out_proj.", "self_attn.out_proj."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
)
_TOP_RENAMES = (
    ("token_embedding.weight", "embeddings.token_embedding.weight"),
    ("positional_embedding", "embeddings.position_embedding.weight"),
    ("ln_final.weight", "final_layer_norm.weight"),
    ("ln_final.bias", "final_layer_norm.bias"),
)


def openclip_to_hf(state: dict[str, Tensor], layers: int) -> tuple[dict[str, Tensor], list[str]]:
    """OpenCLIP text tower -> CLIPTextModel keys, keeping resblocks below `layers`.

    Returns the converted dict and the OpenCLIP keys that were deliberately left out (the
    contrastive head, and the last block when SD 2.x conditions on the penultimate layer).
    """
    out: dict[str, Tensor] = {}
    dropped: list[str] = []
    top = dict(_TOP_RENAMES)
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        if key in OPENCLIP_UNUSED:
            dropped.append(key)
            continue
        m = _RESBLOCK.match(key)
        if m is None:
            out[key] = value  # left as-is: the strict load reports it as unexpected
            continue
        index, rest = int(m.group(1)), m.group(2)
        if index >= layers:
            dropped.append(key)
            continue
        prefix = f"encoder.layers.{index}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]  # weight | bias
            q, k, v = value.chunk(3, dim=0)  # fused (3D, ...) -> three (D, ...)
            out[f"{prefix}self_attn.q_proj.{kind}"] = q
            out[f"{prefix}self_attn.k_proj.{kind}"] = k
            out[f"{prefix}self_attn.v_proj.{kind}"] = v
            continue
        for old, new in _LAYER_RENAMES:
            if rest.startswith(old):
                rest = new + rest.removeprefix(old)
                break
        out[prefix + rest] = value
    return out, dropped


def hf_to_openclip(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """CLIPTextModel keys -> OpenCLIP layout; the inverse of `openclip_to_hf` (used to write files)."""
    out: dict[str, Tensor] = {}
    top = {new: old for old, new in _TOP_RENAMES}
    fused: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        key = normalize_hf_key(key)
        if key in top:
            out[top[key]] = value
            continue
        m = _LAYER.match(key)
        if m is None:
            if key != "embeddings.position_ids":
                out[key] = value
            continue
        index, rest = int(m.group(1)), m.group(2)
        qkv = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
        if qkv:
            fused.setdefault((index, qkv.group(2)), {})[qkv.group(1)] = value
            continue
        for old, new in _LAYER_RENAMES:
            if rest.startswith(new):
                rest = old + rest.removeprefix(new)
                break
        out[f"transformer.resblocks.{index}.{rest}"] = value
    for (index, kind), parts in fused.items():
        out[f"transformer.resblocks.{index}.attn.in_proj_{kind}"] = torch.cat(
            [parts[c] for c in "qkv"], dim=0
        )
    return out
