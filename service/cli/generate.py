"""`ldm generate`: text-to-image, image-to-image and inpainting from the command line."""

from __future__ import annotations

import argparse
import io
import logging
from pathlib import Path

from tqdm import tqdm

from ..ldm.request import LORA_NAME, SAMPLERS, Limits
from ..paths import bundled_model
from .options import fail

log = logging.getLogger(__name__)


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "generate",
        help="generate images from a prompt",
        description=(
            "Generate images with a latent diffusion model: text-to-image, image-to-image "
            "(--init-image, --strength) and inpainting (--mask: white is repainted). With an x4 upscaler "
            "(--model x4-upscaler-ema.safetensors), --init-image is the image to upscale 4x."
        ),
    )
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a .safetensors checkpoint (SD 1.x/2.x/XL or this project's format) or a folder "
        "holding one (default: the bundled demo model)",
    )
    p.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="folder with vocab.json and merges.txt; SDXL: a folder holding tokenizer/ and tokenizer_2/ "
        "(default: beside the checkpoint)",
    )
    p.add_argument(
        "--prediction",
        choices=("eps", "v"),
        default=None,
        help="override the prediction type (SD 2.x 768-v checkpoints are v)",
    )
    p.add_argument("--prompt", required=True, help="what to draw")
    p.add_argument(
        "--negative-prompt", default="", help="what to steer away from (the CFG unconditional branch)"
    )
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None, help="sampler (default: the model's)")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (default 0: deterministic)")
    p.add_argument("--seed", type=int, default=None, help="seed of the first image; image i uses seed + i")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    p.add_argument("--n", type=int, default=1, help="number of images (run as one batch)")
    p.add_argument("--init-image", type=Path, default=None, help="start from this image (img2img)")
    p.add_argument(
        "--strength",
        type=float,
        default=None,
        help="how much of the init image to repaint, 0 (none) to 1 (all; default 0.8, SDXL refiner 0.3)",
    )
    p.add_argument("--mask", type=Path, default=None, help="inpainting mask PNG: white is repainted")
    p.add_argument(
        "--noise-level",
        type=int,
        default=None,
        help="x4 upscaler: noise added to --init-image before upscaling, 0 to 350 (default 20)",
    )
    p.add_argument(
        "--lora",
        action="append",
        type=lora_option,
        default=[],
        metavar="FILE[:WEIGHT]",
        help="apply a LoRA adapter (.safetensors, kohya or PEFT) at WEIGHT (default 1); repeatable",
    )
    sdxl = p.add_argument_group("SDXL")
    sdxl.add_argument(
        "--original-size",
        type=_size,
        default=None,
        metavar="WxH",
        help="size conditioning (default: the image's)",
    )
    sdxl.add_argument(
        "--crops-coords-top-left",
        type=_point,
        default=None,
        metavar="X,Y",
        help="crop conditioning (default 0,0)",
    )
    sdxl.add_argument(
        "--target-size",
        type=_size,
        default=None,
        metavar="WxH",
        help="base: target size (default: the image's)",
    )
    sdxl.add_argument("--aesthetic-score", type=float, default=None, help="refiner: conditioning score (6.0)")
    sdxl.add_argument(
        "--negative-aesthetic-score", type=float, default=None, help="refiner: the negative branch's (2.5)"
    )
    sdxl.add_argument(
        "--refiner",
        type=Path,
        default=None,
        help="an SDXL refiner checkpoint that finishes the base's latents",
    )
    sdxl.add_argument(
        "--switch-at", type=float, default=None, help="with --refiner: the base's share of the schedule (0.8)"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run")
    p.add_argument(
        "--dtype",
        choices=("auto", "fp32", "fp16", "bf16"),
        default=None,
        help="weights precision (default: fp32 on cpu, fp16 on cuda; auto: bf16 on a CPU with AMX)",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="NHWC memory format for the UNet and VAE (default: on for cpu, off for cuda)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the UNet (worth it for many images: the first step compiles)",
    )
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="output PNG; with --n above 1, OUT-0.png, OUT-1.png, ...",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # Imported here so that `ldm --help` stays fast: torch takes seconds to import.
    from ..ldm.engine import Engine
    from ..ldm.images import png_bytes
    from ..ldm.layout import CheckpointError
    from ..ldm.lora import LoraError
    from ..ldm.request import GenerationRequest, RequestError, plan
    from ..ldm.request_sdxl import check_refiner
    from ..ldm.text import TokenizerError

    if args.output.suffix.lower() != ".png":
        return fail("generate", f"--output must end in .png, got {args.output}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return fail("generate", "--device cuda: no CUDA device is available")
    try:
        init_image = _png_file(args.init_image)
        mask = _png_file(args.mask)
    except OSError as e:
        return fail("generate", f"cannot read image: {e}")
    if args.switch_at is not None and args.refiner is None:
        return fail("generate", "--switch-at: needs --refiner")
    try:
        speed = {"channels_last": args.channels_last, "compile": args.compile}
        engine = Engine.load(
            args.model or bundled_model(), args.tokenizer, args.device, args.dtype, args.prediction, **speed
        )
        refiners = {}
        if args.refiner is not None:
            refiners[REFINER] = Engine.load(args.refiner, None, args.device, args.dtype, **speed)
    except (CheckpointError, TokenizerError, ValueError) as e:
        return fail("generate", str(e))
    fields = ("prompt", "negative_prompt", "width", "height", "steps", "guidance_scale", "sampler", "seed")
    sdxl = (
        "original_size",
        "crops_coords_top_left",
        "target_size",
        "aesthetic_score",
        "negative_aesthetic_score",
    )
    values = {name: getattr(args, name) for name in (*fields, *sdxl, "eta", "strength")}
    if args.refiner is not None:
        values["refiner"] = {
            "model": REFINER,
            **({} if args.switch_at is None else {"switch_at": args.switch_at}),
        }
    files = {_lora_name(path, i): (path, weight) for i, (path, weight) in enumerate(args.lora)}
    loras = [{"name": name, "weight": weight} for name, (_, weight) in files.items()]
    try:
        adapters = {name: engine.load_lora(path, name) for name, (path, _) in files.items()}
    except (LoraError, CheckpointError) as e:
        return fail("generate", f"--lora: {e}")
    try:
        images = {"init_image": init_image, "mask": mask}
        if engine.config.is_upscaler:  # --init-image is what it upscales
            images = {"image": init_image, "noise_level": args.noise_level, "mask": mask}
        elif args.noise_level is not None:
            raise RequestError("noise_level", "only an x4 upscaler takes it")
        base = GenerationRequest.parse({**values, **images, "loras": loras or None})
        requests = plan(base, args.n, engine.config, _limits())
        if base.refiner is not None:
            check_refiner(base.refiner, engine.config, refiners[REFINER].config)
    except RequestError as e:
        flag = {"image": "init-image"}.get(e.field, e.field.split(".")[0].replace("_", "-"))
        return fail("generate", f"--{flag}: {e.message}")
    total = sum(engine.resolve(r).steps for r in requests)
    with tqdm(total=total, desc="denoising", unit="step", disable=None) as bar:
        done: dict[int, int] = {}

        def progress(index: int, step: int, steps: int) -> None:
            bar.update(step - done.get(index, 0))
            done[index] = step

        results = engine.generate(
            requests, progress=progress, adapters=adapters.__getitem__, refiners=refiners
        )
    outputs = (
        [args.output]
        if args.n == 1
        else [args.output.with_name(f"{args.output.stem}-{i}{args.output.suffix}") for i in range(args.n)]
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for result, path in zip(results, outputs, strict=True):
        assert result.image is not None
        path.write_bytes(png_bytes(result.image, result.request.parameters()))
        log.info(
            "wrote %s (seed %d, %d prompt tokens, %.0f ms)",
            path,
            result.request.seed,
            result.prompt_tokens,
            result.timings.get("total_ms", 0.0),
        )
    return 0


def lora_option(value: str) -> tuple[Path, float]:
    """FILE[:WEIGHT] (weight 1 when left out)."""
    path, sep, weight = value.rpartition(":")
    if sep:
        try:
            return Path(path), float(weight)
        except ValueError:
            pass
    return Path(value), 1.0


def _lora_name(path: Path, index: int) -> str:
    """The adapter's name in the request (and the PNG's parameters): its file's stem when that is a
    valid name."""
    return path.stem if LORA_NAME.match(path.stem) else f"lora{index}"


REFINER = "refiner"  # the name the request gives the --refiner model


def _size(text: str) -> dict[str, int]:
    """`WxH` -> the request's size object (its bounds are the request's)."""
    width, sep, height = text.lower().partition("x")
    if not sep or not width.strip().isdigit() or not height.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 1024x1024, got {text!r}")
    return {"width": int(width), "height": int(height)}


def _point(text: str) -> dict[str, int]:
    """`X,Y` -> the request's point object."""
    x, sep, y = text.partition(",")
    if not sep or not x.strip().isdigit() or not y.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected X,Y, e.g. 0,0, got {text!r}")
    return {"x": int(x), "y": int(y)}


def _limits() -> Limits:
    """The CLI runs what the engine can: the hard bounds, with no cap on how many images."""
    return Limits(max_n=2**31)


def _png_file(path: Path | None) -> bytes | None:
    """An image file as PNG bytes (any format PIL reads is converted)."""
    if path is None:
        return None
    from PIL import Image, UnidentifiedImageError

    data = path.read_bytes()
    if data.startswith(b"\x89PNG"):
        return data
    try:
        with Image.open(path) as image:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
    except UnidentifiedImageError as e:
        raise OSError(str(e)) from None
    return buffer.getvalue()
