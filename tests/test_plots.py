"""Plots: each draws from real MNIST data and a real trained model and writes a non-empty PNG."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import xpnet
from xpnet import plots

pytest.importorskip("matplotlib", reason="xpnet.plots needs matplotlib (pip install 'xpnet[plot]')")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(mnist):
    """A small model trained for 2 epochs on 10,000 real MNIST images, with its history and
    its test-set probabilities."""
    X_train, y_train, X_test, y_test = mnist
    model = xpnet.MLP([784, 64, 10], seed=0)
    history = model.fit(X_train[:10_000], y_train[:10_000], epochs=2, optimizer="adam", lr=1e-3,
                        validation_data=(X_test[:2000], y_test[:2000]), verbose=0)
    return model, history, X_test[:2000], y_test[:2000], model.predict_proba(X_test[:2000])


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000, f"{path}: {len(data)} bytes"
    assert not list(path.parent.glob(".*.tmp")), "a temp file was left behind"


def test_examples_and_means_per_class(mnist, tmp_path):
    X_train, y_train, _, _ = mnist
    fig = plots.examples_per_class(X_train, y_train, path=tmp_path / "examples.png")
    assert len([ax for ax in fig.axes if ax.images]) == 10
    assert [ax.get_title() for ax in fig.axes if ax.images] == [str(d) for d in range(10)]
    assert_png(tmp_path / "examples.png")
    first_seven = X_train[np.flatnonzero(y_train == 7)[0]]
    np.testing.assert_array_equal(fig.axes[7].images[0].get_array(), first_seven)

    fig = plots.mean_image_per_class(X_train.reshape(len(X_train), -1), y_train, path=tmp_path / "means.png")
    assert_png(tmp_path / "means.png")
    shown = np.asarray(fig.axes[3].images[0].get_array())
    np.testing.assert_allclose(shown, X_train[y_train == 3].mean(axis=0), rtol=1e-12)


def test_training_curves_from_a_history_or_its_records(trained, tmp_path):
    _, history, *_ = trained
    fig = plots.training_curves(history, path=tmp_path / "curves.png")
    assert_png(tmp_path / "curves.png")
    loss_ax, acc_ax = fig.axes
    assert [line.get_label() for line in loss_ax.lines] == ["train", "validation"]
    np.testing.assert_allclose(loss_ax.lines[0].get_ydata(), history.history["loss"])
    np.testing.assert_allclose(acc_ax.lines[1].get_ydata(), history.history["val_accuracy"])
    records = [dict(zip(history.history, values)) for values in zip(*history.history.values())]
    fig2 = plots.training_curves(records)
    np.testing.assert_allclose(fig2.axes[0].lines[0].get_ydata(), history.history["loss"])
    with pytest.raises(ValueError, match="no 'loss'"):
        plots.training_curves({"loss": []})


def test_confusion_matrix_and_per_class_accuracy_of_a_trained_model(trained, tmp_path):
    _, _, _, y, proba = trained
    y_pred = proba.argmax(axis=1)
    fig = plots.confusion_matrix(y, y_pred, path=tmp_path / "confusion.png")
    assert_png(tmp_path / "confusion.png")
    assert f"{(y_pred == y).mean():.2%}" in fig.axes[0].get_title()
    fig = plots.per_class_accuracy(y, y_pred, path=tmp_path / "per_class.png")
    assert_png(tmp_path / "per_class.png")
    heights = [bar.get_height() for bar in fig.axes[0].patches]
    np.testing.assert_allclose(heights, [(y_pred[y == c] == c).mean() for c in range(10)])
    fig = plots.confusion_matrix(y, y_pred, normalize=True)
    assert len(fig.axes[0].texts) == 100


def test_worst_misclassified_shows_the_most_confident_mistakes(trained, tmp_path):
    _, _, X, y, proba = trained
    fig = plots.worst_misclassified(X, y, proba, n=12, path=tmp_path / "worst.png")
    assert_png(tmp_path / "worst.png")
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 12
    pred = proba.argmax(axis=1)
    wrong = np.flatnonzero(pred != y)
    confidence = proba[wrong, pred[wrong]]
    worst = wrong[np.argmax(confidence)]
    np.testing.assert_array_equal(shown[0].images[0].get_array(), X[worst])
    assert shown[0].get_title().startswith(f"true {y[worst]}, said {pred[worst]}")
    # Every one shown is a mistake, in order of falling confidence.
    titles = [ax.get_title() for ax in shown]
    assert all(t.split(",")[0][5:] != t.split("said ")[1].split("\n")[0] for t in titles)


def test_worst_misclassified_with_no_mistakes_says_so():
    X = np.zeros((3, 28, 28))
    proba = np.eye(10)[[1, 2, 3]]
    fig = plots.worst_misclassified(X, np.array([1, 2, 3]), proba)
    assert "no misclassified" in fig.texts[0].get_text()


def test_confusion_counts_and_class_accuracies_by_hand():
    y_true = np.array([0, 0, 1, 1, 1, 2])
    y_pred = np.array([0, 1, 1, 1, 0, 2])
    np.testing.assert_array_equal(plots.confusion_counts(y_true, y_pred), [[1, 1, 0], [1, 2, 0], [0, 0, 1]])
    np.testing.assert_allclose(plots.class_accuracies(y_true, y_pred, n_classes=4), [0.5, 2 / 3, 1.0, np.nan])
    with pytest.raises(ValueError, match="same length"):
        plots.confusion_counts(y_true, y_pred[:-1])
    with pytest.raises(ValueError, match="integer labels"):
        plots.confusion_counts(y_true.astype(float), y_pred)
    with pytest.raises(ValueError, match="below n_classes=2"):
        plots.confusion_counts(y_true, y_pred, n_classes=2)
    with pytest.raises(ValueError, match="not square"):
        plots.examples_per_class(np.zeros((6, 10)), y_true)


def test_import_xpnet_does_not_import_matplotlib():
    code = "import sys, xpnet, xpnet.plots, xpnet.runs, xpnet.draw.server; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
