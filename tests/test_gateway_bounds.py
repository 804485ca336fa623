"""The gateway's bounds on what it takes in, with no worker: the backlog's bytes (503 + Retry-After /
RESOURCE_EXHAUSTED, naming LDM_MAX_BACKLOG_BYTES), a 100 MB body refused from its Content-Length
before any of it is read, a chunked body cut off at LDM_MAX_BODY_BYTES, a gRPC message past the same
bound, and a 13000 x 13000 PNG bomb, as image or mask, refused from its header on gRPC too."""

from __future__ import annotations

import base64
import io
import random
import socket
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest
from PIL import Image

from service.gateway.grpc_gen import ldm_pb2 as pb
from service.gateway.grpc_gen import ldm_pb2_grpc as pb_grpc
from service.queue import keys

from .burst import rss_bytes
from .gateway_env import GatewayProcess, write_tiny_own_model
from .redis_server import RedisServer
from .test_gateway_limits import BOMB, PNG

pytestmark = pytest.mark.slow
MAX_BODY = 1024 * 1024
ENV = {
    "LDM_MAX_BACKLOG_BYTES": "2000",
    "LDM_MAX_BODY_BYTES": str(MAX_BODY),
    "LDM_RETRY_AFTER_S": "3",
    "LDM_EXPIRY_SWEEP_S": "60",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), appendfsync="no")
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def gateway(server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    folder = tmp_path_factory.mktemp("gateway")
    model = write_tiny_own_model(folder / "model")
    gateway = GatewayProcess(server.url, {"tiny": model, "other": model}, folder, ENV).start()
    yield gateway
    gateway.stop()
    print(gateway.log()[-3000:])


def noise_png(side: int) -> bytes:
    image = Image.frombytes("RGB", (side, side), random.Random(side).randbytes(side * side * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_backlog_bytes_bound_answers_503_with_retry_after(
    gateway: GatewayProcess, server: RedisServer
) -> None:
    image = base64.b64encode(noise_png(32)).decode()  # about 3 kB: more than the bound alone
    body = {"prompt": "x", "init_image": image, "model": "tiny"}
    async_ = {"Prefer": "respond-async"}
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        first = http.post("/v1/img2img", json=body, headers=async_)
        assert first.status_code == 202, first.text  # a lone request always fits
        for path, refused in (("/v1/img2img", body), ("/v1/txt2img", {"prompt": "x", "model": "tiny"})):
            reply = http.post(path, json=refused, headers=async_)
            assert reply.status_code == 503 and reply.headers["retry-after"] == "3", reply.text
            assert "LDM_MAX_BACKLOG_BYTES = 2000" in reply.json()["detail"]
        with grpc.insecure_channel(gateway.grpc_target) as channel:
            with pytest.raises(grpc.RpcError) as error:
                pb_grpc.ImagesStub(channel).Generate(pb.GenerateRequest(prompt="x", model="tiny"), timeout=10)
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "LDM_MAX_BACKLOG_BYTES" in (error.value.details() or "")
        other = {"prompt": "x", "model": "other"}
        assert http.post("/v1/txt2img", json=other, headers=async_).status_code == 202  # a bound per model
        http.delete(f"/v1/jobs/{first.json()['id']}")  # its bytes given back: room again
        reply = http.post("/v1/txt2img", json={"prompt": "x", "model": "tiny"}, headers=async_)
        assert reply.status_code == 202
        metrics = http.get("/metrics").text
    assert 'ldm_jobs_rejected_total{reason="queue_bytes_full"} 3.0' in metrics
    assert server.client().xlen(keys.jobs("tiny")) == 1


def raw_request(gateway: GatewayProcess, head: str) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", gateway.http_port), timeout=10)
    conn.sendall(head.encode())
    return conn


def test_a_100_mb_body_gets_413_before_it_is_sent(gateway: GatewayProcess) -> None:
    rss = rss_bytes(gateway.pid)
    conn = raw_request(
        gateway,
        "POST /v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {100 * 1024 * 1024}\r\n\r\n",
    )
    with conn:
        conn.sendall(b'{"prompt": "' + b"x" * 1000)  # 1 kB of the 100 MB, and no more
        started = time.monotonic()
        answer = conn.recv(65536)
        assert answer.startswith(b"HTTP/1.1 413"), answer
        assert time.monotonic() - started < 2  # answered at once: nothing waited for the rest
        assert f"larger than {MAX_BODY} bytes".encode() in answer + conn.recv(65536)
    assert rss_bytes(gateway.pid) - rss < 10 * 1024 * 1024


def test_a_chunked_body_is_cut_off_at_the_bound(gateway: GatewayProcess, server: RedisServer) -> None:
    before = server.client().xlen(keys.jobs("other"))
    conn = raw_request(
        gateway,
        "POST /v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n",
    )
    chunk = 64 * 1024
    sent, answer = 0, b""
    with conn:
        conn.settimeout(0.05)
        while sent < 100 * 1024 * 1024 and not answer:
            try:
                conn.sendall(f"{chunk:x}\r\n".encode() + b"x" * chunk + b"\r\n")
                sent += chunk
                answer = conn.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                conn.settimeout(5)
                answer = conn.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert sent < 32 * 1024 * 1024  # stopped near the bound (plus what the sockets buffer), not at 100 MB
    assert server.client().xlen(keys.jobs("other")) == before


def test_grpc_messages_past_the_body_bound_are_refused(gateway: GatewayProcess) -> None:
    with grpc.insecure_channel(gateway.grpc_target) as channel:
        stub = pb_grpc.ImagesStub(channel)
        big = pb.GenerateRequest(prompt="x", model="other", init_image=b"\x89PNG" + bytes(MAX_BODY))
        with pytest.raises(grpc.RpcError) as error:
            stub.Generate(big, timeout=10)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        bomb, png = base64.b64decode(BOMB), base64.b64decode(PNG)
        for request, field in (
            (pb.GenerateRequest(prompt="x", model="other", init_image=bomb), "init_image"),
            (pb.GenerateRequest(prompt="x", model="other", init_image=png, mask=bomb), "mask"),
        ):
            with pytest.raises(grpc.RpcError) as error:
                stub.Generate(request, timeout=10)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            details = error.value.details() or ""
            assert details.startswith(field) and "13000x13000" in details, details  # from the header
