"""The training loop behind ``Sequential.fit`` (and so ``MLP.fit``), written once against ``xp``.

The data set is moved to the model's backend once; every step gathers its batch there, so a GPU
run never copies a batch from the host. The loss and the count of correct predictions are summed
on the device and read once per epoch: no host synchronisation per step.

A step runs one of four ways, all computing the same math: ``ReferenceStep`` (the layers and
``xpnet.functional``, on any namespace, any model), the buffered Numba step on NumPy
(``kernels.cpu_step``), on NumPy with several cores the reference step with the convolution and
pooling kernels spreading each batch's images over the cores (``ImagesOnCoresStep``), or, on
CUDA, whole epochs replayed from one captured graph of xpnet's own kernels
(``kernels.cuda_graph``). The Numba step and the CUDA graphs cover exactly one kind of model, a
ReLU MLP of ``Dense`` layers (``relu_mlp``); they check layer types exactly, so a subclass or a
layer they have never seen gets the reference, and each is tested against it.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
import warnings

import numpy as np

from . import functional as F
from .backend import array_library
from .callbacks import Callback, DivergenceMonitor, DivergenceWarning, History, keeping_state
from .distributed import GradientSum, failure_ends_the_job, shard, share_start
from .distributed import for_fit as distributed_for_fit
from .layers import AvgPool2D, Conv2D, Dense, MaxPool2D, _Seeded
from .optim import make_optimizer
from .sparse import SparseRows

__all__ = [
    "fit", "relu_mlp", "training_step_for", "images_on_cores_step_for", "image_cores", "on_cores", "ReferenceStep",
    "ImagesOnCoresStep", "IMAGE_LAYERS", "rng_states", "set_rng_states",
]


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def _split_validation(model, X, y, validation_data, validation_split, keep_pixels=False):
    """Device arrays for training and (optionally) validation, checked once at the boundary.

    ``keep_pixels``: uint8 training images, or floats of the other float dtype, stay as they are
    (the step scales or converts each batch itself).
    """
    X = model._prepare_X(X, keep_pixels=keep_pixels)
    y = model._prepare_y(y, int(X.shape[0]))
    if validation_data is not None and validation_split:
        raise ValueError("give validation_data or validation_split, not both")
    if isinstance(validation_split, bool) or not isinstance(validation_split, (int, float)) or not (
        0.0 <= validation_split < 1.0
    ):
        raise ValueError(f"validation_split must be a fraction in [0, 1), got {validation_split!r}")
    val = None
    if validation_data is not None:
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
            raise TypeError("validation_data must be a pair (X_val, y_val)")
        X_val = model._prepare_X(validation_data[0])
        val = (X_val, model._prepare_y(validation_data[1], X_val.shape[0]))
    elif validation_split:
        # the last fraction, as Keras does: reproducible and independent of shuffling
        n_val = int(round(X.shape[0] * validation_split))
        if n_val < 1 or n_val >= X.shape[0]:
            raise ValueError(f"validation_split={validation_split} leaves no data on one side of {X.shape[0]} rows")
        X_val = X[-n_val:, ...]
        if keep_pixels and X_val.dtype != np.dtype(model.dtype):  # evaluation takes the model's inputs
            X_val = model._prepare_X(X_val)
        val = (X_val, y[-n_val:])
        X, y = X[:-n_val, ...], y[:-n_val]
    return X, y, val


class ReferenceStep:
    """One training step through the layers and ``xpnet.functional``: the reference that every
    fast path (``kernels.cpu_step``, ``kernels.cuda_graph``) is tested against.

    ``step(xb, yb, scales=None)`` leaves the gradients in the layers and returns the batch's
    summed loss and number of correct predictions, as 0-d arrays on the model's device.
    ``scales`` (optional, shape (rows,), the model's dtype): each row's factor on its loss and
    gradient (``fit``'s sample weights over their batch's mean: a weighted mean).
    """

    def __init__(self, model):
        self.model = model
        self.xp = model.backend.xp

    # fit keeps uint8 images as they are (on the CPU) and take_batch scales each batch: no float
    # copy of the whole set (MNIST's is 188 MB, ~0.3 s of page faults and scaling before the
    # first step of a LeNet-5 epoch on the 2-core EPYC)
    takes_pixels = True

    def running(self):
        """A context ``fit`` holds while it trains with this step (nothing, here)."""
        return contextlib.nullcontext()

    def take_batch(self, X, y, idx):
        """The mini-batch ``(X[idx], y[idx])``; rows kept as they were given (``fit``'s
        ``keep_pixels``: (N, features) uint8 pixels or floats of the other float dtype) come
        scaled or converted, in the model's input shape."""
        yb = self.xp.take(y, idx, axis=0)
        if isinstance(X, SparseRows):  # a scipy sparse data set (CPU only): one dense batch
            return X.take(idx), yb
        xb = self.xp.take(X, idx, axis=0)
        model = self.model
        if xb.dtype == np.uint8:
            xb = F.scale_pixels(xb.reshape(xb.shape[0], *model._input_shape), np.dtype(model.dtype))
        elif type(xb) is np.ndarray and xb.dtype != np.dtype(model.dtype):  # kept floats of the other dtype
            xb = xb.reshape(xb.shape[0], *model._input_shape).astype(model.dtype)
        return xb, yb

    def gradients(self):
        """The gradients the last call left, in ``model.parameters()`` order."""
        return self.model.gradients()

    def __call__(self, xb, yb, scales=None):
        xp = self.xp
        logits = self.model.forward(xb, training=True)
        loss, dlogits = F.softmax_cross_entropy(logits, yb, weights=scales)
        self.model.backward(dlogits)
        return loss * yb.shape[0], xp.sum(xp.astype(xp.argmax(logits, axis=1) == yb, xp.int64))


def relu_mlp(layers) -> bool:
    """Whether ``layers`` are what the fast paths cover: exactly ``Dense`` layers (no subclass),
    ReLU on the hidden ones, a linear output."""
    return (
        bool(layers)
        and all(type(layer) is Dense for layer in layers)
        and all(layer.activation == "relu" for layer in layers[:-1])
        and layers[-1].activation is None
    )


def training_step_for(layers, batch_size: int, cores: int | None = None):
    """The buffered Numba step (``kernels.cpu_step``) for these layers, or ``None`` where the
    reference must run: not a ReLU MLP, not float32/float64 NumPy parameters, numba missing,
    or ``XPNET_KERNELS=xp``. ``cores``: see ``CpuTrainingStep``."""
    from .kernels import default_impl, numba_cpu

    if default_impl() not in ("auto", "numba") or not relu_mlp(layers) or numba_cpu.unavailable():
        return None
    dtype = layers[0].W.dtype
    if dtype not in (np.float32, np.float64):
        return None
    if not all(type(a) is np.ndarray and a.dtype == dtype for layer in layers for a in (layer.W, layer.b)):
        return None
    from .kernels.cpu_step import CpuTrainingStep

    return CpuTrainingStep(layers, batch_size, cores)


#: the layers whose Numba kernels spread a batch's images over the cores (``ImagesOnCoresStep``)
IMAGE_LAYERS = (Conv2D, MaxPool2D, AvgPool2D)


def image_cores(model) -> int:
    """The cores a NumPy model's convolution and pooling kernels spread each batch's images
    over (``numba_cpu.images_on_cores``): all this process may use for a model with a layer of
    ``IMAGE_LAYERS`` (exactly) and float32/float64 NumPy parameters; 1 (serially) for any other
    model (Dense layers alone gain nothing: OpenBLAS already runs their products on every core),
    where numba is missing, with ``XPNET_KERNELS=xp``, or on one core."""
    from .kernels import default_impl, numba_cpu

    if default_impl() not in ("auto", "numba") or numba_cpu.unavailable():
        return 1
    if not any(type(layer) in IMAGE_LAYERS for layer in model.layers):
        return 1
    if not all(type(p) is np.ndarray and p.dtype in (np.float32, np.float64) for p in model.parameters()):
        return 1
    from .kernels.cores import cores

    return cores()


@contextlib.contextmanager
def on_cores(cores: int, blas):
    """Inside: BLAS (``blas``, a ``kernels.cores.OneBlasThread``) on one thread, and the
    convolution and pooling kernels spreading each batch's images over ``cores`` cores."""
    from .kernels import numba_cpu

    blas.take()
    try:
        with numba_cpu.images_on_cores(cores):
            yield
    finally:
        blas.give_back()


class ImagesOnCoresStep(ReferenceStep):
    """The reference step on the whole batch, its convolution and pooling kernels splitting the
    images among ``cores`` cores (``on_cores``), BLAS on one thread beside them.

    The same math as the reference step: each image's activations bit for bit, the kernel
    gradients summed per slice of images and then added (up to rounding). One Python thread
    drives it; a step split into row slices run by threads of their own, tried before, lost a
    fifth of its time to the slices waiting for each other's Python (the GIL)."""

    def __init__(self, model, cores: int):
        from .kernels.cores import OneBlasThread

        super().__init__(model)
        self.cores = int(cores)
        self._blas = OneBlasThread()

    def running(self):
        """A context ``fit`` holds while it trains with this step: BLAS on one thread from the
        first step on, given back at the end."""
        return self._blas.held()

    def take_batch(self, X, y, idx):
        """Kept uint8 pixels gathered and scaled by the Numba kernel the MLP step uses
        (``take_pixel_batch``, bit for bit ``F.scale_pixels``: a LeNet-5 epoch's batches took 66
        us each, against 107 us for ``np.take`` and the scaling). Anything else as the reference
        takes it."""
        if not (type(X) is np.ndarray and X.dtype == np.uint8 and X.ndim == 2
                and y.dtype == np.int64 and idx.dtype == np.int64):
            return super().take_batch(X, y, idx)
        from .kernels import numba_cpu

        n, model = idx.shape[0], self.model
        xb, yb = np.empty((n, *model._input_shape), model.dtype), np.empty(n, np.int64)
        numba_cpu._get_loops().take_pixel_batch(X, y, idx, np.empty((n, X.shape[1]), np.uint8), xb.reshape(n, -1), yb)
        return xb, yb

    def __call__(self, xb, yb, scales=None):
        with on_cores(self.cores, self._blas):
            return super().__call__(xb, yb, scales)


def images_on_cores_step_for(model):
    """``ImagesOnCoresStep`` where ``image_cores`` gives the model several cores, else ``None``."""
    cores = image_cores(model)
    return ImagesOnCoresStep(model, cores) if cores > 1 else None


def _training_step(model, batch_size, *, all_cores=True):
    """The fastest step that applies: on NumPy the buffered Numba step where it covers the
    model, else (with ``all_cores``) the reference step with its images on every core, else
    the reference. Without ``all_cores`` (processes already share the cores) no step spreads
    over them."""
    if model.backend.name == "cpu":
        step = training_step_for(model.layers, batch_size, None if all_cores else 1)
        if step is None and all_cores:
            step = images_on_cores_step_for(model)
        if step is not None:
            return step
    return ReferenceStep(model)


def _graph_trainer(model, opt, X, y, batch_size):
    """On CUDA, whole epochs as replays of one captured graph of xpnet's kernels, or None where
    that does not apply (``kernels.cuda_graph.why_not`` says why; ``XPNET_CUDA_GRAPHS=0`` too)."""
    if model.backend.name != "cuda" or not relu_mlp(model.layers):
        return None
    from .kernels import cuda_graph

    return cuda_graph.trainer_for(model, opt, X, y, batch_size)


def _run_epoch(step, opt, params, X, y, order, batch_size, progress, gradient_sum=None, weighting=None):
    """Mini-batches in ``order`` (or in sequence): returns the summed loss and correct count.
    Without a ``progress`` bar (None) a step that runs whole epochs (``run_epoch``) may take it.

    With ``gradient_sum`` (a ``distributed.GradientSum``) each batch is a global one: this rank
    trains on its shard of the rows, and the step's gradients are summed over the ranks, each
    weighted by its share of the rows, before the update. ``weighting``: ``_batch_scales``'s
    row factors and batch weights for this epoch's order (sample weights), else None."""
    n = int(X.shape[0])
    loss_sum = correct = 0
    grads = row_scales = None
    factors, batch_weights = weighting if weighting is not None else (None, None)
    whole_epoch = getattr(step, "run_epoch", None)  # (no progress bar: nothing returns between the steps)
    if whole_epoch is not None and progress is None and gradient_sum is None and order is not None:
        done = whole_epoch(opt, params, X, y, order, batch_size, factors, batch_weights)
        if done is not None:
            return done
    for b, lo in enumerate((progress or iter)(range(0, n, batch_size))):
        hi = min(lo + batch_size, n)  # the standard leaves out-of-bounds slices unspecified
        rows = hi - lo
        opt.start_batch(rows, rows if batch_weights is None else batch_weights[b])
        if gradient_sum is not None:
            lo, hi = shard(lo, hi, gradient_sum.comm.rank, gradient_sum.comm.size)
        if hi > lo:  # a rank's shard of a short last batch may be empty
            if order is not None:
                xb, yb = step.take_batch(X, y, order[lo:hi])
            else:
                xb, yb = X[lo:hi, ...], y[lo:hi]
            if factors is not None:
                row_scales = factors[lo:hi]
            batch_loss, batch_correct = step(xb, yb, row_scales)
            grads = step.gradients()
            loss_sum = loss_sum + batch_loss  # device scalars: read once per epoch, not per step
            correct = correct + batch_correct
        if gradient_sum is not None:
            gradient_sum(grads, (hi - lo) / rows)
        opt.step(params, grads)
    return loss_sum, correct


def _check_sample_weight(sample_weight, rows: int) -> np.ndarray:
    """``sample_weight`` as float64 NumPy, checked: one finite weight >= 0 per row."""
    if array_library(sample_weight) == "cupy":
        sample_weight = sample_weight.get()  # the weights are read on the host
    try:
        weights = np.asarray(sample_weight, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"sample_weight must be an array of numbers, got {type(sample_weight).__name__}") from None
    if weights.shape != (rows,):
        raise ValueError(f"sample_weight must have shape ({rows},), one weight per row of X, got {weights.shape}")
    bad = np.flatnonzero(~np.isfinite(weights) | (weights < 0))
    if bad.size:
        raise ValueError(f"sample_weight must be finite and >= 0: sample_weight[{bad[0]}] = {weights[bad[0]]}")
    return weights


def _batch_scales(weights, order, batch_size: int, dtype, backend):
    """Each row's factor on its loss in its batch, in the epoch's ``order`` (on the model's
    device), and each batch's summed weight (host floats).

    A row's factor is its weight over its batch's mean weight, so a step's mean loss is the
    batch's weighted mean (scikit-learn's ``sample_weight``); a batch whose weights are all 0
    gets factors of 0 (it moves nothing but a penalty's decay and the optimizer's momentum).
    """
    w = weights if order is None else weights[order]
    starts = np.arange(0, w.shape[0], batch_size)
    sums = np.add.reduceat(w, starts)
    rows = np.diff(np.append(starts, w.shape[0]))
    means = np.repeat(sums / rows, rows)
    factors = np.divide(w, means, out=np.zeros_like(w), where=means > 0)
    return backend.asarray(factors.astype(dtype)), sums.tolist()


def _progress_bar(description):
    from tqdm.auto import tqdm

    return lambda batches: tqdm(batches, desc=description, unit="batch", leave=False, file=sys.stderr)


def fit(
    model,
    X,
    y,
    *,
    epochs=10,
    batch_size=128,
    optimizer="sgd",
    lr=None,
    momentum=None,
    nesterov=False,
    weight_decay=None,
    schedule=None,
    validation_data=None,
    validation_split=0.0,
    shuffle=True,
    callbacks=(),
    verbose=1,
    run_dir=None,
    resume=False,
    initial_epoch=0,
    on_divergence="warn",
    distributed=None,
    sample_weight=None,
) -> History:
    """Train ``model`` by mini-batch gradient descent on the mean cross-entropy.

    See ``Sequential.fit`` for the parameters. Returns the History of per-epoch metrics.

    ``initial_epoch`` (as Keras's): the epoch to start from, so that epochs ``initial_epoch`` to
    ``epochs - 1`` run, with the schedule where those epochs have it. ``resume=True`` continues
    the run recorded in ``run_dir`` from its checkpoint: the weights, the optimizer's state,
    the shuffling and dropout generators and the epoch are those the run had after its last
    finished epoch, so the rest of the run is bit for bit the one it would have been; the
    settings must be those the run was recorded with. ``sample_weight``: see ``Sequential.fit``.
    """
    comm = distributed_for_fit(distributed, model.backend.name)
    follower = comm is not None and comm.rank != 0
    if follower:
        verbose, run_dir = 0, None  # rank 0 alone prints and records (and reads a resumed run)
    with failure_ends_the_job(comm):
        epochs = _check_int("epochs", epochs, 0)
        initial_epoch = _check_int("initial_epoch", initial_epoch, 0)
        if initial_epoch > epochs:
            raise ValueError(f"initial_epoch must be <= epochs ({epochs}), got {initial_epoch}")
        batch_size = _check_int("batch_size", batch_size, 1)
        if comm is not None:
            if batch_size < comm.size:
                raise ValueError(f"batch_size ({batch_size}) is the global batch: it must be >= the {comm.size} ranks")
        opt = make_optimizer(
            optimizer, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, schedule=schedule
        )
        if not model.built:
            model.build(model._shape_from_data(X))
        rows = getattr(X, "shape", (None,))[0]
        step = _training_step(model, min(batch_size, rows) if isinstance(rows, int) and rows > 0 else batch_size,
                              all_cores=comm is None)  # ranks already share the cores
        X, y, val = _split_validation(
            model, X, y, validation_data, validation_split, keep_pixels=step.takes_pixels
        )
        weights = None
        if sample_weight is not None:
            split_off = int(val[0].shape[0]) if validation_split else 0  # a validation split: the last rows
            weights = _check_sample_weight(sample_weight, int(X.shape[0]) + split_off)[: X.shape[0]]
            if not weights.any():
                held_out = " (validation_split holds out the others)" if split_off else ""
                raise ValueError(f"sample_weight is 0 for every row it trains on{held_out}: nothing to learn from")
        if on_divergence not in ON_DIVERGENCE:
            raise ValueError(f"on_divergence must be one of {ON_DIVERGENCE}, got {on_divergence!r}")
        callbacks = list(callbacks)
        monitor = None if on_divergence == "ignore" else DivergenceMonitor(stop=on_divergence == "stop")
        if monitor is not None:
            callbacks.insert(0, monitor)
        if run_dir is not None:
            from .runs import RunRecorder

            callbacks.append(RunRecorder(run_dir, resume=resume))
        elif resume and not follower:
            raise ValueError("resume=True continues the run recorded in run_dir: give run_dir")
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be xpnet.callbacks.Callback objects, got {cb!r}")
        if comm is not None:
            from .runs import RunRecorder

            if any(isinstance(cb, RunRecorder) and cb.resume for cb in callbacks):  # rank 0, which reads it
                _check_resumable_across_ranks(model)  # before the run folder is touched
        history = History()
        callbacks.insert(0, history)

        backend = model.backend
        n = int(X.shape[0])
        if comm is not None and n < comm.size:  # a rank with no rows in the first batch has no gradients
            raise ValueError(f"distributed training needs a training row per rank, got {n} for {comm.size} ranks")
        params = model.parameters()
        settings = {
            "epochs": epochs,
            "batch_size": batch_size,
            "optimizer": repr(opt),
            "lr": opt.base_lr,
            "weight_decay": opt.weight_decay,
            "schedule": repr(opt.schedule) if opt.schedule else "constant",
            "shuffle": bool(shuffle),
            "n_train": n,
            "n_val": int(val[0].shape[0]) if val else 0,
            "chance_accuracy": _chance_accuracy(backend.xp, y, model.n_classes),
        }
        if comm is not None:
            settings["ranks"] = comm.size
        if weights is not None:  # (only then: runs recorded before sample weights resume as they were)
            settings["sample_weight_sum"] = float(weights.sum())
        # on the CPU batches go through take_batch even in order: it scales kept uint8 pixels,
        # makes sparse rows dense, or hands the fast step's sparse first layer its rows
        in_sequence = np.arange(n) if isinstance(X, (np.ndarray, SparseRows)) else None
        model.stop_training = False
        begun = []  # the callbacks whose run has started, and so must be told it ended
        running = contextlib.ExitStack()  # what the step holds while it trains (step.running())
        try:
            for i, cb in enumerate(callbacks):
                cb.model, cb.optimizer, cb.callbacks_before = model, opt, tuple(callbacks[:i])
                cb.on_train_begin(dict(settings))
                begun.append(cb)
            resumed = [cb.initial_epoch for cb in callbacks if cb.initial_epoch is not None]
            if resumed and initial_epoch:
                raise ValueError("give initial_epoch or resume a recorded run, not both")
            first_epoch = resumed[0] if resumed else initial_epoch
            gradient_sum = None
            if comm is not None:  # every rank starts from rank 0's weights, epoch, optimizer and callbacks
                first_epoch = share_start(comm, model, opt, first_epoch, keeping_state(callbacks))
                gradient_sum = GradientSum(comm, backend.xp, params)
            # after the callbacks began: a resumed optimizer's state is the one the graph adopts;
            # distributed training takes the eager loop, whose steps the all-reduce goes between
            # (the graph path takes no sample weights: one kernel per layer, no per-row factors)
            graphs = None if comm is not None or weights is not None else _graph_trainer(model, opt, X, y, batch_size)
            running.enter_context(step.running())
            for epoch in range(first_epoch, epochs):
                start = time.perf_counter()
                opt.start_epoch(epoch, epochs)
                last_good = _copies(backend.xp, params)
                order = model._rng.permutation(n) if shuffle else in_sequence
                if comm is not None and shuffle:
                    comm.broadcast(order)  # rank 0's shuffle, whatever the others' seeds
                weighting = None if weights is None else _batch_scales(weights, order, batch_size, model.dtype, backend)
                order = backend.asarray(order) if shuffle else order
                if graphs is not None:
                    loss_sum, correct = graphs.run_epoch(order)
                else:
                    progress = _progress_bar(f"epoch {epoch + 1}/{epochs}") if verbose else None
                    loss_sum, correct = _run_epoch(
                        step, opt, params, X, y, order, batch_size, progress, gradient_sum, weighting
                    )
                totals = np.array([float(loss_sum), float(correct)])
                if comm is not None:
                    comm.sum(totals)
                logs = {"loss": float(totals[0]) / n, "accuracy": float(totals[1]) / n}
                if not math.isfinite(logs["loss"]):
                    # the weights are no longer numbers: end with those of the last finished epoch
                    for p, good in zip(params, last_good):
                        p[...] = good
                    restored = f"the weights of epoch {epoch}" if epoch > first_epoch else "the weights it started with"
                    history.warnings.append(
                        f"training diverged: the loss became {logs['loss']} in epoch {epoch + 1}; lower the learning "
                        f"rate (lr={opt.lr:.4g}); {restored} were restored and training stopped"
                    )
                    history.diverged = True
                    warnings.warn(history.warnings[-1], DivergenceWarning, stacklevel=3)
                    break
                if val is not None:
                    scores = model._evaluate_prepared(*val)
                    logs.update(val_loss=scores["loss"], val_accuracy=scores["accuracy"])
                logs["seconds"] = time.perf_counter() - start
                logs["lr"] = opt.lr
                for cb in callbacks:
                    cb.on_epoch_end(epoch, logs)
                if verbose:
                    line = " - ".join(f"{k}: {v:.4f}" for k, v in logs.items() if k not in ("seconds", "lr"))
                    print(f"epoch {epoch + 1}/{epochs} - {logs['seconds']:.2f}s - {line}", file=sys.stderr)
                if model.stop_training:
                    break
        finally:
            running.close()
            if monitor is not None:
                history.warnings[:0] = monitor.warnings
                history.diverged = history.diverged or monitor.diverged
            end = {"epochs_run": len(history.epoch), "warnings": list(history.warnings), "diverged": history.diverged}
            for cb in begun:
                cb.on_train_end(dict(end))
        return history


#: what ``fit`` does when training diverges (see ``callbacks.DivergenceMonitor``)
ON_DIVERGENCE = ("warn", "stop", "ignore")


def _copies(xp, arrays) -> list:
    """Copies of ``arrays`` (through ``empty_like``: CuPy's ``asarray`` has no ``copy``)."""
    copies = [xp.empty_like(a) for a in arrays]
    for copy, a in zip(copies, arrays):
        copy[...] = a
    return copies


def _check_resumable_across_ranks(model) -> None:
    """Refuse to resume a distributed run that could not continue exactly: rank 0 shuffles for
    every rank, but each rank draws its own Dropout and RandomShift masks, and the checkpoint
    holds only rank 0's generators."""
    drawing = [f"{type(layer).__name__} (layer {i})" for i, layer in enumerate(model.layers)
               if isinstance(layer, _Seeded)]
    if drawing:
        raise ValueError(f"a distributed run of a model with {', '.join(drawing)} cannot be resumed: each rank "
                         "draws its own masks, and the checkpoint holds only rank 0's generators")


def rng_states(model) -> dict:
    """The state of every generator training draws from (JSON-able): the model's, which
    shuffles, as ``"model"``, and each ``Dropout`` or ``RandomShift`` layer's as ``"layers.<i>"``."""
    return {name: rng.bit_generator.state for name, rng in _rngs(model).items()}


def set_rng_states(model, states: dict) -> None:
    """Put back the generators' states ``rng_states`` gave; ValueError if they are not this model's."""
    rngs = _rngs(model)
    if set(states) != set(rngs):
        raise ValueError(f"random states for {sorted(states)} do not match this model's generators {sorted(rngs)}")
    for name, rng in rngs.items():
        try:
            rng.bit_generator.state = states[name]
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"the random state of {name!r} does not fit its generator: {exc}") from None


def _rngs(model) -> dict:
    layers = {f"layers.{i}": layer._rng for i, layer in enumerate(model.layers)
              if isinstance(layer, _Seeded)}
    return {"model": model._rng, **layers}


def _chance_accuracy(xp, y, n_classes: int) -> float:
    """The accuracy of always answering the most common class of ``y``."""
    if y.shape[0] == 0:
        return 0.0
    counts = [int(xp.sum(xp.astype(y == c, xp.int64))) for c in range(n_classes)]
    return max(counts) / int(y.shape[0])
