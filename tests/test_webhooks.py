"""Webhooks against a local receiver on loopback, with a real Redis, gateway and worker: signed
deliveries with a link to the image, retries while the receiver is down, delivery after the gateway
that took the job was killed, SSRF refusals, and no redirect followed."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.gateway.errors import InvalidField
from service.gateway.webhooks import SIGNATURE_HEADER, check_url, verify

from .gateway_env import GatewayProcess, write_tiny_own_model
from .redis_server import RedisServer
from .workers import WorkerProcess, wait_for

pytestmark = pytest.mark.slow
SECRET = "whsec-test"
ENV = {"LDM_WEBHOOK_SECRET": SECRET, "LDM_WEBHOOK_ALLOW": "127.0.0.1", "LDM_WEBHOOK_BACKOFF_S": "0.2"}
BODY = {"prompt": "a red circle", "steps": 3, "seed": 4}


class Receiver:
    """An HTTP server on loopback that records what it is sent; it can fail its first answers."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str], bytes]] = []
        self.accepted: list[tuple[dict[str, str], bytes]] = []  # (headers, body) answered 200
        self.fail_next = 0  # answer 503 this many times first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.calls.append((self.path, dict(self.headers), body))
                if self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", "/hook")
                elif receiver.fail_next > 0:
                    receiver.fail_next -= 1
                    self.send_response(503)
                else:
                    receiver.accepted.append((dict(self.headers), body))
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self, path: str = "/hook") -> list[dict[str, Any]]:
        return [json.loads(body) for p, _, body in self.calls if p == path]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[RedisServer, Path, Receiver]]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    model = write_tiny_own_model(tmp_path / "model")
    worker = WorkerProcess("w", server.url, {"tiny": model}, tmp_path).start()
    receiver = Receiver()
    try:
        worker.wait_ready(server.client())
        yield server, model, receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
        worker.stop()
        server.kill()


def submit(gateway: GatewayProcess, hook: str, **extra: Any) -> str:
    reply = httpx.post(
        f"{gateway.url}/v1/txt2img",
        json={**BODY, "webhook": {"url": hook, **extra}},
        headers={"Prefer": "respond-async"},
    )
    assert reply.status_code == 202, reply.text
    job_id: str = reply.json()["id"]
    return job_id


def test_a_signed_event_with_a_link_to_the_image(
    stack: tuple[RedisServer, Path, Receiver], tmp_path: Path
) -> None:
    server, model, receiver = stack
    gateway = GatewayProcess(server.url, {"tiny": model}, tmp_path, ENV).start()
    try:
        receiver.fail_next = 2  # down for a while: the event comes later
        job_id = submit(gateway, f"{receiver.url}/hook", events=["started", "succeeded"])
        wait_for(lambda: len(receiver.accepted) >= 2, 60, "the events")  # after two 503s
        assert sorted(json.loads(body)["event"] for _, body in receiver.accepted) == ["started", "succeeded"]
        [(headers, body)] = [(h, b) for h, b in receiver.accepted if json.loads(b)["event"] == "succeeded"]
        assert verify(SECRET, headers[SIGNATURE_HEADER], body)
        assert not verify("another secret", headers[SIGNATURE_HEADER], body)
        event = json.loads(body)
        assert (event["id"], event["status"], event["seed"]) == (job_id, "succeeded", 4)
        assert "b64" not in body.decode() and event["timings"]["inference_ms"] > 0
        image = httpx.get(event["image_url"])  # no Authorization header needed
        stored = httpx.get(f"{gateway.url}/v1/jobs/{job_id}", headers={"Accept": "image/png"})
        assert image.status_code == 200 and image.content == stored.content
        status = httpx.get(f"{gateway.url}/v1/jobs/{job_id}").json()["webhook"]
        assert status == {"attempts": 4, "last_status": "200", "delivered": 2}
        metrics = httpx.get(f"{gateway.url}/metrics").text
        assert 'ldm_webhook_deliveries_total{outcome="retrying"} 2.0' in metrics
    finally:
        gateway.stop()


def test_a_killed_gateway_s_events_are_delivered_after_a_restart(
    stack: tuple[RedisServer, Path, Receiver], tmp_path: Path
) -> None:
    server, model, receiver = stack
    first = GatewayProcess(server.url, {"tiny": model}, tmp_path / "a", ENV)
    (tmp_path / "a").mkdir()
    first.start()
    job_id = submit(first, f"{receiver.url}/hook")
    assert first.process is not None
    first.process.kill()  # between the job's end and its delivery: nobody delivers for now
    first.process.wait()
    client = server.client()
    wait_for(lambda: client.hget(f"ldm:job:{job_id}", "status") == b"succeeded", 60, "the job to end")
    time.sleep(0.5)
    assert receiver.events() == []
    (tmp_path / "b").mkdir()
    second = GatewayProcess(server.url, {"tiny": model}, tmp_path / "b", ENV).start()
    try:
        wait_for(lambda: receiver.events(), 30, "the delivery after the restart")
        assert [e["event"] for e in receiver.events()] == ["succeeded"]
    finally:
        second.stop()


def test_refused_urls_and_no_redirects(stack: tuple[RedisServer, Path, Receiver], tmp_path: Path) -> None:
    server, model, receiver = stack
    gateway = GatewayProcess(server.url, {"tiny": model}, tmp_path, ENV).start()
    try:
        for url in ("http://169.254.169.254/latest/meta-data", "http://127.0.0.2/hook", "ftp://127.0.0.1/x"):
            reply = httpx.post(f"{gateway.url}/v1/txt2img", json={**BODY, "webhook": {"url": url}})
            assert reply.status_code == 422 and reply.json()["detail"][0]["loc"] == ["body", "webhook", "url"]
        job_id = submit(gateway, f"{receiver.url}/redirect")
        wait_for(lambda: len(receiver.events("/redirect")) >= 2, 60, "two attempts")
        assert receiver.events("/hook") == []  # the 302 was not followed
        state = httpx.get(f"{gateway.url}/v1/jobs/{job_id}").json()["webhook"]
        assert state["last_status"] == "302" and state["delivered"] == 0
    finally:
        gateway.stop()


def test_the_allow_list_and_private_addresses() -> None:
    async def refused(url: str, allow: list[str]) -> str:
        try:
            await check_url(url, allow)
        except InvalidField as e:
            return e.detail
        return ""

    assert asyncio.run(refused("http://127.0.0.1:9/x", ["127.0.0.1"])) == ""  # named exactly
    assert "not in LDM_WEBHOOK_ALLOW" in asyncio.run(refused("http://127.0.0.1:9/x", []))
    assert "private address" in asyncio.run(refused("http://127.0.0.1:9/x", [".0.0.1"]))  # suffix: no
    assert asyncio.run(refused("http://localhost:9/x", ["localhost"])) == ""
    assert "not in LDM_WEBHOOK_ALLOW" in asyncio.run(refused("http://169.254.169.254/", ["127.0.0.1"]))
    assert "http or https" in asyncio.run(refused("file:///etc/passwd", ["127.0.0.1"]))
