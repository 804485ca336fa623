"""The demo data: generator, analytic checker and CLIP BPE tokenizer."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter
from transformers import CLIPTokenizer

from service.demo import checker, shapes
from service.demo.checker import NOTHING, Accuracy, grade, read_image
from service.demo.shapes import (
    BACKGROUND_RGB,
    CAPTION_RE,
    COLOUR_RGB,
    EVAL_SEEDS,
    TRAIN_SEEDS,
    Asked,
    ShapeSpec,
    batch,
    eval_prompts,
    make_sample,
    parse_caption,
    render,
    sample_spec,
    vocabulary_words,
)
from service.demo.tokenizer import BOS, EOS, MERGES_HEADER, bytes_to_unicode, train_tokenizer

SIZES = (32, 64)
FIELDS = ("colour", "shape", "size", "position", "background")


def _specs(n: int, seed: int = 0) -> list[tuple[ShapeSpec, str]]:
    rng = np.random.default_rng(seed)
    return [sample_spec(rng) for _ in range(n)]


# --- the dataset -------------------------------------------------------------------------------


def test_palette_is_far_apart() -> None:
    colours = [np.asarray(rgb, float) for rgb in COLOUR_RGB.values()]
    backgrounds = [np.asarray(rgb, float) for rgb in BACKGROUND_RGB.values()]
    assert min(np.linalg.norm(a - b) for a, b in itertools.combinations(colours, 2)) > 100
    assert min(np.linalg.norm(a - b) for a in colours for b in backgrounds) > 120


def test_captions_follow_the_grammar_and_use_every_word() -> None:
    specs = _specs(3000)
    words: Counter[str] = Counter()
    omitted = Counter[str]()
    free_values: dict[str, set[str]] = {"size": set(), "position": set(), "background": set()}
    for spec, caption in specs:
        assert CAPTION_RE.match(caption), caption
        asked = parse_caption(caption)
        words.update(caption.split())
        assert (asked.colour, asked.shape) == (spec.colour, spec.shape)
        for name in free_values:
            value = getattr(asked, name)
            if value is None:
                omitted[name] += 1
                free_values[name].add(getattr(spec, name))
            else:
                assert value == getattr(spec, name)
    assert set(words) == set(vocabulary_words())
    for name in free_values:
        assert 0.2 < omitted[name] / len(specs) < 0.4, name
    # Attributes a caption leaves free still vary in the images.
    assert free_values["size"] == set(shapes.SIZES)
    assert free_values["position"] == set(shapes.POSITIONS)
    assert free_values["background"] == set(shapes.BACKGROUNDS)


def test_every_attribute_value_is_drawn() -> None:
    specs = [spec for spec, _ in _specs(1000, seed=1)]
    for name, values in [
        ("colour", shapes.COLOURS),
        ("shape", shapes.SHAPES),
        ("size", shapes.SIZES),
        ("position", shapes.POSITIONS),
        ("background", shapes.BACKGROUNDS),
    ]:
        assert {getattr(spec, name) for spec in specs} == set(values)


def test_parse_caption_rejects_other_text() -> None:
    with pytest.raises(ValueError):
        parse_caption("a red zebra")
    asked = parse_caption("a large cyan triangle at the top on a gray background")
    assert asked == Asked("cyan", "triangle", "large", "at the top", "gray")
    assert shapes.caption_for(asked) == "a large cyan triangle at the top on a gray background"


@pytest.mark.parametrize("size", SIZES)
def test_samples_are_deterministic_by_seed(size: int) -> None:
    first, again, other = make_sample(7, size), make_sample(7, size), make_sample(8, size)
    assert first.spec == again.spec and first.caption == again.caption
    np.testing.assert_array_equal(first.image, again.image)
    assert first.image.shape == (size, size, 3) and first.image.dtype == np.uint8
    assert not np.array_equal(first.image, other.image)
    images, captions = batch([3, 7, 11], size)
    assert images.shape == (3, size, size, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[1], first.image)
    assert captions[1] == first.caption


def test_jitter_varies_the_pixels_of_one_spec() -> None:
    spec = ShapeSpec("red", "circle", "large", "in the center", "black")
    a = render(spec, 64, np.random.default_rng(0))
    b = render(spec, 64, np.random.default_rng(1))
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("size", SIZES)
def test_shapes_stay_inside_the_image(size: int) -> None:
    images, _ = batch(range(300), size)
    for image in images:
        frame = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert (frame == frame[0]).all()


def test_eval_and_train_seeds_are_disjoint() -> None:
    assert TRAIN_SEEDS.stop <= EVAL_SEEDS.start
    drawn = shapes.train_seeds(np.random.default_rng(0), 1000)
    assert all(seed in TRAIN_SEEDS and seed not in EVAL_SEEDS for seed in drawn)


def test_eval_prompts() -> None:
    prompts = eval_prompts(240)
    assert len(prompts) >= 200
    assert eval_prompts(100) == prompts[:100]
    seeds = [p.seed for p in prompts]
    assert len(set(seeds)) == len(seeds)
    assert all(seed in EVAL_SEEDS and seed not in TRAIN_SEEDS for seed in seeds)
    assert {(p.asked.colour, p.asked.shape) for p in prompts} == set(
        itertools.product(shapes.COLOURS, shapes.SHAPES)
    )
    for caption, asked, _ in prompts:
        assert parse_caption(caption) == asked
    assert sum(p.asked.size is not None for p in prompts) > 0.7 * len(prompts)
    assert sum(p.asked.position is not None for p in prompts) > 0.7 * len(prompts)
    assert sum(p.asked.background is not None for p in prompts) > 0.3 * len(prompts)


# --- the checker -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_checker_reads_every_attribute_of_generated_images(size: int) -> None:
    rng = np.random.default_rng(size)
    wrong: list[tuple[ShapeSpec, checker.Reading]] = []
    for _ in range(400):
        spec, _caption = shapes.draw(rng)
        reading = read_image(render(spec, size, rng))
        if any(getattr(reading, name) != getattr(spec, name) for name in FIELDS):
            wrong.append((spec, reading))
    assert wrong == []


def _degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Softer and noisier, like a decoder's output: blur, pixel noise, a colour cast, speckles."""
    size = image.shape[0]
    blurred = Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=size / 64))
    out = np.asarray(blurred, np.float32) + rng.normal(0, 10, image.shape) + rng.normal(0, 10, 3)
    ys, xs = rng.integers(0, size, (2, 3))
    out[ys, xs] = rng.integers(0, 256, (3, 3))
    return np.clip(out, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size", SIZES)
def test_checker_tolerates_blur_and_noise(size: int) -> None:
    rng = np.random.default_rng(100 + size)
    meter = Accuracy()
    for _ in range(200):
        spec, asked = shapes.draw(rng, omit_probability=0.0)
        meter.add(_degrade(render(spec, size, rng), rng), asked)
    accuracy = meter.accuracy()
    assert all(value >= 0.98 for value in accuracy.values()), accuracy


@pytest.mark.parametrize("background", ["black", "gray"])
def test_checker_sees_nothing_in_a_blank_image(background: str) -> None:
    image = np.empty((64, 64, 3), np.uint8)
    image[...] = BACKGROUND_RGB[background]
    assert read_image(image) == NOTHING
    # A few bright speckles are noise, not a shape.
    image[10, 10] = image[40, 50] = (255, 0, 0)
    assert read_image(image) == NOTHING
    grades = grade(read_image(image), "a small red circle on the left on a black background")
    assert grades == dict.fromkeys(FIELDS, False)


def test_grade_covers_only_what_the_caption_mentions() -> None:
    sample = make_sample(5, 64)
    reading = read_image(sample.image)
    assert grade(reading, "a red square").keys() == {"colour", "shape"}
    truth = grade(reading, sample.caption)
    assert truth.keys() == sample.asked.mentioned().keys() and all(truth.values())
    other = next(c for c in shapes.COLOURS if c != sample.spec.colour)
    assert grade(reading, Asked(other, sample.spec.shape)) == {"colour": False, "shape": True}


def test_accuracy_accumulates_per_attribute() -> None:
    images, captions = batch(range(50), 32)
    meter = Accuracy()
    meter.add_batch(images, captions)
    assert set(meter.accuracy().values()) == {1.0}
    # The same images against prompts that name a colour they do not show.
    wrong = Accuracy()
    for image, caption in zip(images, captions, strict=True):
        asked = parse_caption(caption)
        other = next(c for c in shapes.COLOURS if c != asked.colour)
        wrong.add(image, Asked(other, asked.shape, asked.size, asked.position, asked.background))
    accuracy = wrong.accuracy()
    assert accuracy["colour"] == 0.0 and accuracy["all"] == 0.0 and accuracy["shape"] == 1.0
    assert wrong.total["colour"] == 50


def test_reference_images_for_eval_prompts_grade_correct() -> None:
    """The evaluation path end to end: a perfect model (the renderer) scores 100% on the prompts."""
    meter = Accuracy()
    for _caption, asked, seed in eval_prompts(240):
        rng = np.random.default_rng(seed)
        spec = shapes.spec_for(asked, rng)
        assert asked.mentioned().items() <= vars(spec).items()
        meter.add(render(spec, 32, rng), asked)
    assert set(meter.accuracy().values()) == {1.0}
    assert meter.total["all"] == 240


def test_largest_component() -> None:
    mask = np.zeros((8, 8), bool)
    mask[0, 0] = True
    mask[2:5, 3:7] = True
    mask[6, 0:2] = True
    expected = np.zeros_like(mask)
    expected[2:5, 3:7] = True
    np.testing.assert_array_equal(checker.largest_component(mask), expected)
    # A spiral-ish snake is one component however long its path is.
    snake = np.zeros((9, 9), bool)
    snake[0, :] = snake[:, 8] = snake[8, :] = snake[2:, 0] = snake[2, :7] = True
    assert checker.largest_component(snake).sum() == snake.sum()


# --- the tokenizer -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def clip_tokenizer(tokenizer_dir: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(str(tokenizer_dir))


def test_tokenizer_files_have_clip_layout(tokenizer_dir: Path) -> None:
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    merges = (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == MERGES_HEADER
    assert all(len(line.split(" ")) == 2 for line in merges[1:])
    base = list(bytes_to_unicode().values())
    assert len(set(base)) == 256
    assert [vocab[s] for s in base] == list(range(256))
    assert [vocab[s + "</w>"] for s in base] == list(range(256, 512))
    assert (vocab[BOS], vocab[EOS]) == (len(vocab) - 2, len(vocab) - 1)
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert len(vocab) < 1000
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 77 and config["pad_token"] == EOS
    assert json.loads((tokenizer_dir / "special_tokens_map.json").read_text())["pad_token"] == EOS


def test_every_vocabulary_word_is_one_token(clip_tokenizer: CLIPTokenizer) -> None:
    for word in vocabulary_words():
        assert clip_tokenizer.tokenize(word) == [word + "</w>"]
        assert clip_tokenizer.tokenize(word.upper()) == [word + "</w>"]


TEXTS = [
    "a small red circle on the left on a gray background",
    "A LARGE  cyan\ttriangle at the top",
    "zebra",
    "ünïcode ✓ 🙂 text, with punctuation!? 42",
    "",
]


def test_tokenizer_round_trip_and_specials(tokenizer_dir: Path, clip_tokenizer: CLIPTokenizer) -> None:
    tok = clip_tokenizer
    assert tok.model_max_length == 77 and tok.pad_token == EOS
    bos, eos = tok.bos_token_id, tok.eos_token_id
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    assert (bos, eos, tok.pad_token_id) == (vocab[BOS], vocab[EOS], vocab[EOS])
    caption = "a small red circle on the left on a gray background"
    ids = tok(caption).input_ids
    assert len(ids) == len(caption.split()) + 2
    assert tok.decode(ids, skip_special_tokens=True) == caption
    for text in TEXTS:
        ids = tok(text).input_ids
        assert ids[0] == bos and ids[-1] == eos
        assert tok.unk_token_id not in ids[1:-1]  # every byte has a token, so nothing is unknown
    assert tok.decode(tok("zebra").input_ids, skip_special_tokens=True) == "zebra"
    assert tok.decode(tok("ünïcode").input_ids, skip_special_tokens=True) == "ünïcode"
    padded = tok("a red circle", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == eos


def test_tokenizer_loads_every_way_with_identical_ids(
    tokenizer_dir: Path, clip_tokenizer: CLIPTokenizer
) -> None:
    import transformers

    direct = transformers.CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"))
    loaded = [clip_tokenizer, direct]
    if hasattr(transformers, "CLIPTokenizerFast"):
        loaded.append(transformers.CLIPTokenizerFast.from_pretrained(str(tokenizer_dir)))
    for text in TEXTS:
        ids = [tok(text).input_ids for tok in loaded]
        assert all(i == ids[0] for i in ids), text


def test_tokenizer_learns_words_from_given_captions(tmp_path: Path) -> None:
    train_tokenizer(tmp_path, ["a zebra crossing", "the zebra"])
    tok = CLIPTokenizer.from_pretrained(str(tmp_path))
    assert tok.tokenize("zebra crossing") == ["zebra</w>", "crossing</w>"]
    # The grammar's words are always learned too.
    assert tok.tokenize("purple triangle") == ["purple</w>", "triangle</w>"]
