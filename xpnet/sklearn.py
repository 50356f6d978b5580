"""scikit-learn estimators over xpnet models: ``MLPClassifier`` (a drop-in for scikit-learn's)
and ``NeuralNetClassifier`` (any ``Sequential``, from a function that builds its layers).

    >>> from xpnet.sklearn import MLPClassifier
    >>> clf = MLPClassifier(hidden_layer_sizes=(50, 25), max_iter=10, random_state=0)  # doctest: +SKIP
    >>> clf.fit(X_train / 255, y_train).score(X_test / 255, y_test)                     # doctest: +SKIP

They follow scikit-learn's conventions (hyperparameters only in ``__init__``, ``fit`` returns
``self``, any labels, sparse input) and take the parameters of ``sklearn.neural_network.
MLPClassifier`` that xpnet supports, with their meaning. Needs scikit-learn
(``pip install 'xpnet[sklearn]'``); ``import xpnet`` never imports it.
"""

from __future__ import annotations

import math
import numbers
import types
import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import _check_partial_fit_first_call, check_classification_targets, unique_labels
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data

from .backend import Backend
from .callbacks import Callback
from .layers import Dense
from .model import Sequential
from .optim import SGD, Adam

__all__ = ["MLPClassifier", "NeuralNetClassifier"]

#: scikit-learn's activation names -> xpnet's
_ACTIVATIONS = {"relu": "relu", "tanh": "tanh", "logistic": "sigmoid", "identity": None}


class _KernelL2:
    """scikit-learn's L2 penalty: ``alpha / (2 n) ||W||^2`` per batch of ``n`` samples (``n``
    the batch's summed sample weight, where it has them), on the kernels (parameters of 2 or
    more axes) and not on the biases; its gradient ``alpha / n * W`` joins each kernel's
    gradient before the update. ``penalty_share()``: the sum over the batches since the last
    call of their rows over their weight, which scales the penalty in the epoch's loss."""

    alpha = 0.0  # (the estimator sets it)
    _decay = 0.0
    _share = 0.0

    def start_batch(self, rows, weight):
        self._decay = self.alpha / weight if weight > 0 else 0.0
        self._share += rows / weight if weight > 0 else 0.0

    def penalty_share(self) -> float:
        share, self._share = self._share, 0.0
        return share

    def _coupled_decay(self, p):
        return self._decay if p.ndim > 1 else 0.0


class _SGD(_KernelL2, SGD):
    """scikit-learn's SGD rate: ``rate``, which ``learning_rate="invscaling"`` lowers after each
    epoch and ``"adaptive"`` divides by 5 when progress stalls (the estimator sets it).

    scikit-learn's velocity is ``-lr * v`` of xpnet's (``v = momentum * v - lr * g``, the rate
    inside it): where the rate changes, ``v`` is rescaled so that the velocity goes on as
    scikit-learn's does."""

    def __init__(self, lr, **kwargs):
        super().__init__(lr, **kwargs)
        self.rate = self.base_lr

    def start_epoch(self, epoch, epochs):
        if self.rate != self.lr:
            for entry in self.state or ():
                if "v" in entry:
                    entry["v"] *= self.lr / self.rate
        self.lr = self.rate


class _Adam(_KernelL2, Adam):
    """scikit-learn's Adam adds ``epsilon`` to ``sqrt(v)`` before the bias correction: that is
    xpnet's Adam with ``eps = epsilon / sqrt(1 - beta_2**t)`` at step ``t``. It matters where
    gradients are as small as ``epsilon`` (weights of always-zero pixels, moved by alpha alone)."""

    def __init__(self, lr, *, betas, eps):
        super().__init__(lr, betas=betas, eps=eps)
        self.epsilon = self.eps

    def _corrections(self, t):
        step, bias2, _ = super()._corrections(t)
        return step, bias2, self.epsilon / math.sqrt(1 - self.beta2**t)


