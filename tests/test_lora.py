"""LoRA adapters on a tiny SD 1.x model: parity with diffusers' `load_lora_weights` (PEFT backend)
for kohya and PEFT files, per-row application in mixed batches, the key maps, bad files, the
torch-free header reader and the adapter cache."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from service.ldm.engine import Engine
from service.ldm.lora import LoraAdapter, LoraError, LoraLayer, adaptable
from service.ldm.lora_cache import LoraCache
from service.ldm.lora_info import LoraFileError, lora_info
from service.ldm.lora_keys import diffusers_unet_path, unet_blocks
from service.ldm.request import GenerationRequest as _Request

from .reference import diffusers_unet, reference_pipeline
from .tiny import tiny_config, write_sd_checkpoint, write_tokenizer

# A few of every kind: self- and cross-attention projections, a 3x3 ResBlock conv (LoCon), SD 1.x's
# 1x1 proj_in conv, the time-embedding MLP, in the down, middle and up halves.
UNET_LAYERS = (
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
    "input_blocks.1.1.proj_in",
    "input_blocks.1.0.in_layers.2",
    "middle_block.1.transformer_blocks.0.attn1.to_out.0",
    "middle_block.0.out_layers.3",
    "output_blocks.3.1.transformer_blocks.0.attn2.to_v",
    "output_blocks.3.1.transformer_blocks.0.ff.net.2",
    "time_embed.0",
)
TEXT_LAYERS = ("encoder.layers.0.self_attn.q_proj", "encoder.layers.1.self_attn.out_proj")


def GenerationRequest(prompt: str, **kwargs: object) -> _Request:
    return _Request.parse({"prompt": prompt, "width": 32, "height": 32, **kwargs})


@pytest.fixture(scope="module")
def sd1_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sd1")
    write_tokenizer(folder / "tokenizer")
    return write_sd_checkpoint(folder / "tiny.safetensors", tiny_config("sd1"), folder / "tokenizer", seed=11)


@pytest.fixture(scope="module")
def engine(sd1_path: Path) -> Engine:
    return Engine.load(sd1_path)


# -- writing adapters ---------------------------------------------------------------------------------


def random_pair(layer: nn.Module, rank: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) for a layer, large enough to move the image visibly."""
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        down = (
            torch.randn(rank, layer.in_channels, kh, kw, generator=g) / (layer.in_channels * kh * kw) ** 0.5
        )
        up = torch.randn(layer.out_channels, rank, 1, 1, generator=g) / rank**0.5
    else:
        assert isinstance(layer, nn.Linear)
        down = torch.randn(rank, layer.in_features, generator=g) / layer.in_features**0.5
        up = torch.randn(layer.out_features, rank, generator=g) / rank**0.5
    return down, up


def unet_layer(engine: Engine, path: str) -> nn.Module:
    return dict(adaptable(engine.unet))[path]


def text_layer(engine: Engine, path: str) -> nn.Module:
    return dict(adaptable(engine.text.model))[path]


def write_kohya(
    path: Path, engine: Engine, seed: int, layout: str = "diffusers", rank: int = 4, alpha: float | None = 2.0
) -> Path:
    """kohya/A1111 keys (`lora_unet_*`, `lora_te_text_model_*`), module names in either UNet layout."""
    g = torch.Generator().manual_seed(seed)
    blocks = unet_blocks(engine.config.unet)
    state: dict[str, torch.Tensor] = {}
    named = [(p, unet_layer(engine, p), "lora_unet_") for p in UNET_LAYERS]
    named += [(p, text_layer(engine, p), "lora_te_text_model_") for p in TEXT_LAYERS]
    for ours, layer, prefix in named:
        spelled = ours
        if prefix == "lora_unet_" and layout == "diffusers":
            spelled = diffusers_unet_path(ours, blocks) or ours
        name = prefix + spelled.replace(".", "_")
        state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = random_pair(layer, rank, g)
        if alpha is not None:
            state[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(state, str(path))
    return path


def write_peft(
    path: Path, engine: Engine, seed: int, rank: int = 4, alpha: int = 8, prefix: str = ""
) -> Path:
    """diffusers/PEFT keys (`unet.<diffusers path>.lora_A.weight`, `text_encoder.…`) with diffusers'
    `lora_adapter_metadata` (the LoraConfig per component) as `save_lora_weights` writes it."""
    g = torch.Generator().manual_seed(seed)
    blocks = unet_blocks(engine.config.unet)
    state: dict[str, torch.Tensor] = {}
    unet_targets, text_targets = [], []
    for ours in UNET_LAYERS[:4]:  # attention projections, proj_in and a 3x3 conv
        name = diffusers_unet_path(ours, blocks)
        assert name is not None
        unet_targets.append(name)
        down, up = random_pair(unet_layer(engine, ours), rank, g)
        state[f"{prefix}unet.{name}.lora_A.weight"], state[f"{prefix}unet.{name}.lora_B.weight"] = down, up
    for ours in TEXT_LAYERS:
        text_targets.append(ours)
        down, up = random_pair(text_layer(engine, ours), rank, g)
        state[f"{prefix}text_encoder.{ours}.lora_A.weight"] = down
        state[f"{prefix}text_encoder.{ours}.lora_B.weight"] = up
    config: dict[str, Any] = {}
    for component, targets in (("unet", unet_targets), ("text_encoder", text_targets)):
        config.update({f"{component}.r": rank, f"{component}.lora_alpha": alpha})
        config[f"{component}.target_modules"] = targets
    save_file(state, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config)})
    return path


