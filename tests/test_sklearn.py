"""xpnet.sklearn: scikit-learn's estimator checks, the same numbers as scikit-learn's own
MLPClassifier for the same settings, labels, partial_fit, warm_start, stopping, sparse input,
and use inside Pipeline, cross_val_score and GridSearchCV(n_jobs=2)."""

from __future__ import annotations

import io
import re

import joblib
import numpy as np
import pytest
import scipy.sparse
from sklearn import neural_network
from sklearn.base import clone
from sklearn.datasets import load_digits, make_blobs
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV, cross_val_score, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

import xpnet
from xpnet.layers import AvgPool2D, Conv2D, Dense, Flatten, RandomShift
from xpnet.sklearn import MLPClassifier, NeuralNetClassifier

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


def two_dense(n_classes):
    return [Dense(8, activation="relu"), Dense(n_classes)]


class TwoDense:
    """``two_dense`` with a repr free of memory addresses: parametrize_with_checks puts the
    estimator's repr in the test ids, which pytest-xdist's workers must all collect alike."""

    def __call__(self, n_classes):
        return two_dense(n_classes)

    def __repr__(self):
        return "two_dense"


def small_cnn(n_classes):
    return [Conv2D(4, 3, activation="relu", padding="same"), AvgPool2D(2), Flatten(), Dense(n_classes)]


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's 8x8 digits (1797 samples, 10 classes), scaled to [0, 1], split 3:1."""
    X, y = load_digits(return_X_y=True)
    return train_test_split((X / 16).astype(np.float32), y, random_state=0, stratify=y)


def blobs(n=120, classes=3, seed=0):
    return make_blobs(n_samples=n, centers=classes, n_features=5, random_state=seed)


# -- scikit-learn's own checks --------------------------------------------------------------------

#: checks these estimators are known to fail, with the reason (scikit-learn's mechanism for it).
#: ``check_classifier_data_not_an_array`` skips itself without pandas, and
#: ``check_array_api_input`` because the estimators take host (NumPy/SciPy) data only.
_FLOAT32_EQUIVALENCE = (
    "integer sample weights train as repeated samples up to float32 rounding (1-2e-7 apart after 30 "
    "epochs: the network computes in float32, the check asks for float64's 1e-7); "
    "test_integer_sample_weights_train_as_repeated_samples checks it at float32's tolerance"
)
EXPECTED_FAILED_CHECKS: dict[str, str] = {
    "check_sample_weight_equivalence_on_dense_data": _FLOAT32_EQUIVALENCE,
    "check_sample_weight_equivalence_on_sparse_data": _FLOAT32_EQUIVALENCE,
}


@parametrize_with_checks(
    [
        # a few epochs at a higher rate: every check fits, so they must be quick, and learn enough
        MLPClassifier((16,), max_iter=30, learning_rate_init=0.01, random_state=0),
        NeuralNetClassifier(TwoDense(), max_iter=30, learning_rate_init=0.01, random_state=0),
    ],
    expected_failed_checks=lambda estimator: EXPECTED_FAILED_CHECKS,
)
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


def test_import_xpnet_sklearn_is_lazy_and_documented():
    assert "MLPClassifier" in xpnet.sklearn.__all__ and "alpha / (2 n)" in MLPClassifier.__doc__


# -- the same meaning as scikit-learn's parameters ---------------------------------------------------

def trained_from(estimator, weights, X, y, sample_weight=None):
    """``estimator`` trained for its ``max_iter`` epochs from ``weights`` (a first fit creates
    the coefficients, then a warm start goes on from the ones set, with a new optimizer)."""
    estimator.set_params(warm_start=True).fit(X, y, sample_weight=sample_weight)
    if isinstance(estimator, MLPClassifier):
        estimator.model_.set_weights(weights)
    else:
        estimator.coefs_ = [w.astype(np.float64) for w in weights[0::2]]
        estimator.intercepts_ = [b.astype(np.float64) for b in weights[1::2]]
    return estimator.fit(X, y, sample_weight=sample_weight)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "sample_weight"])
