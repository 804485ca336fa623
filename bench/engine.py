"""The engine against diffusers' StableDiffusionPipeline: same weights, sampler, steps, seed, in one process.

    .venv/bin/python -m bench.engine                 # CPU: a small random SD-1.x-style model, 256x256
    .venv/bin/python -m bench.engine --device cuda   # GPU: SD 1.5-sized random weights, 512x512, fp16

Both pipelines run txt2img with classifier-free guidance (prompt + negative prompt), `dpmpp_2m`
(diffusers: DPMSolverMultistepScheduler configured as for SD 1.5), from seeded CPU noise, to PIL
images. After warm-up the timed runs alternate between the two (and swap which goes first every
round), so load on the machine hits both alike; medians are reported. The final latents of the
two are compared, which shows the two runs compute the same thing.

What is timed is one whole call: `Engine.generate([...])` against `pipe(...)`, prompt encoding,
denoising loop, VAE decode and conversion to PIL included. The text-embedding cache of the engine
is emptied before every run (diffusers has none), and both calls run under `torch.inference_mode`.
Hooks on the text encoder, the UNet and the VAE decoder of each side split the time into phases;
`it/s` is steps / (start of the first UNet call .. end of the last one), like diffusers' progress
bar. On CUDA the marks are CUDA events, so the hooks add no synchronisation; after the timed runs
one more call of each side counts its host-device synchronisations (torch's sync debug mode). On
the CPU the process's CPU time per call is reported too: unlike wall time it is not stretched when
other jobs take the cores, so with `--threads 1` its ratio is the steadiest on a shared machine.

Weights. CPU: the modules are built and randomised as the tests do (`tests.tiny.build_tiny`),
written as an SD 1.x single-file checkpoint (`tests.tiny.write_sd_checkpoint`) into a temporary
folder and loaded with `Engine.load`, the loader included in what is checked. CUDA: the SD 1.5
modules (1.07 B parameters) are built the same way but not written: saving and re-reading 4 GB of
fp32 safetensors would add half a minute and 4 GB of disk for nothing that is timed, so the
engine gets them as a `LoadedModel` directly. In both cases diffusers' modules are filled from the
same SD-layout state dict by diffusers' own single-file converters (`tests.reference`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from service.ldm.checkpoint import LoadedModel, sd_state_dict
from service.ldm.config import AutoencoderConfig, ModelConfig, TextEncoderConfig, UNetConfig
from service.ldm.engine import DTYPES, Engine, GenerationRequest
from service.ldm.text import TextConditioner, load_tokenizer
from tests.reference import reference_pipeline
from tests.tiny import build_tiny, write_sd_checkpoint, write_tokenizer

Tensor = torch.Tensor
PROMPT = "a photo of a red cat on the left"
NEGATIVE_PROMPT = "a blue square"
SAMPLER = "dpmpp_2m"


def small_config() -> ModelConfig:
    """SD 1.x in miniature: big enough that the UNet dominates, small enough for seconds per image."""
    return ModelConfig(
        family="sd1",
        unet=UNetConfig(
            model_channels=64,
            channel_mult=(1, 2, 4),
            num_res_blocks=2,
            attention_levels=(1, 2),
            context_dim=256,
            num_heads=8,  # what loading an SD 1.x file infers
        ),
        autoencoder=AutoencoderConfig(base_channels=32, channel_mult=(1, 2, 4, 4), num_res_blocks=1),
        # num_heads = width // 64, as loading infers it.
        text=TextEncoderConfig(
            vocab_size=1024, hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4
        ),
        sample_size=256,
    )


def sd15_config() -> ModelConfig:
    return ModelConfig()  # every default is SD 1.5's


# -- timing -----------------------------------------------------------------------------------------

Mark = Any  # a perf_counter() float on the CPU, a recorded torch.cuda.Event on CUDA


class Clock:
    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def mark(self) -> Mark:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start: Mark, end: Mark) -> float:
        if self.cuda:
            return float(start.elapsed_time(end)) / 1000.0
        return float(end - start)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


@dataclass
class Phases:
    """One run's seconds: the whole call and its parts (per call, not per image)."""

    total: float
    text: float  # text-encoder forwards
    loop: float  # first UNet call start .. last UNet call end
    unet: float  # sum of the UNet forwards
    decode: float  # VAE decode
    unet_calls: int
    cpu: float = 0.0  # CPU time of the process over the call (all its threads)

    @property
    def other(self) -> float:
        return self.total - self.text - self.loop - self.decode


