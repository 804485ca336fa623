"""SDXL's text conditioning (Podell et al. 2023, sec. 2.1), as diffusers' `StableDiffusionXLPipeline`:

- the base has two encoders, CLIP ViT-L (`conditioner.embedders.0.transformer.*`, transformers'
  layout) and OpenCLIP ViT-bigG (`conditioner.embedders.1.model.*`, fused q/k/v); the refiner has
  ViT-bigG alone (`conditioner.embedders.0.model.*`). Each has its own tokenizer (ViT-bigG's pads
  with "!", which its files say).
- The cross-attention context is the penultimate layer's hidden states of each encoder, as they
  are (no final layer norm), concatenated along the channels (768 + 1280 = 2048 for the base).
- The pooled embedding is ViT-bigG's: its final-norm state at the end-of-text token, through its
  `text_projection` (1280).

Prompts over 75 tokens are encoded in 75-token windows by both encoders, as for SD 1/2 (`text.py`),
and the windows concatenated; the pooled embedding is the first window's (diffusers truncates to
that window). With no negative prompt (absent or ""), the base's unconditional branch is zeros, as
diffusers' `force_zeros_for_empty_prompt` (the refiner encodes "": its config turns that off).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import CLIPTextModel, CLIPTokenizer

from .checkpoint import load_strict
from .config import ModelConfig, TextEncoderConfig
from .layout import (
    SDXL_CLIP_G_PREFIX,
    SDXL_CLIP_L_PREFIX,
    SDXL_REFINER_CLIP_G_PREFIX,
    CheckpointError,
    few,
)
from .lora_keys import Part
from .lora_rows import LoraRuntime, all_rows
from .openclip import hf_to_openclip, openclip_to_hf
from .text import Loras, build_text_model, load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class SDXLText:
    """SDXL's encoders, tokenizers and pooled projection; `encoders[-1]` is ViT-bigG."""

    encoders: list[CLIPTextModel]
    tokenizers: list[CLIPTokenizer]
    projection: nn.Linear  # ViT-bigG's text_projection: (projection_dim, width) as a Linear


def find_sdxl_tokenizers(checkpoint: Path, tokenizer_dir: Path | None, refiner: bool) -> list[Path]:
    """`tokenizer/` and `tokenizer_2/` beside the checkpoint or in `--tokenizer DIR`; the refiner's one
    encoder (ViT-bigG) uses `tokenizer_2/`, or `tokenizer/` when that is the only one (or DIR itself
    when it is a tokenizer folder)."""
    root = Path(tokenizer_dir) if tokenizer_dir is not None else Path(checkpoint).parent
    where = f"in {root}" if tokenizer_dir is not None else f"beside {checkpoint}"
    first, second = root / "tokenizer", root / "tokenizer_2"
    if refiner:
        for folder in (second, first):
            if folder.is_dir():
                return [folder]
        if tokenizer_dir is not None and (root / "vocab.json").is_file():
            return [root]
        raise CheckpointError(
            f"no tokenizer for the SDXL refiner: put tokenizer_2/ (or tokenizer/) {where}, "
            "or pass --tokenizer DIR holding it"
        )
    if not first.is_dir():
        raise CheckpointError(
            f"no tokenizer/ {where}: an SDXL base needs tokenizer/ and tokenizer_2/ "
            "(pass --tokenizer DIR holding both)"
        )
    if not second.is_dir():
        raise CheckpointError(
            f"no tokenizer_2/ {where}: SDXL's second tokenizer (for its OpenCLIP ViT-bigG encoder) "
            "belongs beside tokenizer/ (pass --tokenizer DIR holding both)"
        )
    return [first, second]


def _full(cfg: TextEncoderConfig) -> TextEncoderConfig:
    """Every layer is built: the penultimate one gives the context, the last one the pooled output."""
    return replace(cfg, penultimate=False)


def _materialize(model: nn.Module) -> None:
    """Buffers that no file holds (CLIP's `position_ids`), left on the meta device by the build."""
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta:
                if not name.endswith("position_ids"):
                    raise RuntimeError(f"buffer {name} was not loaded")
                positions = torch.arange(buffer.shape[-1]).expand(buffer.shape)
                module.register_buffer(name, positions, persistent=False)


