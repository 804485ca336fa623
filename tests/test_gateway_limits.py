"""Refusals, limits and auth, with no worker running: invalid input (422 / INVALID_ARGUMENT, nothing
enqueued), bodies too large (413), a full queue (429 + Retry-After / RESOURCE_EXHAUSTED), a wait past
the request timeout (504 / DEADLINE_EXCEEDED, the job goes on), API keys (401, other keys' jobs 404)."""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from service.gateway.grpc_gen import ldm_pb2 as pb
from service.gateway.grpc_gen import ldm_pb2_grpc as pb_grpc
from service.queue import keys

from .gateway_env import GatewayProcess, write_tiny_own_model
from .redis_server import RedisServer

pytestmark = pytest.mark.slow
MODELS = ("tiny", "busy", "slow")  # one file under three names, so that each test has a stream of its own
LIMITS = {
    "LDM_MAX_BACKLOG": "3",
    "LDM_REQUEST_TIMEOUT_S": "0.5",
    "LDM_MAX_BODY_BYTES": "65536",
    "LDM_MAX_N": "4",
    "LDM_MAX_STEPS": "50",
    "LDM_MAX_PROMPT_CHARS": "200",
    "LDM_MAX_PIXELS": "4096",
    "LDM_RETRY_AFTER_S": "7",
    "LDM_SSE_KEEPALIVE_S": "0.2",
}
PNG = base64.b64encode(bytes.fromhex(  # a 1x1 black PNG
    "89504e470d0a1a0a0000000d4948445200000001000000010800000000"
    "3a7e9b550000000a49444154789c63600000000200015e2b0fa50000000049454e44ae426082"
)).decode()  # fmt: skip
# A PNG bomb: a header saying 13000 x 13000 (169 Mpx), refused from the header, nothing decoded.
BOMB = base64.b64encode(
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
    + (13000).to_bytes(4, "big") * 2
    + b"\x08\x02\x00\x00\x00"
    + bytes(64)
).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_own_model(tmp_path_factory.mktemp("model"))


def start_gateway(server: RedisServer, model: Path, folder: Path, env: dict[str, str]) -> GatewayProcess:
    return GatewayProcess(server.url, dict.fromkeys(MODELS, model), folder, env).start()


