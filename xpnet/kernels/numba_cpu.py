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
- a fresh result of 1 MB or more reuses the memory of an earlier result that is gone (no page
  faults in the kernel; ``RECYCLE_MIN_BYTES``, ``release_kept_buffers()``);
- ``warmup()`` compiles (or loads from the cache) every kernel for float32 and float64 up front,
  from a table of the signatures in use (``WARMUP_SIGNATURES``), so a first training epoch is
  not a compile;
- convolution and pooling (channels-last images) copy a strided input to C order first; a
  convolution is im2col + one BLAS product, or, for few channels x filters, a direct loop
  along image rows (``DIRECT_MAX_CHANNEL_FILTERS``), or, where the filters fill whole vectors,
  a direct loop over output pixels (``FILTER_VECTORS_MAX_CHANNEL_FILTERS``); pooling is bit for
  bit the reference. They run serially, except inside ``images_on_cores()`` (a training step
  or forward pass that holds BLAS on one thread), where each batch's images are split among
  the cores. A few
  work arrays are kept per thread and reused (``_scratch``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
import sys
import tempfile
import threading
import time

import numpy as np

__all__ = [
    "relu_backward",
    "bias_relu",
    "softmax",
    "softmax_cross_entropy",
    "conv2d",
    "conv2d_backward",
    "max_pool2d",
    "max_pool2d_backward",
    "avg_pool2d",
    "avg_pool2d_backward",
    "shift_images",
    "unavailable",
    "unsupported",
    "worth_it",
    "warmup",
    "release_kept_buffers",
    "images_on_cores",
]

# Elements (rows x columns) from which the parallel driver beats the serial one. Measured with
# bench/test_kernels_bench.py on 2 cores: below ~64k elements waking the second thread costs
# more than it saves. ReLU backward and bias + ReLU stay serial up to 8 MB of float32 where
# OpenBLAS's threads may be busy beside them: LeNet-5's first layer (519,168 values) trained at
# 23.9 ms a step with them against 11.3 ms without (100 steps under cProfile, 2-core EPYC).
# Convolution and pooling run serially: their matrix products run on OpenBLAS's threads,
# which numba's would compete with. Inside ``images_on_cores`` (a step or forward pass that
# holds BLAS on one thread) ``ON_CORES_PARALLEL_MIN_ELEMENTS`` applies instead.
PARALLEL_MIN_ELEMENTS = {
    "relu_backward": 1 << 21,
    "bias_relu": 1 << 21,
    "softmax": 1 << 16,
    "softmax_cross_entropy": 1 << 16,
}

# Inside ``images_on_cores`` (where convolution and pooling split any batch of two images or
# more) the elementwise kernels go parallel where that stopped losing (float32, back to back,
# 2-core Intel Xeon, serial / parallel us: ReLU backward 3.0 / 4.8 at 16k elements, 5.1 / 4.8
# at 32k, 95 / 20 at 256k; bias + ReLU 3.1 / 4.3 at 32k, 6.5 / 7.0 at 64k, 21 / 13 at 256k).
ON_CORES_PARALLEL_MIN_ELEMENTS = {
    "relu_backward": 1 << 15,
    "bias_relu": 1 << 17,
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
        _prefer_512_bit_vectors(numba)
        from . import _numba_loops

        _loops = _numba_loops
    return _loops


def _prefer_512_bit_vectors(numba) -> None:
    """Let LLVM vectorize with the full 512-bit registers of an AVX-512 CPU. Its tuning for
    Intel's (Skylake-SP, Ice Lake, Sapphire Rapids, ...) prefers 256-bit vectors, which halves
    the lanes of compute-bound loops: softmax (8192, 1024) took 2.2 ms with them against 1.75 ms
    with 512-bit ones on a 2-core Xeon (bench/README.md). For AMD's Zen 4 it already picks 512
    bits: no change. Numba's features are process-wide: this sets them only where the user has
    not (``NUMBA_CPU_NAME``, ``NUMBA_CPU_FEATURES``), and only code generated after it is affected."""
    config = numba.config
    if config.CPU_NAME is not None or config.CPU_FEATURES is not None:
        return
    from numba.core.codegen import get_host_cpu_features

    features = get_host_cpu_features()
    if "+avx512f" in features.split(","):
        config.CPU_FEATURES = features + ",-prefer-256-bit"


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


@functools.cache
def blas_in_kernels() -> bool:
    """Whether the kernels can call BLAS (numba's ``np.dot`` reaches it through scipy): the
    whole-step kernel of the training step needs it, and the step runs layer by layer without."""
    try:
        import scipy.linalg.cython_blas  # noqa: F401  (loaded now, so that threadpoolctl sees its BLAS)
    except ImportError:
        return False
    return True


_IMAGE_OPS = frozenset(
    ("conv2d", "conv2d_backward", "max_pool2d", "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward",
     "shift_images")
)


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
    # softmax_cross_entropy: (logits, labels) or (logits, labels, weights)
    floats = arrays[:1] + arrays[2:] if op == "softmax_cross_entropy" else arrays
    for a in floats:
        if a.dtype != dtype:
            return "operands of different dtypes: " + ", ".join(str(a.dtype) for a in floats)
    for a in arrays:
        if a.size == 0:
            return "empty arrays"
    if op == "softmax_cross_entropy":
        if arrays[1].dtype.kind not in "iu":
            return f"labels must be integers, got {arrays[1].dtype}"
    elif op in _IMAGE_OPS and first.ndim != 4:
        return f"{op} takes images of shape (N, H, W, C), got shape {first.shape}"
    elif op == "conv2d" and len(arrays) == 3 and arrays[2].shape != arrays[1].shape[3:]:
        return f"the bias must have shape (filters,) = {arrays[1].shape[3:]}, got {arrays[2].shape}"
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


_this_thread = threading.local()  # .parts: set by images_on_cores()


@contextlib.contextmanager
def images_on_cores(parts: int):
    """In this thread, split each batch's images into ``parts`` slices that convolution and
    pooling run at once, one per core, and let the elementwise kernels go parallel from
    ``ON_CORES_PARALLEL_MIN_ELEMENTS``: for a training step or a forward pass that owns the
    cores (``training.on_cores``). Hold BLAS on
    one thread alongside (``cores.OneBlasThread``): OpenBLAS's idle threads spin, and beside
    numba's a LeNet-5 step took 22-58 ms instead of 3.5 ms (2-core Intel Xeon)."""
    before = getattr(_this_thread, "parts", 1)
    _this_thread.parts = max(1, int(parts))
    try:
        yield
    finally:
        _this_thread.parts = before


def _parallel(op: str, size: int) -> bool:
    """Whether an elementwise or softmax op of ``size`` elements runs its parallel driver."""
    on_cores = getattr(_this_thread, "parts", 1) > 1
    limit = ON_CORES_PARALLEL_MIN_ELEMENTS.get(op) if on_cores else None
    return size >= (PARALLEL_MIN_ELEMENTS[op] if limit is None else limit)


def _image_parts(images: int) -> int:
    """The slices of a batch of ``images`` a convolution or pooling op runs at once (1:
    serially): one per core inside ``images_on_cores``, at most one per image."""
    return max(1, min(getattr(_this_thread, "parts", 1), images))


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


# --- fresh results ---------------------------------------------------------------------------
# A result of several MB comes from the operating system as untouched pages, and the kernel's
# first write to each page faults: on a 2-core KVM guest (AMD EPYC, AVX-512) a fresh 32 MB
# relu_backward result took 4-37 ms against 2 ms into a reused ``out=`` (bench/README.md).
# Results from RECYCLE_MIN_BYTES up are carved from buffers that earlier results gave back when
# their last array (views included) was freed, up to RECYCLE_KEEP_BYTES kept in all; a loop that
# calls an op and drops each result pays the faults twice, then never.
RECYCLE_MIN_BYTES = 1 << 20
RECYCLE_KEEP_BYTES = 128 << 20
_kept: dict[int, list] = {}  # bytes -> buffers (uint8 arrays) whose arrays are gone
_kept_bytes = 0
_kept_lock = threading.Lock()


class _Recycled:
    """One kept buffer presented as an array through ``__array_interface__``: NumPy makes this
    object the array's base, so it lives exactly as long as the result and its views, and then
    hands its buffer back."""

    __slots__ = ("buffer", "__array_interface__")

    def __init__(self, buffer, shape, dtype):
        self.buffer = buffer
        self.__array_interface__ = {"shape": shape, "typestr": dtype.str, "version": 3,
                                    "data": (buffer.ctypes.data, False)}

    def __del__(self):
        try:
            _keep(self.buffer)
        except Exception:  # interpreter shutdown: the module's globals may be gone
            pass


def _keep(buffer):
    global _kept_bytes
    with _kept_lock:
        if _kept_bytes + buffer.nbytes <= RECYCLE_KEEP_BYTES:
            _kept.setdefault(buffer.nbytes, []).append(buffer)
            _kept_bytes += buffer.nbytes


def _fresh(shape, dtype):
    """A new C-ordered array for a result (its contents undefined), from a kept buffer of the
    same size when there is one."""
    global _kept_bytes
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < RECYCLE_MIN_BYTES:
        return np.empty(shape, dtype)
    with _kept_lock:
        buffers = _kept.get(nbytes)
        buffer = buffers.pop() if buffers else None
        if buffer is not None:
            _kept_bytes -= nbytes
    if buffer is None:
        buffer = np.empty(nbytes, np.uint8)
    return np.asarray(_Recycled(buffer, tuple(shape), dtype))


def release_kept_buffers() -> int:
    """Give every kept result buffer back to the allocator; returns the bytes released."""
    global _kept_bytes
    with _kept_lock:
        released, _kept_bytes = _kept_bytes, 0
        _kept.clear()
    return released


def _target(out, shape, dtype, inputs, *, contiguous=False):
    """Where a kernel writes: ``out`` itself when safe, else a fresh array copied into ``out``.

    ``out`` identical to an input is fine (every kernel reads an element before writing it);
    a partial overlap, or a strided ``out`` where the kernel needs C order, goes via a scratch.
    """
    if out is None:
        return _fresh(shape, dtype)
    _check_out(out, shape, dtype)
    overlaps = False
    for a in inputs:
        overlaps = overlaps or (out is not a and np.may_share_memory(out, a))
    if overlaps or (contiguous and not out.flags.c_contiguous):
        return _fresh(shape, dtype)
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


# Rows narrower than half this are regrouped, as many as fit into one row against the bias
# repeated as often: a convolution's output seen as (pixels, filters) has rows of 6 to 48 values,
# too short for a vector loop (LeNet's first layer, 64 images, through ``F.bias_relu``: 0.16 ms
# as (43264, 6) rows, 0.06 ms as (4326, 60) rows and the 4 rows of 6 left over).
WIDE_ROW = 64


def bias_relu(x, b, /, out=None):
    """``relu(x + b)`` in one pass; ``out=x`` works in place. See ``xpnet.functional``."""
    loops = _get_loops()
    target = x if out is x else _target(out, x.shape, x.dtype, (x, b))
    if target is x:
        _check_out(out, x.shape, x.dtype)
    kernel = loops.bias_relu_parallel if _parallel("bias_relu", x.size) else loops.bias_relu_serial
    n, width = x.shape
    group = WIDE_ROW // width if width else 0
    whole = n - n % group if group > 1 and x.flags.c_contiguous and target.flags.c_contiguous else 0
    if whole:
        kernel(x[:whole].reshape(-1, group * width), np.tile(b, group), target[:whole].reshape(-1, group * width))
    if whole < n:
        kernel(x[whole:], b, target[whole:])
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


def softmax_cross_entropy(logits, labels, /, grad_out=None, weights=None):
    """Mean cross-entropy and its gradient ``(softmax - onehot) / N`` in one kernel, each row's
    times its weight where ``weights`` (shape (N,), the logits' dtype) are given.

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
    weights = np.empty(0, logits.dtype) if weights is None else np.ascontiguousarray(weights)
    target = _target(grad_out, logits.shape, logits.dtype, (logits, labels, weights), contiguous=True)
    parallel = _parallel("softmax_cross_entropy", logits.size)
    kernel = loops.softmax_xent_parallel if parallel else loops.softmax_xent_serial
    total = kernel(logits, labels, weights, target, target.reshape(-1), loops.block_rows(n_classes))
    loss = np.asarray(total / logits.shape[0], dtype=logits.dtype)
    return loss, _finish(target, grad_out)


# --- convolution and pooling (channels-last images; see ``xpnet.functional``) --------------------
# Inputs of any layout are copied to C order first (``np.ascontiguousarray``: no copy when they
# already are); geometry and its errors come from ``xpnet.functional`` itself, so both paths
# accept and refuse the same arguments.

_scratch_buffers = threading.local()

# Work arrays up to this size are kept for the next call; larger ones (a prediction chunk of
# 8192 images needs 218 MB of LeNet columns) are allocated per call and given back.
SCRATCH_KEEP_BYTES = 32 << 20


def _scratch(name, shape, dtype):
    """A work array, never returned to a caller: this thread's kept one when it fits (grown as
    needed, up to ``SCRATCH_KEEP_BYTES``), so a training step allocates no 3.5 MB matrices."""
    size = math.prod(shape)
    if size * np.dtype(dtype).itemsize > SCRATCH_KEEP_BYTES:
        return np.empty(shape, dtype)
    buffers = _scratch_buffers.__dict__
    buf = buffers.get(name)
    if buf is None or buf.dtype != dtype or buf.size < size:
        buf = buffers[name] = np.empty(size, dtype)
    return buf[:size].reshape(shape)


def _functional():
    from .. import functional

    return functional


def _columns(loops, x, kernel_shape, strides, rows, cols, bias_column, parts):
    """im2col of ``x`` into a scratch (N * OH * OW, kh * kw * C [+ 1]) matrix; with
    ``bias_column`` a last column of ones, so that one product also adds (or sums for) the bias."""
    kh, kw, c, _ = kernel_shape
    (oh, top, _), (ow, left, _) = rows, cols
    columns = _scratch("columns", (x.shape[0] * oh * ow, kh * kw * c + bias_column), x.dtype)
    args = (x, kh, kw, strides[0], strides[1], top, left, oh, ow, columns)
    loops.im2col_parallel(*args, parts) if parts > 1 else loops.im2col(*args)
    return columns


# Channels x filters up to which a convolution with column stride 1 runs the row-wise direct
# loop (``_numba_loops.conv2d_rows``) instead of im2col + BLAS. Measured on the 2-core EPYC at
# batch 128, forward / kernel gradient in ms, direct against im2col: C=1 F=6 (LeNet's first
# layer) 1.1/1.1 against 2.5/3.1; C=3 F=6 2.6/2.6 against 5.8/5.2; C=1 F=16 0.7/0.8 against
# 1.0/0.7; C=3 F=16 1.3/1.3 against 0.8/0.9; C=6 F=16 (LeNet's second) 2.4/2.8 against 1.1/1.2.
DIRECT_MAX_CHANNEL_FILTERS = 24


def _direct(kernel_shape, strides) -> bool:
    return strides[1] == 1 and kernel_shape[2] * kernel_shape[3] <= DIRECT_MAX_CHANNEL_FILTERS


# Channels x filters up to which a convolution whose filters fill whole vectors (F a multiple
# of 16 float32 or 8 float64) runs ``_numba_loops.conv2d_filter_vectors`` instead of im2col +
# BLAS (above it the product is wide enough for BLAS's blocking: at 32 x 64 the two are even).
# Measured with ``python bench/conv_paths.py``: see bench/README.md. Inside ``images_on_cores``
# (``parts`` > 1) there is no limit: the loop runs on every core and BLAS on one (128 images,
# 2-core Intel Xeon, forward / backward ms, filter vectors against im2col: 24 x 48 channels x
# filters on 13x13 1.6 / 4.7 against 7.9 / 8.9; 32 x 64 on 14x14 3.8 / 10.7 against 9.1 / 17.8;
# 64 x 64 on 7x7 2.0 / 3.0 against 2.4 / 4.6).
FILTER_VECTORS_MAX_CHANNEL_FILTERS = 1024


def _filter_vectors(x, kernel_shape, cols, parts) -> bool:
    c, f = kernel_shape[2], kernel_shape[3]
    loops = _get_loops()
    return (f % (loops.VECTOR_BYTES // x.dtype.itemsize) == 0 and cols[0] >= loops.PIXELS_IN_REGISTERS
            and (c * f <= FILTER_VECTORS_MAX_CHANNEL_FILTERS or parts > 1))


def _input_grad_vectors(x, kernel_shape, strides, parts) -> bool:
    """Whether ``conv2d_backward`` sums ``dx`` over the filters as vectors
    (``_numba_loops.conv2d_filter_vectors_input_grad``) instead of ``dy @ kernel.T`` (BLAS) and
    col2im: stride 1, F a multiple of the vector, and the filter-vector loop's width limit
    (serially, wider products are BLAS's: 64 images, 8x8 pixels, 128 x 128 channels x filters,
    backward 28.8 ms against 23.5; below it, and on the cores at any width, the vectors win:
    ``python bench/conv_paths.py``, bench/README.md)."""
    c, f = kernel_shape[2], kernel_shape[3]
    loops = _get_loops()
    return (tuple(strides) == (1, 1) and f % (loops.VECTOR_BYTES // x.dtype.itemsize) == 0
            and x.shape[2] >= loops.INPUT_GRAD_MIN_WIDTH
            and (c * f <= FILTER_VECTORS_MAX_CHANNEL_FILTERS or parts > 1))


def _padded(x, rows, cols):
    """``x`` with its zero padding (a scratch; ``x`` itself where there is none)."""
    (_, top, bottom), (_, left, right) = rows, cols
    if not (top or bottom or left or right):
        return x
    n, h, w, c = x.shape
    padded = _scratch("padded", (n, h + top + bottom, w + left + right, c), x.dtype)
    padded.fill(0)
    padded[:, top : top + h, left : left + w] = x
    return padded


def _expanded(x, kernel_shape, cols, parts):
    """Scratch for ``conv2d_rows``, one per part: each (padded) image row with every value
    repeated F times."""
    (_, left, right), f = cols, kernel_shape[3]
    return _scratch("expanded", (parts, x.shape[1], x.shape[3], (x.shape[2] + left + right) * f), x.dtype)


def conv2d(x, kernel, bias=None, /, *, strides=1, padding="valid", relu=False):
    """A direct row-wise loop for few channels and filters (see ``DIRECT_MAX_CHANNEL_FILTERS``),
    else im2col (numba) and one BLAS product, the bias riding the product as a column of ones
    in the im2col matrix and a last row of the weights (cheaper than a pass over the output
    when there are few filters). The loops apply ``relu`` to each image's output as they finish
    it; after the BLAS product it is a pass of its own. See ``xpnet.functional.conv2d``."""
    strides, rows, cols = _functional()._conv_geometry(x, kernel, strides, padding)
    loops = _get_loops()
    x, kernel = np.ascontiguousarray(x), np.ascontiguousarray(kernel)
    kh, kw, c, f = kernel.shape
    k = kh * kw * c
    n, oh, ow = x.shape[0], rows[0], cols[0]
    y = np.empty((n, oh, ow, f), x.dtype)
    parts = _image_parts(n)
    if _direct(kernel.shape, strides):
        tiled = np.ascontiguousarray(np.broadcast_to(kernel[:, :, :, None, :], (kh, kw, c, ow, f)))
        bias_row = np.zeros(ow * f, x.dtype) if bias is None else np.tile(bias, ow)
        expanded = _expanded(x, kernel.shape, cols, parts)
        args = (x, tiled.reshape(kh, kw, c, ow * f), bias_row, bool(relu), strides[0], rows[1], cols[1])
        if parts > 1:
            loops.conv2d_rows_parallel(*args, expanded, y)
        else:
            loops.conv2d_rows(*args, expanded[0], y)
        return y
    if _filter_vectors(x, kernel.shape, cols, parts):
        bias = np.zeros(f, x.dtype) if bias is None else np.ascontiguousarray(bias)
        args = (_padded(x, rows, cols), kernel, bias, bool(relu), strides[0], strides[1], y)
        loops.conv2d_filter_vectors_parallel(*args, parts) if parts > 1 else loops.conv2d_filter_vectors(*args)
        return y
    has_bias = bias is not None
    columns = _columns(loops, x, kernel.shape, strides, rows, cols, has_bias, parts)
    weights = kernel.reshape(k, f)
    if has_bias:
        weights = np.concatenate((weights, bias.reshape(1, f)))
    np.matmul(columns, weights, out=y.reshape(n * oh * ow, f))
    if relu:
        y2 = y.reshape(n * oh * ow, f)
        bias_relu(y2, np.zeros(f, x.dtype), out=y2)
    return y


def conv2d_backward(dy, x, kernel, /, *, strides=1, padding="valid", need_dx=True, relu_output=None):
    """``(dx, dkernel, dbias)``. ``dkernel`` and ``dbias`` from the direct row-wise loop for few
    channels and filters, else as ``[columns(x), 1].T @ dy`` in one BLAS product (the ones
    column gives the bias's column sums); ``dx`` = col2im (numba) of ``dy @ kernel.T`` (BLAS),
    skipped when ``need_dx`` is false. ``relu_output``: the row-wise loop without ``dx`` and the
    filter-vector loops take ``dy`` through the ReLU an image at a time; elsewhere
    ``relu_backward`` runs first. See ``xpnet.functional.conv2d_backward``."""
    strides, rows, cols = _functional()._conv_geometry(x, kernel, strides, padding)
    kh, kw, c, f = kernel.shape
    n, oh, ow = x.shape[0], rows[0], cols[0]
    if tuple(dy.shape) != (n, oh, ow, f):
        raise ValueError(f"dy has shape {tuple(dy.shape)}; conv2d's output here is {(n, oh, ow, f)}")
    loops = _get_loops()
    x, kernel, dy = np.ascontiguousarray(x), np.ascontiguousarray(kernel), np.ascontiguousarray(dy)
    k = kh * kw * c
    parts = _image_parts(n)
    direct = _direct(kernel.shape, strides)
    vectors = not direct and _filter_vectors(x, kernel.shape, cols, parts)
    dx_vectors = need_dx and _input_grad_vectors(x, kernel.shape, strides, parts)
    if relu_output is not None:
        if tuple(relu_output.shape) != tuple(dy.shape):
            raise ValueError(f"relu_output {tuple(relu_output.shape)} and dy {tuple(dy.shape)} must have the same shape")
        relu_output = np.ascontiguousarray(relu_output)
        # the loops take dy through the ReLU an image at a time; BLAS and col2im need it whole
        loops_only = (direct or vectors) and (not need_dx or vectors and dx_vectors)
        if not loops_only:
            dy, relu_output = relu_backward(dy, relu_output), None
    relu_y = np.empty((0, 1, 1, 1), x.dtype) if relu_output is None else relu_output
    dy2 = dy.reshape(n * oh * ow, f)
    if direct:  # each part's sums per output column, added up here
        dtiled = _scratch("dtiled", (parts, kh, kw, c, ow * f), x.dtype)
        dbias_row = _scratch("dbias_row", (parts, ow * f), x.dtype)
        expanded = _expanded(x, kernel.shape, cols, parts)
        args = (dy, relu_y, x, strides[0], rows[1], cols[1])
        if parts > 1:
            loops.conv2d_rows_grads_parallel(*args, expanded, dtiled, dbias_row)
        else:
            loops.conv2d_rows_grads(*args, expanded[0], dtiled[0], dbias_row[0])
        dkernel = dtiled.reshape(parts, kh, kw, c, ow, f).sum(axis=(0, 4))
        dbias = dbias_row.reshape(parts * ow, f).sum(axis=0)
    elif vectors:
        args = (_padded(x, rows, cols), dy, relu_y, strides[0], strides[1])
        if parts > 1:
            partials = _scratch("dkernel_parts", (parts, *kernel.shape), x.dtype)
            bias_partials = _scratch("dbias_parts", (parts, f), x.dtype)
            loops.conv2d_filter_vectors_grad_parallel(*args, partials, bias_partials)
            dkernel, dbias = partials.sum(axis=0), bias_partials.sum(axis=0)
        else:
            dkernel, dbias = np.empty(kernel.shape, x.dtype), np.empty(f, x.dtype)
            loops.conv2d_filter_vectors_grad(*args, dkernel, dbias)
    else:
        columns = _columns(loops, x, kernel.shape, strides, rows, cols, True, parts)
        grads = columns.T @ dy2
        dkernel, dbias = grads[:k].reshape(kernel.shape), grads[k]
    if not need_dx:
        return None, dkernel, dbias
    dx = np.empty(x.shape, dy.dtype)
    if dx_vectors:
        (_, top, _), (_, left, _) = rows, cols
        flipped = np.ascontiguousarray(kernel[::-1, ::-1].transpose(0, 2, 1, 3))
        padded = _scratch("dy_padded", (parts, oh + 2 * (kh - 1), ow + 2 * (kw - 1), f), dy.dtype)
        args = (dy, relu_y, flipped, top, left)
        if parts > 1:
            loops.conv2d_filter_vectors_input_grad_parallel(*args, padded, dx)
        else:
            loops.conv2d_filter_vectors_input_grad(*args, padded[0], dx)
        return dx, dkernel, dbias
    dcols = _scratch("dcols", (n * oh * ow, k), dy.dtype)
    np.matmul(dy2, kernel.reshape(k, f).T, out=dcols)
    args = (dcols, kh, kw, strides[0], strides[1], rows[1], cols[1], oh, ow, dx)
    loops.col2im_parallel(*args, parts) if parts > 1 else loops.col2im(*args)
    return dx, dkernel, dbias


def _run(loop, args):
    """Pooling loop ``loop`` on ``args`` (the images first): its parallel driver over the
    image slices ``_image_parts`` gives, or the serial one."""
    loops, parts = _get_loops(), _image_parts(args[0].shape[0])
    if parts > 1:
        getattr(loops, loop + "_parallel")(*args, parts)
    else:
        getattr(loops, loop)(*args)


def _pool_geometry(x, pool_size, strides):
    window, strides, out = _functional()._pool_geometry(x, pool_size, strides)
    return window, strides, (x.shape[0], out[0], out[1], x.shape[3])


def _check_pooled(name, a, shape):
    if tuple(a.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(a.shape)}; the pooled output here is {shape}")


def max_pool2d(x, /, *, pool_size=2, strides=None):
    """Window maxima in one pass (NaN propagates); see ``xpnet.functional.max_pool2d``."""
    (kh, kw), (sh, sw), shape = _pool_geometry(x, pool_size, strides)
    y = np.empty(shape, x.dtype)
    _run("max_pool", (np.ascontiguousarray(x), kh, kw, sh, sw, y))
    return y


def max_pool2d_backward(dy, x, y, /, *, pool_size=2, strides=None):
    """Each window's ``dy`` to its first pixel equal to ``y``; see
    ``xpnet.functional.max_pool2d_backward``."""
    (kh, kw), (sh, sw), shape = _pool_geometry(x, pool_size, strides)
    if tuple(dy.shape) != tuple(y.shape):
        raise ValueError(f"dy {tuple(dy.shape)} and y {tuple(y.shape)} must have the same shape")
    _check_pooled("y", y, shape)
    dx = np.empty(x.shape, x.dtype)
    c = np.ascontiguousarray
    _run("max_pool_backward", (c(dy), c(x), c(y), kh, kw, sh, sw, dx))
    return dx


def avg_pool2d(x, /, *, pool_size=2, strides=None):
    """Window means in one pass; see ``xpnet.functional.avg_pool2d``."""
    (kh, kw), (sh, sw), shape = _pool_geometry(x, pool_size, strides)
    y = np.empty(shape, x.dtype)
    _run("avg_pool", (np.ascontiguousarray(x), kh, kw, sh, sw, y))
    return y


def avg_pool2d_backward(dy, x, /, *, pool_size=2, strides=None):
    """``dy / (kh * kw)`` spread over each window; see ``xpnet.functional.avg_pool2d_backward``."""
    (kh, kw), (sh, sw), shape = _pool_geometry(x, pool_size, strides)
    _check_pooled("dy", dy, shape)
    dx = np.empty(x.shape, dy.dtype)
    _run("avg_pool_backward", (np.ascontiguousarray(dy), kh, kw, sh, sw, dx))
    return dx


def shift_images(x, down, right, /):
    """Each image moved by its own offsets, the uncovered pixels 0: a copy of a run of each
    input row (bit for bit the reference; ~0.03 ms against ~1 ms for its gather of 128 MNIST
    images); see ``xpnet.functional.shift_images``."""
    down, right = np.ascontiguousarray(down, np.int64), np.ascontiguousarray(right, np.int64)
    y = np.empty(x.shape, x.dtype)
    _run("shift_images", (np.ascontiguousarray(x), down, right, y))
    return y


# --- eager compilation ---------------------------------------------------------------------------


# Every signature that training and the kernels compile, per float dtype, written as codes for
# the arguments: x1-x5 a C-ordered float array of that many dimensions, a2 a 2-D float array of
# any strides (a view), l1 labels (once per label dtype), i1 int64 indices or labels, q1 16-bit
# column indices, u1 and u2 uint8 values and pixels, w2 a 2-D C array of the other float dtype
# (data given as float64 to a float32 model), t2-t10 a tuple of that many x1 (the parameters an
# optimizer updates in one call), p1-p3 a tuple of MAX_FUSED_LAYERS x1-x3 (one per layer), d1 and
# d2 a 1-D and 2-D float64 array, i an integer, f a float, b a bool.
WARMUP_SIGNATURES = {
    ("softmax_serial", "softmax_parallel"): ["x2 x2 x1 i"],
    ("softmax_xent_serial", "softmax_xent_parallel"): ["x2 l1 x1 x2 x1 i"],
    ("labels_out_of_range",): ["l1 i"],
    ("bias_relu_serial", "bias_relu_parallel"): ["x2 x1 x2"],
    ("relu_backward_2d_serial", "relu_backward_2d_parallel"): ["x2 x2 x2", "a2 a2 x2"],
    ("relu_backward_flat_serial", "relu_backward_flat_parallel", "relu_backward_flat_streaming"): ["x1 x1 x1"],
    # the training step's fused pieces (cpu_step)
    ("loss_head",): ["x2 i1 x1 x2 x1 i x1"],
    ("bias_add_inplace",): ["x2 x1"],
    ("relu_backward_colsum_inplace",): ["x2 x2 x1"],
    ("take_batch",): ["x2 i1 i1 x2 i1", "w2 i1 i1 x2 i1"],
    ("take_pixel_batch",): ["u2 i1 i1 u2 x2 i1"],
    ("csr_row_counts",): ["x2 i1 i", "u2 i1 i", "w2 i1 i"],
    # the sparse first layer (cpu_step.SparseRows: 16-bit columns, the data's float or byte values)
    ("csr_fill",): ["x2 i1 q1 x1 i", "u2 i1 q1 u1 i", "w2 i1 q1 x1 i"],
    ("sparse_linear_serial",): [f"i1 q1 {v} x1 i1 x2 x1 x2 b" for v in ("x1", "u1")],
    ("sparse_linear_parallel",): [f"i1 q1 {v} x1 i1 x2 x1 x2 b i" for v in ("x1", "u1")],
    ("sparse_linear_grad_serial", "sparse_linear_grad_parallel"): [f"i1 q1 {v} x1 i1 x2 x2 x3" for v in ("x1", "u1")],
    # the whole step over a sparse first layer (where the kernels can call BLAS: blas_in_kernels)
    ("sparse_mlp_step",): [f"i1 q1 {v} x1 i1 p2 p1 p2 p2 p3 p2 i1 x1 i i d2" for v in ("x1", "u1")],
    # and a whole epoch of those steps, each followed by the optimizer's update (of 1-5 layers)
    ("sparse_mlp_epoch_adam",): [f"i1 q1 {v} x1 i1 i i1 i1 x1 p2 p1 p2 p2 p3 p2 i i d2 d1 t{k} t{k} x1 x1 x3 f f f f i"
                                 for v in ("x1", "u1") for k in range(2, 11, 2)],
    ("sparse_mlp_epoch_sgd",): [f"i1 q1 {v} x1 i1 i i1 i1 x1 p2 p1 p2 p2 p3 p2 i i d2 d1 t{k} t{k} x1 x3 f b i"
                                for v in ("x1", "u1") for k in range(2, 11, 2)],
    # the optimizers' updates, for models of 1-5 layers with parameters (LeNet-5: 10 arrays)
    # (each with its parallel driver, the parameters split among the cores: the parts last)
    ("sgd_step",): [f"t{k} t{k} x1 x2 f b" for k in range(2, 11, 2)],
    ("sgd_step_parallel",): [f"t{k} t{k} x1 x2 f b i" for k in range(2, 11, 2)],
    ("adam_step",): [f"t{k} t{k} x1 x1 x2 f f f f" for k in range(2, 11, 2)],
    ("adam_step_parallel",): [f"t{k} t{k} x1 x1 x2 f f f f i" for k in range(2, 11, 2)],
    # convolution and pooling
    # (each with its parallel driver for images_on_cores: the parts last, or a scratch per part)
    ("im2col",): ["x4 i i i i i i i i x2"],
    ("im2col_parallel",): ["x4 i i i i i i i i x2 i"],
    ("col2im",): ["x2 i i i i i i i i x4"],
    ("col2im_parallel",): ["x2 i i i i i i i i x4 i"],
    ("max_pool", "avg_pool"): ["x4 i i i i x4"],
    ("max_pool_parallel", "avg_pool_parallel"): ["x4 i i i i x4 i"],
    ("max_pool_backward",): ["x4 x4 x4 i i i i x4"],
    ("max_pool_backward_parallel",): ["x4 x4 x4 i i i i x4 i"],
    ("avg_pool_backward",): ["x4 i i i i x4"],
    ("avg_pool_backward_parallel",): ["x4 i i i i x4 i"],
    ("shift_images",): ["x4 i1 i1 x4"],
    ("shift_images_parallel",): ["x4 i1 i1 x4 i"],
    ("conv2d_rows",): ["x4 x4 x1 b i i i x3 x4"],
    ("conv2d_rows_parallel",): ["x4 x4 x1 b i i i x4 x4"],
    ("conv2d_rows_grads",): ["x4 x4 x4 i i i x3 x4 x1"],
    ("conv2d_rows_grads_parallel",): ["x4 x4 x4 i i i x4 x5 x2"],
    ("conv2d_filter_vectors",): ["x4 x4 x1 b i i x4"],
    ("conv2d_filter_vectors_parallel",): ["x4 x4 x1 b i i x4 i"],
    ("conv2d_filter_vectors_grad",): ["x4 x4 x4 i i x4 x1"],
    ("conv2d_filter_vectors_grad_parallel",): ["x4 x4 x4 i i x5 x2"],
    ("conv2d_filter_vectors_input_grad",): ["x4 x4 x4 i i x3 x4"],
    ("conv2d_filter_vectors_input_grad_parallel",): ["x4 x4 x4 i i x4 x4"],
}

# the kernels that call BLAS: compiled only where they can (``blas_in_kernels``)
_BLAS_KERNELS = frozenset({"sparse_mlp_step", "sparse_mlp_epoch_adam", "sparse_mlp_epoch_sgd"})


def _argument_types(dtype, label_dtype) -> dict:
    """The numba type of each code in ``WARMUP_SIGNATURES``."""
    from numba import from_dtype, types

    f = from_dtype(dtype)
    codes = {f"x{n}": types.Array(f, n, "C") for n in (1, 2, 3, 4, 5)}
    codes.update({f"t{n}": types.UniTuple(codes["x1"], n) for n in range(2, 11, 2)})
    codes.update({f"p{n}": types.UniTuple(codes[f"x{n}"], _get_loops().MAX_FUSED_LAYERS) for n in (1, 2, 3)})
    other = np.dtype(np.float64 if dtype == np.float32 else np.float32)  # data given in the other float dtype
    codes.update(a2=types.Array(f, 2, "A"), w2=types.Array(from_dtype(other), 2, "C"),
                 l1=types.Array(from_dtype(label_dtype), 1, "C"),
                 i1=types.Array(types.int64, 1, "C"), q1=types.Array(types.uint16, 1, "C"),
                 u1=types.Array(types.uint8, 1, "C"), u2=types.Array(types.uint8, 2, "C"),
                 d1=types.Array(types.float64, 1, "C"), d2=types.Array(types.float64, 2, "C"),
                 i=types.int64, f=f, b=types.boolean)
    return codes


def warmup(dtypes=("float32", "float64"), label_dtypes=("int64", "uint8")) -> dict[str, float]:
    """Compile (or load from numba's cache) every kernel, serial and parallel, for ``dtypes``:
    each signature of ``WARMUP_SIGNATURES``, compiled without running anything.

    Returns seconds spent per dtype, the first-call cost a training run would otherwise pay.
    Raises RuntimeError (with the reason) when numba cannot run here.
    """
    reason = unavailable()
    if reason:
        raise RuntimeError(f"the numba kernels cannot run here: {reason}")
    loops = _get_loops()
    seconds = {}
    for name in dtypes:
        start = time.perf_counter()
        for label_dtype in label_dtypes:
            codes = _argument_types(np.dtype(name), np.dtype(label_dtype))
            for kernels, signatures in WARMUP_SIGNATURES.items():
                for kernel in kernels:
                    if kernel in _BLAS_KERNELS and not blas_in_kernels():
                        continue
                    for signature in signatures:
                        getattr(loops, kernel).compile(tuple(codes[code] for code in signature.split()))
        seconds[name] = time.perf_counter() - start
    return seconds


if __name__ == "__main__":  # python -m xpnet.kernels.numba_cpu: report compile (or cache-load) time
    print(unavailable() or f"numba kernels: warmup {warmup()} s; cache {os.environ['NUMBA_CACHE_DIR']}")
    sys.exit(0)
