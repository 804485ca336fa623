"""Architecture configs of the three networks of a latent diffusion model, as dataclasses.

A checkpoint's config is either inferred from its keys and shapes (Stable Diffusion files, see
`layout.py`) or read from the JSON stored in its safetensors metadata (the project's own
format, see `ModelConfig.to_json`).

SDXL (Podell et al. 2023) adds to the SD 1/2 configs: per-level transformer depths and levels
without attention (`UNetConfig.level_depths`), an additional embedding of the pooled text and size
conditioning (`UNetConfig.adm_in_channels`, the `label_emb` of the original code), a second text
encoder (`ModelConfig.text_2`) and the pooled projection of the last one (`projection_dim`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

Family = Literal["sd1", "sd2", "sdxl", "upscale-x4", "custom"]
Task = Literal["txt2img", "inpaint", "img2img", "upscale"]
Prediction = Literal["eps", "v"]

# SDXL's added conditioning (sgm's `ConcatTimestepEmbedderND`, diffusers' `addition_time_embed_dim`):
# every size, crop and aesthetic id is Fourier-embedded to 256 channels. The base has six ids (original
# size, crop top-left, target size: h, w each), the refiner five (target size -> aesthetic score).
SDXL_TIME_ID_WIDTH = 256
SDXL_BASE_TIME_IDS = 6
SDXL_REFINER_TIME_IDS = 5
SDXL_VAE_SCALING_FACTOR = 0.13025  # SDXL's autoencoder has SD's architecture but other latent statistics
# The x4 upscaler (LDM paper sec. 4.4, Stability's `x4-upscaling.yaml`): an f = 4 autoencoder with this
# latent scale, the low-res image concatenated to the latent (3 channels), noised on a schedule of its
# own up to this level, which the UNet is told through its class embedding (`label_emb`).
UPSCALE_VAE_SCALING_FACTOR = 0.08333
UPSCALE_MAX_NOISE_LEVEL = 350
UPSCALE_DEFAULT_NOISE_LEVEL = 20  # diffusers' StableDiffusionUpscalePipeline
UPSCALE_FACTOR = 4
# Tiled decoding (`tiling.py`): latents per tile side by default (512 pixels at f = 4, 1024 at f = 8, so
# SDXL's 1024x1024 images decode whole).
DECODE_TILE = 128


@dataclass(frozen=True)
class AutoencoderConfig:
    """KL autoencoder of the LDM paper (sec. 3.1); `first_stage_model.*` in SD files."""

    in_channels: int = 3
    base_channels: int = 128  # "ch" in the original code
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    latent_channels: int = 4  # "z_channels"; the encoder emits 2x this (mean and log-variance)
    scaling_factor: float = 0.18215  # latents are multiplied by this before the UNet sees them

    @property
    def downsample_factor(self) -> int:
        return int(2 ** (len(self.channel_mult) - 1))


@dataclass(frozen=True)
class UNetConfig:
    """Denoising UNet with spatial transformers (LDM paper sec. 3.3); `model.diffusion_model.*`."""

    in_channels: int = 4  # 9 for inpainting checkpoints: latent + mask + masked-image latent
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)  # levels that have spatial transformers
    transformer_depth: int = 1  # the middle block's, and every attention level's unless level_depths
    context_dim: int = 768
    num_heads: int | None = 8  # SD 1.x: a fixed number of heads in every attention layer
    head_dim: int | None = None  # SD 2.x: a fixed head width (64); exactly one of the two is set
    use_linear_projection: bool = False  # SD 2.x: proj_in / proj_out are Linear, not 1x1 conv
    # SDXL: transformer depth per level (0 where a level has no attention), e.g. (0, 2, 10); empty:
    # transformer_depth at every attention level (SD 1/2).
    level_depths: tuple[int, ...] = ()
    # SDXL: width of the additional embedding (`label_emb`): the pooled text embedding and the
    # Fourier-embedded size / crop / aesthetic ids (2816 base, 2560 refiner); 0: none.
    adm_in_channels: int = 0
    # The x4 upscaler: classes of its `label_emb` embedding (an nn.Embedding of the low-res noise level,
    # 1000 in the released file); 0: none.
    num_classes: int = 0
    # Levels whose transformers' first attention attends to the context instead of to the feature map
    # (the original's `disable_self_attentions`, diffusers' `only_cross_attention`): the upscaler's upper
    # levels, where self-attention over a large image would not fit.
    cross_only_levels: tuple[int, ...] = ()

    def depth_at(self, level: int) -> int:
        """Transformer blocks per spatial transformer at `level` (0: no attention there)."""
        if level not in self.attention_levels:
            return 0
        return self.level_depths[level] if self.level_depths else self.transformer_depth

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(number of heads, head width) of an attention layer over `channels` channels."""
        if self.num_heads is not None:
            return self.num_heads, channels // self.num_heads
        assert self.head_dim is not None
        return channels // self.head_dim, self.head_dim


