"""The spatial transformer of the Latent Diffusion UNet (Rombach et al. 2022, sec. 3.3): attention
over a feature map's positions that cross-attends to the text encoder's token embeddings.

Module names follow the original CompVis code (`ldm/modules/attention.py` SpatialTransformer,
BasicTransformerBlock, CrossAttention), as in unet.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.ldm.norms import norm
from service.ldm.upsample import write_count


class CrossAttention(nn.Module):
    """Multi-head attention; self-attention when no context is given (LDM eq. 3)."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

        # The last context's keys and values (`_keys_values`): a batch's context is one tensor for
        # as long as its rows' prompts stay the same (DenoisingBatch), so most steps reuse them.
        self._kv_source: tuple[Tensor, ...] | None = None
        self._kv_stamp: tuple[int, int] = (0, 0)
        self._kv: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """x (B, N, query_dim); context (B, L, context_dim); mask (B, L) bool, True = attend."""
        B, N, _ = x.shape
        q = self.to_q(x).view(B, N, self.heads, -1).transpose(1, 2)  # (B, heads, N, d)
        k, v = self._keys_values(x if context is None else context, cache=context is not None)
        L = k.shape[1]
        k = k.view(B, L, self.heads, -1).transpose(1, 2)  # (B, heads, L, d)
        v = v.view(B, L, self.heads, -1).transpose(1, 2)  # (B, heads, L, d)
        # Padding tokens get probability exactly 0, so a padded prompt attends as the unpadded one.
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, N, d), scale d^-0.5
        out = out.transpose(1, 2).reshape(B, N, -1)  # (B, N, heads * d)
        return self.to_out(out)

    def _keys_values(self, ctx: Tensor, cache: bool) -> tuple[Tensor, Tensor]:
        """to_k(ctx), to_v(ctx), (B, L, inner) each; those of the last call when `ctx` is the same
        tensor and the projections unchanged. Not cached: self-attention, a compiled graph (where
        they are a part of the graph), training, and per-row LoRA deltas on the projections."""
        wk, wv = self.to_k.weight, self.to_v.weight
        lora = getattr(self.to_k, "lora_runtime", None) or getattr(self.to_v, "lora_runtime", None)
        if (
            not cache
            or torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and wk.requires_grad)
            or (lora is not None and lora.groups)
        ):
            return self.to_k(ctx), self.to_v(ctx)
        stamp = (write_count(wk), write_count(wv))
        source = self._kv_source
        if source is None or source[0] is not ctx or source[1] is not wk or source[2] is not wv:
            source = None
        if source is None or stamp != self._kv_stamp or self._kv is None:
            self._kv = (self.to_k(ctx), self.to_v(ctx))
            self._kv_source, self._kv_stamp = (ctx, wk, wv), stamp
        return self._kv


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): one projection gives both the value and the gate."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)  # 2 x (B, N, dim_out)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to the context, GEGLU MLP."""

    def __init__(
        self, dim: int, heads: int, head_dim: int, context_dim: int, cross_only: bool = False
    ) -> None:
        super().__init__()
        # cross_only: the first attention attends to the context too (the x4 upscaler's upper levels).
        self.cross_only = cross_only
        self.attn1 = CrossAttention(dim, context_dim if cross_only else dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        # The upscaler's upper levels: attn1 attends to the text as attn2 does.
        x = x + (self.attn1(self.norm1(x), context, mask) if self.cross_only else self.attn1(self.norm1(x)))
        x = x + self.attn2(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the H*W positions of a feature map, conditioned by cross-attention (LDM
    sec. 3.3). SD 1.x projects in/out with 1x1 convs, SD 2.x with Linear layers after flattening;
    both are the same map, only the weight shapes differ."""

    def __init__(
        self,
        channels: int,
        heads: int,
        head_dim: int,
        depth: int,
        context_dim: int,
        use_linear: bool,
        cross_only: bool = False,
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        self.use_linear = use_linear
        self.norm = norm(channels, eps=1e-6)
        self.proj_in: nn.Module = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, head_dim, context_dim, cross_only) for _ in range(depth)]
        )
        self.proj_out: nn.Module = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        B, _, H, W = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)  # (B, inner, H, W)
        h = h.flatten(2).transpose(1, 2)  # (B, H*W, C or inner)
        if self.use_linear:
            h = self.proj_in(h)  # (B, H*W, inner)
        for block in self.transformer_blocks:
            h = block(h, context, mask)
        if self.use_linear:
            h = self.proj_out(h)  # (B, H*W, C)
        h = h.transpose(1, 2).reshape(B, -1, H, W)  # (B, C or inner, H, W)
        if not self.use_linear:
            h = self.proj_out(h)  # (B, C, H, W)
        return x + h