@pytest.mark.parametrize("settings", [
    {"solver": "sgd", "momentum": 0.0, "learning_rate_init": 0.1, "alpha": 0.5},
    {"solver": "sgd", "momentum": 0.9, "nesterovs_momentum": True, "learning_rate_init": 0.05, "alpha": 0.1},
    {"solver": "sgd", "momentum": 0.8, "nesterovs_momentum": False, "learning_rate_init": 0.05, "alpha": 0.0},
    {"solver": "adam", "learning_rate_init": 0.01, "alpha": 0.3, "beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-3},
    {"solver": "sgd", "momentum": 0.9, "learning_rate": "invscaling", "power_t": 0.25, "learning_rate_init": 0.3,
     "alpha": 0.1},
    # no epoch gains 1e3: the warm start's third epoch runs at a fifth of the rate
    {"solver": "sgd", "momentum": 0.5, "learning_rate": "adaptive", "tol": 1e3, "n_iter_no_change": 1,
     "learning_rate_init": 0.2, "alpha": 0.1},
])
def test_the_same_settings_train_to_the_same_weights_as_scikit_learn(settings, weighted, rng):
    """Same data, same start, same batches (no shuffling): the same
    weights after 3 epochs. Holds ``alpha`` (an L2 on the kernels only, divided by the batch
    size, or its summed sample weight), both solvers, the momentum variants, Adam's epsilon
    (which rules the steps of gradients as small as itself) and ``sample_weight`` (weights of 0
    to 3, some 0) to scikit-learn's meaning. The tolerance is float32's: scikit-learn computes
    in float64 here."""
    X, y = blobs(n=90)  # 3 full batches (a short last one: the next test)
    sample_weight = rng.choice([0.0, 0.5, 1.0, 3.0], size=90) if weighted else None
    X[:, 0] = 0  # a feature that is always 0, as MNIST's border pixels: its weights see only alpha
    params = dict(hidden_layer_sizes=(7, 5), activation="tanh", batch_size=30, max_iter=3, shuffle=False,
                  random_state=0, **settings)
    shapes = [(5, 7), (7,), (7, 5), (5,), (5, 3), (3,)]
    start = [rng.uniform(-0.5, 0.5, size=shape).astype(np.float32) for shape in shapes]
    ours = trained_from(MLPClassifier(**params), start, X, y, sample_weight)
    sk = trained_from(neural_network.MLPClassifier(**params), start, X, y, sample_weight)
    for ours_w, sk_w in zip(ours.coefs_ + ours.intercepts_, sk.coefs_ + sk.intercepts_, strict=True):
        np.testing.assert_allclose(ours_w, sk_w, rtol=1e-4, atol=1e-5)
    # the loss adds the penalty at each epoch's end weights, where scikit-learn takes each batch's
    np.testing.assert_allclose(ours.loss_curve_[3:], sk.loss_curve_[3:], rtol=0.02)
    assert ours.n_iter_ == sk.n_iter_ == 3 and len(ours.loss_curve_) == len(sk.loss_curve_) == 6


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "sample_weight"])
@pytest.mark.parametrize("solver", ["sgd", "adam"])
def test_a_short_last_batch_gets_the_penalty_of_its_own_size_as_in_scikit_learn(solver, weighted, rng):
    """100 samples in batches of 30: the last batch of 10 (or its summed weight) divides alpha,
    so the weights after 3 epochs are scikit-learn's. (The loss is left out: it takes the
    penalty at each epoch's end weights, and a fourth batch at this rate moves them further.)"""
    X, y = blobs(n=100)
    sample_weight = rng.choice([0.0, 0.5, 1.0, 3.0], size=100) if weighted else None
    params = dict(hidden_layer_sizes=(7,), activation="tanh", batch_size=30, max_iter=3, shuffle=False,
                  random_state=0, solver=solver, learning_rate_init=0.05, alpha=0.5)
    start = [rng.uniform(-0.5, 0.5, size=shape).astype(np.float32) for shape in [(5, 7), (7,), (7, 3), (3,)]]
    ours = trained_from(MLPClassifier(**params), start, X, y, sample_weight)
    sk = trained_from(neural_network.MLPClassifier(**params), start, X, y, sample_weight)
    for ours_w, sk_w in zip(ours.coefs_ + ours.intercepts_, sk.coefs_ + sk.intercepts_, strict=True):
        np.testing.assert_allclose(ours_w, sk_w, rtol=1e-4, atol=1e-5)


