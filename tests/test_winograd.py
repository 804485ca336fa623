"""3x3 stride-1 convolutions by Winograd F(2x2, 3x3) and F(4x4, 3x3) (service/ldm/winograd.py): the
numbers of F.conv2d, the rule's choice between them and oneDNN, only where it applies (eager fp32
CPU inference, no per-row LoRA delta), the transformed weights following the conv's, and an engine's
latents with it on and off."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.ldm import lora_rows, winograd
from service.ldm.autoencoder import ResnetBlock
from service.ldm.unet import ResBlock
from service.ldm.winograd import F23, F43, Conv3x3, Tiles, WinogradWeights, transform_weight, winograd_conv

from .test_host_syncs import engine_on
from .test_shared_rows import latents_by_step


@pytest.fixture(params=["f43", "f23"])
def everywhere(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Winograd for every conv it applies to, whatever its size (the tiny models are narrower than the
    rule's threshold), by F(4x4) or (the parameter) F(2x2); yields the list of the calls' C_out."""
    calls: list[int] = []
    real = winograd.winograd_conv
    want = 36 if request.param == "f43" else 16

    def counted(x: Tensor, u: Tensor, bias: Tensor | None) -> Tensor:
        assert u.shape[0] == want
        calls.append(u.shape[2])
        return real(x, u, bias)

    for name in ("MIN_CHANNELS", "MIN_CHANNELS_NCHW"):
        monkeypatch.setattr(winograd, name, 1)
    for name in ("MAX_PIXELS", "MAX_PIXELS_NCHW"):
        monkeypatch.setattr(winograd, name, 1 << 30)
    # Every conv has many tiles (F(4x4)) or few (F(2x2)).
    monkeypatch.setattr(winograd, "MIN_TILES", 0 if request.param == "f43" else 1 << 30)
    monkeypatch.setattr(winograd, "winograd_conv", counted)
    yield calls


# (B, C_in, H, W, C_out) -> what bench/winograd.py measured fastest (ratios to oneDNN, channels-last).
@pytest.mark.parametrize(
    ("shape", "fastest"),
    [
        ((2, 320, 64, 64, 320), F43),  # SD 1.5 at 512x512, its top level: F(4x4) 0.43, F(2x2) 1.17
        ((2, 640, 32, 32, 640), F43),  # 0.33, F(2x2) 0.60
        ((2, 1280, 16, 16, 1280), F43),  # 0.35, F(2x2) 0.40
        ((2, 1280, 8, 8, 1280), F23),  # 8 tiles a GEMM: F(4x4) 0.57, F(2x2) 0.36
        ((2, 512, 8, 8, 256), F23),  # bench.engine's bottleneck, 8 tiles: a whole UNet call decided
        ((1, 128, 16, 16, 128), F43),  # 16 tiles (the head's): 0.65 after writing 64 MB, F(2x2) 0.78
        ((2, 128, 16, 16, 128), F43),  # 32 tiles: 0.63 (F(2x2) 0.82), out of cache 0.90 (0.95)
        ((2, 64, 32, 32, 64), F43),  # 0.73-0.75; F(2x2) 1.02-1.08
        ((1, 128, 64, 64, 128), F43),  # bench.engine's VAE: 0.53; F(2x2) 0.82-0.91
        ((1, 64, 128, 128, 64), None),  # 0.81-0.87 alone; a whole decode was faster without
        ((1, 32, 256, 256, 32), None),  # F(4x4) 1.48-1.55, F(2x2) 7.6-8.0
        ((1, 64, 256, 256, 32), None),  # 3.6-3.8
        ((2, 64, 32, 32, 4), None),  # the UNet's out conv: 1.53-1.58
        ((1, 4, 32, 32, 64), None),  # its conv_in: 1.39
    ],
)
def test_the_rule_takes_what_was_measured_faster(shape: tuple[int, ...], fastest: Tiles | None) -> None:
    b, c_in, h, w, c_out = shape
    x = torch.empty(b, c_in, h, w, device="meta").contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1, device="meta")
    assert winograd.choose(conv, x) is fastest
    assert winograd.worth_it(conv, x) is (fastest is not None)


