"""LoRA adapters through the service: the gateway lists and checks the files of LDM_LORA_DIR (header
only), requests name them (HTTP, gRPC), workers load them off the loop and apply them per row; an
adapter that will not load fails its job alone. And as a new user would try it: `ldm up` with a LoRA
in the directory gives the PNG that `ldm generate --lora FILE:WEIGHT` gives."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import torch
from safetensors.torch import save_file

from service.gateway.catalog import read_model_info
from service.gateway.errors import InvalidField, NotFound
from service.gateway.grpc_gen import ldm_pb2 as pb
from service.gateway.grpc_gen import ldm_pb2_grpc as pb_grpc
from service.gateway.loras import LoraCatalog
from service.ldm.engine import Engine
from service.ldm.lora import adaptable
from service.ldm.request import GenerationRequest, LoraRef, RequestError, extract_loras
from service.paths import REPO_ROOT
from service.queue.states import JobStatus
from service.queue.store import JobStore

from .gateway_env import write_tiny_own_model
from .redis_server import REDIS_SERVER, RedisServer, free_port
from .workers import SPEC, WorkerProcess, job, wait_for

pytestmark = pytest.mark.slow


def write_lora(path: Path, engine: Engine, seed: int, rank: int = 4) -> Path:
    """A kohya-format adapter on every attention projection of the UNet (original layout names)."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, layer in adaptable(engine.unet):
        if ".attn" not in name or not isinstance(layer, torch.nn.Linear):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        state[f"{key}.lora_down.weight"] = torch.randn(rank, layer.in_features, generator=g) / 2
        state[f"{key}.lora_up.weight"] = torch.randn(layer.out_features, rank, generator=g) / 2
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_own_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory, model: Path) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    engine = Engine.load(model)
    write_lora(folder / "style.safetensors", engine, seed=1)
    write_lora(folder / "other style.safetensors", engine, seed=2)
    # An SDXL adapter (its second text encoder's keys), and one for layers this model does not have.
    for file, name in (("xl", "lora_te1_x"), ("elsewhere", "lora_unet_down_blocks_9_attentions_0_proj_in")):
        pair = {f"{name}.lora_down.weight": torch.zeros(2, 8), f"{name}.lora_up.weight": torch.zeros(8, 2)}
        save_file(pair, str(folder / f"{file}.safetensors"))
    return folder


def test_the_a1111_prompt_syntax() -> None:
    text, refs = extract_loras("a cat <lora:style:0.8>, detailed <lora:other style> ")
    assert text == "a cat , detailed" and refs == [
        LoraRef(name="style", weight=0.8),
        LoraRef(name="other style"),
    ]
    with pytest.raises(ValueError, match="prompt"):
        extract_loras("<lora:style:lots>")


def test_the_gateway_lists_and_checks_adapters(model: Path, lora_dir: Path) -> None:
    catalog = LoraCatalog(lora_dir)
    listed = {info.name: info for info in catalog.available()}
    assert set(listed) == {"style", "other style", "xl", "elsewhere"}
    assert (listed["style"].rank, listed["xl"].family) == (4, "sdxl")
    info = read_model_info("tiny", model)
    catalog.check([LoraRef(name="style", weight=0.5)], info)
    with pytest.raises(NotFound, match="'nope'"):
        catalog.check([LoraRef(name="nope")], info)
    with pytest.raises(InvalidField, match="'xl' is an SDXL adapter") as refused:
        catalog.check([LoraRef(name="xl")], info)
    assert refused.value.field == "loras"
    with pytest.raises(InvalidField, match=r"match no layer.*down_blocks_9_attentions_0_proj_in"):
        catalog.check([LoraRef(name="elsewhere")], info)
    with pytest.raises(NotFound):  # no path out of the folder
        catalog.check([LoraRef.model_construct(name="..", weight=1.0)], info)


def test_a_worker_applies_adapters_per_job_and_fails_a_missing_one_alone(
    tmp_path: Path, model: Path, lora_dir: Path
) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        client = server.client()
        store = JobStore(client, result_ttl_s=60)
        port = free_port()
        env = {"LDM_LORA_DIR": str(lora_dir)}
        worker = WorkerProcess("w", server.url, {"tiny": model}, tmp_path, metrics_port=port, env=env)
        worker.start().wait_ready(client)
        try:
            base = {**SPEC, "steps": 4, "seed": 5}
            specs = [
                job(base),
                job({**base, "loras": [LoraRef(name="style", weight=0.8)]}),
                job({**base, "loras": [LoraRef(name="style", weight=0.0)]}),
                job({**base, "loras": [LoraRef(name="gone")]}),  # not in the folder: this job alone fails
                job({**base, "loras": [LoraRef(name="style"), LoraRef(name="other style", weight=-1)]}),
            ]
            ids = [store.enqueue("tiny", spec) for spec in specs]

            def ended() -> list[JobStatus]:
                states = [store.get(i) for i in ids]
                return [s.status for s in states if s is not None and s.status.terminal]

            wait_for(lambda: len(ended()) == len(ids), 120, "the jobs to end")
            states = [store.get(i) for i in ids]
            assert [s.status for s in states if s] == [JobStatus.SUCCEEDED] * 3 + [
                JobStatus.FAILED,
                JobStatus.SUCCEEDED,
            ]
            assert states[3] is not None and "LoRA 'gone'" in states[3].error
            plain, styled, zero, _, two = (store.result(i) for i in ids)
            assert styled != plain and two not in (plain, styled)
            assert _pixels(zero) == _pixels(plain)  # weight 0: exactly the image without it
            assert b"LoRA: style:0.8" in (styled or b"")
            metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            assert "ldm_lora_loads_total 2.0" in metrics  # each adapter read once, the missing one not
            assert "ldm_lora_adapters_per_step_count" in metrics
        finally:
            worker.stop()
    finally:
        server.kill()


