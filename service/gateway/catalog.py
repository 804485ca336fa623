"""What the gateway knows of its models, without torch: each checkpoint's config, read from its
safetensors header the way the engine reads it (`service/ldm/layout.py`), and live workers.

A checkpoint the gateway cannot read (a gateway host without the weights, a model still training)
gets Stable Diffusion 1.x's config (`ModelConfig()`) and is read again later.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..ldm.config import ModelConfig
from ..ldm.layout import read_config

log = logging.getLogger(__name__)
RETRY_S = 10.0  # an unreadable checkpoint is read again at most this often


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: Path
    config: ModelConfig
    source: Literal["metadata", "weights", "defaults"] = "defaults"
    error: str = ""  # why the checkpoint could not be read, when source is "defaults"


def read_model_info(name: str, path: Path) -> ModelInfo:
    """The model's config from its checkpoint's header; SD 1.x's with `error` set if unreadable."""
    try:
        found = read_config(path)
    except (OSError, ValueError) as e:
        return ModelInfo(name, path, ModelConfig(), error=str(e) or type(e).__name__)
    return ModelInfo(name, path, found.config, found.source)


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
            size, multiple = info.config.sample_size, info.config.downsample_factor
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
