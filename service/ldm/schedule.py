"""The discrete DDPM noise schedule of Stable Diffusion and the sigma sequences of its samplers.

Everything here lives in the k-diffusion parametrisation (Karras et al. 2022): a latent at noise
level sigma is `x = x0 + sigma * noise`, where the DDPM/VP latent of diffusers is
`x_vp = x / sqrt(1 + sigma^2)` and `sigma_t = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t])`.

The sigma sequences reproduce diffusers' schedulers configured as Stable Diffusion v1.5 ships them
(`timestep_spacing="leading"`, `steps_offset=1`, `set_alpha_to_one=False`), so a sampler run here
gives the latents of the matching diffusers pipeline.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor


class DiscreteSchedule:
    """Scaled-linear DDPM schedule of the LDM paper (Rombach et al. 2022); k-diffusion DiscreteSchedule."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        steps_offset: int = 1,
    ) -> None:
        self.num_train_timesteps = num_train_timesteps
        self.steps_offset = steps_offset
        # float32 and this order of operations, exactly as diffusers' schedulers build them, so that
        # alphas_cumprod (and everything derived from it) matches diffusers bit for bit.
        self.betas: Tensor = (
            torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        )
        self.alphas_cumprod: Tensor = torch.cumprod(1.0 - self.betas, dim=0)
        self.sigmas: Tensor = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        # float64 for the interpolation so that t -> sigma -> t round-trips to well below 1e-3.
        self.log_sigmas: Tensor = self.sigmas.double().log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: Tensor, quantize: bool = False) -> Tensor:
        """Continuous timestep of each sigma, interpolated linearly in log-sigma (k-diffusion, diffusers)."""
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.double().clamp_min(1e-10).log()
        dists = log_sigma - log_sigmas[:, None]
        # Index of the last training sigma <= sigma (argmax returns the first maximum of the cumsum).
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = log_sigmas[low_idx], log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        t = (1 - w) * low_idx + w * high_idx
        if quantize:
            # diffusers rounds the interpolated t (Karras schedules): the nearest training timestep.
            t = t.round()
        return t.to(sigma.dtype if sigma.is_floating_point() else torch.float32).reshape(sigma.shape)

    def leading_timesteps(self, steps: int, intervals: int | None = None) -> Tensor:
        """Integer timesteps of diffusers' `timestep_spacing="leading"` (Lin et al. 2023, table 2)."""
        # The train range is cut into `intervals` equal pieces (DDIM/Euler: `steps`; DPM-Solver:
        # `steps + 1`) and the top `steps` multiples of the piece, shifted by steps_offset, are kept.
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        intervals = intervals or steps
        ratio = self.num_train_timesteps // intervals
        multiples = np.arange(intervals - 1, intervals - steps - 1, -1)
        timesteps = torch.from_numpy(multiples * ratio + self.steps_offset).long()
        if ratio == 0 or timesteps[0] >= self.num_train_timesteps:
            # diffusers would index past the schedule (or silently clamp); refuse instead.
            raise ValueError(f"{steps} steps do not fit the {self.num_train_timesteps} training timesteps")
        return timesteps

    def karras_sigmas(self, steps: int, rho: float = 7.0) -> Tensor:
        """Karras et al. 2022 eq. (5) sigmas between the training sigma range, in float64 like diffusers."""
        ramp = np.linspace(0, 1, steps)
        min_inv_rho = self.sigma_min ** (1 / rho)
        max_inv_rho = self.sigma_max ** (1 / rho)
        return torch.from_numpy((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def _append(sigmas: Tensor, last: float) -> Tensor:
    return torch.cat([sigmas.double(), sigmas.new_tensor([last], dtype=torch.float64)]).float()


def ddim_sigmas(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """DDIM (Song et al. 2020) as diffusers' DDIMScheduler: ends at sigma(t=0), as set_alpha_to_one=False."""
    return _append(schedule.sigmas[schedule.leading_timesteps(steps)], schedule.sigma_min)


def euler_sigmas(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """Training sigmas at diffusers' EulerDiscreteScheduler timesteps, then 0."""
    return _append(schedule.sigmas[schedule.leading_timesteps(steps)], 0.0)


def dpmpp_sigmas(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """Training sigmas at DPMSolverMultistepScheduler's leading timesteps (range split in steps+1), then 0."""
    return _append(schedule.sigmas[schedule.leading_timesteps(steps, intervals=steps + 1)], 0.0)


def karras_sigmas(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """DPMSolverMultistepScheduler with use_karras_sigmas=True: Karras rho=7 sigmas, then 0."""
    return _append(schedule.karras_sigmas(steps), 0.0)


SIGMA_SCHEDULES: dict[str, Callable[[DiscreteSchedule, int], Tensor]] = {
    "ddim": ddim_sigmas,
    "euler": euler_sigmas,
    "euler_a": euler_sigmas,
    "dpmpp_2m": dpmpp_sigmas,
    "dpmpp_2m_karras": karras_sigmas,
}


def get_sigmas(sampler: str, schedule: DiscreteSchedule, steps: int) -> Tensor:
    """The float32 sigma sequence (steps + 1,) that diffusers' scheduler for `sampler` walks."""
    if sampler not in SIGMA_SCHEDULES:
        raise ValueError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(SIGMA_SCHEDULES)}")
    if not 1 <= steps <= schedule.num_train_timesteps:
        raise ValueError(f"steps must be in [1, {schedule.num_train_timesteps}], got {steps}")
    return SIGMA_SCHEDULES[sampler](schedule, steps)
