"""The numbers ``fit``/``evaluate``/``predict`` report, against a NumPy MLP written here.

The reference in this file is independent of xpnet's code: weights come from
``model.get_weights()`` (pairs ``(W, b)``, W shaped (fan_in, fan_out)), hidden layers are ReLU,
the output is linear, the loss is the mean of ``logsumexp(z) - z[y]``, and the gradient of a
mini-batch is back-propagated by hand. Everything is float64.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import re
import threading

import numpy as np
import pytest

import xpnet
from conftest import InterruptAfter
from xpnet.callbacks import Callback, DivergenceWarning, EarlyStopping
from xpnet.optim import StepLR

# --- the independent NumPy MLP ---------------------------------------------------------------------


def np_forward(weights, X):
    """Logits, and the hidden activations for back-propagation."""
    hs = [X]
    for i, (W, b) in enumerate(weights):
        z = hs[-1] @ W + b
        hs.append(np.maximum(z, 0.0) if i < len(weights) - 1 else z)
    return hs[-1], hs


def np_logsumexp(z):
    m = z.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]


def np_loss(weights, X, y):
    z, _ = np_forward(weights, X)
    return float(np.mean(np_logsumexp(z) - z[np.arange(len(y)), y]))


def np_accuracy(weights, X, y):
    z, _ = np_forward(weights, X)
    return float(np.mean(np.argmax(z, axis=1) == y))  # NumPy: the first maximum wins a tie


def np_sgd_step(weights, X, y, lr):
    """One plain SGD step on the mean cross-entropy of the batch ``(X, y)``."""
    z, hs = np_forward(weights, X)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    dz = p
    dz[np.arange(len(y)), y] -= 1.0
    dz /= len(y)
    new = list(weights)
    for i in range(len(weights) - 1, -1, -1):
        W, b = weights[i]
        dW, db = hs[i].T @ dz, dz.sum(axis=0)
        if i > 0:
            dz = (dz @ W.T) * (hs[i] > 0)
        new[i] = (W - lr * dW, b - lr * db)
    return new


def np_sgd_epoch(weights, X, y, lr, batch_size, order):
    for lo in range(0, len(order), batch_size):
        idx = order[lo : lo + batch_size]
        weights = np_sgd_step(weights, X[idx], y[idx], lr)
    return weights


def close(a, b, rtol):
    return all(np.allclose(Wa, Wb, rtol=rtol, atol=0) and np.allclose(ba, bb, rtol=rtol, atol=1e-300)
               for (Wa, ba), (Wb, bb) in zip(a, b))


def assert_weights_close(a, b, rtol):
    for (Wa, ba), (Wb, bb) in zip(a, b):
        np.testing.assert_allclose(Wa, Wb, rtol=rtol, atol=0)
        np.testing.assert_allclose(ba, bb, rtol=rtol, atol=1e-15)


class WeightsPerEpoch(Callback):
    """Snapshots of the model's weights at the end of each epoch."""

    def __init__(self):
        self.snapshots = []

    def on_epoch_end(self, epoch, logs):
        self.snapshots.append(self.model.get_weights())


def integer_weights(rng, widths):
    """Small integer weights: every logit is computed exactly, so exact ties happen."""
    return [(rng.integers(-2, 3, size=(a, b)).astype(np.float64), rng.integers(-1, 2, size=b).astype(np.float64))
            for a, b in zip(widths[:-1], widths[1:])]


# --- (a) evaluate / predict / predict_proba on more than one prediction chunk ---------------------


N_BIG = 8192 * 2 + 17  # three chunks of xpnet's 8192-row inference, the last one short


def test_evaluate_and_predict_match_numpy_over_several_chunks(kernels):
    rng = np.random.default_rng(11)
    X = rng.normal(size=(N_BIG, 20))
    y = rng.integers(0, 5, size=N_BIG)
    model = xpnet.MLP([20, 16, 5], dtype="float64", seed=2)
    weights = [(W, rng.normal(size=b.shape) * 0.3) for W, b in model.get_weights()]
    model.set_weights(weights)
    z, _ = np_forward(weights, X)

    scores = model.evaluate(X, y)
    assert scores["loss"] == pytest.approx(np_loss(weights, X, y), rel=1e-12)
    assert scores["accuracy"] == np_accuracy(weights, X, y)
    # a chunk-wise mean of means would differ: the short last chunk weighs as much as a full one
    chunk_means = [np.mean(np_logsumexp(z[a:b]) - z[np.arange(a, b), y[a:b]]) for a, b in ((0, 8192), (8192, 16384), (16384, N_BIG))]
    assert abs(np.mean(chunk_means) - scores["loss"]) > 1e-6

    labels = model.predict(X)
    assert labels.dtype == np.int64 and labels.shape == (N_BIG,)
    np.testing.assert_array_equal(labels, np.argmax(z, axis=1))

    proba = model.predict_proba(X)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    np.testing.assert_allclose(proba, e / e.sum(axis=1, keepdims=True), rtol=1e-12, atol=1e-300)
    assert model.score(X, y) == scores["accuracy"]


def test_predict_breaks_exact_ties_like_numpy(kernels):
    """Integer weights and inputs give exactly tied logits; the first maximum must win."""
    rng = np.random.default_rng(12)
    widths = [20, 6, 5]
    weights = integer_weights(rng, widths)
    X = rng.integers(-2, 3, size=(N_BIG, 20)).astype(np.float64)
    z, _ = np_forward(weights, X)
    top = z.max(axis=1, keepdims=True)
    tied = (z == top).sum(axis=1) > 1
    assert tied.sum() > 1000  # many exact ties, in every chunk
    last_max = z.shape[1] - 1 - np.argmax(z[:, ::-1], axis=1)
    y = np.where(rng.random(N_BIG) < 0.5, np.argmax(z, axis=1), last_max)  # labels on either side of a tie
    model = xpnet.MLP(widths, dtype="float64", seed=0)
    model.set_weights(weights)
    np.testing.assert_array_equal(model.predict(X), np.argmax(z, axis=1))
    expected = np_accuracy(weights, X, y)
    assert expected != float(np.mean(last_max == y))  # the tie-breaking rule shows in the score
    assert model.evaluate(X, y)["accuracy"] == expected


def test_train_metrics_of_a_one_step_epoch_are_those_of_the_weights_before_the_step(kernels):
    """batch_size >= n and no shuffling: the epoch is one step, and its reported loss and accuracy
    are the loss and accuracy of the weights the step started from (exact ties included)."""
    rng = np.random.default_rng(13)
    widths = [10, 8, 4]
    weights = integer_weights(rng, widths)
    X = rng.integers(-2, 3, size=(300, 10)).astype(np.float64)
    z, _ = np_forward(weights, X)
    last_max = z.shape[1] - 1 - np.argmax(z[:, ::-1], axis=1)
    y = np.where(np.arange(300) % 2 == 0, np.argmax(z, axis=1), last_max)
    y[::7] = rng.integers(0, 4, size=y[::7].shape)
    assert np.mean(last_max == y) != np_accuracy(weights, X, y)

    model = xpnet.MLP(widths, dtype="float64", seed=0)
    model.set_weights(weights)
    history = model.fit(X, y, epochs=1, batch_size=512, lr=0.01, shuffle=False, verbose=0)
    assert history["loss"] == [pytest.approx(np_loss(weights, X, y), rel=1e-12)]
    assert history["accuracy"] == [np_accuracy(weights, X, y)]
    # and the step itself is plain SGD on the mean loss
    assert_weights_close(model.get_weights(), np_sgd_step(weights, X, y, 0.01), rtol=1e-12)


# --- (b) validation_split holds out the last rows --------------------------------------------------


