"""Short jobs under load: a steady stream of long jobs (50 steps) with short ones (4 steps) arriving
among them, through the real gateway, Redis and workers on loopback, under two admission policies in
the same run: step-level joining (continuous batching, the worker's default) and batch-at-a-time
(LDM_ADMISSION=batch: jobs join only an empty batch, after a batch wait of LDM_MAX_WAIT_MS).

    .venv/bin/python -m bench.mixed                     # demo model, about two minutes on 2 cores
    .venv/bin/python -m bench.mixed --rounds 2          # step, batch, batch, step: steadier on a busy machine
    .venv/bin/python -m bench.mixed --help              # --long-clients, --shorts, --short-rate, ...

`--long-clients` clients each keep one long job in flight (a synchronous POST /v1/txt2img, then the
next), so the worker always has long work; short jobs arrive as a Poisson stream (`--short-rate` per
second, `--shorts` of them, the same arrival times under both policies), each a synchronous POST. A
job's latency is the client's: from sending the request to having the PNG. Images/s counts every job
that finished inside the window of the short jobs (first sent to last answered) by the share of its
run that fell inside it, so long jobs cut by the window's ends count for what they did in it.

Both workers run from the start, each serving the model under its own name (so its own stream): the
idle one waits on Redis and costs nothing. The device is CUDA when torch sees one, else the CPU (one
torch thread: the machine is shared). Loopback only; nothing is left running.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import statistics
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import httpx
import torch

from bench.machine import cpu_description, load_average
from bench.overhead import production_env
from service.paths import bundled_model
from tests.gateway_env import GatewayProcess, write_tiny_own_model
from tests.redis_server import RedisServer, free_port
from tests.workers import WorkerProcess

POLICIES = ("step", "batch")
PROMPTS = [
    "a large red circle on the left on a gray background",
    "a small blue square at the top on a white background",
    "a large green triangle on the right on a gray background",
    "a small yellow circle at the bottom on a white background",
]


@dataclass
class Done:
    kind: str  # long | short
    sent: float
    answered: float

    @property
    def latency(self) -> float:
        return self.answered - self.sent


@dataclass
class Run:
    policy: str
    jobs: list[Done] = field(default_factory=list)
    window: tuple[float, float] = (0.0, 0.0)
    batch_size: float = 0.0  # mean members per step (the worker's ldm_batch_size)
    step_ms: float = 0.0  # mean step time (ldm_step_seconds)

    def images_per_s(self) -> float:
        start, end = self.window
        done = sum(max(0.0, min(end, j.answered) - max(start, j.sent)) / j.latency for j in self.jobs)
        return done / (end - start)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="model folder (default: demo model, else tiny)")
    p.add_argument("--long-clients", type=int, default=6, help="long jobs kept in flight (default 6)")
    p.add_argument("--long-steps", type=int, default=50)
    p.add_argument("--short-steps", type=int, default=4)
    p.add_argument("--shorts", type=int, default=40, help="short jobs per policy and round (default 40)")
    p.add_argument("--short-rate", type=float, default=1.0, help="short jobs per second (default 1.0)")
    p.add_argument("--max-batch", type=int, default=8, help="both workers' LDM_MAX_BATCH (default 8)")
    p.add_argument("--rounds", type=int, default=1, help="rounds of both policies, ABBA order (default 1)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default=device, help="default: cuda if torch sees one"
    )
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args()


async def post(http: httpx.AsyncClient, model: str, steps: int, seed: int) -> None:
    body = {"model": model, "prompt": PROMPTS[seed % len(PROMPTS)], "steps": steps, "seed": seed}
    reply = await http.post("/v1/txt2img", json=body, headers={"Accept": "image/png"})
    reply.raise_for_status()


async def load(http: httpx.AsyncClient, model: str, args: argparse.Namespace, run: Run) -> None:
    """Long clients, then the short arrivals; returns once every short job is answered and the long
    jobs in flight have ended."""
    stop = asyncio.Event()
    seeds = iter(range(10**9))

    async def long_client() -> None:
        while not stop.is_set():
            sent = time.perf_counter()
            await post(http, model, args.long_steps, next(seeds))
            run.jobs.append(Done("long", sent, time.perf_counter()))

    async def short(delay: float) -> None:
        await asyncio.sleep(delay)
        sent = time.perf_counter()
        await post(http, model, args.short_steps, next(seeds))
        run.jobs.append(Done("short", sent, time.perf_counter()))

    longs = [asyncio.create_task(long_client()) for _ in range(args.long_clients)]
    while not any(j.kind == "long" for j in run.jobs):  # the long stream is up: every client has sent
        await asyncio.sleep(0.05)
    rng = random.Random(args.seed)  # the same arrival times for both policies
    delays, at = [], 0.0
    for _ in range(args.shorts):
        at += rng.expovariate(args.short_rate)
        delays.append(at)
    start = time.perf_counter()
    await asyncio.gather(*(short(d) for d in delays))
    shorts = [j for j in run.jobs if j.kind == "short"]
    run.window = (min(start, *(j.sent for j in shorts)), max(j.answered for j in shorts))
    stop.set()
    await asyncio.gather(*longs)


def worker_sums(port: int) -> tuple[float, float, float]:
    """Steps taken, members stepped and seconds stepping so far, from the worker's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()

    def value(name: str) -> float:
        found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    return value("ldm_step_seconds_count"), value("ldm_batch_size_sum"), value("ldm_step_seconds_sum")


