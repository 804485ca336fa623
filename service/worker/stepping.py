"""One denoising step of a worker's batch, with failures kept to the members that cause them.

A step that raises is tried again with the batch split in halves, down to members alone, before
anyone fails: a poison request (a prompt, image or adapter that breaks the UNet call) fails alone and
its batch-mates go on, and a batch too large for the device's memory (CUDA out of memory) runs as
halves. A failure inside the batched UNet call changes no member, so members are never stepped twice.
An unrecoverable device error (a CUDA error other than out of memory: the context is lost) is raised
as DeviceLost: the worker exits and its jobs are reclaimed by the others.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from ..ldm.batch import DenoisingBatch, Member

log = logging.getLogger(__name__)


class DeviceLost(RuntimeError):
    """The device cannot be used any more (the process must go)."""


@dataclass
class Stepped:
    finished: list[Member] = field(default_factory=list)
    failed: dict[Hashable, Exception] = field(default_factory=dict)  # member key -> why, alone
    splits: int = 0  # how often a failing group was split


def step(batch: DenoisingBatch) -> Stepped:
    """Advances every active member one step; see the module's docstring."""
    out = Stepped()
    _step(batch, [k for k, m in batch.members.items() if not m.done], out)
    out.finished += [m for m in list(batch.members.values()) if m.done]
    for m in out.finished:
        batch.remove(m.key)
    return out


def _step(batch: DenoisingBatch, keys: Sequence[Hashable], out: Stepped) -> None:
    try:
        out.finished += batch.step(keys)
    except Exception as e:
        if device_lost(e):
            raise DeviceLost(str(e)) from e
        if len(keys) == 1:
            log.warning("member %s fails alone: %s", keys[0], e)
            out.failed[keys[0]] = e
            return
        out.splits += 1
        log.warning("a step of %d members failed (%s): trying them in halves", len(keys), e)
        half = len(keys) // 2
        _step(batch, keys[:half], out)
        _step(batch, keys[half:], out)


def device_lost(e: BaseException) -> bool:
    message = str(e)
    return "CUDA error" in message and "out of memory" not in message
