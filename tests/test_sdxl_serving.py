"""SDXL as a user meets it: `ldm generate` on a tiny sgm-layout file with tokenizer/ and tokenizer_2/
beside it writes diffusers' image; a real worker process serves SDXL jobs (with the base -> refiner
hand-off on a worker holding both); the gateway reports SDXL models and refuses what cannot run."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from service.ldm.engine import Engine
from service.ldm.request import GenerationRequest
from service.paths import REPO_ROOT
from service.queue.states import JobStatus
from service.queue.store import JobStore, connect

from .gateway_env import GatewayProcess
from .redis_server import RedisServer
from .reference_sdxl import decode, reference_sdxl
from .tiny_sdxl import write_sdxl_checkpoint
from .workers import WorkerProcess, wait_for

pytestmark = pytest.mark.slow
SPEC = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 4}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sdxl")
    return {
        "sdxl": write_sdxl_checkpoint(folder / "base" / "sdxl.safetensors", seed=31),
        "refiner": write_sdxl_checkpoint(folder / "refiner" / "refiner.safetensors", refiner=True, seed=51),
    }


def ldm(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli.main", *args],
        cwd=cwd,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def pixels(data: bytes | Path) -> np.ndarray:
    raw = data.read_bytes() if isinstance(data, Path) else data
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), dtype=np.float32)


def test_ldm_generate_writes_the_image_diffusers_makes(files: dict[str, Path]) -> None:
    base = files["sdxl"]
    done = ldm(
        "generate", "--model", base.name, "--prompt", "a red circle", "--width", "64", "--height", "64",
        "--steps", "4", "--seed", "5", "--original-size", "128x96", "-o", "out.png", cwd=base.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "sdxl base, eps-prediction, parameters: UNet" in done.stderr and " s: sdxl" in done.stderr
    engine = Engine.load(base)  # defaults as the CLI got them: dpmpp_2m, guidance 5.0, no negative prompt
    assert (engine.config.default_sampler, engine.config.default_guidance) == ("dpmpp_2m", 5.0)
    pipe = reference_sdxl(load_file(str(base)), engine.config, engine.text.tokenizers, "dpmpp_2m")  # type: ignore[union-attr]
    with torch.inference_mode():
        latents = pipe(
            prompt="a red circle", num_inference_steps=4, guidance_scale=5.0, height=64, width=64,
            original_size=(96, 128), generator=torch.Generator("cpu").manual_seed(5), output_type="latent",
        ).images  # fmt: skip
    expected = decode(pipe, latents).numpy()
    assert np.abs(pixels(base.parent / "out.png") - expected).max() <= 1.0
    bad = ldm(
        "generate",
        "--model",
        base.name,
        "--prompt",
        "x",
        "--original-size",
        "64",
        "-o",
        "x.png",
        cwd=base.parent,
    )
    assert bad.returncode == 2 and "--original-size: expected WIDTHxHEIGHT" in bad.stderr
    odd = ldm(
        "generate", "--model", base.name, "--prompt", "x", "--width", "60", "-o", "x.png", cwd=base.parent
    )
    assert odd.returncode == 2 and odd.stderr.strip().endswith(
        "--width: must be a multiple of 8 for this model, got 60"
    )


def test_ldm_generate_with_a_refiner(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "refined.png"
    args = ["--prompt", "a red circle", "--width", "64", "--height", "64", "--steps", "6", "--seed", "2"]
    done = ldm(
        "generate", "--model", str(files["sdxl"]), "--refiner", str(files["refiner"]), "--switch-at", "0.5",
        *args, "-o", str(out), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    base, refiner = Engine.load(files["sdxl"]), Engine.load(files["refiner"])
    request = GenerationRequest.parse(
        {**SPEC, "steps": 6, "seed": 2, "refiner": {"model": "r", "switch_at": 0.5}}
    )
    [result] = base.generate([request], refiners={"r": refiner})
    assert result.image is not None
    assert np.abs(pixels(out) - np.asarray(result.image, dtype=np.float32)).max() <= 1.0
    with Image.open(out) as image:
        assert "Refiner: refiner, Refiner switch at: 0.5" in image.info["parameters"]


@pytest.fixture(scope="module")
def stack(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """Redis, a worker holding the base and the refiner, a worker holding only `lonely` (the base's file
    under another name), and a gateway serving all three names."""
    folder = tmp_path_factory.mktemp("stack")
    server = RedisServer(folder / "redis")
    server.start()
    models = {**files, "lonely": files["sdxl"]}
    both = WorkerProcess("both", server.url, files, folder, max_batch=4, max_wait_ms=200).start()
    lonely = WorkerProcess("lonely", server.url, {"lonely": files["sdxl"]}, folder).start()
    gateway = GatewayProcess(server.url, models, folder)
    try:
        gateway.start()
        for worker in (both, lonely):
            worker.wait_ready(server.client())
        yield {"gateway": gateway, "store": JobStore(connect(server.url), result_ttl_s=600)}
    finally:
        for process in (both, lonely):
            process.stop()
        gateway.stop()
        server.kill()
        print(gateway.log()[-3000:], both.log()[-5000:], lonely.log()[-2000:])  # shown when a test fails


def wait_done(store: JobStore, job_ids: list[str]) -> list:
    def states() -> list | None:
        got = [store.get(i) for i in job_ids]
        return got if all(s and s.status.terminal for s in got) else None

    return wait_for(states, 90, f"{len(job_ids)} jobs to end")


def test_a_worker_serves_sdxl_jobs_as_the_engine_draws_them(stack: dict, files: dict[str, Path]) -> None:
    store: JobStore = stack["store"]
    specs = [
        {**SPEC, "seed": 1, "original_size": {"width": 512, "height": 128}},
        {**SPEC, "seed": 2, "sampler": "euler", "guidance_scale": 3.0},  # batched with the first
        {**SPEC, "seed": 3, "steps": 6, "refiner": {"model": "refiner", "switch_at": 0.6}},
        {**SPEC, "seed": 4, "refiner": {"model": "nope"}},  # not held by this worker
    ]
    job_ids = [store.enqueue("sdxl", GenerationRequest.parse(spec)) for spec in specs]
    states = wait_done(store, job_ids)
    assert [s.status for s in states[:3]] == [JobStatus.SUCCEEDED] * 3, [s.error for s in states]
    assert states[3].status == JobStatus.FAILED
    assert states[3].error == "refiner: model 'nope' is not loaded here"
    base, refiner = Engine.load(files["sdxl"]), Engine.load(files["refiner"])
    requests = [GenerationRequest.parse(spec) for spec in specs[:3]]
    results = base.generate(requests, refiners={"refiner": refiner})
    for job_id, result in zip(job_ids[:3], results, strict=True):
        png = store.result(job_id)
        assert png is not None and result.image is not None
        assert np.abs(pixels(png) - np.asarray(result.image, dtype=np.float32)).max() <= 1.0


def test_the_gateway_reports_and_refuses(stack: dict) -> None:
    gateway: GatewayProcess = stack["gateway"]  # type: ignore[assignment]
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        models = {m["name"]: m for m in http.get("/v1/models").json()["models"]}
        sdxl, refiner = models["sdxl"], models["refiner"]
        assert (sdxl["family"], sdxl["width"], sdxl["size_multiple"], sdxl["default_guidance_scale"]) == (
            "sdxl", 1024, 8, 5.0,
        )  # fmt: skip
        assert (refiner["family"], refiner["refiner"], sdxl["refiner"]) == ("sdxl", True, False)

        def refused(body: dict[str, object], status: int) -> str:
            reply = http.post("/v1/txt2img", json={**SPEC, **body})
            assert reply.status_code == status, reply.text
            detail = reply.json()["detail"]
            if isinstance(detail, list):  # 422: FastAPI's shape, the field in `loc`
                return f"{detail[0]['loc'][-1]}: {detail[0]['msg']}"
            return str(detail)

        assert (
            refused({"model": "sdxl", "width": 60}, 422)
            == "width: must be a multiple of 8 for this model, got 60"
        )
        assert "refiner model 'nope' is not served here" in refused(
            {"model": "sdxl", "refiner": {"model": "nope"}}, 404
        )
        assert refused({"model": "sdxl", "refiner": {"model": "lonely"}}, 422) == (
            "refiner: model 'lonely' is not an SDXL refiner"
        )
        assert refused({"model": "refiner", "refiner": {"model": "refiner"}}, 422).startswith(
            "refiner: this model is itself an SDXL refiner"
        )
        assert refused({"model": "lonely", "refiner": {"model": "refiner"}}, 422) == (
            "refiner: no live worker serves 'refiner' together with 'lonely'"
        )
        started = time.monotonic()
        reply = http.post(
            "/v1/txt2img",
            json={**SPEC, "model": "sdxl", "seed": 9, "refiner": {"model": "refiner"}},
            headers={"Accept": "image/png"},
        )
        assert reply.status_code == 200 and pixels(reply.content).shape == (64, 64, 3), reply.text
        assert time.monotonic() - started < 60


def test_grpc_maps_the_sdxl_fields() -> None:
    from service.gateway.grpc_gen import ldm_pb2 as pb
    from service.gateway.grpc_server import generation_request

    request = generation_request(
        pb.GenerateRequest(
            prompt="x",
            original_size=pb.Size(width=2048, height=512),
            crops_coords_top_left=pb.Point(x=0, y=0),  # zeros are still given
            refiner=pb.Refiner(model="refiner"),
            negative_aesthetic_score=1.5,
        )
    )
    assert request.original_size is not None and (
        request.original_size.width,
        request.original_size.height,
    ) == (2048, 512)
    assert request.crops_coords_top_left is not None and request.target_size is None
    assert request.refiner is not None and (request.refiner.model, request.refiner.switch_at) == (
        "refiner",
        0.8,
    )
    assert (request.aesthetic_score, request.negative_aesthetic_score) == (None, 1.5)