# -- running ------------------------------------------------------------------------------------------

REQUEST = {"prompt": "a red circle on the left", "negative_prompt": "blue", "steps": 4, "guidance_scale": 4.0}


def run_member(engine: Engine, request: _Request, loras: tuple[tuple[LoraAdapter, float], ...] = ()) -> Any:
    member, _ = engine.prepare(engine.resolve(request), "k", loras=loras)
    batch = engine.new_batch()
    batch.add(member)
    while len(batch):
        batch.step()
    return member.final_latent()


def diffusers_latent(sd1_path: Path, engine: Engine, lora: Path | None) -> torch.Tensor:
    pipe = reference_pipeline(load_file(str(sd1_path)), engine.config, engine.text.tokenizer, "euler")
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="test")
    with torch.inference_mode():
        return pipe(
            prompt=REQUEST["prompt"],
            negative_prompt=REQUEST["negative_prompt"],
            num_inference_steps=REQUEST["steps"],
            guidance_scale=REQUEST["guidance_scale"],
            height=32,
            width=32,
            generator=torch.Generator("cpu").manual_seed(7),
            output_type="latent",
        ).images


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_matches_diffusers_load_lora_weights(
    sd1_path: Path, engine: Engine, tmp_path: Path, fmt: str
) -> None:
    path = tmp_path / f"{fmt}.safetensors"
    write_kohya(path, engine, seed=1) if fmt == "kohya" else write_peft(path, engine, seed=2)
    adapter = engine.load_lora(path)
    assert len(adapter.text) == 2 and len(adapter.unet) == (len(UNET_LAYERS) if fmt == "kohya" else 4)
    request = GenerationRequest(**REQUEST, sampler="euler", seed=7)  # type: ignore[arg-type]
    plain = run_member(engine, request)
    ours = run_member(engine, request, ((adapter, 1.0),))
    reference = diffusers_latent(sd1_path, engine, path)
    assert (ours - reference).abs().max().item() <= 1e-4
    assert (ours - plain).abs().max().item() > 1e-2  # the adapter did something


def test_both_unet_layouts_and_peft_prefix_read_the_same(engine: Engine, tmp_path: Path) -> None:
    a = engine.load_lora(write_kohya(tmp_path / "a.safetensors", engine, seed=3, layout="diffusers"))
    b = engine.load_lora(write_kohya(tmp_path / "b.safetensors", engine, seed=3, layout="original"))
    c = engine.load_lora(write_peft(tmp_path / "c.safetensors", engine, seed=4))
    d = engine.load_lora(write_peft(tmp_path / "d.safetensors", engine, seed=4, prefix="base_model.model."))
    for x, y in ((a, b), (c, d)):
        assert x.unet.keys() == y.unet.keys() and x.text.keys() == y.text.keys()
        for path, layer in x.unet.items():
            assert torch.equal(layer.up, y.unet[path].up) and torch.equal(layer.down, y.unet[path].down)
    assert set(a.unet) == set(UNET_LAYERS) and set(a.text) == set(TEXT_LAYERS)
    # Scales: kohya alpha 2 / rank 4, PEFT lora_alpha 8 / r 4, folded into `up`.
    raw = load_file(str(tmp_path / "a.safetensors"))
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"
    torch.testing.assert_close(a.unet[UNET_LAYERS[0]].up, raw[key] * 0.5)
    assert a.rank == 4 and a.nbytes > 0


def test_diffusers_layout_matches_diffusers_modules(engine: Engine) -> None:
    """Every layer's diffusers path names the module diffusers' own converter fills with its weights."""
    state = {"model.diffusion_model." + k: v for k, v in engine.unet.state_dict().items()}
    _, converted = diffusers_unet(engine.config.unet, state)
    blocks = unet_blocks(engine.config.unet)
    for path, layer in adaptable(engine.unet):
        name = diffusers_unet_path(path, blocks)
        assert name is not None
        assert torch.equal(converted[name + ".weight"], layer.weight), path