class _EpochEnd(Callback):
    """Hands each epoch's metrics to the estimator, which says whether to stop."""

    def __init__(self, estimator, n_samples):
        self.estimator, self.n_samples = estimator, n_samples

    def on_epoch_end(self, epoch, logs):
        if self.estimator._end_epoch(logs, self.n_samples):
            self.model.stop_training = True


_TRAINING_CONSTRAINTS = {
    "solver": [StrOptions({"sgd", "adam", "lbfgs"})],  # "lbfgs" gets an error of its own
    "alpha": [Interval(numbers.Real, 0, None, closed="left")],
    "batch_size": [StrOptions({"auto"}), Interval(numbers.Integral, 1, None, closed="left")],
    "learning_rate": [StrOptions({"constant", "invscaling", "adaptive"})],
    "learning_rate_init": [Interval(numbers.Real, 0, None, closed="neither")],
    "power_t": [Interval(numbers.Real, 0, None, closed="left")],
    "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
    "shuffle": ["boolean"],
    "random_state": ["random_state"],
    "tol": [Interval(numbers.Real, 0, None, closed="left")],
    "verbose": ["verbose"],
    "warm_start": ["boolean"],
    "momentum": [Interval(numbers.Real, 0, 1, closed="left")],
    "nesterovs_momentum": ["boolean"],
    "early_stopping": ["boolean"],
    "validation_fraction": [Interval(numbers.Real, 0, 1, closed="neither")],
    "beta_1": [Interval(numbers.Real, 0, 1, closed="left")],
    "beta_2": [Interval(numbers.Real, 0, 1, closed="left")],
    "epsilon": [Interval(numbers.Real, 0, None, closed="neither")],
    "n_iter_no_change": [Interval(numbers.Integral, 1, None, closed="left")],
    "backend": [None, StrOptions({"auto", "cpu", "cuda"}), Backend, types.ModuleType],
}


def _keep_parameters(estimator, arguments: dict) -> None:
    """scikit-learn's convention: ``__init__`` stores each of its arguments, unchanged, under its name."""
    for name, value in arguments.items():
        if name != "self":
            setattr(estimator, name, value)


