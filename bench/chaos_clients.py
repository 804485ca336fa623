"""The clients of `bench/chaos.py`: requests as a careful client sends them (an Idempotency-Key on
each, retried with the same key on 429/503 without accepted jobs and on a dropped connection; jobs
that an answer names are followed by id, never submitted again), and what they were answered.

A request is synchronous (`POST /v1/txt2img` waits for the images) or asynchronous (`Prefer:
respond-async`, then each job's server-sent events until its terminal one); n = 1..4; some are
img2img. An answer that names jobs (200, 202, 502, 503 or 504 with `job_ids`) makes them
*accepted*: each must end exactly once."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
from PIL import Image

from service.worker.faults import POISON_PROMPT

PROMPTS = [
    "a red circle on the left",
    "a blue square at the top",
    "a green triangle in the middle",
    "a yellow circle and a red square",
]
SUBMIT_PATIENCE_S = 180.0  # a request's retries (Redis down, failing over) give up after this


@dataclass(frozen=True)
class Plan:
    index: int
    sync: bool
    n: int
    img2img: bool
    poison: bool
    body: dict[str, Any]

    @property
    def path(self) -> str:
        return "/v1/img2img" if self.img2img else "/v1/txt2img"


def plans(jobs: int, rng: random.Random, poison: int) -> list[Plan]:
    """Requests whose n add up to `jobs`: half synchronous, one in eight img2img, `poison` of them
    (n = 1) a prompt that breaks every step it is in (test faults), which must fail, and nothing else."""
    init = _init_image()
    out: list[Plan] = []
    first = max(1, jobs // 4)  # requests average 2.5 jobs: there are more requests than this
    poisoned = set(rng.sample(range(first), min(poison, first)))
    left = jobs
    while left > 0:
        i = len(out)
        is_poison = i in poisoned
        n = 1 if is_poison else min(left, rng.randint(1, 4))
        img2img = not is_poison and rng.random() < 0.125
        body: dict[str, Any] = {
            "prompt": POISON_PROMPT if is_poison else rng.choice(PROMPTS),
            "steps": rng.randint(2, 4),
            "seed": rng.randrange(2**31),
            "n": n,
        }
        if img2img:
            body |= {"init_image": init, "strength": 0.6}
        out.append(Plan(i, rng.random() < 0.5, n, img2img, is_poison, body))
        left -= n
    return out


def _init_image() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@dataclass
class Record:
    """What the clients saw."""

    accepted: dict[str, str] = field(default_factory=dict)  # job id -> the answer that named it
    maybe: set[str] = field(default_factory=set)  # named by a 503 from submit: enqueued or not
    poison: set[str] = field(default_factory=set)
    terminal: dict[str, str] = field(default_factory=dict)  # job id -> the terminal event followed
    images: Counter[str] = field(default_factory=Counter)  # job id -> images answered for it
    answers: Counter[str] = field(default_factory=Counter)  # "200", "503 with ids", ...
    hidden: list[str] = field(default_factory=list)  # jobs enqueued by an answer that did not name them
    dropped: list[str] = field(default_factory=list)  # jobs enqueued by a send whose answer never came
    gave_up: list[str] = field(default_factory=list)  # requests never accepted
    accepts: list[float] = field(default_factory=list)  # when each 2xx answer came (wall clock)
    requests_sent: int = 0

    def accept(self, ids: list[str], how: str, plan: Plan) -> None:
        for job_id in ids:
            self.accepted.setdefault(job_id, how)
            if plan.poison:
                self.poison.add(job_id)


class Clients:
    def __init__(self, url: str, record: Record, seed: int, accepted_event: Any = None) -> None:
        self.url = url
        self.record = record
        self.seed = seed
        self.accepted_event = accepted_event  # a threading.Event set on every 2xx (for the fault thread)
        self.http = httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(150.0, connect=5.0))

    async def run(self, requests: list[Plan], concurrency: int, deadline: float, rate: float = 0) -> None:
        """The requests, `concurrency` at a time; with `rate`, no faster than that many jobs a second."""
        queue: asyncio.Queue[tuple[float, Plan]] = asyncio.Queue()
        start, jobs = time.monotonic(), 0
        for plan in requests:
            queue.put_nowait((start + jobs / rate if rate > 0 else start, plan))
            jobs += plan.n

        async def client() -> None:
            while not queue.empty() and time.monotonic() < deadline:
                not_before, plan = queue.get_nowait()
                await asyncio.sleep(max(0.0, not_before - time.monotonic()))
                await self.request(plan, deadline)

        try:
            await asyncio.gather(*(client() for _ in range(concurrency)))
        finally:
            await self.http.aclose()

    async def request(self, plan: Plan, deadline: float) -> None:
        key = f"chaos-{self.seed}-{plan.index}"
        headers = {"Idempotency-Key": key, **({} if plan.sync else {"Prefer": "respond-async"})}
        patience = min(deadline, time.monotonic() + SUBMIT_PATIENCE_S)
        unnamed_since, unnamed_by = 0.0, ""  # the first send answered without jobs, and how
        while time.monotonic() < patience:
            sent_wall = time.time()
            self.record.requests_sent += 1
            try:
                reply = await self.http.post(plan.path, json=plan.body, headers=headers)
            except httpx.TransportError as e:
                self.record.answers[type(e).__name__] += 1
                unnamed_since, unnamed_by = unnamed_since or sent_wall, unnamed_by or type(e).__name__
                await asyncio.sleep(0.5)
                continue
            body = _json(reply)
            ids = [str(i) for i in body.get("job_ids", [])] or [str(j["id"]) for j in body.get("jobs", [])]
            status = reply.status_code
            self.record.answers[f"{status}{' with ids' if ids else ''}"] += 1
            if status in (200, 202):
                self.record.accepts.append(time.time())
                if self.accepted_event is not None:
                    self.accepted_event.set()
            if status == 503 and ids and reply.headers.get("x-should-retry") != "false":
                self.record.maybe.update(ids)  # from submit: the script may not have run; retry
            elif ids:  # the jobs are accepted: follow them, never submit again
                self.record.accept(ids, f"{status}", plan)
                if unnamed_since:
                    await self._check_hidden(ids, unnamed_since, unnamed_by)
                if status == 200:
                    for image in body.get("images", []):
                        self.record.images[str(image["job_id"])] += 1
                    for job_id in ids:
                        self.record.terminal.setdefault(job_id, "succeeded")
                    return
                for job_id in ids:
                    await self.follow(job_id, deadline)
                return
            elif status not in (429, 503):
                self.record.gave_up.append(f"request {plan.index}: {status} {str(body)[:200]}")
                return
            else:
                unnamed_since, unnamed_by = unnamed_since or sent_wall, unnamed_by or f"{status}"
            await asyncio.sleep(float(reply.headers.get("Retry-After", "1")) * random.uniform(0.5, 1.0))
        self.record.gave_up.append(f"request {plan.index}: no answer with jobs in {SUBMIT_PATIENCE_S:g} s")

    async def _check_hidden(self, ids: list[str], since: float, first: str) -> None:
        """A retry answered with jobs created before the first send that named none: that answer (a
        429 or 503 without ids) hid accepted jobs. After a dropped connection (`first` is an httpx
        error) the client never saw an answer: the Idempotency-Key is what saves it, and it is only
        counted apart."""
        try:
            reply = await self.http.get(f"/v1/jobs/{ids[0]}")
            created = float(_json(reply).get("created", 0))
        except (httpx.HTTPError, ValueError):
            return
        if 0 < created < since - 0.001:
            line = f"{ids[0]} (created {since - created:.2f} s before the send answered {first})"
            (self.record.hidden if first[0].isdigit() else self.record.dropped).append(line)

    async def follow(self, job_id: str, deadline: float) -> None:
        """The job's SSE events until its terminal one, resuming after the last id on any error."""
        last = ""
        while time.monotonic() < deadline:
            headers = {"Last-Event-ID": last} if last else {}
            try:
                async with self.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as reply:
                    if reply.status_code == 404:
                        self.record.terminal.setdefault(job_id, "404 while followed")
                        return
                    if reply.status_code != 200:
                        await asyncio.sleep(0.5)
                        continue
                    event_id = kind = ""
                    async for line in reply.aiter_lines():
                        if line.startswith("id: "):
                            event_id = line[4:]
                        elif line.startswith("event: "):
                            kind = line[7:]
                        elif line == "" and kind:
                            last = event_id or last
                            if kind in ("succeeded", "failed", "cancelled", "expired"):
                                self.record.terminal.setdefault(job_id, kind)
                                return
                            kind = ""
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)


def _json(reply: httpx.Response) -> dict[str, Any]:
    try:
        value = reply.json()
    except (json.JSONDecodeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