@dataclass
class Recorder:
    """Start and end marks of the text encoder's, the UNet's and the VAE decoder's calls in one pipeline;
    also keeps the latents the decoder was given (to compare the two pipelines' results)."""

    clock: Clock
    calls: dict[str, list[tuple[Mark, Mark]]] = field(default_factory=dict)
    started: dict[str, Mark] = field(default_factory=dict)
    decoded: Tensor | None = None

    def start(self, name: str) -> None:
        self.started[name] = self.clock.mark()

    def end(self, name: str) -> None:
        self.calls.setdefault(name, []).append((self.started.pop(name), self.clock.mark()))

    def reset(self) -> None:
        self.calls.clear()
        self.started.clear()

    def watch(self, name: str, module: torch.nn.Module) -> None:
        module.register_forward_pre_hook(lambda *_: self.start(name))
        module.register_forward_hook(lambda *_: self.end(name))

    def watch_decode(self, autoencoder: Any) -> None:
        """Wraps `autoencoder.decode` (both pipelines call it by attribute, with unscaled latents)."""
        decode: Callable[..., Any] = autoencoder.decode

        def timed_decode(z: Tensor, *args: Any, **kwargs: Any) -> Any:
            self.decoded = z.detach()  # no copy to the host here: that would synchronise
            self.start("decode")
            out = decode(z, *args, **kwargs)
            self.end("decode")
            return out

        autoencoder.decode = timed_decode

    def phases(self, total: float) -> Phases:
        sec = self.clock.seconds

        def summed(name: str) -> float:
            return sum(sec(a, b) for a, b in self.calls.get(name, []))

        unet = self.calls.get("unet", [])
        loop = sec(unet[0][0], unet[-1][1]) if unet else 0.0
        return Phases(total, summed("text"), loop, summed("unet"), summed("decode"), len(unet))


# -- the two pipelines --------------------------------------------------------------------------------


def build_from_file(config: ModelConfig, folder: Path, seed: int) -> tuple[Engine, Any]:
    """Writes an SD 1.x single-file checkpoint and loads it on each side (CPU, fp32)."""
    tokenizer_dir = write_tokenizer(folder / "tokenizer")
    path = write_sd_checkpoint(folder / "bench.safetensors", config, tokenizer_dir, seed=seed)
    engine = Engine.load(path)
    if engine.config.unet != config.unet or engine.config.text != config.text:
        raise RuntimeError("the checkpoint loaded as another architecture than the one written")
    return engine, reference_pipeline(load_file(str(path)), engine.config, engine.text.tokenizer, SAMPLER)


def build_in_memory(
    config: ModelConfig, folder: Path, seed: int, device: str, dtype: str
) -> tuple[Engine, Any]:
    """The same modules and SD-layout state dict as `build_from_file`, without the round trip to disk."""
    tokenizer_dir = write_tokenizer(folder / "tokenizer")
    unet, vae, text = build_tiny(config, tokenizer_dir, seed)  # "tiny" only by name: any config
    state = sd_state_dict(unet, vae, text, config.family)  # CPU tensors; they outlive the move below
    tokenizer = load_tokenizer(tokenizer_dir)
    model = LoadedModel(config, unet, vae, text, tokenizer, folder / "in-memory")  # type: ignore[arg-type]
    engine = Engine(model, device=device, dtype=dtype)
    pipe = reference_pipeline(state, config, engine.text.tokenizer, SAMPLER)
    del state
    # diffusers' usual half-precision setup (from_pretrained(torch_dtype=...)): all of it, VAE too.
    # (Quietly: `to()` warns that from_pretrained would keep some modules in fp32; SD 1.x has none.)
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    try:
        return engine, pipe.to(device, DTYPES[dtype])
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)


