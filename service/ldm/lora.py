"""LoRA adapters (Hu et al. 2021): read from safetensors files and mapped onto a model's layers.

kohya/A1111 and diffusers/PEFT files both load (key grammars in `lora_info.py`, layer names in
`lora_keys.py`), strictly, as checkpoints do: every key must map to a layer of this model and fit
its shape. The file's alpha / rank is folded into the up (B) matrix here, so applying an adapter
(`lora_rows.py`, per row of a batched call, unmerged) only multiplies by the request's weight.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import CheckpointError, read_safetensors
from .lora_info import PEFT_PREFIX, LoraError, LoraFamily, check_lora, module_of
from .lora_keys import LoraNames, Part, Target

__all__ = ["LoraAdapter", "LoraError", "LoraLayer", "adaptable", "load_lora"]

log = logging.getLogger(__name__)

LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' JSON of the LoraConfig, per component
_uids = itertools.count()


@dataclass(frozen=True)
class LoraLayer:
    """One adapted layer: `down` (A) is (r, in) or (r, in, kh, kw); `up` (B) is (out, r) or
    (out, r, 1, 1), with the file's alpha / rank already multiplied in."""

    down: Tensor
    up: Tensor


@dataclass(eq=False)
class LoraAdapter:
    """A loaded adapter: its layers by our module paths, in the UNet and in the text encoder.

    Compared by identity; `uid` is unique per load, so caches keyed on it never confuse two
    loads of a name (the text-embedding cache keys on it).
    """

    name: str
    family: LoraFamily
    unet: dict[str, LoraLayer]
    text: dict[str, LoraLayer]
    rank: int
    uid: str = ""
    text2: dict[str, LoraLayer] = field(default_factory=dict)  # SDXL's second text encoder

    def __post_init__(self) -> None:
        if not self.uid:
            self.uid = f"{self.name}#{next(_uids)}"

    @property
    def nbytes(self) -> int:
        layers = itertools.chain(self.unet.values(), self.text.values(), self.text2.values())
        return sum(t.numel() * t.element_size() for layer in layers for t in (layer.down, layer.up))

    def layers(self, part: Part) -> dict[str, LoraLayer]:
        return {"unet": self.unet, "text": self.text, "text2": self.text2}[part]

    @property
    def changes_text(self) -> bool:
        return bool(self.text or self.text2)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> LoraAdapter:
        def move(layers: dict[str, LoraLayer]) -> dict[str, LoraLayer]:
            return {k: LoraLayer(v.down.to(device, dtype), v.up.to(device, dtype)) for k, v in layers.items()}

        unet, text, text2 = move(self.unet), move(self.text), move(self.text2)
        return LoraAdapter(self.name, self.family, unet, text, self.rank, self.uid, text2)


# -- reading ------------------------------------------------------------------------------------------


