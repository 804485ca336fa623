"""Evaluation of the demo model: attribute accuracy on held-out prompts, autoencoder PSNR, speed.

Every generated image is graded by the analytic checker (`checker.py`): segmentation from the
background, nearest palette colour, shape templates, area for size, centroid for position.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from ..ldm.engine import Engine, GenerationRequest
from . import shapes
from .checker import Accuracy
from .train import images_to_tensor, psnr_from_mse

log = logging.getLogger(__name__)


@dataclass
class Report:
    accuracy: dict[str, float]
    prompts: int
    psnr_db: float
    seconds_per_image: float
    steps: int
    sampler: str
    failures: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        acc = ", ".join(f"{k} {v:.1%}" for k, v in self.accuracy.items())
        return [
            f"prompts: {self.prompts} held-out, {self.steps} steps {self.sampler}",
            f"accuracy: {acc}",
            f"autoencoder PSNR: {self.psnr_db:.2f} dB on held-out images",
            f"one {self.steps}-step {self.sampler} image: {self.seconds_per_image:.3f} s "
            f"(median of 5, {torch.get_num_threads()} threads)",
        ]


def autoencoder_psnr(engine: Engine, n: int = 256) -> float:
    """Mean PSNR of encode -> decode on held-out images (EVAL_SEEDS beyond the prompts' range)."""
    seeds = [shapes.EVAL_SEEDS[500_000 + i] for i in range(n)]
    images, _ = shapes.batch(seeds, engine.config.sample_size)
    x = images_to_tensor(images)
    values = []
    with torch.inference_mode():
        for i in range(0, n, 64):
            chunk = x[i : i + 64]
            posterior = engine.autoencoder.encode(chunk)
            recon = engine.autoencoder.decode(posterior.mode()).clamp(-1, 1)
            mse = ((recon - chunk) ** 2).mean(dim=(1, 2, 3))
            values += [psnr_from_mse(float(m)) for m in mse]
    return float(np.mean(values))


def time_one_image(engine: Engine, steps: int, sampler: str, runs: int = 5) -> float:
    request = GenerationRequest(prompt="a large red circle on the left", steps=steps, sampler=sampler, seed=0)
    engine.generate([request])  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        engine.generate([request])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def evaluate(
    engine: Engine, n: int = 240, steps: int = 20, sampler: str = "dpmpp_2m", batch: int = 16
) -> Report:
    prompts = shapes.eval_prompts(n)
    accuracy = Accuracy()
    failures = []
    with tqdm(total=n, desc="evaluating", unit="image", disable=None) as bar:
        for i in range(0, n, batch):
            chunk = prompts[i : i + batch]
            requests = [
                GenerationRequest(prompt=p.caption, steps=steps, sampler=sampler, seed=p.seed) for p in chunk
            ]
            for prompt, result in zip(chunk, engine.generate(requests), strict=True):
                assert result.image is not None
                grades = accuracy.add(np.asarray(result.image), prompt.asked)
                if not all(grades.values()):
                    wrong = [k for k, ok in grades.items() if not ok]
                    failures.append(f"{prompt.caption!r} (seed {prompt.seed}): wrong {', '.join(wrong)}")
            bar.update(len(chunk))
    return Report(
        accuracy=accuracy.accuracy(),
        prompts=n,
        psnr_db=autoencoder_psnr(engine),
        seconds_per_image=time_one_image(engine, steps, sampler),
        steps=steps,
        sampler=sampler,
        failures=failures,
    )


GRID_PROMPTS = (
    "a red circle",
    "a large blue square on the left",
    "a small yellow triangle at the top",
    "a green circle on the right on a gray background",
    "a large purple triangle in the center",
    "a small orange square at the bottom",
    "a cyan circle on a black background",
    "a white triangle on the left on a gray background",
)


def sample_grid(engine: Engine, path: Path, seeds: int = 4, scale: int = 4) -> Path:
    """A PNG grid: one row per prompt, `seeds` images per row, the prompt written under each row."""
    size = engine.config.sample_size * scale
    label = 16
    font = ImageFont.load_default()
    grid = Image.new("RGB", (seeds * size, len(GRID_PROMPTS) * (size + label)), "white")
    draw = ImageDraw.Draw(grid)
    for row, prompt in enumerate(GRID_PROMPTS):
        requests = [GenerationRequest(prompt=prompt, seed=1000 + s) for s in range(seeds)]
        for col, result in enumerate(engine.generate(requests)):
            assert result.image is not None
            top = row * (size + label)
            grid.paste(result.image.resize((size, size), Image.Resampling.NEAREST), (col * size, top))
        draw.text((4, top + size + 2), prompt, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
