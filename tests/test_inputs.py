"""Bad input is refused at the public boundary with a ValueError/TypeError naming the problem."""

from __future__ import annotations

import numpy as np
import pytest

import xpnet


@pytest.fixture
def model():
    return xpnet.MLP([6, 5, 3], seed=0)


@pytest.fixture
def data(rng):
    return rng.normal(size=(10, 6)).astype(np.float32), rng.integers(0, 3, size=10)


def nan_at(X, i, j, value=np.nan):
    X = X.copy()
    X[i, j] = value
    return X


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda X, y: (X[:, :5], y), ValueError, "X has 5 features per row .* expects 6"),
        (lambda X, y: (X[0], y), ValueError, r"X must have shape \(N, 6\)"),
        (lambda X, y: (X[None], y), ValueError, "X has 60 features"),
        (lambda X, y: (X, np.where(np.arange(10) == 4, 3, y)), ValueError, r"labels must be in \[0, 3\); y\[4\] is 3"),
        (lambda X, y: (X, np.where(np.arange(10) == 2, -1, y)), ValueError, r"y\[2\] is -1"),
        (lambda X, y: (X, y + 0.5), ValueError, r"labels must be integers; y\[0\] is"),
        (lambda X, y: (X, y.astype(str)), TypeError, "labels must be integers"),
        (lambda X, y: (nan_at(X, 3, 2), y), ValueError, "NaN or inf .*row 3, column 2"),
        (lambda X, y: (nan_at(X, 7, 0, np.inf), y), ValueError, "NaN or inf .*row 7"),
        # float64 data, which the training step keeps as it is (converting each batch), checked alike
        (lambda X, y: (nan_at(X.astype(np.float64), 3, 2), y), ValueError, "NaN or inf .*row 3, column 2"),
        (lambda X, y: (X[:0], y[:0]), ValueError, "X is empty"),
        (lambda X, y: (X, y[:9]), ValueError, "X has 10 rows but y has 9 labels"),
        (lambda X, y: (X, y[:, None]), ValueError, "y must be a 1-D array"),
        (lambda X, y: ((X * 100).astype(np.int64), y), TypeError, "integer dtype int64"),
        (lambda X, y: (X.astype(complex), y), TypeError, "uint8 or float"),
    ],
)
def test_bad_data_is_refused_by_fit_and_evaluate(model, data, make, error, message):
    X, y = make(*data)
    with pytest.raises(error, match=message):
        model.fit(X, y, epochs=1, verbose=0)
    with pytest.raises(error, match=message):
        model.evaluate(X, y)


def test_float_labels_with_integral_values_are_accepted(data):
    """Float labels such as 2.0 train exactly as the integer labels do."""
    X, y = data
    as_int, as_float = xpnet.MLP([6, 5, 3], seed=0), xpnet.MLP([6, 5, 3], seed=0)
    as_int.fit(X, y, epochs=2, batch_size=4, lr=0.1, verbose=0)
    history = as_float.fit(X, y.astype(np.float64), epochs=2, batch_size=4, lr=0.1, verbose=0)
    assert len(history["loss"]) == 2
    start = xpnet.MLP([6, 5, 3], seed=0).get_weights()
    assert not np.array_equal(as_float.get_weights()[0][0], start[0][0])
    for (W1, b1), (W2, b2) in zip(as_int.get_weights(), as_float.get_weights()):
        np.testing.assert_array_equal(W1, W2)
        np.testing.assert_array_equal(b1, b2)
    assert as_float.evaluate(X, y.astype(np.float32)) == as_int.evaluate(X, y)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1, got 0"),
        ({"batch_size": -5}, ValueError, "batch_size must be >= 1, got -5"),
        ({"batch_size": 2.5}, TypeError, "batch_size must be an integer, got 2.5"),
        ({"epochs": -1}, ValueError, "epochs must be >= 0, got -1"),
        ({"epochs": True}, TypeError, "epochs must be an integer"),
        ({"optimizer": "rmsprop"}, ValueError, "unknown optimizer 'rmsprop'"),
        ({"lr": -0.1}, ValueError, "lr must be >= 0, got -0.1"),
        ({"lr": float("nan")}, TypeError, "lr must be a finite number"),
        ({"momentum": 1.5}, ValueError, "momentum must be in"),
        ({"validation_split": 1.0}, ValueError, "validation_split must be a fraction"),
        ({"validation_data": (1, 2, 3)}, TypeError, "validation_data must be a pair"),
        ({"callbacks": [print]}, TypeError, "callbacks must be xpnet.callbacks.Callback"),
        ({"schedule": "warp"}, ValueError, "unknown schedule 'warp'"),
    ],
)
def test_bad_settings_are_refused(model, data, kwargs, error, message):
    X, y = data
    with pytest.raises(error, match=message):
        model.fit(X, y, verbose=0, **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"layers": [784]}, ValueError, "at least an input and an output"),
        ({"layers": [784, 0, 10]}, ValueError, "positive integers, got 0"),
        ({"layers": [784, 2.5, 10]}, ValueError, "positive integers, got 2.5"),
        ({"layers": "784,10"}, TypeError, "sequence of layer widths"),
        ({"layers": [784, 1]}, ValueError, "at least 2 classes"),
        ({"layers": [4, 3], "activation": "swish"}, ValueError, "unknown activation 'swish'"),
        ({"layers": [4, 3], "init": "zeros"}, ValueError, "unknown init 'zeros'"),
        ({"layers": [4, 3], "dtype": "float16"}, ValueError, "dtype must be 'float32' or 'float64'"),
        ({"layers": [4, 3], "seed": -1}, ValueError, "seed must be a non-negative integer"),
        ({"layers": [4, 3], "backend": "tpu"}, ValueError, "unknown backend 'tpu'"),
        ({"layers": [4, 3], "backend": 3}, TypeError, "backend must be"),
    ],
)
def test_bad_model_settings_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        xpnet.MLP(**kwargs)