def adaptable(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The layers a LoRA can adapt: every Linear and Conv2d."""
    for name, layer in module.named_modules():
        if isinstance(layer, nn.Linear | nn.Conv2d):
            yield name, layer


def load_lora(
    path: Path,
    names: LoraNames,
    layers: Mapping[tuple[Part, str], nn.Module],
    model_family: str,
    name: str | None = None,
) -> LoraAdapter:
    """Reads a kohya or diffusers/PEFT LoRA file and maps every layer onto a model's modules.

    Strict like the checkpoint loader: a key that is no LoRA weight, a module that maps to no
    layer, or a shape that does not fit is an error naming the adapter and the key as spelled.
    """
    path = Path(path)
    label = name or path.stem
    try:
        tensors, metadata = read_safetensors(path)
    except CheckpointError as e:
        raise LoraError(f"LoRA {label!r}: {e}") from None
    family, modules = check_lora(label, {k: tuple(v.shape) for k, v in tensors.items()}, names, model_family)
    peft = _peft_config(metadata)
    adapter = LoraAdapter(label, family, {}, {}, 0)
    ranks: set[int] = set()
    for module, keys in modules.items():
        target = names.find(module)
        assert target is not None
        layer = _build_layer(label, module, keys, tensors, target, layers[target.part, target.path], peft)
        adapter.layers(target.part)[target.path] = layer
        ranks.add(layer.down.shape[0])
    adapter.rank = max(ranks)
    log.info(
        "LoRA %s: %d UNet and %d text-encoder layers, rank %s",
        label,
        len(adapter.unet),
        len(adapter.text) + len(adapter.text2),
        "/".join(map(str, sorted(ranks))),
    )
    return adapter


def _peft_config(metadata: Mapping[str, str]) -> dict[str, Any]:
    """diffusers' `lora_adapter_metadata` (LoraConfig fields, prefixed per component), if any."""
    raw = metadata.get(LORA_METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return config if isinstance(config, dict) else {}


def _peft_scale(module: str, part: Part, rank: int, config: Mapping[str, Any]) -> float:
    """PEFT's scaling lora_alpha / r (or / sqrt(r) with rsLoRA), alpha_pattern honoured; 1 if unknown."""
    component = {"unet": "unet", "text": "text_encoder", "text2": "text_encoder_2"}[part]
    bare = module.removeprefix(PEFT_PREFIX).removeprefix(component + ".")

    def field(name: str) -> Any:
        return config.get(f"{component}.{name}", config.get(name))

    alpha = field("lora_alpha")
    for pattern, value in (field("alpha_pattern") or {}).items():
        if bare == pattern or bare.endswith("." + pattern):
            alpha = value
    if alpha is None:
        return 1.0
    return float(alpha) / (rank**0.5 if field("use_rslora") else rank)


def _build_layer(
    label: str,
    module: str,
    keys: list[str],
    tensors: Mapping[str, Tensor],
    target: Target,
    base: nn.Module,
    peft: Mapping[str, Any],
) -> LoraLayer:
    by_suffix = {module_of(k)[1]: k for k in keys}  # type: ignore[index]
    down_key = by_suffix.get(".lora_down.weight") or by_suffix.get(".lora_A.weight")
    up_key = by_suffix.get(".lora_up.weight") or by_suffix.get(".lora_B.weight")
    if down_key is None or up_key is None:
        raise LoraError(f"LoRA {label!r}: {keys[0]} comes without its down/up (A/B) partner")
    down, up = tensors[down_key].float(), tensors[up_key].float()
    if isinstance(base, nn.Conv2d):
        kh, kw = base.kernel_size
        if down.ndim == 2 and (kh, kw) == (1, 1):
            down = down[:, :, None, None]
        expected_down: tuple[int, ...] = (down.shape[0], base.in_channels, kh, kw)
        up = up[:, :, None, None] if up.ndim == 2 else up
        expected_up: tuple[int, ...] = (base.out_channels, down.shape[0], 1, 1)
    else:
        assert isinstance(base, nn.Linear)
        down = down.flatten(1) if down.ndim == 4 and down.shape[2:] == (1, 1) else down
        up = up.flatten(1) if up.ndim == 4 and up.shape[2:] == (1, 1) else up
        expected_down, expected_up = (down.shape[0], base.in_features), (base.out_features, down.shape[0])
    for key, tensor, expected in ((down_key, down, expected_down), (up_key, up, expected_up)):
        if tuple(tensor.shape) != expected:
            raise LoraError(
                f"LoRA {label!r}: {key} has shape {tuple(tensors[key].shape)}, this model's "
                f"{target.path} needs {expected}"
            )
    rank = down.shape[0]
    alpha_key = by_suffix.get(".alpha")
    if alpha_key is not None:
        scale = float(tensors[alpha_key].float().item()) / rank
    elif module.startswith("lora_"):
        scale = 1.0  # kohya without alpha: the delta as trained
    else:
        scale = _peft_scale(module, target.part, rank, peft)
    return LoraLayer(down.contiguous(), (up * scale).contiguous())
