"""The demo x4 upscaler (`models/shapes-x4`): 8x8 -> 32x32 shapes, trained on a CPU in minutes.

The LDM paper's super-resolution model (sec. 4.4) as Stability's x4 upscaler builds it: the low-res
image, noised to a random level on its own DDPM schedule (noise augmentation), is concatenated to the
latent, and the UNet is told the level through a class embedding. The shapes model's autoencoder
(f = 4) and text encoder are reused frozen; only the UNet is trained (v-prediction, the upscaler's
betas 0.0001 -> 0.02). The low-res images are the 32x32 renders box-downsampled to 8x8. (32x32: the
autoencoder's own size; it reconstructs 64x64 renders at only 20 dB PSNR, against 37 dB at 32x32.)

    python -m service.demo.upscaler train --minutes 25   # writes models/shapes-x4
    python -m service.demo.upscaler evaluate             # PSNR against bicubic upscaling
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..ldm.checkpoint import load_model, save_model
from ..ldm.config import ModelConfig, UNetConfig
from ..ldm.schedule import DiscreteSchedule
from ..ldm.unet import UNet
from . import shapes
from .train import images_to_tensor, psnr_from_mse

log = logging.getLogger(__name__)
Tensor = torch.Tensor

HIGH, LOW = 32, 8
BETAS = (0.0001, 0.02)
MAX_NOISE_LEVEL = 350
UNET = UNetConfig(
    in_channels=7,  # 4 latent + 3 low-res pixels
    out_channels=4,
    model_channels=32,
    channel_mult=(1, 2, 2),
    num_res_blocks=1,
    attention_levels=(1, 2),  # 4x4 and 2x2 latents: self-attention is cheap there
    transformer_depth=1,
    context_dim=128,
    num_heads=8,
    head_dim=None,
    use_linear_projection=True,
    num_classes=MAX_NOISE_LEVEL + 1,
)


def model_config(base: ModelConfig) -> ModelConfig:
    return ModelConfig(
        family="upscale-x4",
        prediction="v",
        autoencoder=base.autoencoder,
        unet=UNET,
        text=base.text,
        sample_size=HIGH,
        default_steps=20,
        default_guidance=1.0,
        default_sampler="dpmpp_2m",
        beta_start=BETAS[0],
        beta_end=BETAS[1],
        max_noise_level=MAX_NOISE_LEVEL,
        default_noise_level=20,
    )


def downsample(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) -> (N, 8, 8, 3) uint8 by box averaging (each low-res pixel a 4x4 mean)."""
    return np.stack([np.asarray(Image.fromarray(a).resize((LOW, LOW), Image.Resampling.BOX)) for a in images])


def bicubic(images: np.ndarray) -> np.ndarray:
    return np.stack(
        [np.asarray(Image.fromarray(a).resize((HIGH, HIGH), Image.Resampling.BICUBIC)) for a in images]
    )