def _pixels(png: bytes | None) -> bytes:
    import io

    from PIL import Image

    assert png is not None
    return Image.open(io.BytesIO(png)).tobytes()


@pytest.fixture
def up(tmp_path: Path, model: Path, lora_dir: Path) -> Iterator[tuple[str, str, dict[str, str]]]:
    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server is not installed (./dev setup installs it)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LDM_") and k != "REDIS_URL"}
    env |= {"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "LDM_TORCH_THREADS": "1"}
    ports = [free_port() for _ in range(3)]
    command = [sys.executable, "-m", "service.cli.main", "up", "--model", f"tiny={model}",
               "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--redis-port", str(ports[2]),
               "--metrics-port", "0", "--data-dir", str(tmp_path / "redis"),
               "--lora-dir", str(lora_dir)]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{ports[0]}"

    def ready() -> bool:
        try:
            models = httpx.get(f"{url}/v1/models", timeout=1).json()["models"]
            return models[0]["live_workers"] > 0
        except (httpx.HTTPError, KeyError, IndexError):
            return False

    try:
        wait_for(ready, 90, "ldm up to serve", every_s=0.2)
        yield url, f"127.0.0.1:{ports[1]}", env
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        if process.stdout is not None:
            print(process.stdout.read()[-5000:])
            process.stdout.close()


def test_up_serves_the_png_that_ldm_generate_draws(
    up: tuple[str, str, dict[str, str]], model: Path, lora_dir: Path, tmp_path: Path
) -> None:
    url, grpc_target, env = up
    listed = httpx.get(f"{url}/v1/loras").json()["loras"]
    style = next(item for item in listed if item["name"] == "style")
    assert (style["family"], style["rank"]) == ("unknown", 4)  # the tiny model's widths are no SD family
    body = {"prompt": "a red circle", "seed": 5, "steps": 4, "loras": [{"name": "style", "weight": 0.8}]}
    served = httpx.post(f"{url}/v1/txt2img", json=body, headers={"Accept": "image/png"}, timeout=120)
    assert served.status_code == 200, served.text
    out = tmp_path / "cli.png"
    command = [sys.executable, "-m", "service.cli.main", "generate", "--model", str(model),
               "--prompt", "a red circle", "--seed", "5", "--steps", "4",
               "--lora", f"{lora_dir / 'style.safetensors'}:0.8", "-o", str(out)]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == served.content
    # The same adapter through the other APIs: A1111's prompt tag, OpenAI's extra_body.
    a1111 = {"prompt": "a red circle <lora:style:0.8>", "seed": 5, "steps": 4, "cfg_scale": 5.0}
    reply = httpx.post(f"{url}/sdapi/v1/txt2img", json=a1111, timeout=120)
    assert reply.status_code == 200, reply.text
    assert base64.b64decode(reply.json()["images"][0]) == served.content
    openai = {**body, "response_format": "b64_json"}
    reply = httpx.post(f"{url}/v1/images/generations", json=openai, timeout=120)
    assert reply.status_code == 200, reply.text
    assert base64.b64decode(reply.json()["data"][0]["b64_json"]) == served.content

    # Refused before anything is enqueued, each naming what is wrong.
    for loras, status, words in [
        ([{"name": "nope"}], 404, "'nope'"),
        ([{"name": "xl"}], 422, "SDXL adapter"),
        ([{"name": "style", "weight": 5}], 422, "weight"),
        ([{"name": "style"}] * 9, 422, "loras"),
    ]:
        reply = httpx.post(f"{url}/v1/txt2img", json={**body, "loras": loras}, timeout=30)
        assert reply.status_code == status and words in reply.text, reply.text

    with grpc.insecure_channel(grpc_target) as channel:
        stub = pb_grpc.ImagesStub(channel)
        assert [lora.name for lora in stub.ListLoras(pb.ListLorasRequest()).loras] == [
            item["name"] for item in listed
        ]
        request = pb.GenerateRequest(prompt="a red circle", seed=5, steps=4)
        request.loras.add(name="style", weight=0.8)
        reply = stub.Generate(request, timeout=120)
        assert reply.images[0].png == served.content
        request.loras[0].name = "nope"
        with pytest.raises(grpc.RpcError) as error:
            stub.Generate(request, timeout=30)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_cli_refuses_a_bad_adapter(model: Path, lora_dir: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "service.cli.main", "generate", "--model", str(model), "--prompt", "x",
               "--lora", str(lora_dir / "xl.safetensors"), "-o", str(tmp_path / "x.png")]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--lora: LoRA 'xl' is an SDXL adapter" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(RequestError, match=r"loras\.0\.name"):  # no path in a name
        GenerationRequest.parse({"prompt": "x", "loras": [{"name": "../a"}]})
