"""A request that waits for its images takes each job's answer from the list the protocol pushes it to
(`keys.reply`, BLPOP): woken once per job, not by every progress event, with no read after. Real
gateway and worker processes and a real Redis; Redis's own command counts show what the gateway did."""

from __future__ import annotations

import base64
import concurrent.futures
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from service.queue import keys
from service.queue.scripts import REPLY_TTL_S
from service.queue.store import JobStore

from .gateway_env import GatewayProcess, tiny_stack
from .workers import SPEC, job, wait_for

pytestmark = pytest.mark.slow
MODEL = "tiny"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, redis.Redis]]:
    with tiny_stack(tmp_path_factory.mktemp("answers"), MODEL) as (gateway, server):
        yield gateway, server.client()


def calls(client: redis.Redis) -> dict[str, int]:
    stats: Any = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def test_a_waiting_request_is_woken_once_per_job(stack: tuple[GatewayProcess, redis.Redis]) -> None:
    gateway, client = stack
    before = calls(client)
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        # 12 steps: the test worker publishes progress at every one, which a follower of the events
        # would wake for.
        reply = http.post("/v1/txt2img", json={"prompt": "a red circle", "n": 2, "steps": 12, "seed": 5})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert [image["seed"] for image in body["images"]] == [5, 6]
    assert all(base64.b64decode(image["png_base64"]).startswith(b"\x89PNG") for image in body["images"])
    assert body["timings"]["inference_ms"] > 0 and body["timings"]["total_ms"] > 0
    after = calls(client)
    delta = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    assert delta.get("xread", 0) == 0, delta  # no event followed
    assert delta.get("hgetall", 0) == 0, delta  # nothing read after (GET counts the scripts' own)
    assert 1 <= delta.get("blpop", 0) <= 2 + 2, delta  # a wake per job (plus an empty 5 s tick at most)
    assert not client.keys(keys.reply("*")), "a taken answer leaves nothing behind"
    for job_id in body["job_ids"]:
        assert client.hget(keys.job(job_id), "reply") is None


def test_an_answer_nobody_takes_expires(stack: tuple[GatewayProcess, redis.Redis]) -> None:
    _, client = stack
    store = JobStore(client)
    (waited,) = store.enqueue_many(MODEL, [job(SPEC)], reply=True)
    (not_waited,) = store.enqueue_many(MODEL, [job(SPEC)])
    for job_id in (waited, not_waited):
        wait_for(lambda j=job_id: (s := store.get(j)) is not None and s.status.terminal, 60, f"job {job_id}")
    head, png = client.lpop(keys.reply(waited)).split(b"\n", 1)  # type: ignore[union-attr]
    fields = json.loads(head)
    assert fields["id"] == waited and fields["status"] == "succeeded" and fields["model"] == MODEL
    assert float(fields["finished"]) >= float(fields["started"]) >= float(fields["created"]) > 0
    assert png == store.result(waited) and png.startswith(b"\x89PNG")
    assert not client.exists(keys.reply(not_waited)), "only a request that waits gets answers"
    (unread,) = store.enqueue_many(MODEL, [job(SPEC)], reply=True)
    wait_for(lambda: client.exists(keys.reply(unread)), 60, "the answer")
    assert 0 < client.ttl(keys.reply(unread)) <= REPLY_TTL_S


def test_a_cancelled_job_answers_its_waiting_request(stack: tuple[GatewayProcess, redis.Redis]) -> None:
    gateway, client = stack
    with (
        httpx.Client(base_url=gateway.url, timeout=60) as http,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        body = {"prompt": "a long job", "steps": 150, "seed": 1}  # long enough to cancel while it runs
        waiting = pool.submit(http.post, "/v1/txt2img", json=body)

        def running() -> str | None:
            for job_id in client.zrange(keys.owner_jobs("anonymous"), 0, -1):
                if client.hget(keys.job(job_id.decode()), "status") == b"running":
                    return str(job_id.decode())
            return None

        job_id = wait_for(running, 60, "the job to run")
        assert http.delete(f"/v1/jobs/{job_id}").status_code == 200
        reply = waiting.result(timeout=30)
    assert reply.status_code == 409, reply.text
    assert job_id in reply.text