class _NeuralNetBase(ClassifierMixin, BaseEstimator):
    """What both classifiers share: the training loop and the fitted attributes. A subclass
    says how to build its network (``_layers``, ``_input_shape``)."""

    def _layers(self, n_features: int, n_classes: int) -> list:
        raise NotImplementedError

    def _input_shape(self, n_features: int) -> tuple:
        return (n_features,)

    # -- the public methods ----------------------------------------------------------------------

    def fit(self, X, y, sample_weight=None):
        """Train on ``(X, y)`` for up to ``max_iter`` epochs; returns ``self``.

        With ``warm_start`` a fitted network goes on from its weights (with a fresh optimizer,
        as in scikit-learn), else it starts from new ones. ``sample_weight`` (shape
        (n_samples,), >= 0) weighs each sample's loss as scikit-learn's does: each batch's
        gradient is of its weighted mean loss, the penalty divided by the batch's summed weight,
        and the validation score of ``early_stopping`` weighted too.
        """
        self._validate_params()
        return self._fit(X, y, sample_weight, incremental=False)

    def partial_fit(self, X, y, sample_weight=None, classes=None):
        """One epoch over ``(X, y)`` from the current weights and optimizer state; returns ``self``.

        ``classes`` (every label the network will see) is needed on the first call only;
        ``sample_weight`` as in ``fit``.
        """
        self._validate_params()
        if self.early_stopping:
            raise ValueError("partial_fit does not support early_stopping=True")
        _check_partial_fit_first_call(self, classes)  # sets classes_ on the first call
        return self._fit(X, y, sample_weight, incremental=True)

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities, shape (n_samples, n_classes), columns in ``classes_`` order."""
        check_is_fitted(self)
        return self.model_.predict_proba(self._validate_X(X, reset=False))

    def predict_log_proba(self, X) -> np.ndarray:
        """``log(predict_proba(X))``."""
        return np.log(self.predict_proba(X))

    def predict(self, X) -> np.ndarray:
        """Predicted labels, shape (n_samples,), from ``classes_``."""
        check_is_fitted(self)
        return self.classes_[self.model_.predict(self._validate_X(X, reset=False))]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags

    # -- training -------------------------------------------------------------------------------

    def _validate_X(self, X, *, reset):
        return validate_data(self, X, reset=reset, **_CHECK_X)

    def _fit(self, X, y, sample_weight, *, incremental):
        if self.solver == "lbfgs":
            raise ValueError(
                "solver='lbfgs' is not supported by xpnet (full-batch quasi-Newton); use solver='adam' or 'sgd'"
            )
        first_pass = not hasattr(self, "model_") or not (self.warm_start or incremental)
        X, y = validate_data(self, X, y, reset=first_pass, **_CHECK_X)
        check_classification_targets(y)
        if sample_weight is not None:
            sample_weight = _check_sample_weight(sample_weight, X, dtype=np.float64, ensure_non_negative=True)
        if first_pass and not incremental:
            self.classes_ = unique_labels(y)
        labels = self._check_labels(y, same_set=self.warm_start and not first_pass and not incremental)
        if first_pass:
            self._initialize(X.shape[1])
        if first_pass or (self.validation_scores_ is not None) != self.early_stopping:
            self._reset_improvement()  # (a warm start may switch early_stopping)
        val = self._weighted_val = None
        if self.early_stopping:
            arrays = (X, labels) if sample_weight is None else (X, labels, sample_weight)
            parts = train_test_split(
                *arrays, test_size=self.validation_fraction, stratify=labels,
                random_state=check_random_state(self.random_state),
            )
            X, X_val, labels, y_val = parts[:4]
            if X_val.shape[0] < 2:
                raise ValueError(
                    f"the validation set is too small ({X_val.shape[0]} samples): "
                    f"raise validation_fraction={self.validation_fraction} or give more data"
                )
            if sample_weight is None:
                val = (X_val, y_val)  # scored by fit
            else:  # scored here, weighted (_end_epoch)
                sample_weight, self._weighted_val = parts[4], (X_val, y_val, parts[5])
        n, batch_size = X.shape[0], self._batch_size(X.shape[0])
        if not incremental or not hasattr(self, "_optimizer"):
            self._optimizer = self._make_optimizer()
        self._optimizer.alpha = self.alpha
        self._optimizer.penalty_share()  # (a fit cut short may have left some)
        self.n_iter_ = 0
        self._stopped = False
        self.model_.fit(
            X, labels, epochs=1 if incremental else self.max_iter, batch_size=batch_size,
            optimizer=self._optimizer, shuffle=self.shuffle, validation_data=val, verbose=0,
            callbacks=[_EpochEnd(self, n)], on_divergence="ignore", sample_weight=sample_weight,
        )
        if self.early_stopping:
            self.model_.set_weights(self._best_weights)
        if not incremental and not self._stopped and self.n_iter_ == self.max_iter:
            warnings.warn(
                f"Stochastic Optimizer: Maximum iterations ({self.max_iter}) reached and the optimization "
                "hasn't converged yet.", ConvergenceWarning, stacklevel=3,
            )
        return self

    def _check_labels(self, y, *, same_set):
        """``y`` as indices into ``classes_``; labels outside ``classes_`` are an error."""
        if len(self.classes_) < 2:
            raise ValueError(f"a classifier needs at least 2 classes; got 1 class: {self.classes_[0]!r}")
        present = unique_labels(y)
        unknown = np.setdiff1d(present, self.classes_)
        if same_set and not np.array_equal(present, self.classes_):
            raise ValueError(
                f"warm_start needs y with the classes of the previous fit, {self.classes_.tolist()}; "
                f"y has {present.tolist()}"
            )
        if unknown.size:
            raise ValueError(f"y has classes not in classes_ {self.classes_.tolist()}: {unknown.tolist()}")
        return np.searchsorted(self.classes_, y)

    def _initialize(self, n_features):
        """A new network, and scikit-learn's bookkeeping for a first fit."""
        n_classes = len(self.classes_)
        self.model_ = Sequential(self._layers(n_features, n_classes), input_shape=self._input_shape(n_features),
                                 seed=_seed(self.random_state), backend=self.backend)
        if self.model_.n_classes != n_classes:
            raise ValueError(f"the network outputs {self.model_.n_classes} scores but y has {n_classes} classes")
        self.loss_curve_ = []
        self.t_ = 0

    def _reset_improvement(self):
        self._no_improvement_count = 0
        self._best_weights = self.model_.get_weights()
        if self.early_stopping:
            self.validation_scores_, self.best_validation_score_, self.best_loss_ = [], -np.inf, None
        else:
            self.validation_scores_, self.best_validation_score_, self.best_loss_ = None, None, np.inf

    def _make_optimizer(self):
        if self.solver == "sgd":
            nesterov = self.nesterovs_momentum and self.momentum > 0  # scikit-learn allows it at 0: plain SGD
            return _SGD(self.learning_rate_init, momentum=self.momentum, nesterov=nesterov)
        return _Adam(self.learning_rate_init, betas=(self.beta_1, self.beta_2), eps=self.epsilon)

    def _batch_size(self, n_samples):
        if self.batch_size == "auto":
            return min(200, n_samples)
        if self.batch_size > n_samples:
            warnings.warn(f"batch_size={self.batch_size} is larger than the {n_samples} samples: clipped to "
                          f"{n_samples}", stacklevel=4)
        return min(self.batch_size, n_samples)

    def _end_epoch(self, logs, n_samples) -> bool:
        """scikit-learn's end of an epoch: record the loss, count epochs without improvement
        by ``tol`` (of the validation accuracy with ``early_stopping``, else of the training
        loss), keep the best weights; ``True`` when ``n_iter_no_change`` is exceeded.

        The loss is the epoch's mean cross-entropy plus the L2 penalty as scikit-learn sums it
        (``alpha / (2 n_batch) ||W||^2`` per batch, weighted by its size), taken at the
        epoch's final weights rather than at each batch's.
        """
        xp = self.model_.backend.xp
        squares = sum(float(xp.sum(p * p)) for p in self.model_.parameters() if p.ndim > 1)
        self.loss_ = logs["loss"] + 0.5 * self.alpha * squares * self._optimizer.penalty_share() / n_samples
        self.loss_curve_.append(self.loss_)
        self.n_iter_ += 1
        self.t_ += n_samples
        if self.verbose:
            print(f"Iteration {self.n_iter_}, loss = {self.loss_:.8f}")
        if self.early_stopping:
            if self._weighted_val is None:
                score = logs["val_accuracy"]
            else:
                X_val, y_val, w_val = self._weighted_val
                score = float(np.average(self.model_.predict(X_val) == y_val, weights=w_val))
            self.validation_scores_.append(score)
            if self.verbose:
                print(f"Validation score: {score:f}")
            improved = score >= self.best_validation_score_ + self.tol
            if score > self.best_validation_score_:
                self.best_validation_score_ = score
                self._best_weights = self.model_.get_weights()
        else:
            improved = self.loss_ <= self.best_loss_ - self.tol
            self.best_loss_ = min(self.best_loss_, self.loss_)
        self._no_improvement_count = 0 if improved else self._no_improvement_count + 1
        sgd = self._optimizer if self.solver == "sgd" else None
        if sgd is not None and self.learning_rate == "invscaling":
            sgd.rate = self.learning_rate_init / (self.t_ + 1) ** self.power_t
        if self._no_improvement_count <= self.n_iter_no_change:
            return False
        what = "Validation score" if self.early_stopping else "Training loss"
        said = f"{what} did not improve more than tol={self.tol:f} for {self.n_iter_no_change} consecutive epochs."
        if sgd is not None and self.learning_rate == "adaptive":
            if sgd.rate > 1e-6:  # stalled: a fifth of the rate, and go on
                sgd.rate /= 5.0
                self._no_improvement_count = 0
                if self.verbose:
                    print(f"{said} Setting learning rate to {sgd.rate:f}")
                return False
            said += " Learning rate too small."
        if self.verbose:
            print(f"{said} Stopping.")
        self._stopped = True
        return True