def load_sdxl_text(
    parts: Mapping[str, Mapping[str, Tensor]], config: ModelConfig, folders: list[Path]
) -> SDXLText:
    """Builds SDXL's encoders on the meta device and fills them from the file, strictly; errors name
    keys as the file spells them."""
    tokenizers = [load_tokenizer(folder) for folder in folders]
    configs = [config.text] if config.text_2 is None else [config.text, config.text_2]
    encoders = []
    for cfg, tokenizer in zip(configs, tokenizers, strict=True):
        if len(tokenizer) > cfg.vocab_size:
            raise CheckpointError(
                f"tokenizer has {len(tokenizer)} tokens but the text encoder only {cfg.vocab_size}"
            )
        with torch.device("meta"):
            encoders.append(build_text_model(_full(cfg), tokenizer))
    if config.text_2 is None:
        bigg_state, prefix = parts["sdxl_refiner_clip_g"], SDXL_REFINER_CLIP_G_PREFIX
    else:
        load_strict(encoders[0], parts["sdxl_clip_l"], SDXL_CLIP_L_PREFIX)
        bigg_state, prefix = parts["sdxl_clip_g"], SDXL_CLIP_G_PREFIX
    projection = load_openclip(encoders[-1], bigg_state, prefix)
    for encoder in encoders:
        _materialize(encoder)
    return SDXLText(encoders, tokenizers, projection)


def load_openclip(model: CLIPTextModel, state: Mapping[str, Tensor], prefix: str) -> nn.Linear:
    """Fills a `CLIPTextModel` (all layers) from an OpenCLIP text tower and returns its text projection.

    Checked in the file's own names first (the OpenCLIP expected of this model, fused q/k/v), so an
    error names the keys as the file spells them; `logit_scale` (the contrastive head) is left out.
    """
    expected = hf_to_openclip(dict(model.state_dict()))  # meta tensors: shapes only, nothing allocated
    width = int(model.config.hidden_size)
    if "text_projection" not in state:
        raise CheckpointError(f"missing keys: {prefix}text_projection")
    projection_dim = int(state["text_projection"].shape[-1])
    expected["text_projection"] = torch.empty(width, projection_dim, device="meta")
    present = set(state) - {"logit_scale"}  # the contrastive head's temperature, there or not
    missing = sorted(prefix + k for k in expected.keys() - present)
    unexpected = sorted(prefix + k for k in present - expected.keys())
    mismatched = [
        f"{prefix}{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = [
        f"{what}: {few(keys)}"
        for what, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatch", mismatched),
        )
        if keys
    ]
    if problems:
        raise CheckpointError("; ".join(problems))
    converted, _dropped = openclip_to_hf(dict(state), int(model.config.num_hidden_layers))
    model.load_state_dict(converted, strict=True, assign=True)
    with torch.device("meta"):
        projection = nn.Linear(width, projection_dim, bias=False)
    # OpenCLIP computes x @ text_projection; a Linear holds the transpose.
    projection.load_state_dict({"weight": state["text_projection"].T.contiguous()}, assign=True)
    return projection


@dataclass(frozen=True)
class SDXLEmbedding:
    """A prompt's SDXL conditioning: context (1, 77 * chunks, D) of both encoders, pooled (1, P)."""

    tensor: Tensor
    tokens: int
    pooled: Tensor

    @property
    def chunks(self) -> int:
        return self.tensor.shape[1] // 77

    def zeros(self) -> SDXLEmbedding:
        """diffusers' `force_zeros_for_empty_prompt`: the base's unconditional branch without a prompt."""
        return SDXLEmbedding(torch.zeros_like(self.tensor), 0, torch.zeros_like(self.pooled))


