"""Loading and writing checkpoints: safetensors only, strictly.

Two formats, one key layout (the original CompVis / Stability single-file layout):

- Stable Diffusion single-file checkpoints: `model.diffusion_model.*` (UNet),
  `first_stage_model.*` (autoencoder) and `cond_stage_model.transformer.*` (SD 1.x, transformers'
  CLIP layout) or `cond_stage_model.model.*` (SD 2.x, OpenCLIP layout). The architecture is
  inferred from the keys and shapes with each family's conventions.
- The project's own format: the same layout, the architecture config as JSON in the safetensors
  metadata (`ldm.config`), and the tokenizer in a `tokenizer/` folder beside the file.

Every key must map and every shape must match; pickle files are refused, since loading one can
execute code.
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

from .arch import infer_autoencoder_config, infer_unet_config
from .autoencoder import Autoencoder
from .config import ModelConfig, Prediction, TextEncoderConfig
from .openclip import hf_to_openclip, normalize_hf_key, openclip_layers, openclip_to_hf
from .text import build_text_model, load_tokenizer
from .unet import UNet

log = logging.getLogger(__name__)
Tensor = torch.Tensor

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_HF_PREFIX = "cond_stage_model.transformer."
CLIP_OPENCLIP_PREFIX = "cond_stage_model.model."
CONFIG_METADATA_KEY = "ldm.config"
FORMAT_METADATA = {"format": "pt", "ldm.format": "ldm-service/1"}

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
# Keys real SD files carry that inference does not use: the training-time DDPM buffers, the EMA
# bookkeeping, and the autoencoder's training loss (LPIPS, discriminator).
_IGNORED = re.compile(
    r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod"
    r"|posterior_variance|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2"
    r"|logvar|lvlb_weights|model_ema\..*|first_stage_model\.loss\..*"
    r"|cond_stage_model\.transformer\.(text_model\.)?embeddings\.position_ids)$"
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says why and what to do."""


@dataclass
class LoadedModel:
    config: ModelConfig
    unet: UNet
    autoencoder: Autoencoder
    text_model: CLIPTextModel
    tokenizer: CLIPTokenizer
    source: Path


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


