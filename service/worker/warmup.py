"""With `LDM_COMPILE`, compile the UNet's graphs before the worker takes any job.

A compiled UNet builds one graph per batch bucket and latent size at its first call (unet_runner.py),
which takes tens of seconds on a CPU: inside the loop that would stall every job in the batch, and
past `LDM_STALL_TIMEOUT_S` the worker's jobs would be handed to others. So the worker draws one
1-step image per bucket a batch of up to `max_batch` members can reach (a member is one row without
classifier-free guidance, two with it) at each model's native size, and one image per pair of buckets
(rows, unique rows) that batches with CFG pairs reach (a pair's two rows share the UNet's first
layers: a graph of their own), before it claims anything. Other
sizes, and upscalers (whose input size is the caller's), still compile at first use; the log says so.
"""

from __future__ import annotations

import io
import logging
import time

from PIL import Image

from ..ldm.engine import Engine
from ..ldm.request import GenerationRequest
from ..ldm.unet_runner import bucket

log = logging.getLogger(__name__)


def buckets_for(max_batch: int) -> list[int]:
    """The row counts a batch of 1..max_batch members pads to: 1 or 2 rows a member."""
    return sorted({bucket(rows) for rows in range(1, 2 * max_batch + 1)})


def shared_buckets_for(max_batch: int) -> dict[tuple[int, int], tuple[int, int]]:
    """(rows, unique rows) padded, of the batches whose CFG pairs share their first layers (the
    graphs with `expand`): for each, a batch that reaches it, (members, members with guidance)."""
    found: dict[tuple[int, int], tuple[int, int]] = {}
    for members in range(1, max_batch + 1):
        for guided in range(1, members + 1):
            found.setdefault((bucket(members + guided), bucket(members)), (members, guided))
    return dict(sorted(found.items()))


def _blank_png(width: int, height: int, color: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB" if color else "L", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def warm_up(name: str, engine: Engine, max_batch: int) -> None:
    """Compiles `engine`'s UNet for every bucket at its native size (a no-op unless it compiles)."""
    if engine.runner.compiled is None:
        return
    config = engine.config
    if config.task == "upscale":
        log.info("model %s: an upscaler compiles at the first job of each input size", name)
        return
    size = config.sample_size  # what a request that names no size gets
    image = _blank_png(size, size, 128) if config.task in ("inpaint", "img2img") else None
    mask = _blank_png(size, size, 0) if config.task == "inpaint" else None
    started = time.perf_counter()
    request = GenerationRequest(
        prompt="warm-up", steps=1, seed=0, guidance_scale=1.0, init_image=image, mask=mask
    )
    for rows in buckets_for(max_batch):
        engine.generate([request] * rows)  # guidance 1: a row a member, so `rows` rows
    if engine.share_rows:
        guided = request.model_copy(update={"guidance_scale": 7.5})
        for members, with_guidance in shared_buckets_for(max_batch).values():
            engine.generate([guided] * with_guidance + [request] * (members - with_guidance))
    took = time.perf_counter() - started
    log.info("model %s: compiled for batches of up to %d in %.1f s", name, max_batch, took)
