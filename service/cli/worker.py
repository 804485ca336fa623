"""`ldm worker`: a GPU worker on the Redis job queue, its models held warm (one process per GPU)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pydantic import ValidationError

from ..settings import WorkerSettings, worker_settings
from .options import add_models, bad_settings, fail, models_value, setting_help

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
    add_models(
        p, "serve this checkpoint under NAME (repeatable; default: the bundled demo model as 'shapes')"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help=_help("device", "where to run"))
    p.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default=None, help=_help("dtype"))
    p.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=None, help=_help("channels_last")
    )
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help=_help("compile"))
    p.add_argument("--max-batch", type=int, default=None, help=_help("max_batch"))
    p.add_argument("--max-wait-ms", type=float, default=None, help=_help("max_wait_ms"))
    p.add_argument("--redis-url", default=None, help=_help("redis_url"))
    p.add_argument("--lora-dir", type=Path, default=None, help=_help("lora_dir"))
    p.add_argument("--metrics-port", type=int, default=None, help=_help("metrics_port"))
    p.add_argument("--name", default=None, help=_help("worker_name"))
    p.set_defaults(run=run)


def _help(field: str, text: str = "") -> str:
    return setting_help(WorkerSettings, field, text)


def run(args: argparse.Namespace) -> int:
    try:
        settings = worker_settings(
            models=models_value(args.model),
            device=args.device,
            dtype=args.dtype,
            channels_last=args.channels_last,
            compile=args.compile,
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            redis_url=args.redis_url,
            lora_dir=args.lora_dir,
            metrics_port=args.metrics_port,
            worker_name=args.name,
        )
    except ValidationError as e:
        return bad_settings("worker", e)
    if settings.test_faults:
        log.warning("LDM_TEST_FAULTS is on: fault injection for tests is enabled")
    # Imported here so that `ldm --help` stays fast: torch takes seconds to import.
    from ..ldm.layout import CheckpointError
    from ..ldm.text import TokenizerError
    from ..worker.serve import serve

    if settings.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return fail("worker", "--device cuda: no CUDA device is available")
    try:
        return serve(settings)
    except (CheckpointError, TokenizerError, FileNotFoundError) as e:
        return fail("worker", str(e))
