"""The gateway's Redis connections under many waiting requests, against a real Redis: every
synchronous request holds a connection for its blocking read, so past redis-py's default pool (100)
the next request used to be answered 503 "Too many connections" at once; commands share a small pool
and wait their turn for a connection instead of opening one each."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.gateway.errors import Unavailable
from service.gateway.job_service import JobService
from service.ldm.request import GenerationRequest
from service.queue.connection import async_client_for
from service.queue.store import JobStore
from service.settings import QueueSettings

from .redis_server import RedisServer

WAITERS = 150


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(Path(tmp_path_factory.mktemp("redis")), appendfsync="no")
    server.start()
    yield server
    server.kill()


def test_many_waiting_requests_and_a_burst_of_commands(server: RedisServer) -> None:
    settings = QueueSettings(redis_url=server.url, max_backlog=10_000)

    async def scenario() -> tuple[list[bool], list[tuple[list[str], bool]], int]:
        commands = async_client_for(settings, max_connections=8)
        jobs = JobService(JobStore.from_settings(settings), commands, 1, waits=async_client_for(settings))
        try:
            request = GenerationRequest(prompt="a red circle", steps=2, seed=1)
            ids = [(await jobs.submit("tiny", [request], "owner"))[0] for _ in range(WAITERS)]
            # Every waiter blocks on its own connection; nothing runs the jobs, so each times out.
            waits = [jobs.waiting.wait(job_ids, 1.5) for job_ids in ids]
            # Meanwhile a burst of submits shares the 8 command connections.
            burst = [jobs.submit("tiny", [request], "owner") for _ in range(100)]
            waited, submitted = await asyncio.gather(asyncio.gather(*waits), asyncio.gather(*burst))
            held = len(server.client().client_list()) - 1  # the gateway's connections, as Redis sees them
            return list(waited), list(submitted), held
        finally:
            await jobs.close()

    waited, submitted, held = asyncio.run(scenario())
    assert waited == [False] * WAITERS  # each timed out waiting, none failed for want of a connection
    assert len(submitted) == 100 and all(len(ids) == 1 and not replayed for ids, replayed in submitted)
    assert held <= WAITERS + 8  # a connection per waiter, and the commands' 8 (not one per submit)


def test_wait_follows_the_enqueue_on_its_connection(server: RedisServer) -> None:
    """WAIT counts the writes of its own connection: with LDM_REDIS_MIN_REPLICAS, each enqueue's WAIT
    goes on the connection that ran the script, right after it, even with many submits at once
    (sent apart, a pooled connection could confirm another request's writes). No replica here: each
    submit is answered 503 (not replicated); what Redis saw is what counts."""
    settings = QueueSettings(redis_url=server.url, redis_min_replicas=1, redis_wait_ms=10)
    seen: list[tuple[str, str]] = []
    monitoring = threading.Event()

    def monitor() -> None:
        with server.client().monitor() as m:
            monitoring.set()
            for command in m.listen():
                peer = f"{command['client_address']}:{command['client_port']}"
                name = command["command"].split(" ", 1)[0].upper()
                seen.append((peer, name))
                if name == "ECHO" and "the end" in command["command"]:
                    return

    async def scenario() -> None:
        commands = async_client_for(settings, max_connections=8)
        jobs = JobService(JobStore.from_settings(settings), commands, 1)
        try:
            request = GenerationRequest(prompt="a red circle", steps=2, seed=1)
            tries = [jobs.submit("tiny", [request], "owner") for _ in range(40)]
            reads = [commands.get(f"other-{i}") for i in range(200)]  # other requests' commands
            answers = await asyncio.gather(*tries, *reads, return_exceptions=True)
            assert all(isinstance(a, Unavailable) for a in answers[:40]), answers
        finally:
            await jobs.close()

    watcher = threading.Thread(target=monitor)
    watcher.start()
    monitoring.wait(5)
    asyncio.run(scenario())
    server.client().echo("the end")
    watcher.join(10)
    last: dict[str, str] = {}
    waits = 0
    for peer, name in seen:
        if name == "WAIT":
            waits += 1
            assert last.get(peer) == "EVALSHA", (peer, last.get(peer))
        last[peer] = name
    assert waits == 40
