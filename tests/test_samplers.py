"""Schedule, denoiser and samplers against diffusers' schedulers, run as StableDiffusionPipeline runs them.

No UNet: an analytic, t-dependent, non-linear "model" stands in for it, so every parity failure is a
schedule or update-rule mismatch, not model noise.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from service.ldm.denoiser import Denoiser, Prediction
from service.ldm.samplers import SAMPLERS, Sampler, img2img_start_step, make_sampler
from service.ldm.schedule import DiscreteSchedule, get_sigmas

from .sampling import noise_latent, sample, t_to_sigma

diffusers = pytest.importorskip("diffusers")

SHAPE = (1, 4, 8, 8)
DIFFUSERS_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "timestep_spacing": "leading",
    "steps_offset": 1,
}
DETERMINISTIC = ("ddim", "euler", "dpmpp_2m", "dpmpp_2m_karras")


def eps_fn(x: Tensor, t: Tensor) -> Tensor:
    """Stand-in UNet output (eps or v): non-linear in x and dependent on the timestep."""
    return torch.tanh(0.5 * x + 0.001 * t.reshape(-1, 1, 1, 1))


@pytest.fixture(scope="module")
def schedule() -> DiscreteSchedule:
    return DiscreteSchedule()


def diffusers_scheduler(name: str, prediction: Prediction = "eps") -> Any:
    kwargs = {**DIFFUSERS_CONFIG, "prediction_type": {"eps": "epsilon", "v": "v_prediction"}[prediction]}
    if name == "ddim":
        return diffusers.DDIMScheduler(**kwargs, set_alpha_to_one=False, clip_sample=False)
    if name == "euler":
        return diffusers.EulerDiscreteScheduler(**kwargs)
    if name == "euler_a":
        return diffusers.EulerAncestralDiscreteScheduler(**kwargs)
    return diffusers.DPMSolverMultistepScheduler(
        **kwargs,
        algorithm_type="dpmsolver++",
        solver_order=2,
        use_karras_sigmas=name == "dpmpp_2m_karras",
    )


def run_diffusers(
    name: str,
    prediction: Prediction,
    steps: int,
    noise: Tensor,
    *,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    strength: float | None = None,
    init_latent: Tensor | None = None,
) -> Tensor:
    """The denoising loop of StableDiffusionPipeline / StableDiffusionImg2ImgPipeline."""
    scheduler = diffusers_scheduler(name, prediction)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    if strength is None:
        latents = noise * scheduler.init_noise_sigma
    else:
        assert init_latent is not None
        # StableDiffusionImg2ImgPipeline.get_timesteps and prepare_latents
        t_start = max(steps - min(int(steps * strength), steps), 0)
        timesteps = timesteps[t_start:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start)
        latents = scheduler.add_noise(init_latent, noise, timesteps[:1])
    step_kwargs: dict[str, Any] = {"generator": generator}
    if name == "ddim":
        step_kwargs["eta"] = eta
    for t in timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        latents = scheduler.step(eps_fn(model_input, t), t, latents, **step_kwargs).prev_sample
    return latents


def run_ours(
    schedule: DiscreteSchedule,
    name: str,
    prediction: Prediction,
    steps: int,
    noise: Tensor,
    *,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    strength: float | None = None,
    init_latent: Tensor | None = None,
) -> Tensor:
    denoiser = Denoiser(eps_fn, schedule, prediction)
    if strength is None:
        sampler = make_sampler(name, schedule, steps, eta=eta)
        x = noise * sampler.init_noise_sigma
    else:
        assert init_latent is not None
        sampler = make_sampler(name, schedule, steps, eta=eta, start_step=img2img_start_step(steps, strength))
        x = noise_latent(init_latent, noise, sampler)
    return sample(denoiser, x, sampler, generator)


# --- schedule -----------------------------------------------------------------------------------


def test_alphas_cumprod_match_diffusers(schedule: DiscreteSchedule) -> None:
    assert torch.equal(schedule.alphas_cumprod, diffusers_scheduler("ddim").alphas_cumprod)


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 20, 50, 333])
def test_sigmas_and_timesteps_match_diffusers(schedule: DiscreteSchedule, name: str, steps: int) -> None:
    scheduler = diffusers_scheduler(name)
    scheduler.set_timesteps(steps)
    sigmas = get_sigmas(name, schedule, steps)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (steps + 1,)
    t = schedule.sigma_to_t(sigmas[:-1], quantize=True)
    assert torch.equal(t.long(), scheduler.timesteps.long())
    if name == "ddim":
        # DDIM's last step targets alphas_cumprod[0] (set_alpha_to_one=False), not sigma 0.
        alphas = torch.cat(
            [scheduler.alphas_cumprod[scheduler.timesteps], scheduler.final_alpha_cumprod[None]]
        )
        torch.testing.assert_close(sigmas, ((1 - alphas) / alphas) ** 0.5, rtol=1e-6, atol=0)
    else:
        assert torch.equal(sigmas, scheduler.sigmas)


def test_sigma_t_round_trip(schedule: DiscreteSchedule) -> None:
    t = torch.linspace(0, 999, 4001)
    torch.testing.assert_close(schedule.sigma_to_t(t_to_sigma(schedule, t)), t, rtol=0, atol=1e-3)
    integers = torch.arange(1000).float()
    assert torch.equal(schedule.sigma_to_t(t_to_sigma(schedule, integers), quantize=True), integers)


def test_sigma_to_t_matches_diffusers_on_a_batch(schedule: DiscreteSchedule) -> None:
    sigmas = torch.tensor([0.001, 0.0292, 0.1, 0.77, 3.3, 14.6, 20.0])
    log_sigmas = np.log(diffusers_scheduler("euler").sigmas.numpy()[:-1][::-1].copy())
    expected = diffusers_scheduler("euler")._sigma_to_t(sigmas.numpy(), log_sigmas)
    t = schedule.sigma_to_t(sigmas)
    assert t.shape == (7,)
    np.testing.assert_allclose(t.numpy(), expected, rtol=0, atol=1e-3)


@pytest.mark.parametrize("steps", [0, 999, 1001])
def test_impossible_step_counts_are_refused(schedule: DiscreteSchedule, steps: int) -> None:
    with pytest.raises(ValueError, match="steps"):
        get_sigmas("dpmpp_2m", schedule, steps)


# --- denoiser -----------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_denoiser_is_per_sample(schedule: DiscreteSchedule, prediction: Prediction) -> None:
    denoiser = Denoiser(eps_fn, schedule, prediction)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([14.6, 1.0, 0.03])
    batched = denoiser(x, sigma)
    for i in range(3):
        torch.testing.assert_close(batched[i : i + 1], denoiser(x[i : i + 1], sigma[i : i + 1]))
    s = sigma.view(-1, 1, 1, 1)
    out = eps_fn(x / (s**2 + 1) ** 0.5, schedule.sigma_to_t(sigma, quantize=True))
    expected = x - s * out if prediction == "eps" else x / (s**2 + 1) - s / (s**2 + 1) ** 0.5 * out
    torch.testing.assert_close(batched, expected)


def test_denoiser_rejects_a_scalar_sigma(schedule: DiscreteSchedule) -> None:
    with pytest.raises(ValueError, match="shape"):
        Denoiser(eps_fn, schedule, "eps")(torch.zeros(2, 4, 8, 8), torch.tensor(1.0))


# --- sampler parity -----------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("steps", [1, 5, 20])
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_parity(
    schedule: DiscreteSchedule, name: str, steps: int, prediction: Prediction
) -> None:
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps))
    expected = run_diffusers(name, prediction, steps, noise)
    ours = run_ours(schedule, name, prediction, steps, noise)
    assert (ours - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize(("name", "eta"), [("ddim", 0.5), ("ddim", 1.0), ("euler_a", 0.0)])
def test_stochastic_parity(schedule: DiscreteSchedule, name: str, eta: float, prediction: Prediction) -> None:
    # One generator per run, used first for the initial noise and then for every step's noise,
    # as the pipelines use the `generator` they are given.
    gen = torch.Generator().manual_seed(1234)
    expected = run_diffusers(name, prediction, 20, torch.randn(SHAPE, generator=gen), generator=gen, eta=eta)
    gen = torch.Generator().manual_seed(1234)
    ours = run_ours(schedule, name, prediction, 20, torch.randn(SHAPE, generator=gen), generator=gen, eta=eta)
    assert (ours - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
@pytest.mark.parametrize("name", SAMPLERS)
def test_img2img_parity(schedule: DiscreteSchedule, name: str, strength: float) -> None:
    gen = torch.Generator().manual_seed(7)
    init_latent, noise = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    steps_gen = torch.Generator().manual_seed(8)
    expected = run_diffusers(
        name, "eps", 10, noise, strength=strength, init_latent=init_latent, generator=steps_gen
    )
    steps_gen = torch.Generator().manual_seed(8)
    ours = run_ours(
        schedule, name, "eps", 10, noise, strength=strength, init_latent=init_latent, generator=steps_gen
    )
    assert (ours - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m_karras"])
def test_noise_latent_is_add_noise_in_k_space(schedule: DiscreteSchedule, name: str) -> None:
    gen = torch.Generator().manual_seed(3)
    init_latent, noise = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    start = img2img_start_step(25, 0.6)
    sampler = make_sampler(name, schedule, 25, start_step=start)
    scheduler = diffusers_scheduler(name)
    scheduler.set_timesteps(25)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    noised = scheduler.add_noise(init_latent, noise, scheduler.timesteps[start : start + 1])
    ours = noise_latent(init_latent, noise, sampler)
    if name != "euler":
        # diffusers' DDIM and DPM-Solver latents are in VP space: x_vp = x_k / sqrt(1 + sigma^2).
        ours = ours / (1 + sampler.sigma**2) ** 0.5
    torch.testing.assert_close(ours, noised, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("steps", "strength"), [(50, 0.8), (10, 0.3), (20, 1.0), (100, 0.29), (7, 0.5), (10, 0.05), (10, 0.0)]
)
def test_img2img_start_step(steps: int, strength: float) -> None:
    init_timestep = min(int(steps * strength), steps)
    assert img2img_start_step(steps, strength) == max(steps - init_timestep, 0)


def test_img2img_start_step_refuses_a_bad_strength() -> None:
    with pytest.raises(ValueError, match="strength"):
        img2img_start_step(10, 1.5)


# --- sampler behaviour --------------------------------------------------------------------------


def test_batched_members_match_solo_runs(schedule: DiscreteSchedule) -> None:
    """The service's loop: one model call for members with different samplers, step counts and steps."""
    denoiser = Denoiser(eps_fn, schedule, "eps")
    specs: list[tuple[str, int, int]] = [("dpmpp_2m_karras", 12, 0), ("euler_a", 7, 0), ("ddim", 9, 4)]
    seeds = [11, 12, 13]

    solo = []
    for (name, steps, start), seed in zip(specs, seeds, strict=True):
        gen = torch.Generator().manual_seed(seed)
        sampler = make_sampler(name, schedule, steps, start_step=start)
        x = torch.randn(SHAPE, generator=gen) * sampler.init_noise_sigma
        solo.append(sample(denoiser, x, sampler, gen))

    samplers: list[Sampler] = []
    gens, xs = [], []
    for (name, steps, start), seed in zip(specs, seeds, strict=True):
        gens.append(torch.Generator().manual_seed(seed))
        samplers.append(make_sampler(name, schedule, steps, start_step=start))
        xs.append(torch.randn(SHAPE, generator=gens[-1]) * samplers[-1].init_noise_sigma)
    while not all(s.done for s in samplers):
        live = [i for i, s in enumerate(samplers) if not s.done]
        denoised = denoiser(torch.cat([xs[i] for i in live]), torch.tensor([samplers[i].sigma for i in live]))
        for j, i in enumerate(live):
            xs[i] = samplers[i].step(xs[i], denoised[j : j + 1], gens[i])
    for sampler, x, expected in zip(samplers, xs, solo, strict=True):
        torch.testing.assert_close(sampler.final(x), expected, rtol=0, atol=1e-6)


