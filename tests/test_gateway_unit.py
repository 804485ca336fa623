"""The gateway's pure parts: no torch in its imports, the model catalog from safetensors headers, the
sampler names, the settings, API keys, validation, and the checked-in gRPC stubs."""

from __future__ import annotations

import importlib.util
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from service.gateway.auth import ApiKeys, key_digest
from service.gateway.catalog import read_model_info
from service.gateway.errors import Unauthenticated
from service.ldm.request import SAMPLERS, GenerationRequest, RequestError, plan
from service.ldm.samplers import make_sampler
from service.ldm.schedule import DiscreteSchedule
from service.paths import REPO_ROOT, bundled_upscaler
from service.settings import gateway_settings, worker_settings

from .gateway_env import write_tiny_own_model
from .tiny import tiny_config, write_sd_checkpoint, write_tokenizer


def test_the_gateway_does_not_import_torch() -> None:
    code = (
        "import sys, service.gateway.app, service.gateway.serve, service.cli.main\n"
        "from service.gateway.app import create_app\n"
        "create_app()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


def test_every_sampler_name_has_a_sampler() -> None:
    for name in SAMPLERS:
        assert make_sampler(name, DiscreteSchedule(), 4).name == name


def test_model_info_from_the_projects_own_format(tmp_path: Path) -> None:
    info = read_model_info("tiny", write_tiny_own_model(tmp_path / "m"))  # a folder: its one file
    config = info.config
    assert info.source == "metadata" and not info.error
    assert (config.sample_size, config.downsample_factor, config.default_steps) == (32, 2, 4)
    assert (config.default_guidance, config.default_sampler, config.is_inpainting) == (5.0, "euler", False)


def test_model_info_from_stable_diffusion_weights(tmp_path: Path) -> None:
    tokenizer = write_tokenizer(tmp_path / "tokenizer")
    plain = write_sd_checkpoint(tmp_path / "sd.safetensors", tiny_config("sd1"), tokenizer)
    info = read_model_info("sd", plain)
    config = info.config
    assert info.source == "weights" and (config.family, config.downsample_factor) == ("sd1", 2)
    assert not config.is_inpainting and config.unet == tiny_config("sd1").unet  # the engine's own inference
    assert (config.sample_size, config.default_steps, config.default_sampler) == (
        512,
        20,
        "dpmpp_2m",
    )  # SD 1.x's
    inpaint = write_sd_checkpoint(tmp_path / "in.safetensors", tiny_config("sd2", in_channels=9), tokenizer)
    config = read_model_info("in", inpaint).config
    assert config.is_inpainting and config.family == "sd2"


def test_an_unreadable_checkpoint_gets_sd_defaults(tmp_path: Path) -> None:
    missing = read_model_info("x", tmp_path / "nope.safetensors")
    assert missing.source == "defaults" and missing.error and missing.config.sample_size == 512
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    assert "header" in read_model_info("x", bad).error
    bad.write_bytes(struct.pack("<Q", 5) + b"[1,2]")
    assert read_model_info("x", bad).error


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LDM_MODELS", "shapes=models/shapes, sd=/m/sd.safetensors")
    monkeypatch.setenv("LDM_API_KEYS", "one, two,")
    settings = gateway_settings()
    assert settings.models == {"shapes": Path("models/shapes"), "sd": Path("/m/sd.safetensors")}
    assert settings.api_keys == ["one", "two"] and worker_settings().models == settings.models
    monkeypatch.setenv("LDM_MODELS", '{"a": "x"}')
    assert gateway_settings().models == {"a": Path("x")} == worker_settings().models
    monkeypatch.setenv("LDM_MODELS", "bad name!=x")
    with pytest.raises(ValueError, match="model name"):
        gateway_settings()
    monkeypatch.delenv("LDM_MODELS")
    shipped = ["shapes", "shapes-x4"] if bundled_upscaler().is_dir() else ["shapes"]
    assert list(gateway_settings().models) == shipped  # the demo model and, when shipped, its upscaler


def test_api_keys() -> None:
    keys = ApiKeys(["one", "two"])
    owner = keys.owner("Bearer two")
    assert owner == key_digest("two").hex() and "two" not in owner
    for header in (None, "", "Bearer", "Bearer three", "Basic two", "two"):
        with pytest.raises(Unauthenticated):
            keys.owner(header)
    assert keys.may_see(owner, owner) and not keys.may_see(keys.owner("Bearer one"), owner)
    assert ApiKeys([]).owner(None) == "" and ApiKeys([]).may_see("", key_digest("x").hex())


def test_planning_fills_seeds_and_names_the_field(tmp_path: Path) -> None:
    settings = gateway_settings(models={"tiny": write_tiny_own_model(tmp_path / "m")}, max_n=4)
    config, limits = read_model_info("tiny", settings.models["tiny"]).config, settings.limits()
    planned = plan(GenerationRequest(prompt="a cat", seed=5), 3, config, limits)
    assert [r.seed for r in planned] == [5, 6, 7]
    assert planned[0].width is None  # left to the engine's defaults
    assert 0 <= (plan(GenerationRequest(prompt="a cat"), 1, config, limits)[0].seed or 0) < 2**32
    for fields, n, field in [
        ({"prompt": "x", "width": 31}, 1, "width"),
        ({"prompt": "x"}, 5, "n"),
        ({"prompt": "x\x00"}, 1, "prompt"),
        ({"prompt": "x", "mask": b"\x89PNG"}, 1, "mask"),
        ({"prompt": "x", "init_image": b"\x89PNG\r\n\x1a\n" + bytes(16)}, 1, "init_image"),
        ({"prompt": "x", "seed": 2**63 - 2}, 3, "seed"),
    ]:
        with pytest.raises(RequestError) as error:
            plan(GenerationRequest.parse(fields), n, config, limits)
        assert error.value.field == field


def test_the_grpc_stubs_are_generated_from_the_proto(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("proto_generate", REPO_ROOT / "proto" / "generate.py")
    assert spec is not None and spec.loader is not None
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    for path in generate.generate(tmp_path):
        checked_in = generate.OUT / path.name
        assert path.read_text() == checked_in.read_text(), f"{checked_in} is stale: run proto/generate.py"


def test_openapi_document_carries_the_configured_limits(tmp_path: Path) -> None:
    from service.gateway.app import create_app

    settings = gateway_settings(models={"tiny": write_tiny_own_model(tmp_path / "m")}, max_n=3, max_steps=40)
    document = create_app(settings).openapi()
    body = document["components"]["schemas"]["Txt2ImgCreate"]["properties"]
    assert (
        body["n"]["maximum"] == 3
        and {"type": "integer", "maximum": 40}.items() <= body["steps"]["anyOf"][0].items()
    )
    assert body["width"]["anyOf"][0]["multipleOf"] == 2 and body["model"]["anyOf"][0]["enum"] == ["tiny"]
    assert "securitySchemes" not in document.get("components", {})  # no keys set: none asked for
    assert json.dumps(document)
