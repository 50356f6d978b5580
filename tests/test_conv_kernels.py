"""The numba convolution and pooling kernels equal the ``xp`` reference, and the dispatcher runs them.

Pooling is compared bit for bit (the kernels take maxima, sum and divide in the reference's
order, NaN included). Convolution goes through BLAS with the bias as a column of ones, so it is
compared norm-wise: ``||got - want|| <= rtol * ||scale||`` with ``scale`` the same formula
applied to absolute values (the size of the terms each result sums, where either side's
rounding lives); float64 1e-12, float32 1e-5. Non-finite results must sit at the same places
with the same values. Every array a kernel allocates is pre-filled with NaN (``poisoned_numpy``),
so an element a kernel forgets to write fails.
"""

from __future__ import annotations

import inspect
import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import xpnet.functional as F
from xpnet import kernels

CONV_OPS = ("conv2d", "conv2d_backward", "max_pool2d", "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward")
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class _PoisonedNumpy:
    """NumPy, except that ``empty`` hands out NaN-filled arrays."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def empty(shape, dtype=float):
        return np.full(shape, np.nan, dtype)


@pytest.fixture
def poisoned_numpy(numba_cpu, monkeypatch):
    """Every array numba_cpu allocates starts as NaN, and every scratch is a fresh NaN array."""
    monkeypatch.setattr(numba_cpu, "np", _PoisonedNumpy())
    monkeypatch.setattr(numba_cpu, "_scratch", lambda name, shape, dtype: np.full(shape, np.nan, dtype))


@pytest.fixture(params=["im2col", "rows", "vectors"])
def conv_path(request, numba_cpu, monkeypatch):
    """Run the convolution tests through each algorithm: im2col + BLAS, the direct row-wise
    loop (which needs column stride 1; other strides still take im2col), and the filter-vector
    loop (which needs filters filling whole vectors and 4 output columns; else im2col)."""
    monkeypatch.setattr(numba_cpu, "DIRECT_MAX_CHANNEL_FILTERS", 10**9 if request.param == "rows" else 0)
    monkeypatch.setattr(numba_cpu, "FILTER_VECTORS_MAX_CHANNEL_FILTERS", 10**9 if request.param == "vectors" else 0)
    return request.param


@pytest.fixture
def filter_vectors(numba_cpu, monkeypatch):
    """The direct loop over output pixels with the filters as vectors, for any channels x
    filters; returns the calls made to its loops."""
    monkeypatch.setattr(numba_cpu, "DIRECT_MAX_CHANNEL_FILTERS", 0)
    monkeypatch.setattr(numba_cpu, "FILTER_VECTORS_MAX_CHANNEL_FILTERS", 10**9)
    return _spy_on_loops(numba_cpu, monkeypatch, ["conv2d_filter_vectors", "conv2d_filter_vectors_grad"])


def _layout(a, layout):
    """``a`` as a C array, or as a non-contiguous view of the same values."""
    if layout == "C":
        return np.ascontiguousarray(a)
    big = np.full(tuple(2 * s for s in a.shape), np.nan, a.dtype)
    big[(slice(None, None, 2),) * a.ndim] = a
    view = big[(slice(None, None, 2),) * a.ndim]
    assert a.size <= 1 or not view.flags.c_contiguous  # one element is contiguous however cut
    return view


def _assert_norm_close(got, want, scale):
    """Same dtype and shape; non-finite values equal; finite ones norm-wise within RTOL * ||scale||."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[~finite], want[~finite])
    assert np.isfinite(got[finite]).all(), "a non-finite value where the reference has none"
    err = np.linalg.norm((got[finite].astype(np.float64) - want[finite]).ravel())
    bound = RTOL[want.dtype] * np.linalg.norm(np.asarray(scale)[finite].astype(np.float64).ravel())
    assert err <= bound + np.finfo(want.dtype).tiny, f"error {err:.3g} > bound {bound:.3g}"


# --- data --------------------------------------------------------------------------------------


