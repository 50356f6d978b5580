"""Named architectures and their recipes: the LeNet-5 and the shifted-image CNN through the
library, the CLI and the drawing page."""

from __future__ import annotations

import json

import numpy as np
import pytest

import xpnet
from xpnet.cli import main
from xpnet.draw.preprocess import preprocess
from xpnet.draw.server import DrawServer, predict_drawing
from xpnet.layers import RandomShift
from xpnet.recipes import ARCHS, RECIPES, build, cnn_shift, lenet5

PARAMS = 165_674  # cnn_shift's parameters


def test_lenet5_is_the_write_ups_network():
    model = lenet5(seed=0)
    assert model.count_params() == 60_074 and model.input_shape == (28, 28, 1)
    assert [type(layer).__name__ for layer in model.layers] == [
        "Conv2D", "AvgPool2D", "Conv2D", "AvgPool2D", "Flatten", "Dense", "Dense", "Dense"]
    assert build("mlp").count_params() == 40_785
    with pytest.raises(ValueError, match="lenet5's layers are fixed"):
        build("lenet5", layers=[784, 10])
    with pytest.raises(ValueError, match="unknown architecture"):
        build("resnet")


def test_cnn_shift_is_a_small_cnn_trained_on_shifted_images(tmp_path):
    model = cnn_shift(seed=0)
    assert model.count_params() == PARAMS and model.input_shape == (28, 28, 1)
    assert [type(layer).__name__ for layer in model.layers] == [
        "RandomShift", "Conv2D", "MaxPool2D", "Conv2D", "MaxPool2D", "Flatten", "Dense", "Dropout", "Dense"]
    assert model.layers[0].pixels == 2 and model.count_params() <= 1_000_000
    assert build("cnn_shift", seed=0).config == model.config
    with pytest.raises(ValueError, match="cnn_shift's layers are fixed"):
        build("cnn_shift", layers=[784, 10])
    lines = []
    model.summary(print_fn=lines.append)
    assert any(line.split() == ["RandomShift", "(None,", "28,", "28,", "1)", "0"] for line in lines), lines
    assert f"Total params: {PARAMS:,}" in lines
    model.save(tmp_path / "cnn.safetensors")  # the shift is in the model file, and loads again
    loaded = xpnet.load(tmp_path / "cnn.safetensors")
    assert loaded.config == model.config and isinstance(loaded.layers[0], RandomShift)
    X = np.random.default_rng(0).integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    np.testing.assert_array_equal(loaded.predict_proba(X), model.predict_proba(X))


def test_train_help_shows_each_recipe(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "lenet5: epochs 15" in text and "mlp: epochs 10" in text and "cnn_shift: epochs 15" in text
    assert set(ARCHS) == {"mlp", "lenet5", "cnn_shift"}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["lenet5", "cnn_shift"])
def test_cli_trains_a_cnn_recipe_and_evaluates_it(tmp_path, mnist, capsys, monkeypatch, arch):
    from conftest import _data_root

    out = tmp_path / "run"
    data = str(_data_root())
    assert main(["train", "--arch", arch, "--epochs", "1", "--data", data, "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    accuracy = float(printed.split("test accuracy ")[1].split(",")[0])
    assert accuracy > 0.95  # one epoch of the recipe
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["layers"][0]["type"] == ("Conv2D" if arch == "lenet5" else "RandomShift")
    assert config["fit"]["batch_size"] == RECIPES[arch]["batch_size"]
    assert main(["evaluate", str(out / "model.safetensors"), "--data", data]) == 0
    assert f"test accuracy {accuracy:.4f}" in capsys.readouterr().out


def test_the_drawing_page_serves_a_cnn_and_refuses_a_model_it_cannot_use(rng):
    cnn = lenet5(seed=0)
    image = np.zeros((280, 280))
    image[60:220, 130:150] = 255  # a "1"
    answer = predict_drawing(cnn, image)
    assert 0 <= answer["digit"] < 10 and abs(sum(answer["probabilities"]) - 1) < 1e-5
    want = cnn.predict_proba(np.rint(preprocess(image)).astype(np.uint8)[None])[0]
    np.testing.assert_allclose(answer["probabilities"], want)
    for model in (xpnet.MLP([100, 10]), xpnet.MLP([784, 5])):
        with pytest.raises(ValueError, match="needs a model of 28x28 digit images"):
            DrawServer(model, port=0)
