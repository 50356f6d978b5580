"""``fit(sample_weight=...)``: each batch's loss is the weighted mean of its rows' losses, on
every training step (the reference, the Numba step, the images-on-cores step, across ranks), with checked
input, a validation split, and run records that resume."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import InterruptAfter

import xpnet
from xpnet import functional as F
from xpnet.callbacks import Callback
from xpnet.layers import AvgPool2D, Conv2D, Dense, Flatten


def mlp(activation="relu", dtype="float32", seed=3):
    return xpnet.Sequential([Dense(9, activation=activation), Dense(3)], input_shape=(6,), dtype=dtype, seed=seed)


def cnn(dtype="float32", seed=3):
    layers = [Conv2D(3, 3, activation="relu", padding="same"), AvgPool2D(2), Flatten(), Dense(3)]
    return xpnet.Sequential(layers, input_shape=(6, 6, 1), dtype=dtype, seed=seed)


#: the models, each with the step ``fit`` takes for it on the CPU (with numba and 2 cores or more)
MODELS = {"relu-mlp (Numba step)": mlp, "tanh-mlp (reference step)": lambda **kw: mlp("tanh", **kw),
          "cnn (images on cores)": cnn}
STEPS = {"relu-mlp (Numba step)": "CpuTrainingStep", "tanh-mlp (reference step)": "ReferenceStep",
         "cnn (images on cores)": "ImagesOnCoresStep"}


def data(make, rng, n=70):
    shape = make().input_shape
    X = rng.uniform(0, 1, size=(n, *shape)).astype(np.float32)
    return X, rng.integers(0, 3, n)


def weights_after(make, X, y, **settings):
    model = make(**settings.pop("model", {}))
    model.fit(X, y, verbose=0, on_divergence="ignore", **settings)
    return model.get_weights()


def same(a, b):
    return all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))


@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_equal_weights_train_bit_for_bit_as_none(make, kernels, rng):
    """Every row weighing 1, or every row 2.5: the very run without weights (a weight is only
    relative to its batch's mean), whichever step trains."""
    X, y = data(make, rng)
    settings = dict(epochs=2, batch_size=16, optimizer="adam", lr=0.01)
    plain = weights_after(make, X, y, **settings)
    for constant in (1.0, 2.5):
        assert same(weights_after(make, X, y, sample_weight=np.full(len(y), constant), **settings), plain)


@pytest.mark.parametrize("name", MODELS)
def test_every_step_weighs_rows_as_the_reference_does(name, monkeypatch, rng):
    """Uneven weights (some 0), shuffled batches with a short last one: the fast steps end where
    the reference does, and the weights mattered."""
    from xpnet.kernels.cores import cores

    make = MODELS[name]
    if name.startswith("cnn") and cores() < 2:
        pytest.skip("spreading the images over the cores needs 2 of them")
    monkeypatch.delenv("XPNET_KERNELS", raising=False)
    assert type(xpnet.training._training_step(make(), 64)).__name__ == STEPS[name]
    X, y = data(make, rng, n=150)
    weights = rng.choice([0.0, 0.3, 1.0, 4.0], size=len(y))
    settings = dict(epochs=2, batch_size=64, optimizer="sgd", lr=0.2, momentum=0.9, model={"dtype": "float64"})
    fast = weights_after(make, X, y, sample_weight=weights, **dict(settings))
    monkeypatch.setenv("XPNET_KERNELS", "xp")
    reference = weights_after(make, X, y, sample_weight=weights, **dict(settings))
    for a, b in zip(fast, reference, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    assert not same(reference, weights_after(make, X, y, **dict(settings)))


@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_integer_weights_train_as_repeated_rows_and_zero_as_removed(make, kernels, rng):
    """In one batch (the whole set, in order), a row of weight k is that row k times, and a row
    of weight 0 is no row at all: the weighted mean is the mean over the repeated rows."""
    X, y = data(make, rng, n=70)
    counts = rng.integers(0, 4, size=70)
    counts[:2] = (0, 3)
    settings = dict(epochs=3, optimizer="sgd", lr=0.5, shuffle=False, model={"dtype": "float64"})
    weighted = weights_after(make, X, y, sample_weight=counts, batch_size=70, **dict(settings))
    repeated = weights_after(make, X.repeat(counts, axis=0), y.repeat(counts), batch_size=int(counts.sum()),
                             **dict(settings))
    for a, b in zip(weighted, repeated, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_each_row_keeps_its_weight_through_the_shuffle(make, kernels, rng):
    """Shuffled batches: relabelling the rows of weight 0 changes no bit of the trained weights
    (a weight applied to whichever row the shuffle put in its place would let the new labels
    in), while relabelling the others does."""
    X, y = data(make, rng, n=150)
    weights = rng.choice([0.0, 0.5, 1.0, 3.0], size=len(y))
    zero = weights == 0
    settings = dict(epochs=2, batch_size=32, optimizer="adam", lr=0.01, shuffle=True, sample_weight=weights)
    trained = weights_after(make, X, y, **dict(settings))
    assert same(weights_after(make, X, np.where(zero, (y + 1) % 3, y), **dict(settings)), trained)
    assert not same(weights_after(make, X, np.where(zero, y, (y + 1) % 3), **dict(settings)), trained)


def test_the_batch_factors_follow_the_epochs_order():
    """Each row's factor is its weight over its batch's mean weight, batch by batch in the
    epoch's order (no order: the data's own)."""
    from xpnet.training import _batch_scales

    cpu = xpnet.get_backend("cpu")
    w = np.array([1.0, 2.0, 0.0, 4.0, 3.0])
    factors, sums = _batch_scales(w, np.array([3, 0, 4, 2, 1]), 2, "float64", cpu)
    np.testing.assert_allclose(factors, [4 / 2.5, 1 / 2.5, 3 / 1.5, 0.0, 1.0], rtol=1e-15)
    assert sums == [5.0, 3.0, 2.0]
    in_order, in_order_sums = _batch_scales(w, None, 2, "float32", cpu)
    np.testing.assert_allclose(in_order, [2 / 3, 4 / 3, 0.0, 2.0, 1.0], rtol=1e-7)
    assert in_order.dtype == np.float32 and in_order_sums == [3.0, 4.0, 3.0]


def test_a_batch_whose_weights_are_all_zero_moves_nothing(rng):
    """Plain SGD, in order: a first batch of weight 0 leaves the weights as they were, so the
    run ends where one on the second batch alone does."""
    X, y = data(mlp, rng, n=20)
    weights = np.r_[np.zeros(10), rng.uniform(0.5, 2, 10)]
    settings = dict(epochs=1, batch_size=10, optimizer="sgd", lr=0.3, shuffle=False)
    assert same(weights_after(mlp, X, y, sample_weight=weights, **settings),
                weights_after(mlp, X[10:], y[10:], sample_weight=weights[10:], **settings))


class FirstLoss(Callback):
    def on_epoch_end(self, epoch, logs):
        self.loss = logs["loss"]


def test_the_epoch_loss_is_each_batchs_weighted_mean_weighted_by_its_rows(kernels, rng):
    """As scikit-learn reports it: the sum over batches of rows x weighted mean loss, over the
    rows (the losses taken before each batch's step; lr 0 keeps the weights where they start)."""
    X, y = data(mlp, rng, n=25)
    weights = rng.uniform(0, 3, size=25)
    model = mlp(dtype="float64")
    logits = model.forward(X.astype(np.float64))
    losses = F.cross_entropy(logits, y, reduction="none")
    batches = [slice(0, 10), slice(10, 20), slice(20, 25)]
    want = sum((b.stop - b.start) * np.average(losses[b], weights=weights[b]) for b in batches) / 25
    seen = FirstLoss()
    model.fit(X, y, epochs=1, batch_size=10, optimizer="sgd", lr=1e-300, shuffle=False, sample_weight=weights,
              callbacks=[seen], verbose=0, on_divergence="ignore")
    assert seen.loss == pytest.approx(want, rel=1e-12)


def test_the_held_out_rows_weights_are_not_used(rng):
    """With ``validation_split`` the last rows are held out, and so are their weights."""
    X, y = data(mlp, rng, n=40)
    weights = rng.uniform(0.5, 2, size=40)
    settings = dict(epochs=2, batch_size=8, validation_split=0.25)
    other = weights.copy()
    other[30:] = 7.0
    assert same(weights_after(mlp, X, y, sample_weight=weights, **settings),
                weights_after(mlp, X, y, sample_weight=other, **settings))
    with pytest.raises(ValueError, match=r"0 for every row it trains on \(validation_split holds out the others\)"):
        weights_after(mlp, X, y, sample_weight=np.r_[np.zeros(30), np.ones(10)], **settings)


@pytest.mark.parametrize("sample_weight,error,message", [
    (np.ones(39), ValueError, r"shape \(40,\), one weight per row of X, got \(39,\)"),
    (np.ones((40, 1)), ValueError, r"shape \(40,\).*got \(40, 1\)"),
    (np.r_[np.ones(39), -1.0], ValueError, r"finite and >= 0: sample_weight\[39\] = -1.0"),
    (np.r_[np.nan, np.ones(39)], ValueError, r"sample_weight\[0\] = nan"),
    (np.r_[np.ones(5), np.inf, np.ones(34)], ValueError, r"sample_weight\[5\] = inf"),
    (np.zeros(40), ValueError, "^sample_weight is 0 for every row it trains on: nothing to learn from$"),
    (["a"] * 40, TypeError, "array of numbers, got list"),
])
def test_bad_sample_weights_are_refused_by_name_before_training(sample_weight, error, message, rng):
    X, y = data(mlp, rng, n=40)
    model = mlp()
    before = model.get_weights()
    with pytest.raises(error, match=message):
        model.fit(X, y, epochs=1, verbose=0, sample_weight=sample_weight)
    assert same(model.get_weights(), before)


def test_a_weighted_run_resumes_bit_identical_and_only_with_its_weights(tmp_path, rng):
    X, y = data(mlp, rng)
    weights = rng.uniform(0, 2, size=len(y))
    settings = dict(epochs=4, batch_size=16, optimizer="adam", lr=0.01, verbose=0, sample_weight=weights,
                    on_divergence="ignore")
    whole = mlp()
    whole.fit(X, y, run_dir=tmp_path / "whole", **settings)
    with pytest.raises(KeyboardInterrupt):
        mlp().fit(X, y, run_dir=tmp_path / "cut", callbacks=[InterruptAfter(1)], **settings)
    with pytest.raises(ValueError, match="sample_weight_sum was .*, now None"):
        mlp().fit(X, y, run_dir=tmp_path / "cut", resume=True, **{**settings, "sample_weight": None})
    resumed = mlp()
    resumed.fit(X, y, run_dir=tmp_path / "cut", resume=True, **settings)
    assert same(resumed.get_weights(), whole.get_weights())


@pytest.mark.parametrize("n,batch_size", [(41, 8), (33, 16)])
def test_two_ranks_weigh_the_global_batch_as_one_process(thread_ranks, n, batch_size):
    """Each rank's share of a global batch is weighted by the whole batch's mean weight (33 rows
    in 16s: a last batch of 1 row, which rank 1 has no part of)."""
    rng = np.random.default_rng(5)
    X, y = rng.uniform(0, 1, size=(n, 6)), rng.integers(0, 3, n)
    weights = rng.choice([0.0, 0.5, 1.0, 3.0], size=n)
    settings = dict(epochs=2, batch_size=batch_size, optimizer="adam", lr=0.05, verbose=0, sample_weight=weights)

    def train(rank):
        model = mlp(dtype="float64", seed=10 + rank)
        return model.fit(X, y, distributed=True, **settings), model.get_weights()

    results, errors = thread_ranks.run(train)
    assert errors == [None, None]
    alone = mlp(dtype="float64", seed=10)
    history = alone.fit(X, y, distributed=False, **settings)
    for rank_history, weights_of_rank in results:
        for a, b in zip(weights_of_rank, alone.get_weights(), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
        assert rank_history["loss"] == pytest.approx(history["loss"], rel=1e-12)
