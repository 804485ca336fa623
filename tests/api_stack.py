"""The service the API adapter tests talk to: a real Redis, a worker with the bundled demo model (32x32,
sizes multiple of 4) under two names, and a gateway with two API keys. The gateway also lists `idle`, a
model no worker serves, whose jobs wait (for timeouts and full queues)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from service.paths import bundled_model

from .gateway_env import GatewayProcess
from .redis_server import RedisServer
from .workers import WorkerProcess

KEY_A, KEY_B = "key-a", "key-b"
STEPS = 4  # few steps: the demo model draws a 32x32 image in a few milliseconds per step
GATEWAY_ENV = {
    "LDM_API_KEYS": f"{KEY_A},{KEY_B}",
    "LDM_URL_TTL_S": "3",
    "LDM_MODEL_ALIASES": "dall-e-3=shapes2,gpt-image-1",
    "LDM_LOG_LEVEL": "WARNING",
}


@dataclass
class Stack:
    redis: RedisServer
    gateway: GatewayProcess
    folder: Path

    @property
    def url(self) -> str:
        return self.gateway.url

    def gateway_with(self, env: dict[str, str], models: tuple[str, ...] = ("idle",)) -> GatewayProcess:
        """Another gateway on the same Redis, without aliases (the caller stops it)."""
        served = dict.fromkeys(models, bundled_model())
        env = {**GATEWAY_ENV, "LDM_MODEL_ALIASES": "", **env}
        return GatewayProcess(self.redis.url, served, self.folder, env).start()


@contextmanager
def service_stack(folder: Path) -> Iterator[Stack]:
    redis = RedisServer(folder / "redis")
    redis.start()
    demo = bundled_model()
    worker = WorkerProcess("w1", redis.url, {"shapes": demo, "shapes2": demo}, folder, max_wait_ms=0)
    gateway = GatewayProcess(redis.url, {"shapes": demo, "shapes2": demo, "idle": demo}, folder, GATEWAY_ENV)
    try:
        worker.start()
        gateway.start()
        worker.wait_ready(redis.client())
        yield Stack(redis, gateway, folder)
    finally:
        worker.stop()
        gateway.stop()
        redis.kill()
        print(gateway.log()[-3000:], worker.log()[-3000:])  # shown when a test fails


def encoded(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_bytes(size: tuple[int, int], color: tuple[int, ...], mode: str = "RGB") -> bytes:
    return encoded(Image.new(mode, size, color))


def half_transparent_mask(size: tuple[int, int]) -> bytes:
    """OpenAI's mask convention: the left half fully transparent (repainted), the right half opaque."""
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, size[0] // 2, size[1]))
    return encoded(mask)


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
