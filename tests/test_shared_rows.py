"""A classifier-free-guidance pair shares the UNet's layers before the first transformer (its two rows
have the same x and t: `UNet.forward`'s `expand`, built by `DenoisingBatch`): the numbers of the plain
path, in a continuous batch, on the padded bucket path of a compiled engine, and for the UNet with
inpainting's channels or the upscaler's class labels."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from service.ldm import unet as unet_module
from service.ldm.attention import CrossAttention
from service.ldm.config import UNetConfig
from service.ldm.engine import Engine
from service.ldm.request import GenerationRequest
from service.ldm.unet import ResBlock, UNet

from .test_host_syncs import engine_on, mixed_batch
from .test_speed import RowCounter
from .tiny import tiny_config

Tensor = torch.Tensor


def latents_by_step(engine: Engine, tmp_path: Path, share: bool) -> dict[tuple[int, int], Tensor]:
    """A continuous batch (test_host_syncs' mix: CFG pairs at different guidance, a guidance-1 member,
    a LoRA member, latent blending, padded contexts, members at different steps) that two more members
    join mid-way; every member's latent after every step."""
    engine.share_rows = share
    batch = mixed_batch(engine, tmp_path)
    late = [
        GenerationRequest(prompt="a boat", steps=3, seed=7, guidance_scale=2.0),
        GenerationRequest(prompt="a tree", steps=3, seed=8, guidance_scale=1.0),
    ]
    seen: dict[tuple[int, int], Tensor] = {}
    step = 0
    while len(batch):
        if step in (1, 2):
            request = late[step - 1].model_copy(update={"width": 32, "height": 32})
            batch.add(engine.prepare(engine.resolve(request), 10 + step)[0])
        finished = batch.step()
        step += 1
        for m in [*batch.members.values(), *finished]:
            assert isinstance(m.key, int)
            seen[(m.key, m.steps_done)] = m.x.clone()
    return seen


def test_a_continuous_batch_with_shared_rows_matches_the_plain_one(tmp_path: Path) -> None:
    engine = engine_on("cpu", tmp_path)
    calls: list[bool] = []
    unet_call = engine.denoiser.unet
    engine.denoiser.unet = lambda *a, **k: calls.append("expand" in k) or unet_call(*a, **k)
    expected = latents_by_step(engine, tmp_path, share=False)
    assert not any(calls)
    calls.clear()
    got = latents_by_step(engine, tmp_path, share=True)
    assert all(calls) and len(calls) > 5
    assert got.keys() == expected.keys() and len(got) > 30
    for key, x in expected.items():
        torch.testing.assert_close(got[key], x, atol=1e-5, rtol=1e-5, msg=f"member {key[0]} step {key[1]}")


def test_the_padded_bucket_path_with_shared_rows(tmp_path: Path) -> None:
    """The bucket path of a compiled engine (the eager UNet standing in for inductor): unique rows and
    rows are padded to buckets of their own, and the padding never shows."""
    plain = engine_on("cpu", tmp_path / "plain")
    padded = engine_on("cpu", tmp_path / "padded")
    counter = RowCounter(padded.unet)
    padded.runner.compiled = counter
    expected = latents_by_step(plain, tmp_path / "plain", share=False)
    got = latents_by_step(padded, tmp_path / "padded", share=True)
    # The LoRA member's calls run eagerly; the others are padded: 4 unique rows in 8 at the start.
    shapes = list(zip(counter.unique, counter.rows, strict=True))
    assert shapes and all(u in (1, 2, 4, 8) and b in (1, 2, 4, 8, 16) for u, b in shapes)
    assert any(u < b for u, b in shapes)
    for key, x in expected.items():
        torch.testing.assert_close(got[key], x, atol=1e-5, rtol=1e-5, msg=f"member {key[0]} step {key[1]}")


