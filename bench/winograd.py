"""Winograd F(2x2, 3x3) and F(4x4, 3x3) against oneDNN's direct convolution, on the 3x3 convs of
bench.engine's model (or SD 1.5's).

    .venv/bin/python -m bench.winograd              # one torch thread, 50 runs per shape and method
    .venv/bin/python -m bench.winograd --runs 200 --variants
    .venv/bin/python -m bench.winograd --sd15 --runs 10   # SD 1.5's UNet at 512x512, batch 2

The shapes come from forward hooks on the UNet and the VAE decoder of the engine bench.engine builds
(the same config and random weights, channels-last as on the CPU by default) during one 256x256 call
with guidance and 2 steps: each distinct (batch, C_in, H, W, C_out) of a 3x3 stride-1 padding-1 conv,
with how often one UNet call (or one decode) runs it. `--sd15` times instead one conv of each width of
SD 1.5's UNet under guidance (batch 2: 320 at 64x64, 640 at 32x32, 1280 at 16x16 and 8x8). Each shape
is timed (median of `--runs`) with:

- `onednn cl` / `onednn nchw`: F.conv2d on a channels-last / NCHW input (weights in the same format);
- `wino cl` / `wino nchw`: service/ldm/winograd.py's `winograd_conv` by F(2x2) on the same inputs;
- `f43 cl` / `f43 nchw`: the same by F(4x4);
- with `--variants`, variants of the channels-last path, to pick the layout: `slices`, F(2x2)'s input
  and output transforms as elementwise adds of strided slices (8 ops each way) instead of small matrix
  products; `einsum`, its 16 GEMMs as torch.einsum; `loop`, as 16 torch.mm calls; `f43 sep`, F(4x4)'s
  transforms as two products with the 6x6 B^T (4x6 A^T), one per side, instead of one with their
  Kronecker product.

`diff` is the largest |difference| of each (channels-last) from a float64 convolution, oneDNN's
included; outputs are of about unit size. `rule` is what service/ldm/winograd.py's `choose` takes.
The totals weigh each shape by its calls per UNet call / per decode: oneDNN, F(2x2) where it was
faster, the fastest of the three, and what the rule takes.
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
from service.ldm import unet as unet_module
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
    # The decoder's ResBlocks that read a skip of the head run their first conv in two parts (the
    # skip's own groups once per unique row: unet.py's forward_shared_skip), past the hooks.
    whole = unet_module.conv3x3_part

    def part(conv: nn.Conv2d, x: Tensor, start: int, bias: Tensor | None) -> Tensor:
        b, c, h, w = x.shape
        seen[("unet", b, c, h, w, conv.out_channels)] += 1
        return whole(conv, x, start, bias)

    unet_module.conv3x3_part = part  # type: ignore[assignment]
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
    try:
        with torch.inference_mode():
            engine.generate([request])
    finally:
        unet_module.conv3x3_part = whole  # type: ignore[assignment]
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
        v = torch.mm(winograd.F23.inp, tiles.reshape(16, -1)).view(16, -1, c_in)
    if gemm == "einsum":
        m = torch.einsum("knc,kco->kno", v, u)
    elif gemm == "loop":
        m = v.new_empty((16, v.shape[1], c_out))
        for k in range(16):
            torch.mm(v[k], u[k], out=m[k])
    else:
        m = torch.bmm(v, u)
    m[winograd.F23.bias_at].add_(bias)
    if transforms == "slices":
        out = _slices_out(m, b, th, tw, c_out)
    else:
        y = torch.mm(winograd.F23.out, m.view(16, -1)).view(2, 2, b, th, tw, c_out)
        out = x.new_empty((b, th, 2, tw, 2, c_out))
        out.permute(2, 4, 0, 1, 3, 5).copy_(y)
    return out.view(b, h, w, c_out).permute(0, 3, 1, 2)


# -- timing ------------------------------------------------------------------------------------------


EVICT = torch.empty(0)  # with --cold: written before every timed run (64 MB)


def median_ms(fn: Callable[[], object], runs: int, touch: Tensor | None = None) -> float:
    """Median ms of fn(); with --cold, after evicting the caches and reading `touch` (the input) back:
    in a network a conv's input was just written, its weights (and U) last read a whole call ago."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        if EVICT.numel():
            EVICT.add_(1.0)
            if touch is not None:
                touch.sum()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


