"""`ldm worker`: a GPU worker on the Redis job queue, its models held warm (one process per GPU)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from ..settings import WorkerSettings, worker_settings

log = logging.getLogger(__name__)


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "worker",
        help="serve jobs from the Redis queue (continuous batching)",
        description=(
            "Load the models once and serve their job streams: continuous batching at step "
            "boundaries, at-least-once delivery, SIGTERM drains. Every option also reads an "
            "environment variable LDM_<OPTION> (for example LDM_MAX_BATCH); see service/settings.py."
        ),
    )
    p.add_argument(
        "--model",
        action="append",
        metavar="NAME=PATH",
        default=None,
        help="serve this checkpoint under NAME (repeatable; default: the bundled demo model as 'shapes')",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help=_help("device", "where to run"))
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None, help=_help("dtype"))
    p.add_argument("--max-batch", type=int, default=None, help=_help("max_batch"))
    p.add_argument("--max-wait-ms", type=float, default=None, help=_help("max_wait_ms"))
    p.add_argument("--redis-url", default=None, help=_help("redis_url"))
    p.add_argument("--metrics-port", type=int, default=None, help=_help("metrics_port"))
    p.add_argument("--name", default=None, help=_help("worker_name"))
    p.set_defaults(run=run)


def _help(field: str, text: str = "") -> str:
    """Help from the setting's description and default: the facts live in WorkerSettings."""
    info = WorkerSettings.model_fields[field]
    return f"{text or info.description} (env LDM_{field.upper()}, default: {info.default})"


def run(args: argparse.Namespace) -> int:

    def fail(message: str) -> int:
        print(f"ldm worker: error: {message}", file=sys.stderr)
        return 2

    models: dict[str, Path] | None = None
    if args.model:
        models = {}
        for item in args.model:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                return fail(f"--model takes NAME=PATH, got {item!r}")
            models[name] = Path(path)
    try:
        settings = worker_settings(
            models=models,
            device=args.device,
            dtype=args.dtype,
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            redis_url=args.redis_url,
            metrics_port=args.metrics_port,
            worker_name=args.name,
        )
    except ValidationError as e:
        return fail("; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()))
    if settings.test_faults:
        log.warning("LDM_TEST_FAULTS is on: fault injection for tests is enabled")
    # Imported here so that `ldm --help` stays fast: torch takes seconds to import.
    from ..ldm.checkpoint import CheckpointError
    from ..ldm.text import TokenizerError
    from ..worker.serve import serve

    if settings.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return fail("--device cuda: no CUDA device is available")
    try:
        return serve(settings)
    except (CheckpointError, TokenizerError, FileNotFoundError) as e:
        return fail(str(e))
