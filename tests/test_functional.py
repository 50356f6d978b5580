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


# --- which implementation runs: the dispatch rules, seen from outside ----------------------------


@pytest.fixture
def numba_calls(monkeypatch):
    """The names of the numba kernels called (each still runs), in call order."""
    from xpnet import kernels

    module = kernels.kernel_module("numba")
    if module.unavailable():
        pytest.skip(module.unavailable())
    monkeypatch.delenv("XPNET_KERNELS", raising=False)
    calls = []
    for op in kernels.OPS_OF_IMPL["numba"]:
        def spy(*args, _op=op, _kernel=getattr(module, op), **kwargs):
            calls.append(_op)
            return _kernel(*args, **kwargs)

        monkeypatch.setattr(module, op, spy)
    return calls


def kernel_cases(rng):
    """op -> (function, its array arguments, the keyword naming the output array)."""
    z = rng.normal(size=(4, 3))
    labels = np.array([0, 2, 1, 2])
    return {
        "relu_backward": (F.relu_backward, (rng.normal(size=(4, 3)), np.maximum(z, 0)), "out"),
        "bias_relu": (F.bias_relu, (z, rng.normal(size=3)), "out"),
        "softmax": (F.softmax, (z,), "out"),
        "softmax_cross_entropy": (F.softmax_cross_entropy, (z, labels), "grad_out"),
        "softmax_cross_entropy_backward": (F.softmax_cross_entropy_backward, (z, labels), "out"),
    }


def _output(result):
    return result[1] if isinstance(result, tuple) else result  # softmax_cross_entropy: (loss, grad)


@pytest.mark.parametrize("impl", ["auto", "numba", "xp"])
@pytest.mark.parametrize("op", ["relu_backward", "bias_relu", "softmax", "softmax_cross_entropy",
                                "softmax_cross_entropy_backward"])
def test_numpy_floats_run_the_numba_kernel_unless_xp_is_asked_and_out_is_honoured(numba_calls, rng, op, impl):
    function, args, out_name = kernel_cases(rng)[op]
    want = function(*args, impl="xp")
    assert numba_calls == []  # the reference calls no kernel
    out = np.full_like(args[0], np.nan)
    kwargs = {} if impl == "auto" else {"impl": impl}  # "auto" is the default
    got = function(*args, **kwargs, **{out_name: out})
    assert _output(got) is out
    np.testing.assert_allclose(out, _output(want), rtol=1e-12, atol=1e-15)
    if op == "softmax_cross_entropy":
        np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    assert numba_calls == ([] if impl == "xp" else [op.replace("cross_entropy_backward", "cross_entropy")])


@pytest.mark.parametrize("axis", [-1, 1])
def test_softmax_over_the_rows_of_a_2d_array_runs_the_kernel(numba_calls, rng, axis):
    z = rng.normal(size=(4, 3))
    np.testing.assert_allclose(F.softmax(z, axis=axis), np.exp(ref_log_softmax(z)), rtol=1e-12)
    assert numba_calls == ["softmax"]


@pytest.mark.parametrize("shape, axis", [((4, 3), 0), ((2, 4, 3), -1), ((2, 4, 3), 1)])
def test_softmax_and_log_softmax_along_any_axis_run_the_reference(numba_calls, rng, shape, axis):
    z = rng.normal(size=shape)
    want = np.exp(z) / np.exp(z).sum(axis=axis, keepdims=True)
    np.testing.assert_allclose(F.softmax(z, axis=axis), want, rtol=1e-12)
    np.testing.assert_allclose(F.log_softmax(z, axis=axis), np.log(want), rtol=1e-12, atol=1e-15)
    assert numba_calls == []
    with pytest.raises(ValueError, match="has no kernel for this call"):
        F.softmax(z, axis=axis, impl="numba")


@pytest.mark.parametrize("op, args", [
    ("relu_backward", (np.ones((4, 3), np.float32), np.ones((4, 3)))),
    ("relu_backward", (np.ones((4, 3)), np.ones((4, 3), np.float32))),
    ("bias_relu", (np.ones((4, 3), np.float32), np.ones(3))),
    ("bias_relu", (np.ones((4, 3)), np.ones(3, np.float32))),
])
def test_mixed_dtypes_run_the_reference_or_are_refused_when_a_kernel_is_forced(numba_calls, op, args):
    function = getattr(F, op)
    np.testing.assert_array_equal(function(*args), function(*args, impl="xp"))
    assert numba_calls == []
    with pytest.raises(ValueError, match=f"impl='numba' cannot run {op}: operands of different dtypes"):
        function(*args, impl="numba")


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"^logits expects a 2-D array \(rows, classes\), got shape \(4,\)$"):
        F.softmax_cross_entropy(np.ones(4), np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match=r"^x expects a 2-D array \(rows, classes\), got shape \(4,\)$"):
        F.bias_relu(np.ones(4), np.ones(4))
    with pytest.raises(ValueError, match=r"^labels must have shape \(3,\) to match logits \(3, 5\), got \(2,\)$"):
        F.cross_entropy(np.ones((3, 5)), np.zeros(2, dtype=int))