@dataclass(frozen=True)
class TextEncoderConfig:
    """CLIP text transformer (transformers' `CLIPTextModel`); `cond_stage_model.*` in SD files."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_positions: int = 77
    hidden_act: Literal["quick_gelu", "gelu"] = "quick_gelu"
    # SD 2.x conditions on the penultimate layer (then the final layer norm); SD 1.x on the last.
    # SDXL's encoders condition on the penultimate layer's output as it is (no final norm).
    penultimate: bool = False
    # OpenCLIP's text projection width (SDXL's ViT-bigG: the pooled embedding); 0: none used.
    projection_dim: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a model and use it with sensible defaults."""

    family: Family = "sd1"
    prediction: Prediction = "eps"
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    # SD 1/2: the text encoder; SDXL base: CLIP ViT-L; SDXL refiner: its one encoder, OpenCLIP ViT-bigG.
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    # SDXL base: the second encoder, OpenCLIP ViT-bigG (its pooled projection conditions the UNet too).
    text_2: TextEncoderConfig | None = None
    # Serving defaults: the size the model was trained at, and what a request gets when silent.
    sample_size: int = 512
    default_steps: int = 20
    default_guidance: float = 7.5
    default_sampler: str = "dpmpp_2m"
    default_strength: float = 0.8  # img2img; diffusers' SDXL refiner pipeline uses 0.3
    # The DDPM noise schedule (scaled-linear betas): SD's, unless the model was trained on another (the x4
    # upscaler: 0.0001 -> 0.02, for the latent and for the low-res image alike).
    beta_start: float = 0.00085
    beta_end: float = 0.012
    # The x4 upscaler: the highest noise level of the low-res image, and a request's default.
    max_noise_level: int = UPSCALE_MAX_NOISE_LEVEL
    default_noise_level: int = UPSCALE_DEFAULT_NOISE_LEVEL

    @property
    def latent_channels(self) -> int:
        return self.autoencoder.latent_channels

    @property
    def downsample_factor(self) -> int:
        return self.autoencoder.downsample_factor

    @property
    def is_inpainting(self) -> bool:
        return self.unet.in_channels == 2 * self.latent_channels + 1

    @property
    def is_upscaler(self) -> bool:
        """The x4 upscaler: the low-res image's 3 channels beside the latent, its noise level as a class."""
        return self.unet.num_classes > 0 and self.unet.in_channels == self.latent_channels + 3

    @property
    def task(self) -> Task:
        """What the model serves: upscaling, inpainting, refining (img2img only), or txt2img (and img2img)."""
        if self.is_upscaler:
            return "upscale"
        if self.is_inpainting:
            return "inpaint"
        return "img2img" if self.is_refiner else "txt2img"

    @property
    def is_sdxl(self) -> bool:
        return self.family == "sdxl"

    @property
    def is_refiner(self) -> bool:
        """An SDXL refiner: one encoder (ViT-bigG), conditioned on an aesthetic score, not a target size."""
        return self.is_sdxl and self.text_2 is None

    @property
    def pooled_text(self) -> TextEncoderConfig | None:
        """The encoder whose pooled projection conditions the UNet (SDXL: ViT-bigG), None for SD 1/2."""
        if not self.is_sdxl:
            return None
        return self.text_2 if self.text_2 is not None else self.text

    def with_prediction(self, prediction: Prediction) -> ModelConfig:
        return replace(self, prediction=prediction)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("model config must be a JSON object")
        parts: dict[str, Any] = {}
        for name, sub in (
            ("autoencoder", AutoencoderConfig),
            ("unet", UNetConfig),
            ("text", TextEncoderConfig),
        ):
            parts[name] = _build(sub, raw.pop(name, {}))
        text_2 = raw.pop("text_2", None)
        parts["text_2"] = None if text_2 is None else _build(TextEncoderConfig, text_2)
        return _build(cls, {**raw, **parts})


def _build(cls: Any, values: dict[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
    # JSON has no tuples: give tuple-typed fields their type back so configs compare equal.
    converted = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**converted)
