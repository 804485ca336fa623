"""Peak memory of decoding the x4 upscaler's largest output: a 512x512 latent -> 2048x2048 pixels with
the released upscaler's autoencoder (f = 4, 128 channels x (1, 2, 4), 2 res blocks, random weights),
decoded in tiles (`service.ldm.tiling`). Each run is a fresh process, so its peak resident memory
(ru_maxrss) is its own.

    python -m bench.upscale_decode --latent 512 --tile 128      # the 2048x2048 case
    python -m bench.upscale_decode --latent 128 --tile 128      # one tile: the bound per tile
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from service.ldm.autoencoder import Autoencoder
from service.ldm.config import AutoencoderConfig
from service.ldm.tiling import decode_tiled

# Stability's x4-upscaling.yaml first_stage_config (attn_resolutions: [], the middle attention stays).
UPSCALER_VAE = AutoencoderConfig(
    base_channels=128, channel_mult=(1, 2, 4), num_res_blocks=2, latent_channels=4
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--latent", type=int, default=512, help="latent side (output: 4x)")
    parser.add_argument("--tile", type=int, default=128, help="latents per tile side")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vae = Autoencoder(UPSCALER_VAE).eval()
    z = torch.randn(1, 4, args.latent, args.latent, generator=torch.Generator().manual_seed(0))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    with torch.inference_mode():
        out = decode_tiled(vae.decode, z, args.tile, args.tile // 4)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"latent {args.latent}^2 -> {tuple(out.shape[-2:])} px, tile {args.tile} (overlap {args.tile // 4}), "
        f"{args.threads} threads: {seconds:.0f} s, peak RSS {peak:.0f} MiB (before decoding {before:.0f} MiB)"
    )


if __name__ == "__main__":
    main()
