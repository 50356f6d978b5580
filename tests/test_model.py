"""MLP behaviour: parameters, determinism, weights, inference, optimizers, callbacks."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest

import xpnet
from xpnet import optim
from xpnet.callbacks import Callback, EarlyStopping
from xpnet.layers import Conv2D, Dense, Flatten


def blobs(rng, n=600, features=12, classes=4):
    """Separable-ish clusters: a quick task a small MLP learns in a few epochs."""
    centers = rng.normal(size=(classes, features)) * 3
    y = rng.integers(0, classes, size=n)
    X = centers[y] + rng.normal(size=(n, features))
    return X.astype(np.float32), y


def test_count_params_matches_seed_002():
    assert xpnet.MLP([784, 50, 25, 10]).count_params() == 40_785
    assert xpnet.MLP([784, 64, 64, 10]).count_params() == 55_050


def test_same_seed_gives_bit_identical_weights_after_training(rng):
    X, y = blobs(rng)
    runs = []
    for _ in range(2):
        model = xpnet.MLP([12, 16, 4], seed=7)
        model.fit(X, y, epochs=3, batch_size=32, lr=0.05, momentum=0.9, verbose=0)
        runs.append(model.get_weights())
    for (W1, b1), (W2, b2) in zip(*runs):
        assert np.array_equal(W1, W2) and np.array_equal(b1, b2)
    other = xpnet.MLP([12, 16, 4], seed=8).get_weights()
    assert not np.array_equal(other[0][0], xpnet.MLP([12, 16, 4], seed=7).get_weights()[0][0])


def test_training_learns_and_history_is_complete(backend, rng):
    X, y = blobs(rng)
    model = xpnet.MLP([12, 32, 4], seed=0, backend=backend)
    before = model.evaluate(X, y)
    history = model.fit(X, y, epochs=4, batch_size=50, lr=0.1, validation_split=0.25, verbose=0)
    assert history.epoch == [0, 1, 2, 3]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "seconds", "lr"):
        assert len(history[key]) == 4, key
    assert history["loss"][-1] < history["loss"][0]
    after = model.evaluate(X, y)
    assert after["loss"] < before["loss"] and after["accuracy"] > 0.9
    proba = model.predict_proba(X)
    assert isinstance(proba, np.ndarray) and proba.shape == (600, 4)
    np.testing.assert_allclose(proba.sum(axis=1), 1, atol=1e-5)
    labels = model.predict(X)
    assert isinstance(labels, np.ndarray) and labels.dtype == np.int64
    np.testing.assert_array_equal(labels, proba.argmax(axis=1))
    assert model.score(X, y) == pytest.approx(after["accuracy"])


def test_backends_train_to_the_same_weights(rng):
    """The math is written once: NumPy and array_api_strict give the same numbers."""
    import array_api_strict

    X, y = blobs(rng, n=200)
    results = []
    for backend in ("cpu", array_api_strict):
        model = xpnet.MLP([12, 9, 4], dtype="float64", seed=1, backend=backend)
        model.fit(X, y, epochs=2, batch_size=33, optimizer="adam", verbose=0)
        results.append(model.get_weights())
    for (Wa, ba), (Wb, bb) in zip(*results):
        np.testing.assert_allclose(Wa, Wb, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(ba, bb, rtol=1e-12, atol=1e-14)


def test_images_are_flattened_and_uint8_is_scaled(rng):
    images = rng.integers(0, 256, size=(20, 28, 28), dtype=np.uint8)
    model = xpnet.MLP([784, 10], seed=0)
    np.testing.assert_allclose(
        model.predict_proba(images), model.predict_proba(images.reshape(20, 784).astype(np.float32) / 255), atol=1e-6
    )


def test_get_set_weights_round_trip(rng):
    model = xpnet.MLP([5, 4, 3], seed=0)
    weights = [(rng.normal(size=W.shape), rng.normal(size=b.shape)) for W, b in model.get_weights()]
    model.set_weights(weights)
    for (W, b), (W2, b2) in zip(weights, model.get_weights()):
        np.testing.assert_allclose(W2, W.astype(np.float32))
        np.testing.assert_allclose(b2, b.astype(np.float32))
        assert W2.shape == W.shape and W2.dtype == np.float32
    got = model.get_weights()
    got[0][0][...] = 123.0  # a copy: editing it leaves the model alone
    assert not (model.get_weights()[0][0] == 123.0).any()
    with pytest.raises(ValueError, match="layer 0 needs W"):
        model.set_weights([(np.ones((4, 4)), np.ones(4)), weights[1]])
    with pytest.raises(ValueError, match="expected 2"):
        model.set_weights(weights[:1])
    with pytest.raises(ValueError, match="NaN or inf"):
        model.set_weights([(np.full((5, 4), np.nan), np.ones(4)), weights[1]])


def test_sgd_momentum_and_nesterov_follow_their_formulas(rng):
    p0, g1, g2 = rng.normal(size=5), rng.normal(size=5), rng.normal(size=5)
    for nesterov in (False, True):
        p = p0.copy()
        opt = optim.SGD(lr=0.1, momentum=0.9, nesterov=nesterov)
        opt.step([p], [g1])
        opt.step([p], [g2])
        v1 = g1
        v2 = 0.9 * v1 + g2
        steps = (g1 + 0.9 * v1, g2 + 0.9 * v2) if nesterov else (v1, v2)
        np.testing.assert_allclose(p, p0 - 0.1 * steps[0] - 0.1 * steps[1], rtol=1e-14)


def test_adam_follows_its_formula(rng):
    p0, g1, g2 = rng.normal(size=5), rng.normal(size=5), rng.normal(size=5)
    p = p0.copy()
    opt = optim.Adam(lr=0.01, weight_decay=0.1)
    opt.step([p], [g1])
    p_after_1 = p.copy()
    opt.step([p], [g2])
    g1d = g1 + 0.1 * p0
    m, v = 0.1 * g1d, 0.001 * g1d**2
    expected1 = p0 - 0.01 * (m / 0.1) / (np.sqrt(v / 0.001) + 1e-8)
    np.testing.assert_allclose(p_after_1, expected1, rtol=1e-12)
    g2d = g2 + 0.1 * expected1
    m, v = 0.9 * m + 0.1 * g2d, 0.999 * v + 0.001 * g2d**2
    expected2 = expected1 - 0.01 * (m / (1 - 0.9**2)) / (np.sqrt(v / (1 - 0.999**2)) + 1e-8)
    np.testing.assert_allclose(p, expected2, rtol=1e-12)


def test_schedules():
    step = optim.StepLR(3, gamma=0.5)
    assert [step(e, 10) for e in range(7)] == [1, 1, 1, 0.5, 0.5, 0.5, 0.25]
    cosine = optim.CosineLR(min_factor=0.1)
    assert cosine(0, 10) == 1.0
    assert cosine(5, 10) == pytest.approx(0.55)
    assert cosine(10, 10) == pytest.approx(0.1)
    opt = optim.SGD(lr=0.2, schedule="cosine")
    opt.start_epoch(5, 10)
    assert opt.lr == pytest.approx(0.1)


def test_fit_records_the_scheduled_rate(rng):
    X, y = blobs(rng, n=100)
    model = xpnet.MLP([12, 4], seed=0)
    history = model.fit(X, y, epochs=4, lr=0.1, schedule=optim.StepLR(2, gamma=0.1), verbose=0)
    assert history["lr"] == pytest.approx([0.1, 0.1, 0.01, 0.01])


def test_optimizer_object_refuses_settings_beside_it():
    with pytest.raises(ValueError, match="set lr"):
        optim.make_optimizer(optim.SGD(lr=0.1), lr=0.5)
    with pytest.raises(ValueError, match="sgd' only"):
        optim.make_optimizer("adam", momentum=0.9)
    with pytest.raises(ValueError, match="nesterov"):
        optim.SGD(lr=0.1, nesterov=True)


def test_early_stopping_stops_and_restores_the_best_weights(rng):
    X, y = blobs(rng, n=300)
    X_val, y_val = X[:100], (y[:100] + 1) % 4  # wrong labels: the better the fit, the worse val_loss

    class Recorder(Callback):
        def __init__(self):
            self.weights = []

        def on_epoch_end(self, epoch, logs):
            self.weights.append(self.model.get_weights())

    stop, record = EarlyStopping(patience=2), Recorder()
    model = xpnet.MLP([12, 32, 4], seed=0)
    history = model.fit(X, y, epochs=50, lr=0.5, validation_data=(X_val, y_val), callbacks=[stop, record], verbose=0)
    ran = len(history.epoch)
    assert ran < 50 and stop.stopped_epoch == ran - 1
    best = int(np.argmin(history["val_loss"]))
    assert stop.best_epoch == best and ran - 1 - best == 2
    for (W, b), (Wb, bb) in zip(model.get_weights(), record.weights[best]):
        np.testing.assert_array_equal(W, Wb)
        np.testing.assert_array_equal(b, bb)


def test_early_stopping_needs_the_metric_it_monitors(rng):
    X, y = blobs(rng, n=50)
    with pytest.raises(ValueError, match="val_loss"):
        xpnet.MLP([12, 4]).fit(X, y, epochs=1, callbacks=[EarlyStopping()], verbose=0)


def test_zero_epochs_trains_nothing(rng):
    X, y = blobs(rng, n=50)
    model = xpnet.MLP([12, 4], seed=0)
    before = model.get_weights()
    history = model.fit(X, y, epochs=0, verbose=0)
    assert history.epoch == []
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(before, model.get_weights()))


def test_verbose_prints_a_line_per_epoch(rng, capsys):
    X, y = blobs(rng, n=100)
    history = xpnet.MLP([12, 4], seed=0).fit(X, y, epochs=2, verbose=1, validation_split=0.2)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("epoch ") and " - loss: " in line]
    assert [line.split(" - ")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    for epoch, line in enumerate(lines):  # each line shows that epoch's metrics, to 4 decimals
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert f"{key}: {history[key][epoch]:.4f}" in line, (key, line)
    xpnet.MLP([12, 4], seed=0).fit(X, y, epochs=1, verbose=0)
    assert capsys.readouterr().err == ""  # verbose=0 is silent


# --- refusals at the model's boundary -----------------------------------------------------------


@pytest.mark.parametrize("make, error, message", [
    (lambda: xpnet.Sequential("dense"), TypeError, "layers must be a sequence of xpnet.layers objects"),
    (lambda: xpnet.Sequential(Dense(3)), TypeError, "layers must be a sequence"),
    (lambda: xpnet.Sequential([]), ValueError, "needs at least one layer"),
    (lambda: xpnet.Sequential([Dense(3), "relu"]), TypeError, r"layers\[1\] is a str"),
    (lambda: xpnet.Sequential([Dense(3)], input_shape=0), ValueError, "input_shape must be a tuple of positive ints"),
    (lambda: xpnet.Sequential([Dense(3)], input_shape=(4, True)), ValueError, r"got \(4, True\)"),
    (lambda: xpnet.Sequential([Dense(3)], input_shape="4"), ValueError, "got '4'"),
    (lambda: xpnet.MLP([4, 1]), ValueError, "at least 2 classes, got 1"),
    (lambda: xpnet.MLP([4, 3], activation=None), ValueError, "activation must be one of"),
    (lambda: xpnet.MLP([4, 3], init="zeros"), ValueError, "unknown init 'zeros'"),
])
def test_bad_models_are_refused_naming_the_problem(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_an_int_input_shape_is_one_axis_and_the_same_layer_cannot_appear_twice():
    model = xpnet.Sequential([Dense(3)], input_shape=5)
    assert model.layers[0].input_shape == (5,)
    layer = Dense(3)
    with pytest.raises(ValueError, match="the same layer object appears twice"):
        xpnet.Sequential([layer, layer])


def test_a_built_model_refuses_another_input_shape_and_accepts_its_own():
    model = xpnet.Sequential([Dense(3)], input_shape=(5,))
    model.build((5,))  # the same shape again: nothing to do
    with pytest.raises(ValueError, match=r"built for inputs of shape \(5,\), not \(6,\)"):
        model.build((6,))


def test_layers_of_a_failed_build_can_go_into_a_corrected_model():
    conv, dense = Conv2D(2, 3), Dense(3)
    with pytest.raises(ValueError, match="put a Flatten"):
        xpnet.Sequential([conv, dense], input_shape=(8, 8, 1))
    model = xpnet.Sequential([conv, Flatten(), dense], input_shape=(8, 8, 1))  # as the message advises
    assert model.built and conv.output_shape == (6, 6, 2) and dense.output_shape == (3,)


def test_set_weights_checks_count_shape_dtype_and_values():
    model = xpnet.MLP([4, 3], seed=0)
    W, b = model.get_weights()[0]
    with pytest.raises(ValueError, match="expected 1 .W, b. pairs, got 2"):
        model.set_weights([(W, b), (W, b)])
    with pytest.raises(ValueError, match=r"weights\[0\] must be a pair"):
        model.set_weights([(W, b, b)])
    with pytest.raises(ValueError, match="expected 2 arrays"):
        model.set_weights([W])
    with pytest.raises(ValueError, match="^" + re.escape(
        "weights[0] has shape (3, 4); layer 0 needs W of shape (4, 3) (Dense)"
    ) + "$"):
        model.set_weights([W.T, b])
    with pytest.raises(TypeError, match=r"weights\[1\] must hold numbers"):
        model.set_weights([W, b.astype(str)])
    with pytest.raises(ValueError, match=r"weights\[1\] contains NaN"):
        model.set_weights([W, np.full(3, np.nan)])
    model.set_weights([W + 1, b + 2])  # the flat list works too
    np.testing.assert_array_equal(model.get_weights()[0][1], b + 2)


def test_arrays_of_another_library_are_refused_not_copied(rng):
    import array_api_strict as xs

    model = xpnet.MLP([4, 3], seed=0)
    X = xs.asarray(rng.normal(size=(5, 4)).astype(np.float32))
    with pytest.raises(TypeError, match="^X is a array_api_strict array but this model runs on the 'cpu' backend"):
        model.predict(X)
    with pytest.raises(TypeError, match="^X must be array-like, got list: .*inhomogeneous"):
        model.predict([[0.1, 0.2, 0.3, 0.4], [0.5]])


# --- dtypes, inputs, summary: what the user reads back -------------------------------------------


@pytest.mark.parametrize("dtype, name", [
    ("float32", "float32"), ("float64", "float64"), (np.float32, "float32"), (np.float64, "float64"),
    (float, "float64"), ("double", "float64"), ("single", "float32"), ("f4", "float32"), ("f8", "float64"),
    ("<f4", "float32"), ("<f8", "float64"), (np.dtype("float32"), "float32"), (np.dtype("float64"), "float64"),
])
def test_every_spelling_of_the_two_float_dtypes_is_accepted(dtype, name, rng):
    model = xpnet.MLP([4, 3], dtype=dtype, seed=0)
    assert model.dtype == name
    assert model.get_weights()[0][0].dtype == np.dtype(name)
    assert model.predict_proba(rng.normal(size=(2, 4))).dtype == np.dtype(name)


@pytest.mark.parametrize("dtype, shown", [
    ("float16", "'float16'"), (np.float16, "<class 'numpy.float16'>"), (">f4", "'>f4'"), ("f2", "'f2'"),
    (int, "<class 'int'>"), ("half", "'half'"),
])
def test_other_dtypes_are_refused_showing_what_was_given(dtype, shown):
    with pytest.raises(ValueError, match="^" + re.escape(f"dtype must be 'float32' or 'float64', got {shown}") + "$"):
        xpnet.Sequential([Dense(3)], dtype=dtype)


@pytest.fixture
def cnn():
    return xpnet.Sequential([Conv2D(2, 3, activation="relu"), Flatten(), Dense(3)], input_shape=(5, 5, 1), seed=0)


@pytest.mark.parametrize("X, error, message", [
    (np.zeros(25, np.float32), ValueError, "X must have shape (N, 5, 5, 1) (a batch of rows); got shape (25,)"),
    (np.zeros((0, 25), np.float32), ValueError, "X is empty (0 rows)"),
    (np.zeros((2, 24), np.float32), ValueError,
     "X has 24 features per row (shape (2, 24)), but the model expects 25 (rows of shape (5, 5, 1))"),
    (np.zeros((2, 25), bool), TypeError, "X must hold numbers (uint8 or float), got dtype bool"),
    (np.zeros((2, 25), np.int16), TypeError,
     "X has integer dtype int16: pass uint8 pixels (scaled by 1/255 for you) or floats (used as they are)"),
    (np.where(np.arange(75).reshape(3, 5, 5, 1) == 38, np.nan, 0.0), ValueError,
     "X contains NaN or inf (first at row 1, index (2, 3, 0): nan)"),
    (np.where(np.arange(75).reshape(3, 25) == 60, -np.inf, 0.0), ValueError,
     "X contains NaN or inf (first at row 2, index (2, 0, 0): -inf)"),
])
def test_image_models_name_the_problem_with_x_in_image_terms(cnn, X, error, message):
    with pytest.raises(error, match="^" + re.escape(message)):
        cnn.predict(X)


def test_images_of_several_channels_given_channels_first_are_refused_not_misread(rng):
    """(N, 3, 4, 4) holds as many values as (N, 4, 4, 3): read channels-last it would be a
    silent wrong answer. Flat rows and the input shape up to axes of size 1 are taken."""
    model = xpnet.Sequential([Conv2D(2, 3), Flatten(), Dense(3)], input_shape=(4, 4, 3), seed=0)
    X = rng.random((2, 4, 4, 3)).astype(np.float32)
    expected = model.predict_proba(X)
    for rows in (X.reshape(2, 48), X.reshape(2, 1, 4, 4, 3), X.reshape(2, 4, 4, 3, 1)):
        np.testing.assert_array_equal(model.predict_proba(rows), expected)
    for bad in (X.transpose(0, 3, 1, 2), X.reshape(2, 16, 3), X.reshape(2, 4, 12)):
        message = (f"X has rows of shape {bad.shape[1:]}, but the model takes rows of shape (4, 4, 3) (channels "
                   "last: height, width, channels) or flat rows of 48 values")
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            model.predict(bad)
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            model.fit(bad, np.array([0, 1]), epochs=1, verbose=0)
    flat_input = xpnet.Sequential([Flatten(), Dense(3)], input_shape=(2, 3))
    with pytest.raises(ValueError, match=r"^X has rows of shape \(3, 2\), but the model takes rows of shape "
                                         r"\(2, 3\) or flat rows of 6 values$"):
        flat_input.predict(np.zeros((2, 3, 2)))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_finite_values_whose_sum_overflows_are_taken_and_a_bad_value_after_them_is_named(dtype):
    """The finiteness check sums each block first: a sum that overflows must send it to the
    element-wise look, which passes finite data and names the first bad value."""
    from xpnet.model import _check_finite

    big = np.finfo(dtype).max
    X = np.full((5000, 3), big, dtype)
    X[::2] = -big / 3  # sums to inf in any order
    with np.errstate(over="ignore"):
        assert not np.isfinite(X.sum())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no overflow warning from the sum
        _check_finite(X)
    X[4500, 2] = np.nan
    with pytest.raises(ValueError, match=r"first at row 4500, column 2: nan"):
        _check_finite(X)


def test_flat_models_name_the_bad_value_by_row_and_column():
    model = xpnet.MLP([4, 3], seed=0)
    X = np.zeros((3, 4))
    X[2, 1] = np.inf
    with pytest.raises(ValueError, match="^" + re.escape("X contains NaN or inf (first at row 2, column 1: inf)")):
        model.predict(X)
    with pytest.raises(ValueError, match="^" + re.escape("X has 5 features per row (shape (2, 5)), but the model expects 4")
                       + "$"):
        model.predict(np.zeros((2, 5)))


def test_x_of_any_row_layout_uint8_float_or_nested_lists_gives_the_same_predictions(cnn, rng):
    pixels = rng.integers(0, 256, size=(4, 5, 5), dtype=np.uint8)
    floats = pixels.astype(np.float64) / 255
    expected = cnn.predict_proba(floats.reshape(4, 5, 5, 1).astype(np.float32))
    for X in (pixels, pixels.reshape(4, 25), pixels.reshape(4, 5, 5, 1), floats, floats.reshape(4, 25),
              floats.reshape(4, 25).tolist()):
        np.testing.assert_allclose(cnn.predict_proba(X), expected, rtol=1e-6, atol=1e-7)
    assert cnn.predict(floats.tolist()).tolist() == expected.argmax(axis=1).tolist()


def test_a_model_on_another_namespace_takes_its_own_arrays_and_names_foreign_ones(rng):
    import array_api_strict as xs

    X = rng.normal(size=(6, 4))
    y = np.array([0, 1, 2, 0, 1, 2])
    strict = xpnet.MLP([4, 3], seed=0, backend=xs)
    expected = xpnet.MLP([4, 3], seed=0).predict_proba(X)
    np.testing.assert_allclose(strict.predict_proba(xs.asarray(X)), expected, rtol=1e-6)
    assert strict.evaluate(xs.asarray(X), xs.asarray(y)) == pytest.approx(strict.evaluate(X, y))
    with pytest.raises(TypeError, match="^" + re.escape(
        "y is a array_api_strict array but this model runs on the 'cpu' backend; pass a NumPy array, "
        "or build the model with the matching backend"
    )):
        xpnet.MLP([4, 3], seed=0).evaluate(X, xs.asarray(y))
    with pytest.raises(TypeError, match="^y must be array-like, got list: "):
        strict.evaluate(X, [[0], [1, 2], [0], [1], [2], [0]])


def test_summary_prints_an_aligned_table(cnn, capsys):
    cnn.summary()
    assert capsys.readouterr().out.splitlines() == [
        "Model: \"Sequential\" (input (None, 5, 5, 1), float32, backend 'cpu')",
        "-" * 40,
        "Layer (type)  Output shape     Param #",
        "-" * 40,
        "Conv2D        (None, 3, 3, 2)  20",
        "Flatten       (None, 18)       0",
        "Dense         (None, 3)        57",
        "-" * 40,
        "Total params: 77",
    ]
    lines = []
    xpnet.MLP([784, 1000, 10], dtype="float64").summary(print_fn=lines.append)
    assert lines[0] == "Model: \"MLP\" (input (None, 784), float64, backend 'cpu')"
    assert lines[2:] == ["Layer (type)  Output shape  Param #", "-" * 37, "Dense         (None, 1000)  785,000",
                         "Dense         (None, 10)    10,010", "-" * 37, "Total params: 795,010"]
    assert lines[1] == "-" * 37


def test_repr_config_and_sizes_describe_the_model(cnn):
    assert repr(cnn) == (
        "Sequential([Conv2D(filters=2, kernel_size=[3, 3], strides=[1, 1], padding='valid', activation='relu', "
        "init='he'), Flatten(), Dense(units=3, activation=None, init='he')], input_shape=(5, 5, 1), "
        "dtype='float32', backend='cpu')"
    )
    assert repr(xpnet.MLP([4, 5, 3], dtype="float64")) == "MLP(4-5-3, activation='relu', dtype='float64', backend='cpu')"
    assert (cnn.n_features, cnn.n_classes, cnn.count_params()) == (25, 3, 77)
    unbuilt = xpnet.Sequential([Dense(3)])
    assert unbuilt.input_shape is None and unbuilt.config["input_shape"] is None
    for attempt in (lambda: unbuilt.n_features, lambda: unbuilt.n_classes, unbuilt.count_params, unbuilt.summary,
                    unbuilt.get_weights):
        with pytest.raises(RuntimeError, match="^" + re.escape(
            "the model is not built yet: give input_shape=..., call build(), or fit first"
        )):
            attempt()


@pytest.mark.parametrize("make, error, message", [
    (lambda: xpnet.Sequential(3), TypeError, "layers must be a sequence of xpnet.layers objects, got 3"),
    (lambda: xpnet.Sequential(b"x"), TypeError, "layers must be a sequence of xpnet.layers objects, got b'x'"),
    (lambda: xpnet.Sequential([Dense(3), "relu"]), TypeError, "layers[1] is a str, not an xpnet.layers.Layer"),
    (lambda: xpnet.Sequential([Conv2D(2, 3)], input_shape=(5, 5, 1)), ValueError,
     "the last layer must output class scores of shape (n_classes,) with n_classes >= 2, got (3, 3, 2)"),
    (lambda: xpnet.Sequential([Conv2D(2, 3), Dense(3)], input_shape=(8, 8, 1)), ValueError,
     "layers[1] Dense: Dense takes flat inputs (features,), got (6, 6, 2)"),
    (lambda: xpnet.Sequential([Dense(3)], seed=True), ValueError, "seed must be a non-negative integer or None, got True"),
    (lambda: xpnet.Sequential([Dense(3)], seed=2.0), ValueError, "seed must be a non-negative integer or None, got 2.0"),
    (lambda: xpnet.Sequential([Dense(3)], seed=-1), ValueError, "seed must be a non-negative integer or None, got -1"),
    (lambda: xpnet.Sequential([Dense(3)], input_shape=()), ValueError,
     "input_shape must be a tuple of positive ints without the batch axis, got ()"),
    (lambda: xpnet.Sequential([Dense(3)], input_shape=(4, 0)), ValueError,
     "input_shape must be a tuple of positive ints without the batch axis, got (4, 0)"),
    (lambda: xpnet.Sequential([Dense(3)], input_shape=4.0), ValueError,
     "input_shape must be a tuple of positive ints without the batch axis, got 4.0"),
    (lambda: xpnet.Sequential([Dense(3)], input_shape=True), ValueError,
     "input_shape must be a tuple of positive ints without the batch axis, got True"),
    (lambda: xpnet.MLP(5), TypeError, "layers must be a sequence of layer widths such as [784, 50, 10], got 5"),
    (lambda: xpnet.MLP(b"\x04\x03"), TypeError, "layers must be a sequence of layer widths such as [784, 50, 10], got b"),
    (lambda: xpnet.MLP([784]), ValueError, "layers needs at least an input and an output width, got [784]"),
    (lambda: xpnet.MLP([784, True, 3]), ValueError, "layer widths must be positive integers, got True in [784, True, 3]"),
    (lambda: xpnet.MLP([784, 3.0]), ValueError, "layer widths must be positive integers, got 3.0 in [784, 3.0]"),
    (lambda: xpnet.MLP([4, 1]), ValueError, "the output layer needs at least 2 classes, got 1"),
    (lambda: xpnet.MLP([4, 5, 1]), ValueError, "the output layer needs at least 2 classes, got 1"),
    (lambda: xpnet.Sequential([]), ValueError, "a Sequential model needs at least one layer"),
    (lambda: xpnet.Sequential([Dense(2)] * 2), ValueError,
     "the same layer object appears twice: create one layer per position"),
    (lambda: xpnet.MLP([4, 3], activation=None), ValueError, "activation must be one of ('relu', 'tanh', 'sigmoid')"),
    (lambda: xpnet.MLP([4, 3], init="zeros"), ValueError, "unknown init 'zeros': expected one of"),
    (lambda: xpnet.Sequential.from_config({"layers": [{"type": "Foo"}], "input_shape": [4], "dtype": "float32",
                                           "seed": 0}), ValueError,
     "layer 0 has unknown type 'Foo' (known: AvgPool2D, Conv2D, Dense, "),
])
def test_refusals_say_exactly_what_was_wrong(make, error, message):
    with pytest.raises(error, match="^" + re.escape(message)):
        make()


def test_numpy_integers_and_edge_sizes_are_accepted_as_plain_ints():
    model = xpnet.Sequential([Dense(3)], input_shape=np.int64(1), seed=np.int64(0))
    assert model.input_shape == (1,) and model.n_features == 1
    assert json.loads(json.dumps(model.config))["seed"] == 0 and model.config["input_shape"] == [1]
    assert xpnet.Sequential([Flatten(), Dense(2)], input_shape=[np.int32(2), 3]).input_shape == (2, 3)
    mlp = xpnet.MLP([np.int64(1), np.int64(2)], seed=np.uint8(3))
    assert mlp.config == {"class": "MLP", "layers": [1, 2], "activation": "relu", "init": "he", "dtype": "float32",
                          "seed": 3}
    assert json.dumps(mlp.config)  # plain ints: JSON-able
    assert xpnet.Sequential([Dense(2)], seed=None, input_shape=3).seed is None


def test_an_mlp_is_its_formula_with_the_chosen_hidden_activation(rng):
    X = rng.normal(size=(7, 4))
    act = {"relu": lambda z: np.maximum(z, 0), "tanh": np.tanh, "sigmoid": lambda z: 1 / (1 + np.exp(-z))}
    for name, f in act.items():
        model = xpnet.MLP([4, 6, 5, 3], activation=name, dtype="float64", seed=1)
        (W1, b1), (W2, b2), (W3, b3) = model.get_weights()
        z = f(f(X @ W1 + b1) @ W2 + b2) @ W3 + b3  # the output layer gives logits: no activation
        p = np.exp(z - z.max(axis=1, keepdims=True))
        np.testing.assert_allclose(model.predict_proba(X), p / p.sum(axis=1, keepdims=True), rtol=1e-10)


def test_mlp_init_sets_the_spread_of_every_layers_initial_weights():
    he, glorot = (xpnet.MLP([400, 200, 100], init=init, dtype="float64", seed=0).get_weights() for init in ("he", "glorot"))
    assert np.std(he[0][0]) == pytest.approx(np.sqrt(2 / 400), rel=0.05)
    assert np.std(he[1][0]) == pytest.approx(np.sqrt(2 / 200), rel=0.05)
    assert np.std(glorot[0][0]) == pytest.approx(np.sqrt(2 / 600), rel=0.05)
    assert np.std(glorot[1][0]) == pytest.approx(np.sqrt(2 / 300), rel=0.05)


def test_predict_and_evaluate_over_several_chunks_equal_the_pieces(rng):
    """Inputs larger than one forward pass (8192 rows) are cut and put together again."""
    model = xpnet.MLP([3, 4], dtype="float64", seed=0)
    X, y = rng.normal(size=(8200, 3)), rng.integers(0, 4, size=8200)
    head, tail = model.evaluate(X[:8192], y[:8192]), model.evaluate(X[8192:], y[8192:])
    whole = model.evaluate(X, y)
    assert whole["loss"] == pytest.approx((8192 * head["loss"] + 8 * tail["loss"]) / 8200, rel=1e-12)
    assert whole["accuracy"] == pytest.approx((8192 * head["accuracy"] + 8 * tail["accuracy"]) / 8200, rel=1e-12)
    proba = model.predict_proba(X)
    assert proba.shape == (8200, 4)
    np.testing.assert_allclose(proba[8190:], model.predict_proba(X[8190:]), rtol=1e-12)
    np.testing.assert_array_equal(model.predict(X)[8188:], model.predict(X[8188:]))
    assert model.predict(X).shape == (8200,)


def test_a_chunk_holds_as_many_images_as_its_widest_layer_output_allows(rng, monkeypatch):
    """A convolution's output is large per image: chunks shrink so that the widest layer output
    of a chunk stays within ``_CHUNK_OUTPUT_BYTES``, and the chunks still add up to the whole."""
    monkeypatch.setattr(xpnet.model, "_CHUNK_OUTPUT_BYTES", 6 * 6 * 4 * 8 * 10 + 7)  # 10 images of float64
    model = xpnet.Sequential([Conv2D(4, 3, padding="same"), Flatten(), Dense(3)], input_shape=(6, 6, 2),
                             dtype="float64", seed=0)
    X, y = rng.normal(size=(25, 6, 6, 2)), rng.integers(0, 3, 25)
    assert model._chunks(X) == [(0, 10), (10, 20), (20, 25)]
    forward = model.forward(X)
    np.testing.assert_allclose(model.predict_proba(X), xpnet.functional.softmax(forward), rtol=1e-12)
    assert model.evaluate(X, y)["accuracy"] == pytest.approx(np.mean(forward.argmax(axis=1) == y))
    monkeypatch.undo()
    mlp = xpnet.MLP([3, 4], dtype="float64", seed=0)
    assert mlp._chunks(np.zeros((9000, 3))) == [(0, 8192), (8192, 9000)]  # narrow rows: the row cap


def test_an_entry_without_a_type_is_an_unknown_layer_naming_the_known_ones():
    config = {"layers": [{"units": 3}], "input_shape": [4], "dtype": "float32", "seed": 0}
    with pytest.raises(ValueError, match=r"^layer 0 has unknown type None \(known: AvgPool2D, Conv2D, Dense, .*\); "
                                         r"a layer class of your own must be defined before loading$"):
        xpnet.Sequential.from_config(config)


def test_two_classes_are_enough(rng):
    model = xpnet.MLP([3, 2], seed=0)
    assert model.n_classes == 2 and model.predict_proba(rng.normal(size=(5, 3))).shape == (5, 2)


def test_evaluate_gives_the_mean_cross_entropy_and_the_accuracy(rng):
    model = xpnet.MLP([4, 5, 3], dtype="float64", seed=0)
    X, y = rng.normal(size=(7, 4)), np.array([0, 1, 2, 2, 1, 0, 1])
    proba = model.predict_proba(X)
    result = model.evaluate(X, y)
    assert result["loss"] == pytest.approx(-np.mean(np.log(proba[np.arange(7), y])), rel=1e-12)
    assert result["accuracy"] == np.mean(proba.argmax(axis=1) == y)
    assert 0 < result["accuracy"] < 1  # some right, some wrong: a sum would not pass for a mean


def test_a_dropout_model_predicts_deterministically_as_without_dropout(rng, tmp_path):
    from xpnet.layers import Dropout

    X = rng.normal(size=(6, 4))
    model = xpnet.Sequential([Dense(8, activation="relu"), Dropout(0.5), Dense(3)], input_shape=(4,),
                             dtype="float64", seed=0)
    plain = xpnet.Sequential([Dense(8, activation="relu"), Dense(3)], input_shape=(4,), dtype="float64")
    plain.set_weights(model.get_weights())
    np.testing.assert_allclose(model.predict_proba(X), plain.predict_proba(X), rtol=1e-12)
    model.save(tmp_path / "d.safetensors")
    loaded = xpnet.load(tmp_path / "d.safetensors")
    np.testing.assert_allclose(loaded.predict_proba(X), plain.predict_proba(X), rtol=1e-12)


def test_an_unbuilt_model_reads_its_input_shape_from_the_first_fit(rng):
    import array_api_strict as xs

    X, y = rng.normal(size=(12, 4)).astype(np.float32), np.arange(12) % 3
    for data, backend in ((X, None), (X.tolist(), None), (xs.asarray(X), xs)):
        model = xpnet.Sequential([Dense(3)], seed=0, backend=backend)
        model.fit(data, y, epochs=1, verbose=0)
        assert model.input_shape == (4,)


def test_rows_of_another_size_name_the_row_shape_of_a_two_axis_input():
    model = xpnet.Sequential([Flatten(), Dense(3)], input_shape=(2, 3))
    with pytest.raises(ValueError, match="^" + re.escape(
        "X has 5 features per row (shape (2, 5)), but the model expects 6 (rows of shape (2, 3))") + "$"):
        model.predict(np.zeros((2, 5)))


def test_the_first_non_integer_label_is_named():
    model = xpnet.MLP([2, 3])
    with pytest.raises(ValueError, match="^" + re.escape("labels must be integers; y[3] is 1.5") + "$"):
        model.evaluate(np.zeros((5, 2)), np.array([0.0, 1.0, 2.0, 1.5, 2.5]))


def test_a_strict_namespace_model_checks_its_own_arrays_on_the_host():
    import array_api_strict as xs

    model = xpnet.MLP([3, 2], seed=0, backend=xs)
    X = np.zeros((4, 3), np.float32)
    X[2, 1] = np.nan
    with pytest.raises(ValueError, match="^" + re.escape("X contains NaN or inf (first at row 2, column 1: nan)")):
        model.predict(xs.asarray(X))
    model.set_weights([np.ones((3, 2)), np.arange(2)])  # float64 and int64 arrays for a float32 model
    assert [w.dtype for w in model.get_weights()[0]] == [np.float32, np.float32]
    np.testing.assert_allclose(model.predict_proba(np.zeros((1, 3))), [[1 / (1 + np.e), np.e / (1 + np.e)]], rtol=1e-6)


def test_uint8_pixels_give_float_inputs_of_the_model_dtype_and_train_as_scaled_floats(rng):
    pixels = rng.integers(0, 256, size=(40, 6), dtype=np.uint8)
    y = np.arange(40) % 3
    assert xpnet.MLP([6, 3], seed=0).predict_proba(pixels).dtype == np.float32
    from_pixels, from_floats = xpnet.MLP([6, 5, 3], seed=0), xpnet.MLP([6, 5, 3], seed=0)
    from_pixels.fit(pixels, y, epochs=2, batch_size=8, lr=0.1, verbose=0)
    from_floats.fit((pixels / np.float32(255)).astype(np.float32), y, epochs=2, batch_size=8, lr=0.1, verbose=0)
    for (W1, b1), (W2, b2) in zip(from_pixels.get_weights(), from_floats.get_weights()):
        np.testing.assert_allclose(W1, W2, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b1, b2, rtol=1e-5, atol=1e-6)
    assert not np.allclose(from_pixels.get_weights()[0][0], xpnet.MLP([6, 5, 3], seed=0).get_weights()[0][0])


# --- files ---------------------------------------------------------------------------------------


def test_a_loaded_model_runs_on_the_backend_asked_for_with_the_saved_config(tmp_path, rng):
    import array_api_strict as xs

    X = rng.normal(size=(5, 4))
    models = [xpnet.MLP([4, 6, 3], activation="tanh", init="glorot", seed=2),
              xpnet.Sequential([Dense(6, activation="sigmoid", init="glorot"), Dense(3)], input_shape=(4,), seed=3)]
    for i, model in enumerate(models):
        path = tmp_path / f"{i}.safetensors"
        model.save(path)
        loaded = xpnet.load(path, backend=xs)
        assert loaded.backend.name == xpnet.get_backend(xs).name != model.backend.name
        assert loaded.config == model.config
        np.testing.assert_allclose(loaded.predict_proba(X), model.predict_proba(X), rtol=1e-6)


def test_a_saved_file_names_the_xpnet_version_that_wrote_it(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "m.safetensors"
    xpnet.MLP([4, 3]).save(path)
    with safe_open(str(path), "numpy") as f:
        assert f.metadata()["xpnet_version"] == xpnet.__version__


def _mlp_file(path, config, tensors):
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata={"format": "xpnet.mlp", "format_version": "1", "xpnet_version": "0",
                                            "config": json.dumps(config)})


def test_a_config_that_is_not_an_object_is_refused_saying_so(tmp_path):
    path = tmp_path / "list.safetensors"
    _mlp_file(path, [4, 3], {"layers.0.W": np.ones((4, 3), np.float32), "layers.0.b": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match="^" + re.escape(
        f"{path} is not a readable xpnet model file: ValueError: its config is not a JSON object") + "$"):
        xpnet.load(path)


def test_a_config_whose_layers_together_outgrow_the_tensors_is_refused_at_the_first_layer_too_many(tmp_path):
    """Each layer alone fits the file's numbers (plus a little slack), all of them do not."""
    small = xpnet.MLP([100, 100, 10], seed=0)
    tensors = {f"layers.{i}.{name}": a for i, pair in enumerate(small.get_weights()) for name, a in zip("Wb", pair)}
    path = tmp_path / "big.safetensors"
    config = {"layers": [100, 100, 100, 100], "activation": "relu", "init": "he", "dtype": "float32", "seed": 0}
    _mlp_file(path, config, tensors)  # 11,110 numbers for 30,300
    with pytest.raises(ValueError, match=re.escape("its layers need more weights than the file holds "
                                                   "(drawing 10,000 of 2,134 left)")):
        xpnet.load(path)


def test_export_onnx_writes_a_graph_that_gives_predict_proba(tmp_path, rng):
    ort = pytest.importorskip("onnxruntime")
    model = xpnet.MLP([4, 5, 3], seed=0)
    model.export_onnx(tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    X = rng.normal(size=(6, 4)).astype(np.float32)
    (proba,) = session.run(None, {session.get_inputs()[0].name: X})
    np.testing.assert_allclose(proba, model.predict_proba(X), rtol=1e-5, atol=1e-6)