# sparse matrices stay sparse: the model takes them as they are (``xpnet.sparse``); NaN and inf
# are the model's to refuse (its message names the first one; scikit-learn's check of MNIST
# would add a second pass over 188 MB, 12 ms a fit)
_CHECK_X = {"accept_sparse": ["csr", "csc"], "dtype": (np.float32, np.float64), "ensure_all_finite": False}


def _seed(random_state) -> int:
    """The model's seed: an int as it is (so ``random_state=0`` starts where ``seed=0`` does),
    else one drawn from the RandomState (None: the global one)."""
    if isinstance(random_state, numbers.Integral):
        return int(random_state)
    return int(check_random_state(random_state).randint(np.iinfo(np.int32).max))


_TRAINING_PARAMETERS = """\
    solver : {"adam", "sgd"}, default="adam"
        "lbfgs" (full-batch quasi-Newton) is not supported: a ``ValueError`` says so.
    alpha : float, default=1e-4
        L2 penalty, as in scikit-learn: each batch of ``n`` samples adds ``alpha / (2 n) *
        ||W||^2`` over the kernels (not the biases) to the mean cross-entropy, so each kernel's
        gradient gets ``alpha / n * W`` (``n``: the batch's summed ``sample_weight`` where
        ``fit`` is given one).
    batch_size : int or "auto", default="auto"
        "auto" is ``min(200, n_samples)``; larger than ``n_samples``: clipped, with a warning.
    learning_rate : {"constant", "invscaling", "adaptive"}, default="constant"
        SGD's rate, as in scikit-learn (Adam's is always ``learning_rate_init``): constant;
        after each epoch ``learning_rate_init / (t_ + 1) ** power_t`` (``t_``: samples seen);
        or constant while the epochs improve, divided by 5 each time more than
        ``n_iter_no_change`` epochs in a row do not (instead of stopping), until it is at most
        1e-6.
    learning_rate_init : float, default=1e-3
        The (initial) learning rate.
    power_t : float, default=0.5
        The exponent of ``learning_rate="invscaling"``.
    max_iter : int, default=200
        Epochs (passes over the data) per ``fit``.
    shuffle : bool, default=True
        Reshuffle the samples every epoch.
    random_state : int, RandomState or None, default=None
        Seeds the initial weights, shuffling, dropout and the ``early_stopping`` split. An int
        is the model's seed as it is (``random_state=0`` starts from the weights of
        ``seed=0``); the same int gives bit-identical results.
    tol : float, default=1e-4
        An epoch improves when the training loss falls (or, with ``early_stopping``, the
        validation accuracy rises) by at least ``tol`` on the best so far.
    verbose : bool, default=False
        Print the loss (and validation score) of each epoch.
    warm_start : bool, default=False
        ``fit`` continues from the fitted weights (y must have the same classes), with a new
        optimizer, ``loss_curve_`` growing on.
    momentum : float in [0, 1), default=0.9
        SGD only: ``v = momentum * v - lr * g`` (scikit-learn's form of xpnet's ``SGD``).
    nesterovs_momentum : bool, default=True
        SGD only, with ``momentum > 0``.
    early_stopping : bool, default=False
        Hold out ``validation_fraction`` of the data (stratified) and stop when its accuracy
        has not improved by ``tol`` for more than ``n_iter_no_change`` epochs; the weights of
        the best epoch are kept.
    validation_fraction : float in (0, 1), default=0.1
    beta_1, beta_2, epsilon : float, defaults 0.9, 0.999, 1e-8
        Adam's, as scikit-learn uses them (``epsilon`` added to ``sqrt(v)`` before the bias
        correction, where ``xpnet.optim.Adam`` adds it after).
    n_iter_no_change : int, default=10
        Stop after more than this many epochs without improvement by ``tol`` (SGD with
        ``learning_rate="adaptive"``: lower the rate instead, while it is above 1e-6).
    backend : "cpu", "cuda", "auto", a Backend, a namespace module or None, default=None
        Where the network trains and predicts (None: xpnet's current default). X and y are
        host arrays either way.
"""

