"""``MLP``: a multi-layer perceptron over ``Dense`` layers, with fit/predict/evaluate/save."""

from __future__ import annotations

import numpy as np

from . import functional as F
from .backend import get_backend
from .layers import INITS, Dense, check_activation, init_weights

__all__ = ["MLP"]

_DTYPES = ("float32", "float64")
_PREDICT_CHUNK = 8192  # rows per forward pass when predicting: bounds the memory of big inputs


def _dtype_name(dtype) -> str:
    name = getattr(dtype, "__name__", None) or str(dtype)
    name = {"float": "float64", "double": "float64", "single": "float32"}.get(name, name)
    name = np.dtype(name).name if name in ("f4", "f8", "<f4", "<f8") else name
    if name not in _DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return name


class MLP:
    """A fully connected network ``layers[0] -> ... -> layers[-1]`` trained on cross-entropy.

    Parameters
    ----------
    layers : sequence of int
        Widths from the input features to the number of classes, e.g. ``[784, 50, 25, 10]``.
    activation : {"relu", "tanh", "sigmoid"}
        Activation of every hidden layer; the last layer outputs logits.
    init : {"he", "glorot"}
        Weight initialisation (biases start at zero). Weights are drawn on the host from one
        seeded generator, so every backend starts from identical weights.
    dtype : {"float32", "float64"}
    seed : int or None
        Seeds the initial weights and the shuffling: the same seed on the same data gives
        bit-identical weights on a re-run.
    backend : "cpu", "cuda", "auto", a Backend, a namespace module, or None (the current default).
    """

    def __init__(self, layers, activation="relu", init="he", dtype="float32", seed=None, backend=None):
        if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
            raise TypeError(f"layers must be a sequence of layer widths such as [784, 50, 10], got {layers!r}")
        widths = list(layers)
        if len(widths) < 2:
            raise ValueError(f"layers needs at least an input and an output width, got {widths!r}")
        for w in widths:
            if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1:
                raise ValueError(f"layer widths must be positive integers, got {w!r} in {widths!r}")
        if widths[-1] < 2:
            raise ValueError(f"the output layer needs at least 2 classes, got {widths[-1]}")
        check_activation(activation)
        if activation is None:
            raise ValueError("activation must be one of 'relu', 'tanh', 'sigmoid'")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}: expected one of {INITS}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")

        self.backend = get_backend(backend)
        self.dtype = _dtype_name(dtype)
        self.widths = [int(w) for w in widths]
        self.activation, self.init, self.seed = activation, init, seed
        self.stop_training = False
        self._rng = np.random.default_rng(seed)
        xp = self.backend.xp
        self._xp_dtype = getattr(xp, self.dtype)
        self.layers = []
        for i, (fan_in, fan_out) in enumerate(zip(self.widths[:-1], self.widths[1:])):
            W = init_weights(self._rng, fan_in, fan_out, init).astype(self.dtype)
            b = np.zeros(fan_out, dtype=self.dtype)
            act = activation if i < len(self.widths) - 2 else None
            self.layers.append(Dense(self._to_device(W), self._to_device(b), activation=act))

    # -- description ------------------------------------------------------------------------

    @property
    def n_features(self) -> int:
        return self.widths[0]

    @property
    def n_classes(self) -> int:
        return self.widths[-1]

    @property
    def config(self) -> dict:
        """What it takes to rebuild this model (weights aside)."""
        return {
            "layers": list(self.widths),
            "activation": self.activation,
            "init": self.init,
            "dtype": self.dtype,
            "seed": self.seed,
        }

    def count_params(self) -> int:
        """Number of trainable parameters (784-50-25-10 has 40,785)."""
        return sum(a * b + b for a, b in zip(self.widths[:-1], self.widths[1:]))

    def __repr__(self):
        widths = "-".join(map(str, self.widths))
        return f"MLP({widths}, activation={self.activation!r}, dtype={self.dtype!r}, backend={self.backend.name!r})"

    # -- forward / backward -----------------------------------------------------------------

    def parameters(self) -> list:
        return [p for layer in self.layers for p in layer.params]

    def gradients(self) -> list:
        return [g for layer in self.layers for g in layer.grads]

    def forward(self, x, *, training=False):
        """Logits for a batch ``x`` of shape (N, n_features) already on this model's backend."""
        for layer in self.layers:
            x = layer.forward(x, training=training)
        return x

    def backward(self, dlogits) -> None:
        """Back-propagate ``dL/dlogits``, leaving each layer's parameter gradients in place."""
        dy = dlogits
        for i in range(len(self.layers) - 1, -1, -1):
            dy = self.layers[i].backward(dy, need_dx=i > 0)

    # -- input checking (the public boundary) -------------------------------------------------

    def _to_device(self, array):
        return self.backend.asarray(array)

    def _prepare_X(self, X, *, keep_pixels=False):
        """Check ``X`` and return it as a (N, n_features) array of the model's dtype on its backend.

        Accepts (N, features) or (N, 28, 28)-like images (flattened); uint8 is scaled by 1/255
        (``F.scale_pixels``), or with ``keep_pixels`` (host uint8 data on the CPU backend) kept
        as a C-contiguous (N, n_features) uint8 array for a training step that scales each batch.
        """
        on_device = self.backend.name == "cuda" and self.backend.owns(X)
        arr = X if on_device else self._host_array(X, "X")
        if arr.ndim not in (2, 3):
            raise ValueError(f"X must have shape (N, {self.n_features}) or (N, H, W); got shape {tuple(arr.shape)}")
        if arr.shape[0] == 0:
            raise ValueError("X is empty (0 rows)")
        features = int(np.prod(arr.shape[1:]))
        if features != self.n_features:
            raise ValueError(
                f"X has {features} features per row (shape {tuple(arr.shape)}), but the model expects {self.n_features}"
            )
        if on_device:  # checked where it lives: no copy to the host
            return self._prepare_device_X(arr)
        host = arr
        kind = host.dtype.kind
        if host.dtype == np.uint8:
            pixels = host.reshape(host.shape[0], -1)
            if keep_pixels and self.backend.name == "cpu":
                return np.ascontiguousarray(pixels)
            out = F.scale_pixels(pixels, np.dtype(self.dtype))
        elif kind == "f":
            out = host.reshape(host.shape[0], -1).astype(self.dtype, copy=False)
            if not np.isfinite(out).all():
                bad = np.argwhere(~np.isfinite(out))[0]
                raise ValueError(f"X contains NaN or inf (first at row {bad[0]}, column {bad[1]}: {out[tuple(bad)]})")
        elif kind in "iu":
            raise TypeError(
                f"X has integer dtype {host.dtype}: pass uint8 pixels (scaled by 1/255 for you) or floats "
                "(used as they are), so the scaling is never a guess"
            )
        else:
            raise TypeError(f"X must hold numbers (uint8 or float), got dtype {host.dtype}")
        return self._to_device(np.ascontiguousarray(out))

    def _prepare_device_X(self, X):
        xp = self.backend.xp
        X = xp.reshape(X, (X.shape[0], self.n_features))
        if X.dtype == xp.uint8:
            return F.scale_pixels(X, self._xp_dtype)
        if not xp.isdtype(X.dtype, "real floating"):
            raise TypeError(f"X must hold uint8 or floats, got dtype {X.dtype}")
        X = xp.astype(X, self._xp_dtype)
        if not bool(xp.all(xp.isfinite(X))):
            raise ValueError("X contains NaN or inf")
        return X

    def _host_array(self, data, name):
        """A NumPy view of host data; an array of another backend is refused, never copied."""
        if isinstance(data, np.ndarray):
            return data
        if type(data).__module__.startswith("cupy"):  # CuPy arrays lack __array_namespace__
            if self.backend.name == "cuda":
                return data.get()
            raise TypeError(
                f"{name} is a CuPy (cuda) array but this model runs on the {self.backend.name!r} backend; "
                "pass a NumPy array (cupy.asnumpy), or build the model with backend='cuda'"
            )
        if hasattr(data, "__array_namespace__"):
            if self.backend.owns(data):
                return np.asarray(self.backend.to_numpy(data))
            module = type(data).__module__.split(".")[0]
            raise TypeError(
                f"{name} is a {module} array but this model runs on the {self.backend.name!r} backend; "
                "pass a NumPy array, or build the model with the matching backend"
            )
        try:
            return np.asarray(data)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be array-like, got {type(data).__name__}: {exc}") from None

    def _prepare_y(self, y, n=None):
        """Check labels: integers in ``[0, n_classes)``, one per row; returned as int64 on the backend."""
        host = self._host_array(y, "y")  # labels are small: checked on the host
        if host.ndim != 1:
            raise ValueError(f"y must be a 1-D array of class labels, got shape {tuple(host.shape)}")
        if n is not None and host.shape[0] != n:
            raise ValueError(f"X has {n} rows but y has {host.shape[0]} labels")
        if host.dtype.kind == "f":
            nonint = ~np.isfinite(host) | (host != np.round(host))
            if nonint.any():
                i = int(np.argmax(nonint))
                raise ValueError(f"labels must be integers; y[{i}] is {host[i]}")
        elif host.dtype.kind not in "iu":
            raise TypeError(f"labels must be integers, got dtype {host.dtype}")
        if host.size:
            lo, hi = host.min(), host.max()
            if lo < 0 or hi >= self.n_classes:
                i = int(np.argmax((host < 0) | (host >= self.n_classes)))
                raise ValueError(f"labels must be in [0, {self.n_classes}); y[{i}] is {host[i]}")
        return self._to_device(host.astype(np.int64))

    # -- inference ----------------------------------------------------------------------------

    def _chunks(self, n):
        return [(lo, min(lo + _PREDICT_CHUNK, n)) for lo in range(0, n, _PREDICT_CHUNK)]

    def _logits_chunks(self, X):
        for lo, hi in self._chunks(int(X.shape[0])):
            yield self.forward(X[lo:hi, ...])

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities, shape (N, n_classes), as a NumPy array."""
        X = self._prepare_X(X)
        parts = [self.backend.to_numpy(F.softmax(z)) for z in self._logits_chunks(X)]
        return np.concatenate(parts)

    def predict(self, X) -> np.ndarray:
        """Predicted class labels, shape (N,), as a NumPy int64 array."""
        X = self._prepare_X(X)
        xp = self.backend.xp
        parts = [self.backend.to_numpy(xp.argmax(z, axis=1)) for z in self._logits_chunks(X)]
        return np.concatenate(parts).astype(np.int64)

    def evaluate(self, X, y) -> dict:
        """Mean cross-entropy and accuracy on ``(X, y)``: ``{"loss": float, "accuracy": float}``."""
        X = self._prepare_X(X)
        return self._evaluate_prepared(X, self._prepare_y(y, int(X.shape[0])))

    def _evaluate_prepared(self, X, y) -> dict:
        xp = self.backend.xp
        loss = xp.zeros((), dtype=xp.float64)
        correct = xp.zeros((), dtype=xp.int64)
        for (lo, hi), z in zip(self._chunks(int(X.shape[0])), self._logits_chunks(X)):
            yb = y[lo:hi]
            loss += xp.astype(F.cross_entropy(z, yb, reduction="sum"), xp.float64)
            correct += xp.sum(xp.astype(xp.argmax(z, axis=1) == yb, xp.int64))
        n = int(X.shape[0])
        return {"loss": float(loss) / n, "accuracy": float(correct) / n}

    def score(self, X, y) -> float:
        """Accuracy on ``(X, y)`` (scikit-learn's convention for classifiers)."""
        return self.evaluate(X, y)["accuracy"]

    # -- training -------------------------------------------------------------------------------

    def fit(self, X, y, **kwargs):
        """Train on ``(X, y)`` with mini-batches; returns a ``History``.

        Parameters
        ----------
        X : array (N, n_features) or (N, 28, 28); uint8 (scaled by 1/255) or float
        y : array (N,) of integer labels in ``[0, n_classes)``
        epochs : int, default 10
        batch_size : int, default 128 (the last batch of an epoch may be smaller)
        optimizer : "sgd", "adam" or an ``xpnet.optim.Optimizer``; "sgd" is plain SGD
        lr : float, default 0.01 for SGD, 1e-3 for Adam
        momentum : float, SGD only (default 0); nesterov : bool
        weight_decay : float, L2 penalty added to the gradients
        schedule : None, "cosine", or a callable ``(epoch, epochs) -> factor``
        validation_data : (X_val, y_val), or validation_split : fraction held out from the end
        shuffle : bool, reshuffle every epoch (seeded by the model's seed)
        callbacks : sequence of ``xpnet.callbacks.Callback``
        verbose : 0 silent, 1 a progress bar per epoch and a line of metrics
        run_dir : path; records the run there (config, metrics.jsonl, model, plots)
        """
        from .training import fit

        return fit(self, X, y, **kwargs)

    # -- weights and files -------------------------------------------------------------------

    def get_weights(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """A copy of every layer's ``(W, b)`` as NumPy arrays, W shaped (fan_in, fan_out)."""
        return [(np.array(self.backend.to_numpy(l.W)), np.array(self.backend.to_numpy(l.b))) for l in self.layers]

    def set_weights(self, weights) -> None:
        """Replace every layer's ``(W, b)``; shapes must match, values must be finite."""
        weights = list(weights)
        if len(weights) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} (W, b) pairs, got {len(weights)}")
        new = []
        for i, (pair, layer) in enumerate(zip(weights, self.layers)):
            if len(pair) != 2:
                raise ValueError(f"weights[{i}] must be a pair (W, b)")
            W, b = (np.asarray(a) for a in pair)
            if W.shape != layer.shape or b.shape != (layer.shape[1],):
                raise ValueError(
                    f"weights[{i}] has W {W.shape} and b {b.shape}; layer {i} needs W {layer.shape} and b ({layer.shape[1]},)"
                )
            if not (np.isfinite(W).all() and np.isfinite(b).all()):
                raise ValueError(f"weights[{i}] contains NaN or inf")
            new.append((W.astype(self.dtype), b.astype(self.dtype)))
        for layer, (W, b) in zip(self.layers, new):
            # in place: optimizers and buffers keep holding the same arrays
            layer.W[...] = self._to_device(W)
            layer.b[...] = self._to_device(b)

    def save(self, path) -> None:
        """Write weights (safetensors) and config (JSON metadata) to ``path``, atomically."""
        from .io import save

        save(self, path)
