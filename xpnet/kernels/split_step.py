"""The reference training step on NumPy, each batch split into row slices run at once, one per core.

On a few cores a small network's step is a chain of small products and loops, and splitting
each product across the cores (OpenBLAS's own threads) gains little: LeNet-5 at batch 128 took
5.9 ms a step with OpenBLAS on 2 threads, 6.5 ms on one, against 4.1 ms for two 64-row halves
run at once, each with OpenBLAS on one thread (2-core AMD EPYC, ``bench/cnn_step_profile.py``).
Here the layers of each part after the first are shallow copies of the model's (the same
parameter arrays, their own saved activations and gradients), every part runs the reference
step on its rows in its own thread (numba's kernels and OpenBLAS release the GIL), and the
parts' gradients are summed, each weighted by its share of the rows: the batch's gradient, up
to rounding.

It covers only layers whose output rows depend on their input rows alone and which draw no
random numbers (``xpnet.training.split_step_for`` checks the exact types); the kernels inside a
part run serially (``numba_cpu.serial_kernels``), since every core already has a part.
"""

from __future__ import annotations

import contextlib
import copy
import os
import queue
import threading
from concurrent.futures import Future

from . import numba_cpu

__all__ = ["SplitStep", "cores", "OneBlasThread"]

#: Rows from which a part pays for its thread. Measured with LeNet-5 on the 2-core EPYC: two
#: parts of 64 rows took 0.69x the time of one batch of 128 on OpenBLAS's two threads, two of 32
#: rows 0.82x the time of one batch of 64 (``bench/cnn_step_profile.py --batch 64``).
MIN_ROWS_PER_PART = 32


def cores() -> int:
    """The cores this process may run on (its CPU affinity), at most numba's thread count
    (``NUMBA_NUM_THREADS`` sets both)."""
    import numba

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        usable = os.cpu_count() or 1
    return max(1, min(usable, numba.config.NUMBA_NUM_THREADS))


class OneBlasThread:
    """BLAS on one thread while this process's own threads use the cores (BLAS's threads beside
    them would fight them for the cores). ``take()`` limits it; ``give_back()`` restores it,
    except inside ``held()``, which keeps any limit taken until it ends: a training loop pays
    for it once instead of every step (~20 us a step)."""

    def __init__(self):
        self._blas = self._limit = None  # threadpoolctl's handle on the BLAS libraries, the limit
        self._held = False

    def take(self):
        if self._limit is None:
            if self._blas is None:
                from threadpoolctl import ThreadpoolController

                self._blas = ThreadpoolController().select(user_api="blas")
            self._limit = self._blas.limit(limits=1)

    def give_back(self):
        if self._limit is not None and not self._held:
            self._limit.restore_original_limits()
            self._limit = None

    @contextlib.contextmanager
    def held(self):
        self._held = True
        try:
            yield
        finally:
            self._held = False
            self.give_back()


class _Worker:
    """A thread of its own for one part, running the jobs it is given in order (a pool could
    hand two parts to one thread, one after the other)."""

    def __init__(self):
        self._jobs = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="xpnet-step-part", daemon=True).start()

    def submit(self, fn, *args) -> Future:
        future = Future()
        self._jobs.put((future, fn, args))
        return future

    def _serve(self):
        while True:
            future, fn, args = self._jobs.get()
            future.set_running_or_notify_cancel()
            try:
                future.set_result(fn(*args))
            except BaseException as error:  # handed to the caller, who raises it
                future.set_exception(error)


_workers: list[_Worker] = []  # started on first use, kept for later steps
_workers_lock = threading.Lock()


def _workers_for(n: int) -> list[_Worker]:
    with _workers_lock:
        while len(_workers) < n:
            _workers.append(_Worker())
        return _workers[:n]


class SplitStep:
    """``ReferenceStep``'s interface (``take_batch``, ``__call__``, ``gradients``) over ``parts``
    row slices of each batch, run at once."""

    takes_pixels = True  # as the reference step's take_batch, which it uses

    def __init__(self, model, reference_step, parts: int):
        self.model = model
        self.parts = int(parts)
        self._replicas = [copy.copy(model) for _ in range(self.parts - 1)]
        for replica in self._replicas:
            replica.layers = [copy.copy(layer) for layer in model.layers]
        self._steps = [reference_step(m) for m in (model, *self._replicas)]
        self.take_batch = self._steps[0].take_batch
        self._blas = OneBlasThread()  # a part's products on its own core
        self._workers = _workers_for(self.parts - 1)

    def gradients(self):
        return self.model.gradients()

    def running(self):
        return self._steps[0].running()

    def _part(self, k, xb, yb, scales):
        with numba_cpu.serial_kernels():
            return self._steps[k](xb, yb, scales)

    def __call__(self, xb, yb, scales=None):
        n = int(xb.shape[0])
        bounds = [n * k // self.parts for k in range(self.parts + 1)]
        spans = [(lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]
        layers = self.model.layers
        for replica in self._replicas:  # the model's parameter arrays now (an update may replace them)
            for layer, twin in zip(layers, replica.layers):
                for name in layer.param_names:
                    setattr(twin, name, getattr(layer, name))
        self._blas.take()
        try:
            futures = [worker.submit(self._part, k, xb[lo:hi, ...], yb[lo:hi], _rows(scales, lo, hi))
                       for worker, (k, (lo, hi)) in zip(self._workers, enumerate(spans[1:], 1))]
            try:
                first = self._part(0, xb[: spans[0][1], ...], yb[: spans[0][1]], _rows(scales, 0, spans[0][1]))
            finally:  # no part may still run when this call ends, even on an error
                rest = [f.result() for f in futures]
        finally:
            self._blas.give_back()
        results = [first, *rest]
        weights = [(hi - lo) / n for lo, hi in spans]
        for i, layer in enumerate(layers):
            for name in layer.param_names:
                grad = "d" + name
                total = getattr(layer, grad) * weights[0]
                for w, replica in zip(weights[1:], self._replicas):
                    total += getattr(replica.layers[i], grad) * w
                setattr(layer, grad, total)
        return sum(loss for loss, _ in results), sum(correct for _, correct in results)


def _rows(scales, lo, hi):
    """A part's slice of the batch's row factors (``None``: none)."""
    return None if scales is None else scales[lo:hi]