METHODS = ("onednn cl", "onednn nchw", "wino cl", "wino nchw", "f43 cl", "f43 nchw")
VARIANTS = ("slices", "einsum", "loop", "f43 sep")


def f43_separable(x: Tensor, u: Tensor, bias: Tensor) -> Tensor:
    """F(4x4, 3x3) on a channels-last x (H, W multiples of 4) with each transform as two products with
    the 6x6 B^T (4x4 A^T), one per side, instead of one with their 36x36 (16x36) Kronecker product."""
    b, c_in, h, w = x.shape
    c_out = u.shape[2]
    th, tw = h // 4, w // 4
    p = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)
    sb, sh, sw, sc = p.stride()
    tiles = p.as_strided((6, 6, b, th, tw, c_in), (sh, sw, sb, 4 * sh, 4 * sw, sc))
    n = b * th * tw * c_in
    rows = torch.mm(winograd.F43.bt, tiles.reshape(6, -1)).view(6, 6, n)  # (i, s, .)
    v = torch.matmul(winograd.F43.bt, rows).view(36, -1, c_in)  # (i, j, .): B^T over s for each i
    m = torch.bmm(v, u)
    m[winograd.F43.bias_at].add_(bias)
    cols = torch.matmul(winograd.F43.at, m.view(6, 6, -1))  # (i, a, .)
    y = torch.matmul(winograd.F43.at, cols.transpose(0, 1)).view(4, 4, b, th, tw, c_out)  # (b_, a, .)
    out = x.new_empty((b, th, 4, tw, 4, c_out))
    out.permute(4, 2, 0, 1, 3, 5).copy_(y)
    return out.view(b, h, w, c_out).permute(0, 3, 1, 2)