def test_the_fitted_network_is_described_as_scikit_learn_describes_it():
    X, y = blobs()
    params = dict(hidden_layer_sizes=(7, 5), max_iter=2)
    ours, sk = MLPClassifier(**params), neural_network.MLPClassifier(**params)
    for name in ("n_layers_", "n_outputs_", "out_activation_", "coefs_"):
        assert not hasattr(ours, name)
    ours.fit(X, y), sk.fit(X, y)
    assert (ours.n_layers_, ours.n_outputs_, ours.out_activation_) == (sk.n_layers_, sk.n_outputs_,
                                                                        sk.out_activation_) == (4, 3, "softmax")
    assert [c.shape for c in ours.coefs_] == [c.shape for c in sk.coefs_]
    two = MLPClassifier(**params).fit(X[y < 2], y[y < 2])  # one unit per class, also for two
    assert (two.n_outputs_, two.out_activation_, two.coefs_[-1].shape) == (2, "softmax", (5, 2))


def test_stopping_on_the_training_loss_counts_epochs_as_scikit_learn_does():
    """With ``tol`` larger than any gain, both stop after ``n_iter_no_change + 1`` epochs."""
    X, y = blobs()
    params = dict(hidden_layer_sizes=(8,), tol=1e3, n_iter_no_change=2, max_iter=50, random_state=0)
    ours, sk = MLPClassifier(**params).fit(X, y), neural_network.MLPClassifier(**params).fit(X, y)
    assert ours.n_iter_ == sk.n_iter_ == 4 and len(ours.loss_curve_) == 4
    assert ours.best_loss_ == min(ours.loss_curve_) and ours.validation_scores_ is None


@pytest.mark.parametrize("settings", [
    {"learning_rate": "invscaling", "power_t": 0.3, "max_iter": 4},
    {"learning_rate": "adaptive", "tol": 10.0, "n_iter_no_change": 1, "max_iter": 50, "learning_rate_init": 0.1},
    {"learning_rate": "adaptive", "tol": 10.0, "n_iter_no_change": 2, "max_iter": 10, "learning_rate_init": 0.1},
])
def test_sgd_learning_rate_schedules_move_the_rate_and_stop_as_scikit_learn_does(settings, capsys):
    """invscaling: ``learning_rate_init / (t_ + 1) ** power_t`` after each epoch; adaptive: a
    fifth of the rate, instead of stopping, while it is above 1e-6 (here every epoch but the
    first fails a tol of 10, so the rate falls from 0.1 to 2.56e-7 in 19 epochs)."""
    X, y = blobs(n=90)
    params = dict(hidden_layer_sizes=(4,), solver="sgd", batch_size=30, random_state=0, verbose=True, **settings)
    lines = lambda out: re.sub(r"loss = \S+", "loss = ...", out)  # noqa: E731 - the losses aside
    ours = MLPClassifier(**params).fit(X, y)
    said = lines(capsys.readouterr().out)
    sk = neural_network.MLPClassifier(**params).fit(X, y)
    assert said == lines(capsys.readouterr().out)
    assert ours.n_iter_ == sk.n_iter_ and ours._optimizer.rate == sk._optimizer.learning_rate
    if settings["learning_rate"] == "invscaling":
        assert ours._optimizer.rate == 1e-3 / (4 * 90 + 1) ** 0.3
    else:
        assert said.count("Setting learning rate to") == (8 if settings["n_iter_no_change"] == 1 else 3)
    # Adam's rate is learning_rate_init whatever the schedule: it stops where it would
    params.update(solver="adam", verbose=False)
    adam = MLPClassifier(**params).fit(X, y)
    assert adam.n_iter_ == neural_network.MLPClassifier(**params).fit(X, y).n_iter_
    assert adam.n_iter_ == (4 if settings["learning_rate"] == "invscaling" else settings["n_iter_no_change"] + 2)