@pytest.mark.parametrize("label_dtype", ["uint8", "int32", "uint64"])
def test_labels_of_any_integer_dtype_give_the_same_loss(backend, label_dtype):
    z = np.arange(12.0).reshape(4, 3) / 7
    y = np.array([0, 2, 1, 2])
    want = F.cross_entropy(z, y)
    zd, yd = backend.asarray(z), backend.asarray(y.astype(label_dtype))
    np.testing.assert_allclose(backend.to_numpy(F.cross_entropy(zd, yd)), want, rtol=1e-15)
    loss, _ = F.softmax_cross_entropy(zd, yd, impl="xp")
    np.testing.assert_allclose(backend.to_numpy(loss), want, rtol=1e-15)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_scale_pixels_is_x_over_255_rounded_once_in_dtype(backend, dtype):
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    got = backend.to_numpy(F.scale_pixels(backend.asarray(pixels), getattr(backend.xp, dtype)))
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, (pixels / 255).astype(dtype))


# --- convolution and pooling: geometry, refusals, dispatch ---------------------------------------


@pytest.mark.parametrize("size, window, stride, padding, expected", [
    (5, 3, 1, "valid", (3, 0, 0)),
    (6, 3, 2, "valid", (2, 0, 0)),
    (4, 1, 1, "same", (4, 0, 0)),
    (5, 2, 1, "same", (5, 0, 1)),  # the odd padding goes after, as in Keras
    (7, 6, 1, "same", (7, 2, 3)),
    (6, 3, 2, "same", (3, 0, 1)),
])
def test_conv_output_size_and_padding(size, window, stride, padding, expected):
    assert F.conv_output_size(size, window, stride, padding) == expected


def test_same_padding_on_one_side_only_keeps_the_size(rng):
    x, kernel = rng.normal(size=(2, 3, 5, 2)), rng.normal(size=(1, 2, 2, 4))
    padded = np.pad(x, ((0, 0), (0, 0), (0, 1), (0, 0)))  # the one column of padding goes after
    want = padded[:, :, :-1] @ kernel[0, 0] + padded[:, :, 1:] @ kernel[0, 1]
    np.testing.assert_allclose(F.conv2d(x, kernel, padding="same", impl="xp"), want, rtol=1e-12)


@pytest.mark.parametrize("call, message", [
    (lambda: F.conv_output_size(5, 6, 1, "valid"), "a window of 6 does not fit an input of size 5 without padding"),
    (lambda: F.conv_output_size(5, 3, 1, "full"), "padding must be 'valid' or 'same', got 'full'"),
    (lambda: F.conv2d(np.ones((2, 5, 5)), np.ones((3, 3, 1, 2))),
     "conv2d expects images of shape (N, H, W, C), got shape (2, 5, 5)"),
    (lambda: F.conv2d(np.ones((2, 5, 5, 3)), np.ones((3, 3, 1, 2))),
     "kernel of shape (3, 3, 1, 2) does not fit images of shape (2, 5, 5, 3): expected (kh, kw, in_channels, filters)"),
    (lambda: F.conv2d(np.ones((2, 5, 5, 1)), np.ones((3, 3, 1, 2)), strides=0),
     "strides must be a positive int or a pair of them, got 0"),
    (lambda: F.conv2d_backward(np.ones((2, 2, 2, 2)), np.ones((2, 5, 5, 1)), np.ones((3, 3, 1, 2)), impl="xp"),
     "dy has shape (2, 2, 2, 2); conv2d's output here is (2, 3, 3, 2)"),
    (lambda: F.max_pool2d_backward(np.ones((1, 2, 2, 1)), np.ones((1, 4, 4, 1)), np.ones((1, 2, 1, 1)), impl="xp"),
     "dy (1, 2, 2, 1) and y (1, 2, 1, 1) must have the same shape"),
    (lambda: F.max_pool2d(np.ones((4, 4, 1))), "pooling expects images of shape (N, H, W, C), got shape (4, 4, 1)"),
    (lambda: F.avg_pool2d(np.ones((1, 4, 4, 1)), pool_size=1.5),
     "pool_size must be a positive int or a pair of them, got 1.5"),
    (lambda: F.avg_pool2d(np.ones((1, 4, 4, 1)), pool_size=(2, True)),
     "pool_size must be a positive int or a pair of them, got (2, True)"),
    (lambda: F.avg_pool2d(np.ones((1, 4, 4, 1)), pool_size=(0, 2)),
     "pool_size must be a positive int or a pair of them, got (0, 2)"),
    (lambda: F.max_pool2d(np.ones((1, 4, 4, 1)), strides=(1, 1, 1)),
     "strides must be a positive int or a pair of them, got (1, 1, 1)"),
])
def test_conv_and_pool_refusals_say_what_is_wrong(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value) == message


