"""Every hand-written kernel equals the ``xp`` reference, and the dispatcher runs what it says.

The kernel tests run over ``impl`` in ("numba", "cuda"); the ``kernel_arrays`` fixture builds
arrays of that implementation's kind (NumPy for numba, CuPy for cuda) and is the only place
that converts, so this same file checks the CUDA kernels on a GPU machine.

Tolerances (float64 1e-12, float32 1e-5, relative) are measured against the terms each formula
combines: a softmax is compared value by value; where the formula subtracts (the loss
``logsumexp(z) - z_y``, the gradient ``p - onehot``) the bound is relative to the size of the
terms subtracted, since that is where either implementation's rounding lives. Results below the
smallest normal number have no relative precision in any implementation: ``atol = tiny``.
Every output is pre-filled with NaN, so an element a kernel forgets to write fails.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xpnet
import xpnet.functional as F
from xpnet import kernels

RTOL = {np.float32: 1e-5, np.float64: 1e-12}
KERNEL_IMPLS = ("numba", "cuda")


class KernelArrays:
    """Moves host (NumPy) test data to an implementation's kind of array and back."""

    def __init__(self, impl):
        self.impl = impl
        self.module = kernels.kernel_module(impl)
        if impl == "cuda":
            import cupy

            self._to, self._back = cupy.asarray, lambda a: a.get()
        else:
            self._to, self._back = np.asarray, np.asarray

    def to(self, host, layout="C"):
        """``host`` on the device, laid out as asked: "C", "F" (a transpose) or "strided"."""
        if layout == "F":
            return self._to(np.ascontiguousarray(host.T)).T
        if layout == "strided":  # every other row and column of a larger array
            big = np.full((2 * host.shape[0], 2 * host.shape[1]) if host.ndim == 2 else 2 * host.shape[0], np.nan, host.dtype)
            big[(slice(None, None, 2),) * host.ndim] = host
            return self._to(big)[(slice(None, None, 2),) * host.ndim]
        return self._to(np.ascontiguousarray(host))

    def poisoned(self, shape, dtype):
        return self._to(np.full(shape, np.nan, dtype))

    def host(self, a):
        return self._back(a)


@pytest.fixture(params=KERNEL_IMPLS)
def kernel_arrays(request):
    reason = kernels.kernel_module(request.param).unavailable()
    if reason:
        if request.param == "cuda" and request.config.getoption("--require-cuda", default=False):
            pytest.fail(f"--require-cuda: {reason}")
        pytest.skip(f"{request.param} kernels unavailable: {reason}")
    return KernelArrays(request.param)


def _run_or_refuse(ka, op, call, *device_arrays):
    """Run a forced kernel, or check that it refuses arrays its module says it cannot run.

    Returns the kernel's result, or None when the module declared the arrays unsupported (then
    the forced call must raise ValueError, and ``impl="auto"`` must still give the reference).
    """
    reason = ka.module.unsupported(op, *device_arrays)
    if reason is None:
        return call(ka.impl)
    with pytest.raises(ValueError, match="cannot run"):
        call(ka.impl)
    return None


# --- data ----------------------------------------------------------------------------------------

dtypes = st.sampled_from([np.float32, np.float64])
layouts = st.sampled_from(["C", "F", "strided"])
shapes = st.tuples(st.integers(1, 37), st.integers(1, 45))
KINDS = ("normal", "wide", "extreme", "equal_rows")


@st.composite
def logits_cases(draw):
    """(host logits, dtype, layout): normal and wide-range values, +-1e4 extremes, equal rows."""
    dtype, layout, (n, c) = draw(dtypes), draw(layouts), draw(shapes)
    kind = draw(st.sampled_from(KINDS))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if kind == "normal":
        x = rng.standard_normal((n, c)) * 3
    elif kind == "wide":
        x = rng.uniform(-300, 300, (n, c))
    elif kind == "extreme":
        x = rng.choice([-1e4, 1e4, -1e4 + 1, 0.5, 1e4 - 3], size=(n, c))
    else:
        x = np.repeat(rng.uniform(-1e4, 1e4, (n, 1)), c, axis=1)
    return x.astype(dtype), dtype, layout


