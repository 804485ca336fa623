"""diffusers' SDXL pipelines over an sgm-layout state dict, every module filled by diffusers' own
single-file converters (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
`convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`), configured from the original
(`network_config`) yaml that describes the model, as `from_single_file` does."""

from __future__ import annotations

from typing import Any

import diffusers
import torch
from diffusers import (
    EulerAncestralDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from service.ldm.config import SDXL_TIME_ID_WIDTH, ModelConfig, TextEncoderConfig
from service.ldm.layout import SDXL_CLIP_G_PREFIX, SDXL_REFINER_CLIP_G_PREFIX
from service.ldm.text import build_text_model

from .reference import SCHEDULERS, SD15_SCHEDULER

SDXL_SCHEDULERS = {
    **SCHEDULERS,
    "euler_a": lambda p: EulerAncestralDiscreteScheduler(**SD15_SCHEDULER, prediction_type=p),
}


def original_config(config: ModelConfig) -> dict[str, Any]:
    """The sgm yaml of `config` (`network_config`, transformer depth per level, adm_in_channels)."""
    unet, ae = config.unet, config.autoencoder
    depths = [unet.depth_at(level) or unet.transformer_depth for level in range(len(unet.channel_mult))]
    network = {
        "in_channels": unet.in_channels,
        "out_channels": unet.out_channels,
        "model_channels": unet.model_channels,
        "channel_mult": list(unet.channel_mult),
        "attention_resolutions": [2**level for level in unet.attention_levels],
        "num_res_blocks": unet.num_res_blocks,
        "transformer_depth": depths,  # the last is the middle block's, as sgm's default
        "context_dim": unet.context_dim,
        "num_head_channels": unet.head_dim,
        "use_linear_in_transformer": unet.use_linear_projection,
        "num_classes": "sequential",
        "adm_in_channels": unet.adm_in_channels,
    }
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
                "network_config": {"params": network},
                "first_stage_config": {"params": {"ddconfig": ddconfig}},
            }
        }
    }


def _unet(config: ModelConfig, state: dict[str, Tensor]) -> Any:
    yaml = original_config(config)
    unet_config = create_unet_diffusers_config_from_ldm(yaml, state)
    # diffusers recognises SDXL by its real context widths (2048 base, 1280 refiner); the tiny models'
    # are narrower, so the embedding type is set as it is for those.
    unet_config.update(
        class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_ID_WIDTH
    )
    unet = diffusers.UNet2DConditionModel(**unet_config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(state, unet_config), strict=True)
    vae_config = create_vae_diffusers_config_from_ldm(yaml, state)
    vae = diffusers.AutoencoderKL(**vae_config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(state, vae_config), strict=True)
    return unet.eval(), vae.eval()


def _bigg(cfg: TextEncoderConfig, tokenizer: CLIPTokenizer, state: dict[str, Tensor], prefix: str) -> Any:
    hf = CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        hidden_act=cfg.hidden_act,
        projection_dim=cfg.projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = CLIPTextModelWithProjection(hf)
    model.load_state_dict(convert_open_clip_checkpoint(model, state, prefix=prefix), strict=True)
    return model.eval()


def _clip_l(cfg: TextEncoderConfig, tokenizer: CLIPTokenizer, state: dict[str, Tensor]) -> Any:
    model = build_text_model(TextEncoderConfig(**{**cfg.__dict__, "penultimate": False}), tokenizer)
    converted = convert_ldm_clip_checkpoint(state)
    model.load_state_dict(
        {k.removeprefix("text_model."): v for k, v in converted.items() if "position_ids" not in k},
        strict=True,
    )
    return model.eval()


def reference_sdxl(
    state: dict[str, Tensor], config: ModelConfig, tokenizers: list[CLIPTokenizer], sampler: str
) -> Any:
    """`StableDiffusionXLPipeline` for a base, `StableDiffusionXLImg2ImgPipeline` (aesthetic score on,
    zero negatives off, as the refiner's model_index.json) for a refiner."""
    unet, vae = _unet(config, state)
    scheduler = SDXL_SCHEDULERS[sampler]("v_prediction" if config.prediction == "v" else "epsilon")
    pipe: Any
    if config.is_refiner:
        pipe = StableDiffusionXLImg2ImgPipeline(
            vae=vae,
            text_encoder=None,
            text_encoder_2=_bigg(config.text, tokenizers[0], state, SDXL_REFINER_CLIP_G_PREFIX),
            tokenizer=None,
            tokenizer_2=tokenizers[0],
            unet=unet,
            scheduler=scheduler,
            requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False,
            add_watermarker=False,
        )
    else:
        assert config.text_2 is not None
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=_clip_l(config.text, tokenizers[0], state),
            text_encoder_2=_bigg(config.text_2, tokenizers[1], state, SDXL_CLIP_G_PREFIX),
            tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1],
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def img2img_of(pipe: Any) -> Any:
    """The base's img2img pipeline on the same modules (for the base's img2img and hand-offs)."""
    out: Any = StableDiffusionXLImg2ImgPipeline(**pipe.components, requires_aesthetics_score=False)
    out.set_progress_bar_config(disable=True)
    return out


def decode(pipe: Any, latents: Tensor) -> Tensor:
    """diffusers' decode of final latents to 0..255 pixels (H, W, 3), as the engine rounds them."""
    with torch.inference_mode():
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return ((image.clamp(-1, 1) + 1) * 127.5).round().squeeze(0).permute(1, 2, 0)
