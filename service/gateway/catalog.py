"""What the gateway knows of its models, without torch: native size, size multiple and defaults.

They are read from the checkpoint's safetensors header: the file starts with an 8-byte little-endian
header length, then a JSON header naming every tensor (dtype, shape, offsets) and, under
`__metadata__`, the project's own format's config (`ldm.config`, see `service/ldm/config.py`).
Stable Diffusion files carry no config: their size multiple (the autoencoder's downsampling) and
inpainting UNet are read off the tensor names and shapes; the rest are SD 1.x's defaults, as the
engine applies them. A checkpoint the gateway cannot read (a gateway host without the weights, a
model still training) gets SD 1.x's defaults and is read again later.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

# The engine's sampler names (service.ldm.samplers.SAMPLERS, which imports torch); a test keeps them equal.
SAMPLERS: tuple[str, ...] = ("ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras")
CONFIG_METADATA_KEY = "ldm.config"  # service.ldm.checkpoint.CONFIG_METADATA_KEY
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own bound
RETRY_S = 10.0  # an unreadable checkpoint is read again at most this often
_VAE_LEVEL = re.compile(r"^first_stage_model\.encoder\.down\.(\d+)\.")
_UNET_INPUT = "model.diffusion_model.input_blocks.0.0.weight"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: Path
    family: str = "sd1"
    native_size: int = 512  # width and height a request gets when it gives none
    size_multiple: int = 8  # the autoencoder's downsampling factor: sizes must be multiples of it
    default_steps: int = 20
    default_guidance: float = 7.5
    default_sampler: str = "dpmpp_2m"
    inpainting: bool = False
    source: Literal["metadata", "weights", "defaults"] = "defaults"
    error: str = ""  # why the checkpoint could not be read, when source is "defaults"


def checkpoint_file(path: Path) -> Path:
    """A model folder stands for the single .safetensors file inside it (as the engine reads it)."""
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise ValueError(f"{path} should hold exactly one .safetensors file, found {len(files)}")
        return files[0]
    return path


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file; reads nothing of the tensors themselves."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", head)
        if size > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: not a safetensors file (header of {size} bytes)")
        raw = f.read(size)
    if len(raw) != size:
        raise ValueError(f"{path}: truncated safetensors header")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (header is not an object)")
    return header


def read_model_info(name: str, path: Path) -> ModelInfo:
    """The model's facts from its checkpoint's header; SD 1.x defaults with `error` set if unreadable."""
    info = ModelInfo(name=name, path=path)
    try:
        header = read_header(checkpoint_file(path))
        metadata = header.get("__metadata__") or {}
        if CONFIG_METADATA_KEY in metadata:
            return _from_config(info, json.loads(metadata[CONFIG_METADATA_KEY]))
        return _from_weights(info, header)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return replace(info, error=str(e) or type(e).__name__)


def _from_config(info: ModelInfo, config: dict[str, Any]) -> ModelInfo:
    """The project's own format: ModelConfig as JSON (service/ldm/config.py)."""
    vae = config.get("autoencoder", {})
    latent = int(vae.get("latent_channels", 4))
    return replace(
        info,
        family=str(config.get("family", "custom")),
        native_size=int(config.get("sample_size", 512)),
        size_multiple=2 ** (len(vae.get("channel_mult", (1, 2, 4, 4))) - 1),
        default_steps=int(config.get("default_steps", 20)),
        default_guidance=float(config.get("default_guidance", 7.5)),
        default_sampler=str(config.get("default_sampler", "dpmpp_2m")),
        inpainting=int(config.get("unet", {}).get("in_channels", latent)) == 2 * latent + 1,
        source="metadata",
    )


def _from_weights(info: ModelInfo, header: dict[str, Any]) -> ModelInfo:
    """A Stable Diffusion single file: the autoencoder's levels and the UNet's input channels."""
    levels = {int(m.group(1)) for key in header if (m := _VAE_LEVEL.match(key))}
    if not levels:
        raise ValueError(f"{info.path}: no autoencoder weights (first_stage_model.*)")
    unet_in = header.get(_UNET_INPUT, {}).get("shape", [0, 4])[1]
    sd2 = any(key.startswith("cond_stage_model.model.") for key in header)
    return replace(
        info,
        family="sd2" if sd2 else "sd1",
        size_multiple=2 ** (max(levels)),
        inpainting=unet_in == 9,
        source="weights",
    )


class Catalog:
    """The gateway's models by name; the first one is the default."""

    def __init__(self, models: dict[str, Path]) -> None:
        self.paths = dict(models)
        self.default = next(iter(self.paths))
        self._infos = {name: self._read(name, path) for name, path in self.paths.items()}
        self._read_at = dict.fromkeys(self.paths, time.monotonic())

    @staticmethod
    def _read(name: str, path: Path) -> ModelInfo:
        info = read_model_info(name, path)
        if info.error:
            log.warning(
                "model %s: %s; using Stable Diffusion 1.x defaults until it can be read", name, info.error
            )
        else:
            size, multiple = info.native_size, info.size_multiple
            log.info("model %s: %dx%d, sizes multiple of %d (%s)", name, size, size, multiple, info.source)
        return info

    def names(self) -> list[str]:
        return list(self.paths)

    def infos(self) -> list[ModelInfo]:
        return [info for name in self.paths if (info := self.get(name)) is not None]

    def get(self, name: str) -> ModelInfo | None:
        if name not in self.paths:
            return None
        info = self._infos[name]
        if info.error and time.monotonic() - self._read_at[name] > RETRY_S:
            self._infos[name] = info = self._read(name, self.paths[name])
            self._read_at[name] = time.monotonic()
        return info
