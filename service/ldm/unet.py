"""Denoising UNet of Latent Diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models", sec. 3.3): an ADM-style UNet (Dhariwal & Nichol 2021) whose attention
layers are spatial transformers that cross-attend to the text encoder's token embeddings.

Module names follow the original CompVis/Stability code (`ldm/modules/diffusionmodules/
openaimodel.py` UNetModel and `ldm/modules/attention.py` SpatialTransformer), so the
`model.diffusion_model.*` part of a Stable Diffusion 1.x / 2.x / XL file loads with its prefix
stripped and nothing else: `input_blocks.{i}.{j}`, `middle_block.{0,1,2}`, `output_blocks.{i}.{j}`,
`out.*`, and SDXL's `label_emb.0.{0,2}` (sgm's `UNetModel` with `num_classes="sequential"`). The
index holes (`in_layers.1` is a SiLU, `out_layers.2` a dropout) are kept for that reason.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.ldm.attention import SpatialTransformer
from service.ldm.config import UNetConfig
from service.ldm.norms import norm
from service.ldm.upsample import PhaseWeights, upsample_conv
from service.ldm.winograd import Conv3x3, conv3x3_part


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017) of per-sample, possibly fractional timesteps.

    (B,) -> (B, dim), cosines first then sines, as openaimodel's `timestep_embedding` (equal to
    diffusers' `flip_sin_to_cos=True, freq_shift=0`). Computed in float32 whatever the model dtype:
    t goes up to 1000 and fp16 cannot resolve the phase of its high frequencies.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))  # (B, dim)
    return emb


# Whether ResBlock.split_at takes a split where a GroupNorm group straddles h and the skip (exact, but
# slower where measured); the tests turn it on.
STRADDLING = False


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding by addition (no scale-shift norm in SD)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            norm(channels),
            nn.SiLU(),
            Conv3x3(channels, out_channels),  # Winograd where it pays
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            norm(out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            Conv3x3(out_channels, out_channels),
        )
        # A 1x1 conv only where the width changes (`use_conv=False` in the original).
        self.skip_connection: nn.Module = (
            nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)  # (B, C_out, H, W)
        return self._rest(h, emb, self.skip_connection(x))

    def _rest(self, h: Tensor, emb: Tensor, skip: Tensor) -> Tensor:
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]  # (B, C_out, 1, 1) over all positions
        h = self.out_layers(h)
        return skip + h

    def split_at(self, c_h: int, c_skip: int) -> int | None:
        """For an input [h, s] of c_h + c_skip channels: the first channel of the GroupNorm groups that
        hold channels of s only (a group boundary at or after c_h), or None where there is none or the
        layers are not the plain ones (a per-row LoRA delta on a conv, no 1x1 skip conv). None too
        where a group straddles h and s (unless STRADDLING): then that group's channels of s go with h,
        and the extra concatenation and the odd widths (132 and 60 of 128 + 64 channels) cost more than
        the shared part saves (bench.engine's UNet, one thread: 2.16 -> 2.46 ms at 16x16, 4.32 -> 4.70
        at 32x32; where the groups align, 64 + 64 at 32x32: 3.33 -> 3.20)."""
        norm_, conv, skip = self.in_layers[0], self.in_layers[2], self.skip_connection
        if not (
            isinstance(norm_, nn.GroupNorm) and isinstance(skip, nn.Conv2d) and skip.kernel_size == (1, 1)
        ):
            return None
        if any(getattr(getattr(m, "lora_runtime", None), "groups", ()) for m in (conv, skip)):
            return None
        size = (c_h + c_skip) // norm_.num_groups
        start = -(-c_h // size) * size
        if start >= c_h + c_skip or (start != c_h and not STRADDLING):
            return None
        return start

    def forward_shared_skip(self, h: Tensor, s: Tensor, expand: Tensor, emb: Tensor, start: int) -> Tensor:
        """self(cat([h, s[expand]]), emb) with the channels of s from `start` (= split_at(...), where
        the GroupNorm groups hold s's channels only) normalised and convolved once per row of s: s has
        the U unique rows of a classifier-free-guidance batch (the UNet's head's skips), h its B rows.

        The same numbers: GroupNorm normalises each group by its own statistics, so the groups before
        `start` (h and, where a group straddles the two, s's first channels) and those after are two
        GroupNorms over their channels with their slices of the affine weights; SiLU acts per element;
        a conv is a sum over its input channels, here of two partial convs, the second on U rows and
        then expanded to B. Likewise the 1x1 skip conv, split at h's channels. Only the order of the
        float sums changes."""
        c_h = h.shape[1]
        norm_, conv, skip = self.in_layers[0], self.in_layers[2], self.skip_connection
        assert isinstance(norm_, nn.GroupNorm) and isinstance(conv, nn.Conv2d) and isinstance(skip, nn.Conv2d)
        per_row = h if start == c_h else torch.cat([h, s[:, : start - c_h][expand]], dim=1)
        y = conv3x3_part(conv, F.silu(_group_norm_part(norm_, per_row, 0)), 0, conv.bias)
        own = conv3x3_part(conv, F.silu(_group_norm_part(norm_, s[:, start - c_h :], start)), start, None)
        y = y + own[expand]
        through = F.conv2d(h, skip.weight[:, :c_h], skip.bias) + F.conv2d(s, skip.weight[:, c_h:])[expand]
        return self._rest(y, emb, through)


def _group_norm_part(norm_: nn.GroupNorm, x: Tensor, start: int) -> Tensor:
    """norm_ over its channels start .. start + x.shape[1] (x those, whole groups), as GroupNorm32: the
    statistics in float32."""
    size = norm_.num_channels // norm_.num_groups
    stop = start + x.shape[1]
    w = None if norm_.weight is None else norm_.weight[start:stop].float()
    b = None if norm_.bias is None else norm_.bias[start:stop].float()
    return F.group_norm(x.float(), x.shape[1] // size, w, b, norm_.eps).to(x.dtype)


class Downsample(nn.Module):
    """Stride-2 3x3 conv (`op`), halving H and W."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (avoids the checkerboard of transposed convs)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.phases = PhaseWeights()  # the conv's kernels for the exact x2 (upsample.py)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        # `size`: the next skip connection's (H, W), which is not 2x when a side was odd on the way down.
        if size is None or tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1]):
            return upsample_conv(x, self.conv, self.phases)
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class TimestepSequential(nn.ModuleList):
    """A list of layers applied in turn, each given what it needs (openaimodel's
    `TimestepEmbedSequential`): ResBlocks the time embedding, transformers the context. `start` and
    `stop` run a part of the list (the UNet's shared prefix ends inside a block)."""

    def forward(
        self,
        x: Tensor,
        emb: Tensor,
        context: Tensor | None,
        mask: Tensor | None,
        out_size: tuple[int, int] | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> Tensor:
        for i, layer in enumerate(self):
            if i < start or (stop is not None and i >= stop):
                continue
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                assert context is not None, "a transformer needs the context"
                x = layer(x, context, mask)
            elif isinstance(layer, Upsample):
                x = layer(x, out_size)
            else:
                x = layer(x)
        return x


def prefix_end(blocks: nn.ModuleList) -> tuple[int, int]:
    """(block, layer) of the first layer of the input blocks that reads the context: everything
    before it depends on x, t and y only. (len(blocks), 0) when none does."""
    for i, block in enumerate(blocks):
        assert isinstance(block, TimestepSequential)
        for j, layer in enumerate(block):
            if isinstance(layer, SpatialTransformer):
                return i, j
    return len(blocks), 0


class UNet(nn.Module):
    """eps- (or v-) prediction network: (noisy latent, timestep, text context) -> same shape as x."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        mc = cfg.model_channels
        emb_dim = 4 * mc

        def transformer(ch: int, depth: int, level: int | None = None) -> SpatialTransformer:
            heads, head_dim = cfg.heads_for(ch)
            if heads * head_dim != ch:
                raise ValueError(f"{ch} channels do not split into attention heads as configured ({cfg})")
            cross_only = level in cfg.cross_only_levels
            return SpatialTransformer(
                ch, heads, head_dim, depth, cfg.context_dim, cfg.use_linear_projection, cross_only
            )

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # SDXL: the pooled text embedding and the embedded size / crop / aesthetic ids (the vector `y`,
        # built by `sdxl_cond.added_vector`) are added to the time embedding.
        # The x4 upscaler: the low-res image's noise level, a class of an embedding table, added likewise.
        self.label_emb: nn.Module | None = None
        if cfg.num_classes:
            self.label_emb = nn.Embedding(cfg.num_classes, emb_dim)
        elif cfg.adm_in_channels:
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            )

        # Encoder half: per level, num_res_blocks blocks, then a downsample except at the last level.
        self.input_blocks = nn.ModuleList(
            [TimestepSequential([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])]
        )
        skip_channels = [mc]  # width of every input block's output, consumed by the decoder half
        ch = mc
        last = len(cfg.channel_mult) - 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mc * mult)]
                ch = mc * mult
                if cfg.depth_at(level):
                    layers.append(transformer(ch, cfg.depth_at(level), level))
                self.input_blocks.append(TimestepSequential(layers))
                skip_channels.append(ch)
            if level != last:
                self.input_blocks.append(TimestepSequential([Downsample(ch)]))
                skip_channels.append(ch)

        # The bottleneck always has a transformer, whatever attention_levels says.
        self.middle_block = TimestepSequential(
            [ResBlock(ch, emb_dim, ch), transformer(ch, cfg.transformer_depth), ResBlock(ch, emb_dim, ch)]
        )

        # Decoder half: one more block per level than the encoder, each eating one skip connection.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mc * mult)]
                ch = mc * mult
                if cfg.depth_at(level):
                    layers.append(transformer(ch, cfg.depth_at(level), level))
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepSequential(layers))

        self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        self.prefix_end = prefix_end(self.input_blocks)  # where `head` stops

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor,
        context_mask: Tensor | None = None,
        y: Tensor | None = None,
        expand: Tensor | None = None,
    ) -> Tensor:
        """x (B, in_channels, h, w), any h and w (upsampling follows the skips' sizes, as diffusers);
        t (B,) float timesteps (one per sample, fractional allowed); context (B, L, context_dim);
        context_mask (B, L) bool, True = a real token, False = padding (every row needs at least one
        True); y (B, adm_in_channels) SDXL's added vector, one per row, or (B,) integer classes (the x4
        upscaler's noise levels). -> (B, out_channels, h, w).

        `expand` (B,) int64: rows that share x, t and y (a classifier-free-guidance pair) are given
        once. x, t and y then have U <= B unique rows, and row i of the batch is row expand[i] of
        them: the layers before the first transformer (`head`) run on the U rows, the rest on B.
        """
        if expand is not None and (expand.ndim != 1 or expand.shape[0] != context.shape[0]):
            raise ValueError(f"expand must have shape ({context.shape[0]},), got {tuple(expand.shape)}")
        if context_mask is not None and context_mask.dtype != torch.bool:
            raise ValueError("context_mask must be a bool tensor (True = attend)")
        prefix = self.head(x, t, y)
        if expand is None:
            return self.tail(prefix, context, context_mask)
        h, emb, skips = prefix
        # The head's skips stay on the unique rows: the decoder's blocks that read them compute their
        # part once per unique row (`shared_skips`).
        return self.tail((h[expand], emb[expand], skips), context, context_mask, expand)

    def head(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Prefix:
        """The layers before the first that reads the context (conv_in, the time embedding, the
        ResBlocks and downsamplings before the first transformer): their activation, the time
        embedding and the skip connections so far."""
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        if (y is None) != (self.label_emb is None):
            raise ValueError("y is needed exactly when the UNet has label_emb (SDXL, the x4 upscaler)")
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(x.dtype))  # (B, 4*mc)
        if self.cfg.num_classes and self.label_emb is not None and y is not None:
            if y.shape != (x.shape[0],) or y.is_floating_point():
                raise ValueError(f"y must be ({x.shape[0]},) integer classes, got {tuple(y.shape)} {y.dtype}")
            emb = emb + self.label_emb(y.to(x.device)).to(emb.dtype)  # (B, 4*mc)
        elif self.label_emb is not None and y is not None:
            if y.shape != (x.shape[0], self.cfg.adm_in_channels):
                raise ValueError(
                    f"y must have shape ({x.shape[0]}, {self.cfg.adm_in_channels}), got {tuple(y.shape)}"
                )
            emb = emb + self.label_emb(y.to(x.dtype))  # (B, 4*mc)
        end, layer = self.prefix_end
        skips: list[Tensor] = []
        h = x
        for block in self.input_blocks[:end]:
            h = block(h, emb, None, None)
            skips.append(h)
        if layer:
            h = self.input_blocks[end](h, emb, None, None, stop=layer)
        return h, emb, skips

    def tail(
        self,
        prefix: Prefix,
        context: Tensor,
        context_mask: Tensor | None = None,
        expand: Tensor | None = None,
    ) -> Tensor:
        """The rest of the network from `head`'s output, one row per row of the context. With `expand`,
        the prefix's skips have the unique rows (its activation and embedding all B rows)."""
        h, emb, skips = prefix
        skips = list(skips)
        shared = len(skips) if expand is not None else 0  # skips[:shared] have the unique rows
        end, layer = self.prefix_end
        for i in range(end, len(self.input_blocks)):
            h = self.input_blocks[i](h, emb, context, context_mask, start=layer if i == end else 0)
            skips.append(h)
        h = self.middle_block(h, emb, context, context_mask)
        for block in self.output_blocks:
            skip = skips.pop()
            out_size = (skips[-1].shape[-2], skips[-1].shape[-1]) if skips else None
            if expand is not None and len(skips) < shared:
                assert isinstance(block, TimestepSequential)
                first = block[0]
                start = first.split_at(h.shape[1], skip.shape[1]) if isinstance(first, ResBlock) else None
                if isinstance(first, ResBlock) and start is not None:
                    h = first.forward_shared_skip(h, skip, expand, emb, start)
                    h = block(h, emb, context, context_mask, out_size, start=1)
                    continue
                skip = skip[expand]
            h = torch.cat([h, skip], dim=1)  # (B, C + C_skip, H, W)
            h = block(h, emb, context, context_mask, out_size)
        return self.out(h)


# `UNet.head`'s output: the activation where the prefix ends, the time embedding, the skips so far.
Prefix = tuple[Tensor, Tensor, list[Tensor]]


def expand_rows(prefix: Prefix, expand: Tensor) -> Prefix:
    """Row i of the result is row expand[i] of the prefix (in its memory format: advanced indexing
    keeps channels-last, `index_select` would not)."""
    h, emb, skips = prefix
    return h[expand], emb[expand], [s[expand] for s in skips]
