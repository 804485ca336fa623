"""`ldm gateway`: the HTTP and gRPC front end on the Redis job queue (no torch: starts in under a second)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pydantic import ValidationError

from ..settings import GatewaySettings, gateway_settings
from .options import add_models, bad_settings, models_value, setting_help


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "gateway",
        help="serve the HTTP and gRPC API (jobs go to the Redis queue)",
        description=(
            "Serve POST /v1/txt2img, /v1/img2img, /v1/jobs, /v1/models, /metrics, the gRPC service "
            "ldm.v1.Images, OpenAI's Images API (/v1/images/...) and AUTOMATIC1111's API (/sdapi/v1/...). "
            "Every option also reads an environment variable LDM_<OPTION> (for example "
            "LDM_API_KEYS, LDM_MAX_BACKLOG); see service/settings.py."
        ),
    )
    add_models(
        p,
        "a model served under NAME, its checkpoint read for sizes and defaults (repeatable; "
        "default: the bundled demo model as 'shapes'; the first is the default model)",
    )
    p.add_argument("--host", default=None, help=_help("host"))
    p.add_argument("--http-port", type=int, default=None, help=_help("http_port"))
    p.add_argument("--grpc-port", type=int, default=None, help=_help("grpc_port"))
    p.add_argument("--redis-url", default=None, help=_help("redis_url"))
    p.add_argument("--lora-dir", type=Path, default=None, help=_help("lora_dir"))
    p.add_argument("--request-timeout-s", type=float, default=None, help=_help("request_timeout_s"))
    p.set_defaults(run=run)


def _help(field: str) -> str:
    return setting_help(GatewaySettings, field)


def run(args: argparse.Namespace) -> int:
    try:
        settings = gateway_settings(
            models=models_value(args.model),
            host=args.host,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            redis_url=args.redis_url,
            lora_dir=args.lora_dir,
            request_timeout_s=args.request_timeout_s,
        )
    except ValidationError as e:
        return bad_settings("gateway", e)
    from ..gateway.serve import serve  # imported here so that `ldm --help` stays fast

    return serve(settings)