class SDXLConditioner:
    """Prompts -> SDXL context and pooled embedding, with a bounded LRU cache keyed on the prompt and
    window count (one entry holds both encoders' outputs). The same calls as `TextConditioner`."""

    def __init__(self, text: SDXLText, zero_empty_negative: bool, cache_size: int = 256) -> None:
        self.encoders = [model.eval() for model in text.encoders]
        self.tokenizers = text.tokenizers
        self.projection = text.projection.eval()
        self.zero_empty_negative = zero_empty_negative
        self.window = int(self.encoders[0].config.max_position_embeddings)  # 77
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, int, Hashable], SDXLEmbedding] = OrderedDict()

    @property
    def tokenizer(self) -> CLIPTokenizer:
        return self.tokenizers[0]

    def token_ids(self, prompt: str, tokenizer: CLIPTokenizer) -> list[int]:
        ids: list[int] = tokenizer(prompt, add_special_tokens=False, truncation=False)["input_ids"]
        return ids

    def chunks_needed(self, prompt: str) -> int:
        body = self.window - 2
        return max(1, *(-(-len(self.token_ids(prompt, t)) // body) for t in self.tokenizers))

    def lora_encoders(self) -> list[tuple[Part, CLIPTextModel]]:
        """The encoders by the part of an adapter they take: `lora_te1_` ViT-L, `lora_te2_` ViT-bigG
        (the refiner's one encoder is ViT-bigG)."""
        parts: list[Part] = ["text2"] if len(self.encoders) == 1 else ["text", "text2"]
        return list(zip(parts, self.encoders, strict=True))

    def encode(self, prompt: str, min_chunks: int = 1, loras: Loras = ()) -> SDXLEmbedding:
        """Embeds `prompt` in at least `min_chunks` windows (the same count for both encoders), with
        the text-encoder layers of `loras` (adapter, weight) applied."""
        active = [(a, w) for a, w in loras if a.changes_text and w != 0.0]
        chunks = max(min_chunks, self.chunks_needed(prompt))
        key = (prompt, chunks, tuple((a.uid, float(w)) for a, w in active))
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        contexts: list[Tensor] = []
        tokens = 0
        pooled: Tensor | None = None
        encoders = self.lora_encoders()
        for i, ((part, model), tokenizer) in enumerate(zip(encoders, self.tokenizers, strict=True)):
            ids = self.token_ids(prompt, tokenizer)
            tokens = len(ids) if i == 0 else tokens
            rows = self._windows(ids, chunks, tokenizer)
            runtime = LoraRuntime.of(model, part)
            with torch.inference_mode(), runtime.active(all_rows(active, model.device, model.dtype)):
                input_ids = torch.tensor(rows, device=model.device)  # (chunks, 77)
                out = model(input_ids=input_ids, output_hidden_states=True)
                hidden = out.hidden_states[-2]  # (chunks, 77, D_i): penultimate layer, no final norm
                contexts.append(hidden.reshape(1, -1, hidden.shape[-1]))  # (1, 77 * chunks, D_i)
                if i == len(self.encoders) - 1:
                    pooled = self.projection(out.pooler_output[:1])  # (1, P): the first window's
        assert pooled is not None
        embedding = SDXLEmbedding(torch.cat(contexts, dim=-1).clone(), tokens, pooled.clone())
        self._cache[key] = embedding
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return embedding

    def _windows(self, ids: list[int], chunks: int, tokenizer: CLIPTokenizer) -> list[list[int]]:
        body = self.window - 2
        pieces = [ids[i : i + body] for i in range(0, len(ids), body)] or [[]]
        pieces += [[] for _ in range(chunks - len(pieces))]
        bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        return [[bos, *p, eos] + [pad] * (body - len(p)) for p in pieces]

    def encode_pair(
        self, prompt: str, negative_prompt: str, loras: Loras = ()
    ) -> tuple[SDXLEmbedding, SDXLEmbedding]:
        """Prompt and negative prompt in the same number of windows; zeros for an empty negative prompt
        when the model says so (the base)."""
        chunks = max(self.chunks_needed(prompt), self.chunks_needed(negative_prompt))
        cond = self.encode(prompt, chunks, loras)
        if negative_prompt == "" and self.zero_empty_negative:
            return cond, cond.zeros()
        return cond, self.encode(negative_prompt, chunks, loras)


def sdxl_text_state_dict(text: SDXLText) -> dict[str, Tensor]:
    """The encoders in the sgm single-file layout: the base's ViT-L under `conditioner.embedders.0.
    transformer.text_model.*`, ViT-bigG as OpenCLIP (fused q/k/v, `text_projection` = the Linear's
    transpose) under `conditioner.embedders.1.model.*`, or `.0.model.*` for the refiner."""
    out: dict[str, Tensor] = {}
    if len(text.encoders) == 2:
        for key, value in text.encoders[0].state_dict().items():
            if not key.endswith("position_ids"):
                out[SDXL_CLIP_L_PREFIX + "text_model." + key] = value
        prefix = SDXL_CLIP_G_PREFIX
    else:
        prefix = SDXL_REFINER_CLIP_G_PREFIX
    bigg = hf_to_openclip(dict(text.encoders[-1].state_dict()))
    bigg["text_projection"] = text.projection.weight.T
    out.update({prefix + key: value for key, value in bigg.items()})
    return out
