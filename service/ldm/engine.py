"""The engine: a model loaded once, and `generate` over a list of requests.

txt2img, img2img (init image + strength) and inpainting (mask): natively with 9-channel inpainting
checkpoints, and by latent blending with ordinary ones. Requests are prepared into batch members
(`prepare`), advanced together (`DenoisingBatch`) and decoded as they finish (`decode_members`); a
worker uses the same three calls to run continuous batching. SDXL models condition through
`sdxl_text.py` and `sdxl_cond.py`; an SDXL base hands a request's latent to a refiner engine given
to `prepare` (`refiner=`). An x4 upscaler (`config.is_upscaler`) takes the request's low-res image,
noised to its `noise_level`, as extra UNet channels and the noise level as its class (diffusers'
StableDiffusionUpscalePipeline); its large outputs are decoded in tiles (`tiling.py`, `decode_tile`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from . import request as rules
from .batch import DenoisingBatch, LatentBlend, Member
from .checkpoint import LoadedModel, load_model
from .config import ModelConfig, Prediction
from .denoiser import Denoiser
from .images import decode_image, mask_to_tensor, to_images, to_tensor
from .lora import LoraAdapter, adaptable, load_lora
from .lora_keys import LoraNames, Part
from .lora_rows import LoraRuntime, RowLoras, group_rows
from .request import GenerationRequest, RequestError, ResolvedRequest
from .samplers import img2img_start_step, make_sampler
from .schedule import DiscreteSchedule
from .sdxl_cond import added_vector, attach_handoff, condition
from .sdxl_text import SDXLConditioner, SDXLEmbedding, SDXLText
from .text import TextConditioner
from .tiling import DECODE_TILE, decode_tiled
from .unet_runner import UNetRunner, resolve_dtype, to_channels_last

log = logging.getLogger(__name__)
Tensor = torch.Tensor
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# What `auto` and None resolve to is `unet_runner.resolve_dtype`'s.
DTYPE_CHOICES = ("auto", *DTYPES)


@dataclass
class GenerationResult:
    request: ResolvedRequest
    image: Image.Image | None  # None when cancelled
    prompt_tokens: int
    timings: dict[str, float] = field(default_factory=dict)  # milliseconds
    cancelled: bool = False


ProgressCallback = Callable[[int, int, int], None]  # (request index, step, total steps)


class Engine:
    """A latent diffusion model held warm on one device."""

    def __init__(
        self,
        model: LoadedModel,
        device: str = "cpu",
        dtype: str | None = "fp32",
        text_cache: int = 256,
        decode_tile: int = DECODE_TILE,
        *,
        channels_last: bool | None = None,
        compile: bool = False,
    ):
        """`dtype`: fp32, fp16, bf16, `auto` or None (the device's default: `resolve_dtype`).
        `channels_last`: the UNet and the VAE in NHWC memory format (None: on the CPU, where oneDNN's
        convolutions prefer it; the numbers are the same to ~1e-6). `compile`: the UNet through
        `torch.compile` with batch buckets (`unet_runner.py`); the first call of each bucket compiles."""
        dtype = resolve_dtype(dtype, device)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}")
        if torch.device(device).type == "cpu" and dtype == "fp16":
            raise ValueError("fp16 runs on cuda only; on the CPU use fp32 or bf16")
        self.model = model
        self.config: ModelConfig = model.config
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.unet = model.unet.to(self.device, self.dtype).eval()
        # The SD autoencoder overflows in fp16; like diffusers, it stays in fp32 unless bf16 is asked.
        vae_dtype = torch.bfloat16 if self.dtype == torch.bfloat16 else torch.float32
        self.autoencoder = model.autoencoder.to(self.device, vae_dtype).eval()
        self.channels_last = self.device.type == "cpu" if channels_last is None else channels_last
        if self.channels_last:
            to_channels_last(self.autoencoder)
        self.runner = UNetRunner(self.unet, channels_last=self.channels_last, compile=compile)
        self.text: TextConditioner | SDXLConditioner
        if self.config.is_sdxl:
            self.text = SDXLConditioner(self._sdxl_text(model), not self.config.is_refiner, text_cache)
        else:
            text_model = model.text_model.to(device=self.device, dtype=self.dtype)  # type: ignore[call-arg]
            self.text = TextConditioner(text_model, model.tokenizer, text_cache)
        if decode_tile < 8:
            raise ValueError(f"decode_tile must be at least 8 latents, got {decode_tile}")
        self.decode_tile = decode_tile
        self.schedule = DiscreteSchedule(beta_start=self.config.beta_start, beta_end=self.config.beta_end)
        # The x4 upscaler's low-res noise schedule: the file's buffers, else its betas (the same numbers).
        low_res = model.low_res_alphas_cumprod
        self.low_res_alphas = self.schedule.alphas_cumprod if low_res is None else low_res.float()
        self.denoiser = Denoiser(self._unet_call, self.schedule, self.config.prediction)
        self.lora_layers: dict[tuple[Part, str], torch.nn.Module] = {
            ("unet", path): layer for path, layer in adaptable(self.unet)
        }
        for part, encoder in self.text.lora_encoders():
            self.lora_layers |= {(part, path): layer for path, layer in adaptable(encoder)}
        self.lora_names = LoraNames(self.config.unet, *_paths(self.lora_layers))
        self.unet_loras = LoraRuntime.of(self.unet, "unet")
        # A CFG pair's rows computed once up to the UNet's first transformer (DenoisingBatch).
        self.share_rows = True

    @classmethod
    def load(
        cls,
        path: Path,
        tokenizer_dir: Path | None = None,
        device: str = "cpu",
        dtype: str | None = "fp32",
        prediction: Prediction | None = None,
        decode_tile: int = DECODE_TILE,
        *,
        channels_last: bool | None = None,
        compile: bool = False,
    ) -> Engine:
        model = load_model(path, tokenizer_dir, prediction)
        return cls(
            model, device, dtype, decode_tile=decode_tile, channels_last=channels_last, compile=compile
        )

    def _sdxl_text(self, model: LoadedModel) -> SDXLText:
        """SDXL's encoders on this engine's device and dtype."""
        encoders = [m for m in (model.text_model, model.text_model_2) if m is not None]
        tokenizers = [t for t in (model.tokenizer, model.tokenizer_2) if t is not None]
        assert model.text_projection is not None
        return SDXLText(
            [m.to(device=self.device, dtype=self.dtype) for m in encoders],  # type: ignore[call-arg]
            tokenizers,
            model.text_projection.to(self.device, self.dtype),
        )

    def _unet_call(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor,
        context_mask: Tensor | None = None,
        concat: Tensor | None = None,
        loras: RowLoras | None = None,
        text_embeds: Tensor | None = None,
        time_ids: Tensor | None = None,
        class_labels: Tensor | None = None,
        expand: Tensor | None = None,
    ) -> Tensor:
        """The UNet's output for the rows of `context`; `expand` (rows,) on the CPU: x, t, concat and
        class_labels hold the unique rows, and row i is x[expand[i]] (`DenoisingBatch`)."""
        if concat is not None:
            # (B, 4 + 1 + 4, h, w) for inpainting UNets, (B, 4 + 3, h, w) for the x4 upscaler
            x = torch.cat([x, concat.to(x.device, x.dtype)], dim=1)
        y = None if class_labels is None else class_labels.to(self.device)  # (B,) the upscaler's noise levels
        if text_embeds is not None and time_ids is not None:  # SDXL: per row, (B, adm_in_channels)
            y = added_vector(text_embeds.to(self.device), time_ids.to(self.device))
        groups = group_rows(loras, self.device, self.dtype) if loras else ()
        x, context, t = x.to(self.dtype), context.to(self.dtype), t.to(self.device)
        rows = None if expand is None else expand.to(self.device, non_blocking=True)
        if groups and expand is not None and rows is not None:
            # The head runs on the unique rows: its LoRA rows are those of each one's first row.
            firsts = {int(u): i for i, u in reversed(list(enumerate(expand.tolist())))}
            assert loras is not None
            unique = group_rows([loras[firsts[u]] for u in range(len(firsts))], self.device, self.dtype)
            scopes = (self.unet_loras.active(unique), self.unet_loras.active(groups))
            return self.runner.split(x, t, context, context_mask, y, rows, scopes).float()
        with self.unet_loras.active(groups):
            # Per-row LoRA layers run eagerly: they change between calls, a compiled graph would not.
            out = self.runner(x, t, context, context_mask, y, rows, eager=bool(groups))
        return out.float()

    def load_lora(self, path: Path, name: str | None = None) -> LoraAdapter:
        """Reads a LoRA file for this model, on its device and in its dtype (for a `LoraCache`)."""
        adapter = load_lora(path, self.lora_names, self.lora_layers, self.config.family, name)
        return adapter.to(self.device, self.dtype)

    # -- requests ---------------------------------------------------------------------------------

    def resolve(self, request: GenerationRequest) -> ResolvedRequest:
        """Fills in the model's defaults and checks the request's rules (`request.resolve`, hard
        bounds); RequestError names the field."""
        return rules.resolve(request, self.config)

    def prepare(
        self,
        request: ResolvedRequest,
        key: Hashable,
        *,
        loras: Sequence[tuple[LoraAdapter, float]] = (),
        refiner: Engine | None = None,
    ) -> tuple[Member, int]:
        """Encodes the prompts and draws the starting latent; returns the member and its token count.

        `loras`: adapters (from `load_lora`) with their weights, applied to this member's prompt
        encoding and to its rows of every UNet call. `refiner`: the engine of `request.refiner.model`
        (an SDXL refiner), for a base -> refiner hand-off.
        """
        cfg = self.config
        f = cfg.downsample_factor
        shape = (1, cfg.latent_channels, request.height // f, request.width // f)
        generator = torch.Generator("cpu").manual_seed(request.seed)
        # The upscaler draws its low-res image's noise first, then the latent's, as diffusers does.
        low_res = self._low_res(request, generator) if cfg.is_upscaler else None
        # The convention of diffusers and of A1111's CPU RNG: noise does not depend on batch-mates.
        noise = torch.randn(shape, generator=generator).to(self.device)  # (1, C, h, w)
        if request.guidance_scale == 1.0:
            cond_emb = self.text.encode(request.prompt, loras=loras)
            uncond = None
        else:
            cond_emb, uncond_emb = self.text.encode_pair(request.prompt, request.negative_prompt, loras)
            uncond = uncond_emb.tensor
        member = Member(
            key=key,
            sampler=None,
            x=noise,
            cond=cond_emb.tensor,
            uncond=uncond,
            guidance=request.guidance_scale,
            generator=generator,
            loras=tuple((adapter, float(weight)) for adapter, weight in loras),
        )
        if low_res is not None:
            member.concat, member.label = low_res, request.noise_level
        self._start_latent(member, request, noise)
        if isinstance(cond_emb, SDXLEmbedding):
            uncond_sdxl = None if uncond is None else uncond_emb
            assert uncond_sdxl is None or isinstance(uncond_sdxl, SDXLEmbedding)
            condition(member, request, cond_emb, uncond_sdxl, self.config.is_refiner)
        if request.refiner is not None:
            attach_handoff(self, refiner, request, member)
        return member, cond_emb.tokens

    def _low_res(self, request: ResolvedRequest, generator: torch.Generator) -> Tensor:
        """The upscaler's low-res image in [-1, 1], noised to `noise_level` on its own DDPM schedule
        (diffusers' `low_res_scheduler.add_noise`; the original's ImageConcatWithNoiseAugmentation)."""
        if request.image is None:
            raise RequestError("image", "an x4 upscaler needs an image to upscale")
        pixels = decode_image(request.image, "image")
        f = self.config.downsample_factor
        image = to_tensor(pixels, request.width // f, request.height // f)  # (1, 3, h, w), not resized
        noise = torch.randn(image.shape, generator=generator)  # (1, 3, h, w)
        alpha = self.low_res_alphas[request.noise_level]
        return (alpha**0.5 * image + (1 - alpha) ** 0.5 * noise).to(self.device)

    def _start_latent(self, member: Member, request: ResolvedRequest, noise: Tensor) -> None:
        steps, name, eta = request.steps, request.sampler, request.eta
        if request.init_image is None:
            member.sampler = make_sampler(name, self.schedule, steps, eta=eta)
            member.x = noise * member.sampler.init_noise_sigma
            return
        pixels = decode_image(request.init_image, "init_image")
        image = to_tensor(pixels, request.width, request.height).to(self.device)
        init = self.encode(image)  # (1, C, h, w), scaled
        mask = None
        if request.mask is not None:
            mask_image = decode_image(request.mask, "mask")
            mask_px = mask_to_tensor(mask_image, request.width, request.height).to(self.device)
            mask = mask_to_latent(mask_px, init.shape[-2:])  # (1, 1, h, w)
            if self.config.is_inpainting:
                masked = self.encode(image * (mask_px < 0.5))
                member.concat = torch.cat([mask, masked], dim=1)  # (1, 1 + C, h, w)
            else:
                member.blend = LatentBlend(init=init, keep=1 - mask, noise=noise)
        start = img2img_start_step(steps, request.strength)
        if start >= steps:  # strength 0: nothing to denoise, the init image comes back
            member.x = init
            return
        member.sampler = make_sampler(name, self.schedule, steps, eta=eta, start_step=start)
        if request.strength >= 1.0 and mask is not None:
            member.x = noise * member.sampler.init_noise_sigma  # as diffusers does at full strength
        else:
            member.x = init + noise * member.sampler.sigma

    def encode(self, image: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents (the posterior's mode: deterministic)."""
        with torch.inference_mode():
            vae_dtype = next(self.autoencoder.parameters()).dtype
            posterior = self.autoencoder.encode(image.to(vae_dtype))
            return posterior.mode().float().contiguous() * self.config.autoencoder.scaling_factor

    def decode(self, latents: Tensor) -> list[Image.Image]:
        """Scaled latents (B, C, h, w) -> images."""
        with torch.inference_mode():
            vae_dtype = next(self.autoencoder.parameters()).dtype
            z = (latents / self.config.autoencoder.scaling_factor).to(vae_dtype)
            if self.channels_last:
                z = z.contiguous(memory_format=torch.channels_last)
            tile = self.decode_tile
            return to_images(decode_tiled(self.autoencoder.decode, z, tile, overlap=tile // 4))

    def decode_members(self, members: Sequence[Member]) -> list[Image.Image]:
        """Finished members' images, each decoded by its own decoder (a refiner's after a hand-off)."""
        images: list[Image.Image | None] = [None] * len(members)
        groups: dict[int, list[int]] = {}
        for i, m in enumerate(members):
            groups.setdefault(id(m.decoder or self), []).append(i)
        for rows in groups.values():
            decoder = members[rows[0]].decoder or self
            decoded = decoder.decode(torch.cat([members[i].final_latent() for i in rows]))
            for i, image in zip(rows, decoded, strict=True):
                images[i] = image
        return [image for image in images if image is not None]

    def new_batch(self) -> DenoisingBatch:
        return DenoisingBatch(self.denoiser, share_rows=self.share_rows)

    # -- the whole thing --------------------------------------------------------------------------

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        progress: ProgressCallback | None = None,
        should_cancel: Callable[[int], bool] | None = None,
        adapters: Callable[[str], LoraAdapter] | None = None,
        refiners: Mapping[str, Engine] | None = None,
    ) -> list[GenerationResult]:
        """Runs requests together in one batch; results come back in the order given. `adapters`
        gives the LoRA adapter a request's `loras` names (for example a `LoraCache`'s `get`);
        `refiners` the SDXL refiner engines that requests' `refiner` fields name."""
        resolved = [self.resolve(r) for r in requests]  # every request is checked before any runs
        if any(r.loras for r in resolved) and adapters is None:
            raise RequestError("loras", "this engine was given no LoRA adapters")
        batch = self.new_batch()
        results: dict[int, GenerationResult] = {}
        started: dict[int, float] = {}
        for index, request in enumerate(resolved):
            started[index] = time.perf_counter()
            loras = [(adapters(name), weight) for name, weight in request.loras] if adapters else []
            refiner = (refiners or {}).get(request.refiner.model) if request.refiner is not None else None
            member, tokens = self.prepare(request, index, loras=loras, refiner=refiner)
            results[index] = GenerationResult(request, None, tokens)
            results[index].timings["prepare_ms"] = _ms_since(started[index])
            batch.add(member)
        while len(batch):
            if should_cancel is not None:
                for key in [k for k in batch.members if should_cancel(_index(k))]:
                    batch.remove(key)
                    results[_index(key)].cancelled = True
            finished = batch.step()
            if progress is not None:
                for m in [*batch.members.values(), *finished]:
                    progress(_index(m.key), m.steps_done, m.total_steps)
            if finished:
                decode_start = time.perf_counter()
                images = self.decode_members(finished)
                decode_ms = _ms_since(decode_start)
                for m, image in zip(finished, images, strict=True):
                    result = results[_index(m.key)]
                    result.image = image
                    result.timings["denoise_ms"] = m.step_seconds * 1000
                    result.timings["decode_ms"] = decode_ms
                    result.timings["total_ms"] = _ms_since(started[_index(m.key)])
        return [results[i] for i in range(len(resolved))]


def mask_to_latent(mask: Tensor, size: torch.Size) -> Tensor:
    """Pixel mask -> latent mask: a latent is repainted if any pixel under it is (max pooling)."""
    return torch.nn.functional.adaptive_max_pool2d(mask, tuple(size))


def _index(key: Hashable) -> int:
    assert isinstance(key, int)
    return key


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def _paths(layers: dict[tuple[Part, str], torch.nn.Module]) -> tuple[list[str], list[str], list[str]]:
    """(UNet paths, text-encoder paths, second text-encoder paths) of the adaptable layers."""
    return tuple([p for part, p in layers if part == name] for name in ("unet", "text", "text2"))  # type: ignore[return-value]
