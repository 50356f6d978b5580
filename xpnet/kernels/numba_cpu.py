"""Numba kernels for NumPy arrays: the hot ops of ``xpnet.functional``, fused and vectorized.

Same names, same arguments, same numerics contract as ``xpnet.functional`` (whose docstrings
hold the formulas); the compiled loops live in ``_numba_loops``, imported on first use so that
neither ``import xpnet`` nor importing this module imports numba.

- float32 and float64, any strides (a transposed or sliced input is read in place);
- each op runs serially below a size threshold and on all numba threads above it: thread
  start-up costs more than a (128, 10) softmax (thresholds measured on a 2-core AMD EPYC, see
  ``PARALLEL_MIN_ELEMENTS``); ReLU backward of an output larger than the cache writes with
  streaming stores (``STREAM_MIN_BYTES``), so it moves memory at the rate of a copy;
- compiled with ``cache=True``; ``NUMBA_CACHE_DIR`` is pointed at a writable user cache when
  unset, so a read-only install still caches (numba otherwise fails with "no locator
  available");
- ``warmup()`` compiles (or loads from the cache) every kernel for float32 and float64 up front,
  so a first training epoch is not a compile.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import time

import numpy as np

__all__ = [
    "relu_backward",
    "bias_relu",
    "softmax",
    "softmax_cross_entropy",
    "unavailable",
    "unsupported",
    "worth_it",
    "warmup",
]

# Elements (rows x columns) from which the parallel driver beats the serial one. Measured with
# bench/test_kernels_bench.py on 2 cores: below ~64k elements waking the second thread costs
# more than it saves.
PARALLEL_MIN_ELEMENTS = {
    "relu_backward": 1 << 18,
    "bias_relu": 1 << 18,
    "softmax": 1 << 16,
    "softmax_cross_entropy": 1 << 16,
}

# Output bytes from which ReLU backward writes with streaming (non-temporal) stores. Measured on
# the 2-core EPYC (32 MB L3): equal at 8 MB per array, 1.3-1.4x faster from 16 MB, 0.6x at 4 MB,
# where the three arrays still fit in the cache and a plain store's result stays there for free.
STREAM_MIN_BYTES = 16 << 20

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_loops = None  # the compiled-loops module, once imported


def _cache_dir() -> str:
    """A writable directory for numba's on-disk cache: $XDG_CACHE_HOME or ~/.cache, else tmp."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    for root in (base, tempfile.gettempdir()):
        path = os.path.join(root, "xpnet", "numba")
        try:
            os.makedirs(path, exist_ok=True)
        except OSError:
            continue
        if os.access(path, os.W_OK):
            return path
    return tempfile.mkdtemp(prefix="xpnet-numba-")


def _get_loops():
    """Import numba (pointing its cache somewhere writable first) and the compiled loops."""
    global _loops
    if _loops is None:
        if not os.environ.get("NUMBA_CACHE_DIR"):
            os.environ["NUMBA_CACHE_DIR"] = _cache_dir()
        import numba

        if not numba.config.CACHE_DIR:  # numba was imported before we could set the variable
            numba.config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]
        from . import _numba_loops

        _loops = _numba_loops
    return _loops


# --- the three questions -----------------------------------------------------------------------


_unavailable_reason: list = []  # memo: [reason or None]


def unavailable() -> str | None:
    """Why these kernels cannot run here (numba missing or broken), or ``None``."""
    if not _unavailable_reason:
        if importlib.util.find_spec("numba") is None:
            reason = "numba is not installed (pip install numba)"
        else:
            try:
                _get_loops()
                reason = None
            except Exception as error:  # a broken numba/llvmlite install: say what broke
                reason = f"numba failed to load: {type(error).__name__}: {error}"
        _unavailable_reason.append(reason)
    return _unavailable_reason[0]


def _is_numpy(a) -> bool:
    return type(a) is np.ndarray


def unsupported(op: str, *arrays) -> str | None:
    """Why the kernel for ``op`` cannot run on these arrays, or ``None`` when it can."""
    first = arrays[0]
    for a in arrays:
        if type(a) is not np.ndarray:
            return f"the numba kernels take NumPy arrays, got {type(a).__module__}.{type(a).__name__}"
    dtype = first.dtype
    if dtype not in _FLOATS:
        return f"the numba kernels take float32 or float64, got {dtype}"
    floats = arrays[:1] if op == "softmax_cross_entropy" else arrays
    for a in floats:
        if a.dtype != dtype:
            return "operands of different dtypes: " + ", ".join(str(a.dtype) for a in floats)
    for a in arrays:
        if a.size == 0:
            return "empty arrays"
    if op == "softmax_cross_entropy":
        if arrays[1].dtype.kind not in "iu":
            return f"labels must be integers, got {arrays[1].dtype}"
    elif op == "relu_backward" and first.ndim != 2:
        if not (first.flags.c_contiguous and arrays[1].flags.c_contiguous):
            return f"non-contiguous arrays of {first.ndim} dimensions (2 are supported)"
    return None


