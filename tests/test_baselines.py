"""NearestCentroid: seed 001's "average digit" classifier."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from xpnet.baselines import NearestCentroid, NotFittedError

REPO = Path(__file__).resolve().parents[1]
MNIST = Path(os.environ.get("XPNET_DATA") or REPO.parent / "shared" / "data") / "mnist"


@pytest.mark.skipif(
    not (MNIST / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"real MNIST not found in {MNIST} (set XPNET_DATA to a folder holding mnist/)",
)
def test_mnist_test_accuracy_matches_seed_001():
    from xpnet.datasets import load_mnist

    X, y = load_mnist("train", root=MNIST, download=False)
    X_test, y_test = load_mnist("test", root=MNIST, download=False)
    model = NearestCentroid().fit(X, y)
    accuracy = model.score(X_test, y_test)
    assert accuracy == pytest.approx(0.8203, abs=0.003)
    # the centroids are the pixel means of each digit, on the 0-1 scale
    np.testing.assert_allclose(model.centroids_[3], X[y == 3].mean(axis=0).ravel() / 255)


def _blobs(seed=0, n=300, features=17, classes=(2, 5, 9)):
    """Well separated Gaussian clusters, one per class, with labels that are not 0..C-1.

    The cluster centers are the same for every seed; ``seed`` draws the points.
    """
    centers = np.random.default_rng(1234).normal(0.0, 10.0, size=(len(classes), features))
    rng = np.random.default_rng(seed)
    label_index = rng.integers(0, len(classes), size=n)
    X = centers[label_index] + rng.normal(0.0, 0.5, size=(n, features))
    return X, np.asarray(classes)[label_index]


def test_fit_stores_class_means_and_labels():
    X, y = _blobs()
    model = NearestCentroid().fit(X, y)
    assert model.classes_.tolist() == [2, 5, 9]
    assert model.n_features_in_ == 17
    for k, label in enumerate(model.classes_):
        np.testing.assert_allclose(model.centroids_[k], X[y == label].mean(axis=0), rtol=1e-13)


def test_separated_clusters_are_classified_perfectly():
    X, y = _blobs()
    X_new, y_new = _blobs(seed=1)  # new points around the same centers
    model = NearestCentroid().fit(X, y)
    assert model.score(X, y) == 1.0
    assert model.score(X_new, y_new) == 1.0
    assert model.predict(X_new).dtype == y.dtype


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_distances_equal_the_direct_formula(offset):
    rng = np.random.default_rng(3)
    X = rng.normal(offset, 1.0, size=(41, 13))
    y = rng.integers(0, 4, size=41)
    model = NearestCentroid().fit(X, y)
    X_new = rng.normal(offset, 1.0, size=(29, 13))
    direct = ((X_new[:, None, :] - model.centroids_[None, :, :]) ** 2).mean(axis=2)
    d = model.mean_squared_distances(X_new)
    assert d.shape == (29, 4) and d.dtype == np.float64
    np.testing.assert_allclose(d, direct, rtol=1e-9, atol=1e-9 * offset**2)
    np.testing.assert_array_equal(model.predict(X_new), model.classes_[direct.argmin(axis=1)])


def test_images_and_flat_rows_uint8_and_scaled_floats_agree():
    rng = np.random.default_rng(4)
    X = rng.integers(0, 256, size=(60, 5, 7), dtype=np.uint8)
    y = rng.integers(0, 3, size=60)
    X_test = rng.integers(0, 256, size=(25, 5, 7), dtype=np.uint8)
    a = NearestCentroid().fit(X, y)
    b = NearestCentroid().fit(X.reshape(60, 35).astype(np.float32) / 255, y)
    np.testing.assert_allclose(a.centroids_, b.centroids_, rtol=1e-6)
    np.testing.assert_array_equal(a.predict(X_test), b.predict(X_test.reshape(25, 35) / 255))
    # and the prediction is the nearest centroid by a direct loop, for a handful of rows
    for x, label in zip(X_test[:5], a.predict(X_test[:5])):
        d = [np.mean((x.ravel() / 255 - c) ** 2) for c in a.centroids_]
        assert a.classes_[int(np.argmin(d))] == label


def test_score_is_a_python_float_fraction():
    X, y = _blobs()
    model = NearestCentroid().fit(X, y)
    y_wrong = y.copy()
    y_wrong[:30] = np.where(y[:30] == 2, 5, 2)
    score = model.score(X, y_wrong)
    assert type(score) is float and score == pytest.approx(270 / 300)


# -- bad input ---------------------------------------------------------------------------------


@pytest.fixture
def fitted():
    X, y = _blobs()
    return NearestCentroid().fit(X, y)


def test_predict_before_fit_is_refused():
    with pytest.raises(NotFittedError, match="not fitted"):
        NearestCentroid().predict(np.ones((2, 3)))
    assert issubclass(NotFittedError, ValueError)


def test_feature_mismatch_is_refused(fitted):
    with pytest.raises(ValueError, match="X has 16 features, but NearestCentroid was fitted with 17"):
        fitted.predict(np.ones((4, 16)))


@pytest.mark.parametrize("shape", [(0, 17), (5, 0)])
def test_empty_X_is_refused(shape):
    with pytest.raises(ValueError, match=r"X is empty: shape \(" + str(shape[0])):
        NearestCentroid().fit(np.ones(shape), np.ones(shape[0], dtype=int))


def test_length_mismatch_is_refused(fitted):
    with pytest.raises(ValueError, match="X has 10 rows but y has 9 labels"):
        NearestCentroid().fit(np.ones((10, 3)), np.arange(9))
    with pytest.raises(ValueError, match="X has 4 rows but y has 5 labels"):
        fitted.score(np.ones((4, 17)), np.arange(5))


@pytest.mark.parametrize("shape", [(12,), (2, 3, 4, 5)])
def test_wrong_rank_is_refused(shape):
    with pytest.raises(ValueError, match=r"\(N, features\) or \(N, H, W\)"):
        NearestCentroid().fit(np.ones(shape), np.arange(shape[0]))


def test_bad_labels_are_refused():
    X = np.ones((4, 3))
    with pytest.raises(TypeError, match="integer labels, got dtype float64"):
        NearestCentroid().fit(X, np.array([0.0, 1.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="y must be 1-D"):
        NearestCentroid().fit(X, np.zeros((4, 1), dtype=int))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_X_is_refused(bad):
    X = np.ones((4, 3))
    X[2, 1] = bad
    with pytest.raises(ValueError, match="NaN or infinity"):
        NearestCentroid().fit(X, np.array([0, 1, 1, 0]))


@pytest.mark.parametrize("X", [np.ones((4, 3), dtype=bool), np.ones((4, 3), dtype=complex),
                               np.array([["a"] * 3] * 4)])
def test_non_numeric_X_is_refused(X):
    with pytest.raises(TypeError, match="X must hold integers or real floats, got dtype"):
        NearestCentroid().fit(X, np.array([0, 1, 1, 0]))
