"""LoRA on SDXL: kohya (`lora_unet_`, `lora_te1_`, `lora_te2_`) and PEFT (`unet.`, `text_encoder.`,
`text_encoder_2.`) adapters on a tiny SDXL base against diffusers' `load_lora_weights` on
`StableDiffusionXLPipeline`, both text encoders included; batch invariance with mixed adapters; the
gateway's header-only check knows SDXL's layers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from service.gateway.catalog import read_model_info
from service.gateway.loras import LoraCatalog
from service.ldm.engine import Engine
from service.ldm.lora import LoraAdapter, adaptable
from service.ldm.lora_keys import diffusers_unet_path, unet_blocks
from service.ldm.request import GenerationRequest, LoraRef

from .reference_sdxl import reference_sdxl
from .tiny_sdxl import write_sdxl_checkpoint

pytestmark = pytest.mark.slow
PROMPT, NEGATIVE = "a red circle on the left", "blue"
# Attention projections only: diffusers' kohya converter cannot tell the format of a text-encoder
# state dict that mixes attention and MLP layers (its own limitation; ours maps both).
TEXT = ("encoder.layers.0.self_attn.q_proj", "encoder.layers.1.self_attn.out_proj")


@pytest.fixture(scope="module")
def base_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sdxl_checkpoint(tmp_path_factory.mktemp("sdxl") / "sdxl.safetensors", seed=21)


@pytest.fixture(scope="module")
def base(base_path: Path) -> Engine:
    return Engine.load(base_path)


def pair(layer: nn.Module, rank: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        down = (
            torch.randn(rank, layer.in_channels, kh, kw, generator=g) / (layer.in_channels * kh * kw) ** 0.5
        )
        return down, torch.randn(layer.out_channels, rank, 1, 1, generator=g) / rank**0.5
    assert isinstance(layer, nn.Linear)
    down = torch.randn(rank, layer.in_features, generator=g) / layer.in_features**0.5
    return down, torch.randn(layer.out_features, rank, generator=g) / rank**0.5


def unet_targets(engine: Engine) -> list[tuple[str, nn.Module]]:
    """A few of every kind: attention projections at two depths, a 3x3 conv, the added embedding."""
    layers = dict(adaptable(engine.unet))
    chosen = [p for p in layers if p.endswith(("attn1.to_q", "attn2.to_k", "ff.net.2"))][::3]
    chosen += [*[p for p in layers if p.endswith("in_layers.2")][:1], "label_emb.0.0"]
    return [(p, layers[p]) for p in chosen]


def write_kohya(path: Path, engine: Engine, seed: int, layout: str = "diffusers") -> Path:
    g = torch.Generator().manual_seed(seed)
    blocks = unet_blocks(engine.config.unet)
    encoders = dict(engine.text.lora_encoders())  # type: ignore[union-attr]
    state: dict[str, torch.Tensor] = {}
    named = [("lora_unet_", p, layer) for p, layer in unet_targets(engine)]
    for part, prefix in (("text", "lora_te1_text_model_"), ("text2", "lora_te2_text_model_")):
        modules = dict(adaptable(encoders[part]))
        named += [(prefix, p, modules[p]) for p in TEXT]
    for prefix, ours, layer in named:
        spelled = ours
        if prefix == "lora_unet_" and layout == "diffusers":
            spelled = diffusers_unet_path(ours, blocks) or ours
        name = prefix + spelled.replace(".", "_")
        state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = pair(layer, 4, g)
        state[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(state, str(path))
    return path


def write_peft(path: Path, engine: Engine, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    blocks = unet_blocks(engine.config.unet)
    encoders = dict(engine.text.lora_encoders())  # type: ignore[union-attr]
    state: dict[str, torch.Tensor] = {}
    config: dict[str, Any] = {}
    targets: dict[str, list[str]] = {"unet": [], "text_encoder": [], "text_encoder_2": []}
    for ours, layer in unet_targets(engine)[:4]:
        name = diffusers_unet_path(ours, blocks)
        assert name is not None
        targets["unet"].append(name)
        state[f"unet.{name}.lora_A.weight"], state[f"unet.{name}.lora_B.weight"] = pair(layer, 4, g)
    for part, component in (("text", "text_encoder"), ("text2", "text_encoder_2")):
        modules = dict(adaptable(encoders[part]))
        for ours in TEXT:
            targets[component].append(ours)
            down, up = pair(modules[ours], 4, g)
            state[f"{component}.{ours}.lora_A.weight"], state[f"{component}.{ours}.lora_B.weight"] = down, up
    for component, names in targets.items():
        config |= {f"{component}.r": 4, f"{component}.lora_alpha": 8, f"{component}.target_modules": names}
    save_file(state, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config)})
    return path


def request(**fields: Any) -> GenerationRequest:
    values = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "width": 64, "height": 64, "steps": 4}
    return GenerationRequest.parse({**values, "guidance_scale": 4.0, "sampler": "euler", **fields})


Loras = tuple[tuple[LoraAdapter, float], ...]


def run(engine: Engine, fields: dict[str, Any], loras: Loras = ()) -> torch.Tensor:
    member, _ = engine.prepare(engine.resolve(request(**fields)), "k", loras=loras)
    batch = engine.new_batch()
    batch.add(member)
    while len(batch):
        batch.step()
    return member.final_latent()


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_matches_diffusers_load_lora_weights(base_path: Path, base: Engine, tmp_path: Path, fmt: str) -> None:
    lora = (write_kohya if fmt == "kohya" else write_peft)(tmp_path / f"{fmt}.safetensors", base, seed=5)
    adapter = base.load_lora(lora)
    assert adapter.unet and adapter.text and adapter.text2  # both encoders and the UNet
    ours = run(base, {"seed": 7}, ((adapter, 1.0),))
    pipe = reference_sdxl(load_file(str(base_path)), base.config, base.text.tokenizers, "euler")  # type: ignore[union-attr]
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="test")
    with torch.inference_mode():
        reference = pipe(
            prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=4.0, height=64,
            width=64, generator=torch.Generator("cpu").manual_seed(7), output_type="latent",
        ).images  # fmt: skip
    plain = run(base, {"seed": 7})
    assert (ours - plain).abs().max().item() > 1e-2  # the adapter changes the image
    assert (ours - reference).abs().max().item() <= 1e-4


def test_both_unet_layouts_read_the_same(base: Engine, tmp_path: Path) -> None:
    a = base.load_lora(write_kohya(tmp_path / "a.safetensors", base, seed=3))
    b = base.load_lora(write_kohya(tmp_path / "b.safetensors", base, seed=3, layout="original"))
    assert a.unet.keys() == b.unet.keys() and a.text2.keys() == b.text2.keys()


def test_a_mixed_sdxl_batch_gives_each_member_its_own_image(base: Engine, tmp_path: Path) -> None:
    a = base.load_lora(write_kohya(tmp_path / "a.safetensors", base, seed=1))
    b = base.load_lora(write_peft(tmp_path / "b.safetensors", base, seed=2))
    cases: list[tuple[dict[str, Any], Loras]] = [
        ({"seed": 1}, ((a, 1.0),)),
        ({"seed": 2, "sampler": "ddim", "original_size": {"width": 96, "height": 48}}, ((b, 0.7),)),
        ({"seed": 3}, ((a, 0.5), (b, 0.5))),
        ({"seed": 4, "guidance_scale": 1.0}, ()),
        ({"seed": 4, "guidance_scale": 1.0}, ((a, 0.0),)),
    ]
    alone = [run(base, fields, loras) for fields, loras in cases]
    batch = base.new_batch()
    members = [base.prepare(base.resolve(request(**f)), i, loras=lo)[0] for i, (f, lo) in enumerate(cases)]
    for m in members:
        batch.add(m)
    while len(batch):
        batch.step()
    for m, expected in zip(members, alone, strict=True):
        assert (m.final_latent() - expected).abs().max().item() <= 1e-4
    assert torch.equal(alone[3], alone[4])  # weight 0: exactly the image without it


def test_the_gateway_checks_sdxl_adapters_from_headers(base_path: Path, base: Engine, tmp_path: Path) -> None:
    folder = tmp_path / "loras"
    folder.mkdir()
    write_kohya(folder / "style.safetensors", base, seed=1)
    write_peft(folder / "peft.safetensors", base, seed=2)
    catalog = LoraCatalog(folder)
    info = read_model_info("xl", base_path)
    catalog.check([LoraRef(name="style"), LoraRef(name="peft")], info)
    assert {i.name: i.family for i in catalog.available()} == {"peft": "sdxl", "style": "sdxl"}
