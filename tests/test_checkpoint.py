"""Checkpoint loading: both SD layouts, the project's format, and clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from service.ldm.checkpoint import CheckpointError, load_model, save_model
from service.ldm.text import TokenizerError

from .tiny import build_tiny, tiny_config, write_sd_checkpoint, write_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("sd1")
    write_tokenizer(folder / "tokenizer")
    return write_sd_checkpoint(folder / "tiny-sd1.safetensors", tiny_config("sd1"), tokenizer_dir)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_sd_layout_loads_with_inferred_architecture(tmp_path: Path, family: str) -> None:
    config = tiny_config(family)
    write_tokenizer(tmp_path / "tokenizer", pad_token="!" if family == "sd2" else "<|endoftext|>")
    path = write_sd_checkpoint(tmp_path / "m.safetensors", config, tmp_path / "tokenizer")
    model = load_model(path)
    assert model.config.family == family
    assert model.config.unet == config.unet
    assert model.config.autoencoder == config.autoencoder
    assert model.config.text == config.text
    # SD 2.x conditions on the penultimate layer: the last block is not built.
    assert (
        model.text_model.config.num_hidden_layers == 2
    )  # sd1: 2 layers; sd2: 3 in the file, the last left out
    if family == "sd2":
        assert model.tokenizer.pad_token == "!"


def test_weights_land_where_the_file_says(sd1_file: Path) -> None:
    model = load_model(sd1_file)
    state = load_file(str(sd1_file))
    assert torch.equal(model.unet.state_dict()["out.2.weight"], state["model.diffusion_model.out.2.weight"])
    key = "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight"
    assert torch.equal(model.text_model.state_dict()["encoder.layers.1.mlp.fc2.weight"], state[key])


def test_text_encoder_keys_without_text_model_level_load(tmp_path: Path, sd1_file: Path) -> None:
    """Files written by current transformers releases have no `text_model.` level."""
    state = load_file(str(sd1_file))
    renamed = {k.replace("transformer.text_model.", "transformer."): v for k, v in state.items()}
    write_tokenizer(tmp_path / "tokenizer")
    save_file(renamed, str(tmp_path / "m.safetensors"))
    assert load_model(tmp_path / "m.safetensors").config.family == "sd1"


def test_inpainting_unet_is_inferred(tmp_path: Path) -> None:
    config = tiny_config("sd1", in_channels=9)
    write_tokenizer(tmp_path / "tokenizer")
    model = load_model(write_sd_checkpoint(tmp_path / "m.safetensors", config, tmp_path / "tokenizer"))
    assert model.config.unet.in_channels == 9
    assert model.config.is_inpainting


def test_own_format_round_trip(tmp_path: Path, tokenizer_dir: Path) -> None:
    config = tiny_config("sd1")
    unet, vae, text = build_tiny(config, tokenizer_dir, seed=3)
    save_model(tmp_path / "demo" / "model.safetensors", config, unet, vae, text, tokenizer_dir)
    assert (tmp_path / "demo" / "tokenizer" / "vocab.json").is_file()
    model = load_model(tmp_path / "demo")  # a folder stands for its one checkpoint
    assert model.config == config
    assert torch.equal(model.unet.state_dict()["out.2.weight"], unet.state_dict()["out.2.weight"])


def test_prediction_override(sd1_file: Path) -> None:
    assert load_model(sd1_file).config.prediction == "eps"
    assert load_model(sd1_file, prediction="v").config.prediction == "v"


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickle_files_are_refused(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match=r"pickle.*execute code.*safetensors"):
        load_model(path)


def test_pickle_renamed_to_safetensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sneaky.safetensors"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(path)


def test_truncated_file(tmp_path: Path, sd1_file: Path) -> None:
    data = sd1_file.read_bytes()
    for cut in (4, 200, len(data) // 2):
        path = tmp_path / "cut.safetensors"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"truncated|not a safetensors"):
            load_model(path)


def test_missing_key_is_named(tmp_path: Path, sd1_file: Path) -> None:
    state = load_file(str(sd1_file))
    del state["model.diffusion_model.middle_block.1.proj_out.weight"]
    write_tokenizer(tmp_path / "tokenizer")
    save_file(state, str(tmp_path / "m.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"missing keys: model\.diffusion_model\.middle_block\.1\.proj_out"
    ):
        load_model(tmp_path / "m.safetensors")


def test_unexpected_key_is_named(tmp_path: Path, sd1_file: Path) -> None:
    state = load_file(str(sd1_file))
    state["model.diffusion_model.extra.weight"] = torch.zeros(2)
    write_tokenizer(tmp_path / "tokenizer")
    save_file(state, str(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected keys: model\.diffusion_model\.extra\.weight"):
        load_model(tmp_path / "m.safetensors")


def test_shape_mismatch_is_named(tmp_path: Path, sd1_file: Path) -> None:
    state = load_file(str(sd1_file))
    key = "first_stage_model.decoder.mid.attn_1.q.bias"
    state[key] = torch.zeros(state[key].shape[0] + 1)
    write_tokenizer(tmp_path / "tokenizer")
    save_file(state, str(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointError, match=rf"shape mismatch: {key.replace('.', '[.]')}"):
        load_model(tmp_path / "m.safetensors")


def test_missing_tokenizer_says_what_to_do(tmp_path: Path, sd1_file: Path) -> None:
    path = tmp_path / "alone.safetensors"
    path.write_bytes(sd1_file.read_bytes())
    with pytest.raises(CheckpointError, match="--tokenizer"):
        load_model(path)
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.json").write_text("{}")
    with pytest.raises(TokenizerError, match=r"lacks merges\.txt"):
        load_model(path)