def test_validation_split_holds_out_exactly_the_last_rows(kernels):
    rng = np.random.default_rng(14)
    n, n_val = 40, 10  # validation_split=0.25
    X = rng.normal(size=(n, 6))
    y = rng.integers(0, 3, size=n)
    model = xpnet.MLP([6, 5, 3], dtype="float64", seed=4)
    start = model.get_weights()
    history = model.fit(X, y, epochs=2, batch_size=8, lr=0.2, shuffle=False, validation_split=0.25, verbose=0)
    final = model.get_weights()
    # the val_* metrics are those of the final weights on the last n_val rows...
    assert history["val_loss"][-1] == pytest.approx(np_loss(final, X[-n_val:], y[-n_val:]), rel=1e-12)
    assert history["val_accuracy"][-1] == np_accuracy(final, X[-n_val:], y[-n_val:])
    assert history["val_loss"][-1] != pytest.approx(np_loss(final, X[:n_val], y[:n_val]), rel=1e-6)
    # ... and training saw the first n - n_val rows, in order
    expected = start
    for _ in range(2):
        expected = np_sgd_epoch(expected, X[: n - n_val], y[: n - n_val], 0.2, 8, np.arange(n - n_val))
    assert_weights_close(final, expected, rtol=1e-10)


def test_validation_split_with_uint8_images_is_scaled_like_the_training_rows(kernels):
    """uint8 images are scaled by 1/255 for validation too (the fused step keeps them as uint8)."""
    rng = np.random.default_rng(15)
    X = rng.integers(0, 256, size=(50, 12), dtype=np.uint8)
    y = rng.integers(0, 3, size=50)
    model = xpnet.MLP([12, 7, 3], dtype="float64", seed=5)
    history = model.fit(X, y, epochs=1, batch_size=16, lr=0.1, validation_split=0.2, verbose=0)
    final = model.get_weights()
    Xf = X.astype(np.float64) / 255.0
    assert history["val_loss"][0] == pytest.approx(np_loss(final, Xf[-10:], y[-10:]), rel=1e-12)


# --- (c) shuffling -------------------------------------------------------------------------------


N_PERM = 6  # 720 orders: few enough to try them all


def recover_order(before, after, X, y, lr):
    """The order in which one epoch of batch-1 SGD visited the rows, found by trying every order.

    Exactly one order must reproduce ``after`` from ``before`` (the orders give results far apart)."""
    found = [order for order in itertools.permutations(range(N_PERM))
             if close(np_sgd_epoch(before, X, y, lr, 1, list(order)), after, rtol=1e-9)]
    assert len(found) == 1, f"{len(found)} orders reproduce the epoch"
    return found[0]


def orders_of_a_run(seed, shuffle, epochs=2):
    rng = np.random.default_rng(16)
    X = rng.normal(size=(N_PERM, 3))
    y = np.array([0, 1, 2, 0, 1, 2])
    model = xpnet.MLP([3, 4, 3], dtype="float64", seed=seed)
    start = model.get_weights()
    snapshots = WeightsPerEpoch()
    model.fit(X, y, epochs=epochs, batch_size=1, lr=0.5, shuffle=shuffle, callbacks=[snapshots], verbose=0)
    befores = [start] + snapshots.snapshots[:-1]
    return [recover_order(b, a, X, y, 0.5) for b, a in zip(befores, snapshots.snapshots)]


def test_without_shuffle_every_epoch_goes_in_order(kernels):
    assert orders_of_a_run(seed=3, shuffle=False) == [tuple(range(N_PERM))] * 2


def test_shuffle_draws_a_new_order_each_epoch_reproducibly(kernels):
    first, second = orders_of_a_run(seed=3, shuffle=True)
    assert first != second
    assert tuple(range(N_PERM)) not in (first, second)
    assert orders_of_a_run(seed=3, shuffle=True) == [first, second]  # the seed reproduces them
    assert orders_of_a_run(seed=9, shuffle=True) != [first, second]


# --- (d) the fast path against the reference, for every optimizer and schedule ----------------------


OPTIMIZERS = {
    "sgd": dict(lr=0.1),
    "momentum": dict(lr=0.05, momentum=0.9),
    "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True),
    "adam": dict(optimizer="adam", lr=0.01),
}
SCHEDULES = {"constant": None, "cosine": "cosine", "step": StepLR(1, gamma=0.5)}


def _trained_weights(monkeypatch, kernels, X, y, **settings):
    if kernels == "xp":
        monkeypatch.setenv("XPNET_KERNELS", "xp")
    else:
        monkeypatch.delenv("XPNET_KERNELS", raising=False)
    model = xpnet.MLP([12, 16, 4], dtype="float64", seed=6)
    history = model.fit(X, y, epochs=2, batch_size=32, validation_split=0.2, shuffle=True, verbose=0, **settings)
    return model.get_weights(), history


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_fast_path_matches_the_reference(monkeypatch, optimizer, weight_decay, schedule):
    pytest.importorskip("numba")
    rng = np.random.default_rng(17)
    X = rng.normal(size=(200, 12))
    y = rng.integers(0, 4, size=200)
    settings = dict(OPTIMIZERS[optimizer], weight_decay=weight_decay, schedule=SCHEDULES[schedule])
    fast, fast_history = _trained_weights(monkeypatch, "fast", X, y, **settings)
    ref, ref_history = _trained_weights(monkeypatch, "xp", X, y, **settings)
    assert_weights_close(fast, ref, rtol=1e-10)
    for key in ("loss", "val_loss"):
        assert fast_history[key] == pytest.approx(ref_history[key], rel=1e-10)
    assert fast_history["accuracy"] == ref_history["accuracy"]


# --- (e) a run stopped early ----------------------------------------------------------------------


def test_a_run_stopped_early_reports_and_records_it(tmp_path, kernels):
    """``lr`` is constant, so monitored with mode='max' it stops improving after epoch 0:
    EarlyStopping(patience=2) stops the run at epoch 2 of 10, deterministically."""
    rng = np.random.default_rng(18)
    X = rng.normal(size=(60, 6))
    y = rng.integers(0, 3, size=60)
    model = xpnet.MLP([6, 5, 3], dtype="float64", seed=7)
    snapshots = WeightsPerEpoch()
    stopper = EarlyStopping("lr", mode="max", patience=2, restore_best_weights=True)
    run = tmp_path / "run"
    history = model.fit(X, y, epochs=10, batch_size=16, lr=0.1, callbacks=[stopper, snapshots], verbose=0, run_dir=run)

    assert history.epoch == [0, 1, 2] and len(history["loss"]) == 3
    assert model.stop_training is True
    assert stopper.best_epoch == 0 and stopper.stopped_epoch == 2
    # the model ends with the best epoch's weights, which differ from the last epoch's
    assert_weights_close(model.get_weights(), snapshots.snapshots[0], rtol=0)
    assert not close(snapshots.snapshots[0], snapshots.snapshots[2], rtol=1e-6)

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1, 2]
    assert [m["loss"] for m in metrics] == history["loss"]
    assert [m["accuracy"] for m in metrics] == history["accuracy"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "stopped early" and summary["epochs_run"] == 3
    config = json.loads((run / "config.json").read_text())
    assert config["fit"]["epochs"] == 10 and config["fit"]["n_train"] == 60
    # the model file holds the model after the last finished epoch (runs.py: "the last line of
    # metrics.jsonl always describes the model file beside it"), not the restored best weights
    saved = xpnet.load(run / "model.safetensors").get_weights()
    assert_weights_close(saved, snapshots.snapshots[2], rtol=0)


def test_a_completed_run_is_recorded_as_completed(tmp_path):
    rng = np.random.default_rng(19)
    X = rng.normal(size=(30, 4))
    y = rng.integers(0, 2, size=30)
    model = xpnet.MLP([4, 2], dtype="float64", seed=0)
    history = model.fit(X, y, epochs=2, batch_size=10, verbose=0, run_dir=tmp_path / "r")
    assert model.stop_training is False and history.epoch == [0, 1]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_run"] == 2
    assert math.isclose(history["loss"][-1], json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])["loss"])


