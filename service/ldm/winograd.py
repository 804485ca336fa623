"""3x3 stride-1 convolutions by Winograd's minimal filtering F(2x2, 3x3) and F(4x4, 3x3), for the CPU.

A 3x3 convolution producing a 2x2 output tile reads a 4x4 input tile d. Winograd's algorithm (Lavin
& Gray 2016, "Fast Algorithms for Convolutional Neural Networks") computes that tile as
A^T [(G g G^T) * (B^T d B)] A: the 3x3 kernel g becomes a 4x4 one (U = G g G^T, once per weight),
the input tile becomes V = B^T d B (adds and subtractions only), they are multiplied elementwise, and
A^T (.) A folds the 16 products into the 2x2 outputs. Summed over input channels, the elementwise
products become 16 matrix products, one per position of the 4x4 transform: M[k] = V[k] @ U[k], with
V[k] (tiles, C_in) and U[k] (C_in, C_out). That is 16 multiply-adds per tile and channel pair instead
of 4 * 9 = 36, so 2.25x fewer in the GEMM, where a direct convolution spends its time. F(4x4, 3x3)
does the same with 6x6 input tiles at stride 4 and 36 products per 4x4 output tile (144 direct: 4x
fewer), and the transforms touch 2.25 values per input and output value instead of 4.

Here the input transform is one small matrix product (the (a*a)x(a*a) matrix kron(B^T, B^T), a = 4 or 6)
over the a x a tiles gathered from the padded input (a strided view, copied once), the a*a GEMMs are one
`torch.bmm`, and the output transform is one product with kron(A^T, A^T), written straight into the
output's layout (NCHW or channels-last, as the input). The transforms are memory-bound passes, so the
method pays where the GEMM dominates: wide layers on small maps. `bench/winograd.py` times both against
oneDNN's direct convolution on the shapes of bench.engine's model and SD 1.5's; the rule in `choose`
comes from there and from A/Bs of whole UNet calls and decodes (F(4x4) where Winograd pays, F(2x2) where
a GEMM has few tile rows). The tile grid is padded to a multiple of the tile (the extra outputs are cut
off). In fp32 the results differ from a direct convolution's by float rounding: F(2x2)'s about 1e-6
relative, less than oneDNN's own error against a float64 reference (its G and A are exact in binary, B's
are adds); F(4x4)'s 1.4 to 4x oneDNN's on the shapes taken (about 3e-6 of the largest output; see F43).

Only in eager CPU fp32 inference: not in a compiled graph (inductor picks its own convolution), not
when gradients are wanted (training differentiates the plain conv), not with a per-row LoRA delta
(LoraConv2d adds its delta to the plain path), not on other devices (cuDNN has its own Winograd).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Tiles:
    """One Winograd algorithm F(m x m, 3x3): its transforms as the matrix products the code runs."""

    def __init__(self, m: int, bt: list[list[float]], g: list[list[float]], at: list[list[float]]) -> None:
        self.m, self.a = m, m + 2  # output tile side; input tile side (and the transform's)
        self.g = torch.tensor(g, dtype=torch.float64)  # (a, 3)
        bt_, at_ = torch.tensor(bt, dtype=torch.float64), torch.tensor(at, dtype=torch.float64)
        self.bt, self.at = bt_.float(), at_.float()  # (a, a), (m, a)
        # (a*a, a*a): V[(i, j)] = sum over (r, s) of B^T[i, r] B^T[j, s] d[r, s]
        self.inp = torch.kron(bt_, bt_).float()
        self.out = torch.kron(at_, at_).float()  # (m*m, a*a): y[(i, j)] from the a*a products of a tile
        # M[k] + bias at the transform position (1, 1) adds the bias to all outputs: A^T[:, 1] = (1, ..., 1).
        assert bool((at_[:, 1] == 1).all())
        self.bias_at = self.a + 1


# F(2x2, 3x3) (Lavin & Gray 2016, eq. 7 and 8): points 0, 1, -1, infinity.
F23 = Tiles(
    2,
    bt=[[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
    g=[[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
    at=[[1, 1, 1, 0], [0, 1, -1, -1]],
)
# F(4x4, 3x3): 36 products per 4x4 output tile instead of 144 (4x fewer; F(2x2) 2.25x). Lavin & Gray
# (sec. 4.2) use the points 0, 1, -1, 2, -2, infinity; 0, 1, -1, 2, -1/2, infinity (as Barabasz et al.
# 2020, "Error analysis and improving the accuracy of Winograd convolution for deep neural networks",
# recommend) are exact in binary but for G's fifteenths and thirds, and round about 3x less: 2.0e-5
# against 5.8e-5 on unit-size outputs of 2x256x16x16 -> 256 (F(2x2): 3.4e-6, oneDNN 8.5e-6).
# B^T's rows: the Lagrange numerators prod over l != j of (x - p_l), and prod over all of (x - p_l);
# G's rows: (1, p_j, p_j^2) / prod over l != j of (p_j - p_l); A^T's columns: (1, p_j, p_j^2, p_j^3).
F43 = Tiles(
    4,
    bt=[
        [1, 3 / 2, -2, -3 / 2, 1, 0],
        [0, -1, -5 / 2, -1 / 2, 1, 0],
        [0, 1, 1 / 2, -5 / 2, 1, 0],
        [0, -1 / 2, -1, 1 / 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 1, 3 / 2, -2, -3 / 2, 1],
    ],
    g=[
        [1, 0, 0],
        [-1 / 3, -1 / 3, -1 / 3],
        [1 / 3, -1 / 3, 1 / 3],
        [1 / 15, 2 / 15, 4 / 15],
        [-16 / 15, 8 / 15, -4 / 15],
        [0, 0, 1],
    ],
    at=[[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -1 / 2, 0], [0, 1, 1, 4, 1 / 4, 0], [0, 1, -1, 8, -1 / 8, 1]],
)
_BY_POSITIONS = {16: F23, 36: F43}  # U's first dimension, a*a, tells which

# Where each is fastest (bench/winograd.py, one thread, AVX-512; ratios to oneDNN's direct conv,
# channels-last; bench/README.md has the tables). F(4x4) beats both F(2x2) and oneDNN on every shape
# with both widths at least MIN_CHANNELS (64: 64 -> 64 at 32x32 0.72-0.75 of oneDNN, where F(2x2) tied;
# 4 -> 64 and 64 -> 4 lose) on maps up to 64x64 (SD 1.5's top level, 320 channels at batch 2: 0.43,
# where F(2x2) was 1.17; 128 at batch 1: 0.54) ...
MIN_CHANNELS = 64
MAX_PIXELS = 64 * 64
# Not on larger maps: at 128x128 F(4x4) was faster in isolation (64 -> 64 at batch 1 0.83, 128 -> 64
# 0.80 of oneDNN) but a whole decode of bench.engine's VAE after writing 256 MB (as after the UNet's
# steps) took 236 ms with it there, 220 without, 231 with main's F(2x2) rule (32 channels at 256x256
# lost even in isolation, 1.5x).
#
# With few tiles its 36 GEMMs read a weight 2.25x F(2x2)'s for a few rows each: SD 1.5's 1280 -> 1280
# at 8x8, batch 2 (8 rows a GEMM) took 0.57 of oneDNN, F(2x2) 0.31-0.36. In a whole UNet call, where
# each U was last read a call ago (and F(4x4)'s U are 4x the weights), bench.engine's 8x8 layers lose
# it too: in an A/B of whole UNet calls (bench/README.md), F(4x4) everywhere was no faster than F(2x2)
# alone (main's rule), F(2x2) below MIN_TILES tile rows a GEMM (batch x tiles: 8x8 maps at batch 2 or
# 3) 3.5% faster than both; 16 and 32 tied. Isolated, in cache or after writing 64 MB
# (`bench/winograd.py --cold`), F(4x4) and F(2x2) tied at 8x8 (0.55-0.70 of oneDNN each).
MIN_TILES = 16
# NCHW (gathering the tiles reads with a stride): F(4x4) up to 64x64 for both widths at least 128 (64
# -> 64 at 32x32 lost, 1.19; 128 -> 64 at 128x128 1.34; at 64x64 320 channels 0.51, 128 0.73).
MIN_CHANNELS_NCHW = 128
MAX_PIXELS_NCHW = 64 * 64


def transform_weight(weight: Tensor, tiles: Tiles = F23) -> Tensor:
    """(C_out, C_in, 3, 3) -> U (a*a, C_in, C_out) = G g G^T per channel pair, computed in float64."""
    c_out, c_in = weight.shape[:2]
    g = tiles.g.to(weight.device)
    u = torch.einsum("ai,ocij,bj->abco", g, weight.double(), g)
    return u.reshape(tiles.a**2, c_in, c_out).to(weight.dtype).contiguous()


def winograd_conv(x: Tensor, u: Tensor, bias: Tensor | None) -> Tensor:
    """conv2d(x, weight, bias, padding=1) with U = transform_weight(weight, F23 or F43) (U's size says
    which); x (B, C_in, H, W), NCHW or channels-last; the output (B, C_out, H, W) in x's memory format."""
    f = _BY_POSITIONS[u.shape[0]]
    m, a = f.m, f.a
    batch, c_in, h, w = x.shape
    c_out = u.shape[2]
    th, tw = -(-h // m), -(-w // m)  # tiles down and across
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    # Padded by 1 (the conv's padding), plus up to m - 1 at the bottom / right; in x's layout.
    p = F.pad(x, (1, m * tw + 1 - w, 1, m * th + 1 - h))
    sb, sc, sh, sw = p.stride()
    # The a x a tiles at stride m as a view (r, s, b, i, j, c), copied once into a*a rows.
    tiles = p.as_strided((a, a, batch, th, tw, c_in), (sh, sw, sb, m * sh, m * sw, sc))
    v = torch.mm(f.inp.to(x.device, x.dtype), tiles.reshape(a * a, -1)).view(a * a, batch * th * tw, c_in)
    prod = torch.bmm(v, u)  # (a*a, tiles, C_out)
    if bias is not None:
        prod[f.bias_at].add_(bias)
    y = torch.mm(f.out.to(x.device, x.dtype), prod.view(a * a, -1)).view(m, m, batch, th, tw, c_out)
    even = (h, w) == (m * th, m * tw)
    if channels_last:
        out = x.new_empty((batch, th, m, tw, m, c_out))
        out.permute(2, 4, 0, 1, 3, 5).copy_(y)
        nhwc = out.view(batch, m * th, m * tw, c_out)
        result = (nhwc if even else nhwc[:, :h, :w]).permute(0, 3, 1, 2)
        return result if even else result.contiguous(memory_format=torch.channels_last)
    out = x.new_empty((batch, c_out, th, m, tw, m))
    out.permute(3, 5, 0, 2, 4, 1).copy_(y)
    nchw = out.view(batch, c_out, m * th, m * tw)
    return nchw if even else nchw[:, :, :h, :w].contiguous()


def worth_it(conv: nn.Conv2d, x: Tensor) -> bool:
    """Whether Winograd is faster than oneDNN for this conv and input (the rule above)."""
    return choose(conv, x) is not None


def choose(conv: nn.Conv2d, x: Tensor) -> Tiles | None:
    """The fastest of oneDNN (None), F(2x2, 3x3) and F(4x4, 3x3) for this conv and input (the rule above)."""
    if x.dim() != 4:
        return None
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    batch, c_in, h, w = x.shape
    narrowest, pixels = min(c_in, conv.out_channels), h * w
    if channels_last:
        if narrowest < MIN_CHANNELS or pixels > MAX_PIXELS:
            return None
    elif narrowest < MIN_CHANNELS_NCHW or pixels > MAX_PIXELS_NCHW:
        return None
    return F23 if batch * -(-h // 4) * -(-w // 4) < MIN_TILES else F43


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
    """U of a conv for each algorithm, computed once and again only when its weight changes (another
    tensor, this one written in place, or its storage replaced), as PhaseWeights in upsample.py."""

    def __init__(self) -> None:
        self._source: Tensor | None = None
        self._stamp: tuple[int, int] = (0, 0)
        self._values: dict[int, Tensor] = {}  # by the output tile's side

    def of(self, conv: nn.Conv2d, tiles: Tiles = F23) -> Tensor:
        w = conv.weight
        stamp = (_write_count(w), w.data_ptr())
        if self._source is not w or stamp != self._stamp:
            self._values.clear()
            self._source, self._stamp = w, stamp
        value = self._values.get(tiles.m)
        if value is None:
            value = self._values[tiles.m] = transform_weight(w.detach(), tiles)
        return value


def _write_count(t: Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor: no counter, and it cannot be written outside inference mode
        return -1


def conv3x3(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """conv(x) by Winograd where it applies and pays (the conv carries a `winograd` cache), else the
    conv's own forward computation."""
    cache = getattr(conv, "winograd", None)
    if isinstance(cache, WinogradWeights) and ENABLED and applies(conv, x):
        tiles = choose(conv, x)
        if tiles is not None:
            return winograd_conv(x, cache.of(conv, tiles), conv.bias)
    return conv._conv_forward(x, conv.weight, conv.bias)


def conv3x3_part(conv: nn.Conv2d, x: Tensor, start: int, bias: Tensor | None) -> Tensor:
    """The conv's contribution from its input channels start .. start + x.shape[1] (x those channels),
    plus `bias`: by Winograd with the matching rows of the cached U where that pays, else F.conv2d with
    that slice of the weight."""
    cache = getattr(conv, "winograd", None)
    stop = start + x.shape[1]
    if isinstance(cache, WinogradWeights) and ENABLED and applies(conv, x):
        tiles = choose(conv, x)
        if tiles is not None:
            return winograd_conv(x, cache.of(conv, tiles)[:, start:stop], bias)
    return F.conv2d(x, conv.weight[:, start:stop], bias, padding=1)


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
