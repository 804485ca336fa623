"""The engine's speed options keep its numbers: channels-last, batch buckets (the padding rows of a
compiled UNet never show), bf16 on the CPU (PSNR against fp32 on the demo model), what `auto` means.

The test that really compiles with inductor takes a minute or more on a 2-core CPU: it runs only with
LDM_TEST_COMPILE=1 set."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.ldm import unet_runner
from service.ldm.engine import Engine
from service.ldm.request import GenerationRequest
from service.ldm.unet_runner import bucket, resolve_dtype
from service.paths import bundled_model
from service.worker.warmup import buckets_for, shared_buckets_for, warm_up

from .tiny import tiny_config, write_sd_checkpoint, write_tokenizer


@pytest.fixture(scope="module")
def sd1_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("speed")
    write_tokenizer(folder / "tokenizer")
    return write_sd_checkpoint(folder / "tiny.safetensors", tiny_config("sd1"), folder / "tokenizer", seed=5)


def requests(n: int, steps: int = 4) -> list[GenerationRequest]:
    """n txt2img requests at different steps counts and guidance (CFG pairs and a lone row)."""
    return [
        GenerationRequest(
            prompt=f"a red circle {i}" * (1 + i % 2),
            negative_prompt="blue" if i % 3 else "",
            steps=steps + i,
            guidance_scale=1.0 if i == 2 else 7.5,
            seed=10 + i,
            width=32,
            height=32,
        )
        for i in range(n)
    ]


def pixels(images: list[Image.Image | None]) -> np.ndarray:
    assert all(i is not None for i in images)
    return np.stack([np.asarray(i, dtype=np.float64) for i in images])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_dtype_defaults_and_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_dtype(None, "cpu") == "fp32" and resolve_dtype(None, "cuda:1") == "fp16"
    assert resolve_dtype("bf16", "cpu") == "bf16" and resolve_dtype("auto", "cuda") == "fp16"
    monkeypatch.setattr(unet_runner, "cpu_flags", lambda: frozenset({"avx512_bf16", "amx_bf16"}))
    assert resolve_dtype("auto", "cpu") == "bf16"
    monkeypatch.setattr(unet_runner, "cpu_flags", lambda: frozenset({"avx512_bf16", "avx512_fp16"}))
    assert resolve_dtype("auto", "cpu") == "fp32"


def test_fp16_is_refused_on_the_cpu(sd1_path: Path) -> None:
    with pytest.raises(ValueError, match="fp16 runs on cuda only"):
        Engine.load(sd1_path, dtype="fp16")


def test_buckets() -> None:
    assert [bucket(n) for n in (1, 2, 3, 5, 8, 9, 64)] == [1, 2, 4, 8, 8, 16, 64]
    assert bucket(65) == 65  # beyond the largest bucket: unpadded


def test_channels_last_keeps_the_numbers(sd1_path: Path) -> None:
    nchw = Engine.load(sd1_path, channels_last=False)
    nhwc = Engine.load(sd1_path)
    assert nhwc.channels_last  # the default on the CPU
    a = [r.image for r in nchw.generate(requests(3, steps=2))]
    b = [r.image for r in nhwc.generate(requests(3, steps=2))]
    assert np.abs(pixels(a) - pixels(b)).max() <= 1


class RowCounter(torch.nn.Module):
    """Stands in for the compiled UNet: the eager one, counting the rows it is called with (those of
    the context) and the unique rows among them (those of x: fewer when CFG pairs share them)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.rows: list[int] = []
        self.unique: list[int] = []

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, *args: torch.Tensor | None
    ) -> torch.Tensor:
        self.rows.append(context.shape[0])
        self.unique.append(x.shape[0])
        return self.unet(x, t, context, *args)


def test_padding_rows_never_show(sd1_path: Path) -> None:
    """The worker's path (DenoisingBatch over the engine's denoiser) with members joining and leaving:
    padded up to the buckets, every image is the one computed without padding."""
    plain = Engine.load(sd1_path)
    padded = Engine.load(sd1_path)
    counter = RowCounter(padded.unet)
    padded.runner.compiled = counter  # the bucket path of a compiled engine, without inductor
    expected = latents_by_step(plain, requests(4, steps=2))
    got = latents_by_step(padded, requests(4, steps=2))
    assert set(counter.rows) <= {1, 2, 4, 8} and 8 in counter.rows  # 7 rows -> 8, ...
    assert set(counter.unique) <= {1, 2, 4} and 4 in counter.unique  # ... of 4 members -> 4 unique
    for key, x in expected.items():
        torch.testing.assert_close(got[key], x, atol=1e-5, rtol=1e-5)