def test_running_out_of_epochs_or_samples_warns_as_scikit_learn_does():
    X, y = blobs()
    with pytest.warns(ConvergenceWarning, match=r"Maximum iterations \(3\) reached"):
        MLPClassifier((8,), max_iter=3).fit(X, y)
    with pytest.warns(UserWarning) as record:
        clf = MLPClassifier((8,), max_iter=5, batch_size=500, tol=1e3, n_iter_no_change=1).fit(X, y)
    # stopped by tol, so no ConvergenceWarning
    assert [str(w.message) for w in record] == ["batch_size=500 is larger than the 120 samples: clipped to 120"]
    assert clf.n_iter_ == 3


def test_lbfgs_and_bad_settings_are_refused_by_name():
    X, y = blobs()
    with pytest.raises(ValueError, match="solver='lbfgs' is not supported"):
        MLPClassifier(solver="lbfgs").fit(X, y)
    with pytest.raises(ValueError, match="'alpha' parameter .* Got -1"):
        MLPClassifier(alpha=-1).fit(X, y)
    with pytest.raises(ValueError, match="hidden_layer_sizes must be positive integers"):
        MLPClassifier(hidden_layer_sizes=(4.5,)).fit(X, y)


# -- labels, methods and fitted attributes ---------------------------------------------------------

@pytest.mark.parametrize("labels", [["cat", "dog", "eel"], [1, 2, 3], [-1, 0, 10]], ids=["str", "1-based", "gaps"])
def test_any_labels_come_back_as_given(labels):
    X, codes = blobs()
    y = np.asarray(labels)[codes]
    clf = MLPClassifier((8,), max_iter=40, learning_rate_init=0.02, random_state=0).fit(X, y)
    np.testing.assert_array_equal(clf.classes_, np.sort(np.asarray(labels)))
    assert clf.predict(X).dtype == y.dtype and clf.score(X, y) > 0.9
    proba = clf.predict_proba(X)
    assert proba.shape == (len(X), 3)
    np.testing.assert_array_equal(clf.predict(X), clf.classes_[proba.argmax(axis=1)])
    np.testing.assert_allclose(clf.predict_log_proba(X), np.log(proba))
    assert [w.shape for w in clf.coefs_] == [(5, 8), (8, 3)] and [b.shape for b in clf.intercepts_] == [(8,), (3,)]


def test_partial_fit_goes_on_as_fit_does_and_takes_the_classes_first():
    X, y = blobs()
    params = dict(hidden_layer_sizes=(8,), random_state=0, max_iter=3)
    whole = MLPClassifier(**params).fit(X, y)
    with pytest.raises(ValueError, match="classes must be passed on the first call"):
        MLPClassifier(**params).partial_fit(X, y)
    parts = MLPClassifier(**params)
    for _ in range(3):  # three epochs, one optimizer: bit for bit fit's three
        parts.partial_fit(X, y, classes=[0, 1, 2])
    assert parts.n_iter_ == 1 and parts.t_ == whole.t_ == 3 * len(X)
    assert parts.loss_curve_ == whole.loss_curve_
    for a, b in zip(parts.coefs_ + parts.intercepts_, whole.coefs_ + whole.intercepts_, strict=True):
        np.testing.assert_array_equal(a, b)
    # a batch may lack classes; one with a class never declared is refused
    later = MLPClassifier(**params).partial_fit(X[y < 2], y[y < 2], classes=[0, 1, 2])
    assert later.predict_proba(X).shape == (len(X), 3)
    with pytest.raises(ValueError, match=r"y has classes not in classes_ \[0, 1, 2\]: \[7\]"):
        later.partial_fit(X[:2], [0, 7])
    with pytest.raises(ValueError, match="partial_fit does not support early_stopping"):
        MLPClassifier(early_stopping=True).partial_fit(X, y, classes=[0, 1, 2])


