"""Per-row LoRA in one batched UNet call, against the same batch without adapters, in one process.

    .venv/bin/python -m bench.lora                 # CPU: the 24.8M-parameter model of bench/engine.py
    .venv/bin/python -m bench.lora --threads 1     # the same on a machine shared with other jobs

A batch of 8 members (classifier-free guidance: 16 UNet rows), each with its own rank-16 adapter on
every attention projection of the UNet (to_q, to_k, to_v, to_out.0 of self- and cross-attention),
is stepped against the same 8 members without adapters; the timed runs alternate between the
variants so load on the machine hits them alike, and medians of the step time are compared. Two
ways of applying the adapters are timed: the engine's (rows grouped per adapter: index_select, A,
B, index_add_) and a gathered batched matmul (Punica's BGMV: every adapted row's A and B gathered
into one bmm each), patched in for the comparison only.

Then the first use of an adapter (reading the file, mapping its keys, moving it, swapping the
layers it adapts), and the hit rate of a `LoraCache` that holds 8 of 32 adapters over a stream of
requests whose adapters are drawn from a Zipf distribution (a few popular styles, a long tail).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from bench.engine import small_config
from bench.machine import cpu_description
from service.ldm import lora_rows
from service.ldm.checkpoint import LoadedModel
from service.ldm.engine import Engine
from service.ldm.lora import LoraAdapter, adaptable
from service.ldm.lora_cache import LoraCache
from service.ldm.lora_keys import diffusers_unet_path, unet_blocks
from service.ldm.request import GenerationRequest
from service.ldm.text import load_tokenizer
from tests.tiny import build_tiny, write_tokenizer

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def write_adapters(engine: Engine, folder: Path, count: int, rank: int, seed: int) -> list[Path]:
    """kohya files with random rank-`rank` deltas on every attention projection of the UNet."""
    blocks = unet_blocks(engine.config.unet)
    targets = [(p, layer) for p, layer in adaptable(engine.unet) if p.endswith(PROJECTIONS)]
    paths = []
    for i in range(count):
        g = torch.Generator().manual_seed(seed + i)
        state: dict[str, Tensor] = {}
        for path, layer in targets:
            assert isinstance(layer, torch.nn.Linear)
            name = "lora_unet_" + (diffusers_unet_path(path, blocks) or path).replace(".", "_")
            state[f"{name}.lora_down.weight"] = torch.randn(rank, layer.in_features, generator=g) * 0.01
            state[f"{name}.lora_up.weight"] = torch.randn(layer.out_features, rank, generator=g) * 0.01
            state[f"{name}.alpha"] = torch.tensor(float(rank))
        paths.append(folder / f"style{i:02d}.safetensors")
        save_file(state, str(paths[-1]))
    return paths


def gathered_bmm(y: Tensor, x: Tensor, runtime: Any, path: str, delta: Any) -> Tensor:
    """Every adapted row's A and B gathered per row, one bmm each (Linear only; convs as the engine)."""
    if x.ndim != 3:
        return _grouped(y, x, runtime, path, delta)
    rows, downs, ups, weights = [], [], [], []
    for group in runtime.groups:
        layer = group.adapter.layers(runtime.part).get(path)
        if layer is None:
            continue
        assert group.rows is not None
        n = group.rows.shape[0]
        rows.append(group.rows)
        downs.append(layer.down.expand(n, *layer.down.shape))  # (n, r, in)
        ups.append(layer.up.expand(n, *layer.up.shape))  # (n, out, r)
        weights.append(group.weights)
    if not rows:
        return y
    index = torch.cat(rows)
    h = torch.bmm(x.index_select(0, index), torch.cat(downs).transpose(1, 2))  # (n, N, r)
    h = h * torch.cat(weights)[:, None, None]
    return y.index_add_(0, index, torch.bmm(h, torch.cat(ups).transpose(1, 2)))  # (n, N, out)


_grouped = lora_rows._add_deltas


@contextmanager
def strategy(fn: Callable[..., Tensor]) -> Iterator[None]:
    lora_rows._add_deltas = fn
    try:
        yield
    finally:
        lora_rows._add_deltas = _grouped