def test_mixed_batch_gives_each_member_its_own_image(engine: Engine, tmp_path: Path) -> None:
    a = engine.load_lora(write_kohya(tmp_path / "a.safetensors", engine, seed=5))
    b = engine.load_lora(write_peft(tmp_path / "b.safetensors", engine, seed=6))
    c = engine.load_lora(
        write_kohya(tmp_path / "c.safetensors", engine, seed=7, layout="original", alpha=None)
    )
    plan: list[tuple[_Request, tuple[tuple[LoraAdapter, float], ...]]] = [
        (GenerationRequest("a red circle", steps=4, seed=1), ((a, 1.0),)),
        (GenerationRequest("a blue square", steps=5, sampler="ddim", seed=2), ((b, 0.7),)),
        (GenerationRequest("a cat", steps=3, seed=3, guidance_scale=1.0), ((c, 0.8), (a, 0.5))),
        (GenerationRequest("a red circle", steps=4, seed=1), ((a, 0.3),)),  # a again, another weight
        (GenerationRequest("a green photo", steps=4, seed=4), ()),
        (GenerationRequest("a green photo", steps=4, seed=4), ((a, 0.0),)),
    ]
    alone = [run_member(engine, r, loras) for r, loras in plan]
    batch = engine.new_batch()
    members = [engine.prepare(engine.resolve(r), i, loras=loras)[0] for i, (r, loras) in enumerate(plan)]
    for m in members:
        batch.add(m)
    while len(batch):
        batch.step()
    for m, expected in zip(members, alone, strict=True):
        assert (m.final_latent() - expected).abs().max().item() <= 1e-4, m.key
    assert (alone[0] - alone[3]).abs().max().item() > 1e-3  # the weight matters
    assert torch.equal(alone[4], alone[5])  # weight 0 is exactly no adapter
    assert not engine.unet_loras.groups  # cleared after every call


def test_text_encoder_cache_keys_on_adapters(engine: Engine, tmp_path: Path) -> None:
    a = engine.load_lora(write_kohya(tmp_path / "a.safetensors", engine, seed=8))
    plain = engine.text.encode("a cat").tensor
    with_a = engine.text.encode("a cat", loras=[(a, 1.0)]).tensor
    half = engine.text.encode("a cat", loras=[(a, 0.5)]).tensor
    assert (plain - with_a).abs().max() > 1e-3 and (with_a - half).abs().max() > 1e-4
    assert torch.equal(engine.text.encode("a cat", loras=[(a, 0.0)]).tensor, plain)
    assert engine.text.encode("a cat", loras=[(a, 1.0)]).tensor is with_a  # a cache hit
    unet_only = LoraAdapter("u", "unknown", a.unet, {}, 4)
    assert engine.text.encode("a cat", loras=[(unet_only, 1.0)]).tensor is plain


def test_state_dict_is_unchanged_by_wrapping(engine: Engine, tmp_path: Path) -> None:
    before = dict(engine.unet.state_dict())
    a = engine.load_lora(write_kohya(tmp_path / "a.safetensors", engine, seed=9))
    engine.unet_loras.install(a)
    after = engine.unet.state_dict()
    assert before.keys() == after.keys() and all(before[k].data_ptr() == after[k].data_ptr() for k in before)


# -- bad input ----------------------------------------------------------------------------------------


def test_unmapped_keys_are_named(engine: Engine, tmp_path: Path) -> None:
    path = write_kohya(tmp_path / "a.safetensors", engine, seed=1)
    state = load_file(str(path))
    state["lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 32)
    state["lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight"] = torch.zeros(32, 4)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(
        LoraError, match=r"'bad'.*match no layer.*lora_unet_down_blocks_7_attentions_0_proj_in"
    ):
        engine.load_lora(tmp_path / "bad.safetensors")


def test_other_family_is_refused(engine: Engine, tmp_path: Path) -> None:
    state = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 64),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(64, 4),
    }
    save_file(state, str(tmp_path / "xl.safetensors"))
    with pytest.raises(LoraError, match=r"'xl' is an SDXL adapter \(lora_te1_.*this model is sd1"):
        engine.load_lora(tmp_path / "xl.safetensors")


