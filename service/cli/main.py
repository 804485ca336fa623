"""`ldm`: the command-line entry point; each subcommand lives in a module of its own."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from . import client, evaluate, gateway, generate, train, up, worker


class Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments on one line (exit code 2), without the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="ldm",
        description="Latent diffusion inference: generate images, train the demo model, run the service.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    commands.required = True
    generate.register(commands)
    worker.register(commands)
    gateway.register(commands)
    up.register(commands)
    client.register(commands)
    train.register(commands)
    evaluate.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else os.environ.get("LDM_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