def test_warm_start_goes_on_from_the_fitted_weights():
    X, y = blobs()
    cold = MLPClassifier((8,), max_iter=3, random_state=0)
    first = cold.fit(X, y).coefs_
    assert cold.fit(X, y).loss_curve_ == cold.loss_curve_[:3] and len(cold.loss_curve_) == 3  # a new start
    np.testing.assert_array_equal(cold.coefs_[0], first[0])
    warm = MLPClassifier((8,), max_iter=3, random_state=0, warm_start=True).fit(X, y)
    warm.fit(X, y)
    assert warm.n_iter_ == 3 and len(warm.loss_curve_) == 6 and warm.loss_curve_[5] < warm.loss_curve_[2]
    assert not np.array_equal(warm.coefs_[0], first[0])
    with pytest.raises(ValueError, match=r"warm_start needs y with the classes of the previous fit, \[0, 1, 2\]"):
        warm.fit(X[y < 2], y[y < 2])


def test_early_stopping_keeps_the_weights_of_the_best_validation_score():
    X, y = blobs(n=300, seed=1)
    clf = MLPClassifier((8,), early_stopping=True, validation_fraction=0.2, n_iter_no_change=3, tol=0.05,
                        max_iter=200, learning_rate_init=0.05, random_state=0).fit(X, y)
    assert clf.n_iter_ < 200 and len(clf.validation_scores_) == clf.n_iter_ and clf.best_loss_ is None
    assert clf.best_validation_score_ == max(clf.validation_scores_)
    # the same stratified split scikit-learn's MLPClassifier takes: the kept weights score the best
    _, X_val, _, y_val = train_test_split(X, y, test_size=0.2, stratify=y, random_state=np.random.RandomState(0))
    assert clf.score(X_val, y_val) == clf.best_validation_score_


