"""The image's HEALTHCHECK, for both roles of the one image (standard library only).

`ldm gateway` (and `ldm up`) is healthy when its /healthz answers 200; `ldm worker` when the /healthz
on its metrics port does: served once its models are loaded, 503 while its loop is stuck. The role is
read off the command line of PID 1, the container's `ldm ...` process. Exit 0: healthy, 1: unhealthy
(Docker's convention).
"""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path

TIMEOUT_S = 4.0


def role(cmdline: bytes) -> str:
    """The `ldm` subcommand in a NUL-separated command line ('' when none)."""
    for arg in cmdline.split(b"\0"):
        if arg in (b"gateway", b"worker", b"up"):
            return arg.decode()
    return ""


def probe_url(role: str) -> str | None:
    """What to ask; None when there is nothing to ask (the worker's metrics port switched off)."""
    if role == "worker":
        port = int(os.environ.get("LDM_METRICS_PORT", "9400"))
        return f"http://127.0.0.1:{port}/healthz" if port else None
    return f"http://127.0.0.1:{int(os.environ.get('LDM_HTTP_PORT', '8000'))}/healthz"


def main() -> int:
    url = probe_url(role(Path("/proc/1/cmdline").read_bytes()))
    if url is None:
        return 0  # a worker without a metrics port: the container runtime's liveness (PID 1 runs) is all
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as reply:
            return 0 if reply.status == 200 else 1
    except OSError as e:
        print(f"unhealthy: {url}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
