"""The single-file checkpoint layout, read without torch: component prefixes, the safetensors header,
and a model's config from its keys and shapes (or from the project's own metadata).

The engine (`checkpoint.py`) and the gateway (which reads headers only, and must never import torch)
both go through here, so a model's native size, size multiple and defaults are read one way.

Two formats share the original CompVis / Stability key layout:

- Stable Diffusion single files: `model.diffusion_model.*` (UNet), `first_stage_model.*`
  (autoencoder), and `cond_stage_model.transformer.*` (SD 1.x, transformers' CLIP layout) or
  `cond_stage_model.model.*` (SD 2.x, OpenCLIP layout). No config: it is inferred (`arch.py`).
- The project's own format: the same layout, with the config as JSON in the safetensors metadata
  under `ldm.config` (`ModelConfig.to_json`).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from .arch import infer_autoencoder_config, infer_unet_config
from .config import ModelConfig, TextEncoderConfig

V = TypeVar("V")
Shapes = Mapping[str, tuple[int, ...]]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_HF_PREFIX = "cond_stage_model.transformer."
CLIP_OPENCLIP_PREFIX = "cond_stage_model.model."
CONFIG_METADATA_KEY = "ldm.config"
FORMAT_METADATA = {"format": "pt", "ldm.format": "ldm-service/1"}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own bound
PARTS = (
    ("unet", UNET_PREFIX),
    ("vae", VAE_PREFIX),
    ("clip_hf", CLIP_HF_PREFIX),
    ("clip_openclip", CLIP_OPENCLIP_PREFIX),
)
# Keys real SD files carry that inference does not use: the training-time DDPM buffers, the EMA
# bookkeeping, and the autoencoder's training loss (LPIPS, discriminator).
IGNORED = re.compile(
    r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod"
    r"|posterior_variance|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2"
    r"|logvar|lvlb_weights|model_ema\..*|first_stage_model\.loss\..*"
    r"|cond_stage_model\.transformer\.(text_model\.)?embeddings\.position_ids)$"
)
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class HeaderConfig:
    """A model's config as read from its checkpoint's header, and where it came from."""

    config: ModelConfig
    source: Literal["metadata", "weights"]


def resolve_checkpoint(path: Path) -> Path:
    """A model folder stands for the single .safetensors file inside it."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise CheckpointError(f"{path} should hold exactly one .safetensors file, found {len(files)}")
        return files[0]
    return path


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes, `__metadata__`); reads
    nothing of the tensors themselves."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", head)
        if size > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: not a safetensors file (header of {size} bytes)")
        raw = f.read(size)
    if len(raw) != size:
        raise CheckpointError(f"{path}: truncated safetensors header")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not an object)")
    return header


def read_config(path: Path) -> HeaderConfig:
    """The config of a checkpoint (file or model folder) from its header alone."""
    file = resolve_checkpoint(path)
    header = read_header(file)
    metadata = header.pop("__metadata__", None) or {}
    try:
        shapes = {key: tuple(entry["shape"]) for key, entry in header.items()}
    except (KeyError, TypeError):
        raise CheckpointError(f"{file}: not a safetensors file (an entry has no shape)") from None
    config = infer_config(split_components(shapes), metadata, file)
    return HeaderConfig(config, "metadata" if CONFIG_METADATA_KEY in metadata else "weights")


def split_components(state: Mapping[str, V]) -> dict[str, dict[str, V]]:
    """Splits an SD single-file state dict (tensors, or shapes) by component prefix; unknown keys are
    an error. HF text-encoder keys lose the `text_model.` level that older transformers had."""
    parts: dict[str, dict[str, V]] = {part: {} for part, _ in PARTS}
    unexpected: list[str] = []
    for key, value in state.items():
        if IGNORED.match(key):
            continue
        for part, prefix in PARTS:
            if key.startswith(prefix):
                parts[part][key.removeprefix(prefix)] = value
                break
        else:
            unexpected.append(key)
    if unexpected:
        raise CheckpointError(f"unexpected keys outside the SD layout: {few(unexpected)}")
    for part, prefix in (("unet", UNET_PREFIX), ("vae", VAE_PREFIX)):
        if not parts[part]:
            raise CheckpointError(f"no {prefix}* keys: this is not a Stable Diffusion checkpoint")
    if not parts["clip_hf"] and not parts["clip_openclip"]:
        raise CheckpointError(f"no text encoder keys ({CLIP_HF_PREFIX}* or {CLIP_OPENCLIP_PREFIX}*)")
    parts["clip_hf"] = {normalize_hf_key(k): v for k, v in parts["clip_hf"].items()}
    return parts


def infer_config(
    parts: Mapping[str, Mapping[str, Any]], metadata: Mapping[str, str], path: Path
) -> ModelConfig:
    """The project's metadata config when present, else the architecture read off the shapes (SD 1.x
    or 2.x by the text encoder's layout). `parts` values are tensors or shapes: anything with a shape."""
    if CONFIG_METADATA_KEY in metadata:
        try:
            return ModelConfig.from_json(metadata[CONFIG_METADATA_KEY])
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: bad {CONFIG_METADATA_KEY} metadata: {e}") from None
    family: Literal["sd1", "sd2"] = "sd2" if parts["clip_openclip"] else "sd1"
    try:
        unet = infer_unet_config(_shapes(parts["unet"]), family)
        vae = infer_autoencoder_config(_shapes(parts["vae"]))
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return ModelConfig(family=family, unet=unet, autoencoder=vae, text=infer_text_config(parts))


def infer_text_config(parts: Mapping[str, Mapping[str, Any]]) -> TextEncoderConfig:
    """CLIP text encoder shape from the keys; heads are 64 wide in both SD families."""
    if parts["clip_openclip"]:
        state = _shapes(parts["clip_openclip"])
        vocab, width = _shape(state, "token_embedding.weight", CLIP_OPENCLIP_PREFIX)
        positions = _shape(state, "positional_embedding", CLIP_OPENCLIP_PREFIX)[0]
        ff = _shape(state, "transformer.resblocks.0.mlp.c_fc.weight", CLIP_OPENCLIP_PREFIX)[0]
        layers, act, penultimate = openclip_layers(state), "gelu", True
    else:
        state = _shapes(parts["clip_hf"])
        vocab, width = _shape(state, "embeddings.token_embedding.weight", CLIP_HF_PREFIX)
        positions = _shape(state, "embeddings.position_embedding.weight", CLIP_HF_PREFIX)[0]
        ff = _shape(state, "encoder.layers.0.mlp.fc1.weight", CLIP_HF_PREFIX)[0]
        layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layers."))
        act, penultimate = "quick_gelu", False
    return TextEncoderConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=ff,
        num_layers=layers,
        num_heads=max(1, width // 64),
        max_positions=positions,
        hidden_act=act,  # type: ignore[arg-type]
        penultimate=penultimate,
    )


def normalize_hf_key(key: str) -> str:
    """`text_model.encoder...` (older transformers, real SD 1.x files) -> `encoder...`."""
    return key.removeprefix("text_model.")


def openclip_layers(state: Mapping[str, object]) -> int:
    """Resblocks in an OpenCLIP text tower's keys."""
    blocks = {int(m.group(1)) for k in state if (m := _RESBLOCK.match(k))}
    return max(blocks) + 1 if blocks else 0


def few(keys: list[str], limit: int = 8) -> str:
    """The first keys of a list, for error messages."""
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def _shapes(state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in state.items()}


def _shape(state: Shapes, key: str, prefix: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"missing key {prefix}{key}")
    return tuple(state[key])
