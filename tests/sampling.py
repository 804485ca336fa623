"""Test-only sampling helpers: a whole sampler run for one latent, the img2img start, and the
schedule's inverse map, used to check the samplers against diffusers' schedulers step by step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from service.ldm.samplers import Sampler
from service.ldm.schedule import DiscreteSchedule

Tensor = torch.Tensor


def noise_latent(latent: Tensor, noise: Tensor, sampler: Sampler) -> Tensor:
    """img2img start, x0 + sigma * noise at the sampler's current step: diffusers' `add_noise` in k-space."""
    return latent + noise * sampler.sigma


def sample(
    denoiser: Callable[..., Tensor],
    x: Tensor,
    sampler: Sampler,
    generator: torch.Generator | None = None,
    callback: Callable[[int, Tensor, Tensor], None] | None = None,
    **cond: Any,
) -> Tensor:
    """Runs all remaining steps for one member and returns `sampler.final(x)` (diffusers' latents);
    `callback(index, x, denoised)` is called after each model evaluation, before the step."""
    while not sampler.done:
        sigma = x.new_full((x.shape[0],), sampler.sigma, dtype=torch.float32)
        denoised = denoiser(x, sigma, **cond)
        if callback is not None:
            callback(sampler.index, x, denoised)
        x = sampler.step(x, denoised, generator)
    return sampler.final(x)


def t_to_sigma(schedule: DiscreteSchedule, t: Tensor) -> Tensor:
    """Sigma of a (fractional) timestep, interpolated in log-sigma: the inverse of `sigma_to_t`."""
    log_sigmas = schedule.log_sigmas.to(t.device)
    t = t.double().clamp(0, schedule.num_train_timesteps - 1)
    low_idx = t.floor().long().clamp(max=schedule.num_train_timesteps - 2)
    w = t - low_idx
    log_sigma = (1 - w) * log_sigmas[low_idx] + w * log_sigmas[low_idx + 1]
    return log_sigma.exp().float()