def test_a_run_folder_describes_the_model_file_it_holds(tmp_path):
    from xpnet.runs import RunRecorder

    rng = np.random.default_rng(20)
    X = rng.normal(size=(300, 6))
    y = (X[:, 0] > 0).astype(int) + (X[:, 1] > 0)
    model = xpnet.MLP([6, 8, 3], dtype="float64", seed=0)
    stopper = EarlyStopping("lr", mode="max", patience=3)  # best epoch 0, stops at epoch 3
    recorder = RunRecorder(tmp_path / "run", eval_data=(X, y), plots=False)
    model.fit(X, y, epochs=10, batch_size=16, lr=0.2, callbacks=[stopper, recorder], verbose=0)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    saved = xpnet.load(tmp_path / "run" / "model.safetensors")
    assert summary["eval_accuracy"] == saved.score(X, y)


# --- training that goes wrong ------------------------------------------------------------------


class EndLogs(Callback):
    """Keeps what ``on_train_end`` was told and the weights after each epoch."""

    def __init__(self):
        self.end, self.weights = None, []

    def on_epoch_end(self, epoch, logs):
        self.weights.append(self.model.get_weights())

    def on_train_end(self, logs):
        self.end = dict(logs)


def separable(rng, n=400, features=12, classes=4):
    centers = rng.normal(size=(classes, features)) * 3
    y = rng.integers(0, classes, size=n)
    return (centers[y] + rng.normal(size=(n, features))).astype(np.float32), y


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("kernels", ["auto", "xp"])
def test_a_non_finite_loss_restores_the_last_finished_epoch_and_stops(rng, monkeypatch, kernels):
    monkeypatch.setenv("XPNET_KERNELS", kernels)
    X, y = separable(rng)
    model, seen = xpnet.MLP([12, 64, 4], seed=0), EndLogs()

    # a sane first epoch, then a rate no float survives
    with pytest.warns(DivergenceWarning, match=r"the loss became nan in epoch 2.*weights of epoch 1 were restored"):
        history = model.fit(X, y, epochs=5, lr=0.05, verbose=0, callbacks=[seen],
                            schedule=lambda epoch, epochs: 1.0 if epoch == 0 else 1e30)
    assert history.epoch == [0] and history.diverged
    assert len(history.warnings) == 1 and seen.end["diverged"] and seen.end["warnings"] == history.warnings
    for (W, b), (W1, b1) in zip(model.get_weights(), seen.weights[0]):
        assert np.array_equal(W, W1) and np.array_equal(b, b1)  # exactly epoch 1's weights
    assert model.score(X, y) > 0.5


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
def test_a_diverging_run_is_reported_in_history_and_run_end(rng):
    X, y = separable(rng)
    seen = EndLogs()
    with pytest.warns(DivergenceWarning, match="at epoch 4, loss .* above the first epoch's"):
        history = xpnet.MLP([12, 32, 4], seed=0).fit(X, y, epochs=4, lr=3.0, verbose=0, callbacks=[seen])
    assert history.epoch == [0, 1, 2, 3]  # warned, not stopped
    assert len(history.warnings) == 1 and not history.diverged
    assert seen.end["warnings"] == history.warnings and seen.end["diverged"] is False


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
def test_on_divergence_stop_ends_training(rng):
    X, y = separable(rng)
    with pytest.warns(DivergenceWarning, match="training stopped"):
        history = xpnet.MLP([12, 32, 4], seed=0).fit(X, y, epochs=8, lr=3.0, verbose=0, on_divergence="stop")
    assert len(history.epoch) == 4 and history.diverged  # the first epoch, then three worse than it


def test_a_healthy_run_gives_no_divergence_warning(rng, recwarn):
    X, y = separable(rng)
    history = xpnet.MLP([12, 32, 4], seed=0).fit(X, y, epochs=4, lr=0.05, verbose=0)
    assert history.warnings == [] and not history.diverged
    assert not [w for w in recwarn if issubclass(w.category, DivergenceWarning)]


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
def test_on_divergence_ignore_says_nothing(rng, recwarn):
    X, y = separable(rng)
    history = xpnet.MLP([12, 32, 4], seed=0).fit(X, y, epochs=4, lr=3.0, verbose=0, on_divergence="ignore")
    assert history.warnings == [] and len(history.epoch) == 4
    assert not [w for w in recwarn if issubclass(w.category, DivergenceWarning)]


def test_on_divergence_is_checked(rng):
    X, y = separable(rng, n=20)
    with pytest.raises(ValueError, match="on_divergence must be one of .* got 'panic'"):
        xpnet.MLP([12, 4]).fit(X, y, epochs=1, verbose=0, on_divergence="panic")


def test_the_chance_level_is_the_most_common_class(rng):
    X, y = separable(rng, n=40)
    y = np.array([2] * 30 + [0] * 6 + [1] * 4)
    history = xpnet.MLP([12, 4], seed=0).fit(X, y, epochs=0, verbose=0)
    assert history.params["chance_accuracy"] == 0.75


