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

# Norm-wise tolerance. Central differences in float64 with h = 1e-6 carry a rounding error of
# about eps * |loss| / h ~ 2e-16 * 2 / 1e-6 ~ 4e-10 per entry (the truncation error,
# h^2 |f'''| / 6 ~ 1e-13, is far smaller): a few 1e-9 over a parameter's <= 100 entries, against
# gradient norms of 1e-2 to 1, so a relative error of ~1e-8 (measured: at most 1.0e-7 over 60
# seeds x these 5 stacks, every parameter). TOL = 1e-6 leaves a 10x margin, yet a gradient off by
# 0.01% in norm, or one entry off by 1e-4 of the norm, fails. An element-wise relative check is
# wrong here: entries near zero are all rounding error (at 1e-6 element-wise, correct code
# failed for about 1 seed in 6).
TOL = 1e-6
SEEDS = {"cpu": 20}  # cheap sizes: 20 seeds on NumPy, 3 on the slower namespaces


def gradient_error(analytic, numeric) -> float:
    """``||analytic - numeric|| / max(||analytic||, ||numeric||)`` (Frobenius norms)."""
    scale = max(np.linalg.norm(analytic), np.linalg.norm(numeric))
    assert scale > 1e-4, "a (near) zero gradient would make the check vacuous"
    return float(np.linalg.norm(analytic - numeric) / scale)


def assert_gradient_close(analytic, numeric, tol=TOL):
    error = gradient_error(analytic, numeric)
    assert error <= tol, f"norm-wise relative error {error:.3g} > {tol:g} (shape {analytic.shape})"


def loss_of(model, X, y):
    return float(F.cross_entropy(model.forward(X), y, impl="xp"))


def gradients_of(backend, layers, activation, seed):
    """``(analytic, numeric)`` for every parameter of a float64 model drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    model = xpnet.MLP(layers, activation=activation, dtype="float64", seed=seed, backend=backend)
    # biases away from zero so that every parameter, not just weights, gets a real check
    model.set_weights([(W, rng.normal(size=b.shape) * 0.5) for W, b in model.get_weights()])
    X = backend.asarray(rng.normal(size=(11, layers[0])))
    y = backend.asarray(rng.integers(0, layers[-1], size=11))

    logits = model.forward(X, training=True)
    _, dlogits = F.softmax_cross_entropy(logits, y, impl="xp")
    model.backward(dlogits)
    analytic = [backend.to_numpy(g).copy() for g in model.gradients()]
    pairs = []
    for p, g in zip(model.parameters(), analytic):
        host = backend.to_numpy(p).copy()

        def loss_with(value, p=p):
            p[...] = backend.asarray(value)
            return loss_of(model, X, y)

        numeric = central_differences(loss_with, host)
        p[...] = backend.asarray(host)
        pairs.append((g, numeric))
    return pairs


@pytest.mark.parametrize("layers, activation", STACKS)
def test_parameter_gradients_match_finite_differences(backend, layers, activation):
    """Central differences with h = 1e-6: norm-wise relative error <= TOL, over many seeds."""
    for seed in range(SEEDS.get(backend.name, 3)):
        for analytic, numeric in gradients_of(backend, layers, activation, seed):
            assert_gradient_close(analytic, numeric)


def _spoil(g, how):
    bad = g.copy()
    if how == "scaled by 1.01":
        bad *= 1.01
    elif how == "scaled by 1.0001":
        bad *= 1.0001
    elif how == "one entry off by 1e-4 of the norm":
        bad.flat[int(np.argmax(np.abs(bad)))] += 1e-4 * np.linalg.norm(bad)
    elif how == "one entry zeroed":
        bad.flat[int(np.argmax(np.abs(bad)))] = 0.0
    else:  # "reversed": the right numbers in the wrong places
        bad = bad[::-1].copy()
    return bad


@pytest.mark.parametrize(
    "how", ["scaled by 1.01", "scaled by 1.0001", "one entry off by 1e-4 of the norm", "one entry zeroed", "reversed"]
)
def test_the_check_fails_on_a_wrong_gradient(how):
    """The same check that passes the right gradients must refuse slightly wrong ones."""
    backend = xpnet.get_backend("cpu")
    refused = 0
    for seed in range(5):
        for analytic, numeric in gradients_of(backend, [6, 8, 4], "relu", seed):
            assert_gradient_close(analytic, numeric)
            with pytest.raises(AssertionError, match="norm-wise relative error"):
                assert_gradient_close(_spoil(analytic, how), numeric)
            refused += 1
    assert refused == 5 * 4  # every parameter of every seed


def test_input_gradient_of_loss_matches_finite_differences():
    """softmax_cross_entropy's gradient w.r.t. the logits, checked directly, over 20 seeds."""
    for seed in range(20):
        rng = np.random.default_rng(seed)
        z = rng.normal(size=(7, 10)) * 3
        y = rng.integers(0, 10, size=7)
        _, grad = F.softmax_cross_entropy(z, y, impl="xp")
        numeric = central_differences(lambda a: float(F.cross_entropy(a, y)), z)
        assert_gradient_close(grad, numeric)
        assert gradient_error(grad * 1.0001, numeric) > TOL


def test_weighted_loss_gradient_matches_finite_differences():
    """With per-row weights (some 0), over 20 seeds: the gradient is the weighted loss's."""
    for seed in range(20):
        rng = np.random.default_rng(seed)
        z = rng.normal(size=(7, 10)) * 3
        y = rng.integers(0, 10, size=7)
        w = rng.choice([0.0, 0.5, 1.0, 2.5], size=7)
        _, grad = F.softmax_cross_entropy(z, y, weights=w, impl="xp")
        numeric = central_differences(lambda a: float(F.softmax_cross_entropy(a, y, weights=w, impl="xp")[0]), z)
        assert_gradient_close(grad, numeric)
        assert gradient_error(grad * 1.0001, numeric) > TOL