# Elements below which the xp (NumPy) reference is as fast: none. Numba's call costs ~1-3 us,
# and measured at the MLP's own sizes ((128, 10) to (128, 784)) every kernel already beats
# NumPy's several temporaries (bench/README.md), so auto always prefers the kernel.
WORTH_IT_MIN_ELEMENTS = {op: 1 for op in PARALLEL_MIN_ELEMENTS}


def worth_it(op: str, *arrays) -> bool:
    """Whether ``impl="auto"`` should run the kernel at this size (measured thresholds)."""
    return arrays[0].size >= WORTH_IT_MIN_ELEMENTS.get(op, 1)


# --- kernels -------------------------------------------------------------------------------------


def _parallel(op: str, size: int) -> bool:
    return size >= PARALLEL_MIN_ELEMENTS[op]


def _check_out(out, shape, dtype, name="out"):
    """Return ``out`` if it fits (shape, dtype, writeable), else raise naming the problem."""
    if not _is_numpy(out):
        raise TypeError(f"{name} must be a NumPy array, got {type(out).__module__}.{type(out).__name__}")
    if out.shape != shape or out.dtype != dtype:
        raise ValueError(
            f"{name} has shape {out.shape} and dtype {out.dtype}; expected {shape} and {dtype}"
        )
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    return out


def _target(out, shape, dtype, inputs, *, contiguous=False):
    """Where a kernel writes: ``out`` itself when safe, else a fresh array copied into ``out``.

    ``out`` identical to an input is fine (every kernel reads an element before writing it);
    a partial overlap, or a strided ``out`` where the kernel needs C order, goes via a scratch.
    """
    if out is None:
        return np.empty(shape, dtype)
    _check_out(out, shape, dtype)
    overlaps = False
    for a in inputs:
        overlaps = overlaps or (out is not a and np.may_share_memory(out, a))
    if overlaps or (contiguous and not out.flags.c_contiguous):
        return np.empty(shape, dtype)
    return out


def _finish(result, out):
    if out is not None and result is not out:
        out[...] = result
        return out
    return result


def relu_backward(dy, y, /, out=None):
    """``dy`` where ``y > 0``, else 0 (one pass, no mask array); see ``xpnet.functional``."""
    loops = _get_loops()
    target = _target(out, dy.shape, dy.dtype, (dy, y))
    parallel = _parallel("relu_backward", dy.size)
    if dy.flags.c_contiguous and y.flags.c_contiguous and target.flags.c_contiguous:
        kernel = loops.relu_backward_flat_parallel if parallel else loops.relu_backward_flat_serial
        if parallel and target.nbytes >= STREAM_MIN_BYTES:
            kernel = loops.relu_backward_flat_streaming
        kernel(dy.reshape(-1), y.reshape(-1), target.reshape(-1))
    else:
        kernel = loops.relu_backward_2d_parallel if parallel else loops.relu_backward_2d_serial
        kernel(dy, y, target)
    return _finish(target, out)


def bias_relu(x, b, /, out=None):
    """``relu(x + b)`` in one pass; ``out=x`` works in place. See ``xpnet.functional``."""
    loops = _get_loops()
    target = x if out is x else _target(out, x.shape, x.dtype, (x, b))
    if target is x:
        _check_out(out, x.shape, x.dtype)
    kernel = loops.bias_relu_parallel if _parallel("bias_relu", x.size) else loops.bias_relu_serial
    kernel(x, b, target)
    return _finish(target, out)


def softmax(x, /, out=None):
    """Row softmax of a 2-D array; see ``xpnet.functional.softmax``.

    Per block of rows that fits in L1: row max, ``exp(x - max)`` with a vectorized exp, row sum
    and scale, so memory sees one read of ``x`` and one write of ``out``.
    """
    loops = _get_loops()
    target = x if out is x and x.flags.c_contiguous else _target(out, x.shape, x.dtype, (x,), contiguous=True)
    if target is x:
        _check_out(out, x.shape, x.dtype)
    kernel = loops.softmax_parallel if _parallel("softmax", x.size) else loops.softmax_serial
    kernel(x, target, target.reshape(-1), loops.block_rows(x.shape[1]))
    return _finish(target, out)


