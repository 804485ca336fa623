"""Synthetic text-to-image data for the demo LDM: one flat-coloured shape on a plain background.

Caption grammar (every caption names a colour and a shape; the rest is optional)::

    a [small|large] <colour> <shape>[ <position>][ on a <background> background]

Attributes a caption leaves out are still drawn at random in the image, so the model learns that an
unmentioned attribute is free. Sizes and positions get a little jitter so a model cannot memorise a
pixel grid, but the classes stay far apart, so `checker.read_image` can grade images without doubt.

Geometry is defined as fractions of the image side, so 32 px and 64 px images show the same scene.
A shape is described by its box centre (cx, cy) and half-extent h: the circle has radius h, the square
side 2h, the triangle (apex up) base 2h and height 2h. Rendering evaluates a 4x4 supersampled coverage
mask in numpy, only inside the shape's bounding box, which keeps a 128-image batch in milliseconds.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

# Palette: far apart in RGB (the closest pair, red/orange, is ~106 apart), so that the nearest-palette
# reading of a slightly off colour from a model is still unambiguous.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 200, 40),
    "blue": (40, 60, 230),
    "yellow": (240, 235, 40),
    "purple": (170, 30, 210),
    "orange": (250, 130, 10),
    "cyan": (40, 220, 220),
    "white": (240, 240, 240),
}
# Backgrounds: gray sits far (>= ~130) from every shape colour, black even further.
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (110, 110, 110),
}
COLOURS: tuple[str, ...] = tuple(COLOUR_RGB)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("on the left", "on the right", "at the top", "at the bottom", "in the center")
BACKGROUNDS: tuple[str, ...] = tuple(BACKGROUND_RGB)

# Half-extent h as a fraction of the image side. With +-10% jitter small spans 0.090-0.110 and large
# 0.162-0.198: a 1.47x gap, and a large shape still fits beside the 25% anchors.
SIZE_HALF_EXTENT: dict[str, float] = {"small": 0.10, "large": 0.18}
SIZE_JITTER = 0.10
# The small/large boundary used by the checker: the geometric middle of the gap above.
SIZE_THRESHOLD = math.sqrt(
    SIZE_HALF_EXTENT["small"] * (1 + SIZE_JITTER) * SIZE_HALF_EXTENT["large"] * (1 - SIZE_JITTER)
)
# Box-centre anchors (x, y) as fractions of the image side. Anchors are >= 0.25 apart, the jitter is
# +-0.035 per axis, so every jittered centre stays nearest to its own anchor by a wide margin.
POSITION_ANCHOR: dict[str, tuple[float, float]] = {
    "on the left": (0.25, 0.5),
    "on the right": (0.75, 0.5),
    "at the top": (0.5, 0.25),
    "at the bottom": (0.5, 0.75),
    "in the center": (0.5, 0.5),
}
POSITION_JITTER = 0.035
# Area of each shape in units of h**2; the checker inverts this to get h back from a pixel area.
SHAPE_AREA: dict[str, float] = {"circle": math.pi, "square": 4.0, "triangle": 2.0}
# The triangle's area centroid lies h/3 below its box centre.
SHAPE_CENTROID_DY: dict[str, float] = {"circle": 0.0, "square": 0.0, "triangle": 1.0 / 3.0}

SUPERSAMPLE = 4
# Probability that sample_spec's caption leaves out the size / position / background.
OMIT_PROBABILITY = 0.3

# Seeds: training draws from TRAIN_SEEDS, evaluation uses EVAL_SEEDS; the ranges must not overlap.
TRAIN_SEEDS = range(0, 10**9)
EVAL_SEEDS = range(2_000_000_000, 2_000_000_000 + 10**6)
if TRAIN_SEEDS.stop > EVAL_SEEDS.start:
    raise AssertionError("training and evaluation seed ranges overlap")
# Seed of the rng that picks the held-out prompts' attributes (not an image seed).
_EVAL_PROMPT_RNG_SEED = 20_240_601

CAPTION_RE = re.compile(
    r"^a (?:(?P<size>{sizes}) )?(?P<colour>{colours}) (?P<shape>{shapes})"
    r"(?: (?P<position>{positions}))?(?: on a (?P<background>{backgrounds}) background)?$".format(
        sizes="|".join(SIZES),
        colours="|".join(COLOURS),
        shapes="|".join(SHAPES),
        positions="|".join(POSITIONS),
        backgrounds="|".join(BACKGROUNDS),
    )
)


@dataclass(frozen=True)
class ShapeSpec:
    """Everything the image shows."""

    colour: str
    shape: str
    size: str
    position: str
    background: str


@dataclass(frozen=True)
class Asked:
    """What a caption specifies; None where the caption leaves the attribute free."""

    colour: str
    shape: str
    size: str | None = None
    position: str | None = None
    background: str | None = None

    def mentioned(self) -> dict[str, str]:
        """The attributes the caption names, by field name."""
        fields = {
            "colour": self.colour,
            "shape": self.shape,
            "size": self.size,
            "position": self.position,
            "background": self.background,
        }
        return {name: value for name, value in fields.items() if value is not None}


@dataclass(frozen=True)
class Sample:
    spec: ShapeSpec
    caption: str
    image: np.ndarray  # (H, W, 3) uint8

    @property
    def asked(self) -> Asked:
        return parse_caption(self.caption)


class EvalPrompt(NamedTuple):
    """A held-out prompt: the caption, what it asks for, and the seed to sample it with."""

    caption: str
    asked: Asked
    seed: int


def caption_for(asked: Asked) -> str:
    words = ["a"]
    if asked.size is not None:
        words.append(asked.size)
    words += [asked.colour, asked.shape]
    if asked.position is not None:
        words.append(asked.position)
    if asked.background is not None:
        words.append(f"on a {asked.background} background")
    return " ".join(words)


def parse_caption(caption: str) -> Asked:
    """The attributes a caption asks for; raises ValueError on text outside the grammar."""
    match = CAPTION_RE.match(" ".join(caption.lower().split()))
    if match is None:
        raise ValueError(f"caption {caption!r} does not follow the demo grammar")
    return Asked(
        colour=match["colour"],
        shape=match["shape"],
        size=match["size"],
        position=match["position"],
        background=match["background"],
    )


def vocabulary_words() -> list[str]:
    """Every word the caption grammar can produce, in a stable order."""
    phrases = ["a", *SIZES, *COLOURS, *SHAPES, *POSITIONS, "on a", "background", *BACKGROUNDS]
    seen: dict[str, None] = {}
    for phrase in phrases:
        for word in phrase.split():
            seen.setdefault(word, None)
    return list(seen)


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def draw(rng: np.random.Generator, omit_probability: float = OMIT_PROBABILITY) -> tuple[ShapeSpec, Asked]:
    """Draws every attribute uniformly, then which optional ones the caption mentions."""
    spec = ShapeSpec(
        colour=_choice(rng, COLOURS),
        shape=_choice(rng, SHAPES),
        size=_choice(rng, SIZES),
        position=_choice(rng, POSITIONS),
        background=_choice(rng, BACKGROUNDS),
    )
    keep = rng.random(3) >= omit_probability
    asked = Asked(
        colour=spec.colour,
        shape=spec.shape,
        size=spec.size if keep[0] else None,
        position=spec.position if keep[1] else None,
        background=spec.background if keep[2] else None,
    )
    return spec, asked


def sample_spec(rng: np.random.Generator) -> tuple[ShapeSpec, str]:
    spec, asked = draw(rng)
    return spec, caption_for(asked)


def coverage(
    shape: str, cx: float, cy: float, h: float, size: int, ss: int = SUPERSAMPLE
) -> tuple[np.ndarray, int, int]:
    """Fractional coverage of `shape` on a size x size pixel grid, only over its bounding box.

    (cx, cy) is the box centre and h the half-extent, in pixels (pixel i spans [i, i + 1]).
    Returns (cov, y0, x0): cov is float32 (rows, cols) and lands at image[y0:, x0:].
    """
    x0 = max(math.floor(cx - h) - 1, 0)
    x1 = min(math.ceil(cx + h) + 1, size)
    y0 = max(math.floor(cy - h) - 1, 0)
    y1 = min(math.ceil(cy + h) + 1, size)
    if x1 <= x0 or y1 <= y0:
        return np.zeros((0, 0), np.float32), 0, 0
    # Subsample centres relative to the shape's centre, as a row vector and a column vector.
    xs = (np.arange(x0 * ss, x1 * ss, dtype=np.float32) + 0.5) / ss - np.float32(cx)
    ys = ((np.arange(y0 * ss, y1 * ss, dtype=np.float32) + 0.5) / ss - np.float32(cy))[:, None]
    if shape == "circle":
        inside = xs * xs + ys * ys <= h * h
    elif shape == "square":
        inside = (np.abs(xs) <= h) & (np.abs(ys) <= h)
    elif shape == "triangle":
        # Apex at (0, -h), base along y = +h from x = -h to +h: half-width grows by 1/2 per row.
        inside = (np.abs(xs) <= (ys + h) * 0.5) & (ys <= h)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    rows, cols = y1 - y0, x1 - x0
    cov = inside.reshape(rows, ss, cols, ss).mean(axis=(1, 3), dtype=np.float32)
    return cov, y0, x0


def _geometry(spec: ShapeSpec, size: int, rng: np.random.Generator) -> tuple[float, float, float]:
    """Jittered (cx, cy, h) in pixels, clamped so a one-pixel frame of pure background remains."""
    h = SIZE_HALF_EXTENT[spec.size] * (1.0 + SIZE_JITTER * rng.uniform(-1.0, 1.0)) * size
    ax, ay = POSITION_ANCHOR[spec.position]
    jx, jy = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
    lo, hi = h + 1.0, size - h - 1.0
    cx = float(np.clip((ax + jx) * size, lo, hi))
    cy = float(np.clip((ay + jy) * size, lo, hi))
    return cx, cy, float(h)


def render(spec: ShapeSpec, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) uint8 image of `spec`, with jittered size and position and anti-aliased edges."""
    out = np.empty((size, size, 3), np.uint8)
    _render_into(out, spec, rng)
    return out


