"""Models: ``Sequential`` (a stack of layers that infers its shapes) and ``MLP`` (a factory of
``Dense`` layers from widths), with fit/predict/evaluate/save; ``load`` reads a saved model."""

from __future__ import annotations

import contextlib
import json
import math
from contextvars import ContextVar

import numpy as np

from . import functional as F
from .backend import array_library, get_backend
from .layers import INITS, LAYERS, Dense, Layer, check_activation
from .sparse import SparseRows, is_scipy_sparse

__all__ = ["Sequential", "MLP", "load", "MODELS"]

_DTYPES = ("float32", "float64")
_PREDICT_CHUNK = 8192  # rows per forward pass when predicting: bounds the memory of big inputs
_SPARSE_CHUNK_BYTES = 16 << 20  # the most of a sparse input made dense at once for inference
# The most bytes a chunk's largest layer output may take: a convolution's output is large per
# image (65 KB for the shifted-image CNN's first layer, 532 MB for 8192 images, whose first
# touch cost seconds inside fit; its 10,000 test images evaluated in 14.2 s of an epoch with
# validation at 8,192 rows a chunk against 9.2 s at 1,024; 2-core Intel Xeon).
_CHUNK_OUTPUT_BYTES = 32 << 20


def _dtype_name(dtype) -> str:
    name = getattr(dtype, "__name__", None) or str(dtype)
    name = {"float": "float64", "double": "float64", "single": "float32"}.get(name, name)
    name = np.dtype(name).name if name in ("f4", "f8", "<f4", "<f8") else name
    if name not in _DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return name


def _check_seed(seed):
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    return None if seed is None else int(seed)


def _check_shape(input_shape):
    if isinstance(input_shape, (int, np.integer)) and not isinstance(input_shape, bool):
        input_shape = (input_shape,)
    if not isinstance(input_shape, (tuple, list)) or not input_shape or not all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 1 for d in input_shape
    ):
        raise ValueError(f"input_shape must be a tuple of positive ints without the batch axis, got {input_shape!r}")
    return tuple(int(d) for d in input_shape)


def _check_finite(X, rows_at_once=4096) -> None:
    """A ValueError naming the first NaN or inf of float ``X``, checked a block of rows at a time
    (a mask of the whole set would be as large again as a byte per value). A block whose sum is
    finite holds no NaN or inf (either would make the sum NaN or inf): one fast pass over the
    data, the mask only where a sum is not finite (overflow, or a value to name). MNIST as
    float32: 13 ms against 23 for the masks alone (2-core Intel Xeon)."""
    for lo in range(0, X.shape[0], rows_at_once):
        block = X[lo : lo + rows_at_once]
        with np.errstate(over="ignore", invalid="ignore"):  # (an overflow here is no news to the user)
            if np.isfinite(block.sum()):
                continue
        finite = np.isfinite(block)
        if not finite.all():
            bad = tuple(int(i) for i in np.argwhere(~finite)[0])
            where = f"column {bad[1]}" if len(bad) == 2 else f"index {bad[1:]}"
            raise ValueError(f"X contains NaN or inf (first at row {lo + bad[0]}, {where}: {block[bad]})")