def softmax_cross_entropy(logits, labels, /, grad_out=None):
    """Mean cross-entropy and its gradient ``(softmax - onehot) / N`` in one kernel.

    Returns ``(loss, grad)``: ``loss`` a 0-d array of the logits' dtype (its sum is accumulated
    in float64), ``grad`` of the logits' shape. Labels outside ``[0, classes)`` raise ValueError.
    """
    loops = _get_loops()
    n_classes = logits.shape[1]
    bad = loops.labels_out_of_range(labels, n_classes)
    if bad >= 0:
        raise ValueError(f"labels[{bad}] = {labels[bad]} is outside [0, {n_classes})")
    if grad_out is not None:
        _check_out(grad_out, logits.shape, logits.dtype, "grad_out")
    target = _target(grad_out, logits.shape, logits.dtype, (logits, labels), contiguous=True)
    parallel = _parallel("softmax_cross_entropy", logits.size)
    kernel = loops.softmax_xent_parallel if parallel else loops.softmax_xent_serial
    total = kernel(logits, labels, target, target.reshape(-1), loops.block_rows(n_classes))
    loss = np.asarray(total / logits.shape[0], dtype=logits.dtype)
    return loss, _finish(target, grad_out)


# --- eager compilation ---------------------------------------------------------------------------


def warmup(dtypes=("float32", "float64"), label_dtypes=("int64", "uint8")) -> dict[str, float]:
    """Compile (or load from numba's cache) every kernel, serial and parallel, for ``dtypes``.

    Returns seconds spent per dtype, the first-call cost a training run would otherwise pay.
    Raises RuntimeError (with the reason) when numba cannot run here.
    """
    reason = unavailable()
    if reason:
        raise RuntimeError(f"the numba kernels cannot run here: {reason}")
    loops = _get_loops()
    seconds = {}
    for name in dtypes:
        dtype = np.dtype(name)
        start = time.perf_counter()
        x = np.ones((2, 3), dtype)
        out = np.empty_like(x)
        for parallel in (False, True):
            tag = "parallel" if parallel else "serial"
            getattr(loops, f"softmax_{tag}")(x, out, out.reshape(-1), 1)
            for label_dtype in label_dtypes:
                labels = np.zeros(2, label_dtype)
                getattr(loops, f"softmax_xent_{tag}")(x, labels, out, out.reshape(-1), 1)
            getattr(loops, f"bias_relu_{tag}")(x, x[0], out)
            getattr(loops, f"relu_backward_2d_{tag}")(x, x, out)
            getattr(loops, f"relu_backward_flat_{tag}")(x.reshape(-1), x.reshape(-1), out.reshape(-1))
        loops.relu_backward_flat_streaming(x.reshape(-1), x.reshape(-1), out.reshape(-1))
        for label_dtype in label_dtypes:
            loops.labels_out_of_range(np.zeros(2, label_dtype), 3)
        # and the training step's fused pieces (cpu_step), whose labels are int64
        labels = np.zeros(2, np.int64)
        loops.loss_head(x, labels, out, out.reshape(-1), 1, out[0].copy())
        loops.bias_add_inplace(out, x[0])
        loops.relu_backward_colsum_inplace(out, x, out[0].copy())
        loops.take_batch(x, labels, labels, out, labels.copy())
        pixels = np.zeros((2, 3), np.uint8)
        loops.take_pixel_batch(pixels, labels, labels, pixels.copy(), out, labels.copy())
        s = dtype.type(0.5)
        for p in (x.copy(), x[0].copy()):  # weights (2-D) and biases (1-D)
            loops.sgd_update(p, p.copy(), s)
            loops.sgd_momentum_update(p, p.copy(), p.copy(), s, s, False)
            loops.adam_update(p, p.copy(), p.copy(), p.copy(), s, s, s, s, s, s, s)
        seconds[name] = time.perf_counter() - start
    return seconds


if __name__ == "__main__":  # python -m xpnet.kernels.numba_cpu: report compile (or cache-load) time
    print(unavailable() or f"numba kernels: warmup {warmup()} s; cache {os.environ['NUMBA_CACHE_DIR']}")
    sys.exit(0)