def _render_into(out: np.ndarray, spec: ShapeSpec, rng: np.random.Generator) -> None:
    size = out.shape[0]
    bg = np.asarray(BACKGROUND_RGB[spec.background], np.float32)
    fg = np.asarray(COLOUR_RGB[spec.colour], np.float32)
    out[...] = bg.astype(np.uint8)
    cx, cy, h = _geometry(spec, size, rng)
    cov, y0, x0 = coverage(spec.shape, cx, cy, h, size)
    rows, cols = cov.shape
    blended = bg + cov[:, :, None] * (fg - bg)
    out[y0 : y0 + rows, x0 : x0 + cols] = np.rint(blended).astype(np.uint8)


def make_sample(seed: int, size: int) -> Sample:
    """Deterministic by seed: the same seed gives the same spec, caption and pixels."""
    rng = np.random.default_rng(seed)
    spec, asked = draw(rng)
    return Sample(spec=spec, caption=caption_for(asked), image=render(spec, size, rng))


def batch(seeds: Sequence[int], size: int) -> tuple[np.ndarray, list[str]]:
    """(N, size, size, 3) uint8 images and their captions, one per seed."""
    images = np.empty((len(seeds), size, size, 3), np.uint8)
    captions: list[str] = []
    for i, seed in enumerate(seeds):
        rng = np.random.default_rng(seed)
        spec, asked = draw(rng)
        _render_into(images[i], spec, rng)
        captions.append(caption_for(asked))
    return images, captions


