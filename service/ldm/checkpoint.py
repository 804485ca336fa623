"""Loading and writing checkpoints: safetensors only, strictly.

The key layout, its two formats and how a config is read from them are `layout.py`'s (torch-free, so
the gateway reads configs the same way); this module builds the networks and fills them.

Every key must map and every shape must match; pickle files are refused, since loading one can
execute code.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

from .autoencoder import Autoencoder
from .config import ModelConfig, Prediction
from .layout import (
    CLIP_HF_PREFIX,
    CLIP_OPENCLIP_PREFIX,
    CONFIG_METADATA_KEY,
    FORMAT_METADATA,
    LOW_SCALE_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    CheckpointError,
    few,
    infer_config,
    normalize_hf_key,
    resolve_checkpoint,
    split_components,
)
from .openclip import hf_to_openclip, openclip_to_hf
from .text import build_text_model, load_tokenizer
from .unet import UNet

log = logging.getLogger(__name__)
Tensor = torch.Tensor

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}


@dataclass
class LoadedModel:
    config: ModelConfig
    unet: UNet
    autoencoder: Autoencoder
    text_model: CLIPTextModel  # SDXL: the first encoder (the base's ViT-L, the refiner's ViT-bigG)
    tokenizer: CLIPTokenizer
    source: Path
    # SDXL: the base's second encoder (ViT-bigG) and its tokenizer; the pooled projection of the last one.
    text_model_2: CLIPTextModel | None = None
    tokenizer_2: CLIPTokenizer | None = None
    text_projection: torch.nn.Linear | None = None
    # The x4 upscaler: the low-res image's noise schedule as the file holds it (`low_scale_model.*`).
    low_res_alphas_cumprod: Tensor | None = None


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; clear errors for pickle or damaged files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(_pickle_message(path))
    with path.open("rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    looks_like_safetensors = len(head) == 9 and head[8:9] == b"{"  # 8-byte length, then JSON
    if not looks_like_safetensors and (
        head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05")
    ):
        raise CheckpointError(_pickle_message(path))  # torch's zip format, or a bare pickle
    if not looks_like_safetensors:
        raise CheckpointError(f"{path} is not a safetensors file ({size} bytes, no JSON header)")
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len > size - 8:
        raise CheckpointError(f"{path} is truncated or not a safetensors file: its header is cut off")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path} is truncated or corrupt: {e}") from None
    return tensors, metadata


def _pickle_message(path: Path) -> str:
    return (
        f"{path} is a pickle checkpoint; they are refused because loading one can execute code. "
        'Convert it once, in a sandbox you trust, with: python -c "import torch, safetensors.torch as s; '
        f"sd = torch.load('{path.name}', weights_only=True); "
        f"s.save_file(sd.get('state_dict', sd), '{path.stem}.safetensors')\""
    )


def load_strict(module: torch.nn.Module, state: Mapping[str, Tensor], prefix: str) -> None:
    """`load_state_dict(strict=True)` with an error that names keys the way the file does."""
    expected = module.state_dict()
    missing = sorted(prefix + k for k in expected.keys() - state.keys())
    unexpected = sorted(prefix + k for k in state.keys() - expected.keys())
    mismatched = [
        f"{prefix}{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {few(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {few(mismatched)}")
    if problems:
        raise CheckpointError("; ".join(problems))
    # assign: modules built on the meta device take the file's tensors as they are (no copy).
    module.load_state_dict(state, strict=True, assign=True)


def find_tokenizer(checkpoint: Path, tokenizer_dir: Path | None) -> Path:
    if tokenizer_dir is not None:
        return Path(tokenizer_dir)
    beside = Path(checkpoint).parent / "tokenizer"
    if not beside.is_dir():
        raise CheckpointError(
            f"no tokenizer: pass --tokenizer DIR (a folder with vocab.json and merges.txt) "
            f"or put a tokenizer/ folder beside {checkpoint}"
        )
    return beside


def load_model(
    path: Path,
    tokenizer_dir: Path | None = None,
    prediction: Prediction | None = None,
) -> LoadedModel:
    """Reads a checkpoint (SD 1.x / 2.x / XL single file, or the project's own format), on the CPU, in
    the file's dtype (the engine casts). Every network is built on the meta device and takes the
    file's tensors as they are: nothing is allocated twice (SDXL's UNet alone is 2.6 B parameters)."""
    started = time.perf_counter()
    path = resolve_checkpoint(path)
    tensors, metadata = read_safetensors(path)
    parts = split_components(tensors)
    config = infer_config(parts, metadata, path)
    if prediction is not None:
        config = config.with_prediction(prediction)
    if config.family == "sd2" and config.prediction == "v":
        config = replace(config, sample_size=768)
    text_model_2, tokenizer_2, projection = None, None, None
    if config.is_sdxl:
        from .sdxl_text import find_sdxl_tokenizers, load_sdxl_text  # sdxl_text imports this module

        text = load_sdxl_text(parts, config, find_sdxl_tokenizers(path, tokenizer_dir, config.is_refiner))
        text_model, tokenizer, projection = text.encoders[0], text.tokenizers[0], text.projection
        if len(text.encoders) == 2:
            text_model_2, tokenizer_2 = text.encoders[1], text.tokenizers[1]
    else:
        tokenizer = load_tokenizer(find_tokenizer(path, tokenizer_dir))
        text_model = _load_sd_text(parts, config, tokenizer)

    # Built without initialising weights that the file replaces anyway (9 s for SD 1.5's UNet).
    with torch.device("meta"):
        unet = UNet(config.unet)
        autoencoder = Autoencoder(config.autoencoder)
    load_strict(unet, parts["unet"], UNET_PREFIX)
    load_strict(autoencoder, parts["vae"], VAE_PREFIX)
    low_res = None
    if config.is_upscaler and "alphas_cumprod" in parts["low_scale"]:
        low_res = parts["low_scale"]["alphas_cumprod"].float()
        if low_res.shape != (1000,):
            raise CheckpointError(
                f"{LOW_SCALE_PREFIX}alphas_cumprod has shape {tuple(low_res.shape)}, not (1000,)"
            )
    text_modules = [m for m in (text_model, text_model_2) if m is not None]
    log.info(
        "loaded %s in %.1f s: %s%s, %s-prediction, parameters: UNet %.1fM, autoencoder %.1fM, text %s",
        path.name,
        time.perf_counter() - started,
        config.family,
        (" refiner" if config.is_refiner else " base") if config.is_sdxl else "",
        config.prediction,
        _millions(unet),
        _millions(autoencoder),
        " + ".join(f"{_millions(m):.1f}M" for m in text_modules),
    )
    return LoadedModel(
        config, unet, autoencoder, text_model, tokenizer, path, text_model_2, tokenizer_2, projection, low_res
    )


def _load_sd_text(
    parts: Mapping[str, Mapping[str, Tensor]], config: ModelConfig, tokenizer: CLIPTokenizer
) -> CLIPTextModel:
    """SD 1.x (transformers' layout) or 2.x (OpenCLIP, converted; the last layer left out)."""
    text_model = build_text_model(config.text, tokenizer)
    if parts["clip_openclip"]:
        layers = int(text_model.config.num_hidden_layers)
        text_state, dropped = openclip_to_hf(dict(parts["clip_openclip"]), layers)
        log.debug("text encoder: left out %s", ", ".join(dropped))
        load_strict(text_model, text_state, CLIP_OPENCLIP_PREFIX + "(converted) ")
    else:
        load_strict(text_model, parts["clip_hf"], CLIP_HF_PREFIX)
    if len(tokenizer) > config.text.vocab_size:
        raise CheckpointError(
            f"tokenizer has {len(tokenizer)} tokens but the text encoder only {config.text.vocab_size}"
        )
    return text_model


def _millions(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def sd_state_dict(
    unet: torch.nn.Module, autoencoder: torch.nn.Module, text_model: torch.nn.Module, family: str
) -> dict[str, Tensor]:
    """The single-file SD layout of three modules (SD 2.x writes the text encoder as OpenCLIP)."""
    out = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    out.update({VAE_PREFIX + k: v for k, v in autoencoder.state_dict().items()})
    text = {normalize_hf_key(k): v for k, v in text_model.state_dict().items()}
    if family == "sd2":
        out.update({CLIP_OPENCLIP_PREFIX + k: v for k, v in hf_to_openclip(text).items()})
    else:
        # Real SD 1.x files keep the `text_model.` level of older transformers releases.
        out.update({CLIP_HF_PREFIX + "text_model." + k: v for k, v in text.items()})
    return out


def save_model(
    path: Path,
    config: ModelConfig,
    unet: torch.nn.Module,
    autoencoder: torch.nn.Module,
    text_model: torch.nn.Module,
    tokenizer_dir: Path | None = None,
) -> Path:
    """Writes the project's own format: SD layout + config metadata (+ a copy of the tokenizer)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().contiguous().cpu()
        for k, v in sd_state_dict(unet, autoencoder, text_model, "sd1").items()
    }
    metadata = {**FORMAT_METADATA, CONFIG_METADATA_KEY: config.to_json()}
    save_file(state, str(path), metadata=metadata)
    if tokenizer_dir is not None:
        target = path.parent / "tokenizer"
        if Path(tokenizer_dir).resolve() != target.resolve():
            target.mkdir(exist_ok=True)
            for item in Path(tokenizer_dir).iterdir():
                if item.is_file():
                    (target / item.name).write_bytes(item.read_bytes())
    return path
