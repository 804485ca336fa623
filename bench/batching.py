"""The batching curve: images/s against the batch size, on the demo model and the 24.8M-parameter UNet
of bench/engine.py, and where it bends (the knee), which sets the worker's default LDM_MAX_BATCH.

    .venv/bin/python -m bench.batching --threads 1            # CPU, both models; writes docs/batching-cpu.png
    .venv/bin/python -m bench.batching --device cuda          # GPU (fp16); writes docs/batching-cuda.png
    .venv/bin/python -m bench.batching --help                 # --batches, --steps, --rounds, --size, ...

For each batch size B, B members (one prompt, classifier-free guidance, distinct seeds, `dpmpp_2m`)
are prepared and stepped together as a worker steps its batch (`DenoisingBatch.step`: one UNet call
of 2B rows), then their latents are decoded together. A few timed steps give the step time; images/s
is then B / (steps x step time + decode time) for a job of `--steps` steps: what a worker that keeps
B members in flight delivers. On the CPU with one torch thread the times are the process's CPU
time, which other jobs on a shared machine do not stretch. Rounds go up and down the batch sizes in
turn and medians are reported. The knee is the first B whose doubling gains less than a quarter more
images/s: a doubling makes every step 1.6 to 2 times slower (each job's latency under load), which a
gain that small does not pay for. The worker's default LDM_MAX_BATCH on a device is the larger of the
two models' knees (`service.settings.DEFAULT_MAX_BATCH`); the plot marks it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from bench.engine import small_config
from bench.machine import cpu_description, load_average
from service.ldm.checkpoint import LoadedModel
from service.ldm.engine import Engine, GenerationRequest
from service.ldm.text import load_tokenizer
from service.paths import REPO_ROOT, bundled_model
from service.settings import DEFAULT_MAX_BATCH
from tests.tiny import build_tiny, write_tokenizer

PROMPT = "a large red circle on the left on a gray background"
KNEE_GAIN = 1.25  # the knee: the first batch size whose doubling gains less than this factor


@dataclass
class Curve:
    name: str
    size: int  # image side, pixels
    step_ms: dict[int, list[float]]
    decode_ms: dict[int, list[float]]

    def images_per_s(self, batch: int, steps: int) -> float:
        step, decode = statistics.median(self.step_ms[batch]), statistics.median(self.decode_ms[batch])
        return batch / ((steps * step + decode) / 1000)

    def knee(self, steps: int) -> int:
        rates = {b: self.images_per_s(b, steps) for b in self.step_ms}
        for b in sorted(rates):
            if 2 * b in rates and rates[2 * b] < KNEE_GAIN * rates[b]:
                return b
        return max(rates)


def demo_engine(device: str, dtype: str) -> tuple[Engine, int]:
    model = bundled_model()
    if not (model / "model.safetensors").exists():
        raise SystemExit(f"no demo model at {model}")
    engine = Engine.load(model, device=device, dtype=dtype)
    return engine, engine.config.sample_size


def engine_24m(device: str, dtype: str, folder: Path) -> Engine:
    """The small SD-1.x-style model of bench/engine.py (random weights: speed does not depend on them)."""
    config = small_config()
    tokenizer_dir = write_tokenizer(folder / "tokenizer")
    unet, vae, text = build_tiny(config, tokenizer_dir, seed=1234)
    model = LoadedModel(config, unet, vae, text, load_tokenizer(tokenizer_dir), folder)  # type: ignore[arg-type]
    return Engine(model, device=device, dtype=dtype)


def clock() -> Callable[[], float]:
    """The process's CPU time on the CPU with one torch thread (other jobs on a shared machine stretch
    wall time, not that), else wall time (a GPU's work, or several threads that spin while they wait)."""
    if torch.get_num_threads() == 1 and not torch.cuda.is_initialized():
        return time.process_time
    return time.perf_counter


def timed(sync: Callable[[], None], fn: Callable[[], object]) -> float:
    now = clock()
    sync()
    start = now()
    fn()
    sync()
    return (now() - start) * 1000


def measure(
    engine: Engine, batch: int, size: int, timed_steps: int, sync: Callable[[], None]
) -> tuple[float, float]:
    """(median ms per step, ms to decode) of `batch` members stepped together."""
    requests = [
        GenerationRequest(prompt=PROMPT, width=size, height=size, steps=100, sampler="dpmpp_2m", seed=i)
        for i in range(batch)
    ]
    denoising = engine.new_batch()
    for i, request in enumerate(requests):
        member, _ = engine.prepare(engine.resolve(request), i)
        denoising.add(member)
    denoising.step()  # warm-up: first calls at a new shape allocate
    steps = [timed(sync, denoising.step) for _ in range(timed_steps)]
    latents = torch.cat([m.final_latent() for m in denoising.members.values()])
    decode = timed(sync, lambda: engine.decode(latents))
    return statistics.median(steps), decode


def run_curve(name: str, engine: Engine, size: int, args: argparse.Namespace) -> Curve:
    cuda = engine.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    curve = Curve(name, size, {b: [] for b in args.batches}, {b: [] for b in args.batches})
    measure(engine, 1, size, 1, sync)  # warm-up of the model as a whole
    for r in range(args.rounds):
        for batch in args.batches if r % 2 == 0 else list(reversed(args.batches)):
            step, decode = measure(engine, batch, size, args.timed_steps, sync)
            curve.step_ms[batch].append(step)
            curve.decode_ms[batch].append(decode)
    return curve


def report(curve: Curve, steps: int) -> None:
    first = min(curve.step_ms)
    rate1 = curve.images_per_s(first, steps)
    print(f"{curve.name}, {curve.size}x{curve.size}, {steps}-step jobs:")
    print("  batch   ms/step   ms/step/image   decode ms   images/s   vs batch 1")
    for b in sorted(curve.step_ms):
        step = statistics.median(curve.step_ms[b])
        decode = statistics.median(curve.decode_ms[b])
        rate = curve.images_per_s(b, steps)
        print(f"  {b:5d}  {step:8.1f}  {step / b:14.2f}  {decode:10.1f}  {rate:9.3f}   x{rate / rate1:.2f}")
    knee = curve.knee(steps)
    print(f"  knee: batch {knee} (doubling it gains less than {KNEE_GAIN - 1:.0%} images/s)")


def plot(curves: list[Curve], steps: int, default: int, title: str, path: Path) -> None:
    """One panel per model: images/s against the batch size (log2 axis), each knee in red and the
    device's default max batch as a dashed line; drawn with PIL."""
    panel, height = 520, 460
    image = Image.new("RGB", (panel * len(curves), height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((20, 12), title, fill="black")
    for i, curve in enumerate(curves):
        x0, y0, w, h = i * panel + 70, 60, panel - 110, height - 150
        batches = sorted(curve.step_ms)
        rates = [curve.images_per_s(b, steps) for b in batches]
        top = max(rates) * 1.15
        box = (x0, y0, w, h, max(1, len(batches) - 1), top)

        def xy(k: float, rate: float, box: tuple[float, ...] = box) -> tuple[float, float]:
            x0, y0, w, h, span, top = box
            return x0 + w * k / span, y0 + h - h * rate / top

        for t in range(5):  # horizontal grid, labelled
            _, y = xy(0, top * t / 4)
            draw.line([x0, y, x0 + w, y], fill="#dddddd")
            draw.text((x0 - 45, y - 6), f"{top * t / 4:.3g}", fill="black")
        draw.rectangle([x0, y0, x0 + w, y0 + h], outline="black")
        draw.text((x0 - 60, y0 - 22), "images/s", fill="black")
        if default in batches:  # the device's default, dashed
            x, _ = xy(batches.index(default), 0)
            for y in range(y0, y0 + h, 10):
                draw.line([x, y, x, y + 5], fill="#2ca02c", width=2)
            draw.text((x + 4, y0 + 4), f"worker default: {default}", fill="#2ca02c")
        points = [xy(k, r) for k, r in enumerate(rates)]
        draw.line(points, fill="#1f77b4", width=3)
        knee = curve.knee(steps)
        for b, (x, y) in zip(batches, points, strict=True):
            color = "#d62728" if b == knee else "#1f77b4"
            draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=color)
            draw.text((x - 6, y0 + h + 8), str(b), fill="black")
            if b == knee:
                draw.text((x - 70 if x > x0 + w - 80 else x + 8, y + 8), f"knee: batch {b}", fill=color)
        draw.text((x0 + w // 2 - 30, y0 + h + 24), "max batch", fill="black")
        draw.text(
            (x0, y0 + h + 48), f"{curve.name}, {curve.size}x{curve.size}, {steps}-step jobs", fill="black"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.batching", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument(
        "--steps", type=int, default=20, help="steps of the job images/s is given for (default 20)"
    )
    p.add_argument(
        "--timed-steps", type=int, default=3, help="steps timed per batch size and round (default 3)"
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds over the batch sizes (default 3)")
    p.add_argument("--size", type=int, help="image side of the 24.8M model (default 256 on cpu, 512 on cuda)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--plot", type=Path, help="where the PNG goes (default docs/batching-<device>.png)")
    p.add_argument("--models", nargs="+", choices=("demo", "24m"), default=["demo", "24m"])
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    args.size = args.size or (256 if args.device == "cpu" else 512)
    args.plot = args.plot or REPO_ROOT / "docs" / f"batching-{args.device}.png"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = "fp32" if args.device == "cpu" else "fp16"
    if args.device == "cuda":
        hardware = torch.cuda.get_device_name()
    else:
        hardware = f"{cpu_description()}; {torch.get_num_threads()} torch threads"
    print(f"{hardware}; torch {torch.__version__}, {dtype}")
    print(f"{load_average()} before the runs (a machine shared with other jobs)")
    if args.device == "cpu" and torch.get_num_threads() == 1:
        print("times are the process's CPU time (one torch thread), not stretched by other jobs")
    curves = []
    with torch.inference_mode(), tempfile.TemporaryDirectory(prefix="bench-batching-") as tmp:
        if "demo" in args.models:
            engine, size = demo_engine(args.device, dtype)
            params = sum(p.numel() for p in engine.unet.parameters()) / 1e6
            curves.append(run_curve(f"demo model (UNet {params:.1f}M)", engine, size, args))
            report(curves[-1], args.steps)
        if "24m" in args.models:
            engine = engine_24m(args.device, dtype, Path(tmp))
            params = sum(p.numel() for p in engine.unet.parameters()) / 1e6
            curves.append(run_curve(f"UNet {params:.1f}M of bench/engine.py", engine, args.size, args))
            report(curves[-1], args.steps)
    print(f"{load_average()} after the runs")
    title = f"{hardware.split(';')[0]}, {args.device} {dtype}, {args.steps}-step jobs"
    title += f" ({args.rounds} rounds, medians)"
    plot(curves, args.steps, DEFAULT_MAX_BATCH[args.device], title, args.plot)
    knees = {c.name: c.knee(args.steps) for c in curves}
    print(f"knees {knees}; the worker's default max batch on {args.device}: {DEFAULT_MAX_BATCH[args.device]}")
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