@st.composite
def conv_cases(draw, filters=st.integers(1, 5), channels=st.sampled_from([1, 2, 3, 6])):
    """Images, kernel, bias (or None) and geometry: odd sizes, 1x1 kernels, strides above 1 and
    unequal to the kernel, both paddings, C = 1 and N = 1 among them."""
    dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64])))
    n, c, f = draw(st.integers(1, 3)), draw(channels), draw(filters)
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    padding = draw(st.sampled_from(["valid", "same"]))
    low = 1 if padding == "same" else None
    h = draw(st.integers(low or kh, 11))
    w = draw(st.integers(low or kw, 11))
    strides = draw(st.sampled_from([1, 2, 3, (1, 2), (3, 1)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((n, h, w, c)).astype(dtype)
    kernel = rng.standard_normal((kh, kw, c, f)).astype(dtype)
    bias = draw(st.sampled_from([None, "bias"])) and rng.standard_normal(f).astype(dtype)
    layout = draw(st.sampled_from(["C", "C", "strided"]))
    return x, kernel, (None if bias is None else bias), dict(strides=strides, padding=padding), layout, rng


#: the cases the filter-vector loop takes: F filling whole vectors (16 float32, 8 float64) and,
#: among the channels, counts each gradient block size divides (8, 6, 4, 3, 2, 1: 5 and 7)
vector_conv_cases = conv_cases(filters=st.sampled_from([16, 32]), channels=st.sampled_from([1, 2, 3, 5, 6, 7, 8, 16]))


def _output_width(x, kernel, geometry):
    strides = geometry["strides"] if isinstance(geometry["strides"], tuple) else (geometry["strides"],) * 2
    return F.conv_output_size(x.shape[2], kernel.shape[1], strides[1], geometry["padding"])[0]


@st.composite
def pool_cases(draw):
    """Images and a pooling geometry: windows that overlap (strides below the window), windows
    that leave rows and columns uncovered (strides above it), ties, NaN and infinities."""
    dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64])))
    n, c = draw(st.integers(1, 3)), draw(st.sampled_from([1, 2, 5]))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    h, w = draw(st.integers(kh, 10)), draw(st.integers(kw, 10))
    strides = draw(st.sampled_from([None, 1, 2, 3, (1, 2), (3, 1)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["normal", "ties", "special", "extreme"]))
    if kind == "normal":
        x = rng.standard_normal((n, h, w, c))
    elif kind == "ties":  # few distinct values: many windows hold their maximum twice
        x = rng.integers(-2, 3, (n, h, w, c)).astype(float)
    elif kind == "special":
        x = rng.choice([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0], size=(n, h, w, c))
    else:
        big = float(np.finfo(dtype).max)
        x = rng.choice([big, -big, big / 2, float(np.finfo(dtype).tiny), 1.0], size=(n, h, w, c))
    x = x.astype(dtype)
    layout = draw(st.sampled_from(["C", "C", "strided"]))
    return x, dict(pool_size=(kh, kw), strides=strides), layout, rng


# --- signatures and dispatch -----------------------------------------------------------------------


@pytest.mark.parametrize("op", kernels.OPS_OF_IMPL["numba"])
def test_numba_kernels_mirror_the_reference_signatures(numba_cpu, op):
    """The conv and pool kernels take exactly the reference's parameters, less ``impl``."""
    ref = inspect.signature(getattr(F, op)).parameters
    ours = inspect.signature(getattr(numba_cpu, op)).parameters
    if op in CONV_OPS:
        want = [(p.name, p.kind, p.default) for p in ref.values() if p.name != "impl"]
        assert [(p.name, p.kind, p.default) for p in ours.values()] == want
    else:  # the older ops: the reference's positional parameters, then out= / grad_out=
        positional = [p.name for p in ref.values() if p.kind is p.POSITIONAL_ONLY]
        assert list(ours)[: len(positional)] == positional


def test_every_family_lists_only_ops_it_has():
    for impl, ops in kernels.OPS_OF_IMPL.items():
        module_name = {"numba": "numba_cpu", "cuda": "cuda"}[impl]
        module = __import__(f"xpnet.kernels.{module_name}", fromlist=["_"])
        assert all(callable(getattr(module, op, None)) for op in ops), impl
    assert set(kernels.OPS) == set(kernels.OPS_OF_IMPL["cuda"]) <= set(kernels.OPS_OF_IMPL["numba"])


@pytest.mark.parametrize("op", CONV_OPS)
def test_auto_selects_the_numba_kernel_for_float_images(numba_cpu, op, monkeypatch):
    monkeypatch.delenv("XPNET_KERNELS", raising=False)
    x = np.ones((2, 4, 4, 3), np.float32)
    assert kernels.select(op, "auto", x, x) is getattr(numba_cpu, op)
    assert kernels.select(op, "auto", x.astype(np.float16)) is None  # the reference
    assert kernels.select(op, "auto", x[:0]) is None  # an empty batch: the reference


def _spy_on_loops(numba_cpu, monkeypatch, names):
    loops, calls = numba_cpu._get_loops(), []
    for name in names:
        real = getattr(loops, name)

        def spy(*args, _real=real, _name=name):
            calls.append(_name)
            return _real(*args)

        monkeypatch.setattr(loops, name, spy)
    return calls


def test_forced_numba_runs_the_compiled_loops(numba_cpu, monkeypatch, rng):
    loops = ["im2col", "col2im", "max_pool", "max_pool_backward", "avg_pool", "avg_pool_backward"]
    calls = _spy_on_loops(numba_cpu, monkeypatch, loops)
    x = rng.standard_normal((2, 6, 5, 3))
    kernel = rng.standard_normal((3, 2, 3, 9))  # 3 channels x 9 filters: im2col + BLAS
    y = F.conv2d(x, kernel, impl="numba")
    F.conv2d_backward(np.ones_like(y), x, kernel, impl="numba")
    p = F.max_pool2d(x, impl="numba")
    F.max_pool2d_backward(np.ones_like(p), x, p, impl="numba")
    F.avg_pool2d_backward(np.ones_like(F.avg_pool2d(x, impl="numba")), x, impl="numba")
    assert calls == ["im2col", "im2col", "col2im", "max_pool", "max_pool_backward", "avg_pool", "avg_pool_backward"]


def test_lenet_layers_take_the_measured_algorithms(numba_cpu, monkeypatch, rng):
    """Few channels x filters with column stride 1: the row-wise loop; filters filling whole
    vectors: the filter-vector loops (dx too, at stride 1); else im2col + BLAS."""
    names = ["im2col", "col2im", "conv2d_rows", "conv2d_rows_grads", "conv2d_filter_vectors",
             "conv2d_filter_vectors_grad", "conv2d_filter_vectors_input_grad"]
    calls = _spy_on_loops(numba_cpu, monkeypatch, names)
    x1, x2 = rng.random((2, 28, 28, 1)), rng.random((2, 13, 13, 6))
    k1, k2 = rng.standard_normal((3, 3, 1, 6)), rng.standard_normal((3, 3, 6, 16))
    F.conv2d_backward(F.conv2d(x1, k1, impl="numba"), x1, k1, impl="numba")
    assert calls == ["conv2d_rows", "conv2d_rows_grads", "col2im"]
    calls.clear()
    F.conv2d_backward(F.conv2d(x2, k2, impl="numba"), x2, k2, impl="numba")
    assert calls == ["conv2d_filter_vectors", "conv2d_filter_vectors_grad", "conv2d_filter_vectors_input_grad"]
    calls.clear()
    F.conv2d_backward(F.conv2d(x2, k2, strides=2, impl="numba"), x2, k2, strides=2, impl="numba")
    assert calls[-1] == "col2im"  # dx of a strided convolution: BLAS and col2im
    calls.clear()
    F.conv2d(x1, k1, strides=(1, 2), impl="numba")  # a column stride: not the row-wise loop
    F.conv2d(x2, rng.standard_normal((3, 3, 6, 12)), impl="numba")  # 12 filters: not whole vectors
    F.conv2d(rng.random((2, 13, 13, 64)), rng.standard_normal((3, 3, 64, 64)), impl="numba")  # wide: BLAS
    assert calls == ["im2col", "im2col", "im2col"]


def test_the_input_gradient_over_filter_vectors_has_a_width_limit_only_when_serial(numba_cpu, monkeypatch, rng):
    """dx over filter vectors up to ``FILTER_VECTORS_MAX_CHANNEL_FILTERS`` channels x filters
    (the limit included) when serial, at any width on the cores; BLAS and col2im past it."""
    # (the serial loop is not spied on: the parallel driver calls it by name; neither of the
    # other two routes running means it ran)
    calls = _spy_on_loops(numba_cpu, monkeypatch, ["col2im", "conv2d_filter_vectors_input_grad_parallel"])
    x, kernel = rng.random((2, 6, 6, 4)), rng.standard_normal((3, 3, 4, 16))
    dy = np.ones((2, 4, 4, 16))
    for limit, parts, want in ((64, 1, []), (63, 1, ["col2im"]), (63, 2, ["conv2d_filter_vectors_input_grad_parallel"])):
        monkeypatch.setattr(numba_cpu, "FILTER_VECTORS_MAX_CHANNEL_FILTERS", limit)  # 4 x 16 = 64
        calls.clear()
        with numba_cpu.images_on_cores(parts):
            F.conv2d_backward(dy, x, kernel, impl="numba")
        assert calls == want, (limit, parts)


def test_shift_images_hands_the_loops_int64_offsets(numba_cpu, monkeypatch, rng):
    """Offsets of any integer dtype reach the loop as int64, the signature ``warmup`` compiled."""
    seen = []
    loops = numba_cpu._get_loops()
    real = loops.shift_images
    monkeypatch.setattr(loops, "shift_images", lambda x, d, r, y: (seen.append((d.dtype, r.dtype)), real(x, d, r, y)))
    x = rng.random((3, 4, 5, 2))
    for dtype in (np.int32, np.uint8, np.int64):
        offsets = np.array([1, 0, 2], dtype)
        np.testing.assert_array_equal(F.shift_images(x, offsets, offsets, impl="numba"),
                                      F.shift_images(x, offsets, offsets, impl="xp"))
    assert seen == [(np.dtype(np.int64), np.dtype(np.int64))] * 3


def test_first_layer_skips_dx(numba_cpu, monkeypatch, rng):
    calls = _spy_on_loops(numba_cpu, monkeypatch, ["col2im"])
    x, kernel = rng.standard_normal((2, 5, 5, 1)), rng.standard_normal((3, 3, 1, 2))
    dy = rng.standard_normal((2, 3, 3, 2))
    dx, dk, db = F.conv2d_backward(dy, x, kernel, need_dx=False, impl="numba")
    _, dk_ref, db_ref = F.conv2d_backward(dy, x, kernel, impl="xp")
    assert dx is None and calls == []
    np.testing.assert_allclose(dk, dk_ref, rtol=1e-12)
    np.testing.assert_allclose(db, db_ref, rtol=1e-12)


def test_a_family_without_the_op_falls_back_or_refuses(numba_cpu, monkeypatch, rng):
    """CUDA has no conv or pool kernels: auto on its arrays runs the reference; forced, an error."""
    cuda = kernels.kernel_module("cuda")
    monkeypatch.setattr(cuda, "unavailable", lambda: None)
    monkeypatch.setattr(kernels, "_native_impl", lambda x: "cuda")
    x = rng.standard_normal((1, 4, 4, 1))
    for op in CONV_OPS:
        assert kernels.select(op, "auto", x) is None
    with pytest.raises(ValueError, match="impl='cuda' has no kernel for conv2d"):
        F.conv2d(x, np.ones((2, 2, 1, 1)), impl="cuda")
    with pytest.raises(ValueError, match="has no kernel for avg_pool2d_backward"):
        F.avg_pool2d_backward(np.ones((1, 2, 2, 1)), x, impl="cuda")


def test_forced_numba_refuses_what_it_cannot_run(numba_cpu):
    x = np.ones((2, 4, 4, 1))
    with pytest.raises(ValueError, match="cannot run conv2d: operands of different dtypes"):
        F.conv2d(x, np.ones((2, 2, 1, 1), np.float32), impl="numba")
    with pytest.raises(ValueError, match="float32 or float64"):
        F.max_pool2d(x.astype(np.float16), impl="numba")
    with pytest.raises(ValueError, match="empty"):
        F.avg_pool2d(x[:0], impl="numba")
    assert F.avg_pool2d(x[:0]).shape == (0, 2, 2, 1)  # auto: the reference
    kernel, bias = np.ones((2, 2, 1, 3)), np.arange(3.0).reshape(1, 3)
    with pytest.raises(ValueError, match="bias must have shape"):
        F.conv2d(x, kernel, bias, impl="numba")
    np.testing.assert_array_equal(F.conv2d(x, kernel, bias), F.conv2d(x, kernel, bias, impl="xp"))  # broadcast


def test_wrong_gradient_shapes_are_refused(numba_cpu):
    x = np.ones((2, 4, 4, 3))
    y = F.max_pool2d(x, impl="numba")
    with pytest.raises(ValueError, match="pooled output"):
        F.avg_pool2d_backward(np.ones((2, 3, 2, 3)), x, impl="numba")
    with pytest.raises(ValueError, match="pooled output"):
        F.max_pool2d_backward(np.ones((2, 3, 3, 3)), x, np.ones((2, 3, 3, 3)), impl="numba")
    with pytest.raises(ValueError, match="same shape"):
        F.max_pool2d_backward(np.ones((2, 2, 1, 3)), x, y, impl="numba")
    with pytest.raises(ValueError, match="conv2d's output"):
        F.conv2d_backward(np.ones((2, 3, 3, 5)), x, np.ones((2, 2, 3, 4)), impl="numba")


# --- each kernel equals the reference ---------------------------------------------------------------


@SETTINGS
@given(case=conv_cases(), relu=st.booleans())
def test_conv2d_equals_reference(poisoned_numpy, conv_path, case, relu):
    """With ``relu`` too: the loops apply it to each image as they finish it, after BLAS a pass."""
    x, kernel, bias, geometry, layout, _ = case
    got = F.conv2d(_layout(x, layout), _layout(kernel, layout), bias, impl="numba", relu=relu, **geometry)
    want = F.conv2d(x, kernel, bias, impl="xp", relu=relu, **geometry)
    scale = F.conv2d(np.abs(x), np.abs(kernel), None if bias is None else np.abs(bias), impl="xp", **geometry)
    _assert_norm_close(got, want, scale)
    if relu:
        plain = F.conv2d(x, kernel, bias, impl="xp", **geometry)
        np.testing.assert_array_equal(want, np.where(plain > 0, plain, 0))
        assert (got >= 0).all()


@SETTINGS
@given(case=conv_cases(), need_dx=st.booleans())
def test_conv2d_backward_equals_reference(poisoned_numpy, conv_path, case, need_dx):
    x, kernel, _, geometry, layout, rng = case
    y = F.conv2d(x, kernel, impl="xp", **geometry)
    dy = rng.standard_normal(y.shape).astype(x.dtype)
    got = F.conv2d_backward(_layout(dy, layout), _layout(x, layout), kernel, need_dx=need_dx, impl="numba", **geometry)
    want = F.conv2d_backward(dy, x, kernel, impl="xp", **geometry)
    scale = F.conv2d_backward(np.abs(dy), np.abs(x), np.abs(kernel), impl="xp", **geometry)
    if need_dx:
        _assert_norm_close(got[0], want[0], scale[0])
    else:
        assert got[0] is None
    _assert_norm_close(got[1], want[1], scale[1])
    _assert_norm_close(got[2], want[2], scale[2])


def _backward_through_relu(x, kernel, y, geometry, layout, rng, need_dx):
    """The Numba gradients through the ReLU whose output is ``y``, for a random ``dy``, checked
    against the reference's gradients of ``relu_backward(dy, y)``; returns ``dy``, that ``dz``
    and the Numba gradients."""
    dy = rng.standard_normal(y.shape).astype(x.dtype)
    got = F.conv2d_backward(_layout(dy, layout), _layout(x, layout), kernel, need_dx=need_dx,
                            relu_output=_layout(y, layout), impl="numba", **geometry)
    dz = F.relu_backward(dy, y, impl="xp")
    want = F.conv2d_backward(dz, x, kernel, impl="xp", **geometry)
    scale = F.conv2d_backward(np.abs(dz), np.abs(x), np.abs(kernel), impl="xp", **geometry)
    for i in range(3) if need_dx else (1, 2):
        _assert_norm_close(got[i], want[i], scale[i])
    return dy, dz, got


@SETTINGS
@given(case=conv_cases(), need_dx=st.booleans(), nan=st.booleans())
def test_conv2d_backward_through_a_relu_equals_reference(poisoned_numpy, conv_path, case, need_dx, nan):
    """``relu_output`` given: the gradient taken through the ReLU (zeros, and NaN, pass none of
    it), whether the kernel does it as it goes (the row loop without dx) or first."""
    x, kernel, _, geometry, layout, rng = case
    y = np.maximum(F.conv2d(x, kernel, impl="xp", **geometry), 0)
    if nan:
        y.reshape(-1)[rng.integers(0, y.size)] = np.nan
    dy, dz, got = _backward_through_relu(x, kernel, y, geometry, layout, rng, need_dx)
    assert need_dx or got[0] is None
    np.testing.assert_array_equal(F.conv2d_backward(dy, x, kernel, relu_output=y, impl="xp", **geometry)[1],
                                  F.conv2d_backward(dz, x, kernel, impl="xp", **geometry)[1])


@pytest.mark.parametrize("kernel_shape", [(3, 3, 1, 6), (3, 3, 2, 16), (2, 2, 5, 7)])  # rows, vectors, im2col
def test_a_fused_relu_gives_0_for_nan_as_the_reference(numba_cpu, rng, kernel_shape):
    x = rng.standard_normal((2, 9, 10, kernel_shape[2]))
    x[0, 2, 3, 0], x[1, 4, 4, 0] = np.nan, np.inf
    kernel = rng.standard_normal(kernel_shape)
    got = F.conv2d(x, kernel, relu=True, impl="numba")
    want = F.conv2d(x, kernel, relu=True, impl="xp")
    assert np.isnan(F.conv2d(x, kernel, impl="xp")).any() and not np.isnan(want).any()
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_allclose(got, want, rtol=1e-12)


@SETTINGS
@given(case=vector_conv_cases, need_dx=st.booleans())
def test_the_filter_vector_loops_through_a_relu_equal_reference(poisoned_numpy, filter_vectors, case, need_dx):
    """The kernel gradient and (at stride 1) dx of the filter-vector loops, each taking ``dy``
    through the ReLU an image at a time: zeros and a NaN in the ReLU's output pass nothing."""
    x, kernel, _, geometry, layout, rng = case
    assume(_output_width(x, kernel, geometry) >= 4)
    y = np.maximum(F.conv2d(x, kernel, impl="xp", **geometry), 0)
    y.reshape(-1)[rng.integers(0, y.size)] = np.nan
    filter_vectors.clear()
    _backward_through_relu(x, kernel, y, geometry, layout, rng, need_dx)
    assert filter_vectors == ["conv2d_filter_vectors_grad"]


def test_the_loops_take_the_gradient_through_the_relu_themselves(numba_cpu, monkeypatch, rng):
    """LeNet-5's second layer (filter vectors, dx at stride 1) never runs the separate ReLU pass;
    a strided one, whose dx is BLAS and col2im, does."""
    calls = []
    real = numba_cpu.relu_backward
    monkeypatch.setattr(numba_cpu, "relu_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, kernel = rng.random((2, 13, 13, 6)), rng.standard_normal((3, 3, 6, 16))
    for need_dx in (False, True):
        y = np.maximum(F.conv2d(x, kernel, impl="numba"), 0)
        F.conv2d_backward(np.ones_like(y), x, kernel, need_dx=need_dx, relu_output=y, impl="numba")
    assert calls == []
    y = np.maximum(F.conv2d(x, kernel, strides=2, impl="numba"), 0)
    F.conv2d_backward(np.ones_like(y), x, kernel, strides=2, relu_output=y, impl="numba")
    assert calls == [1]


def test_the_row_loop_takes_the_gradient_through_the_relu_itself(numba_cpu, monkeypatch, rng):
    """Without dx, LeNet-5's first layer never runs the separate ReLU pass; with dx it must."""
    calls = []
    real = numba_cpu.relu_backward
    monkeypatch.setattr(numba_cpu, "relu_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, kernel = rng.random((2, 28, 28, 1)), rng.standard_normal((3, 3, 1, 6))
    y = np.maximum(F.conv2d(x, kernel, impl="numba"), 0)
    F.conv2d_backward(np.ones_like(y), x, kernel, need_dx=False, relu_output=y, impl="numba")
    assert calls == []
    F.conv2d_backward(np.ones_like(y), x, kernel, relu_output=y, impl="numba")
    assert calls == [1]
    with pytest.raises(ValueError, match="relu_output .* must have the same shape"):
        F.conv2d_backward(np.ones_like(y), x, kernel, relu_output=y[:1], impl="numba")
    with pytest.raises(ValueError, match="relu_output .* must have the same shape"):
        F.conv2d_backward(np.ones_like(y), x, kernel, relu_output=y[:1], impl="xp")
    with pytest.raises(ValueError, match="operands of different dtypes"):  # relu_output is an operand too
        F.conv2d_backward(np.ones_like(y), x, kernel, relu_output=y.astype(np.float32), impl="numba")
    calls.clear()  # the reference, asked for, takes dy through the ReLU with the reference too
    F.conv2d_backward(np.ones_like(y), x, kernel, relu_output=y, impl="xp")
    assert calls == []


@SETTINGS
@given(case=vector_conv_cases, need_dx=st.booleans())
def test_conv2d_with_filter_vectors_equals_reference(poisoned_numpy, filter_vectors, case, need_dx):
    """Forward and backward through the filter-vector loop (where it has the 4 output columns
    it needs): a row's last group of pixels overlapping the one before, every stride and
    padding, channel counts for every gradient block, a strided input."""
    x, kernel, bias, geometry, layout, rng = case
    assume(_output_width(x, kernel, geometry) >= 4)
    relu = bool(rng.integers(0, 2))
    got = F.conv2d(_layout(x, layout), _layout(kernel, layout), bias, impl="numba", relu=relu, **geometry)
    want = F.conv2d(x, kernel, bias, impl="xp", relu=relu, **geometry)
    scale = F.conv2d(np.abs(x), np.abs(kernel), None if bias is None else np.abs(bias), impl="xp", **geometry)
    _assert_norm_close(got, want, scale)
    dy = rng.standard_normal(want.shape).astype(x.dtype)
    got = F.conv2d_backward(_layout(dy, layout), _layout(x, layout), kernel, need_dx=need_dx, impl="numba", **geometry)
    want = F.conv2d_backward(dy, x, kernel, impl="xp", **geometry)
    scale = F.conv2d_backward(np.abs(dy), np.abs(x), np.abs(kernel), impl="xp", **geometry)
    for i in range(3) if need_dx else (1, 2):
        _assert_norm_close(got[i], want[i], scale[i])
    assert filter_vectors[-2:] == ["conv2d_filter_vectors", "conv2d_filter_vectors_grad"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("f", [1, 5, 6, 8, 16, 17, 24, 40])
@pytest.mark.parametrize("width, left, right", [(7, 0, 0), (7, 1, 2), (28, 0, 0)])
def test_the_row_loop_repeats_each_value_f_times(numba_cpu, rng, dtype, f, width, left, right):
    """The row-wise loop's expanded rows (vector stores, each overwriting the last one's excess
    lanes; plain stores where a vector would pass the row's end), padding as zeros."""
    x = rng.standard_normal((3, width, 2)).astype(dtype)
    expanded = np.full((3, 2, (width + left + right) * f), np.nan, dtype)
    numba_cpu._get_loops()._expand_rows(x, left, f, expanded)
    padded = np.pad(x, ((0, 0), (left, right), (0, 0)))
    np.testing.assert_array_equal(expanded, np.repeat(padded.transpose(0, 2, 1), f, axis=2))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kernel_shape", [(3, 3, 1, 6), (3, 3, 1, 2), (1, 3, 3, 5), (3, 1, 3, 16), (3, 3, 1, 24)])
@pytest.mark.parametrize("strides", [1, (2, 1)])
def test_the_row_loop_with_nine_taps_in_registers_equals_reference(poisoned_numpy, numba_cpu, monkeypatch, rng,
                                                                   dtype, kernel_shape, strides):
    """Nine taps (LeNet-5's first layer) without padding: the forward pass and the kernel
    gradient keep the taps' sums in registers; output rows that end in a vector overlapping
    the one before (9 columns x 6 filters = 54 values), and ones that are whole vectors."""
    monkeypatch.setattr(numba_cpu, "DIRECT_MAX_CHANNEL_FILTERS", 10**9)
    assert math.prod(kernel_shape[:3]) == numba_cpu._get_loops().TAPS_IN_REGISTERS
    x = rng.standard_normal((3, 12, 11, kernel_shape[2])).astype(dtype)
    kernel = rng.standard_normal(kernel_shape).astype(dtype)
    bias = rng.standard_normal(kernel_shape[3]).astype(dtype)
    got = F.conv2d(x, kernel, bias, strides=strides, impl="numba")
    _assert_norm_close(got, F.conv2d(x, kernel, bias, strides=strides, impl="xp"),
                       F.conv2d(np.abs(x), np.abs(kernel), np.abs(bias), strides=strides, impl="xp"))
    dy = rng.standard_normal(got.shape).astype(dtype)
    got = F.conv2d_backward(dy, x, kernel, strides=strides, need_dx=False, impl="numba")
    want = F.conv2d_backward(dy, x, kernel, strides=strides, impl="xp")
    scale = F.conv2d_backward(np.abs(dy), np.abs(x), np.abs(kernel), strides=strides, impl="xp")
    _assert_norm_close(got[1], want[1], scale[1])
    _assert_norm_close(got[2], want[2], scale[2])


#: stride-1 cases for the input gradient summed over filter vectors: channels for every block
#: of one call (1-8) and above it (blocks of 8, the last overlapping the one before: 12, 17)
input_grad_cases = conv_cases(filters=st.sampled_from([16, 32, 48]),
                              channels=st.sampled_from([1, 2, 3, 5, 6, 7, 8, 12, 17]))


@pytest.fixture
def input_grad_calls(numba_cpu, monkeypatch):
    return _spy_on_loops(numba_cpu, monkeypatch, ["conv2d_filter_vectors_input_grad", "col2im"])


@SETTINGS
@given(case=input_grad_cases)
def test_conv2d_input_gradient_over_filter_vectors_equals_reference(poisoned_numpy, input_grad_calls, case):
    """``dx`` at stride 1 with F a multiple of the vector: rows of 4 pixels and up (a row's last
    group overlapping the one before), both paddings, even kernels ("same" pads them unevenly),
    1x1 kernels, a strided ``dy``; never col2im."""
    x, kernel, _, geometry, layout, rng = case
    assume(x.shape[2] >= 4)
    geometry["strides"] = 1
    dy = rng.standard_normal(F.conv2d(x, kernel, impl="xp", **geometry).shape).astype(x.dtype)
    input_grad_calls.clear()
    got = F.conv2d_backward(_layout(dy, layout), _layout(x, layout), kernel, impl="numba", **geometry)[0]
    want = F.conv2d_backward(dy, x, kernel, impl="xp", **geometry)[0]
    scale = F.conv2d_backward(np.abs(dy), np.abs(x), np.abs(kernel), impl="xp", **geometry)[0]
    _assert_norm_close(got, want, scale)
    assert input_grad_calls == ["conv2d_filter_vectors_input_grad"]


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
@SETTINGS
@given(case=pool_cases())
def test_max_pool2d_and_backward_equal_reference_bit_for_bit(poisoned_numpy, case):
    """Same maxima, NaN where the reference has NaN, and each window's gradient to the first of
    its maxima (ties), none where the maximum is NaN; overlapping windows add up."""
    x, geometry, layout, rng = case
    want = F.max_pool2d(x, impl="xp", **geometry)
    got = F.max_pool2d(_layout(x, layout), impl="numba", **geometry)
    np.testing.assert_array_equal(got, want)
    assert got.dtype == want.dtype
    dy = rng.standard_normal(want.shape).astype(x.dtype)
    dx = F.max_pool2d_backward(_layout(dy, layout), _layout(x, layout), _layout(want, layout), impl="numba", **geometry)
    np.testing.assert_array_equal(dx, F.max_pool2d_backward(dy, x, want, impl="xp", **geometry))


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
@SETTINGS
@given(case=pool_cases())
def test_avg_pool2d_and_backward_equal_reference_bit_for_bit(poisoned_numpy, case):
    x, geometry, layout, rng = case
    want = F.avg_pool2d(x, impl="xp", **geometry)
    np.testing.assert_array_equal(F.avg_pool2d(_layout(x, layout), impl="numba", **geometry), want)
    dy = rng.standard_normal(want.shape).astype(x.dtype)
    dx = F.avg_pool2d_backward(_layout(dy, layout), _layout(x, layout), impl="numba", **geometry)
    np.testing.assert_array_equal(dx, F.avg_pool2d_backward(dy, x, impl="xp", **geometry))


@st.composite
def shift_cases(draw):
    """Images of odd sizes (1 pixel to wider than a vector of channels), offsets from 0 to past
    either edge, special values or not, C-ordered or a strided view."""
    n, h, w = draw(st.integers(1, 9)), draw(st.integers(1, 30)), draw(st.integers(1, 30))
    c = draw(st.sampled_from([1, 2, 3, 16, 24]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    far = max(h, w) + 3
    down, right = (rng.integers(-far, far + 1, n).astype(draw(st.sampled_from([np.int64, np.int32])))
                   for _ in range(2))
    if draw(st.booleans()):
        x = rng.choice([np.nan, np.inf, -np.inf, -0.0, 1.5, -2.0], size=(n, h, w, c))
    else:
        x = rng.standard_normal((n, h, w, c))
    return x.astype(dtype), down, right, draw(st.sampled_from(["C", "strided"]))


@SETTINGS
@given(case=shift_cases())
def test_shift_images_and_backward_equal_reference_bit_for_bit(poisoned_numpy, numba_cpu, case):
    """Every output element written (NaN-poisoned results), each a copy of the reference's bits
    (NaN, -0.0 and inf included), serially and with the images spread over 3 cores."""
    x, down, right, layout = case
    want = F.shift_images(x, down, right, impl="xp")
    want_back = F.shift_images_backward(x, down, right, impl="xp")
    for parts in (1, 3):
        with numba_cpu.images_on_cores(parts):
            got = F.shift_images(_layout(x, layout), down, right, impl="numba")
            back = F.shift_images_backward(_layout(x, layout), down, right, impl="numba")
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8))
        assert np.array_equal(back.view(np.uint8), want_back.view(np.uint8))


def test_random_shift_trains_through_the_kernel(numba_cpu, monkeypatch, rng):
    """``RandomShift`` in training takes the Numba kernel (auto), forward only as the first layer."""
    import xpnet
    from xpnet.layers import Dense, Flatten, RandomShift

    monkeypatch.delenv("XPNET_KERNELS", raising=False)
    calls = _spy_on_loops(numba_cpu, monkeypatch, ["shift_images", "shift_images_parallel"])
    model = xpnet.Sequential([RandomShift(2), Flatten(), Dense(3)], input_shape=(6, 6, 1), seed=0)
    model.fit(rng.standard_normal((8, 6, 6, 1)).astype(np.float32), rng.integers(0, 3, 8), epochs=1, batch_size=4,
              verbose=0)
    assert len(calls) == 2


@pytest.mark.parametrize("shape, window, strides", [((3, 8, 6, 5), 2, None), ((2, 9, 7, 3), 2, None),
                                                     ((2, 9, 9, 4), (2, 3), 3), ((1, 7, 7, 2), 3, 1)])
def test_max_pool_backward_keeps_the_references_bits_zeros_signs_included(poisoned_numpy, rng, shape, window, strides):
    """Windows that tile the image, leave a row and a column out, leave gaps, and overlap; ``dy``
    holds -0: the reference adds it into zeros (+0), so must the kernel."""
    x = rng.integers(-2, 3, shape).astype(np.float32)  # ties
    geometry = dict(pool_size=window, strides=strides)
    y = F.max_pool2d(x, impl="xp", **geometry)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dy.reshape(-1)[::3] = -0.0
    got = F.max_pool2d_backward(dy, x, y, impl="numba", **geometry)
    want = F.max_pool2d_backward(dy, x, y, impl="xp", **geometry)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("op", ["max_pool2d", "avg_pool2d"])
def test_pooling_of_images_that_are_not_square(numba_cpu, rng, op):
    """(9, 5) images pool to (4, 2): each output axis from its own input axis."""
    x = rng.standard_normal((2, 9, 5, 3))
    got = getattr(F, op)(x, impl="numba")
    assert got.shape == (2, 4, 2, 3)
    np.testing.assert_array_equal(got, getattr(F, op)(x, impl="xp"))


def test_max_pool_ties_go_to_the_first_maximum(numba_cpu):
    x = np.array([[1.0, 3.0, 3.0], [3.0, 0.0, 3.0], [np.nan, 1.0, 2.0]]).reshape(1, 3, 3, 1)
    y = F.max_pool2d(x, pool_size=2, strides=1, impl="numba")
    np.testing.assert_array_equal(y[0, :, :, 0], [[3.0, 3.0], [np.nan, 3.0]])
    dx = F.max_pool2d_backward(np.ones_like(y), x, y, pool_size=2, strides=1, impl="numba")
    # windows (0,0), (0,1) and (1,1) all pick x[0, 1]; the NaN window passes nothing
    np.testing.assert_array_equal(dx[0, :, :, 0], [[0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])


def test_conv_special_values_flow_as_in_the_reference(poisoned_numpy, conv_path, rng):
    """NaN and infinities in the images reach the same outputs, in both dtypes (3 filters, and
    16: whole vectors)."""
    for dtype, filters in itertools.product((np.float32, np.float64), (3, 16)):
        x = rng.standard_normal((2, 7, 6, 2)).astype(dtype)
        x[0, 1, 2, 0], x[1, 4, 4, 1], x[1, 0, 0, 0] = np.nan, np.inf, -np.inf
        kernel = rng.standard_normal((3, 3, 2, filters)).astype(dtype)
        bias = rng.standard_normal(filters).astype(dtype)
        for padding in ("valid", "same"):
            want = F.conv2d(x, kernel, bias, padding=padding, impl="xp")
            got = F.conv2d(x, kernel, bias, padding=padding, impl="numba")
            finite = np.nan_to_num(np.abs(x), posinf=0)
            scale = F.conv2d(finite, np.abs(kernel), np.abs(bias), padding=padding, impl="xp")
            _assert_norm_close(got, want, scale)
            assert np.isnan(got).any() and np.isinf(got).any()


def test_lenet_shapes_in_float32(poisoned_numpy, conv_path, rng):
    """The write-up's LeNet layers at their own sizes (a batch of 16), forward and backward."""
    x = rng.random((16, 28, 28, 1), dtype=np.float32)
    k1, b1 = rng.standard_normal((3, 3, 1, 6)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    k2 = rng.standard_normal((3, 3, 6, 16)).astype(np.float32)
    for impl in ("xp", "numba"):
        z1 = F.conv2d(x, k1, b1, impl=impl)
        p1 = F.avg_pool2d(np.maximum(z1, 0), impl=impl)
        z2 = F.conv2d(p1, k2, impl=impl)
        d2 = F.conv2d_backward(np.ones_like(z2), p1, k2, impl=impl)
        d1 = F.conv2d_backward(F.avg_pool2d_backward(d2[0], z1, impl=impl), x, k1, need_dx=False, impl=impl)
        if impl == "xp":
            want = (z1, p1, z2, *d2, *d1[1:])
        else:
            got = (z1, p1, z2, *d2, *d1[1:])
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-4 * float(np.abs(w).max()))


def test_scratch_buffers_are_reused_and_never_returned(numba_cpu, rng):
    x, kernel = rng.standard_normal((2, 6, 6, 2)), rng.standard_normal((3, 3, 2, 4))
    dy = rng.standard_normal((2, 4, 4, 4))
    dx1, dk1, db1 = F.conv2d_backward(dy, x, kernel, impl="numba")
    y1 = F.conv2d(x, kernel, impl="numba")
    buffers = dict(numba_cpu._scratch_buffers.__dict__)
    dx2, dk2, db2 = F.conv2d_backward(dy, x, kernel, impl="numba")
    assert all(numba_cpu._scratch_buffers.__dict__[k] is v for k, v in buffers.items())
    for result in (dx1, dk1, db1, y1):
        assert not any(np.may_share_memory(result, buf) for buf in buffers.values())
    np.testing.assert_array_equal(dx1, dx2)
    np.testing.assert_array_equal(dk1, dk2)


def test_large_scratch_is_not_kept(numba_cpu, monkeypatch, rng):
    monkeypatch.setattr(numba_cpu, "SCRATCH_KEEP_BYTES", 1000)
    monkeypatch.setattr(numba_cpu, "_scratch_buffers", type(numba_cpu._scratch_buffers)())
    x, kernel = rng.standard_normal((2, 9, 9, 3)), rng.standard_normal((3, 3, 3, 9))
    np.testing.assert_allclose(F.conv2d(x, kernel, impl="numba"), F.conv2d(x, kernel, impl="xp"), rtol=1e-12)
    assert "columns" not in numba_cpu._scratch_buffers.__dict__  # 98 x 27 float64: too large to keep


def test_called_directly_the_kernels_defaults_are_the_references(numba_cpu, rng):
    """The signature test compares defaults by name; this runs them (a caller may omit them)."""
    x, kernel = rng.standard_normal((2, 7, 7, 3)), rng.standard_normal((3, 3, 3, 4))
    y = numba_cpu.conv2d(x, kernel)
    np.testing.assert_allclose(y, F.conv2d(x, kernel, impl="xp"), rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    got, want = numba_cpu.conv2d_backward(dy, x, kernel), F.conv2d_backward(dy, x, kernel, impl="xp")
    assert got[0] is not None  # need_dx defaults to True
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10)
    pooled = numba_cpu.max_pool2d(x)
    np.testing.assert_array_equal(pooled, F.max_pool2d(x, impl="xp"))
    dp = rng.standard_normal(pooled.shape)
    np.testing.assert_array_equal(numba_cpu.max_pool2d_backward(dp, x, pooled),
                                  F.max_pool2d_backward(dp, x, pooled, impl="xp"))
    np.testing.assert_array_equal(numba_cpu.avg_pool2d(x), F.avg_pool2d(x, impl="xp"))
    np.testing.assert_array_equal(numba_cpu.avg_pool2d_backward(dp, x), F.avg_pool2d_backward(dp, x, impl="xp"))
    with pytest.raises(ValueError, match=r"^y has shape \(2, 2, 2, 3\); the pooled output here is \(2, 3, 3, 3\)$"):
        numba_cpu.max_pool2d_backward(dp[:, :2, :2], x, pooled[:, :2, :2])
    with pytest.raises(ValueError, match=r"^dy has shape \(2, 2, 2, 3\); the pooled output here"):
        numba_cpu.avg_pool2d_backward(dp[:, :2, :2], x)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("strides,padding,kernel_size", [
    ((2, 1), "valid", (3, 3)),   # a row stride on the direct path (its column stride must be 1)
    ((1, 1), "same", (2, 4)),    # even kernels: more padding after the image than before it
    ((2, 1), "same", (4, 2)),
    ((1, 2), "same", (2, 3)),    # a column stride: im2col on either path
])
def test_strided_and_unevenly_padded_convolutions_equal_the_reference(poisoned_numpy, conv_path, rng, dtype,
                                                                      strides, padding, kernel_size):
    x = rng.standard_normal((3, 7, 9, 2)).astype(dtype)  # not square: rows and columns are not confused
    kernel = rng.standard_normal((*kernel_size, 2, 3)).astype(dtype)
    bias = rng.standard_normal(3).astype(dtype)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-12)
    for b in (bias, None):
        want = F.conv2d(x, kernel, b, strides=strides, padding=padding, impl="xp")
        np.testing.assert_allclose(F.conv2d(x, kernel, b, strides=strides, padding=padding, impl="numba"), want, **tol)
    dy = rng.standard_normal(want.shape).astype(dtype)
    got = F.conv2d_backward(dy, x, kernel, strides=strides, padding=padding, impl="numba")
    want = F.conv2d_backward(dy, x, kernel, strides=strides, padding=padding, impl="xp")
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype
        np.testing.assert_allclose(g, w, **tol)


def test_few_channels_times_filters_take_the_direct_loop_up_to_the_limit(numba_cpu, monkeypatch, rng):
    loops = numba_cpu._get_loops()
    taken = []
    for name in ("conv2d_rows", "im2col"):
        kernel = getattr(loops, name)
        monkeypatch.setattr(loops, name, lambda *args, name=name, kernel=kernel: taken.append(name) or kernel(*args))
    limit = numba_cpu.DIRECT_MAX_CHANNEL_FILTERS
    x = rng.standard_normal((2, 6, 6, 4))
    for filters in (limit // 4, limit // 4 + 1):  # 4 channels x 6 filters = the limit; 4 x 7 above it
        numba_cpu.conv2d(x, rng.standard_normal((3, 3, 4, filters)))
    numba_cpu.conv2d(x, rng.standard_normal((3, 3, 4, 2)), strides=(1, 2))  # column stride 2: im2col
    assert taken == ["conv2d_rows", "im2col", "im2col"]


def test_scratch_is_kept_per_name_dtype_and_size(numba_cpu, monkeypatch):
    monkeypatch.setattr(numba_cpu, "_scratch_buffers", type(numba_cpu._scratch_buffers)())
    a = numba_cpu._scratch("a", (3, 4), np.float32)
    assert a.shape == (3, 4) and a.dtype == np.float32 and a.flags.c_contiguous
    assert np.shares_memory(numba_cpu._scratch("a", (4, 3), np.float32), a)  # the same size: the same memory
    assert np.shares_memory(numba_cpu._scratch("a", (2, 5), np.float32), a)  # smaller: the front of it
    assert not np.shares_memory(numba_cpu._scratch("b", (3, 4), np.float32), a)  # another name
    grown = numba_cpu._scratch("a", (13,), np.float32)
    assert grown.shape == (13,) and not np.shares_memory(grown, a)
    wide = numba_cpu._scratch("a", (13,), np.float64)
    assert wide.dtype == np.float64 and not np.shares_memory(wide, grown)  # another dtype: a new buffer


def test_scratch_up_to_the_limit_is_kept_and_larger_is_not(numba_cpu, monkeypatch):
    monkeypatch.setattr(numba_cpu, "_scratch_buffers", type(numba_cpu._scratch_buffers)())
    monkeypatch.setattr(numba_cpu, "SCRATCH_KEEP_BYTES", 400)
    kept = numba_cpu._scratch("k", (10, 10), np.float32)  # 400 bytes: kept
    assert np.shares_memory(numba_cpu._scratch("k", (10, 10), np.float32), kept)
    big = numba_cpu._scratch("k", (101,), np.float32)  # 404 bytes: a fresh array each time
    assert big.dtype == np.float32 and big.shape == (101,)
    assert not np.shares_memory(numba_cpu._scratch("k", (101,), np.float32), big)
    assert numba_cpu._scratch_buffers.__dict__["k"].size == 100


def test_the_direct_loops_scratch_holds_padded_rows_in_the_inputs_dtype_one_per_part(numba_cpu, rng):
    x = rng.standard_normal((2, 5, 7, 3)).astype(np.float32)
    expanded = numba_cpu._expanded(x, (3, 2, 3, 4), (7, 1, 2), 3)  # 4 filters; 1 padding column before, 2 after
    assert expanded.shape == (3, 5, 3, (7 + 1 + 2) * 4) and expanded.dtype == np.float32


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("width, filters", [(5, 3), (8, 2), (4, 4), (10, 8), (28, 6), (13, 5)])
def test_direct_rows_in_registers_and_in_memory_equal_the_reference(poisoned_numpy, numba_cpu, monkeypatch, rng,
                                                                    dtype, width, filters):
    """The direct loop sums an output row of at least one vector (16 float32, 8 float64 values)
    in registers, in groups of up to four vectors (an uneven row ends with an overlapping one:
    5 vectors go 3 + 2, never 4 + 1), and a shorter row in memory: each against the reference."""
    monkeypatch.setattr(numba_cpu, "DIRECT_MAX_CHANNEL_FILTERS", 10**9)
    x = rng.standard_normal((2, 7, width + 2, 1)).astype(dtype)  # 3 x 3 valid: rows of width x filters
    kernel = rng.standard_normal((3, 3, 1, filters)).astype(dtype)
    bias = rng.standard_normal(filters).astype(dtype)
    got = F.conv2d(x, kernel, bias, impl="numba")
    scale = F.conv2d(np.abs(x), np.abs(kernel), np.abs(bias), impl="xp")
    _assert_norm_close(got, F.conv2d(x, kernel, bias, impl="xp"), scale)
    dy = rng.standard_normal(got.shape).astype(dtype)
    got = F.conv2d_backward(dy, x, kernel, impl="numba")
    want = F.conv2d_backward(dy, x, kernel, impl="xp")
    scale = F.conv2d_backward(np.abs(dy), np.abs(x), np.abs(kernel), impl="xp")
    for g, w, s in zip(got, want, scale):
        _assert_norm_close(g, w, s)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("width, filters", [(28, 6), (13, 5), (9, 8), (30, 16)])
def test_a_first_layers_taps_in_registers_are_the_general_loops_sums_bit_for_bit(poisoned_numpy, numba_cpu, rng,
                                                                                 dtype, width, filters):
    """A 3x3 kernel over one channel with no padding rows keeps its nine kernel vectors in
    registers (``_numba_loops.TAPS_IN_REGISTERS``); with "same" padding the border rows lack
    taps and the general loop runs. Each output is the same multiply-adds in the same order
    either way, so the valid convolution is the interior of the "same" one, bit for bit."""
    x = rng.standard_normal((3, 11, width, 1)).astype(dtype)
    kernel = rng.standard_normal((3, 3, 1, filters)).astype(dtype)
    bias = rng.standard_normal(filters).astype(dtype)
    valid = F.conv2d(x, kernel, bias, impl="numba")
    same = F.conv2d(x, kernel, bias, padding="same", impl="numba")
    assert valid.shape == (3, 9, width - 2, filters)
    np.testing.assert_array_equal(valid, same[:, 1:-1, 1:-1, :])
    scale = F.conv2d(np.abs(x), np.abs(kernel), np.abs(bias), impl="xp")
    _assert_norm_close(valid, F.conv2d(x, kernel, bias, impl="xp"), scale)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("kernel_size, channels", [(3, 6), (2, 3), (5, 4)])
def test_im2col_copies_whole_window_rows_and_pads_the_edges(poisoned_numpy, numba_cpu, monkeypatch, rng,
                                                            dtype, padding, kernel_size, channels):
    """im2col copies a window's row of pixels inside the image as whole vectors (18 values at
    LeNet's second layer: a vector and an overlapping one), a shorter run or a row at a padded
    edge value by value: each against the reference."""
    monkeypatch.setattr(numba_cpu, "DIRECT_MAX_CHANNEL_FILTERS", 0)
    x = rng.standard_normal((2, 9, 10, channels)).astype(dtype)
    kernel = rng.standard_normal((kernel_size, kernel_size, channels, 4)).astype(dtype)
    got = F.conv2d(x, kernel, impl="numba", padding=padding, strides=(1, 2))
    want = F.conv2d(x, kernel, impl="xp", padding=padding, strides=(1, 2))
    _assert_norm_close(got, want, F.conv2d(np.abs(x), np.abs(kernel), impl="xp", padding=padding, strides=(1, 2)))
