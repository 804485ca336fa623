"""3x3 stride-1 convolutions by Winograd's minimal filtering F(2x2, 3x3), for the CPU's wide layers.

A 3x3 convolution producing a 2x2 output tile reads a 4x4 input tile d. Winograd's algorithm (Lavin
& Gray 2016, "Fast Algorithms for Convolutional Neural Networks") computes that tile as
A^T [(G g G^T) * (B^T d B)] A: the 3x3 kernel g becomes a 4x4 one (U = G g G^T, once per weight),
the input tile becomes V = B^T d B (adds and subtractions only), they are multiplied elementwise, and
A^T (.) A folds the 16 products into the 2x2 outputs. Summed over input channels, the elementwise
products become 16 matrix products, one per position of the 4x4 transform: M[k] = V[k] @ U[k], with
V[k] (tiles, C_in) and U[k] (C_in, C_out). That is 16 multiply-adds per tile and channel pair instead
of 4 * 9 = 36, so 2.25x fewer in the GEMM, where a direct convolution spends its time.

Here the input transform is one small matrix product (the 16x16 matrix kron(B^T, B^T)) over the 4x4
tiles gathered from the padded input (a strided view, copied once), the 16 GEMMs are one `torch.bmm`,
and the output transform is one product with the 4x16 matrix kron(A^T, A^T), written straight into
the output's layout (NCHW or channels-last, as the input). The transforms are memory-bound and cost
about one input-sized and one output-sized pass each, so the method pays where the GEMM dominates:
wide layers on small maps. `bench/winograd.py` times it against oneDNN's direct convolution on the
shapes of bench.engine's model; the rule in `worth_it` comes from there. The tile grid is padded to
even H and W (the extra outputs are cut off). In fp32 the results differ from a direct convolution's
by float rounding (about 1e-6 relative, less than oneDNN's own error against a float64 reference:
the transforms of G and A are exact in binary, B's are adds).

Only in eager CPU fp32 inference: not in a compiled graph (inductor picks its own convolution), not
when gradients are wanted (training differentiates the plain conv), not with a per-row LoRA delta
(LoraConv2d adds its delta to the plain path), not on other devices (cuDNN has its own Winograd).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# F(2x2, 3x3) (Lavin & Gray 2016, eq. 7 and 8).
_BT = torch.tensor([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=torch.float64)
_G = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64)
_AT = torch.tensor([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=torch.float64)
_IN = torch.kron(_BT, _BT).float()  # (16, 16): V[(a, b)] = sum over (r, s) of B^T[a, r] B^T[b, s] d[r, s]
_OUT = torch.kron(_AT, _AT).float()  # (4, 16): y[(a, b)] from the 16 products of a tile
# M[k] + bias at the transform position (1, 1) adds the bias to all four outputs: A^T[:, 1] = (1, 1).
_BIAS_AT = 5

# Where Winograd beats oneDNN's direct fp32 convolution (bench/winograd.py, one thread, AVX-512):
# both widths at least this (64 -> 64 at 32x32 was a tie, 64 -> 64 at 128x128 30% slower) ...
MIN_CHANNELS = 128
# ... and maps up to this many pixels, channels-last. At 64x64 the transforms' memory traffic (four
# times the input, twice) outgrows the caches: there it only paid for a small input (128 channels,
# batch 1: 20% faster; batch 2: 4%), and SD 1.5's top level (320 channels, batch 2) was 33% slower,
# 640 -> 320 14% slower; at 32x32 and below every measured width won (SD 1.5's 640 at batch 2 to 8:
# 11-37% faster, 1280 at 16x16 43-60%), so 64x64 is taken only up to MAX_ROWS_AT_64 batch x channels.
MAX_PIXELS = 32 * 32
MAX_ROWS_AT_64 = 128
# ... or this many in NCHW, where gathering the tiles reads with a stride of 2 (128 channels at 64x64
# was 5% slower than oneDNN there, at 32x32 9% faster).
MAX_PIXELS_NCHW = 32 * 32


def transform_weight(weight: Tensor) -> Tensor:
    """(C_out, C_in, 3, 3) -> U (16, C_in, C_out) = G g G^T per channel pair, computed in float64."""
    c_out, c_in = weight.shape[:2]
    g = _G.to(weight.device)
    u = torch.einsum("ai,ocij,bj->abco", g, weight.double(), g)
    return u.reshape(16, c_in, c_out).to(weight.dtype).contiguous()


def winograd_conv(x: Tensor, u: Tensor, bias: Tensor | None) -> Tensor:
    """conv2d(x, weight, bias, padding=1) with U = transform_weight(weight); x (B, C_in, H, W), NCHW or
    channels-last; the output (B, C_out, H, W) in x's memory format."""
    batch, c_in, h, w = x.shape
    c_out = u.shape[2]
    th, tw = (h + 1) // 2, (w + 1) // 2  # tiles down and across
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    # Padded by 1 (the conv's padding), plus 1 at the bottom / right for an odd side; in x's layout.
    p = F.pad(x, (1, 2 * tw + 1 - w, 1, 2 * th + 1 - h))
    sb, sc, sh, sw = p.stride()
    # The 4x4 tiles at stride 2 as a view (r, s, b, i, j, c), copied once into 16 rows.
    tiles = p.as_strided((4, 4, batch, th, tw, c_in), (sh, sw, sb, 2 * sh, 2 * sw, sc))
    v = torch.mm(_IN.to(x.device, x.dtype), tiles.reshape(16, -1)).view(16, batch * th * tw, c_in)
    m = torch.bmm(v, u)  # (16, tiles, C_out)
    if bias is not None:
        m[_BIAS_AT].add_(bias)
    y = torch.mm(_OUT.to(x.device, x.dtype), m.view(16, -1)).view(2, 2, batch, th, tw, c_out)
    even = (h, w) == (2 * th, 2 * tw)
    if channels_last:
        out = x.new_empty((batch, th, 2, tw, 2, c_out))
        out.permute(2, 4, 0, 1, 3, 5).copy_(y)
        nhwc = out.view(batch, 2 * th, 2 * tw, c_out)
        result = (nhwc if even else nhwc[:, :h, :w]).permute(0, 3, 1, 2)
        return result if even else result.contiguous(memory_format=torch.channels_last)
    out = x.new_empty((batch, c_out, th, 2, tw, 2))
    out.permute(3, 5, 0, 2, 4, 1).copy_(y)
    nchw = out.view(batch, c_out, 2 * th, 2 * tw)
    return nchw if even else nchw[:, :, :h, :w].contiguous()