def pct(values: list[float], q: float) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]
    )


def report(runs: list[Run], args: argparse.Namespace) -> None:
    print(
        f"{'policy':<7} {'short p50':>10} {'short p99':>10} {'long p50':>9} {'long p99':>9} {'images/s':>9}"
        f"  {'jobs (short/long)':>17}  mean batch  ms/step"
    )
    summary: dict[str, dict[str, float]] = {}
    for policy in POLICIES:
        mine = [r for r in runs if r.policy == policy]
        short = [j.latency for r in mine for j in r.jobs if j.kind == "short"]
        long = [j.latency for r in mine for j in r.jobs if j.kind == "long"]
        rate = statistics.mean(r.images_per_s() for r in mine)
        summary[policy] = {"short": statistics.median(short), "rate": rate}
        size, step = statistics.mean(r.batch_size for r in mine), statistics.mean(r.step_ms for r in mine)
        print(
            f"{policy:<7} {statistics.median(short):9.2f}s {pct(short, 99):9.2f}s "
            f"{statistics.median(long):8.2f}s {pct(long, 99):8.2f}s {rate:9.3f}  "
            f"{len(short):8d}/{len(long):<8d}  {size:10.2f}  {step:7.1f}"
        )
    short_ratio = summary["step"]["short"] / summary["batch"]["short"]
    rate_ratio = summary["step"]["rate"] / summary["batch"]["rate"]
    print(f"short-job p50, step/batch: {short_ratio:.3f} (target <= 0.25)")
    print(f"images/s, step/batch: {rate_ratio:.3f} (target >= 0.95)")


async def main_async(args: argparse.Namespace, gateway: GatewayProcess, ports: dict[str, int]) -> list[Run]:
    limits = httpx.Limits(max_connections=args.long_clients + args.shorts + 4)
    runs = []
    async with httpx.AsyncClient(base_url=gateway.url, timeout=600, limits=limits) as http:
        for policy in POLICIES:  # warm-up: first calls at each batch size allocate
            await asyncio.gather(*(post(http, f"mixed-{policy}", args.short_steps, i) for i in range(3)))
        order = [p for r in range(args.rounds) for p in (POLICIES if r % 2 == 0 else POLICIES[::-1])]
        for policy in order:
            before = worker_sums(ports[policy])
            run = Run(policy)
            started = time.perf_counter()
            await load(http, f"mixed-{policy}", args, run)
            steps, members, seconds = (b - a for a, b in zip(before, worker_sums(ports[policy]), strict=True))
            run.batch_size, run.step_ms = members / max(1.0, steps), seconds / max(1.0, steps) * 1000
            print(
                f"  {policy}: {len(run.jobs)} jobs in {time.perf_counter() - started:.0f} s; {load_average()}"
            )
            runs.append(run)
    return runs


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-mixed-") as tmp:
        folder = Path(tmp)
        model = args.model
        if model is None:
            demo = bundled_model()
            model = demo if (demo / "model.safetensors").exists() else write_tiny_own_model(folder / "tiny")
        server = RedisServer(folder / "redis")
        server.start()
        ports = {policy: free_port() for policy in POLICIES}
        workers = [
            WorkerProcess(
                policy,
                server.url,
                {f"mixed-{policy}": model},
                folder,
                max_batch=args.max_batch,
                max_wait_ms=50,
                metrics_port=ports[policy],
                env={**production_env(), "LDM_ADMISSION": policy, "LDM_DEVICE": args.device},
            )
            for policy in POLICIES
        ]
        models = {f"mixed-{policy}": model for policy in POLICIES}
        gateway = GatewayProcess(server.url, models, folder, {"LDM_LOG_LEVEL": "WARNING"})
        try:
            for worker in workers:
                worker.start()
            gateway.start()
            for worker in workers:
                worker.wait_ready(server.client(), timeout_s=300)
            device = torch.cuda.get_device_name() if args.device == "cuda" else cpu_description()
            print(f"{device}; {load_average()} before the runs (a machine shared with other jobs)")
            print(
                f"model {model}; {args.long_clients} long clients x {args.long_steps} steps, "
                f"{args.shorts} short jobs x {args.short_steps} steps at {args.short_rate:g}/s (Poisson); "
                f"max batch {args.max_batch}, batch wait 50 ms; device {args.device}; {args.rounds} round(s)"
            )
            runs = asyncio.run(main_async(args, gateway, ports))
            report(runs, args)
        finally:
            for worker in workers:
                worker.stop()
            gateway.stop()
            server.kill()


if __name__ == "__main__":
    main()
