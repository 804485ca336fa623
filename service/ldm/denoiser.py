"""Wraps a DDPM-trained UNet into the k-diffusion denoiser convention `denoised = D(x, sigma)`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from service.ldm.schedule import DiscreteSchedule

from .config import Prediction

# `unet(x_in (B, C, h, w), t (B,) float timesteps, **cond) -> eps or v (B, C, h, w)`; a plain
# Callable rather than a Protocol so that modules and functions with named cond arguments fit.
UNetFn = Callable[..., Tensor]


class Denoiser:
    """k-diffusion CompVisDenoiser (eps) / CompVisVDenoiser (v): Karras et al. 2022 table 1, VP column."""

    def __init__(
        self,
        unet: UNetFn,
        schedule: DiscreteSchedule,
        prediction: Prediction,
        *,
        quantize: bool = True,
    ) -> None:
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        self.unet = unet
        self.schedule = schedule
        self.prediction = prediction
        # diffusers always feeds the UNet integer timesteps (Karras sigmas get their t rounded), so
        # quantizing t reproduces its output; the other samplers' sigmas sit on integer t anyway.
        self.quantize = quantize

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in) for per-sample sigmas (B,), each shaped (B, 1, 1, 1)."""
        sigma = sigma.reshape(-1, 1, 1, 1)
        c_in = (sigma**2 + 1) ** -0.5
        if self.prediction == "eps":
            return sigma.new_ones(()).expand_as(sigma), -sigma, c_in
        return 1 / (sigma**2 + 1), -sigma * c_in, c_in

    def __call__(self, x: Tensor, sigma: Tensor, expand: Tensor | None = None, **cond: Any) -> Tensor:
        """Denoise each batch member `x[i]` at its own noise level `sigma[i]`.

        `expand` (B,) int64 on the CPU: x and sigma hold U unique rows and the output has B, row i
        denoising x[expand[i]] with the i-th row of every `cond` (a classifier-free-guidance pair is
        one row of x with two rows of context). The UNet gets `expand` too, as given: it computes
        the layers that read no context once per unique row (`UNet.forward`)."""
        if sigma.shape != (x.shape[0],):
            raise ValueError(f"sigma must have shape ({x.shape[0]},), got {tuple(sigma.shape)}")
        # Scalings and t in float32 whatever x is: a half-precision sigma would move t by several steps.
        # t is computed on the CPU (sigmas come from the samplers as floats) and copied without a
        # blocking device round trip, so a GPU keeps its queue of kernels full between steps.
        sigma_cpu = sigma.detach().to("cpu", torch.float32)
        t = self.schedule.sigma_to_t(sigma_cpu, quantize=self.quantize).to(x.device, non_blocking=True)
        sigma = sigma_cpu.to(x.device, non_blocking=True)
        c_skip, c_out, c_in = (c.to(x.dtype) for c in self.scalings(sigma))
        if expand is None:
            out = self.unet(x * c_in, t, **cond)
            return x * c_skip + out.to(x.dtype) * c_out
        out = self.unet(x * c_in, t, expand=expand, **cond)
        rows = expand.to(x.device, non_blocking=True)
        return x[rows] * c_skip[rows] + out.to(x.dtype) * c_out[rows]
