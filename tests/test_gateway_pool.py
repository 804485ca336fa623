"""The gateway's Redis connections under many waiting requests, against a real Redis: every
synchronous request holds a connection for its blocking read, so past redis-py's default pool (100)
the next request used to be answered 503 "Too many connections" at once; commands share a small pool
and wait their turn for a connection instead of opening one each."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

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

    async def scenario() -> tuple[list[bool], list[list[str]], int]:
        commands = async_client_for(settings, max_connections=8)
        jobs = JobService(JobStore.from_settings(settings), commands, 1, waits=async_client_for(settings))
        try:
            request = GenerationRequest(prompt="a red circle", steps=2, seed=1)
            ids = [await jobs.submit("tiny", [request], "owner") for _ in range(WAITERS)]
            # Every waiter blocks on its own connection; nothing runs the jobs, so each times out.
            waits = [jobs.wait(job_ids, 1.5) for job_ids in ids]
            # Meanwhile a burst of submits shares the 8 command connections.
            burst = [jobs.submit("tiny", [request], "owner") for _ in range(100)]
            waited, submitted = await asyncio.gather(asyncio.gather(*waits), asyncio.gather(*burst))
            held = len(server.client().client_list()) - 1  # the gateway's connections, as Redis sees them
            return list(waited), list(submitted), held
        finally:
            await jobs.close()

    waited, submitted, held = asyncio.run(scenario())
    assert waited == [False] * WAITERS  # each timed out waiting, none failed for want of a connection
    assert len(submitted) == 100 and all(len(ids) == 1 for ids in submitted)
    assert held <= WAITERS + 8  # a connection per waiter, and the commands' 8 (not one per submit)
