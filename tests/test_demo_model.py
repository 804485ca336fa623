"""The demo model: a tiny training run of both phases, export, and the shipped model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from service.demo import recipe
from service.demo.checker import grade, read_image
from service.demo.shapes import POSITIONS, Asked, caption_for
from service.demo.train import export_model, load_autoencoder, lr_at, train_autoencoder, train_unet
from service.ldm.checkpoint import load_model
from service.ldm.config import ModelConfig
from service.ldm.engine import Engine, GenerationRequest
from service.ldm.layout import CONFIG_METADATA_KEY
from service.paths import bundled_model

TINY_AE = recipe.AutoencoderTraining(steps=3, batch=4, checkpoint_every=2, warmup=1)
TINY_UNET = recipe.UNetTraining(steps=3, batch=4, pool=16, checkpoint_every=2, warmup=1)


def test_learning_rate_schedule() -> None:
    assert lr_at(0, 100, 1.0, 0.1, 10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 0.1, 10) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, 0.1, 10) == pytest.approx(0.1)
    assert lr_at(55, 100, 1.0, 0.1, 10) == pytest.approx(0.55)


def test_two_phases_resume_and_export(tmp_path: Path) -> None:
    ae_dir, unet_dir = tmp_path / "ae", tmp_path / "unet"
    train_autoencoder(ae_dir, TINY_AE, seed=1)
    first = load_autoencoder(ae_dir).state_dict()["decoder.conv_out.weight"].clone()
    # Resuming past the end changes nothing; asking for more steps continues from the checkpoint.
    train_autoencoder(ae_dir, TINY_AE, seed=1)
    assert np.array_equal(
        load_autoencoder(ae_dir).state_dict()["decoder.conv_out.weight"].numpy(), first.numpy()
    )
    train_unet(unet_dir, ae_dir, TINY_UNET, seed=1)
    assert (unet_dir / "tokenizer" / "vocab.json").is_file()
    path = export_model(unet_dir, ae_dir, tmp_path / "model")
    model = load_model(path.parent)
    assert model.config.family == "custom"
    assert model.config.unet == recipe.UNET
    assert model.config.prediction == TINY_UNET.prediction == "v"
    engine = Engine(model)
    [result] = engine.generate([GenerationRequest(prompt="a red circle", steps=2, seed=0)])
    assert result.image is not None and result.image.size == (recipe.IMAGE_SIZE, recipe.IMAGE_SIZE)


def test_unknown_prediction_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="prediction"):
        train_unet(tmp_path / "unet", tmp_path / "ae", replace(TINY_UNET, prediction="x0"))
    assert not (tmp_path / "unet").exists()


shipped = pytest.mark.skipif(not bundled_model().is_dir(), reason="the demo model is not in models/ yet")


@shipped
def test_shipped_model_loads_with_the_standard_loader() -> None:
    files = list(bundled_model().glob("*.safetensors"))
    assert len(files) == 1
    assert files[0].stat().st_size <= 25 * 1024 * 1024
    with safe_open(str(files[0]), framework="pt") as f:
        config = ModelConfig.from_json(f.metadata()[CONFIG_METADATA_KEY])
    model = load_model(bundled_model())
    assert model.config == config
    assert (bundled_model() / "tokenizer" / "merges.txt").is_file()


@shipped
def test_shipped_model_draws_something() -> None:
    engine = Engine.load(bundled_model())
    [result] = engine.generate(
        [GenerationRequest(prompt="a large red square in the center", steps=8, seed=3)]
    )
    assert result.image is not None
    pixels = np.asarray(result.image)
    assert pixels.shape == (engine.config.sample_size, engine.config.sample_size, 3)
    assert pixels.std() > 10  # not a constant image


@shipped
def test_shipped_model_puts_shapes_where_the_caption_says() -> None:
    """Position is the attribute the model learned last (an eps-trained model ignored it): one shape
    per position and colour, graded by the analytic checker."""
    engine = Engine.load(bundled_model())
    asked = [
        Asked(colour=colour, shape=shape, size="large", position=position)
        for colour, shape in (("red", "square"), ("cyan", "circle"))
        for position in POSITIONS
    ]
    requests = [GenerationRequest(prompt=caption_for(a), seed=10 + i) for i, a in enumerate(asked)]
    placed = [
        grade(read_image(np.asarray(result.image)), a)["position"]
        for a, result in zip(asked, engine.generate(requests), strict=True)
    ]
    assert sum(placed) >= 8, placed


def test_cli_refuses_an_unknown_prediction(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli.main import main

    with pytest.raises(SystemExit) as exited:
        main(["train", "unet", "--prediction", "x0", "--out", str(tmp_path / "unet")])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--prediction" in err and "Traceback" not in err
    assert not (tmp_path / "unet").exists()