def _assert_close(got, want, rtol, scale=None, floor=None):
    """``|got - want| <= rtol * scale + floor`` elementwise (``scale`` defaults to ``|want|``,
    ``floor`` to the dtype's smallest normal number: a subnormal may come out as 0)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert not np.isnan(got).any(), "NaN in the result: an element was not written"
    scale = np.abs(want) if scale is None else scale
    floor = np.finfo(want.dtype).tiny if floor is None else floor
    bad = np.abs(got.astype(np.float64) - want) > rtol * scale + floor
    assert not bad.any(), f"{bad.sum()} of {bad.size} differ; first at {np.argwhere(bad)[0]}: {got[bad][:3]} vs {want[bad][:3]}"


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# --- each kernel equals the reference -------------------------------------------------------------


@SETTINGS
@given(case=logits_cases())
def test_softmax_equals_reference(kernel_arrays, case):
    x, dtype, layout = case
    ka = kernel_arrays
    want = F.softmax(x, impl="xp")
    xd = ka.to(x, layout)
    out = ka.poisoned(x.shape, dtype)
    got = _run_or_refuse(ka, "softmax", lambda impl: F.softmax(xd, out=out, impl=impl), xd)
    if got is None:
        got = F.softmax(xd, impl="auto")
    else:
        assert got is out
    _assert_close(ka.host(got), want, RTOL[dtype])


@SETTINGS
@given(case=logits_cases(), label_seed=st.integers(0, 2**32 - 1))
def test_softmax_cross_entropy_equals_reference(kernel_arrays, case, label_seed):
    x, dtype, layout = case
    ka = kernel_arrays
    n, c = x.shape
    labels = np.random.default_rng(label_seed).integers(0, c, n)
    want_loss, want_grad = F.softmax_cross_entropy(x, labels, impl="xp")
    xd, yd = ka.to(x, layout), ka.to(labels)
    grad_out = ka.poisoned(x.shape, dtype)
    got = _run_or_refuse(
        ka, "softmax_cross_entropy", lambda impl: F.softmax_cross_entropy(xd, yd, grad_out=grad_out, impl=impl), xd, yd
    )
    if got is None:
        got = F.softmax_cross_entropy(xd, yd, impl="auto")
    else:
        assert got[1] is grad_out
    loss, grad = ka.host(got[0]), ka.host(got[1])
    assert loss.shape == () and loss.dtype == dtype

    # the loss subtracts z_y from logsumexp(z) = max + log(sum): rounding is relative to those
    lse = F.logsumexp(x.astype(np.float64), axis=1)
    picked = x[np.arange(n), labels].astype(np.float64)
    loss_scale = np.mean(np.abs(x.max(axis=1)) + np.abs(lse) + np.abs(picked))
    _assert_close(loss, want_loss, RTOL[dtype], scale=loss_scale)
    # the gradient subtracts onehot from p, then divides by N
    onehot = np.eye(c, dtype=np.float64)[labels]
    p = F.softmax(x, impl="xp").astype(np.float64)
    _assert_close(grad, want_grad, RTOL[dtype], scale=(p + onehot) / n)


@SETTINGS
@given(dtype=dtypes, layout=layouts, shape=shapes, seed=st.integers(0, 2**32 - 1), in_place=st.booleans())
def test_relu_backward_equals_reference(kernel_arrays, dtype, layout, shape, seed, in_place):
    """Exact: a select has no rounding. ``y`` holds exact zeros (derivative 0 there) and -0.0."""
    ka = kernel_arrays
    rng = np.random.default_rng(seed)
    dy = (rng.standard_normal(shape) * 10).astype(dtype)
    y = rng.choice([0.0, -0.0, 1.5, -2.25, 1e-30, -1e-30, 3e4], size=shape).astype(dtype)
    want = F.relu_backward(dy, y, impl="xp")
    dyd, yd = ka.to(dy, layout), ka.to(y, layout)
    out = dyd if in_place else ka.poisoned(shape, dtype)
    got = _run_or_refuse(ka, "relu_backward", lambda impl: F.relu_backward(dyd, yd, out=out, impl=impl), dyd, yd)
    if got is None:
        return
    assert got is out
    np.testing.assert_array_equal(ka.host(got), want)
    assert not np.signbit(ka.host(got)[want == 0]).any(), "zeros must be +0.0, as the reference gives"


@SETTINGS
@given(dtype=dtypes, layout=layouts, shape=shapes, seed=st.integers(0, 2**32 - 1), in_place=st.booleans())
def test_bias_relu_equals_reference(kernel_arrays, dtype, layout, shape, seed, in_place):
    """Exact: one addition, rounded the same way. ``out=x`` runs in place."""
    ka = kernel_arrays
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 5).astype(dtype)
    b = (rng.standard_normal(shape[1]) * 5).astype(dtype)
    x[0, 0] = -b[0]  # an exact zero after the bias
    want = F.bias_relu(x, b, impl="xp")
    xd, bd = ka.to(x, layout), ka.to(b)
    out = xd if in_place else ka.poisoned(shape, dtype)
    got = _run_or_refuse(ka, "bias_relu", lambda impl: F.bias_relu(xd, bd, out=out, impl=impl), xd, bd)
    if got is None:
        return
    assert got is out
    np.testing.assert_array_equal(ka.host(got), want)


def test_kernels_without_out_return_fresh_arrays(kernel_arrays, rng):
    ka = kernel_arrays
    x = rng.standard_normal((9, 7))
    xd = ka.to(x)
    got = F.softmax(xd, impl=ka.impl)
    assert got is not xd and got.shape == x.shape
    _assert_close(ka.host(got), F.softmax(x, impl="xp"), RTOL[np.float64])
    np.testing.assert_array_equal(ka.host(xd), x)  # input untouched


@SETTINGS
@given(case=logits_cases(), columns=st.sampled_from([None, 63, 64, 65, 300]), seed=st.integers(0, 2**32 - 1))
def test_weighted_softmax_cross_entropy_equals_reference(kernel_arrays, case, columns, seed):
    """Per-row weights (0, fractions, 1, large) on the narrow and the wide (>= 64 columns) row
    paths: the Numba kernel equals the reference; the CUDA module has no kernel for them and
    says so when forced."""
    x, dtype, layout = case
    ka = kernel_arrays
    r = np.random.default_rng(seed)
    if columns is not None:
        x = np.resize(x, (x.shape[0], columns)) + r.standard_normal((x.shape[0], columns)).astype(dtype)
    n, c = x.shape
    labels = r.integers(0, c, n)
    weights = r.choice([0.0, 0.25, 1.0, 3.5, 1e3], size=n).astype(dtype)
    want_loss, want_grad = F.softmax_cross_entropy(x, labels, weights=weights, impl="xp")
    xd, yd, wd = ka.to(x, layout), ka.to(labels), ka.to(weights)
    grad_out = ka.poisoned(x.shape, dtype)
    got = _run_or_refuse(
        ka, "softmax_cross_entropy",
        lambda impl: F.softmax_cross_entropy(xd, yd, weights=wd, grad_out=grad_out, impl=impl), xd, yd, wd,
    )
    if got is None:
        got = F.softmax_cross_entropy(xd, yd, weights=wd, impl="auto")
    loss, grad = ka.host(got[0]), ka.host(got[1])
    assert loss.shape == () and loss.dtype == dtype
    lse = F.logsumexp(x.astype(np.float64), axis=1)
    picked = x[np.arange(n), labels].astype(np.float64)
    loss_scale = np.mean(weights * (np.abs(x.max(axis=1)) + np.abs(lse) + np.abs(picked)))
    _assert_close(loss, want_loss, RTOL[dtype], scale=loss_scale)
    onehot = np.eye(c, dtype=np.float64)[labels]
    p = F.softmax(x, impl="xp").astype(np.float64)
    # a probability below the smallest normal number may be flushed to 0 (CuPy's exp does) before
    # the row's factor w / N scales it: the floor scales with it
    factor = weights[:, None].astype(np.float64) / n
    _assert_close(grad, want_grad, RTOL[dtype], scale=factor * (p + onehot),
                  floor=np.finfo(dtype).tiny * np.maximum(1.0, factor))


def test_weighted_softmax_cross_entropy_is_the_weighted_mean(rng):
    """The reference's meaning: ``sum(w_i loss_i) / N`` and ``w_i (p_i - onehot_i) / N``; weights
    of 1 give the unweighted result bit for bit, on every path; a wrong shape or dtype is refused."""
    x = rng.standard_normal((9, 4)) * 3
    labels = rng.integers(0, 4, 9)
    weights = rng.uniform(0, 2, 9)
    loss, grad = F.softmax_cross_entropy(x, labels, weights=weights, impl="xp")
    losses = F.cross_entropy(x, labels, reduction="none")
    assert loss == pytest.approx(np.sum(weights * losses) / 9, rel=1e-14)
    _, plain = F.softmax_cross_entropy(x, labels, impl="xp")
    np.testing.assert_allclose(grad, plain * weights[:, None], rtol=1e-14)
    for impl in ("xp", "auto"):
        for dtype in (np.float32, np.float64):
            xd = x.astype(dtype)
            ones = F.softmax_cross_entropy(xd, labels, weights=np.ones(9, dtype), impl=impl)
            unweighted = F.softmax_cross_entropy(xd, labels, impl=impl)
            assert ones[0] == unweighted[0] and np.array_equal(ones[1], unweighted[1])
    with pytest.raises(ValueError, match=r"weights must have shape \(9,\) and dtype float64.*got shape \(8,\)"):
        F.softmax_cross_entropy(x, labels, weights=weights[:8])
    with pytest.raises(ValueError, match="dtype float64 .* dtype float32"):
        F.softmax_cross_entropy(x, labels, weights=weights.astype(np.float32))


def test_large_rows_and_many_rows_use_every_path(kernel_arrays, rng):
    """Sizes past the parallel thresholds and rows wider than one block."""
    ka = kernel_arrays
    for shape in [(3, 20000), (40000, 10)]:
        x = (rng.standard_normal(shape) * 4).astype(np.float32)
        labels = rng.integers(0, shape[1], shape[0])
        xd, yd = ka.to(x), ka.to(labels)
        _assert_close(ka.host(F.softmax(xd, impl=ka.impl)), F.softmax(x, impl="xp"), 1e-5)
        loss, grad = F.softmax_cross_entropy(xd, yd, impl=ka.impl)
        want_loss, want_grad = F.softmax_cross_entropy(x, labels, impl="xp")
        _assert_close(ka.host(loss), want_loss, 1e-5)
        p = F.softmax(x, impl="xp")
        _assert_close(ka.host(grad), want_grad, 1e-5, scale=(p + np.eye(shape[1])[labels]) / shape[0])
        if ka.impl == "numba":  # (the parallel driver, with row weights)
            weights = rng.uniform(0, 2, shape[0]).astype(np.float32)
            loss, grad = F.softmax_cross_entropy(xd, yd, weights=weights, impl=ka.impl)
            want_loss, want_grad = F.softmax_cross_entropy(x, labels, weights=weights, impl="xp")
            _assert_close(loss, want_loss, 1e-5)
            _assert_close(grad, want_grad, 1e-5, scale=weights[:, None] * (p + np.eye(shape[1])[labels]) / shape[0])
        dy = rng.standard_normal(shape).astype(np.float32)
        np.testing.assert_array_equal(ka.host(F.relu_backward(ka.to(dy), xd, impl=ka.impl)), F.relu_backward(dy, x, impl="xp"))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_streaming_relu_backward_and_copy_write_every_element(dtype, rng, monkeypatch):
    """The streaming-store path (outputs past the cache) on outputs that start off the vector
    boundary, shorter than a vector, across chunk boundaries, and in place."""
    numba_cpu = kernels.kernel_module("numba")
    if numba_cpu.unavailable():
        pytest.skip(numba_cpu.unavailable())
    loops = numba_cpu._get_loops()
    monkeypatch.setattr(numba_cpu, "STREAM_MIN_BYTES", 1)
    monkeypatch.setitem(numba_cpu.PARALLEL_MIN_ELEMENTS, "relu_backward", 1)  # streaming is parallel
    for n in (1, 3, 9, 40_003):
        for offset in range(5):  # output starts 0-4 elements past a 32-byte boundary
            dy = (rng.standard_normal(n + offset) * 10).astype(dtype)[offset:]
            y = rng.choice([0.0, -0.0, 1.5, -2.25, 1e-30, -1e-30, np.nan], size=n + offset).astype(dtype)[offset:]
            want = F.relu_backward(dy, y, impl="xp")
            out = np.full(n + offset, np.nan, dtype)[offset:]
            np.testing.assert_array_equal(F.relu_backward(dy, y, out=out, impl="numba"), want)
            in_place = dy.copy()
            F.relu_backward(in_place, y, out=in_place, impl="numba")
            np.testing.assert_array_equal(in_place, want)
            copied = np.full(n + offset, np.nan, dtype)[offset:]
            loops.copy_streaming(dy, copied)
            np.testing.assert_array_equal(copied, dy)
    monkeypatch.undo()  # and once at the real threshold, as the dispatcher picks it
    size = numba_cpu.STREAM_MIN_BYTES // np.dtype(dtype).itemsize + 7
    dy, y = rng.standard_normal(size).astype(dtype), rng.standard_normal(size).astype(dtype)
    out = np.full(size, np.nan, dtype)
    np.testing.assert_array_equal(F.relu_backward(dy, y, out=out, impl="numba"), F.relu_backward(dy, y, impl="xp"))


def test_labels_out_of_range_are_refused(kernel_arrays):
    """The CPU kernel raises; the CUDA kernel cannot without a host synchronisation per call, so it
    poisons the bad row's loss and gradient with NaN instead (fit checks labels once, up front)."""
    ka = kernel_arrays
    x = ka.to(np.ones((3, 4)))
    labels = ka.to(np.array([0, 4, 1]))
    if ka.impl == "cuda":
        loss, grad = F.softmax_cross_entropy(x, labels, impl="cuda")
        grad = ka.host(grad)
        assert np.isnan(float(loss)) and np.isnan(grad[1]).all() and np.isfinite(grad[[0, 2]]).all()
        return
    with pytest.raises(ValueError, match="outside"):
        F.softmax_cross_entropy(x, labels, impl=ka.impl)