def test_a_batch_larger_than_the_data_is_the_whole_data_in_one_batch(rng):
    """The CPU step's buffers are sized by min(batch_size, rows): 10**7 on 200 rows must not ask
    for gigabytes, and trains exactly as one batch of all 200 rows."""
    import tracemalloc

    X, y = separable(rng, n=200)
    one_batch = xpnet.MLP([12, 32, 4], seed=0)
    one_batch.fit(X, y, epochs=2, batch_size=200, lr=0.1, verbose=0)
    huge = xpnet.MLP([12, 32, 4], seed=0)
    tracemalloc.start()
    try:
        huge.fit(X, y, epochs=2, batch_size=10**7, lr=0.1, verbose=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, f"fit allocated {peak / 2**20:.0f} MiB for 200 rows"
    for (W, b), (W1, b1) in zip(huge.get_weights(), one_batch.get_weights()):
        assert np.array_equal(W, W1) and np.array_equal(b, b1)


def test_a_callback_that_fails_to_start_ends_the_ones_that_started(rng, tmp_path):
    from xpnet.runs import RunRecorder, is_running, read_run

    X, y = separable(rng, n=40)
    seen = EndLogs()

    class Refuses(Callback):
        ended = False

        def on_train_begin(self, logs):
            raise RuntimeError("no")

        def on_train_end(self, logs):
            self.ended = True

    refuses = Refuses()
    with pytest.raises(RuntimeError, match="no"):
        xpnet.MLP([12, 4], seed=0).fit(X, y, epochs=2, verbose=0,
                                       callbacks=[seen, RunRecorder(tmp_path / "run"), refuses])
    assert seen.end == {"epochs_run": 0, "warnings": [], "diverged": False}
    assert not refuses.ended  # never started, so never ended
    assert not is_running(tmp_path / "run")  # the recorder started, was ended, and let the folder go
    assert read_run(tmp_path / "run")["status"] != "running"


# --- starting from a later epoch, and the generators a run draws from ------------------------------


def test_initial_epoch_runs_the_remaining_epochs_at_their_scheduled_rates(rng):
    from xpnet.optim import CosineLR

    X, y = separable(rng)
    history = xpnet.MLP([12, 8, 4], seed=0).fit(X, y, epochs=4, initial_epoch=2, lr=0.1, schedule="cosine", verbose=0)
    assert history.epoch == [2, 3]
    assert history["lr"] == [0.1 * CosineLR()(2, 4), 0.1 * CosineLR()(3, 4)]
    assert xpnet.MLP([12, 8, 4]).fit(X, y, epochs=3, initial_epoch=3, verbose=0).epoch == []
    with pytest.raises(ValueError, match=r"initial_epoch must be <= epochs \(3\), got 4"):
        xpnet.MLP([12, 8, 4]).fit(X, y, epochs=3, initial_epoch=4)
    with pytest.raises(ValueError, match="^resume=True continues the run recorded in run_dir: give run_dir$"):
        xpnet.MLP([12, 8, 4]).fit(X, y, resume=True)


def test_rng_states_name_the_shuffling_and_each_dropout_generator_and_put_them_back():
    from xpnet.layers import Dense, Dropout
    from xpnet.training import rng_states, set_rng_states

    model = xpnet.Sequential([Dense(8, activation="relu"), Dropout(0.5), Dense(3)], input_shape=(5,), seed=0)
    states = json.loads(json.dumps(rng_states(model)))  # JSON-able: a checkpoint keeps them as text
    assert set(states) == {"model", "layers.1"}
    draws = model._rng.permutation(10), model.layers[1]._rng.random(4)
    set_rng_states(model, states)
    assert np.array_equal(model._rng.permutation(10), draws[0])
    assert np.array_equal(model.layers[1]._rng.random(4), draws[1])
    with pytest.raises(ValueError, match=r"random states for \['model'\] do not match"):
        set_rng_states(model, {"model": states["model"]})


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_a_non_finite_first_epoch_restores_the_starting_weights(rng):
    X, y = separable(rng)
    model = xpnet.MLP([12, 64, 4], seed=0)
    start = model.get_weights()
    with pytest.warns(DivergenceWarning, match="in epoch 1; .* the weights it started with were restored"):
        history = model.fit(X, y, epochs=3, lr=1e30, verbose=0)
    assert history.epoch == [] and history.diverged
    for (W, b), (W0, b0) in zip(model.get_weights(), start):
        assert np.array_equal(W, W0) and np.array_equal(b, b0)


# --- the arguments fit checks, and what it reports ---------------------------------------------------


def small_problem(rng, n=40, features=5, classes=3):
    X = rng.normal(size=(n, features))
    return X, rng.integers(0, classes, size=n)


@pytest.mark.parametrize("name,value,error,message", [
    ("epochs", 1.5, TypeError, "epochs must be an integer, got 1.5"),
    ("epochs", True, TypeError, "epochs must be an integer, got True"),
    ("epochs", "3", TypeError, "epochs must be an integer, got '3'"),
    ("epochs", -1, ValueError, "epochs must be >= 0, got -1"),
    ("initial_epoch", -1, ValueError, "initial_epoch must be >= 0, got -1"),
    ("initial_epoch", 0.0, TypeError, "initial_epoch must be an integer, got 0.0"),
    ("batch_size", 0, ValueError, "batch_size must be >= 1, got 0"),
    ("batch_size", False, TypeError, "batch_size must be an integer, got False"),
])
def test_counts_must_be_integers_in_range(rng, name, value, error, message):
    X, y = small_problem(rng)
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        xpnet.MLP([5, 3]).fit(X, y, verbose=0, **{name: value})


def test_numpy_integers_are_accepted_as_counts(rng):
    X, y = small_problem(rng)
    history = xpnet.MLP([5, 3], seed=0).fit(X, y, epochs=np.int64(1), batch_size=np.int32(1), verbose=0)
    assert history.epoch == [0] and history.params["epochs"] == 1 and history.params["batch_size"] == 1
    # zero epochs are allowed: nothing runs
    assert xpnet.MLP([5, 3], seed=0).fit(X, y, epochs=0, verbose=0).epoch == []


def test_the_run_settings_are_reported_to_the_callbacks(rng):
    X, y = small_problem(rng, n=40)
    y[:] = [0] * 18 + [1] * 12 + [2] * 10  # the validation split keeps the first 30: chance 18/30
    history = xpnet.MLP([5, 3], seed=0).fit(X, y, epochs=2, batch_size=7, lr=0.3, weight_decay=0.01,
                                            validation_split=0.25, shuffle=0, verbose=0)
    params = history.params
    assert params["epochs"] == 2 and params["batch_size"] == 7
    assert params["lr"] == 0.3 and params["weight_decay"] == 0.01
    assert params["schedule"] == "constant" and params["shuffle"] is False
    assert params["n_train"] == 30 and params["n_val"] == 10
    assert params["chance_accuracy"] == 0.6
    assert params["optimizer"].startswith("SGD(")
    assert "ranks" not in params
    history = xpnet.MLP([5, 3], seed=0).fit(X, y, epochs=1, optimizer="adam", schedule="cosine", verbose=0)
    assert history.params["schedule"] != "constant" and "Cosine" in history.params["schedule"]
    assert history.params["shuffle"] is True and history.params["n_val"] == 0 and history.params["n_train"] == 40
    assert history.params["optimizer"].startswith("Adam(") and history.params["lr"] == 1e-3


def test_each_epoch_logs_its_seconds_and_learning_rate(rng):
    X, y = small_problem(rng)
    history = xpnet.MLP([5, 3], seed=0).fit(X, y, epochs=3, lr=0.2, schedule=StepLR(1, gamma=0.5), verbose=0,
                                            on_divergence="ignore")
    assert history["lr"] == [0.2, 0.1, 0.05]
    assert len(history["seconds"]) == 3 and all(0 < s < 60 for s in history["seconds"])
    assert set(history.history) == {"loss", "accuracy", "seconds", "lr"}


def test_verbose_prints_one_line_of_metrics_per_epoch_to_stderr(rng, capsys):
    X, y = small_problem(rng)
    history = xpnet.MLP([5, 3], seed=0).fit(X, y, epochs=2, batch_size=8, validation_split=0.25, verbose=1)
    out, err = capsys.readouterr()
    assert out == ""
    # a progress bar per epoch, of its 4 batches, erased when the epoch ends: then the line of metrics
    assert "epoch 1/2:   0%|" in err and "epoch 2/2:   0%|" in err and "| 0/4 [" in err and "batch/s]" in err
    lines = [line.split("\r")[-1] for line in err.split("\n") if line.strip()]
    assert len(lines) == 2
    for epoch, line in enumerate(lines):
        assert re.fullmatch(
            rf"epoch {epoch + 1}/2 - \d+\.\d\ds - loss: {history['loss'][epoch]:.4f} - accuracy: "
            rf"{history['accuracy'][epoch]:.4f} - val_loss: {history['val_loss'][epoch]:.4f} - val_accuracy: "
            rf"{history['val_accuracy'][epoch]:.4f}", line), line
    xpnet.MLP([5, 3], seed=0).fit(X, y, epochs=2, verbose=0)
    assert capsys.readouterr() == ("", "")


def test_callbacks_must_be_callback_objects(rng):
    X, y = small_problem(rng)
    with pytest.raises(TypeError, match="callbacks must be xpnet.callbacks.Callback objects, got 'print'"):
        xpnet.MLP([5, 3]).fit(X, y, verbose=0, callbacks=["print"])


# --- validation data -----------------------------------------------------------------------------


def test_validation_data_is_scored_with_each_epochs_final_weights(rng):
    X, y = small_problem(rng)
    Xv, yv = small_problem(rng, n=13)
    model = xpnet.MLP([5, 4, 3], dtype="float64", seed=1)
    snapshots = WeightsPerEpoch()
    history = model.fit(X, y, epochs=2, batch_size=8, lr=0.3, validation_data=[Xv, yv], callbacks=[snapshots],
                        verbose=0)
    for epoch, weights in enumerate(snapshots.snapshots):
        assert history["val_loss"][epoch] == pytest.approx(np_loss(weights, Xv, yv), rel=1e-12)
        assert history["val_accuracy"][epoch] == np_accuracy(weights, Xv, yv)
    assert history.params["n_val"] == 13 and history.params["n_train"] == 40


@pytest.mark.parametrize("settings,error,message", [
    (dict(validation_data=None, validation_split=1.0), ValueError,
     "validation_split must be a fraction in [0, 1), got 1.0"),
    (dict(validation_split=-0.1), ValueError, "validation_split must be a fraction in [0, 1), got -0.1"),
    (dict(validation_split=True), ValueError, "validation_split must be a fraction in [0, 1), got True"),
    (dict(validation_split="0.2"), ValueError, "validation_split must be a fraction in [0, 1), got '0.2'"),
    (dict(validation_split=0.01), ValueError, "validation_split=0.01 leaves no data on one side of 40 rows"),
    (dict(validation_split=0.99), ValueError, "validation_split=0.99 leaves no data on one side of 40 rows"),
    (dict(validation_data="val"), TypeError, "validation_data must be a pair (X_val, y_val)"),
    (dict(validation_data=(1, 2, 3)), TypeError, "validation_data must be a pair (X_val, y_val)"),
])
def test_validation_settings_are_checked(rng, settings, error, message):
    X, y = small_problem(rng)
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        xpnet.MLP([5, 3]).fit(X, y, verbose=0, **settings)


def test_validation_data_and_split_cannot_both_be_given(rng):
    X, y = small_problem(rng)
    with pytest.raises(ValueError, match="^give validation_data or validation_split, not both$"):
        xpnet.MLP([5, 3]).fit(X, y, verbose=0, validation_data=(X, y), validation_split=0.2)
    # a split of 0 is no split: validation_data alone
    history = xpnet.MLP([5, 3], seed=0).fit(X, y, epochs=1, verbose=0, validation_data=(X, y), validation_split=0)
    assert history.params["n_val"] == 40


def test_the_smallest_and_largest_splits_leave_a_row_on_each_side(rng):
    X, y = small_problem(rng, n=10)
    assert xpnet.MLP([5, 3]).fit(X, y, epochs=1, validation_split=0.06, verbose=0).params["n_val"] == 1  # 0.6 rows
    assert xpnet.MLP([5, 3]).fit(X, y, epochs=1, validation_split=0.9, verbose=0).params["n_val"] == 9
    assert xpnet.MLP([5, 3]).fit(X, y, epochs=1, validation_split=0.94, verbose=0).params["n_val"] == 9


# --- which step trains a model -------------------------------------------------------------------


def test_relu_mlp_is_exactly_dense_layers_with_relu_hidden_and_a_linear_output():
    from xpnet.layers import Dense, Dropout, Flatten, RandomShift
    from xpnet.training import relu_mlp

    class MyDense(Dense):
        pass

    assert relu_mlp([Dense(4, activation="relu"), Dense(3)])
    assert relu_mlp([Dense(3)])
    assert not relu_mlp([])
    assert not relu_mlp([Dense(4, activation="relu"), Dropout(0.5), Dense(3)])
    assert not relu_mlp([RandomShift(1), Flatten(), Dense(4, activation="relu"), Dense(3)])
    assert not relu_mlp([MyDense(4, activation="relu"), Dense(3)])
    assert not relu_mlp([Dense(4, activation="relu"), MyDense(3)])
    assert not relu_mlp([Dense(4, activation="tanh"), Dense(3)])
    assert not relu_mlp([Dense(4, activation="relu"), Dense(3, activation="relu")])


def test_training_step_for_covers_numpy_relu_mlps_only(monkeypatch):
    pytest.importorskip("numba")
    from xpnet.layers import Dense, Dropout, Flatten, RandomShift
    from xpnet.training import training_step_for

    monkeypatch.delenv("XPNET_KERNELS", raising=False)
    for dtype in ("float32", "float64"):
        model = xpnet.MLP([6, 5, 3], dtype=dtype, seed=0)
        assert training_step_for(model.layers, 16) is not None
    dropout = xpnet.Sequential([Dense(5, activation="relu"), Dropout(0.5), Dense(3)], input_shape=(6,), seed=0)
    assert training_step_for(dropout.layers, 16) is None
    shifted = xpnet.Sequential([RandomShift(1), Flatten(), Dense(5, activation="relu"), Dense(3)], input_shape=(3, 2, 1),
                               seed=0)
    assert training_step_for(shifted.layers, 16) is None
    model = xpnet.MLP([6, 5, 3], dtype="float64", seed=0)
    model.layers[1].b = model.layers[1].b.astype(np.float32)  # parameters of mixed dtypes
    assert training_step_for(model.layers, 16) is None
    model = xpnet.MLP([6, 5, 3], dtype="float64", seed=0)
    model.layers[0].W = np.asfortranarray(model.layers[0].W).view(np.matrix)  # not a plain ndarray
    assert training_step_for(model.layers, 16) is None
    monkeypatch.setenv("XPNET_KERNELS", "xp")
    assert training_step_for(xpnet.MLP([6, 5, 3], seed=0).layers, 16) is None


def test_training_step_for_leaves_other_dtypes_to_the_reference(rng):
    pytest.importorskip("numba")
    from xpnet.training import training_step_for

    model = xpnet.MLP([5, 4, 3], seed=0)
    for layer in model.layers:
        layer.W, layer.b = layer.W.astype(np.float16), layer.b.astype(np.float16)
    assert training_step_for(model.layers, 8) is None


# --- data-parallel training, its ranks played by threads -------------------------------------------
# (tests/test_distributed.py runs real ``mpiexec -n 2`` jobs; here the ranks are threads of this
# process, joined by a Communicator of barriers (conftest.ThreadRanks, the ``thread_ranks``
# fixture), so that fit's side of it runs where it is measured)


@pytest.mark.parametrize("n,batch_size,shuffle", [(41, 8, True), (33, 16, False), (17, 32, True), (9, 2, True)])
def test_two_ranks_train_as_one_process_with_the_global_batch(thread_ranks, n, batch_size, shuffle):
    """Seeded differently, the ranks start from rank 0's weights and follow rank 0's shuffle; each
    global batch's gradient is summed from the ranks' shares (33 rows in 16s: a last batch of 1
    row, which rank 1 takes part in with no rows), so both end with the weights of one process."""
    rng = np.random.default_rng(21)
    X, y = small_problem(rng, n=n)
    Xv, yv = small_problem(rng, n=9)
    settings = dict(epochs=2, batch_size=batch_size, optimizer="adam", lr=0.05, shuffle=shuffle,
                    validation_data=(Xv, yv), verbose=0)

    def train(rank):
        model = xpnet.MLP([5, 6, 3], dtype="float64", seed=10 + rank)
        return model.fit(X, y, distributed=True, **settings), model.get_weights()

    results, errors = thread_ranks.run(train)
    assert errors == [None, None] and thread_ranks.aborted == []
    alone = xpnet.MLP([5, 6, 3], dtype="float64", seed=10)
    history = alone.fit(X, y, distributed=False, **settings)
    for rank_history, weights in results:
        assert_weights_close(weights, alone.get_weights(), rtol=1e-9)
        assert rank_history["loss"] == pytest.approx(history["loss"], rel=1e-12)
        assert rank_history["accuracy"] == history["accuracy"]
        assert rank_history["val_loss"] == pytest.approx(history["val_loss"], rel=1e-9)
        assert rank_history.params["ranks"] == 2 and rank_history.params["n_train"] == n


def test_rank_0_alone_prints_and_records(thread_ranks, tmp_path, capsys):
    rng = np.random.default_rng(22)
    X, y = small_problem(rng)

    def train(rank):  # each rank with a folder of its own, as on nodes of their own
        return xpnet.MLP([5, 3], seed=rank).fit(X, y, epochs=2, batch_size=8, verbose=1, distributed=True,
                                                 run_dir=tmp_path / f"node{rank}" / "run")

    (history, _), errors = thread_ranks.run(train)
    assert errors == [None, None]
    assert (tmp_path / "node0" / "run").is_dir() and not (tmp_path / "node1").exists()
    err = capsys.readouterr().err
    assert len(re.findall(r"epoch 1/2 - \S+s - loss", err)) == 1
    assert len(re.findall(r"epoch 2/2 - \S+s - loss", err)) == 1
    run = tmp_path / "node0" / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in metrics] == history["loss"]
    assert json.loads((run / "config.json").read_text())["fit"]["ranks"] == 2


