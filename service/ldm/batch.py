"""The heterogeneous denoising loop: one batched UNet call per step for members at any step.

Each member carries its own sampler (name, step count, position in its schedule), guidance scale,
prompt embeddings and random generator. The timestep is a per-sample input of the UNet, so the
members' noise levels can all differ and one call serves them all, classifier-free-guidance pairs
included (Ho & Salimans 2022: the negative prompt is the unconditional branch). Members join and
leave between steps; that is what lets a worker admit new requests into a running batch.

SDXL's added conditioning (pooled text, size / crop / aesthetic ids) is per row too, so members of
different `original_size` share the call. A member handed from an SDXL base to its refiner (`Handoff`)
continues on the refiner's UNet: each step makes one call per model that has members.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

from .denoiser import Denoiser
from .samplers import Sampler

if TYPE_CHECKING:
    from .lora import LoraAdapter

Tensor = torch.Tensor


@dataclass(eq=False)
class LatentBlend:
    """Inpainting with an ordinary model: outside the mask, the latent is the init image's, noised
    to the current level after every step (the method of diffusers' legacy inpainting pipeline)."""

    init: Tensor  # (1, C, h, w) clean init latent
    keep: Tensor  # (1, 1, h, w) 1 where the init image is kept
    noise: Tensor  # (1, C, h, w)

    def apply(self, x: Tensor, sigma: float, last: bool) -> Tensor:
        # On the last step, undo the sampler's final rescaling (DDIM ends at sigma_min > 0) so the
        # kept region comes back exactly.
        target = self.init * (1.0 + sigma**2) ** 0.5 if last else self.init + self.noise * sigma
        return target * self.keep + x * (1 - self.keep)


@dataclass(frozen=True)
class Added:
    """SDXL's added conditioning of one UNet row, diffusers' `added_cond_kwargs`."""

    text_embeds: Tensor  # (1, P) pooled text embedding
    time_ids: Tensor  # (1, n) original size, crop top-left, then target size (base) or aesthetic score


class Decoder(Protocol):
    """What decodes a finished member's latent (an engine)."""

    def decode(self, latents: Tensor) -> list[Any]: ...


@dataclass(eq=False)
class Handoff:
    """SDXL's "ensemble of experts" (Podell et al. 2023, sec. 2.5; Balaji et al. 2022): from step `at`
    of the schedule, the member continues on the refiner's UNet with the refiner's conditioning and
    is decoded by it. The sampler keeps its position and forgets its history (`Sampler.restart`),
    as diffusers' `denoising_start` pipeline starts a scheduler of its own."""

    at: int  # schedule index (Sampler.index) of the refiner's first step
    denoiser: Denoiser
    cond: Tensor
    uncond: Tensor | None
    added: Added
    uncond_added: Added | None
    decoder: Decoder

    def apply(self, member: Member) -> None:
        assert member.sampler is not None
        member.cond, member.uncond = self.cond, self.uncond
        member.added, member.uncond_added = self.added, self.uncond_added
        member.denoiser, member.decoder = self.denoiser, self.decoder
        member.sampler.restart()
        member.handoff = None


@dataclass(eq=False)
class Member:
    """One image being denoised. `sampler` is None when there is nothing to denoise (strength 0)."""

    key: Hashable
    sampler: Sampler | None
    x: Tensor  # (1, C, h, w) latent in the sampler's (variance-exploding) parametrisation
    cond: Tensor  # (1, L, D) prompt embedding
    uncond: Tensor | None  # (1, L, D) negative-prompt embedding; None when guidance is off
    guidance: float
    generator: torch.Generator
    # Extra UNet input channels: (1, 1 + C, h, w) inpainting's mask and masked-image latent, or (1, 3, h, w)
    # the x4 upscaler's noised low-res image (concatenated after the sampler's input scaling, as diffusers).
    concat: Tensor | None = None
    label: int | None = None  # the x4 upscaler's class: the low-res image's noise level
    blend: LatentBlend | None = None
    # LoRA adapters with their weights; they apply to both rows of the member's CFG pair.
    loras: tuple[tuple[LoraAdapter, float], ...] = ()
    steps_done: int = 0
    step_seconds: float = 0.0
    joined: float = field(default_factory=time.perf_counter)
    x0: Tensor | None = None  # (1, C, h, w) the last step's guided estimate of the clean latent
    # SDXL: added conditioning of the cond / uncond rows; a pending hand-off to the refiner, and once
    # it happened, the refiner's denoiser and decoder (None: the batch's and its engine's).
    added: Added | None = None
    uncond_added: Added | None = None
    handoff: Handoff | None = None
    denoiser: Denoiser | None = None
    decoder: Decoder | None = None

    @property
    def done(self) -> bool:
        return self.sampler is None or self.sampler.done

    @property
    def total_steps(self) -> int:
        return 0 if self.sampler is None else self.sampler.total_steps

    def final_latent(self) -> Tensor:
        """The latent in diffusers' parametrisation, scaled as the UNet sees it (times scaling_factor)."""
        return self.x if self.sampler is None else self.sampler.final(self.x)


def _pad_contexts(contexts: list[Tensor]) -> tuple[Tensor, Tensor | None]:
    """Stacks contexts of different lengths; padded keys are masked out of the cross-attention."""
    longest = max(c.shape[1] for c in contexts)
    if all(c.shape[1] == longest for c in contexts):
        return torch.cat(contexts), None
    padded = [F.pad(c, (0, 0, 0, longest - c.shape[1])) for c in contexts]
    mask = torch.zeros(len(contexts), longest, dtype=torch.bool, device=contexts[0].device)
    for i, c in enumerate(contexts):
        mask[i, : c.shape[1]] = True
    return torch.cat(padded), mask


class DenoisingBatch:
    """Members in flight; `step()` advances each of them by one step of its own sampler."""

    def __init__(self, denoiser: Denoiser, *, share_rows: bool = True) -> None:
        """`share_rows`: a CFG pair's two rows are one row of x for the UNet's layers before the
        first transformer (`UNet.forward`'s `expand`); False: every row on its own, as before."""
        self.denoiser = denoiser
        self.share_rows = share_rows
        self.members: dict[Hashable, Member] = {}
        # Per denoiser, the rows' prompt embeddings of its last call and their stacked (context, mask):
        # the same tensor again while they stay the same, so the UNet's cross-attention layers reuse
        # their keys and values (attention.py).
        self._stacked: dict[int, tuple[list[Tensor], Tensor, Tensor | None]] = {}

    def __len__(self) -> int:
        return len(self.members)

    def add(self, member: Member) -> None:
        if member.key in self.members:
            raise KeyError(f"member {member.key!r} is already in the batch")
        self.members[member.key] = member

    def remove(self, key: Hashable) -> Member | None:
        return self.members.pop(key, None)

    def step(self, keys: Collection[Hashable] | None = None) -> list[Member]:
        """Advances every member (or those of `keys`) one step; returns (and removes) the members
        that are finished."""
        active = [m for m in self.members.values() if not m.done and (keys is None or m.key in keys)]
        if active:
            started = time.perf_counter()
            self._advance(active)
            elapsed = time.perf_counter() - started
            for m in active:
                m.steps_done += 1
                m.step_seconds += elapsed
        finished = [m for m in self.members.values() if m.done]
        for m in finished:
            del self.members[m.key]
        return finished

    @torch.inference_mode()
    def _advance(self, active: list[Member]) -> None:
        groups: dict[int, tuple[Denoiser, list[Member]]] = {}
        for m in active:
            assert m.sampler is not None
            if m.handoff is not None and m.sampler.index >= m.handoff.at:
                m.handoff.apply(m)
            denoiser = m.denoiser or self.denoiser
            groups.setdefault(id(denoiser), (denoiser, []))[1].append(m)
        for denoiser, members in groups.values():  # one UNet call per model
            self._advance_with(denoiser, members)

    def _advance_with(self, denoiser: Denoiser, active: list[Member]) -> None:
        # Rows of x (one per member: the two rows of a CFG pair see the same x, t and extra channels)
        # and of everything else (one per branch); `expand` maps the latter to the former. SDXL's
        # added vector differs within a pair (pooled text), so there every branch has a row of x.
        share = self.share_rows and all(m.added is None and m.uncond_added is None for m in active)
        xs, sigmas, concats, labels, expand = [], [], [], [], []
        contexts, text_embeds, time_ids = [], [], []
        row_loras: list[tuple[tuple[LoraAdapter, float], ...]] = []
        for m in active:
            assert m.sampler is not None
            branches = (
                [(m.cond, m.added)] if m.uncond is None else [(m.cond, m.added), (m.uncond, m.uncond_added)]
            )
            for i, (context, added) in enumerate(branches):
                if i == 0 or not share:
                    xs.append(m.x)
                    sigmas.append(m.sampler.sigma)
                    if m.concat is not None:
                        concats.append(m.concat)
                    if m.label is not None:
                        labels.append(m.label)
                expand.append(len(xs) - 1)
                contexts.append(context)
                row_loras.append(m.loras)
                if added is not None:
                    text_embeds.append(added.text_embeds)
                    time_ids.append(added.time_ids)
        x = torch.cat(xs)  # (unique rows, C, h, w)
        sigma = torch.tensor(sigmas, dtype=torch.float32)  # (unique rows,), on the CPU: the denoiser moves it
        context, context_mask = self._stack(denoiser, contexts)  # (rows, L, D)
        extra: dict[str, Any] = {}
        if len(xs) < len(expand):
            extra["expand"] = torch.tensor(expand, dtype=torch.int64)  # (rows,), on the CPU
        if concats:
            if len(concats) != len(xs):
                raise ValueError("an inpainting model needs mask channels for every member")
            extra["concat"] = torch.cat(concats)
        if labels:
            if len(labels) != len(xs):
                raise ValueError("an upscaler needs a noise level for every member")
            extra["class_labels"] = torch.tensor(labels, dtype=torch.long)  # (unique rows,)
        if context_mask is not None:
            extra["context_mask"] = context_mask
        if any(row_loras):  # only then: a plain UNet callable takes no `loras`
            extra["loras"] = row_loras
        if text_embeds:
            if len(text_embeds) != len(expand):
                raise ValueError("an SDXL model needs added conditioning for every member")
            extra["text_embeds"] = torch.cat(text_embeds)  # (rows, P)
            extra["time_ids"] = torch.cat(time_ids)  # (rows, n)
        denoised = denoiser(x, sigma, context=context, **extra)  # (rows, C, h, w)

        row = 0
        for m in active:
            assert m.sampler is not None
            if m.uncond is None:
                guided = denoised[row : row + 1]
                row += 1
            else:
                cond, uncond = denoised[row : row + 1], denoised[row + 1 : row + 2]
                guided = uncond + m.guidance * (cond - uncond)
                row += 2
            m.x0 = guided
            m.x = m.sampler.step(m.x, guided, m.generator)
            if m.blend is not None:
                m.x = m.blend.apply(m.x, m.sampler.sigma, m.sampler.done)

    def _stack(self, denoiser: Denoiser, contexts: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        """`_pad_contexts(contexts)`, the last call's tensors when the rows' embeddings are the same
        tensors in the same order (they are held here, so their ids are not reused meanwhile)."""
        last = self._stacked.get(id(denoiser))
        if (
            last is not None
            and len(last[0]) == len(contexts)
            and all(a is b for a, b in zip(last[0], contexts, strict=True))
        ):
            return last[1], last[2]
        context, mask = _pad_contexts(contexts)
        self._stacked[id(denoiser)] = (contexts, context, mask)
        return context, mask
