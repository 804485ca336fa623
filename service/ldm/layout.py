"""The single-file checkpoint layout, read without torch: component prefixes, the safetensors header,
and a model's config from its keys and shapes (or from the project's own metadata).

The engine (`checkpoint.py`) and the gateway (which reads headers only, and must never import torch)
both go through here, so a model's native size, size multiple and defaults are read one way.

Two formats share the original CompVis / Stability key layout:

- Stable Diffusion single files: `model.diffusion_model.*` (UNet), `first_stage_model.*`
  (autoencoder), and `cond_stage_model.transformer.*` (SD 1.x, transformers' CLIP layout) or
  `cond_stage_model.model.*` (SD 2.x, OpenCLIP layout). No config: it is inferred (`arch.py`).
  SDXL files (Stability's `sgm` layout) hold the text encoders under `conditioner.embedders.N.`:
  the base `0.transformer.*` (CLIP ViT-L, transformers' layout) and `1.model.*` (OpenCLIP ViT-bigG,
  with its `text_projection`), the refiner only `0.model.*` (ViT-bigG).
- The x4 upscaler (Stability's `x4-upscaler-ema.safetensors`): SD 2's layout, plus the low-res image's
  noise schedule (`low_scale_model.*` buffers) and the UNet's class embedding `label_emb.weight`.
- The project's own format: the same layout, with the config as JSON in the safetensors metadata
  under `ldm.config` (`ModelConfig.to_json`).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

from .arch import infer_autoencoder_config, infer_unet_config
from .config import (
    SDXL_BASE_TIME_IDS,
    SDXL_REFINER_TIME_IDS,
    SDXL_TIME_ID_WIDTH,
    SDXL_VAE_SCALING_FACTOR,
    UPSCALE_VAE_SCALING_FACTOR,
    ModelConfig,
    TextEncoderConfig,
)

V = TypeVar("V")
Shapes = Mapping[str, tuple[int, ...]]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_HF_PREFIX = "cond_stage_model.transformer."
CLIP_OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_CLIP_G_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_CLIP_G_PREFIX = "conditioner.embedders.0.model."
LOW_SCALE_PREFIX = "low_scale_model."  # the x4 upscaler's low-res noise schedule (DDPM buffers)
CONFIG_METADATA_KEY = "ldm.config"
FORMAT_METADATA = {"format": "pt", "ldm.format": "ldm-service/1"}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own bound
PARTS = (
    ("unet", UNET_PREFIX),
    ("vae", VAE_PREFIX),
    ("clip_hf", CLIP_HF_PREFIX),
    ("clip_openclip", CLIP_OPENCLIP_PREFIX),
    ("sdxl_clip_l", SDXL_CLIP_L_PREFIX),
    ("sdxl_clip_g", SDXL_CLIP_G_PREFIX),
    ("sdxl_refiner_clip_g", SDXL_REFINER_CLIP_G_PREFIX),
    ("low_scale", LOW_SCALE_PREFIX),
)
SD_TEXT_PARTS = ("clip_hf", "clip_openclip")
SDXL_TEXT_PARTS = ("sdxl_clip_l", "sdxl_clip_g", "sdxl_refiner_clip_g")
# Serving defaults of SDXL models: diffusers' guidance (5.0) and the refiner's img2img strength (0.3).
SDXL_DEFAULTS: dict[str, Any] = {"sample_size": 1024, "default_steps": 30, "default_guidance": 5.0}
# The x4 upscaler's, as Stability's `x4-upscaling.yaml` and diffusers' StableDiffusionUpscalePipeline have
# them: v-prediction, betas 0.0001 -> 0.02 (latent and low-res image), 75 DDIM steps, guidance 9.
# sample_size: the output side of its 128-pixel training crops' inputs (it upscales any size).
UPSCALE_DEFAULTS: dict[str, Any] = {
    "prediction": "v",
    "sample_size": 512,
    "default_steps": 75,
    "default_guidance": 9.0,
    "default_sampler": "ddim",
    "beta_start": 0.0001,
    "beta_end": 0.02,
}
# Keys real SD files carry that inference does not use: the training-time DDPM buffers, the EMA
# bookkeeping, and the autoencoder's training loss (LPIPS, discriminator).
IGNORED = re.compile(
    r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod"
    r"|posterior_variance|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2"
    r"|logvar|lvlb_weights|model_ema\..*|first_stage_model\.loss\..*"
    r"|(cond_stage_model|conditioner\.embedders\.0)\.transformer\.(text_model\.)?embeddings\.position_ids)$"
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
    _check_text_parts({part for part, keys in parts.items() if keys})
    for part in ("clip_hf", "sdxl_clip_l"):
        parts[part] = {normalize_hf_key(k): v for k, v in parts[part].items()}
    return parts


def _check_text_parts(present: set[str]) -> None:
    """One text-encoder layout per file: SD 1.x, SD 2.x, the SDXL base (two encoders) or refiner."""
    prefixes = dict(PARTS)
    found = sorted(present & {*SD_TEXT_PARTS, *SDXL_TEXT_PARTS})
    if not found:
        raise CheckpointError(
            f"no text encoder keys ({CLIP_HF_PREFIX}*, {CLIP_OPENCLIP_PREFIX}*, or SDXL's "
            f"{SDXL_CLIP_L_PREFIX}* with {SDXL_CLIP_G_PREFIX}*, or {SDXL_REFINER_CLIP_G_PREFIX}*)"
        )
    layouts = [{"clip_hf"}, {"clip_openclip"}, {"sdxl_clip_l", "sdxl_clip_g"}, {"sdxl_refiner_clip_g"}]
    if set(found) not in layouts:
        if set(found) in ({"sdxl_clip_l"}, {"sdxl_clip_g"}):
            other = "sdxl_clip_g" if found == ["sdxl_clip_l"] else "sdxl_clip_l"
            raise CheckpointError(
                f"an SDXL base file holds two text encoders: {prefixes[found[0]]}* but no {prefixes[other]}*"
            )
        named = ", ".join(f"{prefixes[part]}*" for part in found)
        raise CheckpointError(f"text encoder keys of more than one layout: {named}")


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
    if any(parts.get(part) for part in SDXL_TEXT_PARTS):
        return infer_sdxl_config(parts, path)
    if "label_emb.weight" in parts["unet"] or parts.get("low_scale"):
        return infer_upscaler_config(parts, path)
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
        return openclip_text_config(parts["clip_openclip"], CLIP_OPENCLIP_PREFIX)
    return hf_text_config(parts["clip_hf"], CLIP_HF_PREFIX)


def openclip_text_config(
    state: Mapping[str, Any], prefix: str, projection: bool = False
) -> TextEncoderConfig:
    """An OpenCLIP text tower (SD 2.x's ViT-H, SDXL's ViT-bigG), conditioning on its penultimate layer;
    `projection`: its `text_projection` is used (SDXL's pooled embedding)."""
    shapes = _shapes(state)
    vocab, width = _shape(shapes, "token_embedding.weight", prefix)
    positions = _shape(shapes, "positional_embedding", prefix)[0]
    ff = _shape(shapes, "transformer.resblocks.0.mlp.c_fc.weight", prefix)[0]
    projection_dim = 0
    if projection:
        rows, projection_dim = _shape(shapes, "text_projection", prefix)
        if rows != width:
            raise CheckpointError(f"{prefix}text_projection has {rows} rows, the encoder is {width} wide")
    return TextEncoderConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=ff,
        num_layers=openclip_layers(shapes),
        num_heads=max(1, width // 64),
        max_positions=positions,
        hidden_act="gelu",
        penultimate=True,
        projection_dim=projection_dim,
    )


def hf_text_config(state: Mapping[str, Any], prefix: str, penultimate: bool = False) -> TextEncoderConfig:
    """A CLIP text encoder in transformers' layout (SD 1.x's and SDXL's ViT-L; `text_model.` removed)."""
    shapes = _shapes(state)
    vocab, width = _shape(shapes, "embeddings.token_embedding.weight", prefix)
    positions = _shape(shapes, "embeddings.position_embedding.weight", prefix)[0]
    ff = _shape(shapes, "encoder.layers.0.mlp.fc1.weight", prefix)[0]
    layers = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.layers."))
    return TextEncoderConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=ff,
        num_layers=layers,
        num_heads=max(1, width // 64),
        max_positions=positions,
        hidden_act="quick_gelu",
        penultimate=penultimate,
    )


def infer_sdxl_config(parts: Mapping[str, Mapping[str, Any]], path: Path) -> ModelConfig:
    """SDXL base (ViT-L and ViT-bigG) or refiner (ViT-bigG alone), checked against the UNet's context
    width and its added-embedding width (256 per time id, plus the pooled projection)."""
    refiner = bool(parts["sdxl_refiner_clip_g"])
    if refiner:
        text = openclip_text_config(parts["sdxl_refiner_clip_g"], SDXL_REFINER_CLIP_G_PREFIX, projection=True)
        text_2 = None
        context = text.hidden_size
    else:
        text = hf_text_config(parts["sdxl_clip_l"], SDXL_CLIP_L_PREFIX, penultimate=True)
        text_2 = openclip_text_config(parts["sdxl_clip_g"], SDXL_CLIP_G_PREFIX, projection=True)
        context = text.hidden_size + text_2.hidden_size
    try:
        unet = infer_unet_config(_shapes(parts["unet"]), "sdxl")
        vae = replace(infer_autoencoder_config(_shapes(parts["vae"])), scaling_factor=SDXL_VAE_SCALING_FACTOR)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    pooled = (text_2 or text).projection_dim
    role, ids = ("refiner", SDXL_REFINER_TIME_IDS) if refiner else ("base", SDXL_BASE_TIME_IDS)
    if unet.adm_in_channels != SDXL_TIME_ID_WIDTH * ids + pooled:
        other_ids = SDXL_BASE_TIME_IDS if refiner else SDXL_REFINER_TIME_IDS
        if unet.adm_in_channels == SDXL_TIME_ID_WIDTH * other_ids + pooled:
            other = "base" if refiner else "refiner"
            raise CheckpointError(
                f"{path}: the UNet is an SDXL {other}'s ({UNET_PREFIX}label_emb.0.0.weight takes "
                f"{unet.adm_in_channels} = {other_ids} x {SDXL_TIME_ID_WIDTH} + {pooled}) but the text "
                f"encoders are the {role}'s"
            )
        raise CheckpointError(
            f"{path}: {UNET_PREFIX}label_emb.0.0.weight takes {unet.adm_in_channels} channels; an SDXL "
            f"{role} has {ids} x {SDXL_TIME_ID_WIDTH} + {pooled} (time ids + pooled text)"
        )
    if unet.context_dim != context:
        raise CheckpointError(
            f"{path}: the UNet attends to {unet.context_dim} channels, the text encoders give {context}"
        )
    defaults = {**SDXL_DEFAULTS, "default_strength": 0.3} if refiner else SDXL_DEFAULTS
    return ModelConfig(family="sdxl", unet=unet, autoencoder=vae, text=text, text_2=text_2, **defaults)


def infer_upscaler_config(parts: Mapping[str, Mapping[str, Any]], path: Path) -> ModelConfig:
    """The x4 upscaler: SD 2's OpenCLIP text encoder (penultimate layer), a UNet taking the latent and
    the low-res image (in_channels = latent + 3) with the noise level as a class, an f = 4 autoencoder."""
    if not parts["clip_openclip"]:
        raise CheckpointError(
            f"{path}: an x4 upscaler's text encoder is OpenCLIP's ({CLIP_OPENCLIP_PREFIX}*)"
        )
    try:
        unet = infer_unet_config(_shapes(parts["unet"]), "upscale-x4")
        vae = replace(
            infer_autoencoder_config(_shapes(parts["vae"])), scaling_factor=UPSCALE_VAE_SCALING_FACTOR
        )
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if unet.in_channels != vae.latent_channels + 3:
        raise CheckpointError(
            f"{path}: an x4 upscaler's UNet takes the latent and the low-res image "
            f"({vae.latent_channels} + 3 channels), {UNET_PREFIX}input_blocks.0.0.weight "
            f"takes {unet.in_channels}"
        )
    if vae.downsample_factor != 4:
        raise CheckpointError(
            f"{path}: an x4 upscaler's autoencoder is f = 4, this one f = {vae.downsample_factor}"
        )
    return ModelConfig(
        family="upscale-x4", unet=unet, autoencoder=vae, text=infer_text_config(parts), **UPSCALE_DEFAULTS
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