def test_a_distributed_run_interrupted_then_resumed_ends_as_the_uninterrupted_one(thread_ranks, tmp_path):
    """Rank 0 reads the checkpoint (each rank has a folder of its own, as on nodes of their own);
    rank 1, seeded differently and with a fresh optimizer, takes rank 0's weights, epoch and Adam
    state, so both end bit for bit where the uninterrupted run did."""
    rng = np.random.default_rng(24)
    X, y = small_problem(rng, n=41)
    settings = dict(epochs=4, batch_size=8, optimizer="adam", lr=0.05, verbose=0, distributed=True,
                    on_divergence="ignore")  # random labels

    def train(name, cut=None, resume=False):
        def on_rank(rank):
            model = xpnet.MLP([5, 6, 3], dtype="float64", seed=10 + rank)
            after = [InterruptAfter(cut)] if cut is not None and rank == 0 else []
            history = model.fit(X, y, run_dir=tmp_path / f"node{rank}" / name, callbacks=after, resume=resume,
                                **settings)
            return history.epoch, model.get_weights()
        return on_rank

    whole, errors = thread_ranks.run(train("whole"))
    assert errors == [None, None]
    # rank 0 interrupted at the end of epoch 2 (before its recorder saves it): its abort ends
    # the job, breaking rank 1 out of the next collective call
    _, errors = thread_ranks.run(train("cut", cut=2))
    assert [type(e) for e in errors] == [KeyboardInterrupt, threading.BrokenBarrierError]
    assert sorted(thread_ranks.aborted) == [(0, "KeyboardInterrupt"), (1, "BrokenBarrierError")]
    thread_ranks.aborted.clear()
    resumed, errors = thread_ranks.run(train("cut", resume=True))
    assert errors == [None, None] and thread_ranks.aborted == []
    for (epochs, weights), (_, whole_weights) in zip(resumed, whole):
        assert epochs == [2, 3]
        for (W, b), (Ww, bw) in zip(weights, whole_weights):
            np.testing.assert_array_equal(W, Ww)
            np.testing.assert_array_equal(b, bw)
    run = tmp_path / "node0" / "cut"
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]
    assert not (tmp_path / "node1").exists()