def test_sampler_state(schedule: DiscreteSchedule) -> None:
    sampler = make_sampler("euler", schedule, 4, start_step=1)
    assert sampler.index == 1 and not sampler.done
    assert sampler.sigma == float(sampler.sigmas[1])
    assert sampler.init_noise_sigma == pytest.approx((1 + float(sampler.sigmas[0]) ** 2) ** 0.5)
    seen: list[int] = []
    sample(lambda x, s: x * 0, torch.ones(SHAPE), sampler, callback=lambda i, x, d: seen.append(i))
    assert seen == [1, 2, 3] and sampler.done
    with pytest.raises(RuntimeError):
        sampler.step(torch.ones(SHAPE), torch.ones(SHAPE), None)


def test_euler_a_is_seeded(schedule: DiscreteSchedule) -> None:
    def run(seed: int) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        return run_ours(schedule, "euler_a", "eps", 6, torch.randn(SHAPE, generator=gen), generator=gen)

    assert torch.equal(run(5), run(5))
    assert not torch.allclose(run(5), run(6))


def test_unknown_sampler_names_the_valid_ones(schedule: DiscreteSchedule) -> None:
    with pytest.raises(ValueError, match="dpmpp_2m_karras"):
        make_sampler("plms", schedule, 20)


@pytest.mark.parametrize(("steps", "start_step"), [(0, 0), (10, 10), (10, -1)])
def test_invalid_steps(schedule: DiscreteSchedule, steps: int, start_step: int) -> None:
    with pytest.raises(ValueError, match="step"):
        make_sampler("euler", schedule, steps, start_step=start_step)
