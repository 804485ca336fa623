"""`ldm client`: a command-line client of the gateway's HTTP API (no torch, no Redis).

It submits asynchronously (`Prefer: respond-async`), follows each job's server-sent events with a
progress bar, then downloads the PNGs. Refusals and connection errors are one line on stderr, exit 2;
a job that fails on the service exits 1.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm


class ClientError(Exception):
    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("client", help="generate images through a running gateway (HTTP)")
    kinds = p.add_subparsers(dest="kind", metavar="KIND")
    kinds.required = True
    for kind, text in (("txt2img", "text to image"), ("img2img", "image to image (or inpainting)")):
        k = kinds.add_parser(kind, help=text, description=f"{text}, through the gateway at --url")
        k.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway (default: %(default)s)")
        k.add_argument("--api-key", default=os.environ.get("LDM_API_KEY"), help="API key (env LDM_API_KEY)")
        k.add_argument("--prompt", required=True)
        k.add_argument("--negative-prompt", default=None)
        k.add_argument("--width", type=int, default=None)
        k.add_argument("--height", type=int, default=None)
        k.add_argument("--steps", type=int, default=None)
        k.add_argument("--guidance-scale", type=float, default=None)
        k.add_argument("--sampler", default=None)
        k.add_argument("--seed", type=int, default=None)
        k.add_argument("--n", type=int, default=None, help="images: OUT-0.png ... when more than one")
        k.add_argument("--model", default=None, help="default: the gateway's default model")
        k.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (default: %(default)s)")
        k.add_argument("-o", "--output", type=Path, required=True, help="PNG file to write")
        k.add_argument("--quiet", action="store_true", help="no progress bar")
        if kind == "img2img":
            k.add_argument("--init-image", type=Path, required=True, help="PNG to start from")
            k.add_argument("--strength", type=float, default=None)
            k.add_argument("--mask", type=Path, default=None, help="PNG, white is repainted")
        k.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise here
    try:
        paths = generate(args)
    except ClientError as e:
        print(f"ldm client: error: {e}", file=sys.stderr)
        return e.code
    except httpx.HTTPError as e:
        print(f"ldm client: error: cannot reach {args.url}: {e or type(e).__name__}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


def request_body(args: argparse.Namespace) -> dict[str, Any]:
    fields = (
        "prompt",
        "negative_prompt",
        "width",
        "height",
        "steps",
        "guidance_scale",
        "sampler",
        "seed",
        "n",
    )
    body = {name: getattr(args, name) for name in (*fields, "model") if getattr(args, name) is not None}
    if args.kind == "img2img":
        body["init_image"] = _read_png(args.init_image)
        if args.mask is not None:
            body["mask"] = _read_png(args.mask)
        if args.strength is not None:
            body["strength"] = args.strength
    return body


def generate(args: argparse.Namespace) -> list[Path]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = httpx.Timeout(30.0, read=max(30.0, args.timeout))
    with httpx.Client(base_url=args.url.rstrip("/"), headers=headers, timeout=timeout) as http:
        reply = http.post(f"/v1/{args.kind}", json=request_body(args), headers={"Prefer": "respond-async"})
        _check(reply)
        jobs = reply.json()["jobs"]
        outputs = _outputs(args.output, len(jobs))
        with tqdm(total=None, unit="step", disable=args.quiet, desc=args.kind) as bar:
            for job, output in zip(jobs, outputs, strict=True):
                _follow(http, job["id"], bar, len(jobs))
                image = http.get(f"/v1/jobs/{job['id']}", headers={"Accept": "image/png"})
                _check(image)
                output.parent.mkdir(parents=True, exist_ok=True)
                output.write_bytes(image.content)
    return outputs


def _follow(http: httpx.Client, job_id: str, bar: tqdm, jobs: int) -> None:
    """Follows the job's events until it ends, moving the bar by the steps done."""
    done = 0
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        _check(stream)
        for kind, data in _sse(stream.iter_lines()):
            if kind == "progress":
                if bar.total is None:  # the first progress event says how many steps a job takes
                    bar.total = data["total"] * jobs
                bar.update(max(0, data["step"] - done))
                done = data["step"]
            elif kind == "succeeded":
                return
            elif kind in ("failed", "cancelled", "expired"):
                raise ClientError(f"job {job_id} {kind}: {data.get('error', kind)}", code=1)
    raise ClientError(f"the event stream of job {job_id} ended before the job did", code=1)


def _sse(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    kind, data = "message", ""
    for line in lines:
        if not line:
            if data:
                yield kind, json.loads(data)
            kind, data = "message", ""
        elif line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()


def _check(reply: httpx.Response) -> None:
    if reply.is_success:
        return
    reply.read()
    try:
        detail = reply.json().get("detail", reply.text)
    except ValueError:
        detail = reply.text
    if isinstance(detail, list):  # 422: [{loc, msg}]
        detail = "; ".join(
            f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg')}" for d in detail
        )
    retry = f" (retry after {reply.headers['Retry-After']} s)" if "Retry-After" in reply.headers else ""
    raise ClientError(f"{reply.status_code} {detail}{retry}", code=2 if reply.status_code < 500 else 1)


def _outputs(output: Path, n: int) -> list[Path]:
    return [output] if n == 1 else [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(n)]


def _read_png(path: Path) -> str:
    try:
        return base64.b64encode(path.read_bytes()).decode()
    except OSError as e:
        raise ClientError(f"cannot read {path}: {e.strerror}") from None