def test_arrays_of_another_backend_are_refused(data):
    import array_api_strict

    X, y = data
    numpy_model = xpnet.MLP([6, 3], seed=0)
    with pytest.raises(TypeError, match="array_api_strict array .*'cpu' backend"):
        numpy_model.predict(array_api_strict.asarray(X))
    strict_model = xpnet.MLP([6, 3], seed=0, backend=array_api_strict)
    assert strict_model.predict(X).shape == (10,)  # host NumPy data is uploaded explicitly at the boundary


@pytest.mark.cuda
def test_cupy_arrays_work_on_cuda_models_and_are_refused_by_cpu_models(data):
    import cupy

    X, y = data
    cuda_model = xpnet.MLP([6, 3], seed=0, backend="cuda")
    Xd, yd = cupy.asarray(X), cupy.asarray(y)
    cuda_model.fit(Xd, yd, epochs=1, verbose=0)
    assert cuda_model.score(Xd, yd) == pytest.approx(cuda_model.score(X, y))
    with pytest.raises(TypeError, match="CuPy .*'cpu' backend"):
        xpnet.MLP([6, 3], seed=0).predict(Xd)


# -- floats of the other float dtype: kept as given, each batch converted ------------------------------


def _other_dtype_models():
    from xpnet.layers import AvgPool2D, Conv2D, Dense, Flatten

    cnn = [Conv2D(3, 3, activation="relu"), AvgPool2D(2), Flatten(), Dense(3)]
    return {
        "relu-mlp": lambda dtype: xpnet.MLP([36, 20, 3], dtype=dtype, seed=1),
        "tanh-mlp": lambda dtype: xpnet.MLP([36, 20, 3], activation="tanh", dtype=dtype, seed=1),
        "cnn": lambda dtype: xpnet.Sequential([type(l).from_config(l.get_config()) for l in cnn],
                                              input_shape=(6, 6, 1), dtype=dtype, seed=1),
    }


@pytest.mark.parametrize("name", ["relu-mlp", "tanh-mlp", "cnn"])
@pytest.mark.parametrize("density", [1.0, 0.15], ids=["dense", "sparse-pixels"])
@pytest.mark.parametrize("kernels", ["auto", "xp"])
@pytest.mark.parametrize("model_dtype, data_dtype", [("float32", np.float64), ("float64", np.float32)])
def test_floats_of_the_other_dtype_train_as_the_same_values_converted_first(rng, monkeypatch, name, density, kernels,
                                                                          model_dtype, data_dtype):
    """``X / 255`` is float64: a float32 model's training step converts each batch it gathers
    (the Numba step, its sparse first layer, the reference and the images-on-cores step) instead of a copy
    of the whole set, to the very numbers the copy would hold; the held-out rows too."""
    monkeypatch.setenv("XPNET_KERNELS", kernels)
    make = _other_dtype_models()[name]
    X = np.where(rng.random((200, 36)) < density, rng.random((200, 36)), 0.0).astype(data_dtype)
    y = rng.integers(0, 3, 200)
    settings = dict(epochs=2, batch_size=64, optimizer="adam", lr=0.01, verbose=0, validation_split=0.25)
    shape = (200, 6, 6, 1) if name == "cnn" else (200, 36)
    given, converted = make(model_dtype), make(model_dtype)
    history = given.fit(X.reshape(shape), y, **settings).history
    want = converted.fit(X.reshape(shape).astype(model_dtype), y, **settings).history
    assert all(np.array_equal(a, b) for a, b in zip(given.parameters(), converted.parameters(), strict=True))
    for h in (history, want):
        h.pop("seconds")
    assert history == want


def test_float64_data_is_not_copied_whole_for_a_float32_model(rng):
    """The training set is kept as given: fit's peak of new memory stays well below the float32
    copy it used to make (here 8 MB)."""
    import tracemalloc

    X = rng.random((2000, 1024))  # float64, 16 MB
    y = rng.integers(0, 3, 2000)
    model = xpnet.MLP([1024, 16, 3], seed=0)
    model.fit(X[:64], y[:64], epochs=1, verbose=0)  # compile first
    tracemalloc.start()
    try:
        model.fit(X, y, epochs=1, batch_size=128, verbose=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < X.size * 4 / 2, peak


def test_a_nan_far_into_kept_float64_data_is_found_where_it_is(rng):
    X = rng.random((9000, 6))
    X[8001, 4] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf \(first at row 8001, column 4: nan\)"):
        xpnet.MLP([6, 3], seed=0).fit(X, rng.integers(0, 3, 9000), epochs=1, verbose=0)
