"""Weight initialisation statistics, through ``xpnet.MLP(init=...)``.

He: normal, mean 0, std ``sqrt(2 / fan_in)``. Glorot: uniform on ``+-sqrt(6 / (fan_in + fan_out))``.
Biases start at zero. Layers are 300 x 400 = 120,000 draws and more, so the sample statistics
sit within a fraction of a percent of their expectations: the bounds below are 6-7 standard
errors wide (a correct draw fails with probability < 1e-8), and well inside what a wrong fan
(fan_out for fan_in, or a missing factor 2) or a wrong distribution would move them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import xpnet

WIDTHS = [300, 400, 250, 10]


def within_one_std_fraction(W, std):
    return float(np.mean(np.abs(W) < std))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_he_init_is_normal_with_std_sqrt_2_over_fan_in(dtype):
    model = xpnet.MLP(WIDTHS, init="he", dtype=dtype, seed=0)
    for (W, b), fan_in, fan_out in zip(model.get_weights(), WIDTHS[:-1], WIDTHS[1:]):
        assert W.shape == (fan_in, fan_out) and W.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(b, np.zeros(fan_out, dtype))
        n = W.size
        expected_std = math.sqrt(2.0 / fan_in)
        W = W.astype(np.float64)
        # standard errors: mean std/sqrt(n); std about std/sqrt(2n)
        assert abs(W.mean()) < 6 * expected_std / math.sqrt(n), (fan_in, W.mean())
        assert abs(W.std() / expected_std - 1) < 7 / math.sqrt(2 * n), (fan_in, W.std(), expected_std)
        # normal, not uniform with the same std: P(|w| < std) is 0.6827 (uniform: 0.5774)
        p = 0.6826894921370859
        assert abs(within_one_std_fraction(W, expected_std) - p) < 6 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_glorot_init_is_uniform_within_its_bounds(dtype):
    model = xpnet.MLP(WIDTHS, activation="tanh", init="glorot", dtype=dtype, seed=1)
    for (W, b), fan_in, fan_out in zip(model.get_weights(), WIDTHS[:-1], WIDTHS[1:]):
        assert W.shape == (fan_in, fan_out) and W.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(b, np.zeros(fan_out, dtype))
        n = W.size
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        W = W.astype(np.float64)
        assert np.abs(W).max() <= limit * (1 + 1e-7)  # float32 rounding of a value at the bound
        assert np.abs(W).max() > limit * (1 - 20 / n)  # reaches the bound: P(all < 1 - 20/n) ~ e^-20
        assert W.min() < -limit * (1 - 20 / n) and W.max() > limit * (1 - 20 / n)  # both sides
        # uniform: std limit/sqrt(3), and a quarter of the draws in each quarter of the range
        assert abs(W.mean()) < 6 * (limit / math.sqrt(3)) / math.sqrt(n)
        assert abs(W.std() / (limit / math.sqrt(3)) - 1) < 6 * math.sqrt(0.2 / n)
        counts, _ = np.histogram(W, bins=4, range=(-limit, limit))
        np.testing.assert_allclose(counts / n, 0.25, atol=6 * math.sqrt(0.25 * 0.75 / n))


def test_each_layer_gets_its_own_draws_and_the_seed_fixes_them():
    a = xpnet.MLP([200, 200, 200], dtype="float64", seed=3).get_weights()
    b = xpnet.MLP([200, 200, 200], dtype="float64", seed=3).get_weights()
    c = xpnet.MLP([200, 200, 200], dtype="float64", seed=4).get_weights()
    np.testing.assert_array_equal(a[0][0], b[0][0])
    np.testing.assert_array_equal(a[1][0], b[1][0])
    assert not np.array_equal(a[0][0], a[1][0])
    assert not np.array_equal(a[0][0], c[0][0])
    # the same numbers in float32 and float64 (drawn in float64 on the host, then cast)
    f32 = xpnet.MLP([200, 200, 200], dtype="float32", seed=3).get_weights()
    np.testing.assert_array_equal(f32[1][0], a[1][0].astype(np.float32))


def test_he_and_glorot_differ_in_scale_as_their_formulas_say():
    """For a square n x n layer He's std is sqrt(2/n) and Glorot's sqrt(6/(2n))/sqrt(3) = sqrt(1/n):
    a ratio of sqrt(2)."""
    he = xpnet.MLP([500, 500, 2], init="he", dtype="float64", seed=5).get_weights()[0][0]
    glorot = xpnet.MLP([500, 500, 2], init="glorot", dtype="float64", seed=5).get_weights()[0][0]
    assert he.std() / glorot.std() == pytest.approx(math.sqrt(2), rel=0.01)
