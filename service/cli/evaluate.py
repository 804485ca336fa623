"""`ldm eval`: grade the demo model on held-out prompts and draw a sample grid."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..paths import bundled_model


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "eval",
        help="measure the demo model: attribute accuracy, autoencoder PSNR, seconds per image",
        description=(
            "Generate images for held-out prompts with fixed seeds and grade each with the analytic "
            "checker (colour, shape, size, position, background); measure the autoencoder's PSNR on "
            "held-out images and time one image. Optionally write a sample grid PNG."
        ),
    )
    p.add_argument("--model", type=Path, default=None, help="model folder (default: the bundled demo model)")
    p.add_argument(
        "--prompts", type=int, default=240, help="held-out prompts to grade (default: %(default)s)"
    )
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default: %(default)s)")
    p.add_argument("--sampler", default="dpmpp_2m", help="sampler (default: %(default)s)")
    p.add_argument("--grid", type=Path, default=None, help="also write a sample grid PNG here")
    p.add_argument("--show-failures", type=int, default=10, help="print this many failed prompts")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from ..demo.evaluate import evaluate, sample_grid
    from ..ldm.engine import Engine

    if args.prompts < 1:
        print("ldm eval: error: --prompts must be at least 1", file=sys.stderr)
        return 2
    engine = Engine.load(args.model or bundled_model())
    report = evaluate(engine, args.prompts, args.steps, args.sampler)
    for line in report.lines():
        print(line)
    for failure in report.failures[: args.show_failures]:
        print("  failed:", failure)
    if args.grid:
        print("grid:", sample_grid(engine, args.grid))
    return 0
