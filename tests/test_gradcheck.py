"""Every parameter's analytic gradient against central finite differences, in float64."""

from __future__ import annotations

import numpy as np
import pytest

import xpnet
from conftest import central_differences
from xpnet import functional as F

STACKS = [
    ([5, 3], "relu"),
    ([6, 8, 4], "relu"),
    ([7, 9, 6, 5], "relu"),
    ([6, 8, 4], "tanh"),
    ([5, 7, 5, 3], "sigmoid"),
]


def loss_of(model, X, y):
    return float(F.cross_entropy(model.forward(X), y, impl="xp"))


@pytest.mark.parametrize("layers, activation", STACKS)
def test_parameter_gradients_match_finite_differences(backend, rng, layers, activation):
    """Central differences with h = 1e-6: max relative error < 1e-6 for every weight and bias."""
    model = xpnet.MLP(layers, activation=activation, dtype="float64", seed=3, backend=backend)
    # biases away from zero so that every parameter, not just weights, gets a real check
    model.set_weights([(W, rng.normal(size=b.shape) * 0.5) for W, b in model.get_weights()])
    X = backend.asarray(rng.normal(size=(11, layers[0])))
    y = backend.asarray(rng.integers(0, layers[-1], size=11))

    logits = model.forward(X, training=True)
    _, dlogits = F.softmax_cross_entropy(logits, y, impl="xp")
    model.backward(dlogits)
    analytic = [backend.to_numpy(g).copy() for g in model.gradients()]

    for p, g in zip(model.parameters(), analytic):
        host = backend.to_numpy(p).copy()

        def loss_with(value, p=p):
            p[...] = backend.asarray(value)
            return loss_of(model, X, y)

        numeric = central_differences(loss_with, host)
        p[...] = backend.asarray(host)
        assert np.abs(g).max() > 1e-4, "a zero gradient would make the check vacuous"
        rel = np.abs(g - numeric) / np.maximum(np.abs(g) + np.abs(numeric), 1e-8)
        assert rel.max() < 1e-6, (tuple(host.shape), rel.max())


def test_input_gradient_of_loss_matches_finite_differences(rng):
    """softmax_cross_entropy's gradient w.r.t. the logits, checked directly."""
    z = rng.normal(size=(7, 10))
    y = rng.integers(0, 10, size=7)
    _, grad = F.softmax_cross_entropy(z, y, impl="xp")
    numeric = central_differences(lambda a: float(F.cross_entropy(a, y)), z)
    rel = np.abs(grad - numeric) / np.maximum(np.abs(grad) + np.abs(numeric), 1e-8)
    assert rel.max() < 1e-6