def test_shape_mismatch_is_named(engine: Engine, tmp_path: Path) -> None:
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file(
        {f"{name}.lora_down.weight": torch.zeros(4, 320), f"{name}.lora_up.weight": torch.zeros(320, 4)},
        str(tmp_path / "big.safetensors"),
    )
    with pytest.raises(LoraError, match=rf"{name}.lora_down.weight has shape \(4, 320\).*needs \(4, 32\)"):
        engine.load_lora(tmp_path / "big.safetensors")


def test_damaged_and_foreign_files(engine: Engine, tmp_path: Path) -> None:
    good = write_kohya(tmp_path / "good.safetensors", engine, seed=1).read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(LoraError, match=r"'cut'.*truncated"):
        engine.load_lora(tmp_path / "cut.safetensors")
    with pytest.raises(LoraError, match=r"'junk'.*corrupt"):
        engine.load_lora(tmp_path / "junk.safetensors")
    with pytest.raises(LoraError, match="pickle"):
        engine.load_lora(tmp_path / "model.ckpt")
    loha = {"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}
    save_file(loha, str(tmp_path / "loha.safetensors"))
    with pytest.raises(LoraError, match=r"not LoRA weights.*hada_w1_a"):
        engine.load_lora(tmp_path / "loha.safetensors")
    for name in ("cut", "junk"):
        with pytest.raises(LoraFileError, match=name):
            lora_info(tmp_path / f"{name}.safetensors")


# -- the header reader, torch-free --------------------------------------------------------------------


def test_lora_info_reads_the_header_without_torch(engine: Engine, tmp_path: Path) -> None:
    path = write_kohya(tmp_path / "style.safetensors", engine, seed=1, rank=8)
    sd1 = tmp_path / "sd1.safetensors"
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file(
        {f"{name}.lora_down.weight": torch.zeros(16, 768), f"{name}.lora_up.weight": torch.zeros(320, 16)},
        str(sd1),
    )
    xl = tmp_path / "xl.safetensors"
    save_file({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8)}, str(xl))
    script = (
        "import sys, json\n"
        "from service.ldm.lora_info import lora_info\n"
        f"infos = [lora_info(p) for p in {[str(path), str(sd1), str(xl)]!r}]\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(json.dumps([i.__dict__ for i in infos]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    style, sd1_info, xl_info = json.loads(out.stdout)
    assert style == {
        "name": "style",
        "family": "unknown",
        "rank": 8,
        "bytes": path.stat().st_size,
        "layers": len(UNET_LAYERS) + len(TEXT_LAYERS),
    }
    assert sd1_info["family"] == "sd1" and sd1_info["rank"] == 16 and sd1_info["layers"] == 1
    assert xl_info["family"] == "sdxl"


# -- the cache ----------------------------------------------------------------------------------------


def fake_adapter(name: str, nbytes: int) -> LoraAdapter:
    return LoraAdapter(name, "sd1", {"x": LoraLayer(torch.zeros(nbytes // 4), torch.zeros(0))}, {}, 1)


def test_cache_is_lru_bounded_in_bytes() -> None:
    loads: list[str] = []

    def loader(key: str) -> LoraAdapter:
        loads.append(key)
        return fake_adapter(key, 400)

    cache = LoraCache(max_bytes=1000, loader=loader)
    a = cache.get("a")
    cache.get("b")
    assert cache.get("a") is a  # a hit, and now most recent
    cache.get("c")  # 1200 bytes: b (least recent) goes
    assert "b" not in cache and "a" in cache and "c" in cache
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.loads, stats.bytes, stats.entries) == (1, 3, 3, 800, 2)
    assert loads == ["a", "b", "c"] and stats.hit_rate == 0.25
    big = LoraCache(max_bytes=100, loader=loader).get("huge")  # larger than the cache: served, not kept
    assert big.name == "huge"


def test_cache_loads_once_under_concurrency() -> None:
    calls = 0

    def slow(key: str) -> LoraAdapter:
        nonlocal calls
        calls += 1
        time.sleep(0.05)
        return fake_adapter(key, 8)

    cache = LoraCache(max_bytes=1 << 20, loader=slow)
    got: list[LoraAdapter] = []
    threads = [threading.Thread(target=lambda: got.append(cache.get("x"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == 1 and len({id(a) for a in got}) == 1
    assert cache.stats().misses == 1 and cache.stats().hits == 7


def test_cache_failed_load_is_not_kept() -> None:
    def failing(key: str) -> LoraAdapter:
        raise LoraError(f"LoRA {key!r}: nope")

    cache = LoraCache(max_bytes=1000, loader=failing)
    for _ in range(2):
        with pytest.raises(LoraError, match="nope"):
            cache.get("x")
    assert cache.stats().misses == 2 and cache.stats().loads == 0
