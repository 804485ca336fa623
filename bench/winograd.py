"""Winograd F(2x2, 3x3) against oneDNN's direct convolution, on the 3x3 convs bench.engine's model runs.

    .venv/bin/python -m bench.winograd              # one torch thread, 50 runs per shape and method
    .venv/bin/python -m bench.winograd --runs 200

The shapes come from forward hooks on the UNet and the VAE decoder of the engine bench.engine builds
(the same config and random weights, channels-last as on the CPU by default) during one 256x256 call
with guidance and 2 steps: each distinct (batch, C_in, H, W, C_out) of a 3x3 stride-1 padding-1 conv,
with how often one UNet call (or one decode) runs it. Each shape is timed (median of `--runs`) with:

- `onednn cl` / `onednn nchw`: F.conv2d on a channels-last / NCHW input (weights in the same format);
- `wino cl` / `wino nchw`: service/ldm/winograd.py's `winograd_conv` on the same inputs;
- variants of its channels-last path, to pick the layout: `slices`, the input and output transforms
  as elementwise adds of strided slices (8 ops each way) instead of small matrix products; `einsum`,
  the 16 GEMMs as torch.einsum; `loop`, the 16 GEMMs as 16 torch.mm calls.

`diff` is the largest |difference| of `wino cl` from a float64 convolution, next to oneDNN's own.
The totals weigh each shape by its calls per UNet call / per decode: oneDNN, Winograd where it was
faster, and Winograd where service/ldm/winograd.py's rule (`worth_it`) takes it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.engine import SAMPLER, build_from_file, small_config
from bench.machine import cpu_description, load_average
from service.ldm import winograd
from service.ldm.engine import Engine, GenerationRequest
from service.ldm.winograd import transform_weight, winograd_conv

Shape = tuple[str, int, int, int, int, int]  # (where, batch, C_in, H, W, C_out)
CL = torch.channels_last


def conv_shapes(steps: int = 2) -> Counter[Shape]:
    """Each 3x3 stride-1 conv shape of one UNet call / one decode of bench.engine's model, with its count."""
    with tempfile.TemporaryDirectory(prefix="bench-winograd-") as tmp:
        new_model, _ = build_from_file(small_config(), Path(tmp), seed=1234)
        engine = Engine(new_model(True), "cpu", "fp32", channels_last=True)
    seen: Counter[Shape] = Counter()

    def hook(where: str) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        def record(conv: nn.Module, inputs: tuple[Tensor, ...], _: Tensor) -> None:
            assert isinstance(conv, nn.Conv2d)
            if conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1):
                b, c, h, w = inputs[0].shape
                seen[(where, b, c, h, w, conv.out_channels)] += 1

        return record

    for where, root in (("unet", engine.unet), ("vae", engine.autoencoder.decoder)):
        for module in root.modules():
            if isinstance(module, nn.Conv2d):
                module.register_forward_hook(hook(where))
    request = GenerationRequest(
        prompt="a red cat",
        negative_prompt="a blue square",
        width=256,
        height=256,
        steps=steps,
        guidance_scale=7.5,
        sampler=SAMPLER,
        seed=1,
    )
    with torch.inference_mode():
        engine.generate([request])
    return Counter({s: n // steps if s[0] == "unet" else n for s, n in seen.items()})


# -- the variants of the channels-last path ----------------------------------------------------------


def _slices_in(p: Tensor, th: int, tw: int) -> Tensor:
    """B^T d B by strided slices of the padded NHWC input p (B, Hp, Wp, C): rows, then columns."""
    b, _, wp, c = p.shape
    r = p.new_empty((4, b, th, wp, c))
    p0, p1, p2, p3 = (p[:, k : k + 2 * th : 2] for k in range(4))
    torch.sub(p0, p2, out=r[0])
    torch.add(p1, p2, out=r[1])
    torch.sub(p2, p1, out=r[2])
    torch.sub(p1, p3, out=r[3])
    v = p.new_empty((4, 4, b, th, tw, c))
    q0, q1, q2, q3 = (r[:, :, :, k : k + 2 * tw : 2] for k in range(4))
    torch.sub(q0, q2, out=v[:, 0])
    torch.add(q1, q2, out=v[:, 1])
    torch.sub(q2, q1, out=v[:, 2])
    torch.sub(q1, q3, out=v[:, 3])
    return v.view(16, -1, c)


def _slices_out(m: Tensor, b: int, th: int, tw: int, c_out: int) -> Tensor:
    """A^T m A by adds of slices, into an NHWC output (B, th, 2, tw, 2, C_out)."""
    m = m.view(4, 4, b, th, tw, c_out)
    s = m.new_empty((2, 4, b, th, tw, c_out))
    torch.add(m[0], m[1], out=s[0])
    s[0].add_(m[2])
    torch.sub(m[1], m[2], out=s[1])
    s[1].sub_(m[3])
    out = m.new_empty((b, th, 2, tw, 2, c_out))
    o = out.permute(2, 4, 0, 1, 3, 5)
    torch.add(s[:, 0], s[:, 1], out=o[:, 0])
    o[:, 0].add_(s[:, 2])
    torch.sub(s[:, 1], s[:, 2], out=o[:, 1])
    o[:, 1].sub_(s[:, 3])
    return out


def variant(x: Tensor, u: Tensor, bias: Tensor, transforms: str, gemm: str) -> Tensor:
    """winograd_conv's channels-last path (even H, W) with the transforms and the GEMM done otherwise."""
    b, c_in, h, w = x.shape
    c_out = u.shape[2]
    th, tw = h // 2, w // 2
    p = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # (B, Hp, Wp, C), contiguous for a channels-last x
    if transforms == "slices":
        v = _slices_in(p, th, tw)
    else:
        sb, sh, sw, sc = p.stride()
        tiles = p.as_strided((4, 4, b, th, tw, c_in), (sh, sw, sb, 2 * sh, 2 * sw, sc))
        v = torch.mm(winograd._IN, tiles.reshape(16, -1)).view(16, -1, c_in)
    if gemm == "einsum":
        m = torch.einsum("knc,kco->kno", v, u)
    elif gemm == "loop":
        m = v.new_empty((16, v.shape[1], c_out))
        for k in range(16):
            torch.mm(v[k], u[k], out=m[k])
    else:
        m = torch.bmm(v, u)
    m[winograd._BIAS_AT].add_(bias)
    if transforms == "slices":
        out = _slices_out(m, b, th, tw, c_out)
    else:
        y = torch.mm(winograd._OUT, m.view(16, -1)).view(2, 2, b, th, tw, c_out)
        out = x.new_empty((b, th, 2, tw, 2, c_out))
        out.permute(2, 4, 0, 1, 3, 5).copy_(y)
    return out.view(b, h, w, c_out).permute(0, 3, 1, 2)


# -- timing ------------------------------------------------------------------------------------------


def median_ms(fn: Callable[[], object], runs: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


METHODS = ("onednn cl", "onednn nchw", "wino cl", "wino nchw", "slices", "einsum", "loop")


def time_shape(
    b: int, c_in: int, h: int, w: int, c_out: int, runs: int
) -> tuple[dict[str, float], float, float]:
    """Median ms of each method; max |diff| from a float64 conv of Winograd (cl) and of oneDNN (cl)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, c_in, h, w, generator=g)
    weight = torch.randn(c_out, c_in, 3, 3, generator=g) / (3 * c_in**0.5)  # outputs of about unit size
    bias = torch.randn(c_out, generator=g)
    xc, wc = x.contiguous(memory_format=CL), weight.contiguous(memory_format=CL)
    u = transform_weight(weight)
    even = h % 2 == 0 and w % 2 == 0
    fns: dict[str, Callable[[], Tensor]] = {
        "onednn cl": lambda: F.conv2d(xc, wc, bias, padding=1),
        "onednn nchw": lambda: F.conv2d(x, weight, bias, padding=1),
        "wino cl": lambda: winograd_conv(xc, u, bias),
        "wino nchw": lambda: winograd_conv(x, u, bias),
    }
    if even:
        fns["slices"] = lambda: variant(xc, u, bias, "slices", "bmm")
        fns["einsum"] = lambda: variant(xc, u, bias, "matmul", "einsum")
        fns["loop"] = lambda: variant(xc, u, bias, "matmul", "loop")
    ref = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    for name, fn in fns.items():  # every variant computes the same
        assert (fn().double() - ref).abs().max().item() < 1e-4, name
    times = {name: median_ms(fn, runs) for name, fn in fns.items()}
    wino_diff = (fns["wino cl"]().double() - ref).abs().max().item()
    onednn_diff = (fns["onednn cl"]().double() - ref).abs().max().item()
    return times, wino_diff, onednn_diff


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=50, help="timed runs per shape and method (default 50)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--call-s",
        type=float,
        default=2.77,
        help="s of a bench.engine call, for the projection (default 2.77)",
    )
    parser.add_argument("--steps", type=int, default=20, help="UNet calls per bench.engine call (default 20)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"CPU {cpu_description()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {load_average()}")
    shapes = conv_shapes()
    print(f"{'shape (where, B, C_in, HxW, C_out)':<32} {'calls':>5} " + " ".join(f"{m:>11}" for m in METHODS))
    totals: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for shape, calls in sorted(shapes.items(), key=lambda kv: (kv[0][0] != "unet", kv[0])):
            where, b, c_in, h, w, c_out = shape
            times, wino_diff, onednn_diff = time_shape(b, c_in, h, w, c_out, args.runs)
            probe = torch.empty(b, c_in, h, w).contiguous(memory_format=torch.channels_last)
            rule = winograd.worth_it(torch.nn.Conv2d(c_in, c_out, 3, padding=1, device="meta"), probe)
            cols = " ".join(f"{times[m]:>11.3f}" if m in times else f"{'':>11}" for m in METHODS)
            label = f"{where} {b} {c_in:>3} {h}x{w} {c_out:>3}"
            print(
                f"{label:<32} {calls:>5} {cols}  wino/onednn {times['wino cl'] / times['onednn cl']:.2f}"
                f"{' (rule)' if rule else ''}  diff {wino_diff:.1e} (oneDNN {onednn_diff:.1e})",
                flush=True,
            )
            t = totals.setdefault(where, {"onednn": 0.0, "best": 0.0, "rule": 0.0})
            t["onednn"] += calls * times["onednn cl"]
            t["best"] += calls * min(times["onednn cl"], times["wino cl"])
            t["rule"] += calls * (times["wino cl"] if rule else times["onednn cl"])
    saving = 0.0
    for where, per in (("unet", args.steps), ("vae", 1)):
        t = totals.get(where, {"onednn": 0.0, "best": 0.0, "rule": 0.0})
        what = "per UNet call" if where == "unet" else "per decode"
        print(
            f"{where} 3x3 convs {what}: oneDNN {t['onednn']:.1f} ms, "
            f"Winograd where faster {t['best']:.1f} ms, by the rule {t['rule']:.1f} ms"
        )
        saving += per * (t["onednn"] - t["rule"])
    print(
        f"projected saving by the rule: {saving:.0f} ms per bench.engine call "
        f"({args.steps} UNet calls + a decode), "
        f"{100 * saving / (1e3 * args.call_s):.1f}% of {args.call_s} s"
    )


if __name__ == "__main__":
    main()
