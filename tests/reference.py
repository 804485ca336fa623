"""Reference models for parity tests: diffusers' modules, built and filled by diffusers' own
single-file conversion code from state dicts in the original SD layout."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import diffusers
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
)
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)
from torch import Tensor, nn

from service.ldm.config import AutoencoderConfig, ModelConfig, UNetConfig
from service.ldm.layout import UNET_PREFIX, VAE_PREFIX
from service.ldm.text import build_text_model

M = TypeVar("M", bound=nn.Module)


def randomize(module: M, seed: int) -> M:
    """Every parameter random, norms included, so no default init can make outputs match trivially;
    matrices scaled by fan-in so activations stay O(1) through the depth."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif name.endswith("weight"):  # GroupNorm / LayerNorm gains
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
    return module.eval()


def original_unet_params(cfg: UNetConfig) -> dict[str, Any]:
    """The `unet_config.params` of an original LDM yaml describing `cfg`."""
    params: dict[str, Any] = {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "model_channels": cfg.model_channels,
        "channel_mult": list(cfg.channel_mult),
        "attention_resolutions": [2**level for level in cfg.attention_levels],  # downsampling rates
        "num_res_blocks": cfg.num_res_blocks,
        "transformer_depth": cfg.transformer_depth,
        "context_dim": cfg.context_dim,
        "use_linear_in_transformer": cfg.use_linear_projection,
    }
    if cfg.num_heads is not None:
        params["num_heads"] = cfg.num_heads
    else:
        params["num_head_channels"] = cfg.head_dim
    return params


def original_yaml(unet: UNetConfig, ae: AutoencoderConfig) -> dict[str, Any]:
    ddconfig = {
        "ch": ae.base_channels,
        "ch_mult": list(ae.channel_mult),
        "num_res_blocks": ae.num_res_blocks,
        "z_channels": ae.latent_channels,
        "in_channels": ae.in_channels,
        "out_ch": ae.in_channels,
    }
    return {
        "model": {
            "params": {
                "scale_factor": ae.scaling_factor,
                "unet_config": {"params": original_unet_params(unet)},
                "first_stage_config": {"params": {"ddconfig": ddconfig}},
            }
        }
    }


def diffusers_unet(cfg: UNetConfig, state: dict[str, Tensor]) -> tuple[Any, dict[str, Tensor]]:
    """(diffusers UNet for `cfg`, our prefixed state dict converted to its layout)."""
    config = create_unet_diffusers_config_from_ldm(original_yaml(cfg, AutoencoderConfig()), state)
    model = diffusers.UNet2DConditionModel(**config)
    return model, convert_ldm_unet_checkpoint(state, config)


def diffusers_vae(cfg: AutoencoderConfig, state: dict[str, Tensor]) -> tuple[Any, dict[str, Tensor]]:
    config = create_vae_diffusers_config_from_ldm(original_yaml(UNetConfig(), cfg), state)
    model = diffusers.AutoencoderKL(**config)
    return model, convert_ldm_vae_checkpoint(state, config)


# diffusers' schedulers configured as Stable Diffusion v1.5's model card has them.
SD15_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "timestep_spacing": "leading",
    "steps_offset": 1,
}
SCHEDULERS: dict[str, Callable[[str], Any]] = {
    "ddim": lambda p: DDIMScheduler(
        **SD15_SCHEDULER, set_alpha_to_one=False, clip_sample=False, prediction_type=p
    ),
    "euler": lambda p: EulerDiscreteScheduler(**SD15_SCHEDULER, prediction_type=p),
    "dpmpp_2m": lambda p: DPMSolverMultistepScheduler(**SD15_SCHEDULER, prediction_type=p),
    "dpmpp_2m_karras": lambda p: DPMSolverMultistepScheduler(
        **SD15_SCHEDULER, use_karras_sigmas=True, prediction_type=p
    ),
}


def reference_pipeline(state: dict[str, Tensor], config: ModelConfig, tokenizer: Any, sampler: str) -> Any:
    """diffusers' `StableDiffusionPipeline` over an SD-layout state dict, filled by diffusers' own
    key maps (typed Any: diffusers' lazy modules defeat mypy)."""
    unet, unet_state = diffusers_unet(
        config.unet, {k: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    )
    unet.load_state_dict(unet_state, strict=True)
    vae, vae_state = diffusers_vae(
        config.autoencoder, {k: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    )
    vae.load_state_dict(vae_state, strict=True)
    text = build_text_model(config.text, tokenizer)
    clip = convert_ldm_clip_checkpoint(state)
    text.load_state_dict(
        {k.removeprefix("text_model."): v for k, v in clip.items() if "position_ids" not in k}
    )
    pipe: Any = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=SCHEDULERS[sampler]("v_prediction" if config.prediction == "v" else "epsilon"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