# -- sample_weight -------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", [
    MLPClassifier((16,), max_iter=30, learning_rate_init=0.01, random_state=0),
    MLPClassifier((16,), activation="tanh", max_iter=30, learning_rate_init=0.01, random_state=0),
    NeuralNetClassifier(TwoDense(), max_iter=30, learning_rate_init=0.01, random_state=0),
], ids=["relu", "tanh", "build_fn"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_integer_sample_weights_train_as_repeated_samples(estimator, sparse):
    """scikit-learn's equivalence check (listed as an expected failure above for its float64
    tolerance): 15 samples weighted 0-4 against the same samples repeated that often, one batch
    each, float32's tolerance."""
    rng = np.random.RandomState(42)
    X, y = rng.rand(15, 30), np.arange(15) % 3
    counts = rng.randint(0, 5, size=15)
    counts[:6] = (0, 0, 1, 4, 2, 3)  # two samples left out; every class kept
    to = scipy.sparse.csr_matrix if sparse else np.asarray
    weighted = clone(estimator).fit(to(X), y, sample_weight=counts)
    repeated = clone(estimator).fit(to(X.repeat(counts, axis=0)), y.repeat(counts))
    np.testing.assert_allclose(weighted.predict_proba(X), repeated.predict_proba(X), rtol=1e-5, atol=1e-6)
    unweighted = clone(estimator).fit(to(X), y)
    assert np.abs(unweighted.predict_proba(X) - repeated.predict_proba(X)).max() > 1e-3  # the weights mattered


def test_early_stopping_scores_the_validation_samples_with_their_weights():
    """The held-out samples keep their weights, as in scikit-learn: the score kept is their
    weighted accuracy; the split is the one without weights."""
    X, y = blobs(n=300, seed=1)
    weights = np.random.default_rng(0).uniform(0, 3, size=300)
    params = dict(hidden_layer_sizes=(8,), early_stopping=True, validation_fraction=0.2, n_iter_no_change=3,
                  tol=0.05, max_iter=200, learning_rate_init=0.05, random_state=0)
    clf = MLPClassifier(**params).fit(X, y, sample_weight=weights)
    assert clf.best_validation_score_ == max(clf.validation_scores_)
    _, X_val, _, y_val, _, w_val = train_test_split(X, y, weights, test_size=0.2, stratify=y,
                                                    random_state=np.random.RandomState(0))
    assert clf.score(X_val, y_val, sample_weight=w_val) == pytest.approx(clf.best_validation_score_, abs=1e-12)


def test_sample_weight_goes_where_scikit_learn_passes_it():
    """``partial_fit(X, y, sample_weight, classes)`` positionally, as scikit-learn's; routed
    through a Pipeline's ``fit`` and ``cross_val_score``'s ``params``; a bad one refused by name."""
    X, y = blobs()
    weights = np.random.default_rng(1).uniform(0.5, 2, size=len(y))
    params = dict(hidden_layer_sizes=(8,), max_iter=5, random_state=0)
    by_position = MLPClassifier(**params).partial_fit(X, y, weights, [0, 1, 2])
    by_name = MLPClassifier(**params).partial_fit(X, y, classes=[0, 1, 2], sample_weight=weights)
    np.testing.assert_array_equal(by_position.predict_proba(X), by_name.predict_proba(X))
    pipe = make_pipeline(StandardScaler(), MLPClassifier(**params)).fit(X, y, mlpclassifier__sample_weight=weights)
    alone = MLPClassifier(**params).fit(StandardScaler().fit_transform(X), y, sample_weight=weights)
    np.testing.assert_array_equal(pipe[-1].coefs_[0], alone.coefs_[0])
    assert len(cross_val_score(MLPClassifier(**params), X, y, cv=3, params={"sample_weight": weights})) == 3
    with pytest.raises(ValueError, match="Negative values in data passed to `sample_weight`"):
        MLPClassifier(**params).fit(X, y, sample_weight=-weights)
    with pytest.raises(ValueError, match=r"sample_weight.shape == \(119,\), expected \(120,\)"):
        MLPClassifier(**params).fit(X, y, sample_weight=weights[1:])


def test_sparse_input_gives_what_dense_input_gives():
    X, y = blobs()
    X[X < 0] = 0
    dense = MLPClassifier((8,), max_iter=5, random_state=0).fit(X, y)
    sparse = MLPClassifier((8,), max_iter=5, random_state=0).fit(scipy.sparse.csr_matrix(X), y)
    np.testing.assert_array_equal(sparse.predict_proba(scipy.sparse.csc_matrix(X)), dense.predict_proba(X))


@pytest.mark.parametrize("layout", ["dense", "csr", "csc"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_x_is_refused_by_the_model_naming_where(layout, bad):
    """scikit-learn's own finiteness pass is off (the model checks): fit and predict still
    refuse NaN and inf, dense or sparse, naming the row and column."""
    X, y = blobs()
    X[X < 0] = 0
    X[7, 1] = bad
    as_layout = {"dense": np.asarray, "csr": scipy.sparse.csr_matrix, "csc": scipy.sparse.csc_matrix}[layout]
    with pytest.raises(ValueError, match=r"NaN or inf \(first at row 7, column 1"):
        MLPClassifier((8,), max_iter=2).fit(as_layout(X), y)
    good = X.copy()
    good[7, 1] = 1.0
    clf = MLPClassifier((8,), max_iter=2).fit(as_layout(good), y)
    with pytest.raises(ValueError, match=r"NaN or inf \(first at row 7, column 1"):
        clf.predict(as_layout(X))


def test_a_fitted_estimator_pickles_and_predicts_the_same():
    X, y = blobs()
    clf = MLPClassifier((8,), max_iter=5, random_state=0).fit(X, y)
    buffer = io.BytesIO()
    joblib.dump(clf, buffer)
    buffer.seek(0)
    same = joblib.load(buffer)
    np.testing.assert_array_equal(same.predict_proba(X), clf.predict_proba(X))
    same.partial_fit(X, y)  # the optimizer's state came along too
    clf.partial_fit(X, y)
    np.testing.assert_array_equal(same.predict_proba(X), clf.predict_proba(X))


def test_the_estimator_trains_on_each_backend(backend):
    X, y = blobs()
    clf = MLPClassifier((8,), max_iter=30, learning_rate_init=0.02, random_state=0, backend=backend).fit(X, y)
    reference = MLPClassifier((8,), max_iter=30, learning_rate_init=0.02, random_state=0, backend="cpu").fit(X, y)
    assert clf.model_.backend is backend and clf.score(X, y) > 0.9
    np.testing.assert_allclose(clf.predict_proba(X), reference.predict_proba(X), atol=1e-4)


# -- networks from a function: CNNs ---------------------------------------------------------------

def test_a_cnn_from_a_function_learns_the_digits(digits):
    X_train, X_test, y_train, y_test = digits
    clf = NeuralNetClassifier(small_cnn, input_shape=(8, 8, 1), max_iter=15, learning_rate_init=0.01,
                              random_state=0).fit(X_train, y_train)
    assert isinstance(clf.model_.layers[0], Conv2D) and clf.model_.input_shape == (8, 8, 1)
    assert clf.score(X_test, y_test) > 0.9
    same = joblib.load(_dumped(clf))
    np.testing.assert_array_equal(same.predict_proba(X_test), clf.predict_proba(X_test))


def shifted_cnn(n_classes):
    return [RandomShift(1), *small_cnn(n_classes)]


def test_a_cnn_with_random_shifts_trains_reproducibly_and_predicts_without_them(digits):
    X_train, X_test, y_train, y_test = digits
    fit = lambda: NeuralNetClassifier(shifted_cnn, input_shape=(8, 8, 1), max_iter=15,  # noqa: E731
                                      learning_rate_init=0.01, random_state=0).fit(X_train, y_train)
    clf = fit()
    assert isinstance(clf.model_.layers[0], RandomShift) and clf.score(X_test, y_test) > 0.8  # 1 px of 8 is a lot
    np.testing.assert_array_equal(fit().predict_proba(X_test), clf.predict_proba(X_test))  # seeded shifts
    np.testing.assert_array_equal(clf.predict_proba(X_test), clf.predict_proba(X_test))  # no shift at inference


def _dumped(obj):
    buffer = io.BytesIO()
    joblib.dump(obj, buffer)
    buffer.seek(0)
    return buffer


def test_a_network_that_does_not_fit_the_data_is_refused_by_name(digits):
    X_train, _, y_train, _ = digits
    with pytest.raises(ValueError, match=r"input_shape=\(7, 7, 1\) holds 49 values but X has 64 features"):
        NeuralNetClassifier(small_cnn, input_shape=(7, 7, 1)).fit(X_train, y_train)
    with pytest.raises(ValueError, match="the network outputs 4 scores but y has 10 classes"):
        NeuralNetClassifier(lambda n_classes: [Dense(4)]).fit(X_train, y_train)


# -- inside scikit-learn's tools ------------------------------------------------------------------

def test_pipeline_and_cross_val_score(digits):
    X_train, _, y_train, _ = digits
    pipe = make_pipeline(StandardScaler(), MLPClassifier((32,), max_iter=20, learning_rate_init=0.01, random_state=0))
    scores = cross_val_score(pipe, X_train, y_train, cv=3)
    assert scores.shape == (3,) and scores.min() > 0.9


def test_grid_search_in_two_processes(digits):
    """n_jobs=2 sends estimators to worker processes and fitted ones back: by pickle."""
    X_train, X_test, y_train, y_test = digits
    search = GridSearchCV(MLPClassifier(max_iter=10, random_state=0),
                          {"hidden_layer_sizes": [(8,), (32,)], "learning_rate_init": [1e-3, 1e-2]}, cv=2, n_jobs=2)
    search.fit(X_train, y_train)
    assert search.best_params_ == {"hidden_layer_sizes": (32,), "learning_rate_init": 1e-2}
    assert search.best_estimator_.score(X_test, y_test) > 0.9
    assert len(search.cv_results_["mean_test_score"]) == 4
