"""SDXL checkpoints: the architecture read off full-size key/shape maps on the meta device and from a
header alone (the gateway's way), the project's own format, 9-channel inpainting files, tokenizer
folders, and one clear line for every file or request that cannot run."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from service.ldm.autoencoder import Autoencoder
from service.ldm.checkpoint import load_model
from service.ldm.config import AutoencoderConfig, ModelConfig, TextEncoderConfig, UNetConfig
from service.ldm.engine import Engine
from service.ldm.images import png_bytes
from service.ldm.layout import (
    UNET_PREFIX,
    VAE_PREFIX,
    CheckpointError,
    infer_config,
    read_config,
    split_components,
)
from service.ldm.request import GenerationRequest, RequestError, resolve
from service.ldm.request_sdxl import check_refiner
from service.ldm.sdxl_text import SDXLText, sdxl_text_state_dict
from service.ldm.text import build_text_model, load_tokenizer
from service.ldm.unet import UNet

from .tiny import tiny_config, write_sd_checkpoint, write_tokenizer
from .tiny_sdxl import tiny_sdxl_config, write_sdxl_checkpoint

# The released models' shapes (stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0).
BASE_UNET = UNetConfig(
    model_channels=320,
    channel_mult=(1, 2, 4),
    num_res_blocks=2,
    attention_levels=(1, 2),
    level_depths=(0, 2, 10),
    transformer_depth=10,
    context_dim=2048,
    num_heads=None,
    head_dim=64,
    use_linear_projection=True,
    adm_in_channels=2816,
)
REFINER_UNET = UNetConfig(
    model_channels=384,
    channel_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    attention_levels=(1, 2),
    level_depths=(0, 4, 4, 0),
    transformer_depth=4,
    context_dim=1280,
    num_heads=None,
    head_dim=64,
    use_linear_projection=True,
    adm_in_channels=2560,
)
VIT_L = TextEncoderConfig(penultimate=True)  # 768 wide, 12 layers, quick_gelu
VIT_BIGG = TextEncoderConfig(
    hidden_size=1280,
    intermediate_size=5120,
    num_layers=32,
    num_heads=20,
    hidden_act="gelu",
    penultimate=True,
    projection_dim=1280,
)
KNOWN_SHAPES = {  # as the released files have them
    "base": {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (640, 2048),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.ff.net.0.proj.weight": (10240, 1280),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.attn1.to_q.weight": (1280, 1280),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
    },
    "refiner": {
        "model.diffusion_model.label_emb.0.0.weight": (1536, 2560),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.3.attn2.to_k.weight": (1536, 1280),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1536, 1536, 3, 3),
        "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.0.model.text_projection": (1280, 1280),
    },
}


def full_size_shapes(refiner: bool, tokenizer_dir: Path) -> dict[str, tuple[int, ...]]:
    """Every key and shape of a released SDXL file, from modules built on the meta device."""
    tokenizer = load_tokenizer(tokenizer_dir)
    with torch.device("meta"):
        unet = UNet(REFINER_UNET if refiner else BASE_UNET)
        vae = Autoencoder(AutoencoderConfig())
        configs = [VIT_BIGG] if refiner else [VIT_L, VIT_BIGG]
        encoders = [
            build_text_model(TextEncoderConfig(**{**c.__dict__, "penultimate": False}), tokenizer)
            for c in configs
        ]
        projection = torch.nn.Linear(1280, 1280, bias=False)
    state = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    state |= {VAE_PREFIX + k: v for k, v in vae.state_dict().items()}
    state |= sdxl_text_state_dict(SDXLText(encoders, [tokenizer] * len(encoders), projection))
    assert all(v.is_meta for v in state.values())  # nothing was allocated
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("role", ["base", "refiner"])
def test_full_size_configs_are_inferred_on_the_meta_device(tmp_path: Path, role: str) -> None:
    refiner = role == "refiner"
    shapes = full_size_shapes(refiner, write_tokenizer(tmp_path / "tok"))
    for key, shape in KNOWN_SHAPES[role].items():
        assert shapes[key] == shape, key
    config = infer_config(split_components(shapes), {}, tmp_path / "x.safetensors")
    assert (config.family, config.is_refiner, config.unet) == (
        "sdxl",
        refiner,
        REFINER_UNET if refiner else BASE_UNET,
    )
    assert (config.text, config.text_2) == ((VIT_BIGG, None) if refiner else (VIT_L, VIT_BIGG))
    assert config.autoencoder.scaling_factor == 0.13025 and config.downsample_factor == 8
    assert (config.sample_size, config.default_guidance) == (1024, 5.0)
    # The same from a header alone, as the gateway reads it (no tensor data in the file at all).
    header = json.dumps(
        {k: {"dtype": "F16", "shape": list(v), "data_offsets": [0, 0]} for k, v in shapes.items()}
    )
    path = tmp_path / "header-only.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode())
    assert read_config(path).config == config


def test_parameter_counts_match_diffusers(tmp_path: Path) -> None:
    """Our UNets against diffusers' built from the released configs, both on the meta device."""
    import diffusers

    common = {
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "use_linear_projection": True,
    }
    released = {
        "base": {
            "attention_head_dim": [5, 10, 20],
            "block_out_channels": [320, 640, 1280],
            "cross_attention_dim": 2048,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "projection_class_embeddings_input_dim": 2816,
            "transformer_layers_per_block": [1, 2, 10],
        },
        "refiner": {
            "attention_head_dim": [6, 12, 24, 24],
            "block_out_channels": [384, 768, 1536, 1536],
            "cross_attention_dim": 1280,
            "down_block_types": [
                "DownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "projection_class_embeddings_input_dim": 2560,
            "transformer_layers_per_block": 4,
        },
    }
    for role, ours in (("base", BASE_UNET), ("refiner", REFINER_UNET)):
        with torch.device("meta"):
            reference = diffusers.UNet2DConditionModel(**common, **released[role])
            mine = UNet(ours)
        count = sum(p.numel() for p in mine.parameters())
        assert count == sum(p.numel() for p in reference.parameters()), role
    with torch.device("meta"):
        assert sum(p.numel() for p in UNet(BASE_UNET).parameters()) == 2_567_463_684  # "2.6 B"


def test_header_config_of_a_tiny_file(tmp_path: Path) -> None:
    base = read_config(write_sdxl_checkpoint(tmp_path / "b" / "sdxl.safetensors")).config
    refiner = read_config(write_sdxl_checkpoint(tmp_path / "r" / "refiner.safetensors", refiner=True)).config
    assert base == tiny_sdxl_config() and refiner == tiny_sdxl_config(refiner=True)
    assert (base.family, base.sample_size, base.downsample_factor, base.default_guidance) == (
        "sdxl",
        1024,
        8,
        5.0,
    )
    assert refiner.is_refiner and not base.is_refiner and refiner.default_strength == 0.3


def test_own_format_and_inpainting_files_load(tmp_path: Path) -> None:
    own = load_model(write_sdxl_checkpoint(tmp_path / "own" / "model.safetensors", own_format=True))
    assert own.config == tiny_sdxl_config() and own.text_model_2 is not None
    inpaint = write_sdxl_checkpoint(tmp_path / "inpaint" / "model.safetensors", in_channels=9)
    engine = Engine.load(inpaint)
    assert engine.config.is_inpainting and engine.config.unet.in_channels == 9
    image = Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
    mask = Image.fromarray(np.full((64, 64), 255, np.uint8))
    request = GenerationRequest(
        prompt="a cat", init_image=png_bytes(image), mask=png_bytes(mask), steps=2, seed=1
    )
    [result] = engine.generate([request])
    assert result.image is not None and result.image.size == (64, 64)


def test_tokenizer_folders(tmp_path: Path) -> None:
    path = write_sdxl_checkpoint(tmp_path / "m" / "sdxl.safetensors")
    model = load_model(path)
    assert model.tokenizer.pad_token == "<|endoftext|>"
    assert model.tokenizer_2 is not None and model.tokenizer_2.pad_token == "!"  # from its own files
    shutil.move(tmp_path / "m" / "tokenizer", tmp_path / "tok" / "tokenizer")
    shutil.move(tmp_path / "m" / "tokenizer_2", tmp_path / "tok" / "tokenizer_2")
    assert load_model(path, tmp_path / "tok").tokenizer_2 is not None  # --tokenizer DIR holding both
    shutil.rmtree(tmp_path / "tok" / "tokenizer_2")
    with pytest.raises(CheckpointError, match=r"^no tokenizer_2/ in .*tok: SDXL's second tokenizer"):
        load_model(path, tmp_path / "tok")
    refiner = write_sdxl_checkpoint(tmp_path / "r" / "refiner.safetensors", refiner=True)
    shutil.move(tmp_path / "r" / "tokenizer_2", tmp_path / "r" / "tokenizer")  # the only folder
    assert load_model(refiner).tokenizer.pad_token == "!"


def _rewrite(path: Path, target: Path, drop: str = "", add: dict[str, torch.Tensor] | None = None) -> Path:
    state = load_file(str(path))
    state.pop(drop, None)
    state |= add or {}
    target.parent.mkdir(parents=True, exist_ok=True)
    for folder in ("tokenizer", "tokenizer_2"):
        if (path.parent / folder).is_dir() and not (target.parent / folder).exists():
            shutil.copytree(path.parent / folder, target.parent / folder)
    save_file(state, str(target))
    return target


def test_bad_files_are_named_as_the_file_spells_them(tmp_path: Path) -> None:
    path = write_sdxl_checkpoint(tmp_path / "m" / "sdxl.safetensors")
    bigg = "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"
    with pytest.raises(CheckpointError, match=rf"^missing keys: {bigg.replace('.', '[.]')}$"):
        load_model(_rewrite(path, tmp_path / "a" / "m.safetensors", drop=bigg))
    extra = "conditioner.embedders.1.model.transformer.resblocks.0.attn.extra"
    with pytest.raises(CheckpointError, match=rf"^unexpected keys: {extra.replace('.', '[.]')}$"):
        load_model(_rewrite(path, tmp_path / "b" / "m.safetensors", add={extra: torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"missing keys: model\.diffusion_model\.label_emb\.0\.2\.bias"):
        load_model(
            _rewrite(path, tmp_path / "c" / "m.safetensors", drop="model.diffusion_model.label_emb.0.2.bias")
        )
    with pytest.raises(
        CheckpointError, match=r"unexpected keys outside the SD layout: conditioner\.embedders\.2"
    ):
        load_model(
            _rewrite(
                path, tmp_path / "d" / "m.safetensors", add={"conditioner.embedders.2.x": torch.zeros(1)}
            )
        )
    state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("conditioner.embedders.1.")}
    save_file(state, str(tmp_path / "e.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"two text encoders: conditioner\.embedders\.0\.transformer\.\* but"
    ):
        load_model(tmp_path / "e.safetensors")


def test_a_refiner_unet_with_base_encoders_is_one_line(tmp_path: Path) -> None:
    base = load_file(str(write_sdxl_checkpoint(tmp_path / "b" / "sdxl.safetensors")))
    refiner = load_file(str(write_sdxl_checkpoint(tmp_path / "r" / "refiner.safetensors", refiner=True)))
    mixed = {k: v for k, v in base.items() if not k.startswith(UNET_PREFIX)}
    mixed |= {k: v for k, v in refiner.items() if k.startswith(UNET_PREFIX)}
    save_file(mixed, str(tmp_path / "b" / "mixed.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"the UNet is an SDXL refiner's .* the text encoders are the base's$"
    ):
        read_config(tmp_path / "b" / "mixed.safetensors")


def test_requests_an_sdxl_model_refuses_name_the_field(tmp_path: Path) -> None:
    base, refiner = tiny_sdxl_config(), tiny_sdxl_config(refiner=True)
    sd1 = tiny_config("sd1")

    def field(config: ModelConfig, **values: object) -> str:
        with pytest.raises(RequestError) as info:
            resolve(GenerationRequest.parse({"prompt": "x", "width": 64, "height": 64, **values}), config)
        return info.value.field

    assert field(base, width=60) == "width"  # sizes are multiples of 8
    assert field(sd1, original_size={"width": 8, "height": 8}) == "original_size"
    assert field(base, aesthetic_score=6.0) == "aesthetic_score"
    assert field(refiner, target_size={"width": 8, "height": 8}) == "target_size"
    assert field(refiner, refiner={"model": "r"}) == "refiner"  # a refiner used as a base
    assert field(refiner) == "init_image"  # it refines an image: no txt2img
    png = png_bytes(Image.new("RGB", (64, 64)))
    assert (
        field(tiny_sdxl_config(in_channels=9), refiner={"model": "r"}, init_image=png, mask=png) == "refiner"
    )
    with pytest.raises(RequestError, match=r"^refiner: model 'b' is not an SDXL refiner$"):  # the reverse
        check_refiner(GenerationRequest.parse({"prompt": "x", "refiner": {"model": "b"}}).refiner, base, base)  # type: ignore[arg-type]
    ok = resolve(
        GenerationRequest.parse({"prompt": "x", "refiner": {"model": "r"}, "aesthetic_score": 7}), base
    )
    assert (ok.width, ok.original_size, ok.target_size, ok.aesthetic_score) == (
        1024,
        (1024, 1024),
        (1024, 1024),
        7.0,
    )
    with pytest.raises(RequestError, match="switch_at"):
        GenerationRequest.parse({"prompt": "x", "refiner": {"model": "r", "switch_at": 1.0}})


def test_sd_files_still_infer_as_before(tmp_path: Path) -> None:
    write_tokenizer(tmp_path / "tokenizer")
    config = read_config(
        write_sd_checkpoint(tmp_path / "sd.safetensors", tiny_config("sd2"), tmp_path / "tokenizer")
    ).config
    assert config.family == "sd2" and config.text_2 is None and config.unet.adm_in_channels == 0
