"""KL-regularised autoencoder of Latent Diffusion (Rombach et al. 2022, sec. 3.1 and app. G): a
convolutional encoder to a diagonal Gaussian over a latent 2**(levels-1) times smaller per side,
and a decoder back to pixels. The diffusion model runs on its latents.

Module names follow the original CompVis code (`ldm/models/autoencoder.py` AutoencoderKL and
`ldm/modules/diffusionmodules/model.py` Encoder/Decoder) so the `first_stage_model.*` part of a
Stable Diffusion file loads with its prefix stripped, the mid-attention q/k/v/proj_out included
(stored as 1x1 conv weights, hence kept as convs here).

Scaling: `encode`/`decode` work on raw latents. `encode_latents`/`decode_latents` multiply /
divide by `cfg.scaling_factor` (0.18215 for SD), which gives the latents roughly unit variance
(LDM sec. 4.3.2); the diffusion model and samplers only ever see scaled latents.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.ldm.config import AutoencoderConfig
from service.ldm.upsample import PhaseWeights, upsample_conv
from service.ldm.winograd import Conv3x3


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with float32 statistics, so a half-precision autoencoder normalises accurately."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def norm(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """Pre-activation residual block, no time embedding (the autoencoder is not conditioned)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = norm(in_channels)
        self.conv1 = Conv3x3(in_channels, out_channels)  # Winograd where it pays (winograd.py)
        self.norm2 = norm(out_channels)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = Conv3x3(out_channels, out_channels)
        self.nin_shortcut: nn.Module = (
            nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with 1x1-conv projections."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): one head of width C, scaled by C^-0.5 as in the original.
        # contiguous(): SDPA's fused kernels need the last dimension dense, else it falls back to math.
        q, k, v = (
            proj(h).flatten(2).transpose(1, 2)[:, None].contiguous() for proj in (self.q, self.k, self.v)
        )
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, H*W, C)
        h = h[:, 0].transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding right and bottom only, as in the original (pad 0 in the conv)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv, computed without upsampling first (upsample.py)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.phases = PhaseWeights()  # the conv's kernels as four 2x2 ones (upsample.py)

    def forward(self, x: Tensor) -> Tensor:
        return upsample_conv(x, self.conv, self.phases)


class MidBlock(nn.Module):
    """ResBlock, attention, ResBlock at the lowest resolution (`mid.block_1`, `mid.attn_1`, ...)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution of the encoder (`down.{i}`) or decoder (`up.{i}`): blocks, then a resampler."""

    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, resample_name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.resample_name = resample_name
        if resample is not None:
            self.add_module(resample_name, resample)  # `downsample` / `upsample`, as in the files

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        resample = getattr(self, self.resample_name, None)
        return x if resample is None else resample(x)


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> Gaussian moments (B, 2*z, H/f, W/f), f = 2**(levels-1)."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        ch = cfg.base_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for i, mult in enumerate(cfg.channel_mult):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * mult))
                block_in = ch * mult
            last = i == len(cfg.channel_mult) - 1
            self.down.append(Level(blocks, None if last else Downsample(block_in), "downsample"))
        self.mid = MidBlock(block_in)
        self.norm_out = norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z, h, w) -> image (B, 3, h*f, w*f), roughly in [-1, 1] (not clamped)."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        ch = cfg.base_channels
        block_in = ch * cfg.channel_mult[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in)
        # `up` is indexed by level like the encoder's `down` (up.0 is full resolution) but built and
        # run from the deepest level; it has one block more per level than the encoder.
        levels: list[Level] = []
        for i, mult in reversed(list(enumerate(cfg.channel_mult))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, ch * mult))
                block_in = ch * mult
            levels.insert(0, Level(blocks, None if i == 0 else Upsample(block_in), "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """Posterior q(z|x) = N(mean, diag(exp(logvar))) of the KL-regularised autoencoder."""

    def __init__(self, moments: Tensor) -> None:
        mean, logvar = moments.chunk(2, dim=1)  # 2 x (B, z, h, w)
        self.mean = mean
        # The clamp keeps exp() finite for untrained or saturated encoders, as in the original.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """mean + std * noise. The noise is drawn on the generator's device (CPU by default) in
        float32, then moved, so a CPU generator gives the same latents on any accelerator."""
        device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=torch.float32)
        return self.mean + self.std * noise.to(self.mean.device, self.mean.dtype)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample, summed over latent dimensions -> (B,)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=(1, 2, 3))


class Autoencoder(nn.Module):
    """AutoencoderKL: encoder, `quant_conv`, Gaussian, `post_quant_conv`, decoder."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        z = cfg.latent_channels
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """x (B, 3, H, W) in [-1, 1], H and W multiples of the downsample factor -> posterior over
        raw (unscaled) latents of shape (B, z, H/f, W/f)."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        """Raw (unscaled) latents (B, z, h, w) -> image (B, 3, h*f, w*f), about [-1, 1], unclamped."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, DiagonalGaussian]:
        """Training pass: reconstruction from a posterior sample, and the posterior (for the KL term)."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior

    def encode_latents(
        self, x: Tensor, generator: torch.Generator | None = None, sample: bool = True
    ) -> Tensor:
        """Image in [-1, 1] -> latents scaled by `cfg.scaling_factor`, as the UNet sees them. Draws
        from the posterior (as SD's img2img does) unless `sample=False`, which takes its mean."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return z * self.cfg.scaling_factor

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents (UNet space) -> image, about [-1, 1], unclamped."""
        return self.decode(latents / self.cfg.scaling_factor)
