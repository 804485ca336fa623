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
import copy
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from bench.engine_timing import Clock, Recorder, Side, median, report
from bench.machine import cpu_description
from service.ldm.checkpoint import LoadedModel, load_model, sd_state_dict
from service.ldm.config import AutoencoderConfig, ModelConfig, TextEncoderConfig, UNetConfig
from service.ldm.engine import DTYPES, Engine, GenerationRequest
from service.ldm.text import TextConditioner, load_tokenizer
from service.ldm.unet_runner import resolve_dtype
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


# -- the pipelines ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One configuration of the engine, timed as a side of its own against diffusers."""

    name: str
    dtype: str | None = None  # None: the engine's default for the device
    channels_last: bool | None = None  # None: the engine's default (on for cpu)
    compile: bool = False


VARIANTS = {
    v.name: v
    for v in (
        Variant("default"),
        Variant("eager", "fp32", channels_last=False),  # the engine before channels-last and compile
        Variant("cl", "fp32", channels_last=True),
        Variant("compile", "fp32", compile=True),
        Variant("bf16", "bf16"),
        Variant("bf16-compile", "bf16", compile=True),
        Variant("auto", "auto"),
    )
}
# The modules of one engine; True: the last engine asks (it may have the original, not a copy).
ModelSource = Callable[[bool], LoadedModel]
ALL = {"cpu": ("eager", "cl", "compile", "bf16"), "cuda": ("default", "compile", "bf16")}


def build_from_file(config: ModelConfig, folder: Path, seed: int) -> tuple[ModelSource, Any]:
    """Writes an SD 1.x single-file checkpoint; returns a loader of it (one fresh copy of the modules per
    engine) and diffusers' pipeline over the same file (CPU, fp32)."""
    tokenizer_dir = write_tokenizer(folder / "tokenizer")
    path = write_sd_checkpoint(folder / "bench.safetensors", config, tokenizer_dir, seed=seed)
    model = load_model(path)
    if model.config.unet != config.unet or model.config.text != config.text:
        raise RuntimeError("the checkpoint loaded as another architecture than the one written")
    pipe = reference_pipeline(load_file(str(path)), model.config, model.tokenizer, SAMPLER)
    return lambda last: load_model(path), pipe


def build_in_memory(
    config: ModelConfig, folder: Path, seed: int, device: str, dtype: str
) -> tuple[ModelSource, Any]:
    """The same modules and SD-layout state dict as `build_from_file`, without the round trip to disk.
    An engine moves and casts its modules in place: each one but the last gets a copy."""
    tokenizer_dir = write_tokenizer(folder / "tokenizer")
    unet, vae, text = build_tiny(config, tokenizer_dir, seed)  # "tiny" only by name: any config
    state = sd_state_dict(unet, vae, text, config.family)  # CPU tensors; they outlive the move below
    tokenizer = load_tokenizer(tokenizer_dir)
    model = LoadedModel(config, unet, vae, text, tokenizer, folder / "in-memory")  # type: ignore[arg-type]
    pipe = reference_pipeline(state, config, tokenizer, SAMPLER)
    del state
    # diffusers' usual half-precision setup (from_pretrained(torch_dtype=...)): all of it, VAE too.
    # (Quietly: `to()` warns that from_pretrained would keep some modules in fp32; SD 1.x has none.)
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    try:
        return lambda last: model if last else copy.deepcopy(model), pipe.to(device, DTYPES[dtype])
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)


def requests_of(args: argparse.Namespace) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            prompt=PROMPT,
            negative_prompt=NEGATIVE_PROMPT,
            width=args.size,
            height=args.size,
            steps=args.steps,
            guidance_scale=args.guidance,
            sampler=SAMPLER,
            seed=args.seed + i,
        )
        for i in range(args.batch)
    ]


def our_side(name: str, engine: Engine, clock: Clock, args: argparse.Namespace) -> Side:
    requests = requests_of(args)

    def ours() -> list[Image.Image]:
        # A fresh embedding cache every run: diffusers encodes the prompts on every call.
        engine.text = TextConditioner(engine.text.model, engine.text.tokenizer)
        results = engine.generate(requests)
        return [r.image for r in results if r.image is not None]

    recorder = Recorder(clock)
    recorder.watch("text", engine.text.model)
    recorder.watch_call("unet", engine, "runner")  # around the compiled graph, not inside it
    recorder.watch_decode(engine.autoencoder)
    return Side(name, recorder, ours)


def their_side(pipe: Any, clock: Clock, args: argparse.Namespace) -> Side:
    seeds = [args.seed + i for i in range(args.batch)]

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

    recorder = Recorder(clock)
    recorder.watch("text", pipe.text_encoder)
    recorder.watch("unet", pipe.unet)
    recorder.watch_decode(pipe.vae)
    return Side("diffusers", recorder, theirs)


