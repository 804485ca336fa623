"""What `appendfsync always` costs: enqueue latency and throughput against `everysec`, same run.

The service promises that a job answered 200/202 finishes exactly once, whatever process dies, the
machine under Redis included. With `everysec` a machine that dies loses up to a second of
acknowledged writes; with `always` Redis fsyncs the append-only file before it answers. This starts
two throwaway `redis-server`s on loopback ports (one of each), in folders on the same disk, and
enqueues the same requests into each through `JobStore.enqueue_many` (the gateway's call): one
client at a time (latency), then `--clients` threads at once (throughput, where Redis groups the
fsyncs of concurrent writes).

    .venv/bin/python -m bench.durability            # --requests, --clients, --n, --folder
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import redis

from service.ldm.request import GenerationRequest
from service.queue.store import JobStore
from tests.redis_server import free_port

REQUEST = GenerationRequest(prompt="a red circle on the left", steps=20, seed=1)


def start_redis(folder: Path, fsync: str) -> tuple[subprocess.Popen[bytes], redis.Redis]:
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    command = [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", ""]
    command += ["--appendonly", "yes", "--appendfsync", fsync]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            return process, client
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError(f"redis-server ({fsync}) did not start")


def latencies(store: JobStore, count: int, n: int) -> list[float]:
    out = []
    for i in range(count):
        started = time.perf_counter()
        store.enqueue_many("bench", [REQUEST.model_copy(update={"seed": i * n + k}) for k in range(n)])
        out.append(time.perf_counter() - started)
    return out


def throughput(store: JobStore, count: int, n: int, clients: int) -> float:
    """Requests enqueued per second by `clients` threads, `count` requests in all."""
    per_client = count // clients

    def work() -> None:
        latencies(store, per_client, n)

    threads = [threading.Thread(target=work) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return per_client * clients / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000, help="requests per measurement (default 2000)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients for throughput (16)")
    parser.add_argument("--n", type=int, default=1, help="images (jobs) per request (default 1)")
    parser.add_argument(
        "--folder", type=Path, default=None, help="where the AOF files go (default: a temp dir)"
    )
    args = parser.parse_args()
    root = args.folder or Path(tempfile.mkdtemp(prefix="ldm-durability-"))
    disk = subprocess.run(["df", "-h", str(root)], capture_output=True, text=True).stdout.splitlines()[-1]
    print(f"{platform.processor() or platform.machine()}; {os.cpu_count()} cores; AOF on: {disk}")
    results = {}
    for fsync in ("everysec", "always"):
        process, client = start_redis(root / fsync, fsync)
        try:
            store = JobStore(client, max_backlog=10**9)
            latencies(store, 50, args.n)  # warm-up
            lat = sorted(latencies(store, args.requests, args.n))
            rate = throughput(store, args.requests, args.n, args.clients)
            results[fsync] = (statistics.median(lat), lat[int(0.99 * (len(lat) - 1))], rate)
            p50, p99, _ = results[fsync]
            print(f"{fsync:9s} enqueue p50 {p50 * 1000:.3f} ms  p99 {p99 * 1000:.3f} ms  "
                  f"{rate:,.0f} requests/s with {args.clients} clients")  # fmt: skip
        finally:
            process.terminate()
            process.wait(timeout=10)
    (e50, e99, erate), (a50, a99, arate) = results["everysec"], results["always"]
    print(
        f"always / everysec: latency p50 x{a50 / e50:.2f}, p99 x{a99 / e99:.2f}, "
        f"throughput x{arate / erate:.2f}"
    )
    if args.folder is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