def test_wrong_out_is_refused(kernel_arrays):
    ka = kernel_arrays
    x = ka.to(np.ones((3, 4)))
    with pytest.raises(ValueError, match="shape"):
        F.softmax(x, out=ka.poisoned((4, 3), np.float64), impl=ka.impl)
    with pytest.raises(ValueError, match="dtype"):
        F.relu_backward(x, x, out=ka.poisoned((3, 4), np.float32), impl=ka.impl)


def test_mixed_dtypes_are_refused(kernel_arrays):
    ka = kernel_arrays
    x64, b32 = ka.to(np.ones((3, 4))), ka.to(np.ones(4, np.float32))
    with pytest.raises(ValueError, match="cannot run"):
        F.bias_relu(x64, b32, impl=ka.impl)


# --- dispatch ------------------------------------------------------------------------------------


@pytest.fixture
def numba_spy(monkeypatch):
    """Counts calls into the numba softmax kernel."""
    module = kernels.kernel_module("numba")
    if module.unavailable():
        pytest.skip(module.unavailable())
    calls = []
    real = module.softmax

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "softmax", spy)
    monkeypatch.delenv("XPNET_KERNELS", raising=False)
    return calls


def test_forced_numba_runs_the_numba_kernel(numba_spy, rng):
    F.softmax(rng.standard_normal((5, 3)), impl="numba")
    assert numba_spy == [(5, 3)]


def test_auto_picks_numba_at_the_mlp_sizes(numba_spy, rng):
    for shape in [(128, 10), (60000, 10)]:
        F.softmax(rng.standard_normal(shape).astype(np.float32))
    assert numba_spy == [(128, 10), (60000, 10)]


