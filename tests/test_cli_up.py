"""`ldm up` as a person runs it: it starts its own Redis, the gateway and a worker; a client gets an
image, and the bundled upscaler upscales an 8x8 PNG better than bicubic; a worker that dies is
restarted; SIGTERM stops everything and exits 0."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from service.paths import REPO_ROOT, bundled_upscaler
from service.queue import keys

from .gateway_env import write_tiny_own_model
from .redis_server import REDIS_SERVER, free_port
from .workers import wait_for

pytestmark = pytest.mark.slow


def ldm(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "service.cli.main", *args]
    return subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.fixture
def env() -> dict[str, str]:
    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server is not installed (./dev setup installs it)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LDM_") and k != "REDIS_URL"}
    return env | {
        "PYTHONPATH": str(REPO_ROOT),
        "OMP_NUM_THREADS": "1",
        "LDM_TORCH_THREADS": "1",
        "LDM_RECLAIM_IDLE_MS": "1000",
        "LDM_DRAIN_GRACE_S": "5",
    }


@pytest.fixture
def up(tmp_path: Path, env: dict[str, str]) -> Iterator[tuple[subprocess.Popen[str], dict[str, int], Path]]:
    ports = {"http": free_port(), "grpc": free_port(), "redis": free_port()}
    model = write_tiny_own_model(tmp_path / "model")
    process = ldm("up", "--model", f"tiny={model}", "--http-port", str(ports["http"]), "--grpc-port",
                  str(ports["grpc"]), "--redis-port", str(ports["redis"]), "--metrics-port", "0",
                  "--data-dir", str(tmp_path / "redis"), env=env)  # fmt: skip
    try:
        yield process, ports, tmp_path
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        if process.stdout is not None:
            print(process.stdout.read()[-5000:])  # shown when the test fails
            process.stdout.close()


def worker_pids(client: redis.Redis) -> list[int]:
    beats = [client.get(key) for key in client.scan_iter(match=keys.WORKER_PATTERN)]
    return [json.loads(beat)["pid"] for beat in beats if beat]


def test_up_serves_restarts_a_dead_worker_and_stops_cleanly(
    up: tuple[subprocess.Popen[str], dict[str, int], Path],
) -> None:
    process, ports, folder = up
    url = f"http://127.0.0.1:{ports['http']}"

    def ready() -> bool:
        assert process.poll() is None, "ldm up exited"
        try:
            return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, 30, "the gateway")
    client = redis.Redis(port=ports["redis"], socket_timeout=5)
    (first,) = wait_for(lambda: worker_pids(client), 60, "a worker")
    out = folder / "up.png"
    done = subprocess.run([sys.executable, "-m", "service.cli.main", "client", "txt2img", "--url", url,
                           "--prompt", "a red circle", "--quiet", "-o", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert out.read_bytes().startswith(b"\x89PNG")

    os.kill(first, signal.SIGKILL)  # a crash: `ldm up` restarts the worker after its backoff
    second = wait_for(lambda: [pid for pid in worker_pids(client) if pid != first], 60, "a restarted worker")
    reply = httpx.post(f"{url}/v1/txt2img", json={"prompt": "a blue square", "steps": 3}, timeout=60)
    assert reply.status_code == 200, reply.text

    gateway_pid = next(c.pid for c in _children(process.pid) if "gateway" in c.command)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=40) == 0
    for pid in (*second, gateway_pid):
        wait_for(lambda pid=pid: not alive(pid), 10, f"process {pid} to stop")
    with pytest.raises(redis.ConnectionError):
        client.ping()
    assert list((folder / "redis").rglob("*.aof*")), "Redis kept no append-only file"
    log = process.stdout.read() if process.stdout else ""
    assert "worker 0 exited with code -9; restarting" in log and "stopped" in log


@pytest.mark.skipif(not bundled_upscaler().is_dir(), reason="the demo upscaler is not in models/")
def test_up_serves_the_bundled_models_with_the_demo_upscaler(tmp_path: Path, env: dict[str, str]) -> None:
    """`ldm up` with no --model: the demo model and the demo upscaler, as a new user starts it."""
    ports = {"http": free_port(), "grpc": free_port(), "redis": free_port()}
    process = ldm("up", "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]),
                  "--redis-port", str(ports["redis"]), "--metrics-port", "0",
                  "--data-dir", str(tmp_path / "redis"), env=env)  # fmt: skip
    url = f"http://127.0.0.1:{ports['http']}"
    try:
        wait_for(lambda: process.poll() is None and _ready(url), 30, "the gateway")
        models = {m["name"]: m for m in httpx.get(f"{url}/v1/models", timeout=5).json()["models"]}
        assert (models["shapes-x4"]["family"], models["shapes-x4"]["task"]) == ("upscale-x4", "upscale")
        assert models["shapes"]["default"] and models["shapes"]["task"] == "txt2img"
        upscaled_better_than_bicubic(url)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=40) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        if process.stdout is not None:
            print(process.stdout.read()[-5000:])  # shown when the test fails
            process.stdout.close()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def upscaled_better_than_bicubic(url: str) -> None:
    """POST /v1/upscale (the first upscaler served: the bundled shapes-x4) an 8x8 PNG of a held-out
    32x32 shape: the 32x32 answer is closer to the original than bicubic upscaling."""
    import io

    import numpy as np
    from PIL import Image

    from service.demo import shapes
    from service.demo.upscaler import HIGH, bicubic, downsample

    sample = shapes.make_sample(shapes.EVAL_SEEDS.start + 7, HIGH)
    original = sample.image  # (32, 32, 3)
    small = downsample(original[None])[0]
    buffer = io.BytesIO()
    Image.fromarray(small).save(buffer, format="PNG")
    body = {"prompt": sample.caption, "image": base64.b64encode(buffer.getvalue()).decode(), "seed": 1}
    reply = httpx.post(f"{url}/v1/upscale", json=body, headers={"Accept": "image/png"}, timeout=120)
    assert reply.status_code == 200, reply.text
    image = np.asarray(Image.open(io.BytesIO(reply.content)).convert("RGB"), dtype=np.float64)
    assert image.shape == (HIGH, HIGH, 3)
    ours = np.mean((image - original) ** 2)
    baseline = np.mean((bicubic(small[None])[0].astype(np.float64) - original) ** 2)
    assert ours < baseline, (ours, baseline)


def test_up_refuses_a_busy_port(tmp_path: Path, env: dict[str, str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        model = write_tiny_own_model(tmp_path / "model")
        command = [
            sys.executable,
            "-m",
            "service.cli.main",
            "up",
            "--model",
            f"tiny={model}",
            "--http-port",
            str(port),
        ]
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 2 and f"port {port} is in use" in done.stderr


class _Child:
    def __init__(self, pid: int, command: str) -> None:
        self.pid = pid
        self.command = command


def _children(parent: int) -> list[_Child]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == parent:
                command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                out.append(_Child(int(stat.parent.name), command))
        except (OSError, IndexError, ValueError):
            continue
    return out
