"""Every Redis key and name of the job protocol, in one place.

| key | type | what |
|---|---|---|
| `ldm:jobs:<model>` | stream | jobs queued or held by a worker (field `job`); consumer group `workers` |
| `ldm:job:<id>` | hash | spec (JSON), owner, status, timestamps, attempt, deadline, progress, error |
| `ldm:result:<id>` | string | the PNG, stored once, with a TTL |
| `ldm:input:<id>` | hash | an n-image request's input images, once for its jobs (`refs`: those not ended) |
| `ldm:backlog-bytes:<model>` | string | bytes of the specs and inputs of the model's jobs not ended |
| `ldm:preview:<id>:<i>` | string | preview i of a job (PNG of its x0 estimate), with a TTL |
| `ldm:events:<id>` | stream | progress and status events of one job, with a TTL (late readers replay it) |
| `ldm:dead:<model>` | stream | dead-lettered jobs (field `job`, `reason`, `attempts`) |
| `ldm:worker:<name>` | string | a live worker's heartbeat (JSON), expires when the worker stops renewing it |
| `ldm:webhooks` | stream | webhook deliveries to make (`job`, `type`, `attempt`); consumer group `gateways` |
| `ldm:webhooks:retry` | sorted set | deliveries to try again (JSON), scored by when |
| `ldm:sweeper` | string | lock of the one gateway that expires overdue queued jobs, with a TTL |
| `ldm:idem:<owner>:<sha256>` | string | the job ids an `Idempotency-Key` was answered with (TTL) |
| `ldm:owner-jobs:<owner>` | sorted set | an API key's jobs not known to have ended, with a TTL |
| `ldm:a1111-options:<owner>` | hash | an API key's AUTOMATIC1111 options (`sd_model_checkpoint`), no TTL |

Keys are not hash-tagged: the protocol assumes one Redis (or a primary with replicas), not a cluster.
"""

from __future__ import annotations

import hashlib
import re

from ..ldm.request import MODEL_NAME

PREFIX = "ldm"
GROUP = "workers"  # the consumer group every worker of a model's stream joins

__all__ = ["MODEL_NAME"]  # model names are the request's rule; keys are built from them
JOB_ID = re.compile(r"^[0-9a-f]{32}$")


def jobs(model: str) -> str:
    return f"{PREFIX}:jobs:{model}"


def job(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def result(job_id: str) -> str:
    return f"{PREFIX}:result:{job_id}"


def reply(job_id: str) -> str:
    """A list holding a waiting request's answer for a job: its end and image in one entry (60 s)."""
    return f"{PREFIX}:reply:{job_id}"


def inputs(request_id: str) -> str:
    """The input images an n-image request's jobs share (`request_id`: its first job's id)."""
    return f"{PREFIX}:input:{request_id}"


def backlog_bytes(model: str) -> str:
    return f"{PREFIX}:backlog-bytes:{model}"


BACKLOG_BYTES_PREFIX = backlog_bytes("")


def preview(job_id: str, index: int) -> str:
    return f"{PREFIX}:preview:{job_id}:{index}"


def events(job_id: str) -> str:
    return f"{PREFIX}:events:{job_id}"


def dead(model: str) -> str:
    return f"{PREFIX}:dead:{model}"


def idempotency(owner: str, key: str) -> str:
    """The job ids an `Idempotency-Key` was answered with, per caller (owner: its API key's digest)."""
    return f"{PREFIX}:idem:{owner or '-'}:{hashlib.sha256(key.encode()).hexdigest()}"


def worker(name: str) -> str:
    return f"{PREFIX}:worker:{name}"


WORKER_PATTERN = f"{PREFIX}:worker:*"
SWEEPER = f"{PREFIX}:sweeper"  # lock: which gateway expires overdue queued jobs now
WEBHOOKS = f"{PREFIX}:webhooks"  # stream: webhook deliveries to make (job, event type); group WEBHOOK_GROUP
WEBHOOK_GROUP = "gateways"
WEBHOOK_RETRIES = f"{PREFIX}:webhooks:retry"  # sorted set: deliveries to try again, scored by when


def owner_jobs(owner: str) -> str:
    """`owner` is a key's SHA-256 (hex), or "" while authentication is off."""
    return f"{PREFIX}:owner-jobs:{owner or 'anonymous'}"


def a1111_options(owner: str) -> str:
    return f"{PREFIX}:a1111-options:{owner or 'anonymous'}"