def split_components(tensors: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Splits an SD single-file state dict by component prefix; unknown keys are an error."""
    parts: dict[str, dict[str, Tensor]] = {"unet": {}, "vae": {}, "clip_hf": {}, "clip_openclip": {}}
    prefixes = (
        ("unet", UNET_PREFIX),
        ("vae", VAE_PREFIX),
        ("clip_hf", CLIP_HF_PREFIX),
        ("clip_openclip", CLIP_OPENCLIP_PREFIX),
    )
    unexpected: list[str] = []
    ignored = 0
    for key, value in tensors.items():
        if _IGNORED.match(key):
            ignored += 1
            continue
        for part, prefix in prefixes:
            if key.startswith(prefix):
                parts[part][key.removeprefix(prefix)] = value
                break
        else:
            unexpected.append(key)
    if unexpected:
        raise CheckpointError(f"unexpected keys outside the SD layout: {_few(unexpected)}")
    if ignored:
        log.debug("ignored %d training-only keys", ignored)
    for part, prefix in (("unet", UNET_PREFIX), ("vae", VAE_PREFIX)):
        if not parts[part]:
            raise CheckpointError(f"no {prefix}* keys: this is not a Stable Diffusion checkpoint")
    if not parts["clip_hf"] and not parts["clip_openclip"]:
        raise CheckpointError(f"no text encoder keys ({CLIP_HF_PREFIX}* or {CLIP_OPENCLIP_PREFIX}*)")
    parts["clip_hf"] = {normalize_hf_key(k): v for k, v in parts["clip_hf"].items()}
    return parts


def infer_text_config(parts: Mapping[str, Mapping[str, Tensor]]) -> TextEncoderConfig:
    """CLIP text encoder shape from the keys; heads are 64 wide in both SD families."""
    if parts["clip_openclip"]:
        state = parts["clip_openclip"]
        vocab, width = _shape(state, "token_embedding.weight", CLIP_OPENCLIP_PREFIX)
        positions = _shape(state, "positional_embedding", CLIP_OPENCLIP_PREFIX)[0]
        ff = _shape(state, "transformer.resblocks.0.mlp.c_fc.weight", CLIP_OPENCLIP_PREFIX)[0]
        layers, act, penultimate = openclip_layers(dict(state)), "gelu", True
    else:
        state = parts["clip_hf"]
        vocab, width = _shape(state, "embeddings.token_embedding.weight", CLIP_HF_PREFIX)
        positions = _shape(state, "embeddings.position_embedding.weight", CLIP_HF_PREFIX)[0]
        ff = _shape(state, "encoder.layers.0.mlp.fc1.weight", CLIP_HF_PREFIX)[0]
        layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layers."))
        act, penultimate = "quick_gelu", False
    return TextEncoderConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=ff,
        num_layers=layers,
        num_heads=max(1, width // 64),
        max_positions=positions,
        hidden_act=act,  # type: ignore[arg-type]
        penultimate=penultimate,
    )


def _shape(state: Mapping[str, Tensor], key: str, prefix: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"missing key {prefix}{key}")
    return tuple(state[key].shape)


def _few(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


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
        problems.append(f"missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_few(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_few(mismatched)}")
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


def resolve_checkpoint(path: Path) -> Path:
    """A model folder stands for the single .safetensors file inside it."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise CheckpointError(f"{path} should hold exactly one .safetensors file, found {len(files)}")
        return files[0]
    return path


def load_model(
    path: Path,
    tokenizer_dir: Path | None = None,
    prediction: Prediction | None = None,
) -> LoadedModel:
    """Reads a checkpoint (SD 1.x / 2.x single file, or the project's own format), on the CPU in fp32."""
    path = resolve_checkpoint(path)
    tensors, metadata = read_safetensors(path)
    parts = split_components(tensors)
    if CONFIG_METADATA_KEY in metadata:
        try:
            config = ModelConfig.from_json(metadata[CONFIG_METADATA_KEY])
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: bad {CONFIG_METADATA_KEY} metadata: {e}") from None
    else:
        family: Literal["sd1", "sd2"] = "sd2" if parts["clip_openclip"] else "sd1"
        try:
            unet_cfg = infer_unet_config({k: tuple(v.shape) for k, v in parts["unet"].items()}, family)
            vae_cfg = infer_autoencoder_config({k: tuple(v.shape) for k, v in parts["vae"].items()})
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
        text_cfg = infer_text_config(parts)
        config = ModelConfig(family=family, unet=unet_cfg, autoencoder=vae_cfg, text=text_cfg)
    if prediction is not None:
        config = config.with_prediction(prediction)
    if config.family == "sd2" and config.prediction == "v":
        config = replace(config, sample_size=768)
    tokenizer = load_tokenizer(find_tokenizer(path, tokenizer_dir))

    # Built without initialising weights that the file replaces anyway (9 s for SD 1.5's UNet).
    with torch.device("meta"):
        unet = UNet(config.unet)
        autoencoder = Autoencoder(config.autoencoder)
    load_strict(unet, parts["unet"], UNET_PREFIX)
    load_strict(autoencoder, parts["vae"], VAE_PREFIX)
    text_model = build_text_model(config.text, tokenizer)
    if parts["clip_openclip"]:
        layers = int(text_model.config.num_hidden_layers)
        text_state, dropped = openclip_to_hf(parts["clip_openclip"], layers)
        log.debug("text encoder: left out %s", ", ".join(dropped))
        load_strict(text_model, text_state, CLIP_OPENCLIP_PREFIX + "(converted) ")
    else:
        load_strict(text_model, parts["clip_hf"], CLIP_HF_PREFIX)
    if len(tokenizer) > config.text.vocab_size:
        raise CheckpointError(
            f"tokenizer has {len(tokenizer)} tokens but the text encoder only {config.text.vocab_size}"
        )
    log.info(
        "loaded %s: %s, %s-prediction, UNet %.1fM, autoencoder %.1fM, text encoder %.1fM parameters",
        path.name,
        config.family,
        config.prediction,
        _millions(unet),
        _millions(autoencoder),
        _millions(text_model),
    )
    return LoadedModel(config, unet, autoencoder, text_model, tokenizer, path)


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
