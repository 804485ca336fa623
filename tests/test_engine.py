"""The engine end to end on tiny random models: parity with diffusers' StableDiffusionPipeline,
batch invariance, joining and leaving between steps, img2img and inpainting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from service.ldm.engine import Engine
from service.ldm.images import png_bytes
from service.ldm.request import GenerationRequest as _Request
from service.ldm.request import RequestError

from .reference import SCHEDULERS, reference_pipeline
from .tiny import tiny_config, write_sd_checkpoint, write_tokenizer


def GenerationRequest(prompt: str, **kwargs: object) -> _Request:
    """Requests at the tiny models' 32x32 (an inferred SD checkpoint defaults to 512x512); images as
    the PNGs a request carries."""
    if "init_image" not in kwargs:
        kwargs = {"width": 32, "height": 32, **kwargs}
    images = {k: png_bytes(v) for k, v in kwargs.items() if isinstance(v, Image.Image)}
    return _Request.parse({"prompt": prompt, **kwargs, **images})


@pytest.fixture(scope="module")
def sd1_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sd1")
    write_tokenizer(folder / "tokenizer")
    return write_sd_checkpoint(folder / "tiny.safetensors", tiny_config("sd1"), folder / "tokenizer", seed=11)


@pytest.fixture(scope="module")
def engine(sd1_path: Path) -> Engine:
    return Engine.load(sd1_path)


def pipeline_for(path: Path, engine: Engine, sampler: str) -> Any:
    """diffusers' pipeline over the same file, converted by diffusers' own key maps."""
    return reference_pipeline(load_file(str(path)), engine.config, engine.text.tokenizer, sampler)


def run_member(engine: Engine, request: GenerationRequest) -> torch.Tensor:
    member, _ = engine.prepare(engine.resolve(request), "k")
    batch = engine.new_batch()
    batch.add(member)
    while len(batch):
        batch.step()
    return member.final_latent()


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_txt2img_matches_diffusers_pipeline(sd1_path: Path, engine: Engine, sampler: str) -> None:
    pipe = pipeline_for(sd1_path, engine, sampler)
    kwargs = {"prompt": "a red circle on the left", "negative_prompt": "blue", "seed": 7}
    request = GenerationRequest(**kwargs, steps=6, guidance_scale=4.0, sampler=sampler, width=32, height=32)
    ours = run_member(engine, request)
    with torch.inference_mode():
        reference = pipe(
            prompt=kwargs["prompt"],
            negative_prompt=kwargs["negative_prompt"],
            num_inference_steps=6,
            guidance_scale=4.0,
            height=32,
            width=32,
            generator=torch.Generator("cpu").manual_seed(7),
            output_type="latent",
        ).images
    assert ours.shape == reference.shape == (1, 4, 16, 16)
    assert (ours - reference).abs().max().item() <= 1e-4
    # And the decoded image, through the whole engine.
    [result] = engine.generate([request])
    with torch.inference_mode():
        image = pipe.vae.decode(reference / engine.config.autoencoder.scaling_factor).sample
    expected = ((image.clamp(-1, 1) + 1) * 127.5).round().squeeze(0).permute(1, 2, 0).numpy()
    assert result.image is not None
    assert np.abs(np.asarray(result.image, dtype=np.float32) - expected).max() <= 1.0


def test_mixed_batch_is_invariant(engine: Engine) -> None:
    """Different samplers, steps, guidance, prompt lengths: each image as if alone."""
    requests = [
        GenerationRequest("a red circle", steps=5, sampler="euler", guidance_scale=3.0, seed=1),
        GenerationRequest("a green square " * 30, steps=8, sampler="dpmpp_2m", guidance_scale=6.0, seed=2),
        GenerationRequest("a cat", steps=3, sampler="ddim", guidance_scale=1.0, seed=3),
        GenerationRequest(
            "a blue photo", steps=4, sampler="euler_a", guidance_scale=2.0, seed=4, negative_prompt="red"
        ),
        GenerationRequest("on the left", steps=6, sampler="ddim", eta=0.5, seed=5),
    ]
    alone = [run_member(engine, r) for r in requests]
    batch = engine.new_batch()
    members = [engine.prepare(engine.resolve(r), i)[0] for i, r in enumerate(requests)]
    for m in members:
        batch.add(m)
    rows = sum(1 if m.uncond is None else 2 for m in batch.members.values() if not m.done)
    assert rows == 9  # four CFG pairs and one unguided member
    finished = []
    while len(batch):
        finished += batch.step()
    assert [m.key for m in finished] == [2, 3, 0, 4, 1]  # in order of step count
    for m, expected in zip(members, alone, strict=True):
        assert (m.final_latent() - expected).abs().max().item() <= 1e-4


def test_members_join_and_leave_between_steps(engine: Engine) -> None:
    a = GenerationRequest("a red circle", steps=6, sampler="dpmpp_2m", seed=10)
    b = GenerationRequest("a blue square", steps=4, sampler="euler", seed=11)
    c = GenerationRequest("a cat", steps=5, sampler="ddim", seed=12)
    expected_a, expected_b = run_member(engine, a), run_member(engine, b)
    batch = engine.new_batch()
    ma = engine.prepare(engine.resolve(a), "a")[0]
    batch.add(ma)
    batch.step()
    batch.step()
    mb = engine.prepare(engine.resolve(b), "b")[0]
    batch.add(mb)  # joins a batch whose other member is at step 2
    batch.add(engine.prepare(engine.resolve(c), "c")[0])
    batch.step()
    assert batch.remove("c") is not None  # cancelled: leaves at a step boundary
    while len(batch):
        batch.step()
    assert ma.steps_done == 6 and mb.steps_done == 4
    assert (ma.final_latent() - expected_a).abs().max().item() <= 1e-4
    assert (mb.final_latent() - expected_b).abs().max().item() <= 1e-4


def test_generate_reports_progress_and_cancels(engine: Engine) -> None:
    seen: list[tuple[int, int, int]] = []
    requests = [
        GenerationRequest("a red circle", steps=3, seed=1),
        GenerationRequest("a cat", steps=5, seed=2),
    ]
    results = engine.generate(
        requests, progress=lambda *a: seen.append(a), should_cancel=lambda i: i == 1 and len(seen) >= 2
    )
    assert results[0].image is not None and results[0].image.size == (32, 32)
    assert results[1].cancelled and results[1].image is None
    assert (0, 3, 3) in seen
    assert results[0].prompt_tokens == 3 and results[0].timings["total_ms"] > 0


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[8:24, 8:24] = rng.integers(0, 255, 3)
    return Image.fromarray(pixels)


def test_img2img_strength_zero_returns_the_input(engine: Engine) -> None:
    init = _image(0)
    [result] = engine.generate([GenerationRequest("a cat", init_image=init, strength=0.0, seed=1)])
    # Up to the VAE round trip: what encode + decode alone gives.
    from service.ldm.images import to_tensor

    [roundtrip] = engine.decode(engine.encode(to_tensor(init, 32, 32)))
    assert result.image is not None
    assert np.array_equal(np.asarray(result.image), np.asarray(roundtrip))


def test_img2img_moves_with_strength(engine: Engine) -> None:
    init = _image(1)
    lows = [
        run_member(engine, GenerationRequest("a cat", init_image=init, strength=s, seed=3, steps=10))
        for s in (0.2, 0.9)
    ]
    from service.ldm.images import to_tensor

    clean = engine.encode(to_tensor(init, 32, 32))
    assert (lows[0] - clean).abs().mean() < (lows[1] - clean).abs().mean()


def test_inpainting_by_latent_blending_keeps_the_unmasked_region(engine: Engine) -> None:
    from service.ldm.images import to_tensor

    init = _image(2)
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255  # repaint the right half
    latent = run_member(
        engine,
        GenerationRequest(
            "a cat",
            init_image=init,
            mask=Image.fromarray(mask),
            strength=1.0,
            seed=4,
            steps=5,
            sampler="ddim",
        ),
    )
    clean = engine.encode(to_tensor(init, 32, 32))
    half = latent.shape[-1] // 2
    torch.testing.assert_close(latent[..., :half], clean[..., :half], rtol=0, atol=1e-5)
    assert (latent[..., half:] - clean[..., half:]).abs().mean() > 0.05


def test_native_inpainting_model(tmp_path: Path) -> None:
    config = tiny_config("sd1", in_channels=9)
    write_tokenizer(tmp_path / "tokenizer")
    engine = Engine.load(
        write_sd_checkpoint(tmp_path / "inpaint.safetensors", config, tmp_path / "tokenizer")
    )
    init = _image(3)
    mask = Image.fromarray(np.full((32, 32), 255, np.uint8))
    [result] = engine.generate([GenerationRequest("a cat", init_image=init, mask=mask, steps=3, seed=1)])
    assert result.image is not None and result.image.size == (32, 32)
    with pytest.raises(RequestError, match="init_image"):
        engine.resolve(GenerationRequest("a cat"))


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"width": 31}, "width"),
        ({"height": 0}, "height"),
        ({"steps": 0}, "steps"),
        ({"sampler": "plms"}, "sampler"),
        ({"guidance_scale": -1}, "guidance_scale"),
        ({"seed": -1}, "seed"),
        ({"strength": 1.5}, "strength"),
        ({"mask": Image.new("L", (32, 32))}, "mask"),
    ],
)
def test_invalid_requests_name_the_field(engine: Engine, fields: dict[str, object], field: str) -> None:
    """Refused where the request is built (its own bounds) or resolved (the model's): either way the
    error names the field."""
    with pytest.raises(RequestError) as info:
        engine.resolve(GenerationRequest("x", **fields))
    assert info.value.field == field


def test_v_prediction_matches_diffusers(sd1_path: Path) -> None:
    engine = Engine.load(sd1_path, prediction="v")
    pipe = pipeline_for(sd1_path, engine, "euler")
    ours = run_member(
        engine, GenerationRequest("a cat", steps=4, sampler="euler", guidance_scale=3.0, seed=5)
    )
    with torch.inference_mode():
        reference = pipe(
            prompt="a cat",
            num_inference_steps=4,
            guidance_scale=3.0,
            height=32,
            width=32,
            generator=torch.Generator("cpu").manual_seed(5),
            output_type="latent",
        ).images
    assert (ours - reference).abs().max().item() <= 1e-4
