"""The service's overhead: one image through HTTP (gateway, Redis, worker and back) against the same
request on the engine in-process, both on one torch thread.

    .venv/bin/python -m bench.overhead              # the bundled demo model if present, else a tiny one
    .venv/bin/python -m bench.overhead --runs 40 --model path/to/model --steps 20
    .venv/bin/python -m bench.overhead --max-wait-ms 50   # the worker's default batch wait

The in-process side is `Engine.generate` plus the PNG encoding (what the worker sends back), so both
sides end with the same PNG. The service side is a synchronous `POST /v1/txt2img` by httpx, JSON and
base64 decoding included, against a real gateway process, a real redis-server and a real worker
process with the production settings (only its batch wait is set: 0 unless --max-wait-ms says
otherwise). After warm-up the two sides alternate, and which one goes first swaps every round: the
side that runs right after the other was measured 3 to 8% slower (caches, the other side's processes
still winding down), so a fixed order would bias the ratio.

`--pin` (the default where there are two cores or more) gives the working thread a core of its own: the
in-process side's thread and every thread of the worker run on the last core, everything else (the
gateway, redis-server, the latency proxy, the HTTP client) on the others, as in a deployment where
Redis and the gateway are on other machines. Unpinned (`--no-pin`), on a 2-core machine the service's
other processes take the worker's core from time to time while it steps (the gateway woken by each
progress event, Redis's fsyncs, the proxy's threads), which the in-process side never meets.

Besides wall time it prints the CPU time each side spends per image (the in-process side's own; the
worker's, the gateway's and Redis's on the service side): on a machine shared with other jobs wall
time swings with their load, CPU time much less. And wall time less the time the thread doing the
work (the benchmark's own for the in-process side, the worker's loop for the service) waited for a
CPU while other jobs held them (Linux schedstat): on a busy machine the ratio of those is the one to
read, since the raw wall times then swing by 30% between identical runs.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import httpx
import redis
import torch

from bench.latency import LatencyProxy
from bench.machine import cpu_description, load_average, process_cpu_s, run_delay_s
from service.ldm.engine import Engine, GenerationRequest
from service.ldm.images import png_bytes
from service.paths import bundled_model
from service.settings import WorkerSettings
from tests.gateway_env import GatewayProcess, write_tiny_own_model
from tests.redis_server import RedisServer
from tests.workers import WorkerProcess

PROMPT = "a large red circle on the left on a gray background"
IN_PROCESS, HTTP = "in-process", "HTTP"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="model folder (default: demo model, else tiny)")
    p.add_argument("--runs", type=int, default=20, help="timed runs per side (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs per side (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=0.0,
        help="the worker's LDM_MAX_WAIT_MS, its longest wait for batch-mates (default: %(default)s; "
        "the worker's own default is 50)",
    )
    p.add_argument(
        "--appendfsync",
        choices=("always", "everysec"),
        default="always",
        help="Redis's fsync policy: always (default, as `ldm up` and the deployments run it: every write "
        "waits for the disk) or everysec (what the service costs without that wait)",
    )
    p.add_argument(
        "--redis-latency-ms",
        type=float,
        default=0.0,
        help="added to every Redis round trip of the worker and gateway, through a loopback proxy, "
        "to stand in for a Redis on another machine (default: %(default)s)",
    )
    p.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=len(os.sched_getaffinity(0)) >= 2,
        help="the working thread (in-process, or the worker's) on a core of its own, the rest on the "
        "others (default: on where there are two cores or more)",
    )
    return p.parse_args()


class Cores:
    """Which core the working thread runs on and which the rest use (`--pin`); does nothing unpinned."""

    def __init__(self, pin: bool) -> None:
        cores = sorted(os.sched_getaffinity(0))
        self.pin = pin and len(cores) >= 2
        self.work, self.rest = {cores[-1]}, set(cores[:-1])
        if self.pin:
            os.sched_setaffinity(0, self.rest)  # this thread, and what it starts from now on

    def describe(self) -> str:
        if not self.pin:
            return "not pinned: every process may run on every core"
        return f"pinned: the working thread on core {min(self.work)}, the rest on {sorted(self.rest)}"

    def to_work(self, pid: int) -> None:
        """Every thread of a process (a worker) onto the working core."""
        if self.pin:
            for task in os.listdir(f"/proc/{pid}/task"):
                os.sched_setaffinity(int(task), self.work)

    def working(self) -> contextlib.AbstractContextManager[None]:
        """This thread on the working core for a while (the in-process side)."""
        return self._working() if self.pin else contextlib.nullcontext()

    @contextlib.contextmanager
    def _working(self) -> Iterator[None]:
        os.sched_setaffinity(0, self.work)
        try:
            yield
        finally:
            os.sched_setaffinity(0, self.rest)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    cores = Cores(args.pin)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model, which = args.model, "given"
        if model is None:
            demo = bundled_model()
            model, which = (
                (demo, "bundled demo model") if (demo / "model.safetensors").exists() else (None, "")
            )
        if model is None:
            model, which = write_tiny_own_model(folder / "tiny"), "tiny random model (no demo model found)"
        engine = Engine.load(model)
        request = GenerationRequest(prompt=PROMPT, steps=args.steps, seed=args.seed)
        resolved = engine.resolve(request)
        body = {"prompt": PROMPT, "steps": args.steps, "seed": args.seed}

        def in_process() -> bytes:
            with cores.working():
                (result,) = engine.generate([request])
                assert result.image is not None
                return png_bytes(result.image, result.request.parameters())

        server = RedisServer(folder / "redis", appendfsync=args.appendfsync)
        server.start()
        url = server.url
        proxy = None
        if args.redis_latency_ms > 0:
            proxy = LatencyProxy(server.port, args.redis_latency_ms / 1000).start()
            url = f"redis://127.0.0.1:{proxy.port}/0"
        worker = WorkerProcess(
            "bench", url, {"bench": model}, folder, max_wait_ms=args.max_wait_ms, env=production_env()
        ).start()
        gateway = GatewayProcess(url, {"bench": model}, folder, {"LDM_LOG_LEVEL": "WARNING"})
        try:
            gateway.start()
            worker.wait_ready(server.client(), timeout_s=120)
            assert worker.process is not None and gateway.process is not None and server.process is not None
            cores.to_work(worker.process.pid)
            pids = {"worker": worker.process.pid, "gateway": gateway.process.pid, "redis": server.process.pid}
            with httpx.Client(base_url=gateway.url, timeout=120) as http:
                stages: dict[str, list[float]] = {"queue_ms": [], "inference_ms": [], "total_ms": []}

                def service() -> bytes:
                    reply = http.post("/v1/txt2img", json=body)
                    reply.raise_for_status()
                    answer = reply.json()
                    for name, values in stages.items():
                        values.append(answer["timings"][name])
                    return base64.b64decode(answer["images"][0]["png_base64"])

                print(cpu_description())
                print(f"{load_average()} before the runs (a machine shared with other jobs)")
                print(f"model: {which}: {model}")
                print(f"request: {resolved}".replace("ResolvedRequest", "")[:200])
                print(
                    f"worker: LDM_MAX_WAIT_MS {args.max_wait_ms:g} ("
                    + ("0: a lone job starts at once" if args.max_wait_ms == 0 else "not 0")
                    + f"), torch {torch.__version__}, 1 thread each side"
                )
                print(f"Redis: appendfsync {args.appendfsync}; {cores.describe()}")
                measure(args, {IN_PROCESS: in_process, HTTP: service}, pids)
                medians = ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in stages.items())
                print(f"HTTP side, p50 of the answers' timings (warm-up included): {medians}")
                if proxy is not None:
                    direct, delayed = ping_ms(server.url), ping_ms(url)
                    print(
                        f"Redis round trip (PING p50): direct {direct:.2f} ms, through the proxy the worker "
                        f"and gateway use {delayed:.2f} ms (--redis-latency-ms {args.redis_latency_ms})"
                    )
        finally:
            worker.stop()
            gateway.stop()
            server.kill()
            if proxy is not None:
                proxy.stop()


def production_env() -> dict[str, str]:
    """The worker as deployed, not as the tests run it (they shorten the reclaim window, which makes
    the keeper renew three times a second, and publish progress at every step)."""
    defaults = {
        f"LDM_{name.upper()}": str(WorkerSettings.model_fields[name].default)
        for name in ("reclaim_idle_ms", "progress_interval_ms")
        if name in WorkerSettings.model_fields
    }
    return {"LDM_TEST_FAULTS": "0", "LDM_LOG_LEVEL": "WARNING", **defaults}


def ping_ms(url: str, n: int = 200) -> float:
    client = redis.Redis.from_url(url)
    times = []
    for _ in range(n):
        started = time.perf_counter()
        client.ping()
        times.append((time.perf_counter() - started) * 1000)
    client.close()
    return statistics.median(times)


def measure(args: argparse.Namespace, sides: dict[str, Callable[[], bytes]], pids: dict[str, int]) -> None:
    """Warm-up, then rounds in which the sides alternate and swap which goes first; prints the figures."""
    for _ in range(args.warmup):
        for side in sides.values():
            side()
    times: dict[str, list[float]] = {name: [] for name in sides}
    unwaited: dict[str, list[float]] = {name: [] for name in sides}  # wall less the worker thread's wait
    cpu: dict[str, list[float]] = {IN_PROCESS: [], **{name: [] for name in pids}}
    me, tid = os.getpid(), threading.get_native_id()
    for i in range(args.runs):
        for name in list(sides) if i % 2 == 0 else list(reversed(sides)):
            before = {k: process_cpu_s(pid) for k, pid in pids.items()}
            own = time.process_time()
            waited = run_delay_s(me, tid) if name == IN_PROCESS else run_delay_s(pids["worker"])
            started = time.perf_counter()
            sides[name]()
            wall = (time.perf_counter() - started) * 1000
            waited = (run_delay_s(me, tid) if name == IN_PROCESS else run_delay_s(pids["worker"])) - waited
            times[name].append(wall)
            unwaited[name].append(wall - waited * 1000)
            if name == IN_PROCESS:
                cpu[IN_PROCESS].append((time.process_time() - own) * 1000)
            else:
                for k, pid in pids.items():
                    cpu[k].append((process_cpu_s(pid) - before[k]) * 1000)
    print(f"{args.runs} runs per side after {args.warmup} warm-up, alternating; {load_average()} after")
    for name, values in times.items():
        p50, p90 = statistics.median(values), statistics.quantiles(values, n=10)[-1]
        print(f"{name:10s}  p50 {p50:8.1f} ms   p90 {p90:8.1f} ms   min {min(values):8.1f} ms")
    base, over = statistics.median(times[IN_PROCESS]), statistics.median(times[HTTP])
    print(f"ratio HTTP/in-process {over / base:.3f} (target <= 1.03); added {over - base:.1f} ms (p50)")
    base, over = statistics.median(unwaited[IN_PROCESS]), statistics.median(unwaited[HTTP])
    print(
        f"less the working thread's wait for a CPU: p50 in-process {base:.1f} ms, HTTP {over:.1f} ms, "
        f"ratio {over / base:.3f}; added {over - base:.1f} ms"
    )
    means = {k: statistics.mean(v) for k, v in cpu.items()}
    service = " + ".join(f"{k} {means[k]:.1f}" for k in pids)
    print(f"CPU ms per image, mean: in-process {means[IN_PROCESS]:.1f}; HTTP side {service}")
    print(f"ratio of CPU time, worker/in-process {means['worker'] / means[IN_PROCESS]:.3f}")


if __name__ == "__main__":
    main()