def data(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """n 32x32 renders and their captions from the training seeds."""
    seeds = shapes.train_seeds(np.random.default_rng([seed, 7]), n)
    return shapes.batch(seeds, HIGH)


def train(
    base_dir: Path,
    out: Path,
    minutes: float,
    batch: int = 32,
    seed: int = 0,
    pool: int = 4000,
    resume: bool = False,
    lr: float = 1e-3,
) -> Path:
    """Trains the UNet for `minutes` of wall time (cosine learning-rate decay over that time);
    `resume`: from the UNet already in `out` (another session of `minutes`, with fresh optimizer state)."""
    torch.manual_seed(seed)
    base = load_model(base_dir)
    config = model_config(base.config)
    vae, text, tokenizer = base.autoencoder.float().eval(), base.text_model.float().eval(), base.tokenizer
    images, captions = data(pool, seed)
    with torch.inference_mode():
        latents = (
            torch.cat([vae.encode(images_to_tensor(images[i : i + 256])).mode() for i in range(0, pool, 256)])
            * config.autoencoder.scaling_factor
        )  # (N, 4, 8, 8)
        low = images_to_tensor(downsample(images))  # (N, 3, 8, 8)
        embeddings: dict[str, Tensor] = {}
        for caption in {*captions, ""}:
            ids = tokenizer(
                caption, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
            )
            embeddings[caption] = text(input_ids=ids["input_ids"]).last_hidden_state[0]
    log.info("latent std %.3f over %d images", float(latents.std()), pool)
    unet = UNet(UNET)
    if resume:
        unet.load_state_dict({k: v.float() for k, v in load_model(out).unet.state_dict().items()})
        seed += 1  # new batches
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    alphas = DiscreteSchedule(beta_start=BETAS[0], beta_end=BETAS[1]).alphas_cumprod
    started, step = time.monotonic(), 0
    deadline = started + 60 * minutes
    while time.monotonic() < deadline:
        for group in opt.param_groups:
            # Warm-up, then cosine decay over the wall time (a shared machine's pace varies tenfold).
            progress = (time.monotonic() - started) / (60 * minutes)
            warm = min(1.0, (step + 1) / 100) if not resume else 1.0
            group["lr"] = warm * (3e-5 + 0.5 * (lr - 3e-5) * (1 + math.cos(math.pi * min(1.0, progress))))
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        index = torch.randint(0, pool, (batch,), generator=g)
        z, lr_img = latents[index], low[index]
        # Noise augmentation of the low-res image: half the batch at any level, half near the default.
        level = torch.randint(0, MAX_NOISE_LEVEL + 1, (batch,), generator=g)
        level[: batch // 2] = torch.randint(0, 41, (batch // 2,), generator=g)
        a_low = alphas[level].view(-1, 1, 1, 1)
        lr_noised = a_low.sqrt() * lr_img + (1 - a_low).sqrt() * torch.randn(lr_img.shape, generator=g)
        context = torch.stack(
            [embeddings["" if torch.rand((), generator=g) < 0.1 else captions[int(i)]] for i in index]
        )
        t = torch.randint(0, 1000, (batch,), generator=g)
        noise = torch.randn(z.shape, generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * z + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * z  # v (Salimans & Ho 2022)
        loss = F.mse_loss(unet(torch.cat([x_t, lr_noised], 1), t.float(), context, None, level), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0:
            log.info("step %d loss %.4f (%.0f s)", step, loss.item(), time.monotonic() - started)
    log.info("trained %d steps in %.0f s", step, time.monotonic() - started)
    for module in (unet, vae, text):
        module.half()
    path = save_model(out / "model.safetensors", config, unet, vae, text, base_dir / "tokenizer")
    log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


def evaluate(model_dir: Path, n: int = 64, steps: int | None = None, seed: int = 0) -> dict[str, float]:
    """PSNR (dB, in [0, 1]) of the upscaler and of bicubic upscaling against held-out 32x32 originals."""
    from ..ldm.engine import Engine
    from ..ldm.images import png_bytes
    from ..ldm.request import GenerationRequest

    engine = Engine.load(model_dir)
    seeds = [shapes.EVAL_SEEDS.start + i for i in range(n)]
    originals, captions = shapes.batch(seeds, HIGH)
    lows = downsample(originals)
    requests = [
        GenerationRequest.parse(
            {
                "prompt": c or "a shape",
                "image": png_bytes(Image.fromarray(lo)),
                "seed": seed + i,
                "steps": steps,
            }
        )
        for i, (lo, c) in enumerate(zip(lows, captions, strict=True))
    ]
    started = time.perf_counter()
    results = engine.generate(requests)
    elapsed = time.perf_counter() - started
    ours = np.stack([np.asarray(r.image) for r in results])

    def psnr(a: np.ndarray) -> float:
        mse = float(np.mean((a.astype(np.float64) / 127.5 - originals.astype(np.float64) / 127.5) ** 2))
        return psnr_from_mse(mse)

    return {"upscaler": psnr(ours), "bicubic": psnr(bicubic(lows)), "seconds_per_image": elapsed / n}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["train", "evaluate"])
    parser.add_argument("--base", type=Path, default=Path("models/shapes"))
    parser.add_argument("--out", type=Path, default=Path("models/shapes-x4"))
    parser.add_argument("--minutes", type=float, default=25.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--resume", action="store_true", help="train the UNet in --out further")
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.command == "train":
        train(args.base, args.out, args.minutes, resume=args.resume, lr=args.lr)
    else:
        figures = evaluate(args.out, args.n)
        log.info("PSNR over %d held-out images: %s", args.n, {k: round(v, 2) for k, v in figures.items()})
        assert math.isfinite(figures["upscaler"])


if __name__ == "__main__":
    main()
