"""SDXL base and refiner on tiny random checkpoints in the sgm single-file layout: the engine against
diffusers' `StableDiffusionXLPipeline` / `StableDiffusionXLImg2ImgPipeline` built from the same file by
diffusers' own converters (latents to 1e-4, images to 1/255), the base -> refiner hand-off against
diffusers' `denoising_end` / `denoising_start` pair, and batch invariance with mixed conditioning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from service.ldm.engine import Engine
from service.ldm.images import png_bytes, to_tensor
from service.ldm.request import GenerationRequest, ResolvedRequest

from .reference_sdxl import decode, reference_sdxl
from .tiny_sdxl import write_sdxl_checkpoint

SAMPLERS = ("ddim", "euler", "euler_a", "dpmpp_2m")
PROMPT = "a red circle on the left"


@pytest.fixture(scope="module")
def base_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sdxl_checkpoint(tmp_path_factory.mktemp("sdxl") / "sdxl.safetensors", seed=21)


@pytest.fixture(scope="module")
def refiner_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("refiner")
    return write_sdxl_checkpoint(folder / "refiner.safetensors", refiner=True, seed=41)


@pytest.fixture(scope="module")
def base(base_path: Path) -> Engine:
    return Engine.load(base_path)


@pytest.fixture(scope="module")
def refiner(refiner_path: Path) -> Engine:
    return Engine.load(refiner_path)


def pipeline(path: Path, engine: Engine, sampler: str) -> Any:
    return reference_sdxl(load_file(str(path)), engine.config, engine.text.tokenizers, sampler)  # type: ignore[union-attr]


def request(**fields: Any) -> GenerationRequest:
    return GenerationRequest.parse({"prompt": PROMPT, "width": 64, "height": 64, **fields})


def run(engine: Engine, resolved: ResolvedRequest, refiner: Engine | None = None) -> torch.Tensor:
    member, _ = engine.prepare(resolved, "k", refiner=refiner)
    batch = engine.new_batch()
    batch.add(member)
    while len(batch):
        batch.step()
    return member.final_latent()


def generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_txt2img_matches_diffusers(base_path: Path, base: Engine, sampler: str) -> None:
    pipe = pipeline(base_path, base, sampler)
    resolved = base.resolve(
        request(
            negative_prompt="blue",
            steps=5,
            guidance_scale=4.0,
            sampler=sampler,
            seed=7,
            original_size={"width": 96, "height": 48},
            crops_coords_top_left={"x": 8, "y": 16},
            target_size={"width": 80, "height": 72},
        )
    )
    ours = run(base, resolved)
    with torch.inference_mode():
        reference = pipe(
            prompt=PROMPT,
            negative_prompt="blue",
            num_inference_steps=5,
            guidance_scale=4.0,
            height=64,
            width=64,
            original_size=(48, 96),  # diffusers: (height, width)
            crops_coords_top_left=(16, 8),  # diffusers: (top, left)
            target_size=(72, 80),
            generator=generator(7),
            output_type="latent",
        ).images
    assert ours.shape == reference.shape == (1, 4, 8, 8)
    assert (ours - reference).abs().max().item() <= 1e-4


def test_decoded_image_and_zero_negatives_match_diffusers(base_path: Path, base: Engine) -> None:
    """No negative prompt: the base's unconditional branch is zeros, as diffusers' negative_prompt=None."""
    pipe = pipeline(base_path, base, "euler")
    fields = {"steps": 4, "guidance_scale": 5.0, "sampler": "euler", "seed": 3}
    resolved = base.resolve(request(**fields))
    member, _ = base.prepare(resolved, "k")
    assert member.uncond is not None and member.uncond_added is not None
    assert not member.uncond.any() and not member.uncond_added.text_embeds.any()
    with torch.inference_mode():
        reference = pipe(
            prompt=PROMPT, num_inference_steps=4, guidance_scale=5.0, height=64, width=64,
            generator=generator(3), output_type="latent",
        ).images  # fmt: skip
    assert (run(base, resolved) - reference).abs().max().item() <= 1e-4
    [result] = base.generate([request(**fields)])
    assert result.image is not None and result.image.size == (64, 64)
    expected = decode(pipe, reference).numpy()
    assert np.abs(np.asarray(result.image, dtype=np.float32) - expected).max() <= 1.0


def test_size_conditioning_reaches_the_unet(base: Engine) -> None:
    plain = run(base, base.resolve(request(steps=3, seed=5)))
    cropped = run(base, base.resolve(request(steps=3, seed=5, crops_coords_top_left={"x": 0, "y": 256})))
    assert (plain - cropped).abs().max().item() > 1e-3


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_refiner_img2img_matches_diffusers(refiner_path: Path, refiner: Engine, sampler: str) -> None:
    pixels = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    init = Image.fromarray(pixels)
    fields = {"steps": 8, "strength": 0.6, "sampler": sampler, "seed": 9, "guidance_scale": 3.0}
    scores = {"aesthetic_score": 7.0, "negative_aesthetic_score": 2.0}
    resolved = refiner.resolve(
        request(init_image=png_bytes(init), negative_prompt="blue", **fields, **scores)
    )
    assert refiner.config.default_strength == 0.3
    ours = run(refiner, resolved)
    pipe = pipeline(refiner_path, refiner, sampler)
    latents = refiner.encode(to_tensor(init, 64, 64))  # the posterior's mode: no random draw
    with torch.inference_mode():
        reference = pipe(
            prompt=PROMPT, negative_prompt="blue", image=latents, strength=0.6, num_inference_steps=8,
            guidance_scale=3.0, aesthetic_score=7.0, negative_aesthetic_score=2.0,
            generator=generator(9), output_type="latent",
        ).images  # fmt: skip
    assert (ours - reference).abs().max().item() <= 1e-4


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_base_to_refiner_handoff_matches_denoising_end_and_start(
    base_path: Path, refiner_path: Path, base: Engine, refiner: Engine, sampler: str
) -> None:
    fields = {"steps": 10, "sampler": sampler, "seed": 11, "guidance_scale": 4.0, "negative_prompt": "blue"}
    handoff = {"model": "refiner", "switch_at": 0.7}
    resolved = base.resolve(request(**fields, refiner=handoff))
    ours = run(base, resolved, refiner)
    first = pipeline(base_path, base, sampler)
    second = pipeline(refiner_path, refiner, sampler)
    g = generator(11)  # one generator through both pipelines, as the member's
    common = {"prompt": PROMPT, "negative_prompt": "blue", "num_inference_steps": 10, "guidance_scale": 4.0}
    with torch.inference_mode():
        latents = first(
            **common, height=64, width=64, denoising_end=0.7, generator=g, output_type="latent"
        ).images
        reference = second(
            **common, image=latents, denoising_start=0.7, generator=g, output_type="latent"
        ).images
    assert (ours - reference).abs().max().item() <= 1e-4
    if sampler == "euler":  # and the image, decoded by the refiner's autoencoder
        [result] = base.generate([request(**fields, refiner=handoff)], refiners={"refiner": refiner})
        assert result.image is not None
        expected = decode(second, reference).numpy()
        assert np.abs(np.asarray(result.image, dtype=np.float32) - expected).max() <= 1.0


def test_mixed_sdxl_batch_gives_each_member_its_own_image(base: Engine, refiner: Engine) -> None:
    long = " ".join(["red circle"] * 50)  # 100 tokens: two windows for both encoders
    requests = [
        request(steps=5, sampler="euler", guidance_scale=3.0, seed=1),
        request(prompt=long, steps=7, sampler="dpmpp_2m", guidance_scale=6.0, seed=2, negative_prompt="cat"),
        request(prompt="a cat", steps=3, sampler="ddim", guidance_scale=1.0, seed=3),
        request(steps=4, sampler="euler_a", seed=4, original_size={"width": 2048, "height": 512}),
        request(steps=6, sampler="ddim", eta=0.5, seed=5, target_size={"width": 32, "height": 32}),
        request(steps=8, sampler="dpmpp_2m", seed=6, refiner={"model": "refiner", "switch_at": 0.5}),
    ]
    resolved = [base.resolve(r) for r in requests]
    alone = [run(base, r, refiner) for r in resolved]
    batch = base.new_batch()
    members = [base.prepare(r, i, refiner=refiner)[0] for i, r in enumerate(resolved)]
    for m in members:
        batch.add(m)
    while len(batch):
        batch.step()
    assert members[5].decoder is refiner  # handed off on the way
    for m, expected in zip(members, alone, strict=True):
        assert (m.final_latent() - expected).abs().max().item() <= 1e-4


def test_long_prompts_are_chunked_and_pooled_from_the_first_window(base: Engine) -> None:
    text = base.text
    long = text.encode(" ".join(["red circle"] * 40))  # 80 tokens
    first = text.encode(" ".join(["red circle"] * 37) + " red")  # its first 75
    assert long.tensor.shape == (1, 154, 128) and long.tokens == 80
    assert first.tensor.shape == (1, 77, 128)
    torch.testing.assert_close(long.tensor[:, :77], first.tensor, rtol=0, atol=1e-6)
    torch.testing.assert_close(long.pooled, first.pooled, rtol=0, atol=1e-6)  # type: ignore[union-attr]
