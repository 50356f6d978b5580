"""Models pickle, deep-copy and joblib-dump with an exact round trip: a ``Backend`` travels by
name (``xpnet/backend.py``), everything else a model holds is plain data."""

from __future__ import annotations

import copy
import io
import pickle
import sys

import joblib
import numpy as np
import pytest

import xpnet
from xpnet import backend as backend_module
from xpnet.backend import Backend, BackendError
from xpnet.layers import AvgPool2D, Conv2D, Dense, Dropout, Flatten, MaxPool2D, RandomShift


def joblib_round_trip(obj):
    buffer = io.BytesIO()
    joblib.dump(obj, buffer)
    buffer.seek(0)
    return joblib.load(buffer)


ROUND_TRIPS = {
    "pickle": lambda obj: pickle.loads(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)),
    "pickle-protocol-2": lambda obj: pickle.loads(pickle.dumps(obj, protocol=2)),
    "deepcopy": copy.deepcopy,
    "joblib": joblib_round_trip,
}


def mlp(backend):
    return xpnet.MLP([36, 16, 8, 3], activation="tanh", seed=0, backend=backend)


def cnn(backend):
    layers = [RandomShift(1), Conv2D(4, 3, activation="relu", padding="same"), MaxPool2D(2), Conv2D(4, 2), AvgPool2D(2),
              Flatten(), Dropout(0.3), Dense(8, activation="relu"), Dense(3)]
    return xpnet.Sequential(layers, input_shape=(6, 6, 1), seed=0, backend=backend)


@pytest.fixture
def data(rng):
    return rng.random((48, 36)).astype(np.float32), rng.integers(0, 3, size=48)


def weights(model):
    return xpnet.Sequential.get_weights(model)  # flat, for MLPs too


def train(model, X, y):
    model.fit(X, y, epochs=1, batch_size=16, optimizer="adam", verbose=0, on_divergence="ignore")


@pytest.mark.parametrize("round_trip", ROUND_TRIPS)
@pytest.mark.parametrize("make", [mlp, cnn])
def test_a_trained_model_round_trips_exactly(make, round_trip, backend, data):
    X, y = data
    model = make(backend)
    train(model, X, y)
    same = ROUND_TRIPS[round_trip](model)
    assert same is not model and type(same) is type(model)
    assert same.backend is model.backend  # the same backend, found again by its name
    assert same.config == model.config and same.input_shape == model.input_shape
    for a, b in zip(weights(same), weights(model), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(same.predict_proba(X), model.predict_proba(X))
    # the copy owns its arrays, and goes on exactly as the original would (shuffling, dropout and
    # the random shifts are seeded by generators that travel with the model)
    train(model, X, y)
    train(same, X, y)
    np.testing.assert_array_equal(same.predict_proba(X), model.predict_proba(X))
    assert not all(np.array_equal(a, b) for a, b in zip(weights(same), weights(make(backend))))


def test_an_unbuilt_model_round_trips_and_builds_as_the_original(data):
    X, y = data
    model = xpnet.Sequential([Dense(8, activation="relu"), Dense(3)], seed=1)
    same = pickle.loads(pickle.dumps(model))
    assert not same.built
    train(model, X, y)
    train(same, X, y)
    np.testing.assert_array_equal(same.predict_proba(X), model.predict_proba(X))


def test_backends_pickle_by_name(backend):
    assert pickle.loads(pickle.dumps(backend)) is backend
    assert copy.deepcopy(backend) is backend


def test_a_cuda_model_without_cupy_fails_to_unpickle_naming_the_backend(monkeypatch):
    model = mlp("cpu")
    model.backend = Backend("cuda", np)  # how a CUDA model pickles: its backend by name
    payload = pickle.dumps(model)
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy fails, as where it is not installed
    monkeypatch.setattr(backend_module, "_cache", {})
    with pytest.raises(BackendError, match=r"cannot unpickle an object of the 'cuda' backend: .*needs CuPy"):
        pickle.loads(payload)