def conv_cases(rng):
    """op -> (function, its array arguments), small float64 inputs."""
    x, kernel = rng.normal(size=(2, 5, 5, 2)), rng.normal(size=(3, 3, 2, 3))
    images = rng.normal(size=(2, 4, 4, 2))
    pooled, dy = F.max_pool2d(images, impl="xp"), rng.normal(size=(2, 2, 2, 2))
    return {
        "conv2d": (F.conv2d, (x, kernel)),
        "conv2d_backward": (F.conv2d_backward, (rng.normal(size=(2, 3, 3, 3)), x, kernel)),
        "max_pool2d": (F.max_pool2d, (images,)),
        "max_pool2d_backward": (F.max_pool2d_backward, (dy, images, pooled)),
        "avg_pool2d": (F.avg_pool2d, (images,)),
        "avg_pool2d_backward": (F.avg_pool2d_backward, (dy, images)),
    }


def _assert_close(got, want):
    for g, w in zip(got, want) if isinstance(want, tuple) else [(got, want)]:
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("op", ["conv2d", "conv2d_backward", "max_pool2d", "max_pool2d_backward", "avg_pool2d",
                                "avg_pool2d_backward"])
def test_image_ops_run_their_numba_kernel_by_default_and_the_reference_for_mixed_dtypes(numba_calls, rng, op):
    function, args = conv_cases(rng)[op]
    want = function(*args, impl="xp")
    _assert_close(function(*args), want)
    assert numba_calls == [op]
    mixed_cases = range(len(args)) if len(args) > 1 else []  # any one operand in float32
    for i in mixed_cases:
        mixed = args[:i] + (args[i].astype(np.float32),) + args[i + 1:]
        function(*mixed)
        assert numba_calls == [op]
        with pytest.raises(ValueError, match=f"impl='numba' cannot run {op}: operands of different dtypes"):
            function(*mixed, impl="numba")


def test_max_pool_gradient_goes_to_the_first_maximum_of_each_window(backend):
    x = np.array([[5.0, 5.0, 1.0, 2.0],
                  [5.0, 0.0, 3.0, 3.0]]).reshape(1, 2, 4, 1)  # ties: the first in row-major order wins
    xd = backend.asarray(x)
    y = F.max_pool2d(xd, impl="xp")
    dx = F.max_pool2d_backward(backend.asarray(np.array([10.0, 20.0]).reshape(1, 1, 2, 1)), xd, y, impl="xp")
    np.testing.assert_array_equal(backend.to_numpy(dx).reshape(2, 4), [[10, 0, 0, 0], [0, 0, 20, 0]])


# --- augmentation: shifted images ------------------------------------------------------------------


def _shifted_by_loops(x, down, right):
    """An independent reference: each pixel copied from where it came from, or 0."""
    out = np.zeros_like(x)
    n, h, w, _ = x.shape
    for k in range(n):
        for i in range(h):
            for j in range(w):
                if 0 <= i - down[k] < h and 0 <= j - right[k] < w:
                    out[k, i, j] = x[k, i - down[k], j - right[k]]
    return out


def test_shift_images_moves_each_image_by_its_own_offsets_and_fills_zeros(backend, rng):
    x = rng.uniform(1, 2, size=(6, 5, 7, 2))  # no zeros: every zero of the result is fill
    down, right = np.array([0, 1, -2, 3, 0, 5]), np.array([0, -1, 2, 0, -7, 1])  # 5 and -7: off the image
    got = backend.to_numpy(F.shift_images(backend.asarray(x), backend.asarray(down), backend.asarray(right)))
    np.testing.assert_array_equal(got, _shifted_by_loops(x, down, right))
    np.testing.assert_array_equal(got[0], x[0])  # no offset: the image itself
    np.testing.assert_array_equal(got[1, 1:, :-1], x[1, :-1, 1:])  # one down, one left
    assert (got[1, 0] == 0).all() and (got[1, :, -1] == 0).all()
    assert (got[4] == 0).all() and (got[5] == 0).all()  # shifted out of the image entirely
    for dtype in ("float32", "float64"):
        xd = backend.asarray(x.astype(dtype))
        assert F.shift_images(xd, backend.asarray(down), backend.asarray(right)).dtype == xd.dtype


