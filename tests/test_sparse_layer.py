"""The sparse first layer of the NumPy training step (``kernels.cpu_step.SparseRows`` and the
``sparse_linear*`` kernels): each kernel against the dense product on random shapes, and the
step that uses them against the step on dense rows and against the reference."""

from __future__ import annotations

import numpy as np
import pytest

import xpnet
from xpnet.functional import scale_pixels

RTOL = {np.float32: 2e-5, np.float64: 1e-12}


@pytest.fixture
def loops(numba_cpu):
    return numba_cpu._get_loops()


def _sparse(rng, shape, dtype, density=0.2):
    """Random values, about ``density`` of them nonzero (never exactly zero where kept)."""
    values = rng.uniform(0.05, 1.0, shape) * rng.choice([-1.0, 1.0], shape)
    return np.where(rng.random(shape) < density, values, 0.0).astype(dtype)


def _rows(X, dtype, parts=1, max_density=1.0):
    from xpnet.kernels.cpu_step import SparseRows

    return SparseRows.of(X, dtype, parts, max_density)


@pytest.mark.parametrize("parts", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sparse_rows_are_scipys_csr_matrix(numba_cpu, rng, dtype, parts):
    sp = pytest.importorskip("scipy.sparse")
    X = _sparse(rng, (37, 29), dtype)
    X[5] = 0  # a row with no nonzeros
    X[7, -1] = 3.0  # the last column
    X[8, 0] = np.nan  # NaN is not zero: kept, as the dense product would use it
    X[9, 3] = -0.0  # minus zero is zero
    rows = _rows(X, dtype, parts)
    want = sp.csr_matrix(np.nan_to_num(X, nan=7.0))
    assert rows.shape == X.shape
    np.testing.assert_array_equal(rows.indptr, want.indptr)
    np.testing.assert_array_equal(rows.indices, want.indices)
    assert rows.values.dtype == dtype
    np.testing.assert_array_equal(np.nan_to_num(rows.values, nan=7.0), want.data)


def test_sparse_rows_take_the_memory_earlier_rows_gave_back(numba_cpu, rng):
    """A fit builds the rows of its data set once; the next fit's rows (the same data, say, in a
    cross-validation) take the memory of the last ones instead of faulting in new pages."""
    numba_cpu.release_kept_buffers()
    X = _sparse(rng, (4000, 400), np.float32)  # ~320,000 nonzeros: 1.3 MB of values, kept from 1 MB
    rows = _rows(X, np.float32, parts=2)
    nbytes, want = rows.values.nbytes, rows.values.copy()
    assert nbytes >= numba_cpu.RECYCLE_MIN_BYTES > rows.indices.nbytes and numba_cpu._kept_bytes == 0
    del rows
    assert numba_cpu._kept_bytes == nbytes  # given back
    again = _rows(X, np.float32, parts=2)
    try:
        assert numba_cpu._kept_bytes == 0  # and taken again
        np.testing.assert_array_equal(again.values, want)
        np.testing.assert_array_equal(again.dense(), X)
    finally:
        del again
        numba_cpu.release_kept_buffers()


@pytest.mark.parametrize("width", [16, 31, 32, 50, 784])
@pytest.mark.parametrize("data", [np.float32, np.float64, np.uint8])
def test_sparse_rows_of_each_width_and_dtype_hold_each_nonzero_in_order(numba_cpu, rng, data, width):
    """Rows gathered 16 values at a time (compressing stores) and the rest one by one: each
    nonzero once, in column order, converted as NumPy converts (float64 data, float32 rows);
    rows all nonzero, all zero, and a run of nonzeros across a boundary of 16."""
    X = (_sparse(rng, (23, width), np.float64) * 300).astype(data)
    X[0] = 1
    X[1] = 0
    X[2, 10:min(width, 40)] = 7
    X[3, -1] = 5
    rows = _rows(X, np.float32, parts=2)
    dense = np.zeros(X.shape, np.float32)
    for i in range(X.shape[0]):
        span = slice(rows.indptr[i], rows.indptr[i + 1])
        assert (np.diff(rows.indices[span].astype(np.int64)) > 0).all()
        values = rows.table[rows.values[span]] if data == np.uint8 else rows.values[span]
        dense[i, rows.indices[span]] = values
        assert (values != 0).all()
    want = scale_pixels(X, np.dtype(np.float32)) if data == np.uint8 else X.astype(np.float32)
    np.testing.assert_array_equal(dense, want)


@pytest.mark.parametrize("off", [-1, 1])
def test_csr_fill_refuses_an_indptr_that_miscounts_the_nonzeros_and_writes_nothing_past(loops, rng, off):
    X = _sparse(rng, (9, 40), np.float32, density=0.5)
    counts = np.count_nonzero(X, axis=1)
    counts[4] += off
    indptr = np.concatenate([[0], np.cumsum(counts)])
    guard = 5
    indices, values = np.full(indptr[-1] + guard, 999, np.uint16), np.full(indptr[-1] + guard, -1.0, np.float32)
    with pytest.raises(ValueError, match="indptr does not count the nonzeros"):
        loops.csr_fill(X, indptr, indices[:-guard], values[:-guard], 2)
    assert (indices[-guard:] == 999).all() and (values[-guard:] == -1).all()
    assert (indices[indptr[4]:indptr[5]] == 999).all()  # the miscounted row: left as it was


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sparse_rows_of_pixels_are_scaled_as_scale_pixels(numba_cpu, rng, dtype):
    X = np.where(rng.random((41, 33)) < 0.3, rng.integers(1, 256, (41, 33)), 0).astype(np.uint8)
    X[0, :] = np.arange(33) * 7 + 30  # many byte values, none zero
    rows = _rows(X, dtype)
    assert rows.values.dtype == np.uint8 and rows.table.dtype == dtype  # bytes, and what each stands for
    dense = np.zeros(X.shape, dtype)
    for i in range(X.shape[0]):
        span = slice(rows.indptr[i], rows.indptr[i + 1])
        dense[i, rows.indices[span]] = rows.table[rows.values[span]]
    np.testing.assert_array_equal(dense, scale_pixels(X, np.dtype(dtype)))


def test_sparse_rows_take_floats_converted_to_their_dtype_or_bytes(numba_cpu, rng):
    """float64 data for float32 rows (``X / 255`` for a float32 model): its values converted as
    the rows are built; integers other than uint8 are refused."""
    X = _sparse(rng, (20, 10), np.float64, density=0.3)
    rows = _rows(X, np.float32)
    assert rows.values.dtype == np.float32
    np.testing.assert_array_equal(rows.take(np.arange(20)), X.astype(np.float32))
    with pytest.raises(TypeError, match="^sparse rows take float32, float64 or uint8 data, got int64$"):
        _rows(np.zeros((2, 3), np.int64), np.float32)


def test_sparse_rows_of_too_dense_data_are_none(numba_cpu, rng):
    X = _sparse(rng, (20, 10), np.float64, density=0.5)
    share = np.count_nonzero(X) / X.size
    assert _rows(X, np.float64, max_density=share - 0.01) is None
    assert _rows(X, np.float64, max_density=share) is not None
    assert _rows(np.zeros((0, 10)), np.float64).indptr.tolist() == [0]


def _widths(lanes):
    # one vector, one more than a vector (an overlapping last one), each group size (1-4
    # vectors), more than one group, and the sizes the benchmarks train
    return sorted({lanes, lanes + 1, 2 * lanes - 1, 3 * lanes + 5, 4 * lanes, 5 * lanes + 3, 9 * lanes + 1, 50, 256})


def _data(rng, shape, dtype, pixels):
    """Sparse float rows, or sparse uint8 pixels; with the float rows the layer sees."""
    if pixels:
        X = np.where(rng.random(shape) < 0.2, rng.integers(1, 256, shape), 0).astype(np.uint8)
        return X, scale_pixels(X, np.dtype(dtype))
    X = _sparse(rng, shape, dtype)
    return X, X


@pytest.mark.parametrize("pixels", [False, True], ids=["floats", "pixels"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sparse_linear_equals_the_dense_product(loops, rng, dtype, pixels):
    lanes = loops.vector_lanes(dtype)
    for width in _widths(lanes):
        n_rows, fan_in = 45, 31
        X, Xf = _data(rng, (n_rows, fan_in), dtype, pixels)
        X[3], Xf[3] = 0, 0
        rows = _rows(X, dtype)
        W = rng.standard_normal((fan_in, width)).astype(dtype)
        b = rng.standard_normal(width).astype(dtype)
        # odd batch, repeated rows, the empty row, and indices past either end (clipped)
        idx = np.array([3, 0, 44, 7, 7, 12, 60, -5, *rng.integers(0, n_rows, 13)], np.int64)
        want = np.take(Xf, idx, axis=0, mode="clip") @ W + b
        for relu in (False, True):
            expect = np.maximum(want, 0) if relu else want
            for parts in (1, 2, 3):
                z = np.full((idx.shape[0], width), np.nan, dtype)  # poison: every element written
                args = (rows.indptr, rows.indices, rows.values, rows.table, idx, W, b, z, relu)
                if parts == 1:
                    loops.sparse_linear_serial(*args)
                else:
                    loops.sparse_linear_parallel(*args, parts)
                np.testing.assert_allclose(z, expect, rtol=RTOL[dtype], atol=RTOL[dtype] * np.abs(want).max(),
                                           err_msg=f"width {width}, relu {relu}, parts {parts}")


@pytest.mark.parametrize("pixels", [False, True], ids=["floats", "pixels"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sparse_linear_grad_equals_the_dense_product(loops, rng, dtype, pixels):
    lanes = loops.vector_lanes(dtype)
    for width in _widths(lanes):
        n_rows, fan_in = 40, 27
        X, Xf = _data(rng, (n_rows, fan_in), dtype, pixels)
        X[:, 4], Xf[:, 4] = 0, 0  # a column no row uses: its gradient is zero, and must be written
        rows = _rows(X, dtype)
        idx = np.array([1, 1, 39, 0, 50, *rng.integers(0, n_rows, 16)], np.int64)
        dz = rng.standard_normal((idx.shape[0], width)).astype(dtype)
        want = np.take(Xf, idx, axis=0, mode="clip").T @ dz
        for parts in (1, 2, 3):
            dW = np.full((fan_in, width), np.nan, dtype)  # poison
            partials = np.full((parts - 1, fan_in, width), np.nan, dtype)
            kernel = loops.sparse_linear_grad_serial if parts == 1 else loops.sparse_linear_grad_parallel
            kernel(rows.indptr, rows.indices, rows.values, rows.table, idx, dz, dW, partials)
            np.testing.assert_allclose(dW, want, rtol=RTOL[dtype], atol=RTOL[dtype] * np.abs(want).max(),
                                       err_msg=f"width {width}, parts {parts}")


def _mlp_and_step(widths, dtype, batch, cores=None):
    from xpnet.kernels.cpu_step import CpuTrainingStep
    from xpnet.training import training_step_for

    model = xpnet.MLP(widths, dtype=dtype, seed=5)
    if not model.built:
        model.build((widths[0],))
    if cores is not None:
        return model, CpuTrainingStep(model.layers, batch, cores=cores)
    return model, training_step_for(model.layers, batch)


def _layer_by_layer(monkeypatch, *args, **kwargs):
    """A model and its step that runs a sparse batch layer by layer (as where scipy is missing)."""
    from xpnet.kernels import numba_cpu

    with monkeypatch.context() as m:
        m.setattr(numba_cpu, "blas_in_kernels", lambda: False)
        model, step = _mlp_and_step(*args, **kwargs)
    assert step._whole_step is None
    return model, step


@pytest.mark.parametrize("whole", [True, False], ids=["one-kernel", "layer-by-layer"])
@pytest.mark.parametrize("parts", [1, 2, 3])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_step_on_sparse_rows_equals_the_step_on_dense_rows(numba_cpu, rng, monkeypatch, dtype, parts, whole):
    widths = [61, 50, 23, 7]
    if whole:
        model, step = _mlp_and_step(widths, dtype, 40, cores=parts)
        assert step._whole_step is not None
    else:
        model, step = _layer_by_layer(monkeypatch, widths, dtype, 40, cores=parts)
    X = _sparse(rng, (300, widths[0]), dtype)
    y = rng.integers(0, widths[-1], 300)
    idx = np.concatenate([rng.permutation(300)[:35], [-3, 310]])  # out of range: clipped, as np.take's "clip"
    xb, yb = step.take_batch(X, y, idx)
    assert type(xb).__name__ == "_SparseBatch" and xb.shape == (37, widths[0])
    assert yb is not None and np.shares_memory(yb, step._y)  # into the step's buffer
    np.testing.assert_array_equal(yb, np.take(y, idx, mode="clip"))
    idx = np.clip(idx, 0, 299)
    for buffer in step.dW + step.db:
        buffer.fill(np.nan)
    loss, correct = step(xb, yb)
    sparse_grads = [g.copy() for g in step.gradients()]
    want_loss, want_correct = step(X[idx], yb)
    rtol = RTOL[np.dtype(dtype).type]
    assert correct == want_correct
    assert abs(loss - want_loss) <= rtol * abs(want_loss)
    for got, want in zip(sparse_grads, step.gradients()):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


@pytest.mark.parametrize("pixels", [False, True], ids=["floats", "pixels"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_whole_step_kernel_equals_the_step_layer_by_layer(numba_cpu, rng, monkeypatch, dtype, pixels):
    """``sparse_mlp_step`` (one kernel, each core a share of the rows) against the step that runs
    the same sparse first layer and BLAS products one layer at a time: every depth it takes,
    1 to 3 parts, batches smaller than the parts, rows weighted or not, gradients poisoned."""
    from xpnet.kernels.cpu_step import CpuTrainingStep

    lanes = numba_cpu._get_loops().vector_lanes(dtype)
    rtol = RTOL[np.dtype(dtype).type]
    # (70 classes: the loss head's wide rows)
    for widths in ([37, lanes + 3], [37, 50, 11], [37, 2 * lanes, 23, 9], [37, lanes, 13, 40, 6, 5], [37, lanes, 70]):
        X, Xf = _data(rng, (90, widths[0]), dtype, pixels)
        y = rng.integers(0, widths[-1], 90)
        model, by_layer = _layer_by_layer(monkeypatch, widths, dtype, 24, cores=1)
        for parts in (1, 2, 3):
            step = CpuTrainingStep(model.layers, 24, cores=parts)
            assert step._whole_step is not None and len(step._whole_step[0]) == step._loops.MAX_FUSED_LAYERS
            for n, weighted in ((24, False), (17, True), (2, False), (1, True)):
                idx = rng.integers(0, 90, n)
                scales = rng.uniform(0.1, 3.0, n).astype(dtype) if weighted else None
                want = by_layer(*by_layer.take_batch(X, y, idx), scales)
                want_grads = [g.copy() for g in by_layer.gradients()]
                for buffer in step._whole_step[2][:len(widths) - 1] + step._whole_step[3][:len(widths) - 1]:
                    buffer.fill(np.nan)  # every part written or zeroed
                got = step(*step.take_batch(X, y, idx), scales)
                where = f"widths {widths}, parts {parts}, {n} rows"
                assert got[1] == want[1], where
                assert abs(got[0] - want[0]) <= rtol * abs(want[0]) * 10, where
                grads = step.gradients()
                assert [g.shape for g in grads] == [g.shape for g in want_grads]
                assert all(a is b for a, b in zip(grads, model.gradients())), where  # the layers point at them
                for g, w in zip(grads, want_grads):
                    np.testing.assert_allclose(g, w, rtol=rtol * 10, atol=rtol * np.abs(w).max(), err_msg=where)


def test_the_whole_step_refuses_labels_out_of_range_and_deep_models_run_layer_by_layer(numba_cpu, rng):
    X = _sparse(rng, (32, 20), np.float32)
    model, step = _mlp_and_step([20, 16, 8, 4], "float32", 8, cores=2)
    assert step._whole_step is not None
    for labels, bad in (([0, 1, 7, 2] * 8, 7), ([-1, 1, 2, 3] * 8, -1)):  # (the first row's label too)
        xb, yb = step.take_batch(X, np.array(labels), np.arange(8))
        assert type(xb).__name__ == "_SparseBatch"
        with pytest.raises(ValueError, match=rf"labels must lie in \[0, 4\); got {bad}$"):
            step(xb, yb)
    deep = [20, 16] + [5] * step._loops.MAX_FUSED_LAYERS
    model, step = _mlp_and_step(deep, "float32", 8, cores=2)
    assert step._whole_step is None
    xb, yb = step.take_batch(X, rng.integers(0, 5, 32), np.arange(8))
    assert type(xb).__name__ == "_SparseBatch"
    loss, correct = step(xb, yb)
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in step.gradients())


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_the_step_refuses_a_batch_larger_than_its_buffers_and_bad_row_factors(numba_cpu, rng, sparse):
    X = _sparse(rng, (32, 20), np.float32, density=0.2 if sparse else 0.9)
    y = rng.integers(0, 4, 32)
    _, step = _mlp_and_step([20, 16, 4], "float32", 8, cores=2)
    xb, yb = step.take_batch(X, y, np.arange(8))
    assert (type(xb).__name__ == "_SparseBatch") is sparse
    with pytest.raises(ValueError, match=r"^a batch of 9 rows does not fit buffers for 8$"):
        step(X[:9], y[:9])
    good = np.ones(8, np.float32)
    for scales in (good[:7], good.astype(np.float64), list(good)):  # shape, dtype, not NumPy
        with pytest.raises(ValueError, match=r"^scales must be a NumPy array of shape \(8,\) and dtype float32$"):
            step(xb, yb, scales)
    assert np.isfinite(step(xb, yb, good)[0])


def test_blas_in_kernels_says_whether_scipy_is_there(numba_cpu, monkeypatch):
    import sys

    numba_cpu.blas_in_kernels.cache_clear()
    try:
        assert numba_cpu.blas_in_kernels() is (pytest.importorskip("scipy.linalg.cython_blas") is not None)
        numba_cpu.blas_in_kernels.cache_clear()
        monkeypatch.setitem(sys.modules, "scipy.linalg.cython_blas", None)  # import fails
        assert numba_cpu.blas_in_kernels() is False
    finally:
        monkeypatch.undo()
        numba_cpu.blas_in_kernels.cache_clear()


def test_the_step_takes_sparse_rows_only_where_they_pay(numba_cpu, rng):
    from xpnet.kernels import cpu_step

    y = rng.integers(0, 4, 100)
    idx = np.arange(10)
    _, step = _mlp_and_step([30, 20, 4], "float32", 10)
    dense = _sparse(rng, (100, 30), np.float32, density=0.9)
    assert isinstance(step.take_batch(dense, y, idx)[0], np.ndarray)  # too many nonzeros
    sparse = _sparse(rng, (100, 30), np.float32, density=cpu_step.SPARSE_MAX_DENSITY / 2)
    assert isinstance(step.take_batch(sparse, y, idx)[0], cpu_step._SparseBatch)
    assert isinstance(step.take_batch(dense, y, idx)[0], np.ndarray)  # a new data set: asked again
    # a first layer narrower than one vector (15 float32 units) runs dense; one vector, sparse
    _, narrow = _mlp_and_step([30, 15, 4], "float32", 10)
    assert isinstance(narrow.take_batch(sparse, y, idx)[0], np.ndarray)
    _, one_vector = _mlp_and_step([30, 16, 4], "float32", 10)
    assert isinstance(one_vector.take_batch(sparse, y, idx)[0], cpu_step._SparseBatch)


def test_fit_on_sparse_pixels_equals_fit_on_the_reference(numba_cpu, rng, monkeypatch):
    """``fit`` as users run it (uint8 images, shuffled batches, a short last batch): the sparse
    first layer trains the weights the reference path trains (float64)."""
    from xpnet.kernels import cpu_step

    built = []
    of = cpu_step.SparseRows.of
    monkeypatch.setattr(cpu_step.SparseRows, "of", lambda *a, **k: built.append(of(*a, **k)) or built[-1])
    X = np.where(rng.random((203, 49)) < 0.2, rng.integers(1, 256, (203, 49)), 0).astype(np.uint8)
    y = rng.integers(0, 5, 203)
    trained = []
    for kernels in ("auto", "xp"):
        monkeypatch.setenv("XPNET_KERNELS", kernels)
        model = xpnet.MLP([49, 33, 5], dtype="float64", seed=1)
        model.fit(X, y, epochs=2, batch_size=32, optimizer="adam", lr=1e-2, verbose=0)
        trained.append([np.array(p) for p in model.parameters()])
    assert len(built) == 1 and built[0] is not None  # the sparse rows, built once for both epochs
    for got, want in zip(*trained):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_rows_wider_than_16_bit_columns_keep_32_bit_ones(loops, rng):
    X = _sparse(rng, (3, (1 << 16) + 5), np.float64, density=0.01)
    X[1, -1] = 2.0  # the last column, past 2**16
    rows = _rows(X, np.float64)
    assert rows.indices.dtype == np.int32 and rows.indices.max() == X.shape[1] - 1
    W = rng.standard_normal((X.shape[1], 8))
    z = np.full((3, 8), np.nan)
    idx = np.arange(3)
    loops.sparse_linear_serial(rows.indptr, rows.indices, rows.values, rows.table, idx, W, np.zeros(8), z, False)
    np.testing.assert_allclose(z, X @ W, rtol=1e-12)


def test_blas_runs_on_one_thread_while_sparse_steps_train_and_gets_its_threads_back(numba_cpu, rng):
    """numba's threads spin after each sparse kernel; BLAS on more threads beside them would
    fight them for the cores (a 15x slower epoch): one thread while ``fit`` trains sparse."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from xpnet.callbacks import Callback
    from xpnet.kernels.cores import cores

    if cores() < 2:
        pytest.skip("one core: the sparse kernels run serially and BLAS keeps its threads")
    blas = threadpoolctl.ThreadpoolController().select(user_api="blas")
    if not blas.lib_controllers:
        pytest.skip("no BLAS that threadpoolctl can see")

    def threads():
        return [lib.num_threads for lib in threadpoolctl.ThreadpoolController().select(user_api="blas").lib_controllers]

    seen = []

    class Watch(Callback):
        def on_epoch_end(self, epoch, logs):
            seen.append(threads())

    with blas.limit(limits=2):
        before = threads()
        X = _sparse(rng, (120, 40), np.float32)
        y = rng.integers(0, 3, 120)
        model = xpnet.MLP([40, 32, 3], seed=0)
        model.fit(X, y, epochs=2, batch_size=40, verbose=0, callbacks=[Watch()])
        assert seen == [[1] * len(before)] * 2
        assert threads() == before
        # a step called by itself takes the limit for the call only
        _, step = _mlp_and_step([40, 32, 3], "float32", 40)
        step(*step.take_batch(X, y, np.arange(40)))
        assert threads() == before


def test_a_distributed_rank_runs_the_sparse_kernels_on_one_core(numba_cpu):
    """Ranks of one machine already share its cores: numba threads in each would fight."""
    from xpnet.training import _training_step

    model = xpnet.MLP([30, 20, 4], seed=0)
    model.build((30,))
    from xpnet.kernels.cores import cores

    assert _training_step(model, 16, all_cores=False)._parts == 1
    assert _training_step(model, 16)._parts == cores()


# --- a whole epoch in one kernel (CpuTrainingStep.run_epoch) -------------------------------------


def _pixels(rng, rows, features, density=0.2):
    return np.where(rng.random((rows, features)) < density, rng.integers(1, 256, (rows, features)), 0).astype(np.uint8)


def _epochs_both_ways(monkeypatch, train):
    """``train()``'s result with whole epochs in one kernel, and with ``fit``'s loop over the
    batches; and, per epoch of the first, whether the kernel ran it."""
    from xpnet.kernels.cpu_step import CpuTrainingStep

    run_epoch, ran, results = CpuTrainingStep.run_epoch, [], []

    def counted(self, *args, **kwargs):
        result = run_epoch(self, *args, **kwargs)
        ran.append(result is not None)
        return result

    for whole in (True, False):
        monkeypatch.setattr(CpuTrainingStep, "run_epoch", counted if whole else lambda *args, **kwargs: None)
        results.append(train())
    return results, ran


@pytest.mark.parametrize("parts", [1, 3])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd", "nesterov"])
def test_a_whole_epoch_in_one_kernel_trains_what_the_loop_over_batches_trains(numba_cpu, rng, monkeypatch, optimizer,
                                                                              dtype, parts):
    """Bit for bit: the weights, the epochs' metrics and the optimizer's state, on uint8 pixels
    with a short last batch and with sample weights (row factors and batch weights), on 1 and 3
    cores with the updates split among them (a threshold of 0 elements); on 3 cores each epoch's
    7 steps in kernel calls of 3, 3 and 1."""
    from xpnet import optim
    from xpnet.kernels import cores, cpu_step

    monkeypatch.setattr(cores, "cores", lambda: parts)
    monkeypatch.setattr(optim, "cores", lambda: parts)
    monkeypatch.setattr(optim, "PARALLEL_UPDATE_MIN_ELEMENTS", 0)
    monkeypatch.setattr(cpu_step, "EPOCH_CHUNK_STEPS", 3 if parts == 3 else 64)
    X, y = _pixels(rng, 203, 49), rng.integers(0, 5, 203)
    weights = rng.uniform(0.0, 3.0, 203)
    make = {"adam": lambda: optim.Adam(1e-2), "adamw": lambda: optim.AdamW(1e-2, weight_decay=0.1),
            "sgd": lambda: optim.SGD(0.1), "nesterov": lambda: optim.SGD(0.1, momentum=0.9, nesterov=True)}[optimizer]

    def train():
        model, opt = xpnet.MLP([49, 33, 18, 5], dtype=dtype, seed=1), make()
        history = model.fit(X, y, epochs=2, batch_size=32, optimizer=opt, sample_weight=weights, verbose=0)
        return model.get_weights(), history.history, opt.state_dict()

    (got, want), ran = _epochs_both_ways(monkeypatch, train)
    assert ran == [True, True]
    for (W, b), (W0, b0) in zip(got[0], want[0]):
        np.testing.assert_array_equal(W, W0)
        np.testing.assert_array_equal(b, b0)
    assert {k: v for k, v in got[1].items() if k != "seconds"} == {k: v for k, v in want[1].items() if k != "seconds"}
    assert got[2].keys() == want[2].keys() and (len(got[2]) > 0 or optimizer == "sgd")  # (plain SGD keeps none)
    for key, value in got[2].items():
        np.testing.assert_array_equal(value, want[2][key], err_msg=key)


def test_the_estimator_trains_the_same_with_whole_epochs_in_one_kernel(numba_cpu, rng, monkeypatch):
    """scikit-learn's penalty (``alpha`` over each batch's weight, told by ``start_batch``) and
    its epsilon correction, with sample weights: the same model and loss curve."""
    pytest.importorskip("sklearn")
    from xpnet.sklearn import MLPClassifier

    X, y = _pixels(rng, 203, 49), rng.integers(0, 5, 203)
    weights = rng.uniform(0.0, 3.0, 203)

    def train():
        estimator = MLPClassifier(hidden_layer_sizes=(33,), alpha=1e-2, batch_size=32, max_iter=3, random_state=0)
        estimator.fit(X, y, sample_weight=weights)
        return estimator.predict_proba(X), estimator.loss_curve_

    (got, want), ran = _epochs_both_ways(monkeypatch, train)
    assert ran and all(ran)
    np.testing.assert_array_equal(got[0], want[0])
    assert got[1] == want[1]


def test_a_whole_epoch_steps_aside_where_it_does_not_apply(numba_cpu, rng, monkeypatch):
    """A label out of range (the loop names it), an optimizer without a fused update, data too
    dense to run sparse, a progress bar: the loop over batches trains, the whole epoch's try
    having changed nothing."""
    from xpnet import optim
    from xpnet.kernels.cpu_step import CpuTrainingStep

    class Plain(optim.SGD):  # its own update: no fused kernel
        def _update(self, p, g, state):
            p -= self.lr * g

    run_epoch, ran = CpuTrainingStep.run_epoch, []
    monkeypatch.setattr(CpuTrainingStep, "run_epoch",
                        lambda self, *a, **k: ran.append(run_epoch(self, *a, **k)) or ran[-1])
    X, y = _pixels(rng, 64, 49), rng.integers(0, 5, 64)
    bad = y.copy()
    bad[37] = 9
    model, step = _mlp_and_step([49, 33, 5], "float32", 16)
    opt, before = optim.Adam(1e-2), model.get_weights()
    with step.running():
        assert step.run_epoch(opt, model.parameters(), X, bad, rng.permutation(64), 16) is None
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\); got 9$"):  # (the loop's refusal)
            step(*step.take_batch(X, bad, np.arange(32, 48)))
    assert opt.state is None
    for (W, b), (W0, b0) in zip(model.get_weights(), before):
        np.testing.assert_array_equal(W, W0)
        np.testing.assert_array_equal(b, b0)
    ran.clear()
    opt = Plain(0.1)
    xpnet.MLP([49, 33, 5], seed=1).fit(X, y, epochs=1, batch_size=16, optimizer=opt, verbose=0)
    assert ran == [None] and opt.state == [{} for _ in range(4)]
    ran.clear()
    xpnet.MLP([49, 33, 5], seed=1).fit(_pixels(rng, 64, 49, density=0.6), y, epochs=1, batch_size=16, verbose=0)
    assert ran == [None]
    ran.clear()
    xpnet.MLP([49, 33, 5], seed=1).fit(X, y, epochs=1, batch_size=16, verbose=1)
    assert ran == []  # (a progress bar moves between the steps)


def test_fused_updates_are_the_next_steps_scalars_and_advance_the_state(numba_cpu, rng, monkeypatch):
    """Adam's plan for three batches: ``start_batch`` told each batch in order, every step count
    advanced by 3 and row ``k`` of the scalars those of step ``k + 1``; no plan, and nothing
    changed, without a fused update (``XPNET_KERNELS=xp``); a refusal where the update's other
    arguments change from step to step; a step taken after a plan updates the parameters."""
    from xpnet import optim

    params = [rng.standard_normal((7, 5)).astype(np.float32), rng.standard_normal(5).astype(np.float32)]
    grads = [np.ones_like(p) for p in params]

    class Told(optim.Adam):
        def start_batch(self, rows, weight):
            told.append((rows, weight))

    told = []
    opt = Told(1e-2, betas=(0.8, 0.9))
    kernel, parts, args = opt.fused_updates(params, grads, [(32, 32.0), (32, 20.5), (7, 7.0)])
    assert (kernel, parts) == ("adam_step", 1) and told == [(32, 32.0), (32, 20.5), (7, 7.0)]
    assert [entry["t"] for entry in opt.state] == [3, 3]
    coefs = next(a for a in args if isinstance(a, np.ndarray) and a.ndim == 3)
    assert coefs.shape == (3, 2, 5)
    for k in range(3):
        t = k + 1
        want = [0, 1, 1e-2 / (1 - 0.8**t), 1 - 0.9**t, 1e-8]
        np.testing.assert_allclose(coefs[k], np.tile(np.float32(want), (2, 1)), rtol=1e-7)
    m = next(a for a in args if isinstance(a, np.ndarray) and a.ndim == 1)
    assert m is opt.state[0]["m"].base or np.shares_memory(m, opt.state[0]["m"])  # the state's own buffers
    before = [p.copy() for p in params]
    opt.step(params, grads)  # and a step after the plan updates again, as the fourth step
    assert [entry["t"] for entry in opt.state] == [4, 4]
    assert not any(np.array_equal(p, q) for p, q in zip(params, before))

    monkeypatch.setenv("XPNET_KERNELS", "xp")
    told.clear()
    fresh = Told(1e-2)
    assert fresh.fused_updates(params, grads, [(32, 32.0)]) is None
    assert told == [] and fresh.state is None
    monkeypatch.delenv("XPNET_KERNELS")

    class Drifting(optim.SGD):  # a setting the kernel takes as an argument changes between steps
        def start_batch(self, rows, weight):
            self.momentum = rows / 100

    with pytest.raises(RuntimeError, match="fused update changed within the steps: sgd_step on other arguments$"):
        Drifting(0.1, momentum=0.5).fused_updates(params, grads, [(32, 32.0), (7, 7.0)])


def test_a_whole_epoch_on_a_scipy_sparse_data_set_trains_what_the_loop_trains(numba_cpu, rng, monkeypatch):
    sp = pytest.importorskip("scipy.sparse")
    from xpnet import optim

    X, y = sp.csr_matrix(_pixels(rng, 203, 49).astype(np.float32) / 255), rng.integers(0, 5, 203)

    def train():
        model = xpnet.MLP([49, 33, 5], seed=1)
        model.fit(X, y, epochs=2, batch_size=32, optimizer=optim.Adam(1e-2), verbose=0)
        return model.get_weights()

    (got, want), ran = _epochs_both_ways(monkeypatch, train)
    assert ran == [True, True]
    for (W, b), (W0, b0) in zip(got, want):
        np.testing.assert_array_equal(W, W0)
        np.testing.assert_array_equal(b, b0)


def test_run_epoch_takes_only_what_its_kernel_takes(numba_cpu, rng, monkeypatch):
    """Called directly: ``None`` (nothing changed) for a batch larger than the buffers, an order
    that is not C-contiguous int64, row factors of another dtype, shape or type, a label equal
    to the number of classes; labels all alike run. Where a call's steps fall short (a label
    changed meanwhile) or the optimizer's plan goes away within an epoch, it says so."""
    from xpnet import optim
    from xpnet.kernels import cpu_step

    X, y = _pixels(rng, 64, 49), rng.integers(0, 5, 64)
    model, step = _mlp_and_step([49, 33, 18, 5], "float32", 16)
    params, order = model.parameters(), rng.permutation(64)
    good = np.ones(64, np.float32)
    with step.running():
        opt = optim.Adam(1e-2)
        for args in ((X, y, order, 32), (X, y, order.astype(np.int32), 16), (X, y, order[::-1][::2], 16),
                     (X, y, order, 16, good.astype(np.float64)), (X, y, order, 16, good[:63]),
                     (X, y, order, 16, list(good)), (X, np.where(y == 4, 5, y), order, 16)):
            assert step.run_epoch(opt, params, *args) is None
        assert opt.state is None
        assert step.run_epoch(opt, params, X, np.full(64, 4), order, 16, good, [16.0] * 4) is not None
        assert [entry["t"] for entry in opt.state] == [4] * 6

        monkeypatch.setattr(step._loops, "sparse_mlp_epoch_adam", lambda *args: 1)  # one step of a call's four
        with pytest.raises(ValueError, match=r"^labels must lie in \[0, 5\); one changed during the epoch$"):
            step.run_epoch(opt, params, X, y, order, 16)
        monkeypatch.undo()

        class Fickle(optim.Adam):  # a fused update for the first call's steps only
            def fused_updates(self, *args):
                self.calls = getattr(self, "calls", 0) + 1
                return super().fused_updates(*args) if self.calls == 1 else None

        monkeypatch.setattr(cpu_step, "EPOCH_CHUNK_STEPS", 2)
        with pytest.raises(RuntimeError, match=r"stopped offering its fused update within an epoch$"):
            step.run_epoch(Fickle(1e-2), params, X, y, order, 16)