def step_times(
    engine: Engine, loras: list[LoraAdapter] | None, args: argparse.Namespace
) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of each of `args.steps` steps of 8 fresh members (prompts are cached
    after the first run). CPU time is not stretched when other jobs take the cores."""
    batch = engine.new_batch()
    for i in range(args.batch):
        request = GenerationRequest(
            prompt=f"a photo of a red cat {i}",
            negative_prompt="blue",
            width=args.size,
            height=args.size,
            steps=args.steps + 1,
            guidance_scale=7.5,
            sampler="euler",
            seed=i,
        )
        resolved = engine.resolve(request)
        member, _ = engine.prepare(resolved, i, loras=[(loras[i], 1.0)] if loras else ())
        batch.add(member)
    times = []
    for _ in range(args.steps):
        start, cpu = time.perf_counter(), time.process_time()
        batch.step()
        times.append((time.perf_counter() - start, time.process_time() - cpu))
    return times


def bench_steps(engine: Engine, adapters: list[LoraAdapter], args: argparse.Namespace) -> None:
    variants: dict[str, tuple[list[LoraAdapter] | None, Callable[..., Tensor]]] = {
        "no adapters": (None, _grouped),
        "8 adapters, grouped rows (engine)": (adapters, _grouped),
        "8 adapters, gathered bmm": (adapters, gathered_bmm),
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    order = list(variants)
    for run in range(args.warmup + args.runs):
        for name in order if run % 2 == 0 else reversed(order):
            loras, fn = variants[name]
            with strategy(fn), torch.inference_mode():
                times = step_times(engine, loras, args)
            if run >= args.warmup:
                results[name] += times
    base = [statistics.median(t[i] for t in results["no adapters"]) for i in (0, 1)]
    for name, times in results.items():
        wall, cpu = (statistics.median(t[i] for t in times) for i in (0, 1))
        fastest = min(t[0] for t in times) * 1000
        print(
            f"{name:<34} {wall * 1000:7.1f} ms/step (fastest {fastest:.1f}, CPU {cpu * 1000:.1f})  "
            f"ratio {wall / base[0]:.3f} (CPU time {cpu / base[1]:.3f})"
        )
    print("target: ratio of the engine's way <= 1.3")


def bench_cache(engine: Engine, paths: list[Path], args: argparse.Namespace) -> None:
    cache = LoraCache(
        max_bytes=args.cache_adapters * engine.load_lora(paths[0]).nbytes,
        loader=lambda key: engine.load_lora(Path(key)),
    )
    rng = np.random.default_rng(args.seed)
    ranks = np.arange(1, len(paths) + 1)
    p = ranks**-args.zipf / (ranks**-args.zipf).sum()
    for i in rng.choice(len(paths), size=args.requests, p=p):
        cache.get(str(paths[i]))
    s = cache.stats()
    print(
        f"LoraCache holding {args.cache_adapters} of {len(paths)} adapters, {args.requests} requests "
        f"Zipf(s={args.zipf}): hit rate {s.hit_rate:.3f} ({s.hits} hits, {s.misses} misses), "
        f"{s.load_seconds / max(s.loads, 1) * 1000:.1f} ms per load, {s.bytes / 1e6:.1f} MB held"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.lora", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image width and height (default 256)")
    parser.add_argument("--batch", type=int, default=8, help="members, each with its own adapter (default 8)")
    parser.add_argument("--rank", type=int, default=16, help="adapter rank (default 16)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run (default 3)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each variant (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each first (default 1)")
    parser.add_argument("--adapters", type=int, default=32, help="adapters in the cache stream (default 32)")
    parser.add_argument("--cache-adapters", type=int, default=8, help="adapters the cache holds (default 8)")
    parser.add_argument("--requests", type=int, default=1000, help="requests in the stream (default 1000)")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of the stream (default 1.0)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(cpu_description())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average "
        f"{os.getloadavg()[0]:.1f} before the runs"
    )
    config = small_config()
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        folder = Path(tmp)
        tokenizer_dir = write_tokenizer(folder / "tokenizer")
        unet, vae, text = build_tiny(config, tokenizer_dir, args.seed)
        model = LoadedModel(config, unet, vae, text, load_tokenizer(tokenizer_dir), folder)  # type: ignore[arg-type]
        engine = Engine(model)
        paths = write_adapters(engine, folder, max(args.adapters, args.batch), args.rank, args.seed)
        loads = []
        adapters = []
        for path in paths[: args.batch]:
            start = time.perf_counter()
            adapter = engine.load_lora(path)
            engine.unet_loras.install(adapter)  # the layer swap of its first use
            loads.append(time.perf_counter() - start)
            adapters.append(adapter)
        params = sum(p.numel() for p in engine.unet.parameters()) / 1e6
        print(
            f"model UNet {params:.1f}M params, {args.size}x{args.size}, {args.batch} members with CFG "
            f"({2 * args.batch} rows); adapters rank {args.rank} on {len(adapters[0].unet)} layers "
            f"({paths[0].stat().st_size / 1e6:.2f} MB each)"
        )
        first = statistics.median(loads) * 1000
        print(
            f"first use of an adapter (read, map, swap layers): median {first:.1f} ms, "
            f"max {max(loads) * 1000:.1f} ms"
        )
        bench_steps(engine, adapters, args)
        bench_cache(engine, paths[: args.adapters], args)


if __name__ == "__main__":
    main()
