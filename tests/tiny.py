"""Tiny random models of both SD families, written in the real single-file layout, for tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from service.ldm.autoencoder import Autoencoder
from service.ldm.checkpoint import sd_state_dict
from service.ldm.config import AutoencoderConfig, ModelConfig, TextEncoderConfig, UNetConfig
from service.ldm.text import build_text_model, load_tokenizer
from service.ldm.unet import UNet

from .reference import randomize

WORDS = ("a", "red", "green", "blue", "circle", "square", "on", "the", "left", "photo", "of", "cat")


def _byte_chars() -> list[str]:
    """GPT-2 / CLIP byte-to-unicode table: every byte has a printable stand-in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> Path:
    """A CLIP-format BPE tokenizer: byte alphabet plus merges that make WORDS single tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    vocab = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            a, b = pieces[0], pieces[1]
            if (a, b) not in merges:
                merges.append((a, b))
                if a + b not in vocab:
                    vocab.append(a + b)
            pieces = [a + b, *pieces[2:]]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad_token}))
    return folder


def tiny_config(family: str = "sd1", prediction: str = "eps", in_channels: int = 4) -> ModelConfig:
    sd2 = family == "sd2"
    unet = UNetConfig(
        in_channels=in_channels,
        out_channels=4,
        model_channels=64 if sd2 else 32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_levels=(0, 1),
        transformer_depth=1,
        context_dim=64,
        num_heads=None if sd2 else 8,
        head_dim=64 if sd2 else None,
        use_linear_projection=sd2,
    )
    vae = AutoencoderConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4)
    text = TextEncoderConfig(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_layers=3 if sd2 else 2,
        num_heads=1,
        max_positions=77,
        hidden_act="gelu" if sd2 else "quick_gelu",
        penultimate=sd2,
    )
    return ModelConfig(
        family=family,  # type: ignore[arg-type]
        prediction=prediction,  # type: ignore[arg-type]
        autoencoder=vae,
        unet=unet,
        text=text,
        sample_size=32,
        default_steps=4,
        default_guidance=5.0,
        default_sampler="euler",
    )


def build_tiny(
    config: ModelConfig, tokenizer_dir: Path, seed: int = 0
) -> tuple[UNet, Autoencoder, torch.nn.Module]:
    tokenizer = load_tokenizer(tokenizer_dir)
    unet = randomize(UNet(config.unet), seed)
    out_conv = unet.out[-1]
    assert isinstance(out_conv, torch.nn.Conv2d) and out_conv.bias is not None
    with torch.no_grad():  # a trained UNet predicts unit-scale noise; random weights overshoot ~10x
        out_conv.weight.mul_(0.1)
        out_conv.bias.mul_(0.1)
    vae = randomize(Autoencoder(config.autoencoder), seed + 1)
    # The text encoder is built with all its layers (SD 2.x files hold the last one too).
    full_text = TextEncoderConfig(**{**config.text.__dict__, "penultimate": False})
    text = randomize(build_text_model(full_text, tokenizer), seed + 2)
    return unet, vae, text


def write_sd_checkpoint(
    path: Path, config: ModelConfig, tokenizer_dir: Path, seed: int = 0, extra: dict | None = None
) -> Path:
    """A tiny checkpoint in the real single-file layout of `config.family`, tokenizer beside it."""
    unet, vae, text = build_tiny(config, tokenizer_dir, seed)
    state = {k: v.contiguous() for k, v in sd_state_dict(unet, vae, text, config.family).items()}
    # What real files carry besides the weights.
    state["alphas_cumprod"] = torch.linspace(0.99, 0.01, 1000)
    if config.family == "sd2":
        state["cond_stage_model.model.text_projection"] = torch.zeros(64, 64)
        state["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    else:
        state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path
