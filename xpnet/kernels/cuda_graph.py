"""Training steps of a ReLU MLP on CuPy as CUDA graphs of xpnet's own kernels.

Why: a small MLP on a big GPU is bound by launches, not FLOPs (a 784-256-128-10 step at batch
128 is ~129 MFLOP, about 2 us of H100 arithmetic, against 5-20 us of host time per launch).
The eager loop in ``xpnet.training`` issues ~40 launches per step from Python. Here one step is
3L + 2 kernels for L layers, one more per split product (12 for 784-50-25-10), all from
``kernels/xpnet_kernels.cu``:

    gather_rows                       batch = X[perm[step * B : ...]], labels likewise
    gemm forward(_relu)   x L         h_l = act(h_{l-1} @ W_l + b_l), bias and ReLU fused; where
                                      the output has too few tiles for the GPU and K is long
                                      (x @ W1), K is split across blocks and sum_splits adds the
                                      slices, then the bias and ReLU (``k_splits``)
    softmax_cross_entropy             dlogits, and the loss sum and correct count (on device)
    gemm weight_grad      x L         dW_l = h_{l-1}.T @ dh_l; db_l = column sums (fused row)
    gemm input_grad_relu  x L - 1     dh_{l-1} = (dh_l @ W_l.T) where h_{l-1} > 0
    update_parameters                 SGD / momentum / Nesterov / Adam on every tensor at once

captured once into a CUDA graph (one for full batches, one for a shorter last batch) and
replayed: one host call per step. cuBLAS is not used because CuPy refuses cuBLAS calls during
stream capture (cupy#6290); the GEMMs here are small (a batch against layers of up to a few
hundred) and latency-bound, which simple 32 x 32 tiles serve well.

The math is xpnet's (``xpnet.layers.Dense``, ``xpnet.optim``); the step counter that picks the
batch and Adam's ``t`` live on the device, so a replay needs no argument from the host. The
optimizer state lives in flat device buffers that the ``Optimizer``'s ``state`` views, so an
eager ``step`` afterwards continues from it.
"""

from __future__ import annotations

import os

import numpy as np

from . import cuda

__all__ = ["GraphTrainer", "trainer_for"]


def why_not(model, optimizer, X, batch_size) -> str | None:
    """Why the graph path cannot train this model with this optimizer on ``X``, or ``None`` if
    it can."""
    from ..optim import SGD, Adam

    if os.environ.get("XPNET_CUDA_GRAPHS", "1") == "0":
        return "XPNET_CUDA_GRAPHS=0"
    if model.backend.name != "cuda":
        return f"the model is on the {model.backend.name!r} backend"
    reason = cuda.unavailable()
    if reason:
        return reason
    if type(optimizer) not in (SGD, Adam):
        return f"optimizer {type(optimizer).__name__} has no fused update kernel"
    widths = layer_widths(model.layers)
    if model.dtype not in cuda.FLOATS:
        return f"dtype {model.dtype} has no kernels"
    layers = model.layers
    for layer in layers:
        for p in layer.params:
            if not p.flags.c_contiguous or p.dtype.name != model.dtype:
                return "parameters must be C-contiguous arrays of the model's dtype"
    if max(widths) > 65535 * 32 or batch_size > 65535 * 32:
        return "layer or batch too wide for the GEMM grid"
    problem = _problem_with_X(model, X)
    return problem[1] if problem else None


def _problem_with_X(model, X) -> tuple[type, str] | None:
    """(exception type, message) for what makes ``X`` unfit for the gather kernel, or ``None``:
    that kernel reads X's bytes as rows of the model's dtype and width, unchecked."""
    import cupy

    if not isinstance(X, cupy.ndarray):
        return TypeError, f"X must be a cupy.ndarray on the GPU, got {type(X).__module__}.{type(X).__name__}"
    if X.dtype != np.dtype(model.dtype):
        return TypeError, f"X has dtype {X.dtype.name}, the model {model.dtype}: convert X first"
    fan_in = layer_widths(model.layers)[0]
    if X.ndim != 2 or X.shape[0] < 1 or X.shape[1] != fan_in:
        return ValueError, f"X must have shape (N >= 1, {fan_in}) to fit the first layer, got {X.shape}"
    return None