def test_xpnet_kernels_xp_forces_the_reference(numba_spy, rng, monkeypatch):
    monkeypatch.setenv("XPNET_KERNELS", "xp")
    F.softmax(rng.standard_normal((128, 10)))
    assert numba_spy == []
    F.softmax(rng.standard_normal((4, 3)), impl="numba")  # an explicit impl still wins
    assert numba_spy == [(4, 3)]


def test_unavailable_kernels_are_a_clear_error_and_auto_falls_back(numba_spy, rng, monkeypatch):
    module = kernels.kernel_module("numba")
    monkeypatch.setattr(module, "unavailable", lambda: "numba is not installed (pip install numba)")
    x = rng.standard_normal((6, 4))
    with pytest.raises(RuntimeError, match="not available: numba is not installed"):
        F.softmax(x, impl="numba")
    np.testing.assert_allclose(F.softmax(x), F.softmax(x, impl="xp"))
    assert numba_spy == []


def test_unknown_impl_is_a_clear_error(rng):
    with pytest.raises(ValueError, match="impl must be one of"):
        F.softmax(rng.standard_normal((2, 2)), impl="fortran")


def test_unsupported_arrays_are_a_clear_error_for_a_forced_kernel():
    module = kernels.kernel_module("numba")
    if module.unavailable():
        pytest.skip(module.unavailable())
    with pytest.raises(ValueError, match="float32 or float64"):
        F.softmax(np.ones((2, 3), np.float16), impl="numba")
    with pytest.raises(ValueError, match="integers"):
        F.softmax_cross_entropy(np.ones((2, 3)), np.array([0.0, 1.0]), impl="numba")
    assert F.softmax(np.ones((2, 3), np.float16)).dtype == np.float16  # auto: the reference