class Sequential:
    """A stack of layers trained on cross-entropy: the last layer outputs the class logits.

    Parameters
    ----------
    layers : sequence of ``xpnet.layers.Layer``
        E.g. ``[Conv2D(6, 3, activation="relu"), AvgPool2D(2), Flatten(), Dense(10)]``.
    input_shape : tuple, optional
        One example's shape without the batch axis: ``(784,)``, or ``(28, 28, 1)`` for images
        (channels-last). If omitted, the first ``fit`` takes it from the data (an ``(N, H, W)``
        array is read as one channel).
    dtype : {"float32", "float64"}
    seed : int or None
        Seeds the initial weights, dropout, random shifts and the shuffling: the same seed on the same data
        gives bit-identical weights on a re-run.
    backend : "cpu", "cuda", "auto", a Backend, a namespace module, or None (the current default).
    """

    def __init__(self, layers, input_shape=None, dtype="float32", seed=None, backend=None):
        if isinstance(layers, (str, bytes, Layer)) or not hasattr(layers, "__iter__"):
            raise TypeError(f"layers must be a sequence of xpnet.layers objects, got {layers!r}")
        layers = list(layers)
        if not layers:
            raise ValueError("a Sequential model needs at least one layer")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"layers[{i}] is a {type(layer).__name__}, not an xpnet.layers.Layer")
        if len({id(layer) for layer in layers}) != len(layers):
            raise ValueError("the same layer object appears twice: create one layer per position")
        self.backend = get_backend(backend)
        self.dtype = _dtype_name(dtype)
        self.seed = _check_seed(seed)
        self.layers = layers
        self.stop_training = False
        self._rng = np.random.default_rng(self.seed)
        self._xp_dtype = getattr(self.backend.xp, self.dtype)
        self._input_shape = None
        if input_shape is not None:
            self.build(input_shape)

    # -- building and description --------------------------------------------------------------

    def build(self, input_shape) -> None:
        """Create every layer's parameters for inputs of ``input_shape`` (no batch axis)."""
        shape = _check_shape(input_shape)
        if self.built:
            if shape != self._input_shape:
                raise ValueError(f"the model is built for inputs of shape {self._input_shape}, not {shape}")
            return
        for i, layer in enumerate(self.layers):
            if layer.built:
                raise ValueError(f"layers[{i}] ({layer!r}) is already built: a layer belongs to one model")
        first = shape
        limit = _DRAW_LIMIT.get()
        rng = self._rng if limit is None else _LimitedDraws(self._rng, limit)
        try:
            for i, layer in enumerate(self.layers):
                try:
                    shape = layer.setup(shape, rng=rng, dtype=self.dtype, backend=self.backend)
                except ValueError as exc:
                    raise ValueError(f"layers[{i}] {type(layer).__name__}: {exc}") from None
            if len(shape) != 1 or shape[0] < 2:
                raise ValueError(
                    f"the last layer must output class scores of shape (n_classes,) with n_classes >= 2, got {shape}"
                )
        except Exception:
            for layer in self.layers:  # unbuilt again, so that the same layers can go into a corrected model
                layer.input_shape = layer.output_shape = None
            raise
        self._input_shape = first

    @property
    def built(self) -> bool:
        return self._input_shape is not None

    def _require_built(self):
        if not self.built:
            raise RuntimeError("the model is not built yet: give input_shape=..., call build(), or fit first")

    @property
    def input_shape(self) -> tuple | None:
        return self._input_shape

    @property
    def n_features(self) -> int:
        self._require_built()
        return math.prod(self._input_shape)

    @property
    def n_classes(self) -> int:
        self._require_built()
        return self.layers[-1].output_shape[0]

    @property
    def config(self) -> dict:
        """What it takes to rebuild this model (weights aside); JSON-able."""
        return {
            "class": "Sequential",
            "input_shape": list(self._input_shape) if self.built else None,
            "dtype": self.dtype,
            "seed": self.seed,
            "layers": [{"type": type(layer).__name__, **layer.get_config()} for layer in self.layers],
        }

    @classmethod
    def from_config(cls, config: dict, *, backend=None):
        """A model from ``config`` (as ``model.config`` gives it), with fresh weights."""
        layers = []
        for i, entry in enumerate(config["layers"]):
            entry = dict(entry)
            kind = entry.pop("type", None)
            if kind not in LAYERS:
                raise ValueError(
                    f"layer {i} has unknown type {kind!r} (known: {', '.join(sorted(LAYERS))}); "
                    "a layer class of your own must be defined before loading"
                )
            layers.append(LAYERS[kind].from_config(entry))
        return cls(layers, input_shape=config["input_shape"], dtype=config["dtype"], seed=config["seed"],
                   backend=backend)

    def count_params(self) -> int:
        """Number of trainable parameters (the write-up's LeNet-5 has 60,074)."""
        self._require_built()
        return sum(layer.count_params() for layer in self.layers)

    def summary(self, print_fn=print) -> None:
        """Print each layer's type, output shape and parameter count, as Keras does."""
        self._require_built()
        rows = [(f"{type(layer).__name__}", str((None, *layer.output_shape)), f"{layer.count_params():,}")
                for layer in self.layers]
        head = ("Layer (type)", "Output shape", "Param #")
        widths = [max(len(r[k]) for r in [head, *rows]) + 2 for k in range(3)]
        line = lambda r: "".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        rule = "-" * sum(widths)
        print_fn(f'Model: "{type(self).__name__}" (input {(None, *self._input_shape)}, {self.dtype}, '
                 f"backend {self.backend.name!r})")
        for text in (rule, line(head), rule, *map(line, rows), rule):
            print_fn(text)
        print_fn(f"Total params: {self.count_params():,}")

    def __repr__(self):
        inner = ", ".join(map(repr, self.layers))
        return f"Sequential([{inner}], input_shape={self._input_shape}, dtype={self.dtype!r}, backend={self.backend.name!r})"

    # -- forward / backward -----------------------------------------------------------------

    def parameters(self) -> list:
        return [p for layer in self.layers for p in layer.params]

    def gradients(self) -> list:
        return [g for layer in self.layers for g in layer.grads]

    def forward(self, x, *, training=False):
        """Logits for a batch ``x`` of shape (N, *input_shape) already on this model's backend."""
        for layer in self.layers:
            x = layer.forward(x, training=training)
        return x

    def backward(self, dlogits) -> None:
        """Back-propagate ``dL/dlogits``, leaving each layer's parameter gradients in place.

        It stops at the first layer with parameters, which computes no input gradient: nothing
        before it needs one (a ``RandomShift`` in front of a convolution would otherwise cost
        the convolution's whole input gradient, for nothing)."""
        first = next((i for i, layer in enumerate(self.layers) if layer.param_names), 0)
        dy = dlogits
        for i in range(len(self.layers) - 1, first - 1, -1):
            dy = self.layers[i].backward(dy, need_dx=i > first)

    # -- input checking (the public boundary) -------------------------------------------------

    def _to_device(self, array):
        return self.backend.asarray(array)

    def _shape_from_data(self, X) -> tuple:
        """The input shape the first ``fit`` reads off the data: (N, H, W) is one channel."""
        shape = tuple(int(d) for d in getattr(X, "shape", np.shape(X))[1:])
        return (*shape, 1) if len(shape) == 2 else shape

    def _prepare_X(self, X, *, keep_pixels=False):
        """Check ``X`` and return it as a (N, *input_shape) array of the model's dtype on its backend.

        Rows of another shape with the same number of values are reshaped where that is
        unambiguous (``_check_row_shape``: ``(N, 28, 28)`` images fit a 784-input MLP, flat rows
        and ``(N, 28, 28)`` images a ``(28, 28, 1)`` CNN). uint8 is scaled by
        1/255 (``F.scale_pixels``). With ``keep_pixels`` (host data on the CPU backend), uint8
        pixels and floats of the other float dtype (``X / 255`` is float64) are kept as they
        are, a C-contiguous (N, n_features) array, for a training step that scales or converts
        each batch it gathers: no copy of the whole set (MNIST as float32: 188 MB).
        """
        self._require_built()
        if isinstance(X, SparseRows) or is_scipy_sparse(X):
            return self._prepare_sparse_X(X)
        on_device = self.backend.name == "cuda" and self.backend.owns(X)
        arr = X if on_device else self._host_array(X, "X")
        if arr.ndim < 2:
            shape = ", ".join(map(str, ("N", *self._input_shape)))
            raise ValueError(f"X must have shape ({shape}) (a batch of rows); got shape {tuple(arr.shape)}")
        if arr.shape[0] == 0:
            raise ValueError("X is empty (0 rows)")
        features = math.prod(arr.shape[1:])
        if features != self.n_features:
            rows = f" (rows of shape {self._input_shape})" if len(self._input_shape) > 1 else ""
            raise ValueError(
                f"X has {features} features per row (shape {tuple(arr.shape)}), but the model expects "
                f"{self.n_features}{rows}"
            )
        self._check_row_shape(tuple(arr.shape[1:]))
        if on_device:  # checked where it lives: no copy to the host
            return self._prepare_device_X(arr)
        host = arr
        kind = host.dtype.kind
        rows = (host.shape[0], *self._input_shape)
        keep = keep_pixels and self.backend.name == "cpu"
        if host.dtype == np.uint8:
            if keep:
                return np.ascontiguousarray(host.reshape(host.shape[0], -1))
            out = F.scale_pixels(host.reshape(rows), np.dtype(self.dtype))
        elif kind == "f":
            if keep and host.dtype in (np.float32, np.float64) and host.dtype != np.dtype(self.dtype):
                _check_finite(host)
                return np.ascontiguousarray(host.reshape(host.shape[0], -1))
            out = host.reshape(rows).astype(self.dtype, copy=False)
            _check_finite(out)
        elif kind in "iu":
            raise TypeError(
                f"X has integer dtype {host.dtype}: pass uint8 pixels (scaled by 1/255 for you) or floats "
                "(used as they are), so the scaling is never a guess"
            )
        else:
            raise TypeError(f"X must hold numbers (uint8 or float), got dtype {host.dtype}")
        return self._to_device(np.ascontiguousarray(out))

    def _check_row_shape(self, row_shape) -> None:
        """Rows are taken in the model's input shape only where that cannot mix up their values:
        flat rows (any input shape), any rows for a flat input (an MLP), or the input shape up to
        axes of size 1 ((28, 28) images for (28, 28, 1)). Images of 3 channels first, (3, 32, 32)
        for (32, 32, 3), hold as many values, but reading them channels-last would be a silent
        wrong answer."""
        shape = self._input_shape
        if len(row_shape) == 1 or len(shape) == 1:
            return
        if tuple(d for d in row_shape if d != 1) != tuple(d for d in shape if d != 1):
            layout = " (channels last: height, width, channels)" if len(shape) == 3 else ""
            raise ValueError(
                f"X has rows of shape {row_shape}, but the model takes rows of shape {shape}{layout} "
                f"or flat rows of {self.n_features} values"
            )

    def _prepare_sparse_X(self, X):
        """A scipy sparse ``X`` (or ``SparseRows``: rows of ``n_features`` values, flat) as
        ``SparseRows`` of the model's dtype and input shape on the CPU, whose batches are made
        dense one at a time; made dense whole for the CUDA backend (its steps take device arrays)."""
        if len(X.shape) != 2 or X.shape[0] == 0:
            raise ValueError(f"sparse X must have shape (N, {self.n_features}) with N >= 1, got {tuple(X.shape)}")
        if X.shape[1] != self.n_features:
            raise ValueError(
                f"X has {X.shape[1]} features per row (shape {tuple(X.shape)}), but the model expects {self.n_features}"
            )
        if not isinstance(X, SparseRows):
            X = SparseRows.from_scipy(X, np.dtype(self.dtype), self._input_shape)
        elif X.dtype != np.dtype(self.dtype):
            raise TypeError(f"SparseRows of {X.dtype} given to a {self.dtype} model: build them for {self.dtype}")
        else:  # the same rows, taken in this model's input shape
            X = SparseRows(X.shape, X.indptr, X.indices, X.values, X.table, self._input_shape)
        if self.backend.name != "cpu":
            return self._to_device(X.dense())
        return X

    def _prepare_device_X(self, X):
        xp = self.backend.xp
        X = xp.reshape(X, (X.shape[0], *self._input_shape))
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
        if array_library(data) == "cupy":
            if self.backend.name == "cuda":
                return data.get()
            raise TypeError(
                f"{name} is a CuPy (cuda) array but this model runs on the {self.backend.name!r} backend; "
                "pass a NumPy array (cupy.asnumpy), or build the model with backend='cuda'"
            )
        if hasattr(data, "__array_namespace__"):
            if self.backend.owns(data):
                return np.asarray(self.backend.to_numpy(data))
            raise TypeError(
                f"{name} is a {array_library(data)} array but this model runs on the {self.backend.name!r} backend; "
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

    def _chunks(self, X):
        widest = max(math.prod(shape) for shape in (self._input_shape, *(layer.output_shape for layer in self.layers)))
        n = int(X.shape[0])
        rows = max(1, min(_PREDICT_CHUNK, _CHUNK_OUTPUT_BYTES // (widest * np.dtype(self.dtype).itemsize)))
        if isinstance(X, SparseRows):  # each chunk is made dense: at most _SPARSE_CHUNK_BYTES of it
            rows = max(1, min(rows, _SPARSE_CHUNK_BYTES // (X.shape[1] * X.dtype.itemsize)))
        return [(lo, min(lo + rows, n)) for lo in range(0, n, rows)]

    def _logits_chunks(self, X):
        spread = self._spread_images()
        for lo, hi in self._chunks(X):
            rows = X[lo:hi, ...]
            with spread():
                z = self.forward(rows.dense() if isinstance(rows, SparseRows) else rows)
            yield z

    def _spread_images(self):
        """A context for each forward pass: on a CPU of several cores, a model with convolution
        or pooling layers spreads each chunk's images over the cores (``training.on_cores``;
        LeNet-5 on the 10,000 MNIST test images: see bench/README.md)."""
        if self.backend.name != "cpu":
            return contextlib.nullcontext
        from .training import image_cores, on_cores

        cores = image_cores(self)
        if cores < 2:
            return contextlib.nullcontext
        from .kernels.cores import OneBlasThread

        blas = OneBlasThread()
        return lambda: on_cores(cores, blas)

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
        for (lo, hi), z in zip(self._chunks(X), self._logits_chunks(X)):
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
        X : array (N, *input_shape), or rows of the same size (e.g. (N, 28, 28)); uint8
            (scaled by 1/255) or float. An unbuilt model is built for X's row shape first.
        y : array (N,) of integer labels in ``[0, n_classes)``
        epochs : int, default 10
        batch_size : int, default 128 (the last batch of an epoch may be smaller)
        optimizer : "sgd", "adam", "adamw" or an ``xpnet.optim.Optimizer``
        lr : float, default 0.01 for SGD, 1e-3 for Adam and AdamW
        momentum : float, SGD only (default 0); nesterov : bool
        weight_decay : float, L2 penalty added to the gradients (decoupled for AdamW)
        schedule : None, "cosine", or a callable ``(epoch, epochs) -> factor``
        validation_data : (X_val, y_val), or validation_split : fraction held out from the end
        shuffle : bool, reshuffle every epoch (seeded by the model's seed)
        callbacks : sequence of ``xpnet.callbacks.Callback``
        verbose : 0 silent, 1 a progress bar per epoch and a line of metrics
        run_dir : path; records the run there (config, metrics.jsonl, model, checkpoint, plots)
        resume : bool, continue the run recorded in ``run_dir`` from its last finished epoch
            (same settings; the rest of the run is bit for bit the uninterrupted one's)
        initial_epoch : int, default 0: the epoch to start from (as Keras's)
        on_divergence : "warn" (default), "stop" or "ignore": what to do when, for 3 epochs in a
            row, the loss stays above the first epoch's or accuracy is at chance (a
            ``DivergenceWarning``, also in ``History.warnings`` and the run record). A loss that
            is not finite always ends training, with the weights of the last finished epoch.
        distributed : None (default: when started by ``mpiexec``/``srun`` with several
            processes), True or False: data-parallel training (``xpnet.distributed``);
            ``batch_size`` is then the global batch, split between the ranks; with ``resume``,
            rank 0 reads the checkpoint and every rank continues from it
        sample_weight : array (N,) of finite weights >= 0, optional: each batch's loss is the
            mean of its rows' losses weighted by them, as scikit-learn's ``sample_weight``
            (so scaling every weight alike changes nothing); with ``validation_split`` the
            weights of the held-out rows are not used. Reported metrics and ``evaluate`` stay
            unweighted; the CUDA graph path steps aside for the eager loop
        """
        from .training import fit

        return fit(self, X, y, **kwargs)

    # -- weights and files -------------------------------------------------------------------

    def get_weights(self) -> list[np.ndarray]:
        """A copy of every parameter as NumPy arrays, in Keras's order and layouts: for each
        layer its kernel, then its bias (Dense ``(fan_in, units)``, Conv2D ``(kh, kw, C, F)``)."""
        self._require_built()
        return [np.array(self.backend.to_numpy(p)) for p in self.parameters()]

    def set_weights(self, weights) -> None:
        """Replace every parameter (a list as ``get_weights`` returns it); shapes must match,
        values must be finite. The arrays are written in place, so optimizers keep theirs."""
        self._require_built()
        params = self.parameters()
        owners = [(i, type(layer).__name__, name) for i, layer in enumerate(self.layers) for name in layer.param_names]
        weights = list(weights)
        if len(weights) != len(params):
            raise ValueError(f"expected {len(params)} arrays (kernel and bias per layer), got {len(weights)}")
        new = []
        for i, (w, p, (layer, kind, name)) in enumerate(zip(weights, params, owners)):
            w = np.asarray(w)
            if w.shape != tuple(p.shape):
                raise ValueError(
                    f"weights[{i}] has shape {w.shape}; layer {layer} needs {name} of shape {tuple(p.shape)} ({kind})"
                )
            if w.dtype.kind not in "fiu":
                raise TypeError(f"weights[{i}] must hold numbers, got dtype {w.dtype}")
            if not np.isfinite(w).all():
                raise ValueError(f"weights[{i}] contains NaN or inf")
            new.append(w.astype(self.dtype))
        for p, w in zip(params, new):
            p[...] = self._to_device(w)

    def save(self, path) -> None:
        """Write weights (safetensors) and config (JSON metadata) to ``path``, atomically."""
        from . import __version__
        from .io import FORMATS, write_model_file

        self._require_built()
        tensors = {
            f"layers.{i}.{name}": self.backend.to_numpy(getattr(layer, name))
            for i, layer in enumerate(self.layers)
            for name in layer.param_names
        }
        for name, array in tensors.items():  # a file load() would refuse is not worth writing
            if not np.isfinite(array).all():
                raise ValueError(f"cannot save {path}: tensor {name!r} holds NaN or infinite values")
        metadata = {
            "format": "xpnet.model",
            "format_version": FORMATS["xpnet.model"],
            "xpnet_version": __version__,
            "config": json.dumps(self.config),
        }
        write_model_file(path, tensors, metadata)

    def export_onnx(self, path) -> None:
        """Write the model as an ONNX graph to ``path``, atomically (needs ``pip install
        'xpnet[onnx]'``). It takes float32 rows of ``input_shape`` (pixels scaled to [0, 1], a
        batch axis of any size) and outputs the class probabilities; see ``xpnet.export``."""
        from .export import export_onnx

        export_onnx(self, path)


class MLP(Sequential):
    """A fully connected network ``layers[0] -> ... -> layers[-1]``: a ``Sequential`` of
    ``Dense`` layers built from widths.

    Parameters
    ----------
    layers : sequence of int
        Widths from the input features to the number of classes, e.g. ``[784, 50, 25, 10]``.
    activation : {"relu", "tanh", "sigmoid"}
        Activation of every hidden layer; the last layer outputs logits.
    init : {"he", "glorot"}
        Weight initialisation (biases start at zero). Weights are drawn on the host from one
        seeded generator, so every backend starts from identical weights.
    dtype, seed, backend : as for ``Sequential``.

    ``get_weights`` gives ``(W, b)`` pairs, W shaped (fan_in, fan_out); ``set_weights`` takes
    pairs or the flat list.
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
            raise ValueError(f"activation must be one of {tuple(F.ACTIVATIONS)}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}: expected one of {INITS}")
        self.widths = [int(w) for w in widths]
        self.activation, self.init = activation, init
        last = len(self.widths) - 2
        dense = [Dense(w, activation=activation if i < last else None, init=init) for i, w in enumerate(self.widths[1:])]
        super().__init__(dense, input_shape=(self.widths[0],), dtype=dtype, seed=seed, backend=backend)

    @property
    def config(self) -> dict:
        """The factory's arguments (its layers follow from them), as xpnet 0.1 wrote them."""
        return {"class": "MLP", "layers": list(self.widths), "activation": self.activation, "init": self.init,
                "dtype": self.dtype, "seed": self.seed}

    @classmethod
    def from_config(cls, config: dict, *, backend=None):
        return cls(config["layers"], activation=config["activation"], init=config["init"], dtype=config["dtype"],
                   seed=config["seed"], backend=backend)

    def count_params(self) -> int:
        """Number of trainable parameters (784-50-25-10 has 40,785)."""
        return super().count_params()

    def __repr__(self):
        widths = "-".join(map(str, self.widths))
        return f"MLP({widths}, activation={self.activation!r}, dtype={self.dtype!r}, backend={self.backend.name!r})"

    def get_weights(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """A copy of every layer's ``(W, b)`` as NumPy arrays, W shaped (fan_in, fan_out)."""
        flat = super().get_weights()
        return list(zip(flat[0::2], flat[1::2]))

    def set_weights(self, weights) -> None:
        """Replace every layer's ``(W, b)`` (pairs, or the flat list); shapes must match."""
        weights = list(weights)
        if weights and all(isinstance(w, (tuple, list)) for w in weights):
            if len(weights) != len(self.layers):
                raise ValueError(f"expected {len(self.layers)} (W, b) pairs, got {len(weights)}")
            for i, pair in enumerate(weights):
                if len(pair) != 2:
                    raise ValueError(f"weights[{i}] must be a pair (W, b)")
            weights = [a for pair in weights for a in pair]
        super().set_weights(weights)


#: model class name -> class, for model files
MODELS = {"Sequential": Sequential, "MLP": MLP}


def _not_a_model(path, why):
    return ValueError(f"{path} is not a readable xpnet model file: {why}")


#: While ``load`` rebuilds a file's model, the most numbers its layers may draw for initial
#: weights (which the file's tensors then replace): a config claiming layers larger than the
#: tensors beside it fails before they are allocated, not after.
_DRAW_LIMIT: ContextVar[int | None] = ContextVar("xpnet_draw_limit", default=None)


class _LimitedDraws:
    """A NumPy Generator that refuses to draw more than ``limit`` numbers (``size=`` calls)."""

    def __init__(self, rng: np.random.Generator, limit: int):
        self._rng, self.left = rng, int(limit)

    def __getattr__(self, name):
        method = getattr(self._rng, name)

        def draw(*args, size=None, **kwargs):
            n = 1 if size is None else math.prod(np.atleast_1d(np.asarray(size, dtype=np.int64)).tolist())
            if n > self.left:
                raise ValueError(f"its layers need more weights than the file holds (drawing {n:,} of {self.left:,} left)")
            self.left -= n
            return method(*args, size=size, **kwargs)

        return draw if callable(method) else method


def load(path, *, backend=None):
    """Load a model saved by ``save``; ``backend`` picks where it runs (default: current).

    Files written by xpnet 0.1 (``MLP`` only) load too. Layers are found by their class name in
    ``xpnet.layers.LAYERS``; loading never runs code from the file.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        A truncated, corrupt or foreign file, an unknown layer type, or tensors that do not
        match the model the file describes.
    """
    from .io import FORMATS, read_model_file

    tensors, metadata = read_model_file(path)
    try:
        kind, version = metadata["format"], metadata.get("format_version")
        if version != FORMATS[kind]:
            raise ValueError(f"{kind} version {version!r}; this xpnet reads {FORMATS[kind]!r}")
        config = json.loads(metadata["config"])
        if not isinstance(config, dict):
            raise ValueError("its config is not a JSON object")
        if kind == "xpnet.mlp":  # xpnet 0.1 wrote MLPs only, with the same config less "class"
            cls = MLP
        elif config.get("class") in MODELS:
            cls = MODELS[config["class"]]
        else:
            raise ValueError(f"unknown model class {config.get('class')!r}")
        dtype = _dtype_name(config["dtype"])
        for name, array in tensors.items():
            if array.dtype != np.dtype(dtype):
                raise ValueError(f"tensor {name!r} is {array.dtype}, the model is {dtype}")
        token = _DRAW_LIMIT.set(sum(int(a.size) for a in tensors.values()) + 1024)  # slack: a draw per Dropout or RandomShift
        try:
            model = cls.from_config(config, backend=backend)
        finally:
            _DRAW_LIMIT.reset(token)
        names = [f"layers.{i}.{n}" for i, layer in enumerate(model.layers) for n in layer.param_names]
        if set(tensors) != set(names):
            raise ValueError(f"tensors {sorted(tensors)} do not match the layers' parameters {names}")
        Sequential.set_weights(model, [tensors[name] for name in names])
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        raise _not_a_model(path, f"{type(exc).__name__}: {exc}") from None
    return model
