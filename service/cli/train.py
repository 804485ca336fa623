"""`ldm train`: the demo model's two training phases and its export into models/."""

from __future__ import annotations

import argparse
from dataclasses import fields, replace
from pathlib import Path

from ..paths import bundled_model

RUNS = Path("runs")
CHOICES = {"prediction": ("eps", "v")}  # settings that take one of a few words


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "train",
        help="train the demo model (phase 1: autoencoder, phase 2: UNet + text encoder)",
        description=(
            "Train the bundled demo LDM on generated images of coloured shapes, in the paper's two "
            "phases. Every phase is seeded and resumable: run the same command again to continue "
            "from its last checkpoint (saved every few hundred steps)."
        ),
    )
    phases = p.add_subparsers(dest="phase", metavar="PHASE", parser_class=type(p))
    phases.required = True

    ae = phases.add_parser("autoencoder", help="phase 1: the KL autoencoder")
    ae.add_argument(
        "--out", type=Path, default=RUNS / "autoencoder", help="state folder (default: %(default)s)"
    )
    _add_settings(ae, "AutoencoderTraining")
    ae.set_defaults(run=run_autoencoder)

    unet = phases.add_parser(
        "unet", help="phase 2: UNet and text encoder on the frozen autoencoder's latents"
    )
    unet.add_argument("--out", type=Path, default=RUNS / "unet", help="state folder (default: %(default)s)")
    unet.add_argument(
        "--autoencoder",
        type=Path,
        default=RUNS / "autoencoder",
        help="phase 1 state folder (default: %(default)s)",
    )
    _add_settings(unet, "UNetTraining")
    unet.set_defaults(run=run_unet)

    export = phases.add_parser("export", help="write the trained model (EMA weights) in the project's format")
    export.add_argument("--unet", type=Path, default=RUNS / "unet", help="phase 2 state folder")
    export.add_argument("--autoencoder", type=Path, default=RUNS / "autoencoder", help="phase 1 state folder")
    export.add_argument("--out", type=Path, default=None, help="model folder (default: the bundled model's)")
    export.set_defaults(run=run_export)


def _add_settings(parser: argparse.ArgumentParser, name: str) -> None:
    from ..demo import recipe

    defaults = getattr(recipe, name)()
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the initialisation")
    for f in fields(defaults):
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(
            flag,
            type=type(getattr(defaults, f.name)),
            default=None,
            choices=CHOICES.get(f.name),
            help=f"default: {getattr(defaults, f.name)}",
        )
    parser.set_defaults(settings_class=name)


def _settings(args: argparse.Namespace) -> object:
    from ..demo import recipe

    defaults = getattr(recipe, args.settings_class)()
    given = {f.name: getattr(args, f.name) for f in fields(defaults) if getattr(args, f.name) is not None}
    return replace(defaults, **given)


def run_autoencoder(args: argparse.Namespace) -> int:
    from ..demo.train import train_autoencoder

    train_autoencoder(args.out, _settings(args), args.seed)  # type: ignore[arg-type]
    return 0


def run_unet(args: argparse.Namespace) -> int:
    from ..demo.train import train_unet

    train_unet(args.out, args.autoencoder, _settings(args), args.seed)  # type: ignore[arg-type]
    return 0


def run_export(args: argparse.Namespace) -> int:
    from ..demo.train import export_model

    export_model(args.unet, args.autoencoder, args.out or bundled_model())
    return 0
