"""Timing of whole pipeline calls for bench/engine.py: marks (perf_counter or CUDA events), the
phases of a call from hooks on the text encoder, UNet and VAE decoder, and the report lines."""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

Tensor = torch.Tensor

# -- timing -----------------------------------------------------------------------------------------

Mark = Any  # a perf_counter() float on the CPU, a recorded torch.cuda.Event on CUDA


class Clock:
    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def mark(self) -> Mark:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start: Mark, end: Mark) -> float:
        if self.cuda:
            return float(start.elapsed_time(end)) / 1000.0
        return float(end - start)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


@dataclass
class Phases:
    """One run's seconds: the whole call and its parts (per call, not per image)."""

    total: float
    text: float  # text-encoder forwards
    loop: float  # first UNet call start .. last UNet call end
    unet: float  # sum of the UNet forwards
    decode: float  # VAE decode
    unet_calls: int
    cpu: float = 0.0  # CPU time of the process over the call (all its threads)

    @property
    def other(self) -> float:
        return self.total - self.text - self.loop - self.decode


@dataclass
class Recorder:
    """Start and end marks of the text encoder's, the UNet's and the VAE decoder's calls in one pipeline;
    also keeps the latents the decoder was given (to compare the two pipelines' results)."""

    clock: Clock
    calls: dict[str, list[tuple[Mark, Mark]]] = field(default_factory=dict)
    started: dict[str, Mark] = field(default_factory=dict)
    decoded: Tensor | None = None

    def start(self, name: str) -> None:
        self.started[name] = self.clock.mark()

    def end(self, name: str) -> None:
        self.calls.setdefault(name, []).append((self.started.pop(name), self.clock.mark()))

    def reset(self) -> None:
        self.calls.clear()
        self.started.clear()

    def watch(self, name: str, module: torch.nn.Module) -> None:
        module.register_forward_pre_hook(lambda *_: self.start(name))
        module.register_forward_hook(lambda *_: self.end(name))

    def watch_call(self, name: str, owner: Any, attribute: str) -> None:
        """Times calls of `owner.<attribute>` (a callable looked up at each call): the engine's UNet
        runner, whose compiled graph must not contain the hooks' clock reads."""
        call: Callable[..., Any] = getattr(owner, attribute)

        def timed(*args: Any, **kwargs: Any) -> Any:
            self.start(name)
            out = call(*args, **kwargs)
            self.end(name)
            return out

        setattr(owner, attribute, timed)

    def watch_decode(self, autoencoder: Any) -> None:
        """Wraps `autoencoder.decode` (both pipelines call it by attribute, with unscaled latents)."""
        decode: Callable[..., Any] = autoencoder.decode

        def timed_decode(z: Tensor, *args: Any, **kwargs: Any) -> Any:
            self.decoded = z.detach()  # no copy to the host here: that would synchronise
            self.start("decode")
            out = decode(z, *args, **kwargs)
            self.end("decode")
            return out

        autoencoder.decode = timed_decode

    def phases(self, total: float) -> Phases:
        sec = self.clock.seconds

        def summed(name: str) -> float:
            return sum(sec(a, b) for a, b in self.calls.get(name, []))

        unet = self.calls.get("unet", [])
        loop = sec(unet[0][0], unet[-1][1]) if unet else 0.0
        return Phases(total, summed("text"), loop, summed("unet"), summed("decode"), len(unet))


@dataclass
class Side:
    name: str
    recorder: Recorder
    call: Callable[[], list[Image.Image]]
    runs: list[Phases] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)

    def run(self, clock: Clock, keep: bool) -> None:
        self.recorder.reset()
        clock.sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            images = self.call()
        clock.sync()
        total = time.perf_counter() - start
        if keep:
            phases = self.recorder.phases(total)
            phases.cpu = time.process_time() - cpu_start
            self.runs.append(phases)
            self.images = images

    def cuda_syncs(self) -> int:
        """Host-device synchronisations in one call (torch's sync debug mode), the final copy of the
        images to the host included. Each one stops the host from queueing work ahead of the GPU."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with torch.inference_mode():
                    self.call()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        return sum("synchroniz" in str(w.message) for w in caught)


def median(runs: list[Phases], attr: str) -> float:
    return statistics.median(getattr(p, attr) for p in runs)


def report(side: Side, batch: int, steps: int, show_cpu: bool) -> str:
    """Two lines: median s/image and it/s (the fastest run's s/image), then the median phases of a call."""
    total, loop = median(side.runs, "total"), median(side.runs, "loop")
    fastest = min(p.total for p in side.runs)
    ms = {k: 1000 * median(side.runs, k) for k in ("text", "loop", "unet", "decode", "other")}
    its = steps / loop if loop > 0 else float("nan")
    head = f"{side.name:<9} {total / batch:7.3f} s/image  {its:6.2f} it/s"
    cpu = f", CPU time {median(side.runs, 'cpu') / batch:.3f} s/image" if show_cpu else ""
    calls = side.runs[0].unet_calls
    return (
        f"{head}   (fastest run {fastest / batch:.3f} s/image{cpu})\n"
        f"{'':<9} per call: text {ms['text']:.0f} ms, denoise {ms['loop']:.0f} ms (in the UNet "
        f"{ms['unet']:.0f}, {calls} calls), decode {ms['decode']:.0f} ms, other {ms['other']:.0f} ms"
    )