@dataclass
class Side:
    name: str
    recorder: Recorder
    call: Callable[[], list[Image.Image]]
    runs: list[Phases] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)

    def run(self, clock: Clock, keep: bool) -> None:
        self.recorder.reset()
        clock.sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            images = self.call()
        clock.sync()
        total = time.perf_counter() - start
        if keep:
            phases = self.recorder.phases(total)
            phases.cpu = time.process_time() - cpu_start
            self.runs.append(phases)
            self.images = images

    def cuda_syncs(self) -> int:
        """Host-device synchronisations in one call (torch's sync debug mode), the final copy of the
        images to the host included. Each one stops the host from queueing work ahead of the GPU."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with torch.inference_mode():
                    self.call()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        return sum("synchroniz" in str(w.message) for w in caught)


def make_sides(engine: Engine, pipe: Any, clock: Clock, args: argparse.Namespace) -> tuple[Side, Side]:
    seeds = [args.seed + i for i in range(args.batch)]
    requests = [
        GenerationRequest(
            prompt=PROMPT,
            negative_prompt=NEGATIVE_PROMPT,
            width=args.size,
            height=args.size,
            steps=args.steps,
            guidance_scale=args.guidance,
            sampler=SAMPLER,
            seed=seed,
        )
        for seed in seeds
    ]

    def ours() -> list[Image.Image]:
        # A fresh embedding cache every run: diffusers encodes the prompts on every call.
        engine.text = TextConditioner(engine.text.model, engine.text.tokenizer)
        results = engine.generate(requests)
        return [r.image for r in results if r.image is not None]

    def theirs() -> list[Image.Image]:
        out = pipe(
            prompt=PROMPT,
            negative_prompt=NEGATIVE_PROMPT,
            height=args.size,
            width=args.size,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            num_images_per_prompt=args.batch,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],  # per-image noise, as ours
            output_type="pil",
        )
        return list(out.images)

    our_rec, their_rec = Recorder(clock), Recorder(clock)
    our_rec.watch("text", engine.text.model)
    our_rec.watch("unet", engine.unet)
    our_rec.watch_decode(engine.autoencoder)
    their_rec.watch("text", pipe.text_encoder)
    their_rec.watch("unet", pipe.unet)
    their_rec.watch_decode(pipe.vae)
    return Side("ours", our_rec, ours), Side("diffusers", their_rec, theirs)


def median(runs: list[Phases], attr: str) -> float:
    return statistics.median(getattr(p, attr) for p in runs)


def report(side: Side, batch: int, steps: int, show_cpu: bool) -> str:
    """Two lines: median s/image and it/s (the fastest run's s/image), then the median phases of a call."""
    total, loop = median(side.runs, "total"), median(side.runs, "loop")
    fastest = min(p.total for p in side.runs)
    ms = {k: 1000 * median(side.runs, k) for k in ("text", "loop", "unet", "decode", "other")}
    its = steps / loop if loop > 0 else float("nan")
    head = f"{side.name:<9} {total / batch:7.3f} s/image  {its:6.2f} it/s"
    cpu = f", CPU time {median(side.runs, 'cpu') / batch:.3f} s/image" if show_cpu else ""
    calls = side.runs[0].unet_calls
    return (
        f"{head}   (fastest run {fastest / batch:.3f} s/image{cpu})\n"
        f"{'':<9} per call: text {ms['text']:.0f} ms, denoise {ms['loop']:.0f} ms (in the UNet "
        f"{ms['unet']:.0f}, {calls} calls), decode {ms['decode']:.0f} ms, other {ms['other']:.0f} ms"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.engine",
        description=(
            "Seconds per image of the engine against diffusers' StableDiffusionPipeline on the same random "
            "weights, sampler (dpmpp_2m), steps and seed, in one process; prints s/image and UNet it/s of "
            "each, the ratio ours/diffusers, and the largest difference of their final latents. "
            "cpu: a small SD-1.x-style model, fp32; cuda: SD 1.5's sizes, fp16."
        ),
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each pipeline (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each first (default 1)")
    parser.add_argument("--size", type=int, help="image width and height (default 256 on cpu, 512 on cuda)")
    parser.add_argument("--batch", type=int, default=1, help="images per call (default 1)")
    parser.add_argument("--guidance", type=float, default=7.5, help="CFG scale (default 7.5)")
    parser.add_argument("--seed", type=int, default=1234, help="noise seed of the first image (default 1234)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.size is None:
        args.size = 256 if args.device == "cpu" else 512
    if args.size % 8 or args.size <= 0:
        parser.error("--size must be a positive multiple of 8")
    if min(args.steps, args.runs, args.batch) < 1 or args.warmup < 0:
        parser.error("--steps, --runs and --batch must be at least 1, --warmup at least 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = Clock(cuda=args.device == "cuda")
    setup_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        if args.device == "cpu":
            config = small_config()
            engine, pipe = build_from_file(config, Path(tmp), seed=args.seed)
        else:
            config = sd15_config()
            engine, pipe = build_in_memory(config, Path(tmp), args.seed, args.device, "fp16")
    ours, theirs = make_sides(engine, pipe, clock, args)
    u = config.unet
    unet_params = sum(p.numel() for p in engine.unet.parameters()) / 1e6
    hardware = (
        torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} torch threads"
    )
    dtype = "fp16 (our VAE fp32, diffusers' fp16)" if args.device == "cuda" else "fp32"
    print(
        f"device {args.device} ({hardware}), {dtype}, torch {torch.__version__}, "
        f"diffusers {diffusers.__version__}; setup {time.perf_counter() - setup_start:.1f} s"
    )
    print(
        f"model UNet {unet_params:.1f}M params (channels {u.model_channels}, mult {u.channel_mult}, "
        f"{u.num_res_blocks} res blocks, attention levels {u.attention_levels}, context {u.context_dim}), "
        f"text {config.text.num_layers}x{config.text.hidden_size}, VAE f={config.downsample_factor} "
        f"(base {config.autoencoder.base_channels}); {args.size}x{args.size}, batch {args.batch}, "
        f"{args.steps} steps {SAMPLER}, guidance {args.guidance}, seed {args.seed}; "
        f"{args.warmup} warm-up + {args.runs} timed runs each, alternating, medians"
    )
    if args.device == "cpu":
        busy = os.getloadavg()[0]  # taken before our own runs: what else is running
        cores = os.cpu_count() or 1
        print(f"load average {busy:.1f} on {cores} cores before the runs")
        threads = torch.get_num_threads()
        if threads > 1 and busy + threads > cores + 0.5:
            print(
                f"warning: {threads} torch threads oversubscribe a machine this busy; OpenMP threads then "
                "wait on descheduled peers and timings swing by multiples: try --threads 1"
            )
    for _ in range(args.warmup):
        ours.run(clock, keep=False)
        theirs.run(clock, keep=False)
    for i in range(args.runs):
        for side in (ours, theirs) if i % 2 == 0 else (theirs, ours):
            side.run(clock, keep=True)

    for side in (ours, theirs):
        print(report(side, args.batch, args.steps, show_cpu=args.device == "cpu"))
    ratio = median(ours.runs, "total") / median(theirs.runs, "total")
    fastest = min(p.total for p in ours.runs) / min(p.total for p in theirs.runs)
    extra = f"of the fastest runs {fastest:.2f}"
    if args.device == "cpu":
        # CPU time is not stretched by other jobs taking the cores (with one thread it is the fairest
        # figure on a shared machine; with more it counts OpenMP's spinning too).
        extra += f", of the median CPU times {median(ours.runs, 'cpu') / median(theirs.runs, 'cpu'):.2f}"
    print(f"ratio ours/diffusers {ratio:.2f} (target <= 1.0; {extra})")
    if args.device == "cuda":
        # After the timed runs: the debug mode slows the calls it watches.
        print(f"host-device syncs per call: ours {ours.cuda_syncs()}, diffusers {theirs.cuda_syncs()}")
    scale = config.autoencoder.scaling_factor
    assert ours.recorder.decoded is not None and theirs.recorder.decoded is not None
    diff = ours.recorder.decoded.float().cpu() - theirs.recorder.decoded.float().cpu()
    latent_diff = (diff * scale).abs().max().item()
    pixel_diff = max(
        int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())
        for a, b in zip(ours.images, theirs.images, strict=True)
    )
    print(f"max |latent diff| {latent_diff:.1e}, max |pixel diff| {pixel_diff}/255")


if __name__ == "__main__":
    main()
