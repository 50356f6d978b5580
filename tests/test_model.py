"""MLP behaviour: parameters, determinism, weights, inference, optimizers, callbacks."""

from __future__ import annotations

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
    with pytest.raises(ValueError, match=r"weights\[0\] has shape \(3, 4\); layer 0 needs W of shape \(4, 3\)"):
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
    with pytest.raises(TypeError, match="X is a array_api_strict array but this model runs on the 'cpu' backend"):
        model.predict(X)
    with pytest.raises(TypeError, match="X must be array-like, got list: .*inhomogeneous"):
        model.predict([[0.1, 0.2, 0.3, 0.4], [0.5]])
