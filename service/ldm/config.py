"""Architecture configs of the three networks of a latent diffusion model, as dataclasses.

A checkpoint's config is either inferred from its keys and shapes (Stable Diffusion files, see
`checkpoint.py`) or read from the JSON stored in its safetensors metadata (the project's own
format, see `ModelConfig.to_json`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

Family = Literal["sd1", "sd2", "custom"]
Prediction = Literal["eps", "v"]


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
    transformer_depth: int = 1
    context_dim: int = 768
    num_heads: int | None = 8  # SD 1.x: a fixed number of heads in every attention layer
    head_dim: int | None = None  # SD 2.x: a fixed head width (64); exactly one of the two is set
    use_linear_projection: bool = False  # SD 2.x: proj_in / proj_out are Linear, not 1x1 conv

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
    penultimate: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a model and use it with sensible defaults."""

    family: Family = "sd1"
    prediction: Prediction = "eps"
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    # Serving defaults: the size the model was trained at, and what a request gets when silent.
    sample_size: int = 512
    default_steps: int = 20
    default_guidance: float = 7.5
    default_sampler: str = "dpmpp_2m"

    @property
    def latent_channels(self) -> int:
        return self.autoencoder.latent_channels

    @property
    def downsample_factor(self) -> int:
        return self.autoencoder.downsample_factor

    @property
    def is_inpainting(self) -> bool:
        return self.unet.in_channels == 2 * self.latent_channels + 1

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
        return _build(cls, {**raw, **parts})


def _build(cls: Any, values: dict[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
    # JSON has no tuples: give tuple-typed fields their type back so configs compare equal.
    converted = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**converted)
