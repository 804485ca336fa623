"""Samplers that advance one step at a time, k-diffusion style, so that one batched model call can serve
members that use different samplers and step counts and stand at different steps.

Each member owns a `Sampler`; the caller evaluates `denoised = denoiser(x, sigma)` for the whole batch
(sigma per member) and then calls each member's `step`. Latents live in k-space (`x = x0 + sigma * n`);
`final` converts the result to diffusers' latent parametrisation.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from service.ldm.schedule import DiscreteSchedule, get_sigmas

from .request import SAMPLERS  # the names a request may give; each has a sampler below


class Sampler(ABC):
    """One member's walk down `sigmas`, from `sigmas[start_step]` to `sigmas[-1]`, one step per call."""

    def __init__(self, name: str, sigmas: Tensor, start_step: int = 0) -> None:
        self.name = name
        # Kept on the CPU: `sigma` is read as a Python float every step and must not sync a device.
        self.sigmas = sigmas.cpu()
        self.start_step = start_step
        self.index = start_step

    @property
    def sigma(self) -> float:
        return float(self.sigmas[self.index])

    @property
    def sigma_next(self) -> float:
        return float(self.sigmas[self.index + 1])

    @property
    def total_steps(self) -> int:
        """Steps this member takes (fewer than the schedule's for img2img)."""
        return len(self.sigmas) - 1 - self.start_step

    @property
    def done(self) -> bool:
        return self.index >= len(self.sigmas) - 1

    @property
    def init_noise_sigma(self) -> float:
        """Scale of txt2img's starting noise: diffusers starts from unit noise in its VP space."""
        return math.sqrt(1.0 + float(self.sigmas[0]) ** 2)

    def step(self, x: Tensor, denoised: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Move x from `sigmas[index]` to `sigmas[index + 1]` given the model's denoised estimate."""
        if self.done:
            raise RuntimeError(f"{self.name} sampler has already taken all {len(self.sigmas) - 1} steps")
        x = self._update(x, denoised, self.sigma, self.sigma_next, generator)
        self.index += 1
        return x

    def restart(self) -> None:
        """Forgets what earlier steps left (multistep history), keeping the position: a fresh scheduler
        started at this step, as a second model's pipeline starts one (SDXL's base -> refiner)."""
        return None

    def final(self, x: Tensor) -> Tensor:
        """k-space to diffusers' VP latents, x / sqrt(1 + sigma_last^2) (DDIM stops at sigma(t=0) > 0)."""
        return x / math.sqrt(1.0 + float(self.sigmas[-1]) ** 2)

    @abstractmethod
    def _update(
        self, x: Tensor, denoised: Tensor, sigma: float, sigma_next: float, generator: torch.Generator | None
    ) -> Tensor: ...


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    # Drawn on the generator's device and then moved, like diffusers' `randn_tensor`, so that a CPU
    # generator gives the same noise whatever device x lives on. The copy does not block: from
    # pageable memory CUDA stages it at once and returns, without waiting for the kernels queued.
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
    return noise.to(x.device, non_blocking=True)


class EulerSampler(Sampler):
    """Euler (Karras et al. 2022, Alg. 2 without churn); eta > 0: k-diffusion `sample_euler_ancestral`.

    On DDIM's sigmas this is DDIM (Song et al. 2020): eta = 0 is Euler in k-space, and the ancestral
    step's sigma_up equals diffusers' DDIM std_dev_t expressed in k-space.
    """

    def __init__(self, name: str, sigmas: Tensor, start_step: int = 0, eta: float = 0.0) -> None:
        super().__init__(name, sigmas, start_step)
        self.eta = eta

    def _update(
        self, x: Tensor, denoised: Tensor, sigma: float, sigma_next: float, generator: torch.Generator | None
    ) -> Tensor:
        sigma_up = min(
            sigma_next, self.eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        )
        sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
        d = (x - denoised) / sigma
        x = x + d * (sigma_down - sigma)
        if self.eta > 0:
            # Drawn even on the last step (sigma_up = 0), as diffusers does, to consume the generator alike.
            x = x + _randn_like(x, generator) * sigma_up
        return x


class DPMPP2MSampler(Sampler):
    """DPM-Solver++(2M), Lu et al. 2022, as k-diffusion `sample_dpmpp_2m` (midpoint in log-SNR)."""

    def __init__(self, name: str, sigmas: Tensor, start_step: int = 0) -> None:
        super().__init__(name, sigmas, start_step)
        self.old_denoised: Tensor | None = None

    def restart(self) -> None:
        self.old_denoised = None  # the next step is first order, as a fresh DPMSolverMultistepScheduler's

    def _update(
        self, x: Tensor, denoised: Tensor, sigma: float, sigma_next: float, generator: torch.Generator | None
    ) -> Tensor:
        old_denoised, self.old_denoised = self.old_denoised, denoised
        if sigma_next == 0:
            # First-order step to sigma 0 (lambda = inf) lands exactly on the denoised estimate.
            return denoised
        t, t_next = -math.log(sigma), -math.log(sigma_next)
        h = t_next - t
        if old_denoised is not None:
            # Second order from the previous estimate; the first step has none and stays first order.
            h_last = t + math.log(float(self.sigmas[self.index - 1]))
            r = h_last / h
            denoised = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        return (sigma_next / sigma) * x - math.expm1(-h) * denoised


def make_sampler(
    name: str,
    schedule: DiscreteSchedule,
    steps: int,
    *,
    eta: float = 0.0,
    start_step: int = 0,
) -> Sampler:
    """A fresh sampler over diffusers' sigmas for `name`; `eta` is DDIM's (the others ignore it)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 <= start_step < steps:
        raise ValueError(f"start_step must be in [0, {steps}), got {start_step}")
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    sigmas = get_sigmas(name, schedule, steps)
    if name == "ddim":
        return EulerSampler(name, sigmas, start_step, eta=eta)
    if name == "euler":
        return EulerSampler(name, sigmas, start_step)
    if name == "euler_a":
        # Full ancestral noise, as diffusers' EulerAncestralDiscreteScheduler (it has no eta).
        return EulerSampler(name, sigmas, start_step, eta=1.0)
    return DPMPP2MSampler(name, sigmas, start_step)


def img2img_start_step(steps: int, strength: float) -> int:
    """First step of img2img at `strength`, as diffusers' StableDiffusionImg2ImgPipeline.get_timesteps.

    `steps` itself means no step is left to run (strength 0, or too low for `steps`): the caller
    returns the init latent as is (diffusers would fail on the empty timestep list).
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    init_timestep = min(int(steps * strength), steps)
    return max(steps - init_timestep, 0)