def test_shift_images_far_past_the_edge_leave_zeros(backend, rng):
    """Offsets many times the image's size: only zeros, in every direction (no index wraps)."""
    x = rng.uniform(1, 2, size=(4, 5, 6, 2))
    down, right = np.array([50, -50, 0, 3]), np.array([0, 3, 60, -60])
    got = backend.to_numpy(F.shift_images(backend.asarray(x), backend.asarray(down), backend.asarray(right)))
    assert (got == 0).all()


def test_shift_images_backward_is_the_adjoint_of_the_shift(backend, rng):
    """The shift is linear, so its backward must be its adjoint: ``<S x, g> == <x, S* g>``."""
    x, g = rng.normal(size=(4, 6, 5, 3)), rng.normal(size=(4, 6, 5, 3))
    down, right = np.array([2, -1, 0, -3]), np.array([-2, 1, 4, 0])
    offsets = backend.asarray(down), backend.asarray(right)
    shifted = backend.to_numpy(F.shift_images(backend.asarray(x), *offsets))
    back = backend.to_numpy(F.shift_images_backward(backend.asarray(g), *offsets))
    assert abs(np.sum(shifted * g) - np.sum(x * back)) <= 1e-12 * np.sum(np.abs(shifted * g))
    np.testing.assert_array_equal(back, _shifted_by_loops(g, -down, -right))  # the shift back, zero fill


@pytest.mark.parametrize("call, message", [
    (lambda: F.shift_images(np.ones((2, 4, 4)), np.zeros(2, int), np.zeros(2, int)),
     "shift_images expects images of shape (N, H, W, C), got shape (2, 4, 4)"),
    (lambda: F.shift_images(np.ones((2, 4, 4, 1)), np.zeros(3, int), np.zeros(2, int)),
     "down must be a 1-D integer array of 2 offsets (one per image), got shape (3,) and dtype int64"),
    (lambda: F.shift_images_backward(np.ones((2, 4, 4, 1)), np.zeros(2, int), np.zeros(2)),
     "right must be a 1-D integer array of 2 offsets (one per image), got shape (2,) and dtype float64"),
    (lambda: F.shift_images(np.ones((1, 4, 4, 1), np.float16), np.zeros(1, int), np.zeros(1, int), impl="numba"),
     "impl='numba' cannot run shift_images: the numba kernels take float32 or float64, got float16"),
    (lambda: F.shift_images_backward(np.ones((1, 4, 4, 1), np.float16), np.zeros(1, int), np.zeros(1, int),
                                     impl="numba"),
     "impl='numba' cannot run shift_images: the numba kernels take float32 or float64, got float16"),
])
def test_shift_images_refusals_say_what_is_wrong(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value) == message


@pytest.mark.parametrize("impl", ["xp", "auto"])
def test_softmax_cross_entropy_weighs_each_row_in_every_implementation(rng, impl):
    """``weights``: each row's loss and gradient times its weight, over N; into ``grad_out``
    when given. ``auto`` runs the Numba kernel on NumPy (the weights passed to it)."""
    logits = rng.standard_normal((7, 5)).astype(np.float32)
    labels = rng.integers(0, 5, 7)
    w = rng.uniform(0, 2, 7).astype(np.float32)
    rows = F.cross_entropy(logits, labels, reduction="none", impl="xp").astype(np.float64)
    _, plain = F.softmax_cross_entropy(logits, labels, impl="xp")
    loss, grad = F.softmax_cross_entropy(logits, labels, weights=w, impl=impl)
    np.testing.assert_allclose(loss, np.sum(w * rows) / 7, rtol=1e-6)
    np.testing.assert_allclose(grad, plain * w[:, None], rtol=1e-6, atol=1e-8)
    out = np.full((7, 5), np.nan, np.float32)
    assert F.softmax_cross_entropy(logits, labels, weights=w, grad_out=out, impl=impl)[1] is out
    np.testing.assert_allclose(out, grad, rtol=1e-6, atol=1e-8)
    for bad in (w.astype(np.float64), w[:6]):
        with pytest.raises(ValueError, match=r"weights must have shape \(7,\) and dtype float32 to match the logits, "
                                             rf"got shape \({bad.shape[0]},\) and dtype {bad.dtype}"):
            F.softmax_cross_entropy(logits, labels, weights=bad, impl=impl)