def update_hyperparameters(optimizer) -> np.ndarray:
    """The update kernel's ``hyper`` array (float64): lr, momentum, weight_decay, beta1, beta2,
    eps, nesterov, from ``optimizer.hyperparameters()`` (0 where it has no such setting)."""
    h = optimizer.hyperparameters()
    return np.asarray([h["lr"], h.get("momentum", 0.0), h["weight_decay"], h.get("beta1", 0.0), h.get("beta2", 0.0),
                       h.get("eps", 0.0), float(h.get("nesterov", False))], dtype=np.float64)


def layer_widths(layers) -> list[int]:
    """``[fan_in, units_1, ..., units_L]`` of a stack of dense layers (``W`` of (fan_in, units))."""
    return [int(layers[0].W.shape[0])] + [int(layer.W.shape[1]) for layer in layers]


def k_splits(M: int, N: int, K: int, multiprocessors: int) -> tuple[int, int]:
    """``(S, kc)``: how many slices of ``kc`` values of K (a multiple of 32) the product of an
    ``M x K`` and a ``K x N`` matrix is split into. Split only where the 32 x 32 output tiles
    fill less than half the GPU and each would loop over more than 8 tiles of K (x @ W1 at batch
    128: 8 tiles, 25 steps of K each); then into enough slices to fill the GPU, of >= 2 steps each.
    """
    tiles = -(-M // 32) * -(-N // 32)
    if K <= 256 or 2 * tiles >= multiprocessors:
        return 1, K
    splits = min(-(-multiprocessors // tiles), -(-K // 64))
    kc = (-(-K // splits) + 31) // 32 * 32  # ceil(K / splits), rounded up to whole tiles of K
    return -(-K // kc), kc


def trainer_for(model, optimizer, X, y, batch_size):
    """A ``GraphTrainer`` for this run, or ``None`` where the eager loop must run instead."""
    if why_not(model, optimizer, X, batch_size):
        return None
    return GraphTrainer(model, optimizer, X, y, batch_size)


class GraphTrainer:
    """Replays captured training steps over a data set already on the GPU.

    Parameters
    ----------
    model : a model of Dense layers on the ``"cuda"`` backend, ReLU hidden layers and a linear
        output (``xpnet.training`` checks that before it asks)
    optimizer : xpnet.optim.SGD or xpnet.optim.Adam (its hyperparameters are read every epoch;
        SGD's momentum may not go from 0 to more after capture)
    X : cupy.ndarray (N, features) of the model's dtype; y : cupy.ndarray (N,) integer labels
    batch_size : int

    The data are checked here (a raw kernel would read a wrong dtype or width as garbage), and
    each epoch's ``order`` in ``run_epoch``.
    """

    def __init__(self, model, optimizer, X, y, batch_size):
        import cupy

        from ..optim import Adam

        problem = _problem_with_X(model, X)
        if problem:
            raise problem[0](problem[1])
        if not isinstance(y, cupy.ndarray) or y.dtype.kind not in "iu":
            raise TypeError(f"y must be a cupy.ndarray of integer labels, got {getattr(y, 'dtype', type(y))}")
        if y.shape != (X.shape[0],):
            raise ValueError(f"y must have shape ({X.shape[0]},) to match X, got {y.shape}")
        self.model, self.optimizer = model, optimizer
        self.adam = isinstance(optimizer, Adam)
        self.X = cupy.ascontiguousarray(X)
        self.y = cupy.ascontiguousarray(y)
        if self.y.dtype.name not in cuda.LABELS:
            self.y = self.y.astype(cupy.int64)
        self.n = int(self.X.shape[0])
        self.batch = min(int(batch_size), self.n)
        self.dtype = np.dtype(model.dtype)
        t = cuda.FLOATS[model.dtype]
        lab = cuda.LABELS[self.y.dtype.name]
        self.widths = widths = layer_widths(model.layers)
        B = self.batch

        # every buffer a step touches, allocated before capture (a graph bakes addresses in)
        self.h = [cupy.empty((B, w), self.dtype) for w in widths]  # h[0] is the batch
        self.dh = [None] + [cupy.empty((B, w), self.dtype) for w in widths[1:]]
        self.labels = cupy.empty(B, self.y.dtype)
        params = model.parameters()
        sizes = [int(p.size) for p in params]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        total = int(offsets[-1])
        self.grads = cupy.empty(total, self.dtype)
        # SGD's velocity exists only with momentum, as in xpnet.optim (whose state_keys are fixed
        # when it is made): run_epoch refuses momentum turned on after capture, which would
        # write this one-element buffer in full
        self.velocity = not self.adam and bool(optimizer.momentum)
        self.state1 = cupy.zeros(total if (self.adam or self.velocity) else 1, self.dtype)
        self.state2 = cupy.zeros(total if self.adam else 1, self.dtype)
        self._views = lambda flat: [
            flat[offsets[i] : offsets[i + 1]].reshape(p.shape) for i, p in enumerate(params)
        ]
        self.dW = self._views(self.grads)[0::2]
        self.db = self._views(self.grads)[1::2]
        self.param_ptrs = cupy.asarray(np.array([p.data.ptr for p in params], dtype=np.uint64))
        self.offsets = cupy.asarray(offsets)
        self.tensors = len(params)
        self.hyper = cupy.zeros(7, cupy.float64)
        self.counters = cupy.zeros(2, cupy.int64)  # [step in epoch, update count t]
        self.perm = cupy.arange(self.n, dtype=cupy.int64)
        self.loss_sum = cupy.zeros((), self.dtype)
        self.correct = cupy.zeros((), cupy.uint64)
        self._adopt_state(params)

        self.k_gather = cuda.kernel(f"gather_rows<{t}, {lab}>")
        self.k_gemm = {form: cuda.kernel(f"gemm<{t}, {args}>") for form, args in cuda.GEMM_FORMS.items()}
        self.k_update = cuda.kernel(f"update_parameters<{t}, {int(self.adam)}>")
        self.k_sum_splits = {epi: cuda.kernel(f"sum_splits<{t}, {epi}>") for epi in (1, 2)}
        cuda.warmup()  # every kernel loaded now: no module load in the middle of a capture
        cuda.blocks_for(1)  # and the device properties read

        # split K where a forward product has too few output tiles to fill the GPU (k_splits)
        sms = cuda._multiprocessors(cupy.cuda.runtime.getDevice())
        row_counts = {B, self.n % B} - {0}
        self.splits = {rows: [k_splits(rows, widths[l], widths[l - 1], sms) for l in range(1, len(widths))]
                       for rows in row_counts}
        self.partials = cupy.empty(max(S * rows * widths[l + 1] for rows, plan in self.splits.items()
                                       for l, (S, _) in enumerate(plan)), self.dtype)

        self.launches_per_step = 0
        self.graphs = {}
        for rows in row_counts:
            self.graphs[rows] = self._capture(rows)

    # -- optimizer state shared with xpnet.optim ----------------------------------------------

    def _adopt_state(self, params):
        """Start from the optimizer's state, and make its state views of the flat buffers."""
        opt = self.optimizer
        old = opt.state
        t = 0
        new = []
        for i, p in enumerate(params):
            entry = {}
            if self.adam:
                entry["m"], entry["v"] = self._views(self.state1)[i], self._views(self.state2)[i]
            elif opt.momentum:
                entry["v"] = self._views(self.state1)[i]
            if old is not None:
                for key, view in entry.items():
                    if key in old[i]:
                        view[...] = old[i][key]
                t = old[i].get("t", t)
            if self.adam:
                entry["t"] = t
            new.append(entry)
        opt.state = new
        self.counters[1] = t
        self.t = t

    # -- one step, as launches ------------------------------------------------------------------

    def _launch_step(self, rows):
        """Issue one training step over ``rows`` rows (captured, never run directly)."""
        B, widths = self.batch, self.widths
        L = len(widths) - 1
        i32, i64 = np.int32, np.int64
        launches = 0

        def gemm(form, A, Bm, C, aux, M, N, K, lda, ldb, ldc, extra_row=False, splits=(1, None)):
            nonlocal launches
            S, kc = splits
            grid = (-(-N // 32), -(-(M + (1 if extra_row else 0)) // 32), S)
            self.k_gemm[form](grid, (256,), (A, Bm, C, aux, i32(M), i32(N), i32(K), i32(lda), i32(ldb), i32(ldc),
                                             i32(kc or K)))
            launches += 1

        F0 = widths[0]
        self.k_gather(
            (cuda.blocks_for(rows * F0),), (cuda.THREADS,),
            (self.X, self.y, self.perm, self.counters, self.h[0], self.labels, i64(rows), i64(F0), i64(B)),
        )
        launches += 1
        layers = self.model.layers
        for l in range(1, L + 1):
            relu = l < L
            M, N, K = rows, widths[l], widths[l - 1]
            S, kc = self.splits[rows][l - 1]
            W, b = layers[l - 1].W, layers[l - 1].b
            if S == 1:
                gemm("forward_relu" if relu else "forward", self.h[l - 1], W, self.h[l], b, M, N, K, K, N, N)
                continue
            gemm("partial", self.h[l - 1], W, self.partials, b, M, N, K, K, N, N, splits=(S, kc))
            self.k_sum_splits[2 if relu else 1](
                (cuda.blocks_for(M * N),), (cuda.THREADS,), (self.partials, self.h[l], b, i32(M), i32(N), i32(S)))
            launches += 1
        logits, dlogits = self.h[L][:rows], self.dh[L][:rows]
        cuda.accumulate_cross_entropy(logits, self.labels[:rows], dlogits, self.loss_sum,
                                      1.0 / rows, 1.0, self.correct)
        launches += 1
        for l in range(L, 0, -1):
            gemm("weight_grad", self.h[l - 1], self.dh[l], self.dW[l - 1], self.db[l - 1],
                 widths[l - 1], widths[l], rows, widths[l - 1], widths[l], widths[l], extra_row=True)
            if l > 1:
                gemm("input_grad_relu", self.dh[l], layers[l - 1].W, self.dh[l - 1], self.h[l - 1],
                     rows, widths[l - 1], widths[l], widths[l], widths[l], widths[l - 1])
        total = int(self.grads.size)
        self.k_update(
            (cuda.blocks_for(total, per_sm=4),), (cuda.THREADS,),
            (self.param_ptrs, self.offsets, i32(self.tensors), self.grads, self.state1, self.state2,
             self.hyper, self.counters),
        )
        launches += 1
        self.launches_per_step = launches

    def _capture(self, rows):
        import cupy

        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            stream.begin_capture()
            try:
                self._launch_step(rows)
            finally:
                graph = stream.end_capture()
        return graph

    # -- epochs ---------------------------------------------------------------------------------

    def run_epoch(self, order=None):
        """Train one epoch over the rows in ``order`` (a device integer array of N row indices
        in [0, N), usually a permutation; or ``None`` for 0..N-1) at the optimizer's current
        hyperparameters.

        Returns ``(loss_sum, correct)``: 0-d device arrays, the summed per-sample loss and the
        number of correct predictions (read them once, after the epoch).
        """
        import cupy

        opt = self.optimizer
        hyper = update_hyperparameters(opt)
        if hyper[1] and not self.velocity:
            raise ValueError(
                f"momentum is {hyper[1]} but was 0 when this GraphTrainer captured its graphs, which "
                "keep no velocity then; set momentum when making the optimizer"
            )
        self.hyper.set(hyper)
        if order is None:
            self.perm[...] = cupy.arange(self.n, dtype=cupy.int64)
        else:
            self._check_order(order)
            self.perm[...] = order
        self.counters[0] = 0
        self.loss_sum.fill(0)
        self.correct.fill(0)
        stream = cupy.cuda.get_current_stream()
        full, tail = divmod(self.n, self.batch)
        for _ in range(full):
            self.graphs[self.batch].launch(stream)
        if tail:
            self.graphs[tail].launch(stream)
        self.t += full + (1 if tail else 0)
        if self.adam:
            for entry in opt.state:
                entry["t"] = self.t
        return self.loss_sum.copy(), self.correct.copy()

    def _check_order(self, order):
        """The gather kernel indexes X with ``order`` unchecked: refuse what would read outside it
        (at the cost of reading its min and max back once per epoch)."""
        import cupy

        if not isinstance(order, cupy.ndarray) or order.dtype.kind not in "iu":
            raise TypeError(f"order must be a cupy.ndarray of row indices, got {getattr(order, 'dtype', type(order))}")
        if order.shape != (self.n,):
            raise ValueError(f"order must have shape ({self.n},), one index per row of X, got {order.shape}")
        low, high = int(order.min()), int(order.max())
        if low < 0 or high >= self.n:
            raise ValueError(f"order must hold row indices in [0, {self.n}), got values in [{low}, {high}]")
