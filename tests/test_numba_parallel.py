"""The parallel Numba drivers of ``bias_relu`` and ``relu_backward`` against the ``xp`` reference.

``numba_cpu`` runs an op's ``*_parallel`` driver from ``PARALLEL_MIN_ELEMENTS`` elements up
(2**18 for these two ops), a size the property tests never reach. Here the threshold is lowered
(monkeypatched) so odd and tiny shapes take the parallel drivers, the serial drivers are
replaced by ones that fail, so a test cannot pass on the serial path, and the results must equal
the reference bit for bit (both ops are exact: a max and an add per element): on odd shapes,
non-contiguous inputs and biases, NaN-poisoned outputs, in place, and with NaN/zeros in the
inputs. Two tests also cross the real threshold, without monkeypatching. Layout variants run in
float32 only (every new combination of array layouts is a fresh numba compile in CI); the
contiguous odd shapes and NaN cases run in both dtypes.
"""

from __future__ import annotations

import numpy as np
import pytest

from xpnet import functional as F

pytest.importorskip("numba")
from xpnet.kernels import numba_cpu  # noqa: E402

DTYPES = ["float32", "float64"]
SHAPES = [(1, 1), (1, 37), (37, 1), (3, 7), (129, 65), (1031, 3), (5, 4099)]


@pytest.fixture
def parallel_only(monkeypatch):
    """Every size takes the parallel drivers, the serial ones fail if called, and each parallel
    driver counts its calls (so a test can check which one ran)."""
    loops = numba_cpu._get_loops()
    for op in ("bias_relu", "relu_backward"):
        monkeypatch.setitem(numba_cpu.PARALLEL_MIN_ELEMENTS, op, 1)
    calls = {}

    def refuse(name):
        def serial(*args):
            raise AssertionError(f"the serial driver {name} ran where the parallel one should")

        return serial

    def count(name, kernel):
        def parallel(*args):
            calls[name] = calls.get(name, 0) + 1
            return kernel(*args)

        return parallel

    for name in ("bias_relu_serial", "relu_backward_flat_serial", "relu_backward_2d_serial"):
        monkeypatch.setattr(loops, name, refuse(name))
    for name in ("bias_relu_parallel", "relu_backward_flat_parallel", "relu_backward_2d_parallel"):
        monkeypatch.setattr(loops, name, count(name, getattr(loops, name)))
    return calls


def data(rng, shape, dtype, zeros=True):
    """Values of both signs with exact zeros (and -0.0) sprinkled in: ReLU's edge cases."""
    a = rng.normal(size=shape).astype(dtype)
    if zeros:
        a.flat[::5] = 0
        a.flat[1::11] = -0.0
    return a


def poisoned(shape, dtype, order="C"):
    return np.full(shape, np.nan, dtype=dtype, order=order)