@pytest.mark.parametrize(
    ("shape", "fastest"),
    [
        ((2, 320, 64, 64, 320), F43),  # NCHW: 0.51 of oneDNN's NCHW
        ((1, 128, 64, 64, 128), F43),  # 0.73
        ((2, 64, 32, 32, 64), None),  # 1.19
        ((1, 128, 128, 128, 64), None),  # 1.34
    ],
)
def test_the_rule_in_nchw(shape: tuple[int, ...], fastest: Tiles | None) -> None:
    b, c_in, h, w, c_out = shape
    x = torch.empty(b, c_in, h, w, device="meta")
    assert winograd.choose(torch.nn.Conv2d(c_in, c_out, 3, padding=1, device="meta"), x) is fastest


def relative_error(got: Tensor, want: Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


@pytest.mark.parametrize(
    "shape",
    [
        (1, 16, 8, 8, 24),
        (3, 5, 7, 9, 6),
        (1, 3, 1, 1, 4),
        (3, 32, 13, 6, 16),
        (1, 130, 5, 4, 128),
        (1, 64, 17, 10, 64),
        (3, 64, 16, 16, 96),
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tiles", [F23, F43], ids=["f23", "f43"])
def test_equals_conv2d(shape: tuple[int, ...], channels_last: bool, bias: bool, tiles: Tiles) -> None:
    """F(2x2) rounds less than oneDNN (at most 2x its error here); F(4x4)'s transforms (entries up to 8,
    G's fifteenths) round more: 1.4 to 4x oneDNN's error on the shapes the rule takes in
    bench/winograd.py's runs (up to 3.2e-5 on unit-size outputs), 8x on a 4-channel one it does not
    take; bounded here at 1e-5 relative and 8x oneDNN's plus 1e-6 (a few float32 ulps: with 3 input
    channels and a 1x1 map oneDNN is all but exact)."""
    b, c_in, h, w, c_out = shape
    g = torch.Generator().manual_seed(sum(shape))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(b, c_in, h, w, generator=g).contiguous(memory_format=fmt)
    weight = torch.randn(c_out, c_in, 3, 3, generator=g)
    beta = torch.randn(c_out, generator=g) if bias else None
    with torch.inference_mode():
        got = winograd_conv(x, transform_weight(weight, tiles), beta)
    want = F.conv2d(x.double(), weight.double(), None if beta is None else beta.double(), padding=1)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert got.is_contiguous(memory_format=fmt)
    assert relative_error(got, want) < 1e-5
    onednn = relative_error(F.conv2d(x, weight, beta, padding=1), want)
    assert relative_error(got, want) <= (2 * onednn + 1e-7 if tiles is F23 else 8 * onednn + 1e-6)


def test_the_blocks_use_it_only_where_it_applies(
    everywhere: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    unet_block, vae_block = ResBlock(32, 16, 64), ResnetBlock(32, 64)
    for conv in (unet_block.in_layers[2], unet_block.out_layers[3], vae_block.conv1, vae_block.conv2):
        assert isinstance(conv, Conv3x3)
    # The state dict is a plain Conv2d's.
    assert set(unet_block.state_dict()) >= {"in_layers.2.weight", "in_layers.2.bias", "out_layers.3.weight"}
    x = torch.randn(2, 32, 6, 5).contiguous(memory_format=torch.channels_last)
    conv = vae_block.conv1
    with torch.no_grad():
        plain = F.conv2d(x, conv.weight, conv.bias, padding=1)
        torch.testing.assert_close(conv(x), plain, atol=1e-5, rtol=1e-5)
        assert everywhere == [64]
        vae_block(x), unet_block(x, torch.randn(2, 16))
        assert everywhere == [64] * 5
        monkeypatch.setattr(winograd, "ENABLED", False)
        conv(x)
        monkeypatch.setattr(winograd, "ENABLED", True)
        conv.to(torch.float64)(x.double())  # fp32 only
        conv.float()
        assert len(everywhere) == 5
        compiling = torch.compiler.is_compiling
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # tracing: the plain conv
        conv(x)
        monkeypatch.setattr(torch.compiler, "is_compiling", compiling)
    assert len(everywhere) == 5
    # With gradients (training): the plain conv, differentiated.
    conv(x).sum().backward()
    assert conv.weight.grad is not None
    with torch.no_grad():  # no gradients wanted: inference
        conv(x)
    assert len(everywhere) == 6


def test_the_transformed_weights_follow_the_conv() -> None:
    conv = Conv3x3(4, 6)
    cache = WinogradWeights()
    with torch.no_grad():
        first = cache.of(conv)
        assert cache.of(conv) is first  # computed once
        f43 = cache.of(conv, F43)
        assert f43.shape == (36, 4, 6) and cache.of(conv, F43) is f43 and cache.of(conv) is first
        conv.weight.mul_(2.0)  # written in place
        torch.testing.assert_close(cache.of(conv), 2 * first)
        torch.testing.assert_close(cache.of(conv, F43), 2 * f43)
        conv.load_state_dict({"weight": torch.randn(6, 4, 3, 3), "bias": torch.zeros(6)})
        torch.testing.assert_close(cache.of(conv), transform_weight(conv.weight))
        conv.weight = nn.Parameter(torch.randn(6, 4, 3, 3))  # replaced
        torch.testing.assert_close(cache.of(conv), transform_weight(conv.weight))
        conv.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # storage replaced
        torch.testing.assert_close(cache.of(conv), transform_weight(conv.weight))


def test_not_with_a_per_row_lora_delta(everywhere: list[int]) -> None:
    """A LoRA twin of the conv: Winograd while no adapter is active, the plain conv plus the delta
    otherwise (test_lora covers the deltas' numbers)."""

    class Runtime:
        groups: tuple[object, ...] = ()

    conv = Conv3x3(8, 8)
    twin = lora_rows.LoraConv2d.__new__(lora_rows.LoraConv2d)
    twin.__dict__.update(conv.__dict__)
    twin.__dict__["lora_runtime"] = runtime = Runtime()
    twin.__dict__["lora_path"] = "conv"
    x = torch.randn(1, 8, 4, 4)
    with torch.inference_mode():
        torch.testing.assert_close(twin(x), conv(x))
        assert len(everywhere) == 2
        runtime.groups = (object(),)
        monkey_delta = lora_rows._add_deltas
        try:
            lora_rows._add_deltas = lambda y, *_: y  # type: ignore[assignment]
            torch.testing.assert_close(twin(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
        finally:
            lora_rows._add_deltas = monkey_delta
    assert len(everywhere) == 2


def test_an_engine_with_it_matches_one_without(
    tmp_path: Path, everywhere: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """test_shared_rows' continuous batch (CFG pairs, a LoRA member, members joining mid-way) on the
    CPU default (channels-last), every member's latent after every step."""
    engine = engine_on("cpu", tmp_path)
    assert engine.channels_last
    monkeypatch.setattr(winograd, "ENABLED", False)
    expected = latents_by_step(engine, tmp_path, share=True)
    assert not everywhere
    monkeypatch.setattr(winograd, "ENABLED", True)
    got = latents_by_step(engine, tmp_path, share=True)
    assert len(everywhere) > 50
    assert got.keys() == expected.keys()
    for key, latent in got.items():
        # Winograd's rounding is relative to a tile's largest values, not to each output: the tolerance
        # scales with the latent (this batch's reach 49; F(4x4) differed by up to 6.6e-7 of that).
        scale = max(1.0, expected[key].abs().max().item())
        torch.testing.assert_close(latent, expected[key], atol=1e-5 * scale, rtol=1e-5, msg=str(key))