def test_every_rank_resumes_with_rank_0s_callback_state(thread_ranks, tmp_path):
    """An EarlyStopping on each rank (as the same script gives every rank): rank 0 reads its
    state from the checkpoint (best epoch 9, cut during epoch 10) and hands it to rank 1, so both
    stop at epoch 11 with epoch 9's weights; rank 1 deciding alone would train on past rank 0."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(160, 12))
    y = (X[:, 0] > 0).astype(int) + (X[:, 1] > 0)
    Xv = rng.normal(size=(60, 12))
    settings = dict(epochs=30, batch_size=16, optimizer="sgd", lr=0.05, momentum=0.9, verbose=0, distributed=True,
                    validation_data=(Xv, (Xv[:, 0] > 0).astype(int) + (Xv[:, 1] > 0)))

    def train(name, cut=None, resume=False):
        def on_rank(rank):
            stopper = EarlyStopping("val_loss", patience=2)
            model = xpnet.MLP([12, 16, 3], dtype="float64", seed=rank)
            after = [InterruptAfter(cut)] if cut is not None and rank == 0 else []
            history = model.fit(X, y, run_dir=tmp_path / f"node{rank}" / name, callbacks=[stopper, *after],
                                resume=resume, **settings)
            return history.epoch, (stopper.best_epoch, stopper.stopped_epoch), model.get_weights()
        return on_rank

    whole, errors = thread_ranks.run(train("whole"))
    assert errors == [None, None] and whole[0][:2] == (list(range(12)), (9, 11))
    _, errors = thread_ranks.run(train("cut", cut=10))  # rank 0, before its recorder: epoch 9 saved
    assert [type(e) for e in errors] == [KeyboardInterrupt, threading.BrokenBarrierError]
    thread_ranks.aborted.clear()
    resumed, errors = thread_ranks.run(train("cut", resume=True))
    assert errors == [None, None]
    for (epochs, stopper, weights), (_, _, whole_weights) in zip(resumed, whole):
        assert epochs == [10, 11] and stopper == (9, 11)
        for (W, b), (Ww, bw) in zip(weights, whole_weights):
            np.testing.assert_array_equal(W, Ww)
            np.testing.assert_array_equal(b, bw)


def test_a_distributed_run_that_draws_masks_on_every_rank_is_not_resumed(monkeypatch, tmp_path):
    from xpnet import distributed
    from xpnet.layers import Dense, Dropout

    comm = OneOfTwoRanks()
    monkeypatch.setattr(distributed, "communicator", lambda backend_name: comm)
    X, y = small_problem(np.random.default_rng(25))
    model = xpnet.Sequential([Dense(4, activation="relu"), Dropout(0.2), Dense(4), Dropout(0.1), Dense(3)],
                             input_shape=(5,))
    message = ("a distributed run of a model with Dropout (layer 1), Dropout (layer 3) cannot be resumed: each "
               "rank draws its own masks, and the checkpoint holds only rank 0's generators")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        model.fit(X, y, verbose=0, distributed=True, run_dir=tmp_path / "run", resume=True)
    assert comm.aborted == [f"ValueError: {message}"]
    assert not (tmp_path / "run").exists()  # refused before the run was touched


def test_ranks_with_other_callbacks_are_refused_by_name(thread_ranks):
    """Rank 0 hands its callbacks' state to the others: a rank without rank 0's stateful
    callbacks is told which differ (and the job ends), never handed state that is not its own."""
    rng = np.random.default_rng(26)
    X, y = small_problem(rng)

    def train(rank):
        callbacks = [EarlyStopping("loss", patience=3)] if rank == 0 else []
        return xpnet.MLP([5, 3], seed=0).fit(X, y, epochs=2, batch_size=8, verbose=0, distributed=True,
                                             callbacks=callbacks)

    _, errors = thread_ranks.run(train)
    message = ("rank 1 trains with the callbacks ['DivergenceMonitor'] (those keeping state), rank 0 with "
               "['DivergenceMonitor', 'EarlyStopping']: give every rank the same")
    assert isinstance(errors[1], ValueError) and str(errors[1]) == message
    assert (1, f"ValueError: {message}") in thread_ranks.aborted


def test_a_failing_rank_ends_every_rank_saying_why(thread_ranks):
    rng = np.random.default_rng(23)
    X, y = small_problem(rng)

    class FailsOnRank1(Callback):
        def on_epoch_end(self, epoch, logs):
            if thread_ranks.local.comm.rank == 1:
                raise RuntimeError("a planted failure")

    def train(rank):
        return xpnet.MLP([5, 3], seed=0).fit(X, y, epochs=3, batch_size=8, verbose=0, distributed=True,
                                             callbacks=[FailsOnRank1()])

    _, errors = thread_ranks.run(train)
    assert isinstance(errors[1], RuntimeError) and str(errors[1]) == "a planted failure"
    assert isinstance(errors[0], threading.BrokenBarrierError)  # rank 0 no longer waits for rank 1
    assert thread_ranks.aborted[0] == (1, "RuntimeError: a planted failure")


class OneOfTwoRanks:
    """Rank 0 of two that never reaches a collective call (fit refuses first)."""

    rank, size = 0, 2

    def __init__(self):
        self.aborted = []

    def abort(self, message):
        self.aborted.append(message)


@pytest.mark.parametrize("settings,message", [
    (dict(batch_size=1), "batch_size (1) is the global batch: it must be >= the 2 ranks"),
    (dict(epochs=-2), "epochs must be >= 0, got -2"),
])
def test_a_rank_that_refuses_its_settings_ends_the_job(monkeypatch, rng, settings, message):
    from xpnet import distributed

    comm = OneOfTwoRanks()
    monkeypatch.setattr(distributed, "communicator", lambda backend_name: comm)
    X, y = small_problem(rng)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        xpnet.MLP([5, 3]).fit(X, y, verbose=0, distributed=True, **settings)
    assert comm.aborted == [f"ValueError: {message}"]


def test_fewer_training_rows_than_ranks_are_refused_on_every_rank(monkeypatch, rng):
    from xpnet import distributed

    comm = OneOfTwoRanks()
    monkeypatch.setattr(distributed, "communicator", lambda backend_name: comm)
    X, y = small_problem(rng)
    message = "distributed training needs a training row per rank, got 1 for 2 ranks"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        xpnet.MLP([5, 3]).fit(X[:1], y[:1], batch_size=2, verbose=0, distributed=True)
    assert comm.aborted == [f"ValueError: {message}"]


def test_a_one_rank_job_fails_as_a_plain_run(monkeypatch, rng):
    from xpnet import distributed

    comm = OneOfTwoRanks()
    comm.size = 1
    monkeypatch.setattr(distributed, "communicator", lambda backend_name: comm)
    X, y = small_problem(rng)
    with pytest.raises(ValueError, match="epochs must be >= 0"):
        xpnet.MLP([5, 3]).fit(X, y, epochs=-1, verbose=0, distributed=True)
    assert comm.aborted == []  # nothing to end but this process


# --- resuming, and the generators' states ------------------------------------------------------------


def test_a_resumed_run_goes_on_from_its_last_epoch_and_refuses_an_initial_epoch(rng, tmp_path):
    X, y = small_problem(rng)
    from xpnet.runs import RunRecorder

    settings = dict(epochs=3, batch_size=8, lr=0.1, verbose=0)
    run = tmp_path / "run"

    class InterruptedAfterFirst(Callback):
        def on_epoch_end(self, epoch, logs):
            raise KeyboardInterrupt

    whole = xpnet.MLP([5, 4, 3], dtype="float64", seed=3)
    whole_history = whole.fit(X, y, run_dir=tmp_path / "whole", **settings)
    with pytest.raises(KeyboardInterrupt):
        xpnet.MLP([5, 4, 3], dtype="float64", seed=3).fit(
            X, y, callbacks=[RunRecorder(run, plots=False), InterruptedAfterFirst()], **settings)
    with pytest.raises(ValueError, match="^give initial_epoch or resume a recorded run, not both$"):
        xpnet.MLP([5, 4, 3], dtype="float64", seed=3).fit(X, y, run_dir=run, resume=True, initial_epoch=1, **settings)
    resumed = xpnet.MLP([5, 4, 3], dtype="float64", seed=3)
    history = resumed.fit(X, y, run_dir=run, resume=True, **settings)
    assert history.epoch == [1, 2]
    assert history["loss"] == whole_history["loss"][1:]
    assert_weights_close(resumed.get_weights(), whole.get_weights(), rtol=0)


def test_set_rng_states_refuses_a_state_that_does_not_fit():
    from xpnet.training import rng_states, set_rng_states

    model = xpnet.MLP([5, 3], seed=0)
    states = rng_states(model)
    for bad in ("junk", {"bit_generator": "MT19937"}, dict(states["model"], state={})):
        with pytest.raises(ValueError, match="^the random state of 'model' does not fit its generator: "):
            set_rng_states(model, {"model": bad})
    with pytest.raises(ValueError, match=r"random states for \['layers.1', 'model'\] do not match this model's "
                                         r"generators \['model'\]"):
        set_rng_states(model, {"model": states["model"], "layers.1": states["model"]})


def test_uint8_images_in_order_are_scaled_like_float_ones(kernels):
    rng = np.random.default_rng(24)
    X = rng.integers(0, 256, size=(30, 6), dtype=np.uint8)
    y = rng.integers(0, 3, size=30)
    model = xpnet.MLP([6, 5, 3], dtype="float64", seed=8)
    start = model.get_weights()
    history = model.fit(X, y, epochs=1, batch_size=8, lr=0.3, shuffle=False, verbose=0)
    Xf = X.astype(np.float64) / 255.0
    assert_weights_close(model.get_weights(), np_sgd_epoch(start, Xf, y, 0.3, 8, np.arange(30)), rtol=1e-10)
    assert history["loss"][0] < np_loss(start, X.astype(np.float64), y)  # not the unscaled pixels' loss


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_the_divergence_warning_names_the_epoch_the_rate_and_what_was_restored(rng):
    X, y = separable(rng)
    with pytest.warns(DivergenceWarning) as caught:
        history = xpnet.MLP([12, 64, 4], seed=0).fit(X, y, epochs=5, lr=0.05, verbose=0,
                                                     schedule=lambda epoch, epochs: 1.0 if epoch < 2 else 1e30)
    (message,) = [str(w.message) for w in caught if w.category is DivergenceWarning]
    assert re.fullmatch(r"training diverged: the loss became (nan|inf) in epoch 3; lower the learning rate "
                        r"\(lr=5e\+28\); the weights of epoch 2 were restored and training stopped", message), message
    assert history.warnings == [message] and history.epoch == [0, 1]


def test_one_training_row(rng):
    """The smallest data set, one row (chance is then 1), even with a huge batch size (the CPU
    step's buffers are sized by the rows, not by batch_size)."""
    import tracemalloc

    X, y = small_problem(rng, n=1)
    xpnet.MLP([5, 4, 3], dtype="float64", seed=0).fit(X, y, epochs=1, batch_size=1, verbose=0)  # compiles the step
    model = xpnet.MLP([5, 4, 3], dtype="float64", seed=0)
    start = model.get_weights()
    tracemalloc.start()
    try:
        history = model.fit(X, y, epochs=1, batch_size=10**7, lr=0.5, verbose=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, f"fit allocated {peak / 2**20:.0f} MiB for 1 row"
    assert history.params["chance_accuracy"] == 1.0 and history.params["n_train"] == 1
    assert_weights_close(model.get_weights(), np_sgd_step(start, X, y, 0.5), rtol=1e-12)
    assert history["loss"] == [pytest.approx(np_loss(start, X, y), rel=1e-12)]


@pytest.mark.filterwarnings("ignore::xpnet.callbacks.DivergenceWarning")
def test_the_defaults(rng, capsys):
    """10 epochs of shuffled batches of 128, plain SGD at 0.01, no validation, a line per epoch."""
    X, y = separable(rng, n=300)
    history = xpnet.MLP([12, 4], seed=0).fit(X, y)
    assert history.epoch == list(range(10))
    params = history.params
    assert (params["epochs"], params["batch_size"], params["shuffle"], params["n_val"]) == (10, 128, True, 0)
    assert params["optimizer"] == "SGD(lr=0.01, momentum=0.0, nesterov=False)" and params["schedule"] == "constant"
    err = capsys.readouterr().err
    assert "epoch 1/10 - " in err and "epoch 10/10 - " in err


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_a_run_warned_of_divergence_then_diverging_keeps_both_warnings_in_order(rng):
    X, y = separable(rng)
    seen = EndLogs()
    with pytest.warns(DivergenceWarning) as caught:
        history = xpnet.MLP([12, 32, 4], seed=0).fit(X, y, epochs=6, lr=3.0, verbose=0, callbacks=[seen],
                                                     schedule=lambda epoch, epochs: 1.0 if epoch < 4 else 1e30)
    messages = [str(w.message) for w in caught if w.category is DivergenceWarning]
    assert len(messages) == 2
    assert "at epoch 4, loss" in messages[0] and "the loss became" in messages[1]
    assert history.warnings == messages and seen.end["warnings"] == messages
    assert history.diverged and seen.end["diverged"] and history.epoch == [0, 1, 2, 3]


def test_fit_on_the_array_api_reference_namespace_reports_numpys_numbers(monkeypatch):
    """array_api_strict allows only what the standard does: the reference step, validation and
    chance level computed there give the NumPy run's numbers."""
    xs = pytest.importorskip("array_api_strict")
    monkeypatch.setenv("XPNET_KERNELS", "xp")
    rng = np.random.default_rng(25)
    X, y = small_problem(rng)
    y[:4] = 1  # the most common class: chance above a third
    settings = dict(epochs=2, batch_size=8, lr=0.2, validation_split=0.25, verbose=0)
    strict = xpnet.MLP([5, 4, 3], dtype="float64", seed=0, backend=xs)
    history = strict.fit(X, y, **settings)
    plain = xpnet.MLP([5, 4, 3], dtype="float64", seed=0)
    expected = plain.fit(X, y, **settings)
    assert history.params["chance_accuracy"] == expected.params["chance_accuracy"] > 1 / 3
    assert history["loss"] == pytest.approx(expected["loss"], rel=1e-12)
    assert history["accuracy"] == expected["accuracy"]
    assert history["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-12)
    assert_weights_close(strict.get_weights(), plain.get_weights(), rtol=1e-10)


def test_the_training_loss_is_that_of_the_network_with_dropout_on(monkeypatch, kernels):
    """Dropout is on while training (the reference step): the epoch's loss, at a learning rate too
    small to move the weights, is not the loss of the same weights evaluated without it."""
    from xpnet.layers import Dense, Dropout

    rng = np.random.default_rng(26)
    X, y = small_problem(rng, n=64)
    model = xpnet.Sequential([Dense(32, activation="relu"), Dropout(0.8), Dense(3)], input_shape=(5,),
                             dtype="float64", seed=0)
    history = model.fit(X, y, epochs=1, batch_size=64, lr=1e-12, shuffle=False, verbose=0)
    assert history["loss"][0] != pytest.approx(model.evaluate(X, y)["loss"], rel=1e-3)


# mutmut calls every function of a mutated module through a trampoline: one more stack frame
@pytest.mark.skipif("MUTANT_UNDER_TEST" in os.environ, reason="mutmut's trampolines shift the stack")
@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_the_non_finite_loss_warning_points_at_the_users_fit_call(rng):
    X, y = separable(rng)
    with pytest.warns(DivergenceWarning, match="the loss became") as caught:
        xpnet.MLP([12, 64, 4], seed=0).fit(X, y, epochs=2, lr=1e30, verbose=0)
    assert [w.filename for w in caught if w.category is DivergenceWarning] == [__file__]


def test_a_label_per_row(rng):
    X, y = small_problem(rng)
    with pytest.raises(ValueError, match=r"^X has 40 rows but y has 39 labels$"):
        xpnet.MLP([5, 3]).fit(X, y[:-1], verbose=0)
    with pytest.raises(ValueError, match=r"^X has 40 rows but y has 41 labels$"):
        xpnet.MLP([5, 3]).fit(X, np.append(y, 0), verbose=0)
    Xv, yv = small_problem(rng, n=13)
    with pytest.raises(ValueError, match=r"^X has 13 rows but y has 12 labels$"):
        xpnet.MLP([5, 3]).fit(X, y, validation_data=(Xv, yv[:-1]), verbose=0)


def test_nesterov_is_passed_on_to_sgd(rng):
    X, y = small_problem(rng)
    runs = {}
    for nesterov in (False, True):
        model = xpnet.MLP([5, 4, 3], dtype="float64", seed=0)
        history = model.fit(X, y, epochs=1, batch_size=8, lr=0.1, momentum=0.9, nesterov=nesterov, verbose=0)
        assert f"nesterov={nesterov}" in history.params["optimizer"]
        runs[nesterov] = model.get_weights()
    assert not close(runs[False], runs[True], rtol=1e-6)


def test_inputs_given_as_lists_train_as_arrays_do(rng):
    X, y = small_problem(rng)
    runs = []
    for Xs, ys in ((X, y), (X.tolist(), y.tolist())):
        model = xpnet.MLP([5, 4, 3], dtype="float64", seed=0)
        model.fit(Xs, ys, epochs=1, batch_size=8, lr=0.1, verbose=0)
        runs.append(model.get_weights())
    assert_weights_close(runs[0], runs[1], rtol=0)
    with pytest.raises(ValueError, match=r"X is empty \(0 rows\)"):
        xpnet.MLP([5, 3]).fit(np.zeros((0, 5)), np.zeros(0, dtype=int), verbose=0)


def test_an_unbuilt_model_is_built_for_the_rows_of_X(rng):
    from xpnet.layers import Dense

    X, y = small_problem(rng)
    model = xpnet.Sequential([Dense(4, activation="relu"), Dense(3)], seed=0)
    history = model.fit(X, y, epochs=1, verbose=0)
    assert [w.shape for w in model.get_weights()] == [(5, 4), (4,), (4, 3), (3,)]
    assert len(history["loss"]) == 1 and math.isfinite(history["loss"][0])


def test_distributed_fit_never_splits_a_ranks_batch_and_takes_one_row_per_rank(thread_ranks, monkeypatch):
    """Each rank is already one core's work: ``fit`` asks for no step that spreads over the
    cores; and two rows are enough for two ranks."""
    from xpnet import training

    asked = []
    step_for = training._training_step
    monkeypatch.setattr(training, "_training_step",
                        lambda model, batch, *, all_cores=True: asked.append(all_cores) or step_for(
                            model, batch, all_cores=all_cores))
    X, y = small_problem(np.random.default_rng(23), n=2)

    def train(rank):
        model = xpnet.MLP([5, 6, 3], dtype="float64", seed=rank)
        return model.fit(X, y, epochs=1, batch_size=2, distributed=True, verbose=0)

    results, errors = thread_ranks.run(train)
    assert errors == [None, None] and asked == [False, False]
    assert [history.params["n_train"] for history in results] == [2, 2]


def test_xpnet_kernels_numba_takes_the_fast_steps_as_auto_does(monkeypatch):
    from xpnet import kernels
    from xpnet.layers import Conv2D, Dense, Flatten
    from xpnet.training import ImagesOnCoresStep, images_on_cores_step_for, training_step_for

    if kernels.kernel_module("numba").unavailable():
        pytest.skip(kernels.kernel_module("numba").unavailable())
    from xpnet.kernels import cores
    from xpnet.kernels.cpu_step import CpuTrainingStep

    monkeypatch.setattr(cores, "cores", lambda: 2)
    mlp = xpnet.MLP([5, 6, 3], seed=0)
    cnn = xpnet.Sequential([Conv2D(2, 3), Flatten(), Dense(3)], input_shape=(6, 6, 1), seed=0)
    for impl in ("auto", "numba"):
        monkeypatch.setenv("XPNET_KERNELS", impl)
        assert type(training_step_for(mlp.layers, 64)) is CpuTrainingStep
        assert type(images_on_cores_step_for(cnn)) is ImagesOnCoresStep
    monkeypatch.setenv("XPNET_KERNELS", "xp")
    assert training_step_for(mlp.layers, 64) is None and images_on_cores_step_for(cnn) is None