def time_shape(
    b: int, c_in: int, h: int, w: int, c_out: int, runs: int, variants: bool
) -> tuple[dict[str, float], dict[str, float]]:
    """Median ms of each method; max |diff| from a float64 conv of F(2x2), F(4x4) and oneDNN (cl)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, c_in, h, w, generator=g)
    weight = torch.randn(c_out, c_in, 3, 3, generator=g) / (3 * c_in**0.5)  # outputs of about unit size
    bias = torch.randn(c_out, generator=g)
    xc, wc = x.contiguous(memory_format=CL), weight.contiguous(memory_format=CL)
    u, u43 = transform_weight(weight), transform_weight(weight, winograd.F43)
    even = h % 2 == 0 and w % 2 == 0
    fns: dict[str, Callable[[], Tensor]] = {
        "onednn cl": lambda: F.conv2d(xc, wc, bias, padding=1),
        "onednn nchw": lambda: F.conv2d(x, weight, bias, padding=1),
        "wino cl": lambda: winograd_conv(xc, u, bias),
        "wino nchw": lambda: winograd_conv(x, u, bias),
        "f43 cl": lambda: winograd_conv(xc, u43, bias),
        "f43 nchw": lambda: winograd_conv(x, u43, bias),
    }
    if variants and h % 4 == 0 and w % 4 == 0:
        fns["f43 sep"] = lambda: f43_separable(xc, u43, bias)
    if variants and even:
        fns["slices"] = lambda: variant(xc, u, bias, "slices", "bmm")
        fns["einsum"] = lambda: variant(xc, u, bias, "matmul", "einsum")
        fns["loop"] = lambda: variant(xc, u, bias, "matmul", "loop")
    ref = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    for name, fn in fns.items():  # every variant computes the same
        assert (fn().double() - ref).abs().max().item() < 1e-3, name
    times = {name: median_ms(fn, runs, x if "nchw" in name else xc) for name, fn in fns.items()}
    diffs = {
        name: (fns[name]().double() - ref).abs().max().item() for name in ("wino cl", "f43 cl", "onednn cl")
    }
    return times, diffs


SD15: dict[Shape, int] = {  # SD 1.5's UNet at 512x512 under guidance (batch 2): a conv of each width
    ("sd15", 2, 320, 64, 64, 320): 1,
    ("sd15", 2, 640, 32, 32, 640): 1,
    ("sd15", 2, 1280, 16, 16, 1280): 1,
    ("sd15", 2, 1280, 8, 8, 1280): 1,
}
CHOICES = {None: "onednn cl", winograd.F23: "wino cl", winograd.F43: "f43 cl"}


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
    parser.add_argument("--sd15", action="store_true", help="SD 1.5's shapes (one of each width) instead")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="weights out of cache: write 64 MB before every run (16 MB, 4x L2, was not enough)",
    )
    parser.add_argument(
        "--variants", action="store_true", help="time the variants too: " + ", ".join(VARIANTS)
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cold:
        global EVICT
        EVICT = torch.zeros(16 << 20)
    print(f"CPU {cpu_description()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {load_average()}")
    shapes = Counter(SD15) if args.sd15 else conv_shapes()
    methods = METHODS + (VARIANTS if args.variants else ())
    print(f"{'shape (where, B, C_in, HxW, C_out)':<32} {'calls':>5} " + " ".join(f"{m:>11}" for m in methods))
    totals: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for shape, calls in sorted(shapes.items(), key=lambda kv: (kv[0][0] == "vae", kv[0])):
            where, b, c_in, h, w, c_out = shape
            times, diffs = time_shape(b, c_in, h, w, c_out, args.runs, args.variants)
            probe = torch.empty(b, c_in, h, w).contiguous(memory_format=torch.channels_last)
            rule = CHOICES[winograd.choose(torch.nn.Conv2d(c_in, c_out, 3, padding=1, device="meta"), probe)]
            cols = " ".join(f"{times[m]:>11.3f}" if m in times else f"{'':>11}" for m in methods)
            label = f"{where} {b} {c_in:>3} {h}x{w} {c_out:>3}"
            print(
                f"{label:<32} {calls:>5} {cols}  /onednn F(2) {times['wino cl'] / times['onednn cl']:.2f} "
                f"F(4) {times['f43 cl'] / times['onednn cl']:.2f}  rule: {rule.split()[0]}  diff F(2) "
                f"{diffs['wino cl']:.1e} F(4) {diffs['f43 cl']:.1e} oneDNN {diffs['onednn cl']:.1e}",
                flush=True,
            )
            t = totals.setdefault(where, {"onednn": 0.0, "f23": 0.0, "best": 0.0, "rule": 0.0})
            t["onednn"] += calls * times["onednn cl"]
            t["f23"] += calls * min(times["onednn cl"], times["wino cl"])
            t["best"] += calls * min(times["onednn cl"], times["wino cl"], times["f43 cl"])
            t["rule"] += calls * times[rule]
    saving = 0.0
    for where, per in (("unet", args.steps), ("vae", 1), ("sd15", 1)):
        if where not in totals:
            continue
        t = totals[where]
        what = {"unet": "per UNet call", "vae": "per decode", "sd15": "one of each"}[where]
        print(
            f"{where} 3x3 convs {what}: oneDNN {t['onednn']:.1f} ms, F(2x2) where faster {t['f23']:.1f} ms, "
            f"the fastest of the three {t['best']:.1f} ms, by the rule {t['rule']:.1f} ms"
        )
        saving += per * (t["onednn"] - t["rule"]) if where != "sd15" else 0.0
    if not args.sd15:
        print(
            f"projected saving by the rule: {saving:.0f} ms per bench.engine call "
            f"({args.steps} UNet calls + a decode), "
            f"{100 * saving / (1e3 * args.call_s):.1f}% of {args.call_s} s"
        )


if __name__ == "__main__":
    main()
