"""3x3 stride-1 convolutions by Winograd F(2x2, 3x3) (service/ldm/winograd.py): the numbers of
F.conv2d, only where it applies (eager fp32 CPU inference, no per-row LoRA delta), the transformed
weights following the conv's, and an engine's latents with it on and off."""

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
from service.ldm.winograd import Conv3x3, WinogradWeights, transform_weight, winograd_conv

from .test_host_syncs import engine_on
from .test_shared_rows import latents_by_step


@pytest.fixture
def everywhere(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Winograd for every conv it applies to, whatever its size (the tiny models are narrower than the
    rule's threshold); yields the list of the Winograd calls' C_out."""
    calls: list[int] = []
    real = winograd.winograd_conv

    def counted(x: Tensor, u: Tensor, bias: Tensor | None) -> Tensor:
        calls.append(u.shape[2])
        return real(x, u, bias)

    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)
    monkeypatch.setattr(winograd, "MAX_PIXELS", 1 << 30)
    monkeypatch.setattr(winograd, "MAX_PIXELS_NCHW", 1 << 30)
    monkeypatch.setattr(winograd, "winograd_conv", counted)
    yield calls


@pytest.mark.parametrize(
    ("shape", "taken"),
    [
        ((2, 640, 32, 32, 640), True),  # SD 1.5 at 512x512, its second level: 37% faster
        ((8, 1280, 16, 16, 1280), True),
        ((1, 128, 64, 64, 128), True),  # the demo-size VAE decoder's: 20% faster
        ((2, 320, 64, 64, 320), False),  # SD 1.5's top level: 33% slower
        ((2, 64, 32, 32, 64), False),  # too narrow: a tie
        ((1, 256, 256, 256, 256), False),
    ],
)
def test_the_rule_takes_what_was_measured_faster(shape: tuple[int, ...], taken: bool) -> None:
    b, c_in, h, w, c_out = shape
    x = torch.empty(b, c_in, h, w, device="meta").contiguous(memory_format=torch.channels_last)
    assert winograd.worth_it(torch.nn.Conv2d(c_in, c_out, 3, padding=1, device="meta"), x) is taken


def relative_error(got: Tensor, want: Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


@pytest.mark.parametrize(
    "shape",
    [(1, 16, 8, 8, 24), (3, 5, 7, 9, 6), (1, 3, 1, 1, 4), (3, 32, 13, 6, 16), (1, 130, 5, 4, 128)],
)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_equals_conv2d(shape: tuple[int, ...], channels_last: bool, bias: bool) -> None:
    b, c_in, h, w, c_out = shape
    g = torch.Generator().manual_seed(sum(shape))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(b, c_in, h, w, generator=g).contiguous(memory_format=fmt)
    weight = torch.randn(c_out, c_in, 3, 3, generator=g)
    beta = torch.randn(c_out, generator=g) if bias else None
    with torch.inference_mode():
        got = winograd_conv(x, transform_weight(weight), beta)
    want = F.conv2d(x.double(), weight.double(), None if beta is None else beta.double(), padding=1)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert got.is_contiguous(memory_format=fmt)
    assert relative_error(got, want) < 1e-5
    assert relative_error(got, want) <= 2 * relative_error(F.conv2d(x, weight, beta, padding=1), want) + 1e-7


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
        conv.weight.mul_(2.0)  # written in place
        torch.testing.assert_close(cache.of(conv), 2 * first)
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
        torch.testing.assert_close(latent, expected[key], atol=1e-5, rtol=1e-5, msg=str(key))
