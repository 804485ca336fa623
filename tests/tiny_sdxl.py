"""Tiny random SDXL base and refiner checkpoints, written in the sgm single-file layout (through the
engine's own writer, `sdxl_text_state_dict`) with `tokenizer/` and `tokenizer_2/` beside them.

Small, but with SDXL's structure: a level without attention, per-level transformer depths, a last
level without attention (refiner), two text encoders of different widths (context 48 + 80), a
pooled projection narrower than its encoder, an f = 8 autoencoder, and the size-conditioning widths
(6 or 5 time ids of 256 channels each).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from service.ldm.autoencoder import Autoencoder
from service.ldm.config import (
    SDXL_BASE_TIME_IDS,
    SDXL_REFINER_TIME_IDS,
    SDXL_TIME_ID_WIDTH,
    SDXL_VAE_SCALING_FACTOR,
    AutoencoderConfig,
    ModelConfig,
    TextEncoderConfig,
    UNetConfig,
)
from service.ldm.layout import (
    CONFIG_METADATA_KEY,
    FORMAT_METADATA,
    SDXL_CLIP_G_PREFIX,
    SDXL_CLIP_L_PREFIX,
    SDXL_REFINER_CLIP_G_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
)
from service.ldm.sdxl_text import SDXLText, sdxl_text_state_dict
from service.ldm.text import build_text_model, load_tokenizer
from service.ldm.unet import UNet

from .reference import randomize
from .tiny import write_tokenizer

POOLED = 32  # ViT-bigG's projection width (1280 in SDXL)
CLIP_L = TextEncoderConfig(
    vocab_size=1024,
    hidden_size=48,
    intermediate_size=96,
    num_layers=2,
    num_heads=1,
    hidden_act="quick_gelu",
    penultimate=True,
)
CLIP_G = TextEncoderConfig(
    vocab_size=1024,
    hidden_size=80,
    intermediate_size=160,
    num_layers=3,
    num_heads=1,
    hidden_act="gelu",
    penultimate=True,
    projection_dim=POOLED,
)


def tiny_sdxl_config(refiner: bool = False, in_channels: int = 4) -> ModelConfig:
    if refiner:
        unet = UNetConfig(
            in_channels=in_channels,
            model_channels=64,
            channel_mult=(1, 2, 2),
            num_res_blocks=1,
            attention_levels=(1,),
            level_depths=(0, 1, 0),
            transformer_depth=1,
            context_dim=CLIP_G.hidden_size,
            num_heads=None,
            head_dim=64,
            use_linear_projection=True,
            adm_in_channels=SDXL_REFINER_TIME_IDS * SDXL_TIME_ID_WIDTH + POOLED,
        )
    else:
        unet = UNetConfig(
            in_channels=in_channels,
            model_channels=64,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_levels=(1,),
            level_depths=(0, 2),
            transformer_depth=2,
            context_dim=CLIP_L.hidden_size + CLIP_G.hidden_size,
            num_heads=None,
            head_dim=64,
            use_linear_projection=True,
            adm_in_channels=SDXL_BASE_TIME_IDS * SDXL_TIME_ID_WIDTH + POOLED,
        )
    vae = AutoencoderConfig(
        base_channels=32,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=1,
        latent_channels=4,
        scaling_factor=SDXL_VAE_SCALING_FACTOR,
    )
    return ModelConfig(
        family="sdxl",
        autoencoder=vae,
        unet=unet,
        text=CLIP_G if refiner else CLIP_L,
        text_2=None if refiner else CLIP_G,
        sample_size=1024,
        default_steps=30,
        default_guidance=5.0,
        default_strength=0.3 if refiner else 0.8,
    )


def write_sdxl_tokenizers(folder: Path, refiner: bool = False) -> list[Path]:
    """`tokenizer/` (pads with <|endoftext|>) and `tokenizer_2/` (pads with "!", as SDXL's); the
    refiner has only `tokenizer_2/`."""
    second = write_tokenizer(folder / "tokenizer_2", pad_token="!")
    return [second] if refiner else [write_tokenizer(folder / "tokenizer"), second]


def build_tiny_sdxl(
    config: ModelConfig, tokenizer_dirs: list[Path], seed: int = 0
) -> tuple[UNet, Autoencoder, SDXLText]:
    unet = randomize(UNet(config.unet), seed)
    out_conv = unet.out[-1]
    assert isinstance(out_conv, torch.nn.Conv2d) and out_conv.bias is not None
    with torch.no_grad():  # a trained UNet predicts unit-scale noise; random weights overshoot
        out_conv.weight.mul_(0.1)
        out_conv.bias.mul_(0.1)
    vae = randomize(Autoencoder(config.autoencoder), seed + 1)
    tokenizers = [load_tokenizer(folder) for folder in tokenizer_dirs]
    configs = [c for c in (config.text, config.text_2) if c is not None]
    encoders = []
    for i, (cfg, tokenizer) in enumerate(zip(configs, tokenizers, strict=True)):
        full = TextEncoderConfig(**{**cfg.__dict__, "penultimate": False})
        encoders.append(randomize(build_text_model(full, tokenizer), seed + 2 + i))
    pooled = config.pooled_text
    assert pooled is not None
    projection = randomize(torch.nn.Linear(pooled.hidden_size, pooled.projection_dim, bias=False), seed + 5)
    return unet, vae, SDXLText(encoders, tokenizers, projection)


def sdxl_state(unet: UNet, vae: Autoencoder, text: SDXLText) -> dict[str, torch.Tensor]:
    state = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    state.update({VAE_PREFIX + k: v for k, v in vae.state_dict().items()})
    state.update(sdxl_text_state_dict(text))
    return {k: v.detach().contiguous() for k, v in state.items()}


def write_sdxl_checkpoint(
    path: Path, refiner: bool = False, seed: int = 0, own_format: bool = False, in_channels: int = 4
) -> Path:
    """A tiny SDXL base (or refiner) in the sgm single-file layout, tokenizers beside it; with
    `own_format`, the project's format (the config in the metadata)."""
    config = tiny_sdxl_config(refiner, in_channels)
    folders = write_sdxl_tokenizers(path.parent, refiner)
    unet, vae, text = build_tiny_sdxl(config, folders, seed)
    state = sdxl_state(unet, vae, text)
    # What real files carry besides the weights.
    state["alphas_cumprod"] = torch.linspace(0.99, 0.01, 1000)
    bigg = SDXL_REFINER_CLIP_G_PREFIX if refiner else SDXL_CLIP_G_PREFIX
    state[bigg + "logit_scale"] = torch.tensor(4.6)
    if not refiner:
        state[SDXL_CLIP_L_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    metadata = {**FORMAT_METADATA, CONFIG_METADATA_KEY: config.to_json()} if own_format else None
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    return path
