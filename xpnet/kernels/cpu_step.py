"""The NumPy fast path of a training step: preallocated buffers and fused Numba kernels.

The math is the reference's (``Dense.forward``/``Dense.backward`` in ``xpnet.layers`` and
``softmax_cross_entropy`` in ``xpnet.functional``); this module only removes what a step of a
small MLP spends outside its matrix products on NumPy: an allocation per intermediate, a
dispatch per op, separate passes for ``db = dz.sum(0)`` and for the accuracy count. Per step:

- forward: ``np.matmul(h, W, out=z)``, then bias + ReLU in place (one kernel);
- loss: one kernel checks the labels, counts the correct predictions (``argmax`` ties resolve
  as in NumPy), writes the fused softmax + cross-entropy gradient into a buffer and sums its
  columns for the last ``db``;
- backward: ``dW = h.T @ dz`` and ``dh = dz @ W.T`` into buffers, then one kernel applies
  ReLU's derivative in place and sums the columns for ``db``;
- around it: the batch's rows and labels gathered by one kernel (``take_batch``); the
  optimizers apply their own fused updates (``xpnet.optim``).

Where most of the training inputs are zero (at most ``SPARSE_MAX_DENSITY`` of them nonzero, as
the 19% of MNIST's pixels) the first layer skips them: ``take_batch`` hands over the batch's
row numbers into a CSR copy of the data set (``SparseRows``, built once per data set; a scipy
sparse data set comes as one) instead of gathering dense rows, and the first layer's product
and its kernel's gradient run over the nonzeros alone (``_numba_loops.sparse_linear_*``). A
zero input then adds nothing to a unit, even against a weight that is not finite (where the
dense product would give NaN). Such a step runs whole in one kernel where numba can call BLAS
(scipy importable: ``numba_cpu.blas_in_kernels``) and the model has at most
``MAX_FUSED_LAYERS`` layers: ``_numba_loops.sparse_mlp_step`` takes each core through every
layer, forward and back, with its share of the batch's rows, each core's weight gradients
summed apart and added at the end (one start of numba's threads and no Python between the
layers: a 784-50-25-10 step at batch 200 on MNIST, median inside ``fit``, 164-166 us against
182-193 us layer by layer on the 2-core Intel Xeon). Elsewhere the layers run one by one as
above, the sparse kernels split across the cores. Where the optimizer has a fused update
(``Optimizer.fused_updates``), ``fit`` hands such a step whole epochs (``run_epoch``): a kernel
call runs up to ``EPOCH_CHUNK_STEPS`` batches' steps and updates with no Python between them
(a fit of the sklearn benchmark's recipe 0.53 s against 0.60 s), bit for bit what the loop over
the batches computes.

It runs only for what it covers (NumPy arrays, float32/float64, exactly ``Dense`` layers with
ReLU hidden activations and a linear output, numba importable, ``XPNET_KERNELS`` not ``xp``):
``xpnet.training.training_step_for`` decides, and runs the reference for anything else. The
layers are read at every call (their ``W``/``b`` may be replaced), never imported: kernels sit
below layers. tests/test_training.py checks a step against the reference step.
"""

from __future__ import annotations

import numpy as np

from ..sparse import SparseRows
from . import numba_cpu

__all__ = ["CpuTrainingStep", "SparseRows", "SPARSE_MAX_DENSITY", "EPOCH_CHUNK_STEPS"]

#: The largest share of nonzero training inputs for which the first layer runs sparse. The
#: sparse kernels' time grows with the nonzeros, the dense product's does not: a 784-50-25-10
#: step (batch 200, Adam) on the 2-core AMD EPYC took 0.69x the dense step's time on MNIST (19%
#: nonzero), 0.96x on 30% nonzero, 1.12x on 45% (``python bench/sparse_layer_density.py``).
SPARSE_MAX_DENSITY = 0.3

#: The most steps one call of a whole-epoch kernel takes (``CpuTrainingStep.run_epoch``): Python
#: runs between the calls, so Ctrl-C stops training within that many steps (64 MNIST steps of a
#: 784-50-25-10 take ~10 ms) rather than at the end of an epoch of any length.
EPOCH_CHUNK_STEPS = 64


class _SparseBatch:
    """A batch as rows ``idx`` of a ``SparseRows``: what ``take_batch`` hands the step."""

    def __init__(self, rows: SparseRows, idx):
        self.rows, self.idx = rows, idx
        self.shape = (idx.shape[0], rows.shape[1])


