"""Overdue queued jobs reach `expired` even when no worker serves their model: one gateway at a time
(a lock in Redis) looks through each model's stream every `expiry_sweep_s` and expires the jobs whose
deadline passed before any worker started them, which ends their event streams too. The same pass
makes each model's byte count (`LDM_MAX_BACKLOG_BYTES`) exact again."""

from __future__ import annotations

import asyncio
import logging
import uuid

import redis

from ..queue.store import JobStore
from .catalog import Catalog

log = logging.getLogger(__name__)


async def sweep_forever(store: JobStore, catalog: Catalog, every_s: float) -> None:
    holder = uuid.uuid4().hex
    lock_ms = int(every_s * 3000)
    while True:
        await asyncio.sleep(every_s)
        try:
            await asyncio.to_thread(_sweep, store, catalog, holder, lock_ms)
        except redis.RedisError as e:
            log.debug("expiry sweep skipped: %s", e)


def _sweep(store: JobStore, catalog: Catalog, holder: str, lock_ms: int) -> None:
    if not store.sweep_lock(holder, lock_ms):
        return
    for model in catalog.names():
        store.recount(model)  # exact again, whatever older scripts or expired hashes left in the count
        expired = store.expire_overdue(model)
        if expired:
            log.info(
                "model %s: %d queued jobs expired (deadline passed, no worker started them)", model, expired
            )