@pytest.fixture(scope="module")
def gateway(
    server: RedisServer, model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    gateway = start_gateway(server, model, tmp_path_factory.mktemp("gateway"), LIMITS)
    yield gateway
    gateway.stop()
    print(gateway.log()[-3000:])


@pytest.fixture(scope="module")
def secured(
    server: RedisServer, model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    env = {"LDM_API_KEYS": "key-one, key-two", "LDM_REQUEST_TIMEOUT_S": "0.5"}
    gateway = start_gateway(server, model, tmp_path_factory.mktemp("secured"), env)
    yield gateway
    gateway.stop()


def queue_state(server: RedisServer) -> tuple[list[int], int]:
    client = server.client()
    return [int(client.xlen(keys.jobs(m))) for m in MODELS], len(list(client.scan_iter("ldm:job:*")))


T2I = "/v1/txt2img"
I2I = "/v1/img2img"
INVALID: list[tuple[str, Any, int, str]] = [  # path, JSON body (or raw bytes), status, field named
    (T2I, {}, 422, "prompt"),
    (T2I, {"prompt": ""}, 422, "prompt"),
    (T2I, {"prompt": "   "}, 422, "prompt"),
    (T2I, {"prompt": "x" * 201}, 422, "prompt"),
    (T2I, {"prompt": "x", "negative_prompt": "y" * 201}, 422, "negative_prompt"),
    (T2I, {"prompt": 123}, 422, "prompt"),
    (T2I, {"prompt": "x", "width": 33}, 422, "width"),
    (T2I, {"prompt": "x", "width": 0}, 422, "width"),
    (T2I, {"prompt": "x", "height": 4096}, 422, "height"),
    (T2I, {"prompt": "x", "width": "32"}, 422, "width"),
    (T2I, {"prompt": "x", "width": 128, "height": 128}, 422, "width"),  # past LDM_MAX_PIXELS
    (T2I, {"prompt": "x", "steps": 0}, 422, "steps"),
    (T2I, {"prompt": "x", "steps": 51}, 422, "steps"),
    (T2I, {"prompt": "x", "guidance_scale": -1}, 422, "guidance_scale"),
    (T2I, {"prompt": "x", "guidance_scale": 51}, 422, "guidance_scale"),
    (T2I, b'{"prompt": "x", "guidance_scale": NaN}', 422, "guidance_scale"),
    (T2I, {"prompt": "x", "sampler": "plms"}, 422, "sampler"),
    (T2I, {"prompt": "x", "seed": -1}, 422, "seed"),
    (T2I, {"prompt": "x", "seed": 2**63}, 422, "seed"),
    (T2I, {"prompt": "x", "seed": 2**63 - 1, "n": 2}, 422, "seed"),
    (T2I, {"prompt": "x", "n": 0}, 422, "n"),
    (T2I, {"prompt": "x", "n": 5}, 422, "n"),
    (T2I, {"prompt": "x", "eta": 2}, 422, "eta"),
    (T2I, {"prompt": "x", "model": "no such model!"}, 422, "model"),
    (T2I, {"prompt": "x", "model": "nope"}, 404, ""),
    (T2I, {"prompt": "x", "colour": "red"}, 422, "colour"),
    (T2I, b'{"prompt": "x"', 422, ""),
    (T2I, b'["prompt"]', 422, ""),
    (I2I, {"prompt": "x"}, 422, "init_image"),
    (I2I, {"prompt": "x", "init_image": "not base64!"}, 422, "init_image"),
    (I2I, {"prompt": "x", "init_image": base64.b64encode(b"GIF89a" + bytes(40)).decode()}, 422, "init_image"),
    (I2I, {"prompt": "x", "init_image": PNG, "strength": 1.5}, 422, "strength"),
    (I2I, {"prompt": "x", "init_image": PNG, "mask": base64.b64encode(b"nope").decode()}, 422, "mask"),
    (I2I, {"prompt": "x", "init_image": PNG}, 422, "width"),  # 1x1 is no multiple of 2
    (I2I, {"prompt": "x", "init_image": BOMB, "width": 32, "height": 32}, 422, "init_image"),
    (I2I, {"prompt": "x", "init_image": PNG, "mask": BOMB, "width": 32, "height": 32}, 422, "mask"),
    (T2I, {"prompt": "x", "steps": 10**6}, 422, "steps"),
    (T2I, {"prompt": "x", "loras": [{"name": "none-here"}]}, 404, ""),
]


def test_invalid_requests_are_refused_and_nothing_is_enqueued(
    gateway: GatewayProcess, server: RedisServer
) -> None:
    before = queue_state(server)
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        for path, body, status, field in INVALID:
            if isinstance(body, bytes):
                reply = http.post(path, content=body, headers={"Content-Type": "application/json"})
            else:
                reply = http.post(path, json=body)
            assert reply.status_code == status, (body, reply.text)
            if field:
                assert field in reply.json()["detail"][0]["loc"], (body, reply.text)
        reply = http.post(T2I, json={"prompt": "x", "n": 2}, headers={"Accept": "image/png"})
        assert reply.status_code == 422 and reply.json()["detail"][0]["loc"] == ["body", "n"]
        reply = http.post(T2I, content=b"prompt=x", headers={"Content-Type": "text/plain"})
        assert reply.status_code == 422
        assert http.get("/v1/jobs/0123").status_code == 404
        assert http.get(f"/v1/jobs/{'a' * 32}").status_code == 404
        assert http.delete(f"/v1/jobs/{'a' * 32}").status_code == 404
        assert http.get(f"/v1/jobs/{'a' * 32}/events").status_code == 404
    assert len(INVALID) >= 20
    assert queue_state(server) == before
    metrics = httpx.get(f"{gateway.url}/metrics").text
    assert 'ldm_jobs_rejected_total{reason="invalid"}' in metrics
    assert 'ldm_jobs_rejected_total{reason="unknown_model"} 1.0' in metrics


def test_bodies_past_the_bound_get_413_unread(gateway: GatewayProcess, server: RedisServer) -> None:
    before = queue_state(server)
    reply = httpx.post(f"{gateway.url}{T2I}", json={"prompt": "x" * 70_000})
    assert reply.status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}'

    reply = httpx.post(f"{gateway.url}{T2I}", content=chunks(), headers={"Content-Type": "application/json"})
    assert reply.status_code == 413
    assert queue_state(server) == before


def test_jobs_are_accepted_without_workers_until_the_backlog_is_full(
    gateway: GatewayProcess, server: RedisServer
) -> None:
    async_ = {"Prefer": "respond-async"}
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        ids = [
            http.post(T2I, json={"prompt": "x", "model": "busy"}, headers=async_).json()["id"]
            for _ in range(3)
        ]
        assert [http.get(f"/v1/jobs/{i}").json()["queue_position"] for i in ids] == [0, 1, 2]
        started = time.monotonic()
        reply = http.post(T2I, json={"prompt": "x", "model": "busy"})
        assert reply.status_code == 429 and reply.headers["retry-after"] == "7"
        assert time.monotonic() - started < 1.0  # answered at once, not after the request timeout
        http.delete(f"/v1/jobs/{ids[0]}")  # one slot free: a request for 2 images is refused whole
        reply = http.post(T2I, json={"prompt": "x", "model": "busy", "n": 2}, headers=async_)
        assert reply.status_code == 429
        assert server.client().xlen(keys.jobs("busy")) == 2
    with grpc.insecure_channel(gateway.grpc_target) as channel:
        with pytest.raises(grpc.RpcError) as error:
            pb_grpc.ImagesStub(channel).Generate(
                pb.GenerateRequest(prompt="x", model="busy", n=2), timeout=10
            )
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert server.client().xlen(keys.jobs("busy")) == 2
    assert 'ldm_jobs_rejected_total{reason="queue_full"} 3.0' in httpx.get(f"{gateway.url}/metrics").text


def test_a_wait_past_the_request_timeout_answers_504_and_the_job_goes_on(gateway: GatewayProcess) -> None:
    started = time.monotonic()
    reply = httpx.post(f"{gateway.url}{T2I}", json={"prompt": "x", "model": "slow"}, timeout=10)
    assert reply.status_code == 504 and 0.5 <= time.monotonic() - started < 3
    (job_id,) = reply.json()["job_ids"]
    assert reply.headers["location"] == f"/v1/jobs/{job_id}"
    assert httpx.get(f"{gateway.url}/v1/jobs/{job_id}").json()["status"] == "queued"
    with httpx.stream("GET", f"{gateway.url}/v1/jobs/{job_id}/events", timeout=10) as events:
        lines = events.iter_lines()
        assert [next(lines) for _ in range(3)][1] == "event: queued"
        assert ": keepalive" in [next(lines) for _ in range(3)]  # a quiet stream stays open
    with grpc.insecure_channel(gateway.grpc_target) as channel:
        stub = pb_grpc.ImagesStub(channel)
        with pytest.raises(grpc.RpcError) as error:  # the gateway's own timeout: the job ids come back
            stub.Generate(pb.GenerateRequest(prompt="x", model="slow"), timeout=10)
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        trailers = dict(error.value.trailing_metadata() or ())
        assert len(trailers["ldm-job-ids"]) == 32
        with pytest.raises(grpc.RpcError) as error:  # the caller's shorter deadline
            list(stub.GenerateStream(pb.GenerateRequest(prompt="x", model="slow"), timeout=0.3))
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


GRPC_INVALID = [
    (pb.GenerateRequest(prompt=""), "prompt"),
    (pb.GenerateRequest(prompt="x", width=33), "width"),
    (pb.GenerateRequest(prompt="x", steps=0), "steps"),
    (pb.GenerateRequest(prompt="x", sampler="plms"), "sampler"),
    (pb.GenerateRequest(prompt="x", n=5), "n"),
    (pb.GenerateRequest(prompt="x", guidance_scale=float("nan")), "guidance_scale"),
    (pb.GenerateRequest(prompt="x", init_image=b"not a png"), "init_image"),
    (pb.GenerateRequest(prompt="x", mask=base64.b64decode(PNG)), "mask"),
]


def test_grpc_refusals(gateway: GatewayProcess, server: RedisServer) -> None:
    before = queue_state(server)
    with grpc.insecure_channel(gateway.grpc_target) as channel:
        stub = pb_grpc.ImagesStub(channel)
        for request, field in GRPC_INVALID:
            for call in (stub.Generate, lambda r, **kw: list(stub.GenerateStream(r, **kw))):
                with pytest.raises(grpc.RpcError) as error:
                    call(request, timeout=10)
                assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
                assert (error.value.details() or "").startswith(field), error.value.details()
        with pytest.raises(grpc.RpcError) as error:
            stub.Generate(pb.GenerateRequest(prompt="x", model="nope"), timeout=10)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as error:
            stub.GetJob(pb.GetJobRequest(id="a" * 32), timeout=10)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert queue_state(server) == before


def test_auth_matrix(secured: GatewayProcess, server: RedisServer) -> None:
    one, two = ({"Authorization": f"Bearer {key}"} for key in ("key-one", "key-two"))
    body = {"prompt": "x", "model": "slow"}
    with httpx.Client(base_url=secured.url, timeout=10) as http:
        before = queue_state(server)
        for headers in ({}, {"Authorization": "Bearer key-three"}, {"Authorization": "Basic a2V5LW9uZQ=="}):
            reply = http.post(T2I, json=body, headers={"Prefer": "respond-async", **headers})
            assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Bearer"
        assert queue_state(server) == before
        reply = http.post(T2I, json=body, headers={"Prefer": "respond-async", **one})
        assert reply.status_code == 202
        job_id = reply.json()["id"]
        assert http.get(f"/v1/jobs/{job_id}", headers=one).json()["status"] == "queued"
        assert http.get(f"/v1/jobs/{job_id}").status_code == 401
        assert http.get(f"/v1/jobs/{job_id}", headers=two).status_code == 404
        assert http.delete(f"/v1/jobs/{job_id}", headers=two).status_code == 404
        assert http.get(f"/v1/jobs/{job_id}/events", headers=two).status_code == 404
        assert (
            http.get("/v1/models").status_code == 401
            and http.get("/v1/models", headers=two).status_code == 200
        )
        assert [http.get(p).status_code for p in ("/healthz", "/readyz", "/metrics", "/openapi.json")] == [
            200
        ] * 4
    # The owner is the key's digest, never the key.
    fields = {
        k.decode(): v.decode(errors="replace") for k, v in server.client().hgetall(keys.job(job_id)).items()
    }
    assert fields["owner"] == hashlib.sha256(b"key-one").hexdigest()
    assert not any("key-one" in value for value in fields.values())
    with grpc.insecure_channel(secured.grpc_target) as channel:
        stub = pb_grpc.ImagesStub(channel)
        for metadata in ((), (("authorization", "Bearer nope"),)):
            with pytest.raises(grpc.RpcError) as error:
                stub.GetJob(pb.GetJobRequest(id=job_id), metadata=metadata, timeout=10)
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as error:
            stub.GetJob(
                pb.GetJobRequest(id=job_id), metadata=(("authorization", "Bearer key-two"),), timeout=10
            )
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        job = stub.CancelJob(pb.CancelJobRequest(id=job_id), metadata=(("authorization", "Bearer key-one"),))
        assert job.status == "cancelled"
