"""Analytic grading of demo images: does the picture show what the caption asked for?

Reading an image:
1. background = per-channel median of the two-pixel border (the shape never touches it);
2. candidate foreground = pixels far from the background; keep the largest 4-connected blob, so
   speckles and stray blobs from a noisy model are ignored;
3. colour = the palette entry c whose segment bg -> c passes closest to the blob's core pixels
   (those furthest from the background): blurred pixels are bg/c mixtures on that segment, so a
   softened orange is not mistaken for red the way a plain nearest-colour reading would be;
4. a soft coverage per pixel = projection of (pixel - bg) onto (c - bg), limited to the blob grown
   by three pixels. Its sum is the shape's area and its weighted mean the centroid: both survive
   blur, which only moves coverage around;
5. shape = the template (circle / square / triangle with that area and centroid, sharp or blurred)
   with the highest soft IoU against the coverage; size (half-extent against SIZE_THRESHOLD) and
   position (box centre, nearest of the five anchors) follow from the fitted template.
Background is the nearest background colour to the border median.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from .shapes import (
    BACKGROUND_RGB,
    COLOUR_RGB,
    POSITION_ANCHOR,
    SHAPE_AREA,
    SHAPE_CENTROID_DY,
    SHAPES,
    SIZE_THRESHOLD,
    Asked,
    coverage,
    parse_caption,
)

ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "size", "position", "background")
# A pixel belongs to the candidate foreground when it is this far (RGB distance) from the background.
# Every shape colour is >= ~130 away from either background, so this sits well under half of that.
FOREGROUND_DISTANCE = 48.0
# Blobs smaller than this fraction of the image are noise (a small shape at 32 px covers ~1.6%).
MIN_BLOB_FRACTION = 0.004
BORDER = 2
# How far (pixels) beyond the thresholded blob a blurred rim still counts toward the area.
GROW = 3
# The core: blob pixels at least this fraction as far from the background as its 90th percentile.
CORE_FRACTION = 0.8
# Blur widths (Gaussian sigma as a fraction of the image side) tried when fitting shape templates:
# a decoder's output is softer than the renderer's, and a sharp template would favour the circle.
BLUR_LEVELS: tuple[float, ...] = (0.0, 1 / 64, 2 / 64, 3 / 64)

_COLOUR_NAMES = tuple(COLOUR_RGB)
_COLOUR_TABLE = np.asarray([COLOUR_RGB[name] for name in _COLOUR_NAMES], np.float32)
_BACKGROUND_NAMES = tuple(BACKGROUND_RGB)
_BACKGROUND_TABLE = np.asarray([BACKGROUND_RGB[name] for name in _BACKGROUND_NAMES], np.float32)
_POSITION_NAMES = tuple(POSITION_ANCHOR)
_POSITION_TABLE = np.asarray([POSITION_ANCHOR[name] for name in _POSITION_NAMES], np.float32)


@dataclass(frozen=True)
class Reading:
    """What the checker sees; every field is None when no shape could be segmented."""

    colour: str | None
    shape: str | None
    size: str | None
    position: str | None
    background: str | None


NOTHING = Reading(colour=None, shape=None, size=None, position=None, background=None)


def _nearest(value: np.ndarray, table: np.ndarray, names: tuple[str, ...]) -> str:
    return names[int(np.argmin(((table - value) ** 2).sum(axis=-1)))]


def _border_pixels(image: np.ndarray, width: int) -> np.ndarray:
    top, bottom = image[:width].reshape(-1, 3), image[-width:].reshape(-1, 3)
    left, right = image[width:-width, :width].reshape(-1, 3), image[width:-width, -width:].reshape(-1, 3)
    return np.concatenate([top, bottom, left, right])


def _shift_min(labels: np.ndarray) -> np.ndarray:
    """Each cell's minimum over itself and its four neighbours."""
    out = labels.copy()
    np.minimum(out[1:], labels[:-1], out=out[1:])
    np.minimum(out[:-1], labels[1:], out=out[:-1])
    np.minimum(out[:, 1:], labels[:, :-1], out=out[:, 1:])
    np.minimum(out[:, :-1], labels[:, 1:], out=out[:, :-1])
    return out


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (all False when the mask is empty)."""
    if not mask.any():
        return mask.copy()
    height, width = mask.shape
    outside = height * width
    labels = np.where(mask, np.arange(outside).reshape(height, width), outside)
    # Min-label propagation with pointer jumping: each pass spreads labels to neighbours, then lets
    # every pixel adopt its label's label, which converges in a few passes for compact blobs.
    while True:
        spread = np.where(mask, _shift_min(labels), outside)
        jumped = np.where(mask, np.append(spread.ravel(), outside)[spread], outside)
        if np.array_equal(jumped, labels):
            break
        labels = jumped
    counts = np.bincount(labels[mask])
    return mask & (labels == int(np.argmax(counts)))


def _grow(mask: np.ndarray, steps: int) -> np.ndarray:
    grown = mask.copy()
    for _ in range(steps):
        step = grown.copy()
        step[1:] |= grown[:-1]
        step[:-1] |= grown[1:]
        step[:, 1:] |= grown[:, :-1]
        step[:, :-1] |= grown[:, 1:]
        grown = step
    return grown


@functools.lru_cache(maxsize=32)
def _blur_matrix(size: int, sigma: float) -> np.ndarray:
    """(size, size) row-normalised Gaussian blur along one axis; G @ X @ G.T blurs an image."""
    if sigma <= 0:
        return np.eye(size, dtype=np.float32)
    idx = np.arange(size, dtype=np.float32)
    g = np.exp(-0.5 * ((idx[:, None] - idx[None, :]) / sigma) ** 2)
    # Normalising rows keeps mass near the image edge, as PIL's and convolutional blurs do.
    return (g / g.sum(axis=1, keepdims=True)).astype(np.float32)


def _template(shape: str, cx: float, cy: float, h: float, size: int) -> np.ndarray:
    cov, y0, x0 = coverage(shape, cx, cy, h, size)
    template = np.zeros((size, size), np.float32)
    template[y0 : y0 + cov.shape[0], x0 : x0 + cov.shape[1]] = cov
    return template


def _soft_iou(alpha: np.ndarray, template: np.ndarray) -> float:
    union = float(np.maximum(alpha, template).sum())
    return float(np.minimum(alpha, template).sum()) / union if union > 0 else 0.0


def _fit_shape(alpha: np.ndarray, area: float, cx: float, cy: float) -> tuple[str, float, float]:
    """The shape whose template, at the measured area and centroid and the best-fitting blur,
    overlaps alpha most. Returns (shape, h, box centre y)."""
    size = alpha.shape[0]
    best: tuple[float, str, float, float] | None = None
    for shape in SHAPES:
        h = math.sqrt(area / SHAPE_AREA[shape])
        box_cy = cy - SHAPE_CENTROID_DY[shape] * h
        template = _template(shape, cx, box_cy, h, size)
        for blur in BLUR_LEVELS:
            g = _blur_matrix(size, round(blur * size, 3))
            score = _soft_iou(alpha, g @ template @ g.T)
            if best is None or score > best[0]:
                best = (score, shape, h, box_cy)
    assert best is not None
    return best[1], best[2], best[3]


def _fit_colour(offset: np.ndarray, bg: np.ndarray) -> str:
    """The palette colour c whose segment bg -> c passes closest to the given pixels (as offsets from bg).

    Blurred or anti-aliased pixels are mixtures of bg and c, so they lie on that segment: unlike a
    median colour, this does not drift toward a darker neighbour (orange toward red) under blur.
    """
    directions = _COLOUR_TABLE - bg  # (K, 3)
    t = np.clip(offset @ directions.T / (directions**2).sum(axis=1), 0.0, 1.0)  # (N, K)
    residual = offset[:, None, :] - t[:, :, None] * directions[None]  # (N, K, 3)
    cost = np.sqrt((residual**2).sum(axis=-1)).mean(axis=0)
    return _COLOUR_NAMES[int(np.argmin(cost))]


def read_image(image: np.ndarray) -> Reading:
    """Reads colour, shape, size, position and background from a square (H, W, 3) uint8 image."""
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"expected a square (H, W, 3) image, got shape {image.shape}")
    size = image.shape[0]
    pixels = image.astype(np.float32)
    bg = np.median(_border_pixels(pixels, BORDER), axis=0)
    offset = pixels - bg
    distance = np.sqrt((offset**2).sum(axis=-1))
    blob = largest_component(distance > FOREGROUND_DISTANCE)
    if blob.sum() < max(3.0, MIN_BLOB_FRACTION * size * size):
        return NOTHING
    # The blob's core (its pixels furthest from the background) carries the colour; rim pixels are
    # mostly background and would let a colour cast decide.
    core = blob & (distance >= CORE_FRACTION * np.quantile(distance[blob], 0.9))
    colour = _fit_colour(offset[core], bg)
    direction = _COLOUR_TABLE[_COLOUR_NAMES.index(colour)] - bg
    coverage_estimate = (offset @ direction) / float(direction @ direction)
    coverage_estimate = np.where(_grow(blob, GROW), coverage_estimate, 0.0).astype(np.float32)
    # Area and centroid come from the unclipped estimate: noise then averages out instead of
    # adding up, and blur only moves this mass around.
    area = float(coverage_estimate.sum())
    if area <= 0:
        return NOTHING
    centres = np.arange(size, dtype=np.float32) + 0.5
    cx = float(coverage_estimate.sum(axis=0) @ centres) / area
    cy = float(coverage_estimate.sum(axis=1) @ centres) / area
    shape, h, box_cy = _fit_shape(np.clip(coverage_estimate, 0.0, 1.0), area, cx, cy)
    where = np.asarray([cx / size, box_cy / size], np.float32)
    return Reading(
        colour=colour,
        shape=shape,
        size="small" if h / size < SIZE_THRESHOLD else "large",
        position=_nearest(where, _POSITION_TABLE, _POSITION_NAMES),
        background=_nearest(bg, _BACKGROUND_TABLE, _BACKGROUND_NAMES),
    )


def grade(reading: Reading, asked: Asked | str) -> dict[str, bool]:
    """One entry per attribute the caption mentions: whether the image shows it."""
    wanted = parse_caption(asked) if isinstance(asked, str) else asked
    return {name: getattr(reading, name) == value for name, value in wanted.mentioned().items()}


@dataclass
class Accuracy:
    """Per-attribute accuracy over many (image, prompt) pairs; `all` counts prompts fully satisfied."""

    correct: dict[str, int] = field(default_factory=lambda: dict.fromkeys((*ATTRIBUTES, "all"), 0))
    total: dict[str, int] = field(default_factory=lambda: dict.fromkeys((*ATTRIBUTES, "all"), 0))

    def add_grades(self, grades: dict[str, bool]) -> None:
        for name, ok in grades.items():
            self.total[name] += 1
            self.correct[name] += int(ok)
        self.total["all"] += 1
        self.correct["all"] += int(all(grades.values()))

    def add(self, image: np.ndarray, asked: Asked | str) -> dict[str, bool]:
        grades = grade(read_image(image), asked)
        self.add_grades(grades)
        return grades

    def add_batch(self, images: np.ndarray, prompts: Iterable[Asked | str]) -> None:
        for image, asked in zip(images, prompts, strict=True):
            self.add(image, asked)

    def accuracy(self) -> dict[str, float]:
        """Fraction correct per attribute that was asked at least once."""
        return {name: self.correct[name] / n for name, n in self.total.items() if n > 0}