_ATTRIBUTES = """\
    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        The labels (any sortable labels: strings, 1-based, ...), sorted.
    model_ : xpnet.Sequential
        The trained network (``save``, ``summary``, ``get_weights``; pickles with the estimator).
    n_features_in_ : int; feature_names_in_ : ndarray (given a DataFrame with string column names)
    n_iter_ : int
        Epochs run by the last ``fit`` (1 after ``partial_fit``).
    t_ : int
        Training samples seen, over all calls.
    loss_, loss_curve_ : float, list of float
        The last and every epoch's training loss (cross-entropy plus the L2 penalty, taken at the
        epoch's end weights).
    best_loss_ : float or None
        The lowest training loss (None with ``early_stopping``).
    validation_scores_, best_validation_score_ : list of float, float (None without early_stopping)
"""


class MLPClassifier(_NeuralNetBase):
    __doc__ = f"""A multi-layer perceptron classifier: scikit-learn's ``MLPClassifier``, trained by xpnet.

    The same parameters with the same meanings (those listed here), plus ``backend``;
    ``fit`` builds ``n_features -> hidden_layer_sizes -> n_classes`` Dense layers with
    Glorot-uniform weights (scikit-learn's for relu and tanh), zero biases and a softmax output
    trained on the mean cross-entropy (also for 2 classes, where scikit-learn has one logistic
    unit). X is used as numbers: pixels are not rescaled (give ``X / 255``, as to scikit-learn).
    Not supported: ``solver="lbfgs"`` (so ``max_fun``, its limit, is kept but unused),
    multilabel y.

    Parameters
    ----------
    hidden_layer_sizes : tuple of int, default=(100,)
        The widths of the hidden layers.
    activation : {{"relu", "tanh", "logistic", "identity"}}, default="relu"
        Of the hidden layers ("logistic" is xpnet's "sigmoid").
{_TRAINING_PARAMETERS}    max_fun : int, default=15000
        The limit of loss evaluations of ``solver="lbfgs"``: taken, so that scikit-learn's
        parameters all fit, but unused.
{_ATTRIBUTES}
    coefs_, intercepts_ : lists of ndarray
        Copies of each layer's kernel (n_in, n_out) and bias, as scikit-learn names them.
    n_layers_ : int
        The input, the hidden layers and the output, as scikit-learn counts them.
    n_outputs_ : int; out_activation_ : str
        One output unit per class, ``"softmax"`` (for 2 classes: 2 units, where scikit-learn
        has 1, ``"logistic"``).
    """

    _parameter_constraints = {
        "hidden_layer_sizes": ["array-like", Interval(numbers.Integral, 1, None, closed="left")],
        "activation": [StrOptions(set(_ACTIVATIONS))],
        "max_fun": [Interval(numbers.Integral, 1, None, closed="left")],
        **_TRAINING_CONSTRAINTS,
    }

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam", alpha=1e-4,
                 batch_size="auto", learning_rate="constant", learning_rate_init=1e-3, power_t=0.5, max_iter=200,
                 shuffle=True, random_state=None, tol=1e-4, verbose=False, warm_start=False, momentum=0.9,
                 nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1, beta_1=0.9, beta_2=0.999,
                 epsilon=1e-8, n_iter_no_change=10, max_fun=15000, backend=None):
        _keep_parameters(self, locals())

    def _layers(self, n_features, n_classes):
        sizes = np.atleast_1d(self.hidden_layer_sizes).tolist()
        if not all(isinstance(w, int) and w >= 1 for w in sizes):
            raise ValueError(f"hidden_layer_sizes must be positive integers, got {self.hidden_layer_sizes!r}")
        act = _ACTIVATIONS[self.activation]
        return [*(Dense(w, activation=act, init="glorot") for w in sizes), Dense(n_classes, init="glorot")]

    @property
    def coefs_(self) -> list:
        return self.model_.get_weights()[0::2]

    @property
    def intercepts_(self) -> list:
        return self.model_.get_weights()[1::2]

    @property
    def n_layers_(self) -> int:
        return len(self.model_.layers) + 1

    @property
    def n_outputs_(self) -> int:
        return self.model_.n_classes

    @property
    def out_activation_(self) -> str:
        self.model_  # noqa: B018 - unfitted: AttributeError, as scikit-learn's
        return "softmax"


