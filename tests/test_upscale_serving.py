"""The x4 upscaler served: a real worker process batches upscale jobs and returns the engine's images;
the gateway lists the upscaler's family and task, routes /v1/upscale (HTTP and gRPC) and refuses what
cannot run, naming the field or the model's task."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image

from service.gateway.grpc_gen import ldm_pb2 as pb
from service.gateway.grpc_gen import ldm_pb2_grpc as pb_grpc
from service.ldm.engine import Engine
from service.ldm.images import png_bytes
from service.ldm.request import GenerationRequest

from .gateway_env import GatewayProcess
from .redis_server import RedisServer
from .tiny import tiny_config, write_sd_checkpoint, write_tokenizer
from .tiny_upscale import write_upscaler_checkpoint
from .workers import WorkerProcess

pytestmark = pytest.mark.slow


def low_res(seed: int, size: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    return png_bytes(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    write_tokenizer(folder / "x4" / "tokenizer", pad_token="!")
    write_tokenizer(folder / "sd1" / "tokenizer")
    return {
        "tiny": write_sd_checkpoint(
            folder / "sd1" / "m.safetensors", tiny_config("sd1"), folder / "sd1" / "tokenizer"
        ),
        "x4": write_upscaler_checkpoint(
            folder / "x4" / "x4.safetensors", folder / "x4" / "tokenizer", seed=3
        ),
    }


@pytest.fixture(scope="module")
def gateway(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    folder = tmp_path_factory.mktemp("stack")
    server = RedisServer(folder / "redis")
    server.start()
    worker = WorkerProcess("w", server.url, files, folder, max_batch=4, max_wait_ms=300).start()
    env = {"LDM_MAX_UPSCALE_PIXELS": str(64 * 64)}
    process = GatewayProcess(server.url, files, folder, env)
    try:
        process.start()
        worker.wait_ready(server.client())
        yield process
    finally:
        worker.stop()
        process.stop()
        server.kill()
        print(process.log()[-3000:], worker.log()[-5000:])  # shown when a test fails


def test_upscale_over_http_and_grpc(gateway: GatewayProcess, files: dict[str, Path]) -> None:
    spec = {"prompt": "a red circle", "steps": 3, "noise_level": 30}
    bodies = [{**spec, "image": base64.b64encode(low_res(i)).decode(), "seed": i} for i in range(3)]
    with httpx.Client(base_url=gateway.url, timeout=120) as http:
        png = http.post("/v1/upscale", json=bodies[0], headers={"Accept": "image/png"})
        assert png.status_code == 200, png.text
        answers = [http.post("/v1/upscale", json={**b, "model": "x4"}).json() for b in bodies[1:]]
    with grpc.insecure_channel(gateway.grpc_target) as channel:
        request = pb.GenerateRequest(prompt="a red circle", image=low_res(3), seed=3, steps=3, noise_level=30)
        reply = pb_grpc.ImagesStub(channel).Generate(request, timeout=120)
    assert reply.model == "x4"
    got = [
        png.content,
        *(base64.b64decode(a["images"][0]["png_base64"]) for a in answers),
        reply.images[0].png,
    ]
    engine = Engine.load(files["x4"])
    requests = [GenerationRequest.parse({**spec, "image": low_res(i), "seed": i}) for i in range(4)]
    for data, result in zip(got, engine.generate(requests), strict=True):
        image = Image.open(io.BytesIO(data))
        assert image.size == (32, 32) and result.image is not None
        diff = np.abs(np.asarray(image, dtype=int) - np.asarray(result.image, dtype=int))
        assert diff.max() <= 1


def test_models_and_refusals(gateway: GatewayProcess) -> None:
    image = base64.b64encode(low_res(0)).decode()
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        models = {m["name"]: m for m in http.get("/v1/models").json()["models"]}
        assert (models["x4"]["family"], models["x4"]["task"]) == ("upscale-x4", "upscale")
        assert (models["tiny"]["family"], models["tiny"]["task"]) == ("sd1", "txt2img")

        def refused(path: str, body: dict[str, object]) -> str:
            reply = http.post(path, json={"prompt": "a red circle", **body})
            assert reply.status_code == 422, reply.text
            detail = reply.json()["detail"][0]
            return f"{detail['loc'][-1]}: {detail['msg'].removeprefix('Value error, ')}"

        assert refused("/v1/txt2img", {"model": "x4"}).startswith("model: this model's task is upscale")
        assert refused("/v1/upscale", {"model": "tiny", "image": image}).startswith(
            "image: this model's task is txt2img, not upscale"
        )
        big = base64.b64encode(low_res(0, size=17)).decode()  # 68x68 out > LDM_MAX_UPSCALE_PIXELS
        assert refused("/v1/upscale", {"image": big}).startswith("image: is 17x17: its 4x upscale, 68x68")
        gif = base64.b64encode(b"GIF89a" + bytes(40)).decode()
        assert refused("/v1/upscale", {"image": gif}) == "image: must be a PNG or JPEG image"
        zero = bytearray(low_res(0))
        zero[20:24] = bytes(4)  # height 0
        assert "positive size" in refused("/v1/upscale", {"image": base64.b64encode(zero).decode()})
        for level in (-1, 351):
            assert refused("/v1/upscale", {"image": image, "noise_level": level}).startswith("noise_level:")
        assert refused("/v1/upscale", {"prompt": "x"}).startswith("image:")
