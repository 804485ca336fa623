"""How the engine runs its networks fast: the dtype `auto` resolves to, the memory format, and an
optional `torch.compile` of the UNet whose batch is padded up to a few sizes (buckets).

The worker's batch changes size at every admission and every finished job; a graph compiled for
fixed shapes (`dynamic=False`, what lets inductor pick its kernels and pre-pack the weights) would
be compiled again for every new size. Padding the rows up to the next power of two bounds the
compilations to a handful per latent size. Padding rows repeat the last real row (a row of zeros
would be a context with no token to attend to) and are cut off the output: nothing in the UNet
mixes rows (group norms and attention are per sample), so the real rows compute what they would
alone, and no padding row is ever seen outside this module.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager
from functools import cache
from pathlib import Path

import torch
from torch import Tensor, nn

from .unet import UNet, expand_rows

log = logging.getLogger(__name__)

# Row counts a compiled UNet is called with: a batch is padded up to the next one. Beyond the
# largest, rows run unpadded (each such size compiles once).
BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def resolve_dtype(dtype: str | None, device: str) -> str:
    """The precision a dtype setting means on `device`. None: fp16 on cuda, fp32 on cpu. `auto`: on
    cuda fp16; on cpu bf16 where the CPU has AMX tiles for it (`amx_bf16`), else fp32: oneDNN's bf16
    convolutions without AMX (AVX512-BF16 only) ran slower than fp32 here (bench/README.md)."""
    kind = torch.device(device).type
    if dtype is None or (dtype == "auto" and kind != "cpu"):
        return "fp16" if kind == "cuda" else "fp32"
    if dtype == "auto":
        return "bf16" if "amx_bf16" in cpu_flags() else "fp32"
    return dtype


def bucket(rows: int) -> int:
    """The row count a batch of `rows` is padded to for the compiled UNet."""
    return next((b for b in BUCKETS if b >= rows), rows)


def to_channels_last(module: nn.Module) -> None:
    """Moves the module's 4-d weights to NHWC memory format, in place (its state dict is unchanged)."""
    module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # missing from the stubs


def _pad_rows(t: Tensor | None, rows: int) -> Tensor | None:
    """Repeats the last row until there are `rows` (along dim 0)."""
    if t is None or t.shape[0] == rows:
        return t
    extra = t[-1:].expand(rows - t.shape[0], *t.shape[1:])
    return torch.cat([t, extra])


class UNetRunner:
    """Calls the UNet: in channels-last memory format if asked (its convolutions then run on NHWC
    and the transformers' flattening to tokens is a view, not a copy), compiled if asked."""

    def __init__(self, unet: UNet, *, channels_last: bool = False, compile: bool = False) -> None:
        self.unet = unet
        self.channels_last = channels_last
        if channels_last:
            to_channels_last(unet)
        self.compiled: nn.Module | None = None
        self.graphs: set[tuple[object, ...]] = set()  # (rows, unique rows, latent, context, mask?, y?)
        if compile:
            # Every bucket x latent size x with-or-without mask is a graph of its own.
            dynamo = torch._dynamo.config
            dynamo.recompile_limit = max(dynamo.recompile_limit, 64)
            # freezing: weights are constants of the graph, so inductor folds and pre-packs them
            # (oneDNN's blocked layouts on the CPU) once instead of at every call.
            self.compiled = torch.compile(unet, dynamic=False, options={"freezing": True})  # type: ignore[assignment]

    def __call__(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor,
        context_mask: Tensor | None = None,
        y: Tensor | None = None,
        expand: Tensor | None = None,
        *,
        eager: bool = False,
    ) -> Tensor:
        """The UNet's output for (x, t, context, context_mask, y, expand), in the usual contiguous
        layout. `eager`: the uncompiled module (per-row LoRA layers change the module between calls)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.compiled is None or eager:
            return self.unet(x, t, context, context_mask, y, expand).contiguous()
        return self._compiled_call(self.compiled, x, t, context, context_mask, y, expand).contiguous()

    def split(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor,
        context_mask: Tensor | None,
        y: Tensor | None,
        expand: Tensor,
        scopes: tuple[AbstractContextManager[object], AbstractContextManager[object]],
    ) -> Tensor:
        """As `__call__` with `expand`, eagerly, the UNet's head (x's unique rows) inside the first
        scope and the rest inside the second: per-row LoRA layers see the rows of each part."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with scopes[0]:
            prefix = self.unet.head(x, t, y)
        with scopes[1]:
            return self.unet.tail(expand_rows(prefix, expand), context, context_mask).contiguous()

    def _compiled_call(
        self,
        compiled: nn.Module,
        x: Tensor,
        t: Tensor,
        context: Tensor,
        mask: Tensor | None,
        y: Tensor | None,
        expand: Tensor | None,
    ) -> Tensor:
        rows = context.shape[0]
        padded = bucket(rows)
        # With `expand`, x, t and y have the unique rows, padded to a bucket of their own; the
        # padding rows of `expand` repeat its last index (a real row).
        unique = padded if expand is None else bucket(x.shape[0])
        args = [_pad_rows(a, unique) for a in (x, t)]
        args += [_pad_rows(a, padded) for a in (context, mask)]
        args.append(_pad_rows(y, unique))
        if expand is not None:
            args.append(_pad_rows(expand, padded))
        graph = (padded, unique, *x.shape[1:], *context.shape[1:], mask is not None, y is not None)
        fresh = graph not in self.graphs  # then this call compiles and stops the loop a while: say so
        if fresh:
            log.info(
                "compiling the UNet for %d rows (a batch of %d), %d unique, latents %s",
                padded,
                rows,
                unique,
                x.shape[1:],
            )
        started = time.perf_counter()
        out = compiled(*args)[:rows]
        if fresh:
            self.graphs.add(graph)
            log.info("compiled the UNet for %d rows in %.1f s", padded, time.perf_counter() - started)
        return out