def train_seeds(rng: np.random.Generator, n: int) -> list[int]:
    """n training seeds drawn from TRAIN_SEEDS (never from EVAL_SEEDS)."""
    return [int(s) for s in rng.integers(TRAIN_SEEDS.start, TRAIN_SEEDS.stop, size=n)]


def eval_prompts(n: int = 240) -> list[EvalPrompt]:
    """n held-out prompts with fixed seeds from EVAL_SEEDS (the i-th uses EVAL_SEEDS[i]).

    Colour x shape cycles through all 24 pairs evenly; size and position are named 85% of the time
    and the background half the time, so each attribute's accuracy rests on many prompts.
    The same n always gives the same list, and a longer list extends a shorter one.
    """
    if not 0 < n <= len(EVAL_SEEDS):
        raise ValueError(f"n must be in 1..{len(EVAL_SEEDS)}, got {n}")
    rng = np.random.default_rng(_EVAL_PROMPT_RNG_SEED)
    prompts: list[EvalPrompt] = []
    for i in range(n):
        mention = rng.random(3) < (0.85, 0.85, 0.5)
        asked = Asked(
            colour=COLOURS[i % len(COLOURS)],
            shape=SHAPES[(i // len(COLOURS)) % len(SHAPES)],
            size=_choice(rng, SIZES) if mention[0] else None,
            position=_choice(rng, POSITIONS) if mention[1] else None,
            background=_choice(rng, BACKGROUNDS) if mention[2] else None,
        )
        prompts.append(EvalPrompt(caption_for(asked), asked, EVAL_SEEDS[i]))
    return prompts


def spec_for(asked: Asked, rng: np.random.Generator) -> ShapeSpec:
    """A full spec for what a caption asks, drawing the attributes it leaves free (for reference images)."""
    return ShapeSpec(
        colour=asked.colour,
        shape=asked.shape,
        size=asked.size or _choice(rng, SIZES),
        position=asked.position or _choice(rng, POSITIONS),
        background=asked.background or _choice(rng, BACKGROUNDS),
    )
