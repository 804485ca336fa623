"""The x4 upscaler: read off a tiny random file in the original layout, checked against diffusers'
StableDiffusionUpscalePipeline; its request rules; tiled decoding."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from service.ldm.engine import Engine
from service.ldm.images import png_bytes
from service.ldm.layout import read_config
from service.ldm.request import GenerationRequest, Limits, RequestError, resolve
from service.ldm.tiling import decode_tiled
from service.paths import REPO_ROOT

from .tiny import tiny_config, write_tokenizer
from .tiny_upscale import reference_upscale_pipeline, tiny_upscaler_config, write_upscaler_checkpoint


@pytest.fixture(scope="module")
def upscaler_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("x4")
    write_tokenizer(folder / "tokenizer", pad_token="!")
    return write_upscaler_checkpoint(folder / "x4.safetensors", folder / "tokenizer", seed=5)


@pytest.fixture(scope="module")
def engine(upscaler_path: Path) -> Engine:
    return Engine.load(upscaler_path)


def low_res(seed: int = 0, size: int = 8) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def upscale(**kwargs: object) -> GenerationRequest:
    image = kwargs.pop("image", low_res())
    assert isinstance(image, Image.Image)
    return GenerationRequest.parse({"prompt": "a red circle", "image": png_bytes(image), **kwargs})


def run_member(engine: Engine, request: GenerationRequest) -> torch.Tensor:
    member, _ = engine.prepare(engine.resolve(request), "k")
    batch = engine.new_batch()
    batch.add(member)
    while len(batch):
        batch.step()
    return member.final_latent()


def test_config_read_off_the_header(upscaler_path: Path) -> None:
    header = read_config(upscaler_path)
    expected = tiny_upscaler_config().unet
    cfg = header.config
    assert header.source == "weights" and cfg.family == "upscale-x4" and cfg.task == "upscale"
    assert cfg.unet == expected and cfg.unet.cross_only_levels == (1,) and cfg.unet.num_heads == 8
    assert cfg.prediction == "v" and cfg.autoencoder.scaling_factor == 0.08333
    assert cfg.autoencoder.downsample_factor == 4 and cfg.text.penultimate
    assert (cfg.beta_start, cfg.beta_end, cfg.max_noise_level, cfg.default_noise_level) == (
        0.0001,
        0.02,
        350,
        20,
    )


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_upscale_matches_diffusers_pipeline(upscaler_path: Path, engine: Engine, sampler: str) -> None:
    pipe = reference_upscale_pipeline(
        load_file(str(upscaler_path)), engine.config, upscaler_path.parent / "tokenizer", sampler
    )
    image = low_res(3)
    request = upscale(
        image=image,
        negative_prompt="blue",
        steps=5,
        guidance_scale=4.0,
        sampler=sampler,
        seed=9,
        noise_level=40,
    )
    ours = run_member(engine, request)
    common = {"prompt": "a red circle", "negative_prompt": "blue", "image": image, "num_inference_steps": 5}
    kwargs = {**common, "guidance_scale": 4.0, "noise_level": 40}
    with torch.inference_mode():
        reference = pipe(
            **kwargs, generator=torch.Generator("cpu").manual_seed(9), output_type="latent"
        ).images
    assert ours.shape == reference.shape == (1, 4, 8, 8)
    assert (ours - reference).abs().max().item() <= 1e-4
    [result] = engine.generate([request])
    assert result.image is not None and result.image.size == (32, 32)
    with torch.inference_mode():
        pil = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(9)).images[0]
    diff = np.abs(np.asarray(result.image, dtype=int) - np.asarray(pil, dtype=int))
    assert diff.max() <= 1


def test_mixed_batch_equals_each_alone(engine: Engine) -> None:
    requests = [
        upscale(image=low_res(1), seed=1, steps=4, sampler="ddim", noise_level=0),
        upscale(image=low_res(2), seed=2, steps=6, sampler="euler", guidance_scale=1.0, noise_level=100),
        upscale(image=low_res(3), seed=3, steps=3, sampler="dpmpp_2m", negative_prompt="green"),
    ]
    alone = [run_member(engine, r) for r in requests]
    batch = engine.new_batch()
    members = [engine.prepare(engine.resolve(r), i)[0] for i, r in enumerate(requests)]
    batch.add(members[0])
    batch.step()  # the others join a running batch
    batch.add(members[1])
    batch.add(members[2])
    while len(batch):
        batch.step()
    for m, ref in zip(members, alone, strict=True):
        assert (m.final_latent() - ref).abs().max().item() <= 1e-5


def test_request_rules(upscaler_path: Path) -> None:
    upscaler = read_config(upscaler_path).config
    ok = resolve(upscale(seed=1), upscaler)
    assert (ok.width, ok.height, ok.noise_level, ok.steps, ok.sampler) == (32, 32, 20, 75, "ddim")
    with pytest.raises(RequestError) as e:
        resolve(GenerationRequest.parse({"prompt": "x"}), upscaler)
    assert e.value.field == "model" and "upscale" in e.value.message
    with pytest.raises(RequestError) as e:
        resolve(upscale(), tiny_config("sd1"))
    assert e.value.field == "image" and "txt2img" in e.value.message
    with pytest.raises(RequestError) as e:
        resolve(upscale(image=low_res(size=64)), upscaler, Limits(max_upscale_pixels=128 * 128))
    assert e.value.field == "image" and "256x256" in e.value.message
    for noise in (-1, 351):
        with pytest.raises(RequestError) as e:
            upscale(noise_level=noise)
        assert e.value.field == "noise_level"
    for bad in (b"GIF89a....", png_bytes(low_res())[:20]):
        with pytest.raises(RequestError) as e:
            GenerationRequest.parse({"prompt": "x", "image": bad})
        assert e.value.field == "image"
    zero = bytearray(png_bytes(low_res()))
    zero[16:20] = b"\0\0\0\0"  # width 0 in the IHDR
    with pytest.raises(RequestError) as e:
        GenerationRequest.parse({"prompt": "x", "image": bytes(zero)})
    assert e.value.field == "image"
    jpeg = io.BytesIO()
    low_res(size=12).save(jpeg, format="JPEG")
    assert resolve(upscale(image=Image.open(io.BytesIO(jpeg.getvalue()))), upscaler).width == 48
    raw = GenerationRequest.parse({"prompt": "x", "image": jpeg.getvalue()})
    assert resolve(raw, upscaler).height == 48


def test_ldm_generate_upscales_an_init_image(upscaler_path: Path, engine: Engine, tmp_path: Path) -> None:
    low_res(4).save(tmp_path / "in.png")
    args = [
        "--model",
        str(upscaler_path),
        "--init-image",
        str(tmp_path / "in.png"),
        "--prompt",
        "a red circle",
    ]
    args += ["--steps", "2", "--seed", "3", "--noise-level", "5", "-o", str(tmp_path / "out.png")]
    env = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "service.cli.main", "generate", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    [result] = engine.generate([upscale(image=low_res(4), steps=2, seed=3, noise_level=5)])
    with Image.open(tmp_path / "out.png") as out:
        assert out.size == (32, 32) and "Noise level: 5" in out.info["parameters"]
        assert np.abs(np.asarray(out, dtype=int) - np.asarray(result.image, dtype=int)).max() <= 1
    bad = subprocess.run(
        [sys.executable, "-m", "service.cli.main", "generate", *args[:2], "--prompt", "x", "-o", "x.png"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and "--model: this model's task is upscale" in bad.stderr


def test_tiled_decoding_is_whole_below_a_tile_and_seamless_above(engine: Engine) -> None:
    z = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(0))
    decoder = engine.autoencoder.decode
    seen: list[tuple[int, ...]] = []

    def decode(part: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(part.shape))
        return decoder(part)

    with torch.inference_mode():
        whole = decoder(z)
        assert torch.equal(decode_tiled(decoder, z, tile=24, overlap=6), whole)
        tiled = decode_tiled(decode, z, tile=12, overlap=4)
    assert max(s[-1] for s in seen) == 12 and len(seen) == 9
    assert tiled.shape == whole.shape == (1, 3, 96, 96)

    # With a decoder whose receptive field fits in the overlap, the blend is exact: no seam. (A real
    # decoder's tiles differ a little: its attention and group norms see only the tile.)
    def local(part: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(torch.tanh(part[:, :3] + part[:, 3:]), scale_factor=4.0)

    assert (decode_tiled(local, z, tile=12, overlap=4) - local(z)).abs().max().item() < 1e-6
