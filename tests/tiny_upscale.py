"""A tiny random x4 upscaler in the original single-file layout, and diffusers'
`StableDiffusionUpscalePipeline` over the same file, filled by diffusers' own conversion functions
(its single-file loader needs the released model's config from the Hub, so its modules are built from
the original yaml's parameters, as `reference.py` does for SD)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, StableDiffusionUpscalePipeline
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_open_clip_checkpoint,
    create_unet_diffusers_config_from_ldm,
)
from safetensors.torch import save_file
from torch import Tensor

from service.ldm.checkpoint import sd_state_dict
from service.ldm.config import (
    UPSCALE_VAE_SCALING_FACTOR,
    AutoencoderConfig,
    ModelConfig,
    TextEncoderConfig,
    UNetConfig,
)
from service.ldm.layout import LOW_SCALE_PREFIX, UNET_PREFIX, VAE_PREFIX
from service.ldm.schedule import DiscreteSchedule
from service.ldm.text import build_text_model, load_tokenizer

from .reference import diffusers_vae, original_unet_params, original_yaml
from .tiny import build_tiny

# Level widths 32, 64, 128 with a 48-wide context: level 1's attn1 attends to the text (its to_k is
# (64, 48)), level 2's to itself, as the released upscaler's levels 1-2 and 3.
TINY_UNET = UNetConfig(
    in_channels=7,
    out_channels=4,
    model_channels=32,
    channel_mult=(1, 2, 4),
    num_res_blocks=1,
    attention_levels=(1, 2),
    transformer_depth=1,
    context_dim=48,
    num_heads=8,
    head_dim=None,
    use_linear_projection=True,
    num_classes=1000,
    cross_only_levels=(1,),
)
TINY_VAE = AutoencoderConfig(
    base_channels=32,
    channel_mult=(1, 2, 2),
    num_res_blocks=1,
    latent_channels=4,
    scaling_factor=UPSCALE_VAE_SCALING_FACTOR,
)
TINY_TEXT = TextEncoderConfig(
    vocab_size=1024,
    hidden_size=48,
    intermediate_size=96,
    num_layers=3,
    num_heads=1,
    max_positions=77,
    hidden_act="gelu",
    penultimate=True,
)
LOW_RES_BETAS = (0.0001, 0.02)


def tiny_upscaler_config() -> ModelConfig:
    return ModelConfig(
        family="upscale-x4", prediction="v", autoencoder=TINY_VAE, unet=TINY_UNET, text=TINY_TEXT
    )


def low_scale_buffers() -> dict[str, Tensor]:
    """The DDPM buffers the original's ImageConcatWithNoiseAugmentation registers (float64 maths)."""
    betas = torch.linspace(LOW_RES_BETAS[0] ** 0.5, LOW_RES_BETAS[1] ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    buffers = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]]),
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
    }
    return {LOW_SCALE_PREFIX + k: v.float() for k, v in buffers.items()}


def write_upscaler_checkpoint(path: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    config = tiny_upscaler_config()
    unet, vae, text = build_tiny(config, tokenizer_dir, seed)
    state = {k: v.contiguous() for k, v in sd_state_dict(unet, vae, text, "sd2").items()}
    state.update(low_scale_buffers())
    state["alphas_cumprod"] = DiscreteSchedule(beta_start=0.0001, beta_end=0.02).alphas_cumprod.clone()
    state["cond_stage_model.model.text_projection"] = torch.zeros(48, 48)
    state["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


def _diffusers_unet(cfg: UNetConfig, state: dict[str, Tensor]) -> Any:
    yaml = original_yaml(cfg, AutoencoderConfig())
    params = yaml["model"]["params"]["unet_config"]["params"]
    params["num_classes"] = cfg.num_classes
    params["disable_self_attentions"] = [n in cfg.cross_only_levels for n in range(len(cfg.channel_mult))]
    assert params == {**original_unet_params(cfg), **params}
    config = create_unet_diffusers_config_from_ldm(yaml, state)
    unet = diffusers.UNet2DConditionModel(**config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(state, config), strict=True)
    return unet.eval()


def reference_upscale_pipeline(
    state: dict[str, Tensor], config: ModelConfig, tokenizer_dir: Path, sampler: str
) -> Any:
    unet = _diffusers_unet(config.unet, {k: v for k, v in state.items() if k.startswith(UNET_PREFIX)})
    vae, vae_state = diffusers_vae(
        config.autoencoder, {k: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    )
    vae.load_state_dict(vae_state, strict=True)
    tokenizer = load_tokenizer(tokenizer_dir)
    text = build_text_model(config.text, tokenizer)
    converted = {
        k.removeprefix("text_model."): v for k, v in convert_open_clip_checkpoint(text, state).items()
    }
    wanted = text.state_dict().keys()
    text.load_state_dict({k: v for k, v in converted.items() if k in wanted}, strict=True)
    betas = {
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
    }
    leading = {"timestep_spacing": "leading", "steps_offset": 1, "prediction_type": "v_prediction"}
    schedulers = {
        "ddim": lambda: DDIMScheduler(**betas, **leading, set_alpha_to_one=False, clip_sample=False),
        "euler": lambda: EulerDiscreteScheduler(**betas, **leading),
    }
    pipe: Any = StableDiffusionUpscalePipeline(
        vae=vae.eval(),
        text_encoder=text.eval(),
        tokenizer=tokenizer,
        unet=unet,
        low_res_scheduler=DDPMScheduler(**betas),
        scheduler=schedulers[sampler](),
        max_noise_level=350,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
