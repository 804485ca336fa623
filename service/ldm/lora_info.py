"""What a LoRA file is, from its safetensors header alone, without torch.

The gateway lists and checks adapters on CPU nodes that never import torch (DESIGN.md: it starts
in well under a second), so this module reads only the header of a safetensors file: an 8-byte
little-endian length, then that many bytes of JSON giving every tensor's dtype, shape and offsets.
The engine's loader (`lora.py`) uses the same key grammar and family rules, so a file the gateway
accepts is classified the same way where it is loaded.

Key grammars recognised (the two that cover nearly every published SD adapter):

- kohya-ss / A1111: `lora_unet_<module>` / `lora_te_<module>` (SD 1.x, 2.x) or `lora_te1_`,
  `lora_te2_` (SDXL's two text encoders), each with `.lora_down.weight`, `.lora_up.weight` and an
  optional `.alpha` (scale = alpha / rank); `<module>` is the module path with dots as underscores.
- diffusers / PEFT: `unet.<path>.lora_A.weight` / `.lora_B.weight` (and `text_encoder.`,
  `text_encoder_2.`), optionally behind PEFT's `base_model.model.` prefix.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

LoraFamily = Literal["sd1", "sd2", "sdxl", "unknown"]

KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".alpha")
PEFT_PREFIX = "base_model.model."
SDXL_PREFIXES = ("lora_te1_", "lora_te2_", "text_encoder_2.")
# Width of the context the UNet's cross-attention reads (attn2.to_k's input), and of the text
# encoder's hidden states: each SD family has its own (SDXL's second encoder is 1280 wide).
_CONTEXT_WIDTH: dict[int, LoraFamily] = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
# A header bigger than this is not a LoRA (SD 1.5's whole checkpoint has a ~100 KB header).
MAX_HEADER_BYTES = 64 << 20


class LoraFileError(ValueError):
    """A LoRA file that cannot be read or is not a LoRA; the message names the file."""


class LoraError(ValueError):
    """An adapter that cannot be used with this model; the message names the adapter and why."""


class ModuleNames(Protocol):
    def find(self, module: str) -> object | None: ...


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class LoraInfo:
    """What the gateway needs to know about an adapter file before any worker loads it."""

    name: str
    family: LoraFamily
    rank: int  # the most common rank over its layers (0 when it has none)
    bytes: int  # size of the file
    layers: int  # adapted layers (UNet and text encoders together)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor dtypes and shapes, and the string metadata, of a safetensors file (header only)."""
    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"LoRA file {path} does not exist")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LoraFileError(f"{path} is not a safetensors file ({size} bytes, no header)")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES or length > size - 8:
            raise LoraFileError(f"{path} is truncated or not a safetensors file: its header is cut off")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LoraFileError(f"{path} is not a safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise LoraFileError(f"{path} is not a safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    end = 0
    for key, entry in header.items():
        tensors[key] = _tensor_info(path, key, entry)
        end = max(end, int(entry["data_offsets"][1]))
    if 8 + length + end > size:
        raise LoraFileError(f"{path} is truncated: its tensors end past the end of the file")
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _tensor_info(path: Path, key: str, entry: Any) -> TensorInfo:
    try:
        shape = tuple(int(d) for d in entry["shape"])
        start, stop = (int(o) for o in entry["data_offsets"])
        dtype = str(entry["dtype"])
    except (TypeError, KeyError, ValueError):
        raise LoraFileError(f"{path}: bad header entry for {key!r}") from None
    if start > stop:
        raise LoraFileError(f"{path}: bad data offsets for {key!r}")
    return TensorInfo(dtype, shape)


def module_of(key: str) -> tuple[str, str] | None:
    """(module name as the file spells it, suffix) for a LoRA key; None if it is not one."""
    for suffix in (*KOHYA_SUFFIXES, *PEFT_SUFFIXES):
        if key.endswith(suffix):
            return key.removesuffix(suffix), suffix
    return None


def is_down(suffix: str) -> bool:
    return suffix in (".lora_down.weight", ".lora_A.weight")


def lora_family(shapes: dict[str, tuple[int, ...]]) -> LoraFamily:
    """The SD family an adapter was trained for: SDXL by its second text encoder's keys, otherwise
    by the width of the cross-attention context (or of the text encoder) its layers read."""
    if any(k.removeprefix(PEFT_PREFIX).startswith(SDXL_PREFIXES) for k in shapes):
        return "sdxl"
    for key, shape in shapes.items():
        parsed = module_of(key)
        if parsed is None or not is_down(parsed[1]) or len(shape) < 2:
            continue
        module = parsed[0].replace(".", "_")
        if module.endswith("attn2_to_k") or module.endswith("attn2_to_v"):
            return _CONTEXT_WIDTH.get(shape[1], "unknown")
    for key, shape in shapes.items():
        parsed = module_of(key)
        if parsed and is_down(parsed[1]) and "self_attn_q_proj" in parsed[0].replace(".", "_"):
            return _CONTEXT_WIDTH.get(shape[1], "unknown")
    return "unknown"


def lora_info(path: Path, name: str | None = None) -> LoraInfo:
    """Name, family, rank, size and layer count of an adapter file, from its header alone."""
    path = Path(path)
    tensors, _ = read_header(path)
    ranks: Counter[int] = Counter()
    modules: set[str] = set()
    for key, info in tensors.items():
        parsed = module_of(key)
        if parsed is None:
            continue
        modules.add(parsed[0])
        if is_down(parsed[1]) and info.shape:
            ranks[info.shape[0]] += 1
    if not modules:
        raise LoraFileError(f"{path} holds no LoRA weights (no .lora_down/.lora_A keys)")
    family = lora_family({k: v.shape for k, v in tensors.items()})
    rank = ranks.most_common(1)[0][0] if ranks else 0
    return LoraInfo(name or path.stem, family, rank, path.stat().st_size, len(modules))


def check_lora(
    label: str, shapes: dict[str, tuple[int, ...]], names: ModuleNames, model_family: str
) -> tuple[LoraFamily, dict[str, list[str]]]:
    """Whether an adapter fits a model, from its keys and shapes (the gateway checks the header, the
    engine the loaded file, the same way): its family, and its modules as the file spells them ->
    their keys (down first). LoraError names the adapter and the first keys that do not fit."""
    family = lora_family(shapes)
    if family == "sdxl" and model_family != "sdxl":
        sdxl_keys = [k for k in shapes if k.removeprefix(PEFT_PREFIX).startswith(SDXL_PREFIXES)]
        raise LoraError(
            f"LoRA {label!r} is an SDXL adapter ({sdxl_keys[0] if sdxl_keys else 'SDXL shapes'}); "
            f"this model is {model_family}"
        )
    if family in ("sd1", "sd2") and model_family in ("sd1", "sd2") and family != model_family:
        raise LoraError(f"LoRA {label!r} was trained for {family}; this model is {model_family}")
    modules = group_keys(label, shapes)
    unmapped = [keys[0] for module, keys in modules.items() if names.find(module) is None]
    if unmapped:
        raise LoraError(
            f"LoRA {label!r}: {len(unmapped)} of its layers match no layer of this model, "
            f"first: {', '.join(unmapped[:5])}"
        )
    return family, modules


def group_keys(label: str, keys: Iterable[str]) -> dict[str, list[str]]:
    """Module name as spelled in the file -> its keys (down first)."""
    modules: dict[str, list[str]] = {}
    foreign = []
    for key in keys:
        parsed = module_of(key)
        if parsed is None:
            foreign.append(key)
            continue
        group = modules.setdefault(parsed[0], [])
        group.insert(0, key) if is_down(parsed[1]) else group.append(key)
    if foreign:
        raise LoraError(
            f"LoRA {label!r}: keys that are not LoRA weights (LoHa, LoKr and DoRA are not supported): "
            f"{', '.join(foreign[:5])}"
        )
    if not modules:
        raise LoraError(f"LoRA {label!r} holds no LoRA weights")
    return modules
