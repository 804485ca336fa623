"""The LoRA adapters the gateway offers (the folder `LDM_LORA_DIR`), read from their safetensors
headers alone (no torch), and the check a request's adapters pass before anything is enqueued: each
exists (404 otherwise), and fits the model (family, every layer it adapts exists: 422 otherwise), by
the same rules the worker's loader applies (`service/ldm/lora_info.py`)."""

from __future__ import annotations

import logging
from pathlib import Path

from ..ldm.layout import read_header, resolve_checkpoint
from ..ldm.lora_info import LoraError, LoraFileError, LoraInfo, check_lora, lora_info
from ..ldm.lora_info import read_header as read_lora_header
from ..ldm.lora_keys import LoraNames, names_from_header
from ..ldm.request import LORA_NAME, LoraRef
from .catalog import ModelInfo
from .errors import InvalidField, UnknownLora

log = logging.getLogger(__name__)
SUFFIX = ".safetensors"


class LoraCatalog:
    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._infos: dict[Path, tuple[float, LoraInfo]] = {}  # path -> (mtime, info)
        self._names: dict[Path, LoraNames] = {}  # checkpoint -> its adaptable layers

    def path(self, name: str) -> Path | None:
        if self.folder is None or not LORA_NAME.match(name):
            return None
        path = self.folder / f"{name}{SUFFIX}"
        return path if path.is_file() else None

    def available(self) -> list[LoraInfo]:
        """Every readable adapter in the folder, by name (unreadable files are logged and left out)."""
        if self.folder is None or not self.folder.is_dir():
            return []
        infos = []
        for path in sorted(self.folder.glob(f"*{SUFFIX}")):
            try:
                infos.append(self.info(path))
            except (OSError, LoraFileError) as e:
                log.warning("LoRA %s left out: %s", path.name, e)
        return infos

    def info(self, path: Path) -> LoraInfo:
        mtime = path.stat().st_mtime
        cached = self._infos.get(path)
        if cached is None or cached[0] != mtime:
            cached = (mtime, lora_info(path, path.name.removesuffix(SUFFIX)))
            self._infos[path] = cached
        return cached[1]

    def check(self, refs: list[LoraRef], model: ModelInfo) -> None:
        """UnknownLora (404) for an adapter not in the folder; InvalidField (`loras`) for one that does
        not fit the model."""
        for ref in refs:
            path = self.path(ref.name)
            if path is None:
                raise UnknownLora(f"LoRA {ref.name!r} is not served here; see /v1/loras")
            try:
                shapes = {k: v.shape for k, v in read_lora_header(path)[0].items()}
                check_lora(ref.name, shapes, self._layers(model), model.config.family)
            except (LoraError, LoraFileError, OSError) as e:
                raise InvalidField("loras", str(e)) from None

    def _layers(self, model: ModelInfo) -> LoraNames | AnyLayer:
        """The model's adaptable layers from its checkpoint's header; when this gateway cannot read the
        checkpoint, any layer passes here and the worker's loader checks it."""
        try:
            file = resolve_checkpoint(model.path)
            if file not in self._names:
                header = read_header(file)
                header.pop("__metadata__", None)
                shapes = {key: tuple(entry["shape"]) for key, entry in header.items()}
                self._names[file] = names_from_header(model.config, shapes)
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.debug("model %s: LoRA layers not checked here (%s)", model.name, e)
            return AnyLayer()
        return self._names[file]


class AnyLayer:
    def find(self, module: str) -> object:
        return module
