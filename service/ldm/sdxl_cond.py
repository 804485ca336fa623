"""SDXL's added conditioning (Podell et al. 2023, sec. 2.2) and the base -> refiner hand-off (sec. 2.5),
as diffusers' `StableDiffusionXLPipeline` and `StableDiffusionXLImg2ImgPipeline` compute them.

Time ids, in diffusers' order (sizes as height, width; the crop as top, left):
- base: original size, crop top-left, target size; the unconditional row has the same ids.
- refiner: original size, crop top-left, aesthetic score; the unconditional row has the negative
  aesthetic score and, as diffusers' refiner pipeline, the crop (0, 0).

Each id is Fourier-embedded to 256 channels (the UNet's own timestep embedding) and concatenated after
the pooled text embedding: the vector `y` that the UNet's `label_emb` adds to the time embedding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .batch import Added, Handoff, Member
from .config import SDXL_TIME_ID_WIDTH
from .request import RequestError, ResolvedRequest
from .request_sdxl import check_refiner
from .samplers import Sampler
from .schedule import DiscreteSchedule
from .sdxl_text import SDXLConditioner, SDXLEmbedding
from .unet import timestep_embedding

if TYPE_CHECKING:
    from .engine import Engine


def time_ids(request: ResolvedRequest, refiner: bool) -> tuple[Tensor, Tensor]:
    """(cond, uncond) time ids, each (1, 6) for the base or (1, 5) for the refiner, in float32."""
    assert request.original_size is not None and request.target_size is not None
    (ow, oh), (x, y), (tw, th) = request.original_size, request.crops_coords_top_left, request.target_size
    if refiner:
        cond = [oh, ow, y, x, request.aesthetic_score]
        uncond = [oh, ow, 0, 0, request.negative_aesthetic_score]
    else:
        cond = uncond = [oh, ow, y, x, th, tw]
    return torch.tensor([cond], dtype=torch.float32), torch.tensor([uncond], dtype=torch.float32)


def added_vector(text_embeds: Tensor, time_ids: Tensor) -> Tensor:
    """(B, P) pooled text and (B, n) ids -> (B, P + 256 n): sgm's `vector`, diffusers' `add_embeds`."""
    B = time_ids.shape[0]
    embedded = timestep_embedding(time_ids.flatten(), SDXL_TIME_ID_WIDTH)  # (B * n, 256), float32
    return torch.cat([text_embeds.float(), embedded.reshape(B, -1)], dim=-1)


def condition(
    member: Member, request: ResolvedRequest, cond: SDXLEmbedding, uncond: SDXLEmbedding | None, refiner: bool
) -> None:
    """Sets the member's added conditioning (pooled embeddings and time ids, per row)."""
    ids, uncond_ids = time_ids(request, refiner)
    member.added = Added(cond.pooled, ids.to(cond.pooled.device))
    if uncond is not None:
        member.uncond_added = Added(uncond.pooled, uncond_ids.to(uncond.pooled.device))


def switch_step(sampler: Sampler, schedule: DiscreteSchedule, switch_at: float) -> int:
    """The schedule index where the refiner takes over: the base runs the steps whose (integer)
    timestep is at least diffusers' cutoff, round(1000 - switch_at * 1000), as `denoising_end` does;
    the refiner the rest, as `denoising_start` does."""
    cutoff = round(schedule.num_train_timesteps - switch_at * schedule.num_train_timesteps)
    steps = len(sampler.sigmas) - 1
    timesteps = schedule.sigma_to_t(sampler.sigmas[:steps], quantize=True)  # (steps,), descending
    return int((timesteps >= cutoff).sum())


def attach_handoff(base: Engine, refiner: Engine | None, request: ResolvedRequest, member: Member) -> None:
    """Prepares the refiner's half of a hand-off request: its own text encoding of the prompts, its
    time ids (aesthetic scores), and the step where it takes over; RequestError("refiner") if the
    refiner is not loaded here or cannot take this base's latents."""
    assert request.refiner is not None
    if refiner is None:
        raise RequestError("refiner", f"model {request.refiner.model!r} is not loaded here")
    check_refiner(request.refiner, base.config, refiner.config)
    if member.sampler is None:  # strength 0: nothing is denoised, nothing to hand off
        return
    text = refiner.text
    assert isinstance(text, SDXLConditioner)
    uncond: SDXLEmbedding | None = None
    if request.guidance_scale == 1.0:
        cond = text.encode(request.prompt)
    else:
        cond, uncond = text.encode_pair(request.prompt, request.negative_prompt)
    ids, uncond_ids = time_ids(request, refiner=True)
    at = switch_step(member.sampler, base.schedule, request.refiner.switch_at)
    member.handoff = Handoff(
        at=at,
        denoiser=refiner.denoiser,
        cond=cond.tensor,
        uncond=None if uncond is None else uncond.tensor,
        added=Added(cond.pooled, ids.to(cond.pooled.device)),
        uncond_added=None if uncond is None else Added(uncond.pooled, uncond_ids.to(uncond.pooled.device)),
        decoder=refiner,
    )