@pytest.mark.parametrize("kind", ["inpaint", "upscale"])
def test_the_unet_with_expand_equals_it_on_every_row(kind: str) -> None:
    """9 input channels (inpainting) or 7 with class labels (the x4 upscaler's noise level, part of
    what a pair shares), attention from the first level (the prefix ends inside a block) or not."""
    base = tiny_config("sd1", in_channels=9 if kind == "inpaint" else 7).unet
    if kind == "upscale":
        base = dataclasses.replace(base, num_classes=350, attention_levels=(1,))
    torch.manual_seed(0)
    unet = UNet(base).eval()
    assert unet.prefix_end == ((1, 1) if kind == "inpaint" else (3, 1))
    x = torch.randn(3, base.in_channels, 16, 16)
    t = torch.tensor([999.0, 500.0, 3.0])
    y = torch.tensor([20, 0, 349]) if kind == "upscale" else None
    expand = torch.tensor([0, 0, 1, 2, 2])
    context = torch.randn(5, 7, base.context_dim)
    with torch.inference_mode():
        shared = unet(x, t, context, y=y, expand=expand)
        plain = unet(x[expand], t[expand], context, y=None if y is None else y[expand])
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("straddling", [False, True])
def test_the_decoder_reads_the_heads_skips_once_per_unique_row(
    channels_last: bool, straddling: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench.engine's UNet shape (64 channels, mult (1, 2, 4), attention from level 1): the head's four
    skips feed the decoder's last four ResBlocks, which normalise and convolve the skip's own GroupNorm
    groups once per unique row: after 64 of 64 + 64 channels (groups of 4), and after 132 of 128 + 64
    (groups of 6: one straddles h and the skip, and is computed per row; taken only with `STRADDLING`,
    as slower)."""
    cfg = UNetConfig(
        model_channels=64, channel_mult=(1, 2, 4), num_res_blocks=2, attention_levels=(1, 2), context_dim=32
    )
    torch.manual_seed(0)
    unet = UNet(cfg).eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    unet.to(memory_format=fmt)  # type: ignore[call-overload]
    splits: list[tuple[int, int, int]] = []
    real = ResBlock.forward_shared_skip

    def counted(self: ResBlock, h: Tensor, s: Tensor, expand: Tensor, emb: Tensor, start: int) -> Tensor:
        splits.append((h.shape[1], s.shape[1], start))
        assert s.shape[0] == 2 and h.shape[0] == 4
        return real(self, h, s, expand, emb, start)

    monkeypatch.setattr(ResBlock, "forward_shared_skip", counted)
    monkeypatch.setattr(unet_module, "STRADDLING", straddling)
    x = torch.randn(2, 4, 16, 12).contiguous(memory_format=fmt)
    t = torch.tensor([999.0, 3.0])
    expand = torch.tensor([0, 0, 1, 1])
    context = torch.randn(4, 7, cfg.context_dim)
    with torch.inference_mode():
        shared = unet(x, t, context, expand=expand)
        assert splits == [(128, 64, 132), (128, 64, 132)] * straddling + [(64, 64, 64), (64, 64, 64)]
        plain = unet(x[expand], t[expand], context)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
    assert shared.is_contiguous(memory_format=fmt)


def test_the_split_falls_on_a_group_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    block = ResBlock(640, 16, 320)  # SD 1.5's last decoder block: 320 + 320, groups of 20
    assert block.split_at(320, 320) == 320
    assert ResBlock(192, 16, 64).split_at(128, 64) is None  # groups of 6: one straddles h and the skip
    assert ResBlock(64, 16, 64).split_at(32, 32) is None  # no 1x1 skip conv (the widths equal)
    monkeypatch.setattr(unet_module, "STRADDLING", True)
    assert ResBlock(192, 16, 64).split_at(128, 64) == 132
    assert ResBlock(96, 16, 64).split_at(64, 32) == 66  # groups of 3
    assert ResBlock(33 * 32, 16, 64).split_at(32 * 32 + 31, 1) is None  # the skip only in h's last group


def test_cross_attention_keys_and_values_are_reused_while_the_prompts_stay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch stacks the same context tensor again while its rows' prompts are the same, and each
    cross-attention layer then reuses its keys and values: fewer projections, the same numbers."""
    engine = engine_on("cpu", tmp_path)
    projections: list[int] = []
    layer = engine.unet.input_blocks[1][1].transformer_blocks[0].attn2  # type: ignore[index]
    layer.to_k.register_forward_hook(lambda *_: projections.append(1))

    def run() -> dict[tuple[int, int], Tensor]:
        plan = [  # a CFG pair and a guidance-1 member, a third joining at step 3; 6 steps each
            GenerationRequest(prompt="a red circle", negative_prompt="blue", steps=6, seed=1),
            GenerationRequest(prompt="a cat", steps=6, seed=2, guidance_scale=1.0),
            GenerationRequest(prompt="a dog", steps=6, seed=3, guidance_scale=3.0),
        ]
        members = [
            engine.prepare(engine.resolve(r.model_copy(update={"width": 32, "height": 32})), i)[0]
            for i, r in enumerate(plan)
        ]
        batch = engine.new_batch()
        batch.add(members[0])
        batch.add(members[1])
        seen: dict[tuple[int, int], Tensor] = {}
        for step in range(9):
            if step == 3:
                batch.add(members[2])
            batch.step()
            for m in members:
                seen[(int(m.key), m.steps_done)] = m.x.clone()  # type: ignore[call-overload]
        return seen

    cached = run()
    reused = len(projections)
    projections.clear()
    monkeypatch.setattr(
        CrossAttention, "_keys_values", lambda self, ctx, cache: (self.to_k(ctx), self.to_v(ctx))
    )
    fresh = run()
    # Once per change of the batch's rows (start, the join, the first two leaving), not at every step.
    assert (reused, len(projections)) == (3, 9)
    for key, x in fresh.items():
        torch.testing.assert_close(cached[key], x, atol=0, rtol=0, msg=f"member {key[0]} step {key[1]}")
