"""Previews: a job that asks for them (`previews`, 1-3: OpenAI's `partial_images`) gets its x0 estimate
decoded to a PNG at evenly spaced steps while it denoises; each is stored beside the job and announced
in its event stream (`preview`, with its index), for the APIs to stream. Best effort: a preview that
cannot be published is skipped, and the job goes on."""

from __future__ import annotations

import logging
from collections.abc import Callable

import redis

from ..ldm.batch import Member
from ..ldm.engine import Engine
from ..ldm.images import png_bytes
from ..queue.delivery import WorkerQueue
from .ledger import Job

log = logging.getLogger(__name__)


def preview_steps(total: int, count: int) -> list[int]:
    """The steps after which previews 0 .. count-1 are taken: evenly spaced, before the last step."""
    steps = sorted({min(total - 1, max(1, round(total * (i + 1) / (count + 1)))) for i in range(count)})
    return steps if total > 1 else []


def publish(
    queue: WorkerQueue, engines: dict[str, Engine], members: list[Member], job: Callable[[str], Job | None]
) -> None:
    """After a step: decodes and publishes the previews that are due."""
    for m in members:
        held = job(str(m.key))
        if held is None or held.request is None or not held.request.previews or m.x0 is None or m.done:
            continue
        steps = preview_steps(m.total_steps, held.request.previews)
        if m.steps_done not in steps:
            continue
        try:
            [image] = engines[held.lease.model].decode(m.x0)
            queue.preview(held.lease, steps.index(m.steps_done), m.steps_done, png_bytes(image))
        except redis.RedisError as e:
            log.warning("job %s: preview not published: %s", held.id, e)
