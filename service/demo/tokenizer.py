"""A small CLIP-format byte-level BPE tokenizer for the demo captions.

The output folder has the same layout as OpenAI CLIP's tokenizer on the Hugging Face hub, so
`transformers.CLIPTokenizer` (and `CLIPTokenizerFast`) load it unchanged:

* `vocab.json`: the 256 byte symbols (GPT-2's bytes-to-unicode map, in its order), then the same
  256 with the end-of-word marker `</w>`, then one entry per merge, then `<|startoftext|>` and
  `<|endoftext|>`. The full byte alphabet, with and without `</w>`, means any text tokenizes;
* `merges.txt`: a `#version: 0.2` header, then one merge (`left right`) per line, by rank.

Merges are learned here rather than with `tokenizers.trainers.BpeTrainer`, because CLIP's layout
(both byte alphabets, merge-ordered ids, specials last) is exactly what this loop writes, and the
stopping rule we want, "every caption word is one token", is easy to state. The text is split into
words by the very normalizer and pre-tokenizer CLIPTokenizer uses, so training and use agree.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Regex, normalizers, pre_tokenizers

from .shapes import COLOURS, POSITIONS, SHAPES, SIZES, caption_for, draw, vocabulary_words

log = logging.getLogger(__name__)

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77
MERGES_HEADER = "#version: 0.2"
# Enough generated captions that every word and every optional phrase appears many times.
DEFAULT_CAPTIONS = 4000
_CAPTION_RNG_SEED = 1234
MAX_MERGES = 5000

# CLIPTokenizer's normalizer and pre-tokenizer (transformers/models/clip/tokenization_clip.py).
_CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
_NORMALIZER = normalizers.Sequence(
    [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
)
_PRE_TOKENIZER = pre_tokenizers.Sequence(
    [
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ]
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable characters, in CLIP's vocabulary order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes, strict=True)}


def split_words(text: str) -> list[str]:
    """Text as CLIPTokenizer's BPE sees it: lowercased words in byte-level characters."""
    normalized = _NORMALIZER.normalize_str(text)
    return [piece for piece, _ in _PRE_TOKENIZER.pre_tokenize_str(normalized)]


def default_captions(n: int = DEFAULT_CAPTIONS) -> list[str]:
    """Generated captions plus each attribute phrase on its own, so every grammar word is seen."""
    rng = np.random.default_rng(_CAPTION_RNG_SEED)
    captions = [caption_for(draw(rng)[1]) for _ in range(n)]
    return [*captions, *COLOURS, *SHAPES, *SIZES, *POSITIONS, " ".join(vocabulary_words())]


def learn_merges(word_counts: Counter[str], max_merges: int = MAX_MERGES) -> list[tuple[str, str]]:
    """BPE merges, most frequent pair first, until every word is a single symbol.

    Each word ends with `</w>` on its last symbol, as CLIP's BPE marks word ends. Ties between
    equally frequent pairs go to the lexicographically smallest, so training is deterministic.
    """
    words: dict[tuple[str, ...], int] = {}
    for word, count in word_counts.items():
        if word:
            symbols = (*word[:-1], word[-1] + END_OF_WORD)
            words[symbols] = words.get(symbols, 0) + count
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in itertools.pairwise(symbols):
                pairs[pair] += count
        if not pairs:
            break
        best_count = max(pairs.values())
        best = min(pair for pair, count in pairs.items() if count == best_count)
        merges.append(best)
        words = {_merge(symbols, best): count for symbols, count in words.items()}
    return merges


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's id layout: bytes, bytes + `</w>`, merge results by rank, then BOS and EOS."""
    base = list(bytes_to_unicode().values())
    tokens = [*base, *(symbol + END_OF_WORD for symbol in base), *(left + right for left, right in merges)]
    vocab: dict[str, int] = {}
    for token in [*tokens, BOS, EOS]:
        # Two merges can spell the same string ("ab"+"c", "a"+"bc"); it keeps its first id.
        vocab.setdefault(token, len(vocab))
    return vocab


def train_tokenizer(out_dir: Path, captions: Iterable[str] | None = None) -> Path:
    """Learns the BPE on `captions` (default: generated demo captions) and writes a CLIP tokenizer
    folder: vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json. Returns out_dir."""
    out_dir = Path(out_dir)
    texts = list(captions) if captions is not None else default_captions()
    # The grammar's words always get their own token, whatever captions are given.
    texts.append(" ".join(vocabulary_words()))
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(split_words(text))
    merges = learn_merges(counts)
    vocab = build_vocab(merges)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = [MERGES_HEADER, *(f"{left} {right}" for left, right in merges)]
    (out_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {
        **special,
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    log.info("trained a %d-entry CLIP BPE tokenizer (%d merges) into %s", len(vocab), len(merges), out_dir)
    return out_dir
