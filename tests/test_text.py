"""Text conditioning: tokenizer loading, 75-token chunking, the cache, and both CLIP layouts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
from safetensors.torch import load_file

from service.ldm.checkpoint import load_model
from service.ldm.config import TextEncoderConfig
from service.ldm.text import TextConditioner, build_text_model, load_tokenizer

from .tiny import tiny_config, write_sd_checkpoint, write_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("tok"))


def conditioner(tokenizer_dir: Path) -> TextConditioner:
    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    model = build_text_model(tiny_config("sd1").text, tokenizer)
    return TextConditioner(model, tokenizer, cache_size=4)


def test_short_prompt_is_one_window_like_diffusers(tokenizer_dir: Path) -> None:
    text = conditioner(tokenizer_dir)
    emb = text.encode("a red circle")
    assert emb.tensor.shape == (1, 77, 64)
    assert emb.tokens == 3
    # diffusers' pipelines: pad to max_length=77, truncate, take the last hidden state.
    ids = text.tokenizer(
        "a red circle", padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.inference_mode():
        reference = text.model(ids).last_hidden_state
    torch.testing.assert_close(emb.tensor, reference, rtol=0, atol=1e-6)


def test_long_prompt_is_chunked_not_cut(tokenizer_dir: Path) -> None:
    text = conditioner(tokenizer_dir)
    prompt = " ".join(["red circle"] * 60)  # 120 tokens
    emb = text.encode(prompt)
    assert emb.tokens == 120
    assert emb.tensor.shape == (1, 2 * 77, 64)
    # The second window is the encoding of the remaining 45 tokens on their own.
    rest = text.encode("circle " + " ".join(["red circle"] * 22))
    torch.testing.assert_close(emb.tensor[:, 77:], rest.tensor, rtol=0, atol=1e-6)


def test_pair_has_equal_windows(tokenizer_dir: Path) -> None:
    text = conditioner(tokenizer_dir)
    cond, uncond = text.encode_pair(" ".join(["blue"] * 100), "")
    assert cond.tensor.shape == uncond.tensor.shape == (1, 154, 64)


def test_cache_is_bounded_lru(tokenizer_dir: Path) -> None:
    text = conditioner(tokenizer_dir)
    first = text.encode("a cat")
    assert text.encode("a cat") is first
    for i in range(4):
        text.encode(f"prompt {i}")
    assert len(text._cache) == 4
    assert text.encode("a cat") is not first


def test_sd1_text_encoder_matches_diffusers_conversion(tmp_path: Path, tokenizer_dir: Path) -> None:
    config = tiny_config("sd1")
    write_tokenizer(tmp_path / "tokenizer")
    path = write_sd_checkpoint(tmp_path / "m.safetensors", config, tokenizer_dir, seed=5)
    ours = TextConditioner(load_model(path).text_model, load_tokenizer(tokenizer_dir))
    # The reference: diffusers' own key conversion into a fresh CLIPTextModel.
    state = convert_ldm_clip_checkpoint(load_file(str(path)))
    state = {k.removeprefix("text_model."): v for k, v in state.items() if "position_ids" not in k}
    reference = build_text_model(config.text, ours.tokenizer)
    reference.load_state_dict(state, strict=True)
    ids = ours.tokenizer("a green square on the left", return_tensors="pt").input_ids
    with torch.inference_mode():
        torch.testing.assert_close(
            ours.model(ids).last_hidden_state, reference(ids).last_hidden_state, rtol=0, atol=1e-6
        )


def test_sd2_openclip_conversion_and_penultimate_layer(tmp_path: Path) -> None:
    config = tiny_config("sd2")
    tok = write_tokenizer(tmp_path / "tokenizer", pad_token="!")
    path = write_sd_checkpoint(tmp_path / "m.safetensors", config, tok, seed=6)
    ours = TextConditioner(load_model(path).text_model, load_tokenizer(tok))
    assert ours.tokenizer.pad_token_id == ours.tokenizer.convert_tokens_to_ids("!")
    # The reference: diffusers' OpenCLIP conversion into a CLIPTextModel with ALL layers; SD 2.x
    # conditions on the penultimate layer's output, then the final layer norm.
    full_cfg = TextEncoderConfig(**{**config.text.__dict__, "penultimate": False})
    full = build_text_model(full_cfg, ours.tokenizer)
    converted = convert_open_clip_checkpoint(full, load_file(str(path)))
    state = {k.removeprefix("text_model."): v for k, v in converted.items() if k != "text_projection.weight"}
    full.load_state_dict(state, strict=True)
    ids = ours.tokenizer("a blue circle", return_tensors="pt").input_ids
    with torch.inference_mode():
        hidden = full(ids, output_hidden_states=True).hidden_states[-2]
        reference = full.final_layer_norm(hidden)
        torch.testing.assert_close(ours.model(ids).last_hidden_state, reference, rtol=0, atol=1e-5)