def test_numba_is_imported_lazily():
    code = "import sys, xpnet, xpnet.functional, xpnet.kernels; print('numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_numba_cache_goes_to_a_writable_user_dir_when_unset(tmp_path):
    """A read-only site-packages must not matter: numba gets a user cache dir before compiling."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    code = (
        "import os, numba; from xpnet.kernels import numba_cpu; numba_cpu._get_loops(); "
        "print(os.environ['NUMBA_CACHE_DIR']); print(numba.config.CACHE_DIR)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    expected = str(tmp_path / "xpnet" / "numba")
    assert out.stdout.split() == [expected, expected]


def test_warmup_compiles_both_dtypes():
    module = kernels.kernel_module("numba")
    if module.unavailable():
        pytest.skip(module.unavailable())
    start = time.perf_counter()
    seconds = module.warmup()
    took = time.perf_counter() - start
    assert set(seconds) == {"float32", "float64"} and all(0 <= s <= took for s in seconds.values())


def _skip_without_numba():
    reason = kernels.kernel_module("numba").unavailable()
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_exp_is_within_two_ulp_on_the_whole_half_line(dtype):
    """The vectorizable ``exp`` of the softmax kernels, on a million points of ``[lowest, 0]``:
    within 2 ulp of the rounded result where that is a normal number, within twice the smallest
    subnormal where it is subnormal, 0 past the range, NaN kept. (Before its ln 2 reduction was
    written as FMAs, numba's fastmath folded it and float64 erred by ~100 ulp near -700.)"""
    _skip_without_numba()
    from numba import njit

    from xpnet.kernels import _numba_loops as loops

    @njit(fastmath=loops.FASTMATH)  # the flags the kernels compile with
    def exp_all(x, out):
        for k in range(x.shape[0]):
            out[k] = loops.exp_nonpositive(x[k])

    info = np.finfo(dtype)
    lowest = np.log(info.smallest_subnormal.astype(np.float64)) - 1  # results round to 0 past it
    x = np.concatenate([np.linspace(lowest - 5, 0, 1_000_003), [-np.inf, np.nan, -0.0]]).astype(dtype)
    got = np.full_like(x, 7.0)
    exp_all(x, got)
    want = np.exp(x.astype(np.float64))  # float64 exp, rounded once to dtype below
    err = np.abs(got.astype(np.float64) - want.astype(dtype))
    normal = want >= info.tiny
    assert (err[normal] <= 2 * info.eps * want[normal]).all(), (err[normal] / want[normal]).max() / info.eps
    assert (err[~normal & np.isfinite(x)] <= 2 * info.smallest_subnormal).all()
    assert got[-3] == 0 and np.isnan(got[-2]) and got[-1] == 1


@pytest.mark.slow
def test_training_with_and_without_kernels_reaches_the_same_accuracy(mnist, monkeypatch):
    """Seed 002's config (784-50-25-10, batch 128, SGD lr 0.1) on the real MNIST, 3 epochs."""
    import xpnet

    X, y, X_test, y_test = mnist
    accuracy = {}
    for mode in ("xp", "auto"):
        monkeypatch.setenv("XPNET_KERNELS", mode)
        model = xpnet.MLP([784, 50, 25, 10], seed=2)
        model.fit(X, y, epochs=3, batch_size=128, optimizer="sgd", lr=0.1, verbose=0)
        accuracy[mode] = model.score(X_test, y_test)
    assert accuracy["xp"] > 0.93
    assert abs(accuracy["xp"] - accuracy["auto"]) <= 0.002, accuracy


def test_nan_logits_give_nan_rows_as_in_the_reference(kernel_arrays, rng):
    """A NaN in a row makes that row NaN (softmax and gradient), and leaves the other rows alone."""
    ka = kernel_arrays
    for width in (7, 300):  # the narrow-row and the wide-row code paths
        x = rng.standard_normal((5, width))
        x[2, 3] = np.nan
        got = ka.host(F.softmax(ka.to(x), impl=ka.impl))
        want = F.softmax(x, impl="xp")
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        _assert_close(got[[0, 1, 3, 4]], want[[0, 1, 3, 4]], RTOL[np.float64])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("width", [1, 7, 300, 3000])
def test_rows_with_nan_or_infinities_anywhere_match_the_reference(kernel_arrays, rng, dtype, width):
    """The row maximum skips NaN (a SIMD maxnum reduction), so a NaN in the first, a middle or
    the last place must still make its row NaN through ``x - max``; +inf gives ``inf - inf``;
    a row all -inf is NaN in the reference too. Other rows keep their values."""
    ka = kernel_arrays
    x = rng.standard_normal((7, width)).astype(dtype)
    x[0, 0] = np.nan
    x[1, width // 2] = np.nan
    x[2, -1] = np.nan
    x[3, width // 3] = np.inf
    x[4, :] = -np.inf
    x[5, : width // 2] = -np.inf  # some -inf beside finite values: those give 0, not NaN
    got = ka.host(F.softmax(ka.to(x), impl=ka.impl))
    want = F.softmax(x.astype(np.float64), impl="xp")
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = ~np.isnan(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=RTOL[dtype] * 10, atol=np.finfo(dtype).tiny)


def test_large_fresh_results_reuse_only_buffers_no_array_holds(rng):
    """Results of >= RECYCLE_MIN_BYTES come from buffers that earlier results gave back: never
    one that a live result, or a live view of one, still uses; and within the keep limit."""
    from xpnet.kernels import numba_cpu

    numba_cpu.release_kept_buffers()
    shape = (1024, numba_cpu.RECYCLE_MIN_BYTES // 4096 + 3)  # float32, just over the threshold
    x = rng.standard_normal(shape).astype(np.float32)
    first = F.softmax(x, impl="numba")
    second = F.softmax(x, impl="numba")
    assert not np.may_share_memory(first, second)
    address = first.ctypes.data
    view = first[5:, 1:]
    del first
    third = F.softmax(x, impl="numba")  # first's buffer is still held by its view
    assert third.ctypes.data != address and not np.may_share_memory(third, view)
    del view
    fourth = F.softmax(x, impl="numba")  # now it is free to reuse
    assert fourth.ctypes.data == address
    np.testing.assert_allclose(fourth, F.softmax(x.astype(np.float64), impl="xp"), rtol=1e-5)
    assert fourth.flags.c_contiguous and fourth.flags.writeable and fourth.dtype == np.float32
    del second, third, fourth
    assert 0 < numba_cpu._kept_bytes <= numba_cpu.RECYCLE_KEEP_BYTES
    assert numba_cpu.release_kept_buffers() > 0 and numba_cpu._kept_bytes == 0
    small = F.softmax(x[:4], impl="numba")  # under the threshold: a plain array of its own
    assert small.base is None


def test_the_keep_limit_bounds_what_is_held(monkeypatch, rng):
    from xpnet.kernels import numba_cpu

    numba_cpu.release_kept_buffers()
    monkeypatch.setattr(numba_cpu, "RECYCLE_KEEP_BYTES", 3 * numba_cpu.RECYCLE_MIN_BYTES)
    x = rng.standard_normal((256, numba_cpu.RECYCLE_MIN_BYTES // 1024)).astype(np.float32)  # 1 MB each
    results = [F.relu_backward(x, x, impl="numba") for _ in range(5)]
    assert len({r.ctypes.data for r in results}) == 5
    del results
    assert numba_cpu._kept_bytes == 3 * x.nbytes
    numba_cpu.release_kept_buffers()


def test_the_kernels_compiled_for_avx2_alone_equal_the_reference(tmp_path):
    """numba compiles for the machine it runs on (AVX-512 where there is some). The same kernel
    tests again in a process whose numba targets Haswell (AVX2 + FMA, no AVX-512), with an empty
    cache, so that both builds are checked on an AVX-512 machine; the compiled softmax must then
    hold no 512-bit register."""
    # an empty feature list means the named CPU's own features (else numba adds the host's)
    env = {**os.environ, "NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": "",
           "NUMBA_CACHE_DIR": str(tmp_path / "numba"), "XPNET_KERNELS": "numba"}
    tests = "test_softmax_equals_reference or test_softmax_cross_entropy_equals_reference or " \
            "test_relu_backward_equals_reference or test_bias_relu_equals_reference or " \
            "test_rows_with_nan_or_infinities or test_large_rows_and_many_rows or " \
            "test_sparse_linear_equals_the_dense_product or test_sparse_linear_grad_equals_the_dense_product or " \
            "test_a_first_layers_taps_in_registers_are_the_general_loops_sums_bit_for_bit or " \
            "test_weighted_softmax_cross_entropy_equals_reference or test_conv2d_with_filter_vectors_equals_reference"
    here = os.path.dirname(__file__)
    sparse_layer, conv = os.path.join(here, "test_sparse_layer.py"), os.path.join(here, "test_conv_kernels.py")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, sparse_layer, conv, "-q", "-p", "no:cacheprovider", "--no-cov", "-x",
         "-k", f"({tests}) and not cuda"],
        env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout
    probe = ("import re, numpy as np; from xpnet.kernels import _numba_loops as L; "
             "x = np.ones((4, 100), np.float32); o = np.empty_like(x); "
             "L.softmax_serial(x, o, o.reshape(-1), L.block_rows(100)); "
             "asm = ''.join(L.softmax_serial.inspect_asm().values()); "
             "print(len(re.findall('zmm', asm)), len(re.findall('ymm', asm)))")
    out = subprocess.run([sys.executable, "-c", probe], env={**env, "NUMBA_CACHE_DIR": str(tmp_path / "probe")},
                         capture_output=True, text=True, timeout=300)
    zmm, ymm = map(int, out.stdout.split())
    assert zmm == 0 and ymm > 0, (zmm, ymm)


def test_512_bit_vectors_are_asked_for_on_avx512_only_where_the_user_chose_nothing(monkeypatch):
    import types

    from numba.core import codegen

    from xpnet.kernels import numba_cpu

    host = "+avx2,+fma,+avx512f,+avx512bw"
    monkeypatch.setattr(codegen, "get_host_cpu_features", lambda: host)
    fake = types.SimpleNamespace(config=types.SimpleNamespace(CPU_NAME=None, CPU_FEATURES=None))
    numba_cpu._prefer_512_bit_vectors(fake)
    assert fake.config.CPU_FEATURES == host + ",-prefer-256-bit"
    for chosen in (dict(CPU_NAME="haswell", CPU_FEATURES=None), dict(CPU_NAME=None, CPU_FEATURES="+avx2"),
                   dict(CPU_NAME="haswell", CPU_FEATURES="")):
        fake = types.SimpleNamespace(config=types.SimpleNamespace(**chosen))
        numba_cpu._prefer_512_bit_vectors(fake)
        assert vars(fake.config) == chosen  # the user's choice stands
    monkeypatch.setattr(codegen, "get_host_cpu_features", lambda: "+avx2,+fma,-avx512f")
    fake = types.SimpleNamespace(config=types.SimpleNamespace(CPU_NAME=None, CPU_FEATURES=None))
    numba_cpu._prefer_512_bit_vectors(fake)
    assert fake.config.CPU_FEATURES is None  # no AVX-512: nothing to ask for


def test_on_an_avx512_cpu_the_kernels_use_512_bit_registers(tmp_path):
    """LLVM's tuning for Intel's AVX-512 CPUs prefers 256-bit vectors; xpnet asks numba for the
    full width (``numba_cpu._prefer_512_bit_vectors``), so the compiled softmax holds zmm
    registers (for AMD's Zen 4, LLVM's own choice)."""
    import llvmlite.binding as llvm

    if not llvm.get_host_cpu_features().get("avx512f"):
        pytest.skip("this CPU has no AVX-512")
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES")}
    env["NUMBA_CACHE_DIR"] = str(tmp_path / "numba")
    probe = ("import re, numpy as np; from xpnet.kernels import numba_cpu; L = numba_cpu._get_loops(); "
             "x = np.ones((4, 100), np.float32); o = np.empty_like(x); "
             "L.softmax_serial(x, o, o.reshape(-1), L.block_rows(100)); "
             "asm = ''.join(L.softmax_serial.inspect_asm().values()); print(len(re.findall('zmm', asm)))")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout) > 0


def test_the_numba_cache_dir_is_the_users_else_tmp_else_a_new_private_one(tmp_path, monkeypatch):
    import tempfile

    from xpnet.kernels import numba_cpu

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert numba_cpu._cache_dir() == str(tmp_path / "xdg" / "xpnet" / "numba")
    assert (tmp_path / "xdg" / "xpnet" / "numba").is_dir()
    assert numba_cpu._cache_dir() == str(tmp_path / "xdg" / "xpnet" / "numba")  # and again, once it exists
    monkeypatch.setenv("XDG_CACHE_HOME", "")  # unset or empty: ~/.cache
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert numba_cpu._cache_dir() == str(tmp_path / "home" / ".cache" / "xpnet" / "numba")

    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a-file"))  # the folder cannot be made there
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    assert numba_cpu._cache_dir() == str(tmp_path / "tmp" / "xpnet" / "numba")

    monkeypatch.setattr(os, "access", lambda path, mode: False)  # made, but not writable (root can't test it)
    fresh = Path(numba_cpu._cache_dir())
    assert fresh.parent == tmp_path / "tmp" and fresh.name.startswith("xpnet-numba-") and fresh.is_dir()


def test_auto_runs_the_kernel_from_one_element_up():
    from xpnet.kernels import numba_cpu

    for op in ("softmax", "bias_relu", "relu_backward", "softmax_cross_entropy", "an unmeasured op"):
        assert numba_cpu.worth_it(op, np.ones((1, 1))) is True


def test_softmax_into_its_own_input_or_a_strided_out(numba_cpu, rng):
    x = rng.standard_normal((7, 13)).astype(np.float32) * 10
    want = F.softmax(x, impl="xp")
    same = x.copy()
    assert numba_cpu.softmax(same, out=same) is same
    np.testing.assert_allclose(same, want, rtol=2e-6, atol=1e-7)
    wide = np.full((7, 30), np.nan, np.float32)
    out = wide[:, 1:27:2]  # strided, and not one 1-D view either: the kernel writes C order, via a scratch
    assert numba_cpu.softmax(x, out=out) is out
    np.testing.assert_allclose(out, want, rtol=2e-6, atol=1e-7)
    np.testing.assert_array_equal(out, numba_cpu.softmax(x))  # computed in float32, as into a C array
    written = np.zeros(wide.shape, bool)
    written[:, 1:27:2] = True
    assert np.isnan(wide[~written]).all()  # and nothing beside it
    loss, grad = numba_cpu.softmax_cross_entropy(x, np.arange(7) % 13, grad_out=out)
    assert grad is out
    np.testing.assert_allclose(out, F.softmax_cross_entropy(x, np.arange(7) % 13, impl="xp")[1], rtol=2e-5, atol=1e-7)


def test_a_bad_out_is_refused_with_its_name_and_kind(numba_cpu, rng):
    x = rng.standard_normal((3, 4))
    with pytest.raises(TypeError, match=r"^out must be a NumPy array, got builtins.list$"):
        numba_cpu.relu_backward(x, x, out=[[0.0] * 4] * 3)
    with pytest.raises(TypeError, match=r"^out must be a NumPy array, got collections.deque$"):
        numba_cpu.softmax(x, out=collections.deque())
    frozen = np.empty_like(x)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match=r"^out is read-only$"):
        numba_cpu.softmax(x, out=frozen)


def test_a_kept_buffer_handed_out_again_leaves_the_count(numba_cpu, rng):
    numba_cpu.release_kept_buffers()
    x = rng.standard_normal((256, numba_cpu.RECYCLE_MIN_BYTES // 1024)).astype(np.float32)  # 1 MB
    y = numba_cpu.softmax(x)
    del y  # its buffer is kept
    assert numba_cpu._kept_bytes == x.nbytes
    y = numba_cpu.softmax(x)  # and handed out again
    assert numba_cpu._kept_bytes == 0
    del y
    numba_cpu.release_kept_buffers()


def test_warmup_compiles_the_dtypes_asked_for_or_says_why_it_cannot(numba_cpu, monkeypatch):
    numba_cpu.warmup(("float32",), ("int64",))
    loops = numba_cpu._get_loops()
    compiled = {str(sig[0]) for sig in loops.softmax_serial.signatures}
    assert any(s.startswith("array(float32, 2d") for s in compiled), compiled
    monkeypatch.setattr(numba_cpu, "unavailable", lambda: "numba is broken here")
    with pytest.raises(RuntimeError, match="^the numba kernels cannot run here: numba is broken here$"):
        numba_cpu.warmup()


def test_after_warmup_training_compiles_nothing_more(numba_cpu, rng, monkeypatch):
    """``warmup`` compiles every signature that training and the kernels use, serial and parallel,
    for float32 and float64: after it, none of that work compiles anything."""
    numba_cpu.warmup()
    loops = numba_cpu._get_loops()
    dispatchers = {name: d for name, d in vars(loops).items() if hasattr(d, "signatures")}
    before = {name: len(d.signatures) for name, d in dispatchers.items()}

    from xpnet import optim
    from xpnet.kernels import cores
    from xpnet.layers import AvgPool2D, Conv2D, Dense, Flatten, MaxPool2D, RandomShift

    for dtype in (np.float32, np.float64):
        x = rng.standard_normal((8, 6)).astype(dtype)
        for parallel in (False, True):
            limits = {op: 0 if parallel else 1 << 60 for op in numba_cpu.PARALLEL_MIN_ELEMENTS}
            monkeypatch.setattr(numba_cpu, "PARALLEL_MIN_ELEMENTS", limits)
            monkeypatch.setattr(numba_cpu, "STREAM_MIN_BYTES", 0 if parallel else 1 << 60)
            numba_cpu.softmax(x)
            for label_dtype in (np.int64, np.uint8):
                numba_cpu.softmax_cross_entropy(x, np.arange(8, dtype=label_dtype) % 6)
            numba_cpu.bias_relu(x, x[0])
            numba_cpu.relu_backward(x, x)
            numba_cpu.relu_backward(x[:, ::2], x[:, ::2])  # strided: the 2-D loop
        monkeypatch.undo()
        pixels = rng.integers(0, 256, (64, 12), dtype=np.uint8)
        labels = rng.integers(0, 3, 64)
        sparse = np.where(rng.random(pixels.shape) < 0.2, pixels, 0).astype(np.uint8)  # rows for the sparse layer
        other = np.float64 if dtype == np.float32 else np.float32  # data in the other float dtype (X / 255)
        data = (pixels, pixels.astype(dtype) / 255, pixels.astype(other) / 255, sparse, sparse.astype(other) / 255)
        for optimizer, extra in (("sgd", {}), ("sgd", {"momentum": 0.9}), ("adam", {})):
            for X in data:  # pixels are gathered and scaled per batch, other floats converted
                for widths in ([12, 8, 3], [12, 16, 3]):  # (16 units: a vector wide, the sparse layer's least)
                    xpnet.MLP(widths, dtype=np.dtype(dtype).name, seed=0).fit(
                        X, labels, epochs=1, batch_size=16, optimizer=optimizer, verbose=0, **extra)
        images = rng.standard_normal((16, 8, 8, 1)).astype(dtype)
        monkeypatch.setattr(cores, "cores", lambda: 2)  # the images spread over the cores in training
        monkeypatch.setattr(optim, "PARALLEL_UPDATE_MIN_ELEMENTS", 0)  # and so do the updates
        for optimizer, extra in (("sgd", {}), ("sgd", {"momentum": 0.9, "nesterov": True}), ("adam", {})):
            cnn = xpnet.Sequential([RandomShift(1), Conv2D(4, 3, activation="relu"), MaxPool2D(2),
                                    Conv2D(8, 2, activation="relu"), AvgPool2D(2), Flatten(), Dense(3)],
                                   input_shape=(8, 8, 1), dtype=np.dtype(dtype).name, seed=0)
            cnn.fit(images, labels[:16], epochs=1, batch_size=8, optimizer=optimizer, verbose=0, **extra)
            cnn.predict(images)  # serially
        monkeypatch.undo()
    after = {name: len(d.signatures) for name, d in dispatchers.items()}
    assert {n: (before[n], after[n]) for n in before if after[n] != before[n]} == {}


@pytest.mark.parametrize("rows,width", [(43265, 6), (64, 6), (60, 6), (5, 6), (11, 32)])
@pytest.mark.parametrize("in_place", [False, True])
def test_bias_relu_regroups_narrow_rows_into_wide_ones(numba_cpu, rng, monkeypatch, rows, width, in_place):
    """A convolution's (pixels, 6) output goes to the kernel as rows of 60 (the bias repeated
    10 times; rows of 32 go in pairs), the rows that do not fill a group in a second call: the
    same bits as the reference."""
    x = rng.standard_normal((rows, width)).astype(np.float32)
    b = rng.standard_normal(2 * width).astype(np.float32)[::2]  # a strided bias
    want = F.bias_relu(x, b, impl="xp")
    loops = numba_cpu._get_loops()
    widths = []
    kernel = loops.bias_relu_serial
    monkeypatch.setattr(loops, "bias_relu_serial", lambda x, b, out: widths.append((x.shape, b.shape)) or kernel(x, b, out))
    out = x if in_place else np.full_like(x, np.nan)
    assert numba_cpu.bias_relu(x, b, out=out) is out
    np.testing.assert_array_equal(out, want)
    group = 64 // width
    whole = rows - rows % group
    assert widths == ([((whole // group, group * width), (group * width,))] * (whole > 0)
                      + [((rows - whole, width), (width,))] * (rows > whole))


def test_bias_relu_of_rows_wider_than_a_group_or_strided_is_one_call(numba_cpu, rng, monkeypatch):
    loops = numba_cpu._get_loops()
    shapes = []
    kernel = loops.bias_relu_serial
    monkeypatch.setattr(loops, "bias_relu_serial", lambda x, b, out: shapes.append(x.shape) or kernel(x, b, out))
    wide = rng.standard_normal((40, 33))
    numba_cpu.bias_relu(wide, wide[0])
    strided = rng.standard_normal((40, 12))[:, ::2]
    np.testing.assert_array_equal(numba_cpu.bias_relu(strided, strided[0]), F.bias_relu(strided, strided[0], impl="xp"))
    numba_cpu.bias_relu(np.ones((3, 0)), np.ones(0))  # no columns: nothing to do, and no error
    assert shapes == [(40, 33), (40, 6), (3, 0)]


# --- what the Numba kernels refuse, and why (the message kernels.select raises with) -----------


def _images(*shape, dtype=np.float32):
    return np.ones(shape, dtype)


@pytest.mark.parametrize("op,arrays,reason", [
    ("softmax", lambda: ([[1.0, 2.0]],), "the numba kernels take NumPy arrays, got builtins.list"),
    ("softmax", lambda: (collections.deque([1.0]),), "the numba kernels take NumPy arrays, got collections.deque"),
    ("relu_backward", lambda: (np.ones((2, 2)), [[1.0, 2.0]] * 2), "the numba kernels take NumPy arrays, got builtins.list"),
    ("softmax", lambda: (np.ones((2, 2), np.float16),), "the numba kernels take float32 or float64, got float16"),
    ("softmax", lambda: (np.ones((2, 2), np.int64),), "the numba kernels take float32 or float64, got int64"),
    ("relu_backward", lambda: (np.ones((2, 2), np.float32), np.ones((2, 2))),
     "operands of different dtypes: float32, float64"),
    ("bias_relu", lambda: (np.ones((2, 2)), np.ones(2), np.ones(2, np.float32)),
     "operands of different dtypes: float64, float64, float32"),
    ("softmax", lambda: (np.ones((0, 3)),), "empty arrays"),
    ("relu_backward", lambda: (np.ones((2, 2)), np.ones((2, 0))), "empty arrays"),
    ("softmax_cross_entropy", lambda: (np.ones((2, 3)), np.ones(0, np.int64)), "empty arrays"),
    ("softmax_cross_entropy", lambda: (np.ones((2, 3)), np.ones(2)), "labels must be integers, got float64"),
    ("softmax_cross_entropy", lambda: (np.ones((2, 3)), np.ones(2, np.bool_)), "labels must be integers, got bool"),
    ("conv2d", lambda: (_images(2, 5, 5), _images(2, 2, 1, 3)),
     "conv2d takes images of shape (N, H, W, C), got shape (2, 5, 5)"),
    ("max_pool2d_backward", lambda: (_images(2, 5, 5, 1, 1),),
     "max_pool2d_backward takes images of shape (N, H, W, C), got shape (2, 5, 5, 1, 1)"),
    ("conv2d", lambda: (_images(2, 5, 5, 1), _images(2, 2, 1, 3), _images(4)),
     "the bias must have shape (filters,) = (3,), got (4,)"),
    ("relu_backward", lambda: (np.ones((2, 3, 4))[:, :, ::2], np.ones((2, 3, 2))),
     "non-contiguous arrays of 3 dimensions (2 are supported)"),
    ("relu_backward", lambda: (np.ones((2, 3, 2)), np.ones((2, 3, 4))[:, :, ::2]),
     "non-contiguous arrays of 3 dimensions (2 are supported)"),
])
def test_unsupported_names_the_reason(numba_cpu, op, arrays, reason):
    assert numba_cpu.unsupported(op, *arrays()) == reason


@pytest.mark.parametrize("op,arrays", [
    ("softmax_cross_entropy", lambda: (np.ones((2, 3), np.float32), np.ones(2, np.uint8))),  # any integer labels
    ("softmax_cross_entropy", lambda: (np.ones((2, 3)), np.ones(2, np.int32))),
    ("relu_backward", lambda: (np.ones((2, 3, 2)), np.ones((2, 3, 2)))),  # 3-D, contiguous
    ("relu_backward", lambda: (np.ones((3, 4))[:, ::2], np.ones((3, 2)))),  # 2-D, strided
    ("conv2d", lambda: (_images(2, 5, 5, 1), _images(2, 2, 1, 3), _images(3))),
    ("conv2d", lambda: (_images(2, 5, 5, 1), _images(2, 2, 1, 3))),
    ("avg_pool2d", lambda: (_images(2, 5, 5, 3, dtype=np.float64),)),
    ("bias_relu", lambda: (np.ones((2, 5)), np.ones(5))),
])
def test_supported_arrays_have_no_reason(numba_cpu, op, arrays):
    assert numba_cpu.unsupported(op, *arrays()) is None


def test_labels_outside_the_classes_are_named_with_their_index(numba_cpu):
    logits = np.ones((5, 4))
    for labels, message in (
        (np.array([0, 3, 2, 4, 1]), r"^labels\[3\] = 4 is outside \[0, 4\)$"),
        (np.array([0, -1, 9, 2, 1]), r"^labels\[1\] = -1 is outside \[0, 4\)$"),
        (np.array([4, 0, 1, 2, 3]), r"^labels\[0\] = 4 is outside \[0, 4\)$"),
    ):
        with pytest.raises(ValueError, match=message):
            numba_cpu.softmax_cross_entropy(logits, labels)


def test_a_bad_grad_out_is_refused_by_name(numba_cpu, rng):
    logits, labels = rng.standard_normal((4, 3)), np.array([0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"^grad_out has shape \(4, 2\) and dtype float64; expected \(4, 3\) and float64$"):
        numba_cpu.softmax_cross_entropy(logits, labels, grad_out=np.empty((4, 2)))
    with pytest.raises(ValueError, match=r"^grad_out has shape \(4, 3\) and dtype float32; expected \(4, 3\) and float64$"):
        numba_cpu.softmax_cross_entropy(logits, labels, grad_out=np.empty((4, 3), np.float32))
    with pytest.raises(TypeError, match=r"^grad_out must be a NumPy array, got builtins.list$"):
        numba_cpu.softmax_cross_entropy(logits, labels, grad_out=[[0.0] * 3] * 4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_cross_entropy_into_its_own_logits_or_a_strided_grad_out(numba_cpu, rng, dtype):
    """``grad_out`` may be the logits themselves (each row is read before it is written) or a
    strided view (the kernel writes C order: a scratch, then copied); the loss comes back as a
    0-d array of the logits' dtype."""
    logits = (rng.standard_normal((9, 5)) * 4).astype(dtype)
    labels = rng.integers(0, 5, 9)
    want_loss, want_grad = F.softmax_cross_entropy(logits, labels, impl="xp")
    tol = dict(rtol=2e-5, atol=1e-7) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-15)
    same = logits.copy()
    loss, grad = numba_cpu.softmax_cross_entropy(same, labels, grad_out=same)
    assert grad is same and loss.shape == () and loss.dtype == dtype
    np.testing.assert_allclose(grad, want_grad, **tol)
    np.testing.assert_allclose(loss, want_loss, **tol)
    wide = np.full((9, 12), np.nan, dtype)
    out = wide[:, 1:11:2]  # strided rows that no 1-D view covers
    loss, grad = numba_cpu.softmax_cross_entropy(logits, labels, grad_out=out)
    written = np.zeros(wide.shape, bool)
    written[:, 1:11:2] = True
    assert grad is out and np.isnan(wide[~written]).all()
    np.testing.assert_allclose(out, want_grad, **tol)
    np.testing.assert_allclose(loss, want_loss, **tol)


def test_unavailable_says_why_numba_cannot_run_and_asks_once(numba_cpu, monkeypatch):
    import importlib.util

    monkeypatch.setattr(numba_cpu, "_unavailable_reason", [])
    assert numba_cpu.unavailable() is None and numba_cpu._unavailable_reason == [None]
    monkeypatch.setattr(numba_cpu, "_unavailable_reason", [])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert numba_cpu.unavailable() == "numba is not installed (pip install numba)"
    monkeypatch.undo()

    def broken():
        raise ImportError("libllvmlite.so: cannot open shared object file")

    monkeypatch.setattr(numba_cpu, "_unavailable_reason", [])
    monkeypatch.setattr(numba_cpu, "_get_loops", broken)
    expected = "numba failed to load: ImportError: libllvmlite.so: cannot open shared object file"
    assert numba_cpu.unavailable() == expected
    monkeypatch.setattr(numba_cpu, "_get_loops", lambda: None)  # asked once: the answer is kept
    assert numba_cpu.unavailable() == expected


def test_loading_the_loops_keeps_a_users_cache_dir_and_tells_an_imported_numba(numba_cpu, monkeypatch, tmp_path):
    import numba

    loops = numba_cpu._get_loops()
    monkeypatch.setattr(numba_cpu, "_loops", None)
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "mine"))
    assert numba_cpu._get_loops() is loops
    assert os.environ["NUMBA_CACHE_DIR"] == numba.config.CACHE_DIR == str(tmp_path / "mine")  # left alone

    monkeypatch.setattr(numba_cpu, "_loops", None)
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")  # numba imported before the variable was set
    monkeypatch.setattr(numba_cpu, "_cache_dir", lambda: str(tmp_path / "ours"))
    assert numba_cpu._get_loops() is loops
    assert os.environ["NUMBA_CACHE_DIR"] == numba.config.CACHE_DIR == str(tmp_path / "ours")
