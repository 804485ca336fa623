"""What the `ldm` subcommands share: the `--model NAME=PATH` option, help texts and defaults read off
the settings classes (the settings own every default), and one way to report a bad setting."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pydantic import ValidationError
from pydantic_settings import BaseSettings

from ..settings import settings_error


def add_models(parser: argparse.ArgumentParser, help: str) -> None:
    """`--model NAME=PATH`, repeatable; parsed by the settings (LDM_MODELS's syntax)."""
    parser.add_argument("--model", action="append", metavar="NAME=PATH", default=None, help=help)


def models_value(items: list[str] | None) -> str | None:
    """--model NAME=PATH ... as the LDM_MODELS text the settings parse (None when not given)."""
    return ",".join(items) if items else None


def default(settings: type[BaseSettings], field: str) -> Any:
    return settings.model_fields[field].default


def setting_help(settings: type[BaseSettings], field: str, text: str = "") -> str:
    """Help from the setting's description and default: the facts live in the settings class."""
    info = settings.model_fields[field]
    return f"{text or info.description} (env LDM_{field.upper()}, default: {info.default})"


def fail(command: str, message: str) -> int:
    """A usage error on one line, without a traceback; exit code 2."""
    print(f"ldm {command}: error: {message}", file=sys.stderr)
    return 2


def bad_settings(command: str, e: ValidationError) -> int:
    return fail(command, settings_error(e))