# --- bias_relu -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_bias_relu_parallel_equals_reference_on_odd_shapes(parallel_only, rng, shape, dtype):
    x = data(rng, shape, dtype)
    b = data(rng, shape[1:], dtype)
    if shape[1] >= 3:
        b.flat[::3] = -x.max()  # whole columns pushed negative
    expected = F.bias_relu(x, b, impl="xp")
    if x.size >= 37:  # both sides of the ReLU are exercised
        assert (expected == 0).any() and (expected > 0).any()
    out = poisoned(shape, dtype)
    result = F.bias_relu(x, b, out=out, impl="numba")
    assert result is out
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(F.bias_relu(x, b, impl="numba"), expected)
    # narrow rows are regrouped into wide ones, the rows left over in a second call
    assert parallel_only["bias_relu_parallel"] == 2 * (1 + (shape[1] <= 32 and shape[0] % (64 // shape[1]) > 0
                                                            and shape[0] >= 64 // shape[1]))


@pytest.mark.parametrize("dtype", ["float32"])  # layouts: one dtype (each is a compile)
@pytest.mark.parametrize(
    "layout", ["transposed", "sliced", "negative strides", "strided bias", "F-order out", "strided out"]
)
def test_bias_relu_parallel_on_non_contiguous_arrays(parallel_only, rng, dtype, layout):
    big = data(rng, (258, 130), dtype)
    x, b = big[:129, :65], data(rng, (65,), dtype)
    out = poisoned((129, 65), dtype)
    if layout == "transposed":
        x = data(rng, (65, 129), dtype).T
    elif layout == "sliced":
        x = big[::2, 1::2]
    elif layout == "negative strides":
        x = big[::-2, ::-2]
    elif layout == "strided bias":
        b = data(rng, (130,), dtype)[::2]
    elif layout == "F-order out":
        out = poisoned((129, 65), dtype, order="F")
    else:
        out = poisoned((258, 130), dtype)[::2, ::2]
    expected = F.bias_relu(np.ascontiguousarray(x), np.ascontiguousarray(b), impl="xp")
    result = F.bias_relu(x, b, out=out, impl="numba")
    assert result is out
    np.testing.assert_array_equal(out, expected)
    assert parallel_only["bias_relu_parallel"] >= 1


@pytest.mark.parametrize("dtype", ["float32"])  # layouts: one dtype (each is a compile)
@pytest.mark.parametrize("x_view", ["contiguous", "sliced"])
def test_bias_relu_parallel_in_place(parallel_only, rng, dtype, x_view):
    base = data(rng, (202, 98), dtype)
    x = base[1:102] if x_view == "contiguous" else base[::2, ::2]
    b = data(rng, (x.shape[1],), dtype)
    expected = F.bias_relu(x.copy(), b, impl="xp")
    untouched = base.copy()
    result = F.bias_relu(x, b, out=x, impl="numba")
    assert result is x
    np.testing.assert_array_equal(x, expected)
    outside = np.ones(base.shape, bool)
    if x_view == "contiguous":
        outside[1:102] = False
    else:
        outside[::2, ::2] = False
    np.testing.assert_array_equal(base[outside], untouched[outside])  # nothing else written


@pytest.mark.parametrize("dtype", ["float32"])  # layouts: one dtype (each is a compile)
@pytest.mark.parametrize("overlap", ["bias is a row of out", "out is x shifted by a row"])
def test_bias_relu_parallel_with_an_out_that_overlaps_an_input(parallel_only, rng, dtype, overlap):
    """A partial overlap must read every input before it is overwritten (via a scratch)."""
    base = data(rng, (130, 64), dtype)
    if overlap == "bias is a row of out":
        x, out = data(rng, (129, 64), dtype), base[1:]
        b = base[1]  # the first row the kernel writes
    else:
        x, out = base[:-1], base[1:]  # row i is written where row i + 1 is still to be read
        b = data(rng, (64,), dtype)
    expected = F.bias_relu(x.copy(), b.copy(), impl="xp")
    assert F.bias_relu(x, b, out=out, impl="numba") is out
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_backward_parallel_with_an_out_that_overlaps_an_input(parallel_only, rng, dtype):
    base = data(rng, (130, 64), dtype, zeros=False)
    dy, out = base[:-1], base[1:]  # row i is written where row i + 1 is still to be read
    y = np.maximum(data(rng, dy.shape, dtype), 0)
    expected = F.relu_backward(dy.copy(), y, impl="xp")
    assert F.relu_backward(dy, y, out=out, impl="numba") is out
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_relu_parallel_propagates_nan_like_the_reference(parallel_only, rng, dtype):
    x = data(rng, (67, 33), dtype)
    x[3, :] = np.nan
    x[:, 5] = np.inf
    x[7, 7] = -np.inf
    b = data(rng, (33,), dtype)
    b[9] = np.nan
    with np.errstate(invalid="ignore"):
        expected = F.bias_relu(x, b, impl="xp")
    np.testing.assert_array_equal(F.bias_relu(x, b, impl="numba"), expected)  # NaN where NaN


# --- relu_backward ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(7,), (3, 5, 7)])
def test_relu_backward_parallel_flat_equals_reference(parallel_only, rng, shape, dtype):
    dy = data(rng, shape, dtype, zeros=False)
    y = np.maximum(data(rng, shape, dtype), 0)  # a ReLU output: zeros where the input was <= 0
    expected = F.relu_backward(dy, y, impl="xp")
    if dy.size >= 7:
        assert (expected == 0).any() and (expected != 0).any()
    out = poisoned(shape, dtype)
    assert F.relu_backward(dy, y, out=out, impl="numba") is out
    np.testing.assert_array_equal(out, expected)
    assert parallel_only["relu_backward_flat_parallel"] == 1


@pytest.mark.parametrize("dtype", ["float32"])  # layouts: one dtype (each is a compile)
@pytest.mark.parametrize("layout", ["transposed", "sliced dy", "sliced y", "negative strides", "strided out"])
def test_relu_backward_parallel_2d_on_non_contiguous_arrays(parallel_only, rng, dtype, layout):
    shape = (129, 67)
    dy = data(rng, shape, dtype, zeros=False)
    y = np.maximum(data(rng, shape, dtype), 0)
    out = poisoned(shape, dtype)
    if layout == "transposed":
        dy = data(rng, shape[::-1], dtype, zeros=False).T
    elif layout == "sliced dy":
        dy = data(rng, (258, 134), dtype, zeros=False)[::2, 1::2]
    elif layout == "sliced y":
        y = np.maximum(data(rng, (129, 201), dtype), 0)[:, ::3]
    elif layout == "negative strides":
        dy, y = dy[::-1, ::-1], y[::-1]
    else:
        out = poisoned((129, 134), dtype)[:, ::2]
    expected = F.relu_backward(np.ascontiguousarray(dy), np.ascontiguousarray(y), impl="xp")
    assert F.relu_backward(dy, y, out=out, impl="numba") is out
    np.testing.assert_array_equal(out, expected)
    assert parallel_only["relu_backward_2d_parallel"] == 1


@pytest.mark.parametrize("dtype", ["float32"])  # layouts: one dtype (each is a compile)
@pytest.mark.parametrize("contiguous", [True, False])
def test_relu_backward_parallel_in_place(parallel_only, rng, dtype, contiguous):
    base = data(rng, (130, 90), dtype, zeros=False)
    dy = base if contiguous else base[::2, ::3]
    y = np.maximum(data(rng, dy.shape, dtype), 0)
    expected = F.relu_backward(dy.copy(), y, impl="xp")
    assert F.relu_backward(dy, y, out=dy, impl="numba") is dy
    np.testing.assert_array_equal(dy, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_backward_parallel_nan_and_zero_cases(parallel_only, rng, dtype):
    """Derivative 0 at y == 0 (and -0.0); NaN in dy passes only where y > 0; NaN y blocks."""
    dy = data(rng, (41, 29), dtype, zeros=False)
    y = np.maximum(data(rng, (41, 29), dtype), 0)
    dy[::4, ::3] = np.nan
    y[2, :] = np.nan
    y[:, 4] = -0.0
    expected = F.relu_backward(dy, y, impl="xp")
    assert np.isnan(expected).any() and (expected[2] == 0).all() and (expected[:, 4] == 0).all()
    np.testing.assert_array_equal(F.relu_backward(dy, y, impl="numba"), expected)


# --- at the real thresholds -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_relu_auto_above_the_real_threshold(rng, dtype, monkeypatch):
    monkeypatch.delenv("XPNET_KERNELS", raising=False)
    shape = (1449, 1451)  # 2,102,499 elements, just past 2**21, with odd widths
    assert shape[0] * shape[1] >= numba_cpu.PARALLEL_MIN_ELEMENTS["bias_relu"]
    loops = numba_cpu._get_loops()
    ran = []
    parallel = loops.bias_relu_parallel
    monkeypatch.setattr(loops, "bias_relu_parallel", lambda *a: (ran.append(1), parallel(*a))[1])
    x = data(rng, (shape[1], shape[0]), dtype).T  # and transposed
    b = data(rng, (shape[1],), dtype)
    out = poisoned(shape, dtype)
    F.bias_relu(x, b, out=out)
    assert ran == [1]
    np.testing.assert_array_equal(out, F.bias_relu(x, b, impl="xp"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_backward_auto_above_the_real_threshold(rng, dtype, monkeypatch):
    monkeypatch.delenv("XPNET_KERNELS", raising=False)
    loops = numba_cpu._get_loops()
    ran = []
    for name in ("relu_backward_2d_parallel", "relu_backward_flat_parallel", "relu_backward_flat_streaming"):
        kernel = getattr(loops, name)
        monkeypatch.setattr(loops, name, lambda *a, k=kernel, n=name: (ran.append(n), k(*a))[1])
    base = data(rng, (2900, 1451), dtype, zeros=False)
    dy = base[::2]  # 1450 x 1451 = 2,103,950 strided elements, just past 2**21
    assert dy.size >= numba_cpu.PARALLEL_MIN_ELEMENTS["relu_backward"]
    y = np.maximum(data(rng, dy.shape, dtype), 0)
    out = poisoned(dy.shape, dtype)
    F.relu_backward(dy, y, out=out)
    np.testing.assert_array_equal(out, F.relu_backward(np.ascontiguousarray(dy), y, impl="xp"))
    dy_c = np.ascontiguousarray(dy)
    out_c = poisoned(dy.shape, dtype)
    F.relu_backward(dy_c, y, out=out_c)
    np.testing.assert_array_equal(out_c, out)
    # past STREAM_MIN_BYTES (float64 here) the contiguous call streams its stores instead
    flat = "relu_backward_flat_streaming" if dy_c.nbytes >= numba_cpu.STREAM_MIN_BYTES else "relu_backward_flat_parallel"
    assert ran == ["relu_backward_2d_parallel", flat]


def test_relu_backward_streams_from_exactly_the_threshold(parallel_only, monkeypatch, rng):
    """``STREAM_MIN_BYTES`` is the first size that streams: one byte-size below it, plain stores."""
    loops = numba_cpu._get_loops()
    ran = []
    kernel = loops.relu_backward_flat_streaming
    monkeypatch.setattr(loops, "relu_backward_flat_streaming", lambda *args: ran.append("streaming") or kernel(*args))
    monkeypatch.setattr(numba_cpu, "STREAM_MIN_BYTES", 64 * 8 * 4)  # 64 float32 rows of 8
    for rows in (64, 63):
        dy, y = rng.standard_normal((rows, 8)).astype(np.float32), rng.standard_normal((rows, 8)).astype(np.float32)
        np.testing.assert_array_equal(numba_cpu.relu_backward(dy, y), F.relu_backward(dy, y, impl="xp"))
        ran.append(rows)
    assert ran == ["streaming", 64, 63] and parallel_only == {"relu_backward_flat_parallel": 1}
