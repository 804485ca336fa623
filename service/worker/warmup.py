"""With `LDM_COMPILE`, compile the UNet's graphs before the worker takes any job.

A compiled UNet builds one graph per batch bucket and latent size at its first call (unet_runner.py),
which takes tens of seconds on a CPU: inside the loop that would stall every job in the batch, and
past `LDM_STALL_TIMEOUT_S` the worker's jobs would be handed to others. So the worker draws one
1-step image per bucket a batch of up to `max_batch` members can reach (a member is one row without
classifier-free guidance, two with it) at each model's native size, before it claims anything. Other
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
    for rows in buckets_for(max_batch):
        request = GenerationRequest(
            prompt="warm-up", steps=1, seed=0, guidance_scale=1.0, init_image=image, mask=mask
        )
        engine.generate([request] * rows)  # guidance 1: a row a member, so `rows` rows
    took = time.perf_counter() - started
    log.info("model %s: compiled for batches of up to %d in %.1f s", name, max_batch, took)
