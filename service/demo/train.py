"""Training the demo LDM in the paper's two phases.

Phase 1 (`train_autoencoder`): perceptual compression, a KL autoencoder trained for reconstruction
with a small KL term. Phase 2 (`train_unet`): the autoencoder frozen, a UNet and a CLIP text
encoder trained on its latents with the DDPM objective (LDM eq. 2, in its v-prediction form by
default, see recipe.UNetTraining.prediction), captions dropped 10% of the time for classifier-free
guidance. Both phases are seeded and resumable: state is saved every few hundred steps, and the
data of step i depends only on (seed, i).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..ldm.autoencoder import Autoencoder
from ..ldm.checkpoint import save_model
from ..ldm.schedule import DiscreteSchedule
from ..ldm.text import build_text_model, load_tokenizer
from ..ldm.unet import UNet
from . import recipe, shapes
from .checkpointing import EMA, EMAModule, load_training_state, save_training_state
from .tokenizer import train_tokenizer

log = logging.getLogger(__name__)
Tensor = torch.Tensor


def lr_at(step: int, total: int, lr: float, min_lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to min_lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def images_to_tensor(images: np.ndarray) -> Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def step_rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, step])


def _loop(
    desc: str,
    start: int,
    total: int,
    body: Callable[[int], dict[str, float]],
    save: Callable[[int], None],
    every: int,
) -> None:
    """The shared training loop: progress bar, periodic checkpoints, a checkpoint at the end."""
    started = time.perf_counter()
    with tqdm(total=total, initial=start, desc=desc, unit="step", disable=None, smoothing=0.05) as bar:
        for step in range(start, total):
            stats = body(step)
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix({k: f"{v:.4g}" for k, v in stats.items()})
            if (step + 1) % every == 0 or step + 1 == total:
                save(step + 1)
            if (step + 1) % 50 == 0 or step + 1 == total:
                stats_text = " ".join(f"{k} {v:.4g}" for k, v in stats.items())
                elapsed = time.perf_counter() - started
                rate = (step + 1 - start) / elapsed
                log.info(
                    "%s: step %d/%d %s (%.2f steps/s, %.0f s)",
                    desc,
                    step + 1,
                    total,
                    stats_text,
                    rate,
                    elapsed,
                )


# -- phase 1 ---------------------------------------------------------------------------------------


def train_autoencoder(out: Path, settings: recipe.AutoencoderTraining, seed: int = 0) -> Path:
    """Trains (or resumes) the autoencoder in `out`; returns the folder."""
    torch.manual_seed(seed)
    model = Autoencoder(recipe.AUTOENCODER)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    meta = load_training_state(out, {"autoencoder": model}, opt)
    start = int(meta["step"]) if meta else 0
    if start:
        log.info("resuming the autoencoder at step %d", start)

    def body(step: int) -> dict[str, float]:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, settings.steps, settings.lr, settings.min_lr, settings.warmup)
        rng = step_rng(seed, step)
        images, _ = shapes.batch(shapes.train_seeds(rng, settings.batch), recipe.IMAGE_SIZE)
        x = images_to_tensor(images)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        posterior = model.encode(x)
        recon = model.decode(posterior.sample(generator))
        mse = F.mse_loss(recon, x)
        loss = mse + settings.l1_weight * F.l1_loss(recon, x) + settings.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.item(), "psnr": psnr_from_mse(mse.item())}

    def save(step: int) -> None:
        save_training_state(
            out, {"autoencoder": model}, opt, {"step": step, "seed": seed, **asdict(settings)}
        )

    _loop("autoencoder", start, settings.steps, body, save, settings.checkpoint_every)
    return out


def psnr_from_mse(mse_in_minus1_1: float) -> float:
    """PSNR in dB of images in [0, 1], from an MSE measured in [-1, 1] (4x larger)."""
    return 10 * math.log10(4.0 / max(mse_in_minus1_1, 1e-12))


def load_autoencoder(folder: Path) -> Autoencoder:
    model = Autoencoder(recipe.AUTOENCODER)
    if load_training_state(folder, {"autoencoder": model}, None) is None:
        raise FileNotFoundError(
            f"no autoencoder training state in {folder}: run `ldm train autoencoder` first"
        )
    return model.eval()


# -- phase 2 ---------------------------------------------------------------------------------------


@torch.inference_mode()
def encode_pool(autoencoder: Autoencoder, n: int, seed: int) -> tuple[Tensor, Tensor, list[shapes.ShapeSpec]]:
    """Encodes n training images once: posterior means and log-variances (N, C, h, w) and specs."""
    rng = np.random.default_rng([seed, 10**6])
    seeds = shapes.train_seeds(rng, n)
    means, logvars, specs = [], [], []
    for i in tqdm(range(0, n, 256), desc="encoding training images", unit="batch", disable=None):
        chunk = seeds[i : i + 256]
        samples = [shapes.make_sample(s, recipe.IMAGE_SIZE) for s in chunk]
        images = np.stack([sample.image for sample in samples])
        specs += [sample.spec for sample in samples]
        posterior = autoencoder.encode(images_to_tensor(images))
        means.append(posterior.mean)
        logvars.append(posterior.logvar)
    return torch.cat(means), torch.cat(logvars), specs


def random_caption(spec: shapes.ShapeSpec, rng: np.random.Generator, dropout: float) -> str:
    """A caption true of the image that names colour and shape and a random subset of the rest."""
    if rng.random() < dropout:
        return ""
    keep = rng.random(3) >= shapes.OMIT_PROBABILITY
    asked = shapes.Asked(
        colour=spec.colour,
        shape=spec.shape,
        size=spec.size if keep[0] else None,
        position=spec.position if keep[1] else None,
        background=spec.background if keep[2] else None,
    )
    return shapes.caption_for(asked)


def train_unet(out: Path, autoencoder_dir: Path, settings: recipe.UNetTraining, seed: int = 0) -> Path:
    """Trains (or resumes) the UNet and text encoder on frozen latents in `out`."""
    if settings.prediction not in ("eps", "v"):
        raise ValueError(f"prediction must be 'eps' or 'v', got {settings.prediction!r}")
    torch.manual_seed(seed)
    tokenizer_dir = out / "tokenizer"
    if not (tokenizer_dir / "vocab.json").is_file():
        train_tokenizer(tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    autoencoder = load_autoencoder(autoencoder_dir)
    unet = UNet(recipe.UNET)
    text = build_text_model(recipe.text_config(len(tokenizer)), tokenizer)
    params = [*unet.parameters(), *text.parameters()]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.01)
    ema_unet, ema_text = EMA(unet, settings.ema_decay), EMA(text, settings.ema_decay)
    modules = {"unet": unet, "text": text, "ema_unet": EMAModule(ema_unet), "ema_text": EMAModule(ema_text)}
    meta = load_training_state(out, modules, opt)
    start = int(meta["step"]) if meta else 0

    means, logvars, specs = encode_pool(autoencoder, settings.pool, seed)
    # The latent scaling factor (the paper's 1 / std of the latents, 0.18215 for SD), fixed at start.
    scaling = float(meta["scaling_factor"]) if meta else float(1.0 / means.std())
    log.info("latent std %.4f -> scaling factor %.4f; %d training images", 1 / scaling, scaling, len(specs))
    schedule = DiscreteSchedule()
    alphas = schedule.alphas_cumprod.float()
    ids_cache: dict[str, list[int]] = {}

    def token_ids(captions: list[str]) -> Tensor:
        rows = []
        for caption in captions:
            if caption not in ids_cache:
                ids_cache[caption] = tokenizer(caption, padding="max_length", max_length=77, truncation=True)[
                    "input_ids"
                ]
            rows.append(ids_cache[caption])
        return torch.tensor(rows)

    def body(step: int) -> dict[str, float]:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, settings.steps, settings.lr, settings.min_lr, settings.warmup)
        rng = step_rng(seed, step)
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        index = torch.from_numpy(rng.integers(0, len(specs), settings.batch))
        mean, logvar = means[index], logvars[index]
        z = (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g)) * scaling  # (B, C, h, w)
        captions = [random_caption(specs[int(i)], rng, settings.caption_dropout) for i in index]
        t = torch.randint(0, len(alphas), (settings.batch,), generator=g)
        noise = torch.randn(z.shape, generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * z + (1 - a).sqrt() * noise  # DDPM forward process q(x_t | x_0)
        context = text(input_ids=token_ids(captions)).last_hidden_state  # (B, 77, D)
        target = noise if settings.prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * z
        loss = F.mse_loss(unet(x_t, t.float(), context), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        # EMA warms up with the optimizer: early on, follow the weights closely.
        decay = min(settings.ema_decay, (1 + step) / (10 + step))
        ema_unet.update(unet, decay)
        ema_text.update(text, decay)
        return {"loss": loss.item()}

    def save(step: int) -> None:
        save_training_state(
            out, modules, opt, {"step": step, "seed": seed, "scaling_factor": scaling, **asdict(settings)}
        )

    _loop("unet", start, settings.steps, body, save, settings.checkpoint_every)
    return out


def export_model(unet_dir: Path, autoencoder_dir: Path, target: Path) -> Path:
    """Writes the shipped model: EMA weights in fp16, config in the metadata, tokenizer beside it."""
    tokenizer_dir = unet_dir / "tokenizer"
    tokenizer = load_tokenizer(tokenizer_dir)
    autoencoder = load_autoencoder(autoencoder_dir)
    unet = UNet(recipe.UNET)
    text = build_text_model(recipe.text_config(len(tokenizer)), tokenizer)
    ema_unet, ema_text = EMA(unet, 0.0), EMA(text, 0.0)
    meta = load_training_state(
        unet_dir, {"ema_unet": EMAModule(ema_unet), "ema_text": EMAModule(ema_text)}, None
    )
    if meta is None:
        raise FileNotFoundError(f"no UNet training state in {unet_dir}: run `ldm train unet` first")
    unet.load_state_dict(ema_unet.state_dict())
    text.load_state_dict(ema_text.state_dict())
    # States written before the setting existed were trained on eps.
    config = recipe.model_config(len(tokenizer), float(meta["scaling_factor"]), meta.get("prediction", "eps"))
    # fp16 on disk halves the download-free repo size; the loader upcasts to the engine's dtype.
    for module in (unet, autoencoder, text):
        module.half()
    path = save_model(target / "model.safetensors", config, unet, autoencoder, text, tokenizer_dir)
    log.info("wrote %s (%.1f MB), trained for %d UNet steps", path, path.stat().st_size / 1e6, meta["step"])
    return path
