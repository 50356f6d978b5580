"""scipy sparse data sets given to ``fit``, ``predict`` and ``evaluate`` (``xpnet.sparse``): the
same results as the same data dense, on every training step, and the whole set never made dense."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import xpnet
from xpnet.layers import AvgPool2D, Conv2D, Dense, Flatten
from xpnet.sparse import SparseRows

sp = pytest.importorskip("scipy.sparse")


def _data(rng, n, d, density, dtype=np.float32, classes=3):
    values = rng.uniform(0.05, 1.0, (n, d)) * rng.choice([-1.0, 1.0], (n, d))
    X = np.where(rng.random((n, d)) < density, values, 0.0).astype(dtype)
    return X, rng.integers(0, classes, n)


def _fit_both(make, X, y, monkeypatch, kernels="auto", **settings):
    """The same model trained on ``X`` dense and as CSR (of its rows flattened): (dense model,
    sparse model, histories)."""
    monkeypatch.setenv("XPNET_KERNELS", kernels)
    settings = dict(epochs=2, batch_size=32, optimizer="adam", lr=1e-2, verbose=0) | settings
    dense, sparse = make(), make()
    dense_history = dense.fit(X, y, **settings).history
    sparse_history = sparse.fit(sp.csr_matrix(X.reshape(len(X), -1)), y, **settings).history
    for history in (dense_history, sparse_history):
        history.pop("seconds")
    return dense, sparse, dense_history, sparse_history


@pytest.mark.parametrize(
    "widths, density, kernels",
    [
        ([40, 24, 7, 3], 0.2, "auto"),  # the fast step's sparse first layer
        ([40, 10, 3], 0.2, "auto"),  # a first layer narrower than a vector: dense batches
        ([40, 24, 3], 0.6, "auto"),  # too dense for the sparse layer: dense batches
        ([40, 24, 7, 3], 0.2, "xp"),  # the reference step
    ],
    ids=["sparse-layer", "narrow", "dense-share", "reference"],
)
@pytest.mark.parametrize("shuffle, weighted", [(True, False), (False, False), (True, True)],
                         ids=["shuffled", "in-order", "sample-weights"])
def test_fit_on_csr_equals_fit_on_the_dense_array(numba_cpu, rng, monkeypatch, widths, density, kernels, shuffle,
                                                  weighted):
    X, y = _data(rng, 150, widths[0], density, classes=widths[-1])
    weights = rng.uniform(0, 2, 150) if weighted else None
    dense, sparse, dense_history, sparse_history = _fit_both(
        lambda: xpnet.MLP(widths, seed=2), X, y, monkeypatch, kernels, shuffle=shuffle, validation_split=0.2,
        sample_weight=weights)
    for got, want in zip(sparse.parameters(), dense.parameters(), strict=True):
        np.testing.assert_array_equal(got, want)
    assert sparse_history == dense_history and "val_loss" in sparse_history


def test_a_cnn_trains_on_sparse_rows_as_on_the_images(numba_cpu, rng, monkeypatch):
    """Flat sparse rows take the model's input shape, batch by batch (the images-on-cores step's path)."""
    images, y = _data(rng, 96, 8 * 8 * 2, 0.3, np.float64)

    def cnn():
        layers = [Conv2D(3, 3, activation="relu"), AvgPool2D(2), Flatten(), Dense(8, activation="relu"), Dense(3)]
        return xpnet.Sequential(layers, input_shape=(8, 8, 2), dtype="float64", seed=4)

    dense, sparse, dense_history, sparse_history = _fit_both(cnn, images.reshape(-1, 8, 8, 2), y, monkeypatch)
    for got, want in zip(sparse.parameters(), dense.parameters(), strict=True):
        np.testing.assert_array_equal(got, want)
    assert sparse_history == dense_history
    np.testing.assert_array_equal(sparse.predict_proba(sp.csr_matrix(images)), dense.predict_proba(images))


def test_sparse_uint8_pixels_are_scaled_as_dense_ones(numba_cpu, rng, monkeypatch):
    pixels = np.where(rng.random((120, 30)) < 0.2, rng.integers(1, 256, (120, 30)), 0).astype(np.uint8)
    y = rng.integers(0, 3, 120)
    dense, sparse, dense_history, sparse_history = _fit_both(lambda: xpnet.MLP([30, 16, 3], seed=1), pixels, y,
                                                             monkeypatch)
    for got, want in zip(sparse.parameters(), dense.parameters(), strict=True):
        np.testing.assert_array_equal(got, want)
    assert sparse_history == dense_history


@pytest.mark.parametrize("kind", ["csr_matrix", "csc_matrix", "coo_matrix", "csr_array"])
def test_inference_on_any_sparse_format_equals_dense(rng, monkeypatch, kind):
    from xpnet import model as model_module

    X, y = _data(rng, 70, 25, 0.3, np.float64)
    X[3, :] = 0  # a row with no nonzeros
    model = xpnet.MLP([25, 9, 4], dtype="float64", seed=0)
    model.build((25,))
    matrix = getattr(sp, kind)(X)
    monkeypatch.setattr(model_module, "_SPARSE_CHUNK_BYTES", 25 * 8 * 16)  # 16 rows a chunk: 5 chunks
    np.testing.assert_array_equal(model.predict_proba(matrix), model.predict_proba(X))
    np.testing.assert_array_equal(model.predict(matrix), model.predict(X))
    assert model.evaluate(matrix, y % 4) == model.evaluate(X, y % 4)


def test_csr_with_duplicates_and_unsorted_columns_means_its_dense_sum(rng):
    """A CSR matrix not in canonical form stands for the sum of its entries, as ``toarray()``."""
    data, indices, indptr = np.array([1.0, 2.0, 0.5, 4.0]), np.array([3, 1, 3, 0]), np.array([0, 3, 4])
    matrix = sp.csr_matrix((data, indices, indptr), shape=(2, 5))
    assert not matrix.has_canonical_format
    rows = SparseRows.from_scipy(matrix, np.float64)
    np.testing.assert_array_equal(rows.take(np.arange(2)), matrix.toarray())
    np.testing.assert_array_equal(rows.take(np.array([1, 7, -2])), matrix.toarray()[[1, 1, 0]])  # clipped


def test_the_users_matrix_is_left_as_it_was(rng):
    """Made canonical on a copy: the matrix given keeps its duplicates and order."""
    data, indices, indptr = np.array([1.0, 2.0, 0.5]), np.array([3, 1, 3]), np.array([0, 3])
    matrix = sp.csr_matrix((data, indices, indptr), shape=(1, 5))
    model = xpnet.MLP([5, 3, 2], dtype="float64", seed=0)
    model.build((5,))
    model.fit(matrix, [1], epochs=1, verbose=0)
    assert not matrix.has_canonical_format
    np.testing.assert_array_equal(matrix.data, data)
    np.testing.assert_array_equal(matrix.indices, indices)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_values_take_the_models_dtype_and_bytes_stay_bytes(rng, dtype):
    X, _ = _data(rng, 6, 9, 0.5, np.float64)
    rows = SparseRows.from_scipy(sp.csr_matrix(X), dtype)
    assert rows.values.dtype == rows.dtype == dtype and rows.table.size == 0
    np.testing.assert_array_equal(rows.dense(), X.astype(dtype))
    pixels = (np.abs(X) * 255).astype(np.uint8)
    rows = SparseRows.from_scipy(sp.csr_matrix(pixels), dtype)
    assert rows.values.dtype == np.uint8 and rows.dtype == dtype
    np.testing.assert_array_equal(rows.dense(), xpnet.functional.scale_pixels(pixels, np.dtype(dtype)))


@pytest.mark.parametrize("d, columns", [(65536, np.uint16), (65537, np.int32)])
def test_columns_are_16_bit_where_they_fit(d, columns):
    matrix = sp.csr_matrix((np.ones(2), ([0, 0], [0, d - 1])), shape=(1, d))
    rows = SparseRows.from_scipy(matrix, np.float32)
    assert rows.indices.dtype == columns and rows.indices.tolist() == [0, d - 1]
    assert rows.take([0])[0, d - 1] == 1


def test_rows_of_sparse_rows_are_the_rows_of_the_matrix(rng):
    X, _ = _data(rng, 30, 12, 0.3, np.float64)
    rows = SparseRows.from_scipy(sp.csr_matrix(X), np.float64, (3, 4))
    part = rows[7:19, ...]
    assert part.shape == (12, 12) and part.nnz == np.count_nonzero(X[7:19])
    assert repr(part) == f"SparseRows(shape=(12, 12), nnz={part.nnz} ({part.nnz / 144:.1%}), dtype=float64)"
    np.testing.assert_array_equal(rows[3:3].dense(), np.zeros((0, 3, 4)))  # no rows
    one = SparseRows.from_scipy(sp.csr_matrix(np.ones((1, 1))), np.float32)
    assert repr(one) == "SparseRows(shape=(1, 1), nnz=1 (100.0%), dtype=float32)"
    np.testing.assert_array_equal(part.dense(), X[7:19].reshape(12, 3, 4))
    np.testing.assert_array_equal(rows[-5:].dense(), X[-5:].reshape(5, 3, 4))
    out = np.full((4, 3, 4), np.nan)  # poison: take writes every element of out
    taken = part.take(np.array([0, 11, 3, 3]), out=out)
    assert np.shares_memory(taken, out)
    np.testing.assert_array_equal(out, X[[7, 18, 10, 10]].reshape(4, 3, 4))
    with pytest.raises(TypeError, match="slice of rows"):
        rows[::2]


def _with_inf_starting_row_2():
    X = np.zeros((4, 6))
    X[0, 1] = X[1, 2] = X[2, 4] = X[3, 5] = 1.0
    X[2, 0] = X[3, 0] = np.inf  # the first value row 2 stores
    return sp.csr_matrix(X)


@pytest.mark.parametrize(
    "matrix, error, match",
    [
        (lambda: sp.csr_matrix(np.eye(4, 6, dtype=np.int64)), TypeError, "sparse X has dtype int64"),
        (lambda: _with_inf_starting_row_2(), ValueError, r"X contains NaN or inf \(first at row 2, column 0: inf\)"),
        (lambda: sp.csr_matrix(np.ones((4, 5))), ValueError, "X has 5 features per row"),
        (lambda: sp.csr_matrix((0, 6)), ValueError, "N >= 1"),
    ],
    ids=["integers", "nan", "width", "empty"],
)
def test_bad_sparse_input_is_refused_with_a_clear_error(matrix, error, match):
    model = xpnet.MLP([6, 4, 2], seed=0)
    model.build((6,))
    with pytest.raises(error, match=match):
        model.fit(matrix(), np.zeros(matrix().shape[0], np.int64), epochs=1, verbose=0)
    with pytest.raises(error, match=match):
        model.predict(matrix())


def test_sparse_rows_given_as_they_are_take_the_models_shape_or_are_refused(rng):
    images, _ = _data(rng, 10, 4 * 4 * 2, 0.4, np.float64)
    cnn = xpnet.Sequential([Conv2D(2, 3), Flatten(), Dense(3)], input_shape=(4, 4, 2), dtype="float64", seed=0)
    rows = SparseRows.from_scipy(sp.csr_matrix(images), np.float64)  # flat rows: (32,)
    np.testing.assert_array_equal(cnn.predict_proba(rows), cnn.predict_proba(images.reshape(-1, 4, 4, 2)))
    with pytest.raises(TypeError, match="SparseRows of float32 given to a float64 model"):
        cnn.predict(SparseRows.from_scipy(sp.csr_matrix(images), np.float32))
    with pytest.raises(ValueError, match="X has 31 features per row"):
        cnn.predict(SparseRows.from_scipy(sp.csr_matrix(images[:, :31]), np.float64))


def test_a_wide_sparse_set_trains_without_being_made_dense(numba_cpu, rng):
    """200,000 features over 3,000 rows would be 2.4 GB dense (float32); trained and evaluated
    sparse, the peak of new memory stays below 6% of that (the first layer's weights, their
    gradient and Adam's moments are 51 MB; inference makes 16 MB of rows dense at a time), and
    the model learns the classes (each class lights its own block of columns). The kernels are
    compiled before the count starts (numba's compiler takes tens of MB once, whatever the data)."""
    n, d, per_row = 3000, 200_000, 12
    y = rng.integers(0, 2, n)
    columns = (rng.integers(0, d // 2, (n, per_row)) + y[:, None] * (d // 2)).ravel()
    matrix = sp.csr_matrix((np.ones(n * per_row, np.float32), (np.repeat(np.arange(n), per_row), columns)),
                           shape=(n, d))
    warm = xpnet.MLP([d, 16, 2], seed=1)
    warm.fit(matrix[:200], y[:200], epochs=1, batch_size=100, optimizer="adam", lr=1e-2, verbose=0)
    warm.score(matrix[:200], y[:200])
    del warm
    model = xpnet.MLP([d, 16, 2], seed=0)
    tracemalloc.start()
    try:
        model.fit(matrix, y, epochs=3, batch_size=100, optimizer="adam", lr=1e-2, verbose=0)
        accuracy = model.score(matrix, y)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.06 * n * d * 4, f"peak {peak / 2**20:.0f} MB"
    assert accuracy > 0.9
