"""Nearest-x2 upsampling with its 3x3 conv runs as four 2x2 convs on the input (upsample.py), in the
UNet and the VAE decoder: the numbers of the plain path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from service.ldm.autoencoder import Upsample as VaeUpsample
from service.ldm.unet import Upsample
from service.ldm.upsample import PhaseWeights, phase_weight, upsample_conv


@pytest.mark.parametrize("channels_last", [False, True])
def test_upsampling_as_phase_convs_equals_the_plain_path(channels_last: bool) -> None:
    torch.manual_seed(1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 32, 5, 7).contiguous(memory_format=fmt)
    for up in (Upsample(32), VaeUpsample(32)):
        up.to(memory_format=fmt)  # type: ignore[call-overload]
        with torch.inference_mode():
            plain = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
            fast = up(x)
        torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
        assert fast.is_contiguous(memory_format=fmt)
    unet_up = Upsample(32)
    with torch.inference_mode():  # an odd skip size on the way up: the plain path
        torch.testing.assert_close(
            unet_up(x, (9, 14)), unet_up.conv(F.interpolate(x, size=(9, 14), mode="nearest"))
        )


def test_phase_weights_follow_the_conv() -> None:
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    cache = PhaseWeights()
    with torch.no_grad():
        first = cache.of(conv)[0]
        assert cache.of(conv)[0] is first  # computed once
        conv.weight.mul_(2.0)  # written in place
        torch.testing.assert_close(cache.of(conv)[0], 2 * first)
        conv.weight = torch.nn.Parameter(torch.randn(4, 4, 3, 3))  # replaced
        torch.testing.assert_close(cache.of(conv)[0], phase_weight(conv.weight.detach()))
        x = torch.randn(1, 4, 3, 3)
        plain = conv(F.interpolate(x, scale_factor=2.0))
        torch.testing.assert_close(upsample_conv(x, conv, cache), plain, atol=1e-5, rtol=1e-5)
    # With gradients on (training), the kernels are computed in the graph: the conv's weight learns.
    upsample_conv(x, conv, cache).sum().backward()
    assert conv.weight.grad is not None
