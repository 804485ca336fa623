"""Nearest-neighbour x2 upsampling followed by a 3x3 convolution, in 4/9 of the multiplications.

After a nearest x2 upsampling every 2x2 block of the map repeats one input pixel, so a 3x3 kernel
applied at output pixel (2i + a, 2j + b) reads only a 2x2 window of the input: rows i - 1, i for
a = 0 (kernel rows 0 and 1 + 2 summed) and rows i, i + 1 for a = 1 (kernel rows 0 + 1 and 2), the
same for columns. So the four output phases are four 2x2 convolutions of the input with summed
kernels (the "sub-pixel" view of resize-convolution, Odena et al. 2016, "Deconvolution and
Checkerboard Artifacts"): 4 * 4 = 16 multiply-adds per input pixel and channel pair instead of
4 * 9 = 36. The four kernels run as one convolution with 4x the output channels over the input
padded by one pixel, and the phases are interleaved into the output. The numbers are the plain
path's up to float rounding (the summed kernel taps add before, not after, multiplying).

Only for an exact x2 (the UNet's `size` argument can ask for an odd size after an odd input side:
then the plain path runs), and only while no per-row LoRA delta is active on the conv (its delta
is computed on the upsampled map by the LoRA layer itself).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Per output phase a (0, 1), the 3x3 kernel rows summed into each tap of its 2x2 window, which reads
# input rows (i - 1 + a, i + a); the same for columns.
_TAPS = (((0,), (1, 2)), ((0, 1), (2,)))


def phase_weight(weight: Tensor) -> Tensor:
    """(C_out, C_in, 3, 3) -> (4 * C_out, C_in, 2, 2): the kernels of phases (0, 0), (0, 1), (1, 0),
    (1, 1), in that order along the output channels."""
    w = weight.float()
    phases = []
    for rows in _TAPS:
        by_rows = torch.stack([w[:, :, list(r), :].sum(2) for r in rows], dim=2)  # (C_out, C_in, 2, 3)
        for cols in _TAPS:
            phases.append(torch.stack([by_rows[..., list(c)].sum(-1) for c in cols], dim=-1))
    return torch.cat(phases).to(weight.dtype)  # (4 * C_out, C_in, 2, 2)


class PhaseWeights:
    """The phase kernels of a conv, computed once and again only when its weight changes (another
    tensor, or this one written in place)."""

    def __init__(self) -> None:
        self._source: tuple[Tensor, Tensor | None] | None = None
        self._stamp: tuple[int, int] = (0, 0)
        self._value: tuple[Tensor, Tensor | None] | None = None

    def of(self, conv: nn.Conv2d) -> tuple[Tensor, Tensor | None]:
        w, b = conv.weight, conv.bias
        # In a compiled graph frozen weights fold this at compile time; in training it is differentiated.
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and w.requires_grad):
            return phase_weight(w), None if b is None else b.repeat(4)
        stamp = (write_count(w), write_count(b))
        source = self._source
        if source is None or source[0] is not w or source[1] is not b or stamp != self._stamp:
            pw = phase_weight(w.detach())
            if w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous():
                pw = pw.contiguous(memory_format=torch.channels_last)
            self._value = (pw, None if b is None else b.detach().repeat(4))
            self._source, self._stamp = (w, b), stamp
        assert self._value is not None
        return self._value


def write_count(t: Tensor | None) -> int:
    """How often a tensor was written in place (-1: none, or an inference tensor, which has no
    counter and cannot be written outside inference mode)."""
    if t is None:
        return -1
    try:
        return t._version
    except RuntimeError:
        return -1


def upsample_conv(x: Tensor, conv: nn.Conv2d, cache: PhaseWeights) -> Tensor:
    """conv(nearest x2 upsampling of x); x (B, C_in, H, W) -> (B, C_out, 2H, 2W), in x's memory format."""
    groups = getattr(conv, "lora_runtime", None)
    if groups is not None and groups.groups:  # a per-row LoRA delta on this conv: the plain path
        return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    weight, bias = cache.of(conv)
    B, _, H, W = x.shape
    c_out = conv.out_channels
    y = F.conv2d(F.pad(x, (1, 1, 1, 1)), weight, bias)  # (B, 4 * C_out, H + 1, W + 1)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    out = torch.empty(
        (B, c_out, 2 * H, 2 * W),
        dtype=y.dtype,
        device=y.device,
        memory_format=torch.channels_last if channels_last else torch.contiguous_format,
    )
    for p, (a, b) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        out[:, :, a::2, b::2] = y[:, p * c_out : (p + 1) * c_out, a : a + H, b : b + W]
    return out