class NeuralNetClassifier(_NeuralNetBase):
    __doc__ = f"""Any xpnet network as a scikit-learn classifier: CNNs and other ``Sequential`` stacks.

    ``fit`` calls ``build_fn(n_classes)`` for the layers (its last layer must output
    ``n_classes`` scores) and trains them as ``MLPClassifier`` does, with the same parameters.

        >>> from xpnet.layers import AvgPool2D, Conv2D, Dense, Flatten
        >>> def lenet(n_classes):
        ...     return [Conv2D(6, 3, activation="relu"), AvgPool2D(2), Flatten(), Dense(n_classes)]
        >>> clf = NeuralNetClassifier(lenet, input_shape=(28, 28, 1), max_iter=5)  # doctest: +SKIP
        >>> clf.fit(X.reshape(len(X), -1) / 255, y)                                # doctest: +SKIP

    Parameters
    ----------
    build_fn : callable ``n_classes -> list of xpnet.layers.Layer``
        Called on every fresh fit, so each fit gets new layers. A function defined at a
        module's top level pickles (``GridSearchCV(n_jobs=...)`` and ``joblib.dump`` need that).
    input_shape : tuple of int or None, default=None
        The shape each row of X is read as, e.g. ``(28, 28, 1)`` for channels-last images (X
        stays 2-D, ``(n_samples, 784)``, as scikit-learn wants); None: flat rows.
{_TRAINING_PARAMETERS}
{_ATTRIBUTES}
    """

    _parameter_constraints = {
        "build_fn": [callable],
        "input_shape": [None, tuple],
        **_TRAINING_CONSTRAINTS,
    }

    def __init__(self, build_fn, *, input_shape=None, solver="adam", alpha=1e-4, batch_size="auto",
                 learning_rate="constant", learning_rate_init=1e-3, power_t=0.5, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, verbose=False, warm_start=False, momentum=0.9, nesterovs_momentum=True,
                 early_stopping=False, validation_fraction=0.1, beta_1=0.9, beta_2=0.999, epsilon=1e-8,
                 n_iter_no_change=10, backend=None):
        _keep_parameters(self, locals())

    def _layers(self, n_features, n_classes):
        return self.build_fn(n_classes)

    def _input_shape(self, n_features):
        if self.input_shape is None:
            return (n_features,)
        if int(np.prod(self.input_shape)) != n_features:
            raise ValueError(
                f"input_shape={self.input_shape} holds {int(np.prod(self.input_shape))} values but X has "
                f"{n_features} features per row"
            )
        return self.input_shape
