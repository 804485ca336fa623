"""The step loop keeps a GPU's queue full: no host-device synchronisation in `DenoisingBatch.step`.

On a GPU every read of a device tensor by the host (`.item()`, `float(t)`, `bool(t)`, `.cpu()`,
`.tolist()`, `.numpy()`), every blocking copy from the host (`.to(device)` without non_blocking),
and every op whose output shape depends on the data (`nonzero`, boolean masks) makes the host wait
for the GPU to drain its queue. CI has no GPU, so the step runs on the `meta` device, which stands
for any device that is not the host's: a dispatch mode sees every op and counts those that would
synchronise: on tensors off the CPU, and copies between the CPU and the device that block. Reads of
CPU tensors are free (the samplers' sigmas live on the CPU and are read as floats on purpose) and are
not counted. The GPU itself is checked by the `cuda` test with torch's sync debug mode.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from service.ldm.batch import DenoisingBatch
from service.ldm.checkpoint import LoadedModel
from service.ldm.engine import Engine
from service.ldm.request import GenerationRequest
from service.ldm.text import load_tokenizer

from .test_lora import write_kohya
from .tiny import build_tiny, tiny_config, write_tokenizer

aten = torch.ops.aten
READS = {aten.item, aten._local_scalar_dense, aten.is_nonzero, aten.equal}
DATA_SHAPED = {
    aten.nonzero,
    aten.masked_select,
    aten.unique_consecutive,
    aten._unique2,
    aten.repeat_interleave,
}
COPIES = {aten.to, aten._to_copy, aten.copy_}


def _off_host(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type != "cpu"


class HostSyncs(TorchDispatchMode):
    """Counts the ops that would make the host wait for the device, by kind."""

    def __init__(self) -> None:
        super().__init__()
        self.found: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in READS and any(_off_host(a) for a in args):
            self.found[f"read to the host: {packet.__name__}"] += 1
            if any(isinstance(a, torch.Tensor) and a.device.type == "meta" for a in args):
                return False if packet in (aten.is_nonzero, aten.equal) else 0.0  # meta holds no data
        if packet in DATA_SHAPED and any(_off_host(a) for a in args):
            self.found[f"data-dependent shape: {packet.__name__}"] += 1
            try:
                return func(*args, **kwargs)
            except NotImplementedError:  # meta cannot know the shape: any stands in
                return torch.empty((0, args[0].dim()), dtype=torch.int64, device=args[0].device)
        if packet in COPIES:
            named = dict(zip((a.name for a in func._schema.arguments), args, strict=False)) | kwargs
            source = named.get("src") if packet is aten.copy_ else named.get("self")
            if packet is aten.copy_:
                target = args[0].device
            elif isinstance(named.get("other"), torch.Tensor):
                target = named["other"].device
            else:
                target = torch.device(named.get("device") or source.device)
            if _off_host(source) and target.type == "cpu":
                self.found[f"copy to the host: {packet.__name__}"] += 1
                if source.device.type == "meta":  # meta holds no data to copy
                    return torch.empty(source.shape, dtype=named.get("dtype") or source.dtype)
            elif not _off_host(source) and target.type != "cpu" and not named.get("non_blocking", False):
                self.found[f"blocking copy to the device: {packet.__name__}"] += 1
        return func(*args, **kwargs)


_PY_READS = ("tolist", "numpy", "__array__")


@contextmanager
def python_reads(counter: Counter[str]) -> Iterator[None]:
    """`tolist`, `numpy` and `__array__` do not dispatch: patched to count calls on device tensors."""
    originals = {name: getattr(torch.Tensor, name) for name in _PY_READS}

    def patched(name: str) -> Any:
        def method(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.device.type != "cpu":
                counter[f"read to the host: {name}"] += 1
            return originals[name](self, *args, **kwargs)

        return method

    try:
        for name in _PY_READS:
            setattr(torch.Tensor, name, patched(name))
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def count_per_step(batch: DenoisingBatch, steps: int = 2) -> Counter[str]:
    mode = HostSyncs()
    with mode, python_reads(mode.found):
        for _ in range(steps):
            batch.step()
    return mode.found


def mixed_batch(engine: Engine, tmp_path: Path) -> DenoisingBatch:
    """Members at different steps, with every sampler, guidance on and off, prompts of different
    lengths (padded contexts), a LoRA adapter, CPU generators for the ancestral noise, and an
    inpainting member (latent blending)."""
    lora = engine.load_lora(write_kohya(tmp_path / "a.safetensors", engine, seed=5))
    long_prompt = " ".join(["a red circle on a blue square"] * 20)  # two 77-token windows
    plan = [
        (GenerationRequest(prompt="a red circle", steps=6, sampler="dpmpp_2m", seed=1), ()),
        (GenerationRequest(prompt="a cat", steps=5, sampler="euler_a", seed=2, guidance_scale=1.0), ()),
        (GenerationRequest(prompt=long_prompt, steps=6, sampler="ddim", eta=0.5, seed=3), ((lora, 0.8),)),
        (GenerationRequest(prompt="a dog", steps=7, sampler="euler", seed=4, guidance_scale=3.0), ()),
        (GenerationRequest(prompt="a fox", steps=6, sampler="dpmpp_2m_karras", seed=5), ()),
        (GenerationRequest(prompt="a hat", steps=8, seed=6, init_image=png(), mask=png(), strength=0.7), ()),
    ]
    batch = engine.new_batch()
    for i, (request, loras) in enumerate(plan):
        member, _ = engine.prepare(
            engine.resolve(request.model_copy(update={"width": 32, "height": 32})), i, loras=loras
        )
        batch.add(member)
        if i == 0:
            batch.step()  # the first member is a step ahead of the others
    return batch


def png() -> bytes:
    """A 32x32 PNG, its left half white (an inpainting mask repaints white)."""
    image = Image.new("RGB", (32, 32), "black")
    image.paste((255, 255, 255), (0, 0, 16, 32))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def engine_on(device: str, tmp_path: Path, dtype: str = "fp32") -> Engine:
    tokenizer = write_tokenizer(tmp_path / "tokenizer")
    config = tiny_config("sd1")
    unet, vae, text = build_tiny(config, tokenizer, seed=0)
    model = LoadedModel(config, unet, vae, text, load_tokenizer(tokenizer), tmp_path)  # type: ignore[arg-type]
    return Engine(model, device=device, dtype=dtype)


def syncs(op: Any) -> Counter[str]:
    mode = HostSyncs()
    with mode, python_reads(mode.found):
        op()
    return mode.found


def test_the_counter_sees_each_kind_of_sync() -> None:
    x = torch.ones(3, device="meta")
    for op in (
        lambda: x.sum().item(),
        lambda: float(x[0]),
        lambda: bool(x[0]),
        x.cpu,
        x.tolist,
        lambda: torch.ones(3).to("meta"),  # waits for the device's queue before copying
        x.nonzero,
    ):
        assert sum(syncs(op).values()) >= 1
    host = torch.ones(3)
    for op in (
        lambda: host[0].item(),  # the host's own tensor: free
        lambda: host.to("meta", non_blocking=True),
        lambda: x * 2,
    ):
        assert syncs(op) == {}


def test_a_step_has_no_host_sync(tmp_path: Path) -> None:
    engine = engine_on("meta", tmp_path)
    batch = mixed_batch(engine, tmp_path)
    assert {type(m.sampler).__name__ for m in batch.members.values()} == {"DPMPP2MSampler", "EulerSampler"}
    assert all(m.x.device.type == "meta" for m in batch.members.values())
    assert any(m.blend is not None for m in batch.members.values())
    assert count_per_step(batch) == {}


@pytest.mark.cuda
def test_a_step_has_no_host_sync_on_cuda(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    engine = engine_on("cuda", tmp_path, "fp16")
    batch = mixed_batch(engine, tmp_path)
    batch.step()  # warm-up: the first calls allocate and may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            batch.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
