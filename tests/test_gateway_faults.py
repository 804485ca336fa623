"""What the gateway answers when Redis misbehaves, with no worker: an answer always carries the job ids
it knows (a blind retry would run accepted jobs twice), `Idempotency-Key` makes a retry safe, and Redis
refusing writes (out of memory) is a 503 with Retry-After, never a 500."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from service.gateway.grpc_gen import ldm_pb2 as pb
from service.gateway.grpc_gen import ldm_pb2_grpc as pb_grpc
from service.queue import keys

from .gateway_env import GatewayProcess, write_tiny_own_model
from .redis_server import RedisServer

pytestmark = pytest.mark.slow
BODY = {"prompt": "a red circle", "steps": 2, "n": 2}


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[RedisServer, GatewayProcess]]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    model = write_tiny_own_model(tmp_path / "model")
    gateway = GatewayProcess(server.url, {"tiny": model}, tmp_path, {"LDM_REQUEST_TIMEOUT_S": "20"})
    try:
        yield server, gateway.start()
    finally:
        gateway.stop()
        server.kill()
        print(gateway.log()[-3000:])


def test_an_idempotency_key_enqueues_once(stack: tuple[RedisServer, GatewayProcess]) -> None:
    server, gateway = stack
    headers = {"Prefer": "respond-async", "Idempotency-Key": "order-17"}
    first = httpx.post(f"{gateway.url}/v1/txt2img", json=BODY, headers=headers)
    again = httpx.post(f"{gateway.url}/v1/txt2img", json=BODY, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json()["jobs"] == first.json()["jobs"]  # the same ids, and the seeds they run with
    assert server.client().xlen(keys.jobs("tiny")) == 2
    # The key reused with another body (n = 3, no seed: a new random one): still the first call's
    # jobs and seeds (was a 500: three seeds against two ids).
    other = httpx.post(f"{gateway.url}/v1/txt2img", json=BODY | {"n": 3}, headers=headers)
    assert other.status_code == 202 and other.json()["jobs"] == first.json()["jobs"], other.text
    assert server.client().xlen(keys.jobs("tiny")) == 2
    with grpc.insecure_channel(gateway.grpc_target) as channel:  # the same on gRPC (metadata)
        stub = pb_grpc.ImagesStub(channel)
        metadata = (("idempotency-key", "grpc-1"),)
        for _ in range(2):
            with pytest.raises(grpc.RpcError):
                stub.Generate(pb.GenerateRequest(prompt="x", steps=2), timeout=0.5, metadata=metadata)
    assert server.client().xlen(keys.jobs("tiny")) == 3


def test_redis_out_of_memory_is_503_with_retry_after(stack: tuple[RedisServer, GatewayProcess]) -> None:
    server, gateway = stack
    client = server.client()
    client.config_set("maxmemory", 1)  # every write refused: OOM
    try:
        reply = httpx.post(f"{gateway.url}/v1/txt2img", json=BODY, headers={"Prefer": "respond-async"})
    finally:
        client.config_set("maxmemory", 0)
    assert reply.status_code == 503 and "Retry-After" in reply.headers, reply.text
    assert len(reply.json()["job_ids"]) == 2  # it does not know whether they went in: it says which
    assert client.xlen(keys.jobs("tiny")) == 0
    for job_id in reply.json()["job_ids"]:
        assert httpx.get(f"{gateway.url}/v1/jobs/{job_id}").status_code == 404  # so: not enqueued


def test_redis_lost_during_a_wait_answers_the_job_ids(stack: tuple[RedisServer, GatewayProcess]) -> None:
    server, gateway = stack
    answers: list[httpx.Response] = []
    waiting = threading.Thread(
        target=lambda: answers.append(httpx.post(f"{gateway.url}/v1/txt2img", json=BODY, timeout=60))
    )
    waiting.start()
    client = server.client()
    deadline = time.monotonic() + 10
    # Enqueued and remembered as the caller's (the submit's last write): killed earlier, the submit
    # itself fails, a 503 to retry with the same Idempotency-Key (it was 1 run in about 10 here).
    while client.zcard(keys.owner_jobs("")) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.kill()  # the jobs were accepted (and would run on once Redis is back)
    waiting.join(timeout=60)
    [reply] = answers
    assert reply.status_code == 503, reply.text
    assert len(reply.json()["job_ids"]) == 2 and reply.headers["x-should-retry"] == "false"
    assert reply.headers["location"] == f"/v1/jobs/{reply.json()['job_ids'][0]}"


def test_an_overdue_job_expires_with_no_worker_alive(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    model = write_tiny_own_model(tmp_path / "model")
    env = {"LDM_JOB_TIMEOUT_S": "0.5", "LDM_EXPIRY_SWEEP_S": "0.2"}
    gateways = [GatewayProcess(server.url, {"tiny": model}, tmp_path, env).start() for _ in range(2)]
    try:
        reply = httpx.post(f"{gateways[0].url}/v1/txt2img", json=BODY, headers={"Prefer": "respond-async"})
        ids = [j["id"] for j in reply.json()["jobs"]]
        with httpx.stream("GET", f"{gateways[1].url}/v1/jobs/{ids[0]}/events", timeout=10) as events:
            types = [
                line.removeprefix("event: ") for line in events.iter_lines() if line.startswith("event:")
            ]
        assert types == ["queued", "expired"]  # the stream ends
        for job_id in ids:
            state = httpx.get(f"{gateways[0].url}/v1/jobs/{job_id}").json()
            assert state["status"] == "expired" and state["error"] == "deadline passed before the job started"
        assert server.client().xlen(keys.jobs("tiny")) == 0
        logs = "".join(g.log() for g in gateways)
        assert logs.count("queued jobs expired") >= 1
    finally:
        for gateway in gateways:
            gateway.stop()
        server.kill()


def test_the_gateway_is_back_as_soon_as_redis_is(stack: tuple[RedisServer, GatewayProcess]) -> None:
    """Redis SIGKILLed under waiting requests and started again from its files: the gateway's pooled
    connections are all dead then, and none of them may answer a request after Redis is back (an
    earlier run saw 503s for 8 to 87 s)."""
    server, gateway = stack
    async_headers = {"Prefer": "respond-async"}
    ids = [
        httpx.post(f"{gateway.url}/v1/txt2img", json=BODY, headers=async_headers).json()["id"]
        for _ in range(4)
    ]

    def follow(job_id: str) -> None:  # holds a pooled connection in XREAD BLOCK when Redis dies
        with contextlib.suppress(httpx.HTTPError):  # the stream breaks off with Redis
            httpx.get(f"{gateway.url}/v1/jobs/{job_id}/events", timeout=30)

    waits = [threading.Thread(target=follow, args=(job_id,)) for job_id in ids]
    for thread in waits:
        thread.start()
    time.sleep(1.0)
    server.restart(down_s=1.0)  # SIGKILL, then the same port and files
    back = time.monotonic()
    answers = [
        httpx.post(f"{gateway.url}/v1/txt2img", json=BODY, headers=async_headers).status_code
        for _ in range(20)
    ]
    assert answers == [202] * 20, answers
    assert httpx.get(f"{gateway.url}/readyz").status_code == 200
    assert all(httpx.get(f"{gateway.url}/v1/jobs/{job_id}").status_code == 200 for job_id in ids)
    assert time.monotonic() - back < 10
    server.kill()  # ends the waits (their streams fail)
    for thread in waits:
        thread.join(timeout=30)


def test_an_event_stream_ends_cleanly_when_redis_goes(stack: tuple[RedisServer, GatewayProcess]) -> None:
    """The SSE headers are sent: when Redis goes away the stream ends as a stream (a comment and
    `retry:`, so EventSource reconnects with Last-Event-ID), not as a broken chunked body with an
    ASGI error in the gateway's log; resumed after Redis is back, it goes on from the last event."""
    server, gateway = stack
    reply = httpx.post(f"{gateway.url}/v1/txt2img", json=BODY, headers={"Prefer": "respond-async"})
    job_id = reply.json()["id"]
    lines: list[str] = []
    with httpx.stream("GET", f"{gateway.url}/v1/jobs/{job_id}/events", timeout=30) as events:
        for line in events.iter_lines():  # raises on a broken body
            lines.append(line)
            if line.startswith("event: queued"):
                server.kill()
    assert "retry: 1000" in lines and any("the job goes on" in line for line in lines), lines
    last = [line.removeprefix("id: ") for line in lines if line.startswith("id: ")][-1]
    server.start()
    httpx.delete(f"{gateway.url}/v1/jobs/{job_id}")
    headers = {"Last-Event-ID": last}
    with httpx.stream("GET", f"{gateway.url}/v1/jobs/{job_id}/events", headers=headers, timeout=30) as events:
        types = [line.removeprefix("event: ") for line in events.iter_lines() if line.startswith("event:")]
    assert types == ["cancelled"]
    assert "Exception in ASGI application" not in gateway.log()
