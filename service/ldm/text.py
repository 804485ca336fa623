"""Text conditioning (LDM paper sec. 3.3): CLIP BPE tokenizer and CLIP text transformer.

Prompts longer than one 77-token window are split into chunks of 75 tokens, each wrapped in
BOS ... EOS and padded to 77, encoded separately and concatenated along the sequence, as the
popular web UIs do, so nothing is cut silently. The UNet's cross-attention takes any length.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .config import TextEncoderConfig
from .lora_keys import Part
from .lora_rows import LoraRuntime, all_rows

if TYPE_CHECKING:
    from .lora import LoraAdapter

Loras = Sequence[tuple["LoraAdapter", float]]

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("vocab.json", "merges.txt")


class TokenizerError(ValueError):
    """The tokenizer folder is missing or incomplete."""


def load_tokenizer(folder: Path) -> CLIPTokenizer:
    """CLIP's BPE tokenizer from `vocab.json` + `merges.txt` (and its config files when present)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TokenizerError(f"tokenizer folder {folder} does not exist")
    missing = [name for name in TOKENIZER_FILES if not (folder / name).is_file()]
    if missing:
        raise TokenizerError(f"tokenizer folder {folder} lacks {', '.join(missing)}")
    # SD 2.x pads with "!" and SD 1.x with <|endoftext|>: the config files say which.
    pad_token = "<|endoftext|>"
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            value = json.loads(path.read_text()).get("pad_token")
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                pad_token = value
                break
    # model_max_length: one CLIP window, as the SD tokenizer configs say (the default is "unbounded").
    return CLIPTokenizer(
        vocab=str(folder / "vocab.json"),
        merges=str(folder / "merges.txt"),
        pad_token=pad_token,
        model_max_length=77,
    )


def build_text_model(cfg: TextEncoderConfig, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A randomly initialised `CLIPTextModel`; SD 2.x's penultimate layer is the last one built."""
    layers = cfg.num_layers - 1 if cfg.penultimate else cfg.num_layers
    hf_config = CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        hidden_act=cfg.hidden_act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    hf_config._attn_implementation = "sdpa"
    return CLIPTextModel(hf_config)


@dataclass(frozen=True)
class Embedding:
    """A prompt's embedding, (1, 77 * chunks, D), and how many tokens it had (without BOS/EOS)."""

    tensor: torch.Tensor
    tokens: int

    @property
    def chunks(self) -> int:
        return self.tensor.shape[1] // 77


class TextConditioner:
    """Turns prompts into cross-attention context, with a bounded LRU cache of embeddings."""

    def __init__(self, model: CLIPTextModel, tokenizer: CLIPTokenizer, cache_size: int = 256) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.window = int(model.config.max_position_embeddings)  # 77
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, int, Hashable], Embedding] = OrderedDict()

    def token_ids(self, prompt: str) -> list[int]:
        ids: list[int] = self.tokenizer(prompt, add_special_tokens=False, truncation=False)["input_ids"]
        return ids

    def chunks_needed(self, prompt: str) -> int:
        return max(1, -(-len(self.token_ids(prompt)) // (self.window - 2)))

    def encode(self, prompt: str, min_chunks: int = 1, loras: Loras = ()) -> Embedding:
        """Embeds `prompt`, padded with empty chunks to at least `min_chunks` windows, through the
        text encoder with the text-encoder layers of `loras` (adapter, weight) applied."""
        active = [(a, w) for a, w in loras if a.changes_text and w != 0.0]  # only these change it
        key = (prompt, min_chunks, tuple((a.uid, float(w)) for a, w in active))
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        ids = self.token_ids(prompt)
        body = self.window - 2
        pieces = [ids[i : i + body] for i in range(0, len(ids), body)] or [[]]
        pieces += [[] for _ in range(min_chunks - len(pieces))]
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        rows = [[bos, *p, eos] + [pad] * (body - len(p)) for p in pieces]
        device = self.model.device
        runtime = LoraRuntime.of(self.model, "text")
        with torch.inference_mode(), runtime.active(all_rows(active, device, self.model.dtype)):
            input_ids = torch.tensor(rows, device=device)  # (chunks, 77)
            hidden = self.model(input_ids=input_ids).last_hidden_state  # (chunks, 77, D)
        embedding = Embedding(hidden.reshape(1, -1, hidden.shape[-1]).clone(), len(ids))  # (1, 77*chunks, D)
        self._cache[key] = embedding
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return embedding

    def lora_encoders(self) -> list[tuple[Part, nn.Module]]:
        """The encoders LoRA adapters may change, by the part of an adapter they take."""
        return [("text", self.model)]

    def encode_pair(
        self, prompt: str, negative_prompt: str, loras: Loras = ()
    ) -> tuple[Embedding, Embedding]:
        """Prompt and negative prompt with the same number of windows, as CFG batches them together
        (a member's adapters apply to both, as they apply to both of its UNet rows)."""
        chunks = max(self.chunks_needed(prompt), self.chunks_needed(negative_prompt))
        return self.encode(prompt, chunks, loras), self.encode(negative_prompt, chunks, loras)