def latents_by_step(engine: Engine, reqs: list[GenerationRequest]) -> dict[tuple[int, int], torch.Tensor]:
    """Runs a continuous batch (one member joins per step) and keeps every member's latent at every step."""
    batch = engine.new_batch()
    pending = [engine.prepare(engine.resolve(r), i)[0] for i, r in enumerate(reqs)]
    seen: dict[tuple[int, int], torch.Tensor] = {}
    while pending or len(batch):
        if pending:
            batch.add(pending.pop(0))
        finished = batch.step()
        for m in [*batch.members.values(), *finished]:
            assert isinstance(m.key, int)
            seen[(m.key, m.steps_done)] = m.x.clone()
    return seen


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("LDM_TEST_COMPILE"), reason="compiles with inductor: LDM_TEST_COMPILE=1"
)
def test_compiled_unet_with_buckets_matches_eager(sd1_path: Path) -> None:
    eager = Engine.load(sd1_path)
    compiled = Engine.load(sd1_path, compile=True)
    expected = latents_by_step(eager, requests(3, steps=2))
    got = latents_by_step(compiled, requests(3, steps=2))
    for key, x in expected.items():
        torch.testing.assert_close(got[key], x, atol=1e-4, rtol=0)


@pytest.mark.skipif(not bundled_model().is_dir(), reason="the demo model is not in models/ yet")
def test_bf16_on_the_cpu_stays_close_to_fp32_on_the_demo_model() -> None:
    """PSNR >= 30 dB against our fp32 images (UNet, VAE and text encoder in bf16)."""
    started = time.perf_counter()
    prompts = ["a large red square in the center", "a small blue circle on the left", "a green triangle"]
    reqs = [GenerationRequest(prompt=p, seed=3 + i, steps=12) for i, p in enumerate(prompts)]
    fp32 = Engine.load(bundled_model(), dtype="fp32")
    bf16 = Engine.load(bundled_model(), dtype="bf16")
    assert next(bf16.unet.parameters()).dtype == torch.bfloat16
    a = pixels([r.image for r in fp32.generate(reqs)])
    b = pixels([r.image for r in bf16.generate(reqs)])
    assert psnr(a, b) >= 30.0, psnr(a, b)
    print(f"bf16 against fp32: PSNR {psnr(a, b):.1f} dB in {time.perf_counter() - started:.1f} s")


def test_a_compiling_worker_compiles_every_bucket_before_its_first_job(sd1_path: Path) -> None:
    """With LDM_COMPILE the worker draws a 1-step image per bucket a batch of up to max_batch members
    reaches (1 or 2 rows a member), and per (rows, unique rows) of batches with CFG pairs, so no graph
    compiles inside its loop at the native size."""
    engine = Engine.load(sd1_path)
    engine.config = dataclasses.replace(engine.config, sample_size=32)  # a request's default size
    warm_up("tiny", engine, max_batch=3)  # not compiled: nothing to do
    counter = RowCounter(engine.unet)
    engine.runner.compiled = counter  # the bucket path of a compiled engine, without inductor
    warm_up("tiny", engine, max_batch=3)
    assert buckets_for(3) == [1, 2, 4, 8] and buckets_for(1) == [1, 2]
    assert sorted(set(counter.rows)) == [1, 2, 4, 8]
    # CFG pairs: (rows, unique rows) graphs, 2 of 1 (one pair), 4 of 2, 4 of 4 (3 members, 1 pair), 8 of 4.
    assert list(shared_buckets_for(3)) == [(2, 1), (4, 2), (4, 4), (8, 4)]
    graphs = set(zip(counter.rows, counter.unique, strict=True))
    assert graphs == {(r, r) for r in (1, 2, 4, 8)} | set(shared_buckets_for(3))