class CpuTrainingStep:
    """One forward + backward pass of a ReLU MLP on NumPy, into preallocated buffers.

    Parameters
    ----------
    layers : list of Dense
        Hidden layers with ReLU, a linear output layer, float32 or float64 NumPy parameters.
    batch_size : int
        The largest batch a call will get (smaller ones use the front of each buffer).
    cores : int, optional
        The cores the sparse first layer's kernels share a batch among (default: all this
        process may use, ``cores.cores()``; 1 where processes already share them).

    After a call each layer's ``dW``/``db`` refer to this object's gradient buffers (valid until
    the next call), so ``model.gradients()`` and any optimizer work unchanged.
    """

    def __init__(self, layers, batch_size: int, cores: int | None = None):
        self.layers = list(layers)
        self.batch_size = int(batch_size)
        self._loops = numba_cpu._get_loops()
        dtype = self.layers[0].W.dtype
        widths = [int(self.layers[0].W.shape[0])] + [int(layer.W.shape[1]) for layer in self.layers]
        n = self.batch_size
        self._dtype, self._fan_in = dtype, widths[0]
        self._inputs = {}  # dense batches of inputs, made on first use (sparse data needs none)
        self._y = np.empty(n, np.int64)
        self._no_scales = np.empty(0, dtype)  # the loss head's "no row factors"
        self._z = [np.empty((n, w), dtype) for w in widths[1:]]  # each layer's output
        self._dz = [np.empty((n, w), dtype) for w in widths[1:]]  # dL/d(pre-activation)
        self._rows = self._loops.block_rows(widths[-1])
        from .cores import OneBlasThread
        from .cores import cores as usable_cores

        self._parts = parts = max(1, int(cores)) if cores is not None else usable_cores()
        self._whole_step = None  # sparse_mlp_step's arguments that never change, where it runs
        if len(self.layers) <= self._loops.MAX_FUSED_LAYERS and numba_cpu.blas_in_kernels():
            self._whole_step = self._whole_step_buffers(widths, parts, dtype)
        else:
            self.dW = [np.empty((a, b), dtype) for a, b in zip(widths[:-1], widths[1:])]
            self.db = [np.empty(w, dtype) for w in widths[1:]]
            self._partials = np.empty((parts - 1, *self.dW[0].shape), dtype)  # (sparse_linear_grad's)
        self._grads = [g for pair in zip(self.dW, self.db) for g in pair]
        self._sparse_source = self._sparse = None  # the data set last asked for, and its CSR rows
        self._blas = OneBlasThread()

    def _whole_step_buffers(self, widths, parts, dtype):
        """``sparse_mlp_step``'s arguments that stay the same from step to step: the layers'
        outputs and gradients, and each core's part of the weight gradients (the first part of
        each is the step's gradient), in tuples of ``MAX_FUSED_LAYERS`` (the unused entries
        empty: one compiled kernel for every depth)."""
        dW_parts = [np.empty((parts, a, b), dtype) for a, b in zip(widths[:-1], widths[1:])]
        db_parts = [np.empty((parts, w), dtype) for w in widths[1:]]
        self.dW, self.db = [g[0] for g in dW_parts], [g[0] for g in db_parts]
        self._part_stats = np.empty((parts, 2))
        unused = self._loops.MAX_FUSED_LAYERS - len(self.layers)
        self._filler = {ndim: (np.empty((0,) * ndim, dtype),) * unused for ndim in (1, 2, 3)}  # by dimensions
        per_layer = (self._z, self._dz, dW_parts, db_parts)
        return tuple(tuple(arrays) + self._filler[arrays[0].ndim] for arrays in per_layer)

    # take_batch scales uint8 rows itself, so fit can keep a uint8 data set as it is (a quarter
    # of the memory, and no float copy of the whole set before the first step)
    takes_pixels = True

    def take_batch(self, X, y, idx):
        """``(X[idx], y[idx])`` gathered into the step's buffers by one kernel (valid indices,
        e.g. a slice of a permutation; out-of-range ones clip as ``np.take(mode="clip")``).
        uint8 ``X`` is scaled as ``xpnet.functional.scale_pixels`` does. ``X`` may be
        ``SparseRows`` (a scipy sparse data set): its rows go to the sparse first layer as
        they are, or dense where that layer runs dense."""
        n = idx.shape[0]
        yb = self._y[:n]
        if isinstance(X, SparseRows):
            idx = np.ascontiguousarray(idx, np.int64)
            yb = np.take(y, idx, out=yb, mode="clip")
            if self._sparse_fits(X):
                return _SparseBatch(X, idx), yb
            return X.take(idx, out=self._input_buffer("x", self._dtype)[:n]), yb
        if self._gatherable(X, y, idx):
            rows = self._sparse_rows(X)
            if rows is not None:
                return _SparseBatch(rows, idx), np.take(y, idx, out=yb, mode="clip")
            xb = self._input_buffer("x", self._dtype)[:n]
            if X.dtype == np.uint8:  # the bytes gathered, then scaled
                self._loops.take_pixel_batch(X, y, idx, self._input_buffer("raw", np.uint8)[:n], xb, yb)
            else:  # (floats of the other dtype are converted as they are copied)
                self._loops.take_batch(X, y, idx, xb, yb)
            return xb, yb
        # anything else: np.take (mode="clip" is what makes out= fast: with "raise" NumPy
        # gathers into a temporary first, 170 us against 14 us for 128 MNIST rows)
        yb = np.take(y, idx, mode="clip")
        if X.dtype == np.uint8:
            from ..functional import scale_pixels

            return scale_pixels(np.take(X, idx, axis=0, mode="clip"), self._dtype), yb
        return np.take(X, idx, axis=0, out=self._input_buffer("x", self._dtype)[:n], mode="clip"), yb

    def _input_buffer(self, name, dtype):
        """The step's buffer ``name`` for a batch of dense inputs, made on first use."""
        buffer = self._inputs.get(name)
        if buffer is None:
            buffer = self._inputs[name] = np.empty((self.batch_size, self._fan_in), dtype)
        return buffer

    def _sparse_rows(self, X):
        """``X`` as ``SparseRows`` (built on the first call for this array), or None where the
        first layer runs dense: too many nonzeros, or a layer narrower than one vector."""
        if X is not self._sparse_source:
            self._sparse_source, self._sparse = X, None
            if self._first_layer_vector_wide():
                self._sparse = SparseRows.of(X, self._dtype, self._parts, SPARSE_MAX_DENSITY)
        return self._sparse

    def _sparse_fits(self, rows: SparseRows) -> bool:
        """Whether the first layer runs over the nonzeros of ``rows`` (given sparse): as for
        dense data, where it is at least one vector wide and at most ``SPARSE_MAX_DENSITY`` of
        the values are nonzero; and the values are the step's dtype or uint8 pixels."""
        sparse_enough = rows.nnz <= SPARSE_MAX_DENSITY * rows.shape[0] * rows.shape[1]
        return sparse_enough and self._first_layer_vector_wide() and rows.values.dtype in (self._dtype, np.uint8)

    def _first_layer_vector_wide(self) -> bool:
        """Whether the first layer has at least one vector of units (else the sparse loops idle lanes)."""
        return self.layers[0].W.shape[1] >= self._loops.vector_lanes(self._dtype)

    def _gatherable(self, X, y, idx):
        """Whether the gather kernels take these arrays (else ``np.take`` runs)."""
        return (
            type(X) is np.ndarray and X.ndim == 2 and X.flags.c_contiguous
            and X.shape[1] == self._fan_in and X.dtype in (np.float32, np.float64, np.uint8)
            and type(y) is np.ndarray and y.dtype == np.int64 and y.shape == X.shape[:1]
            and y.flags.c_contiguous and type(idx) is np.ndarray and idx.dtype == np.int64
            and idx.ndim == 1 and idx.flags.c_contiguous
        )

    def gradients(self):
        """The gradient buffers in ``model.parameters()`` order: after a call, the same arrays
        as ``model.gradients()``, without walking the layers on every step."""
        return self._grads

    # The sparse kernels run on numba's threads, which spin a while after each loop; a BLAS
    # product on more than one thread meanwhile fights them for the cores: 784-256-128-10 took
    # 6.1-6.3 s an epoch instead of 0.40-0.41 on the 2-core EPYC. So while sparse steps run,
    # BLAS runs on one thread (the later layers' products are small); ``fit`` holds that limit
    # for the whole training (``running``), a step called outside it takes it per call.

    def running(self):
        """A context ``fit`` holds while it trains with this step: BLAS on one thread from the
        first sparse step on, given back at the end."""
        return self._blas.held()

    def __call__(self, xb, yb, scales=None):
        """Gradients of the mean cross-entropy on the batch ``(xb, yb)`` into ``dW``/``db``;
        ``scales`` (optional, shape (rows,), the parameters' dtype): each row's factor on its
        loss and gradient (see ``training.ReferenceStep``).

        Returns ``(loss_sum, correct)``: the summed (not mean) loss as a float and the number of
        rows whose arg-max logit is the label, both for the training loop's epoch metrics.
        """
        n = xb.shape[0]
        if n > self.batch_size:
            raise ValueError(f"a batch of {n} rows does not fit buffers for {self.batch_size}")
        if scales is None:
            scales = self._no_scales
        elif type(scales) is not np.ndarray or scales.shape != (n,) or scales.dtype != self._dtype:
            raise ValueError(f"scales must be a NumPy array of shape ({n},) and dtype {self._dtype}")
        sparse = isinstance(xb, _SparseBatch)
        if not sparse or self._parts == 1:  # no numba threads: nothing to keep BLAS's from
            return self._step(xb, yb, scales, n, sparse)
        self._blas.take()
        try:
            return self._step(xb, yb, scales, n, True)
        finally:
            self._blas.give_back()

    def _step(self, xb, yb, scales, n, sparse):
        loops, layers = self._loops, self.layers
        if sparse and self._whole_step is not None:
            return self._sparse_mlp_step(xb, yb, scales)
        h = xb
        outputs = []
        for i, (layer, z_buffer) in enumerate(zip(layers, self._z)):
            z = z_buffer[:n]
            if i == 0 and sparse:
                rows, W, b = xb.rows, np.ascontiguousarray(layer.W), np.ascontiguousarray(layer.b)
                args = (rows.indptr, rows.indices, rows.values, rows.table, xb.idx, W, b, z, layer.activation == "relu")
                if self._parts > 1:
                    loops.sparse_linear_parallel(*args, self._parts)
                else:
                    loops.sparse_linear_serial(*args)
            else:
                np.matmul(h, layer.W, out=z)
                if layer.activation == "relu":
                    loops.bias_relu_serial(z, layer.b, z)
                else:
                    loops.bias_add_inplace(z, layer.b)
            outputs.append(z)
            h = z
        logits = h
        dz = self._dz[-1][:n]
        loss_sum, correct, bad = loops.loss_head(logits, yb, np.ascontiguousarray(scales), dz, dz.reshape(-1),
                                                 self._rows, self.db[-1])
        if bad >= 0:
            raise ValueError(f"labels must lie in [0, {logits.shape[1]}); got {yb[bad]}")
        for i in range(len(layers) - 1, -1, -1):
            if i == 0 and sparse:
                rows = xb.rows
                kernel = loops.sparse_linear_grad_parallel if self._parts > 1 else loops.sparse_linear_grad_serial
                kernel(rows.indptr, rows.indices, rows.values, rows.table, xb.idx, dz, self.dW[0], self._partials)
            else:
                np.matmul((outputs[i - 1] if i > 0 else xb).T, dz, out=self.dW[i])
            layers[i].dW, layers[i].db = self.dW[i], self.db[i]
            if i > 0:
                dh = self._dz[i - 1][:n]
                np.matmul(dz, layers[i].W.T, out=dh)
                loops.relu_backward_colsum_inplace(dh, outputs[i - 1], self.db[i - 1])
                dz = dh
        return loss_sum, correct

    #: the epoch kernel of ``_numba_loops`` that runs the steps with each fused update kernel
    _EPOCH_KERNELS = {"adam_step": "sparse_mlp_epoch_adam", "sgd_step": "sparse_mlp_epoch_sgd"}

    def run_epoch(self, opt, params, X, y, order, batch_size, factors=None, batch_weights=None):
        """A whole epoch in kernel calls of up to ``EPOCH_CHUNK_STEPS`` steps each, where it can
        run so: ``fit``'s loop over the batches of ``order`` (valid row numbers, e.g. a
        permutation: ``take_batch``, the step, ``opt.start_batch`` and ``opt.step`` on
        ``params``; ``factors``/``batch_weights``: ``training._batch_scales``'s, or None), with
        the same results, bit for bit. Returns ``(loss_sum, correct)``, or ``None`` where it
        does not apply (nothing is changed then): it needs the whole step in one kernel on
        sparse rows, the optimizer's fused update (``Optimizer.fused_updates``) and every label
        in range (else the loop runs, and names the bad one)."""
        if self._whole_step is None or batch_size > self.batch_size:
            return None
        rows = self._epoch_rows(X, y, order)
        if rows is None or not 0 <= int(y.min()) <= int(y.max()) < self.layers[-1].W.shape[1]:
            return None
        if factors is None:
            factors = self._no_scales
        elif not (type(factors) is np.ndarray and factors.dtype == self._dtype and factors.shape == order.shape):
            return None
        n = order.shape[0]
        batches = [(min(batch_size, n - lo),) * 2 for lo in range(0, n, batch_size)]
        if batch_weights is not None:
            batches = [(count, weight) for (count, _), weight in zip(batches, batch_weights)]
        layers = self.layers
        Ws = tuple([np.ascontiguousarray(layer.W) for layer in layers]) + self._filler[2]
        bs = tuple([np.ascontiguousarray(layer.b) for layer in layers]) + self._filler[1]
        zs, dzs, dW_parts, db_parts = self._whole_step
        totals = np.zeros(2)
        if self._parts > 1:  # before the plan: the update splits among the cores while numba owns them
            self._blas.take()
        try:
            for first in range(0, len(batches), EPOCH_CHUNK_STEPS):
                chunk = batches[first:first + EPOCH_CHUNK_STEPS]
                plan = opt.fused_updates(params, self._grads, chunk)
                if plan is None:
                    if first == 0:
                        return None
                    raise RuntimeError(f"{opt!r} stopped offering its fused update within an epoch")
                kernel, parts, update_args = plan
                lo, hi = first * batch_size, min((first + len(chunk)) * batch_size, n)
                taken = getattr(self._loops, self._EPOCH_KERNELS[kernel])(
                    rows.indptr, rows.indices, rows.values, rows.table, order[lo:hi], batch_size, y, self._y,
                    factors[lo:hi] if factors.shape[0] else factors, Ws, bs, zs, dzs, dW_parts, db_parts, self._rows,
                    len(layers), self._part_stats, totals, *update_args, parts)
                if taken != len(chunk):  # (the labels were checked: only labels changed meanwhile get here)
                    raise ValueError(f"labels must lie in [0, {layers[-1].W.shape[1]}); one changed during the epoch")
        finally:
            self._blas.give_back()
        for layer, dW, db in zip(layers, self.dW, self.db):
            layer.dW, layer.db = dW, db
        return float(totals[0]), int(totals[1])

    def _epoch_rows(self, X, y, order):
        """The ``SparseRows`` a whole epoch's steps take for ``(X, y)`` in ``order``, or None
        where its batches would not run sparse (as ``take_batch`` decides) or the arrays are
        not the kernel's."""
        if not (type(order) is np.ndarray and order.dtype == np.int64 and order.ndim == 1
                and order.flags.c_contiguous and order.shape[0] > 0):
            return None
        if isinstance(X, SparseRows):
            fits = self._sparse_fits(X) and type(y) is np.ndarray and y.dtype == np.int64
            return X if fits and y.shape == (X.shape[0],) and y.flags.c_contiguous else None
        return self._sparse_rows(X) if self._gatherable(X, y, order) else None

    def _sparse_mlp_step(self, xb, yb, scales):
        """The whole step in one kernel (``_numba_loops.sparse_mlp_step``), each core a share of the rows."""
        layers, rows = self.layers, xb.rows
        Ws = tuple([np.ascontiguousarray(layer.W) for layer in layers]) + self._filler[2]
        bs = tuple([np.ascontiguousarray(layer.b) for layer in layers]) + self._filler[1]
        zs, dzs, dW_parts, db_parts = self._whole_step
        bad = self._loops.sparse_mlp_step(rows.indptr, rows.indices, rows.values, rows.table, xb.idx, Ws, bs, zs, dzs,
                                          dW_parts, db_parts, yb, np.ascontiguousarray(scales), self._rows,
                                          len(layers), self._part_stats)
        if bad >= 0:
            raise ValueError(f"labels must lie in [0, {layers[-1].W.shape[1]}); got {yb[bad]}")
        for layer, dW, db in zip(layers, self.dW, self.db):
            layer.dW, layer.db = dW, db
        stats = self._part_stats.tolist()  # (a few parts: Python sums them faster than NumPy)
        return sum(part[0] for part in stats), int(sum(part[1] for part in stats))
