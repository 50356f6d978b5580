"""The reference math: stable for any finite logits, equal to an independent float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

from xpnet import functional as F


def ref_log_softmax(z):
    """Independent float64 reference, row-wise (computed with extended precision where it exists)."""
    z = np.asarray(z, dtype=np.longdouble)
    m = z.max(axis=1, keepdims=True)
    return (z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))).astype(np.float64)


def ref_loss_and_grad(z, y):
    logp = ref_log_softmax(z)
    n = z.shape[0]
    loss = -logp[np.arange(n), y].mean()
    grad = np.exp(logp)
    grad[np.arange(n), y] -= 1
    return loss, grad / n


def logit_cases(rng):
    """Hard cases for a softmax: huge magnitudes, equal rows, one dominant class, mixed scales."""
    return {
        "plus_1e4": 1e4 + rng.normal(size=(7, 10)) * 100,
        "minus_1e4": -1e4 + rng.normal(size=(7, 10)) * 100,
        "spread_1e4": rng.uniform(-1e4, 1e4, size=(9, 10)),
        "equal_rows": np.full((5, 10), 3.25),
        "one_hot_huge": np.where(np.eye(6, 10) > 0, 1e4, -1e4),
        "ordinary": rng.normal(size=(13, 10)),
        "single": rng.normal(size=(1, 3)) * 50,
    }


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softmax_cross_entropy_stable_and_equal_to_reference(backend, rng, dtype):
    xp = backend.xp
    tol = 1e-12 if dtype == "float64" else 1e-5
    for name, z in logit_cases(rng).items():
        y = rng.integers(0, z.shape[1], size=z.shape[0])
        zd = backend.asarray(z.astype(dtype))
        yd = backend.asarray(y)
        ref_loss, ref_grad = ref_loss_and_grad(z.astype(dtype).astype(np.float64), y)

        loss, grad = F.softmax_cross_entropy(zd, yd, impl="xp")
        loss, grad = float(loss), backend.to_numpy(grad)
        assert np.isfinite(loss) and np.isfinite(grad).all(), name
        assert grad.dtype == np.dtype(dtype), name
        scale = max(abs(ref_loss), 1.0)
        assert abs(loss - ref_loss) <= tol * scale * 10, (name, loss, ref_loss)
        np.testing.assert_allclose(grad, ref_grad, rtol=0, atol=tol / z.shape[0] * 10, err_msg=name)
        np.testing.assert_allclose(
            backend.to_numpy(F.softmax_cross_entropy_backward(zd, yd, impl="xp")), grad, rtol=0, atol=0
        )

        p = backend.to_numpy(F.softmax(zd, impl="xp"))
        np.testing.assert_allclose(p, np.exp(ref_log_softmax(z.astype(dtype))), rtol=0, atol=tol * 10, err_msg=name)
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=tol * 10)

        logp = backend.to_numpy(F.log_softmax(zd))
        assert np.isfinite(logp).all(), name
        np.testing.assert_allclose(logp, ref_log_softmax(z.astype(dtype)), rtol=tol * 10, atol=tol * 10, err_msg=name)

        none = backend.to_numpy(F.cross_entropy(zd, yd, reduction="none"))
        total = float(F.cross_entropy(zd, yd, reduction="sum"))
        assert none.shape == (z.shape[0],)
        assert abs(total - none.sum()) <= tol * max(abs(total), 1) * 10
        assert abs(float(F.cross_entropy(zd, yd)) - loss) <= tol * scale * 10


def test_naive_softmax_overflows_where_xpnet_does_not():
    """Seed 000 lost its accuracy to exp overflow: show the naive formula fails on these logits."""
    z = np.array([[1000.0, 999.0, -5.0]])
    with np.errstate(over="ignore", invalid="ignore"):
        naive = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    assert not np.isfinite(naive).all()
    p = F.softmax(z)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p, [[1 / (1 + np.exp(-1.0)), 1 / (1 + np.e), 0.0]], atol=1e-12)


def test_logsumexp_matches_reference(backend, rng):
    z = rng.uniform(-1e4, 1e4, size=(6, 11))
    got = backend.to_numpy(F.logsumexp(backend.asarray(z), axis=1))
    m = z.max(axis=1)
    np.testing.assert_allclose(got, m + np.log(np.exp(z - m[:, None]).sum(axis=1)), rtol=1e-14)
    keep = F.logsumexp(backend.asarray(z), axis=0, keepdims=True)
    assert tuple(keep.shape) == (1, 11)


def test_relu_and_its_derivative_at_zero_is_zero(backend, rng):
    x = rng.normal(size=(4, 9))
    x[0, :3] = 0.0
    xd = backend.asarray(x)
    y = F.relu(xd)
    np.testing.assert_array_equal(backend.to_numpy(y), np.maximum(x, 0))
    dy = rng.normal(size=x.shape) + 2.0
    dx = backend.to_numpy(F.relu_backward(backend.asarray(dy), y, impl="xp"))
    np.testing.assert_array_equal(dx, np.where(x > 0, dy, 0.0))
    assert (dx[0, :3] == 0).all()


def test_bias_relu_matches_relu_of_sum(backend, rng):
    x, b = rng.normal(size=(5, 7)), rng.normal(size=7)
    got = backend.to_numpy(F.bias_relu(backend.asarray(x), backend.asarray(b), impl="xp"))
    np.testing.assert_array_equal(got, np.maximum(x + b, 0))


def test_out_is_honoured_on_the_reference_path(rng):
    z = rng.normal(size=(4, 10))
    out = np.full_like(z, np.nan)
    assert F.softmax(z, out=out, impl="xp") is out
    np.testing.assert_allclose(out, np.exp(ref_log_softmax(z)), atol=1e-15)
    x = rng.normal(size=(4, 10))
    b = rng.normal(size=10)
    assert F.bias_relu(x, b, out=x, impl="xp") is x  # in place
    with pytest.raises(ValueError, match="out has shape"):
        F.softmax(z, out=np.empty((3, 10)), impl="xp")


def test_tanh_and_sigmoid_are_finite_for_huge_inputs():
    x = np.array([-1e4, -50.0, 0.0, 50.0, 1e4])
    with np.errstate(all="raise"):
        s = F.sigmoid(x)
        t = F.tanh(x)
    np.testing.assert_allclose(s, [0.0, 1 / (1 + np.exp(50.0)), 0.5, 1 / (1 + np.exp(-50.0)), 1.0], atol=1e-16)
    np.testing.assert_allclose(t, np.tanh(x))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: F.cross_entropy(np.ones((3, 4)), np.zeros(2, dtype=int)), "labels must have shape"),
        (lambda: F.cross_entropy(np.ones(4), np.zeros(4, dtype=int)), "2-D array"),
        (lambda: F.cross_entropy(np.ones((3, 4)), np.zeros(3, dtype=int), reduction="max"), "reduction"),
        (lambda: F.relu_backward(np.ones((2, 3)), np.ones((3, 2))), "same shape"),
        (lambda: F.bias_relu(np.ones((2, 3)), np.ones(2)), "does not fit"),
        (lambda: F.softmax(np.ones((2, 3)), impl="fortran"), "impl must be one of"),
    ],
)
def test_bad_arguments_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_xpnet_kernels_env_forces_reference(monkeypatch):
    from xpnet import kernels

    monkeypatch.setenv("XPNET_KERNELS", "xp")
    assert kernels.select("softmax", "auto", np.ones((4, 4))) is None
    monkeypatch.setenv("XPNET_KERNELS", "turbo")
    with pytest.raises(ValueError, match="XPNET_KERNELS"):
        kernels.select("softmax", "auto", np.ones((4, 4)))


def test_out_of_range_labels_are_refused_by_the_reference(backend):
    z = backend.asarray(np.ones((3, 4)))
    for bad in ([0, 4, 1], [0, -1, 1]):
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
            F.cross_entropy(z, backend.asarray(np.array(bad)))
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
            F.softmax_cross_entropy(z, backend.asarray(np.array(bad)), impl="xp")


@pytest.mark.parametrize("impl", ["xp", "auto"])
def test_a_minus_inf_logit_of_another_class_is_a_probability_of_zero(impl):
    """``-inf`` is a valid logit (probability 0): the loss stays ``logsumexp(z) - z[y]``."""
    z = np.array([[0.0, -np.inf, 1.0], [2.0, 0.5, -np.inf]])
    y = np.array([0, 1])
    expected = np.array([np.log(1 + np.e), np.log(np.exp(2.0) + np.exp(0.5)) - 0.5])
    np.testing.assert_allclose(F.cross_entropy(z, y, reduction="none", impl="xp"), expected, rtol=1e-12)
    loss, grad = F.softmax_cross_entropy(z, y, impl=impl)
    np.testing.assert_allclose(loss, expected.mean(), rtol=1e-12)
    assert np.isfinite(grad).all() and grad[0, 1] == 0 and grad[1, 2] == 0
    minus_inf_label = F.cross_entropy(np.array([[0.0, -np.inf]]), np.array([1]), reduction="none", impl="xp")
    assert minus_inf_label[0] == np.inf  # the true class has probability 0: an infinite loss, not NaN