def psnr(a: list[Image.Image], b: list[Image.Image]) -> float:
    """Peak signal-to-noise ratio of two image lists in dB (8-bit pixels; inf when equal)."""
    x = np.stack([np.asarray(i, dtype=np.float64) for i in a])
    y = np.stack([np.asarray(i, dtype=np.float64) for i in b])
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


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
    parser.add_argument(
        "--variants",
        default="default",
        help="comma-separated engine configurations, each timed against diffusers in the same run: "
        f"{', '.join(VARIANTS)}; 'all' = {'/'.join(ALL['cpu'])} on cpu, {'/'.join(ALL['cuda'])} on cuda "
        "(default: 'default', the engine as the worker runs it: fp32 + channels-last on cpu, fp16 on cuda)",
    )
    args = parser.parse_args(argv)
    if args.size is None:
        args.size = 256 if args.device == "cpu" else 512
    if args.size % 8 or args.size <= 0:
        parser.error("--size must be a positive multiple of 8")
    if min(args.steps, args.runs, args.batch) < 1 or args.warmup < 0:
        parser.error("--steps, --runs and --batch must be at least 1, --warmup at least 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    names = ALL[args.device] if args.variants == "all" else tuple(args.variants.split(","))
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        parser.error(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}, all")
    if any(VARIANTS[n].compile for n in names) and args.warmup < 1:
        parser.error("--variants with compile: needs --warmup 1 or more (the first call compiles)")
    args.variant_names = names
    return args


def build_engines(
    new_model: ModelSource, names: tuple[str, ...], device: str
) -> dict[str, tuple[Engine, str]]:
    """One engine per variant, each on a fresh copy of the modules; with the dtype each resolved to."""
    engines = {}
    for i, name in enumerate(names):
        v = VARIANTS[name]
        dtype = resolve_dtype(v.dtype, device)
        engine = Engine(
            new_model(i == len(names) - 1), device, v.dtype, channels_last=v.channels_last, compile=v.compile
        )
        engines[name] = (
            engine,
            f"{dtype}{', channels-last' if engine.channels_last else ''}{', compiled' if v.compile else ''}",
        )
    return engines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = Clock(cuda=args.device == "cuda")
    setup_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        if args.device == "cpu":
            config = small_config()
            new_model, pipe = build_from_file(config, Path(tmp), seed=args.seed)
        else:
            config = sd15_config()
            new_model, pipe = build_in_memory(config, Path(tmp), args.seed, args.device, "fp16")
        engines = build_engines(new_model, args.variant_names, args.device)
    theirs = their_side(pipe, clock, args)
    ours = [
        our_side("ours" if name == "default" else f"ours:{name}", engine, clock, args)
        for name, (engine, _) in engines.items()
    ]
    u = config.unet
    first = next(iter(engines.values()))[0]
    unet_params = sum(p.numel() for p in first.unet.parameters()) / 1e6
    hardware = (
        torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} torch threads"
    )
    their_dtype = "fp16" if args.device == "cuda" else "fp32"
    print(
        f"device {args.device} ({hardware}), torch {torch.__version__}, "
        f"diffusers {diffusers.__version__} ({their_dtype}); setup {time.perf_counter() - setup_start:.1f} s"
    )
    print(f"CPU {cpu_description()}; dtype auto -> {resolve_dtype('auto', args.device)}")
    for side, (_, what) in zip(ours, engines.values(), strict=True):
        vae = "fp32" if what.startswith(("fp32", "fp16")) else "bf16"
        print(f"{side.name}: {what} (VAE {vae})")
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
    sides = [*ours, theirs]
    for _ in range(args.warmup):  # compiles the compiled variants' UNet (their batch's bucket)
        for side in sides:
            side.run(clock, keep=False)
    for i in range(args.runs):
        # The order turns every round and reverses every other: each side runs first, and after each.
        order = sides[i % len(sides) :] + sides[: i % len(sides)]
        for side in order if i % 2 == 0 else order[::-1]:
            side.run(clock, keep=True)

    for side in sides:
        print(report(side, args.batch, args.steps, show_cpu=args.device == "cpu"))
    scale = config.autoencoder.scaling_factor
    fp32 = next(
        (s for s, (_, what) in zip(ours, engines.values(), strict=True) if what.startswith("fp32")), None
    )
    for side in ours:
        ratio = median(side.runs, "total") / median(theirs.runs, "total")
        fastest = min(p.total for p in side.runs) / min(p.total for p in theirs.runs)
        extra = f"of the fastest runs {fastest:.2f}"
        if args.device == "cpu":
            # CPU time is not stretched by other jobs taking the cores (with one thread it is the fairest
            # figure on a shared machine; with more it counts OpenMP's spinning too).
            extra += f", of the median CPU times {median(side.runs, 'cpu') / median(theirs.runs, 'cpu'):.2f}"
        print(f"ratio {side.name}/diffusers {ratio:.2f} ({extra})")
        assert side.recorder.decoded is not None and theirs.recorder.decoded is not None
        diff = side.recorder.decoded.float().cpu() - theirs.recorder.decoded.float().cpu()
        latent_diff = (diff * scale).abs().max().item()
        pixel_diff = max(
            int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())
            for a, b in zip(side.images, theirs.images, strict=True)
        )
        against = (fp32.name, fp32.images) if fp32 is not None else ("diffusers", theirs.images)
        quality = (
            "" if side is fp32 else f", PSNR {psnr(side.images, against[1]):.1f} dB against {against[0]}"
        )
        print(f"{'':<9} max |latent diff| {latent_diff:.1e}, max |pixel diff| {pixel_diff}/255{quality}")
    if args.device == "cuda":
        # After the timed runs: the debug mode slows the calls it watches.
        counts = ", ".join(f"{side.name} {side.cuda_syncs()}" for side in sides)
        print(f"host-device syncs per call: {counts}")


if __name__ == "__main__":
    main()