def worth_it(conv: nn.Conv2d, x: Tensor) -> bool:
    """Whether Winograd is faster than oneDNN for this conv and input (the rule above)."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if min(conv.in_channels, conv.out_channels) < MIN_CHANNELS or x.dim() != 4:
        return False
    pixels = x.shape[-2] * x.shape[-1]
    if not channels_last:
        return pixels <= MAX_PIXELS_NCHW
    return pixels <= MAX_PIXELS or (pixels <= 64 * 64 and x.shape[0] * x.shape[1] <= MAX_ROWS_AT_64)


def applies(conv: nn.Conv2d, x: Tensor) -> bool:
    """Whether this call may take the Winograd path at all: a plain 3x3 stride-1 padding-1 conv, fp32
    on the CPU, eager inference."""
    w = conv.weight
    return (
        conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and w.dtype == torch.float32
        and not torch.compiler.is_compiling()
        and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))
    )


class WinogradWeights:
    """U of a conv, computed once and again only when its weight changes (another tensor, this one
    written in place, or its storage replaced), as PhaseWeights in upsample.py."""

    def __init__(self) -> None:
        self._source: Tensor | None = None
        self._stamp: tuple[int, int] = (0, 0)
        self._value: Tensor | None = None

    def of(self, conv: nn.Conv2d) -> Tensor:
        w = conv.weight
        stamp = (_write_count(w), w.data_ptr())
        if self._value is None or self._source is not w or stamp != self._stamp:
            self._value = transform_weight(w.detach())
            self._source, self._stamp = w, stamp
        return self._value


def _write_count(t: Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor: no counter, and it cannot be written outside inference mode
        return -1


def conv3x3(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """conv(x) by Winograd where it applies and pays (the conv carries a `winograd` cache), else the
    conv's own forward computation."""
    cache = getattr(conv, "winograd", None)
    if isinstance(cache, WinogradWeights) and ENABLED and applies(conv, x) and worth_it(conv, x):
        return winograd_conv(x, cache.of(conv), conv.bias)
    return conv._conv_forward(x, conv.weight, conv.bias)


# Off (LDM_WINOGRAD=0 in the environment, or set here): every conv takes the direct path; tests and
# benchmarks compare the two.
ENABLED = os.environ.get("LDM_WINOGRAD", "1") != "0"


class Conv3x3(nn.Conv2d):
    """nn.Conv2d(c_in, c_out, 3, padding=1) that runs by Winograd where that is faster (`conv3x3`); its
    parameters and state dict are a plain Conv2d's."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 3, padding=1)
        self.winograd = WinogradWeights()

    def forward(self, x: Tensor) -> Tensor:
        return conv3x3(self, x)
