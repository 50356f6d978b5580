"""CUDA kernels for CuPy arrays: the hot ops of ``xpnet.functional``, by the same names.

The CUDA C lives in the top-level ``kernels/`` folder (``kernels/xpnet_kernels.cu``): inside a
wheel it travels as ``xpnet/kernels/cuda_src/``, and an editable install reads it from the
source tree. ``cupy.RawModule`` compiles it once per process, on the first call that needs it
(CuPy keeps the binary in its on-disk cache, so a later process loads it in milliseconds); CuPy
itself is imported only then, never by ``import xpnet``.

A raw kernel trusts its arguments: a float64 array passed where ``float*`` is expected, or a
strided view, gives silently wrong numbers. So every public function here checks dtypes,
contiguity, shapes and devices first and raises a ``TypeError``/``ValueError`` naming the
problem (the same text ``unsupported`` returns, which the dispatcher uses to fall back).
"""

from __future__ import annotations

import functools
import pathlib
import threading

import numpy as np

__all__ = [
    "relu_backward",
    "bias_relu",
    "softmax",
    "softmax_cross_entropy",
    "unavailable",
    "unsupported",
    "worth_it",
    "source_path",
    "warmup",
]

FLOATS = {"float32": "float", "float64": "double"}
LABELS = {"int32": "int", "int64": "long long", "uint8": "unsigned char"}
# the same, keyed by dtype object: a dtype's .name is a slow property, and checks run per call
_C_TYPE = {np.dtype(k): v for k, v in {**FLOATS, **LABELS}.items()}
THREADS = 256
NARROW_ROW = 16  # at most this many columns: rows staged through shared memory, a thread each
WIDE_ROW = 1024  # above this many columns, a block per row; in between, a group of lanes per row
GROUP_WIDTHS = (1, 2, 4, 8, 16, 32)


# The GEMM instantiations a ReLU MLP's training step needs: (A transposed, B transposed,
# epilogue, bias row); see the gemm kernel's comment.
GEMM_FORMS = {
    "forward": "false, false, 1, false",  # x @ W + b
    "forward_relu": "false, false, 2, false",  # relu(x @ W + b)
    "input_grad": "false, true, 0, false",  # dy @ W.T
    "input_grad_relu": "false, true, 3, false",  # (dy @ W.T) where h > 0
    "weight_grad": "true, false, 0, true",  # x.T @ dy, and its column sums for the bias
    "partial": "false, false, 0, false",  # x @ W over a slice of K (split K; sum_splits adds them)
}


def _vec_widths(c_type):
    return (1, 16 // (4 if c_type == "float" else 8))


def _name_expressions() -> list[str]:
    """Every kernel instantiation the Python side launches (and the nvcc test compiles)."""
    names = []
    for t in FLOATS.values():
        for v in _vec_widths(t):
            names += [f"relu_backward<{t}, {v}>", f"bias_relu<{t}, {v}>", f"softmax_block<{t}, {v}>"]
        names.append(f"softmax_narrow<{t}>")
        names += [f"softmax<{t}, {g}>" for g in GROUP_WIDTHS]
        for lab in LABELS.values():
            names.append(f"softmax_cross_entropy_narrow<{t}, {lab}>")
            names += [f"softmax_cross_entropy<{t}, {lab}, {g}>" for g in GROUP_WIDTHS]
            names += [f"softmax_cross_entropy_block<{t}, {lab}, {v}>" for v in _vec_widths(t)]
            names.append(f"gather_rows<{t}, {lab}>")
        names += [f"gemm<{t}, {form}>" for form in GEMM_FORMS.values()]
        names += [f"sum_splits<{t}, {epi}>" for epi in (1, 2)]
        names += [f"update_parameters<{t}, {adam}>" for adam in (0, 1)]
    return names


NAME_EXPRESSIONS = _name_expressions()


def source_path() -> pathlib.Path:
    """Where ``xpnet_kernels.cu`` is: inside the wheel, else in the source tree's ``kernels/``."""
    here = pathlib.Path(__file__).resolve().parent
    for folder in (here / "cuda_src", here.parents[1] / "kernels"):
        path = folder / "xpnet_kernels.cu"
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"xpnet_kernels.cu is neither in {here / 'cuda_src'} (a wheel) nor in "
        f"{here.parents[1] / 'kernels'} (a source tree): the installation is incomplete"
    )


# --- availability ----------------------------------------------------------------------------


@functools.cache
def unavailable() -> str | None:
    """Why these kernels cannot run in this process (no CuPy, no GPU), or ``None``."""
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (pip install 'xpnet[cuda12]' or 'xpnet[cuda13]')"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy found no CUDA GPU"
    except Exception as exc:  # CUDARuntimeError without a driver; its type varies by version
        return f"CuPy found no usable CUDA GPU ({exc})"
    try:
        source_path()
    except FileNotFoundError as exc:
        return str(exc)
    return None


_lock = threading.Lock()
_modules: dict[int, object] = {}
# (device, name) -> kernel: a function is loaded into one device's context, and launching it while
# another device is current fails or runs on the wrong GPU, so it is cached per device like its module
_functions: dict[tuple[int, str], object] = {}


def _module(device: int):
    """The compiled RawModule for ``device`` (compiled on first use)."""
    import cupy

    module = _modules.get(device)
    if module is None:
        with _lock:
            module = _modules.get(device)
            if module is None:
                module = cupy.RawModule(
                    code=source_path().read_text(),
                    options=("-std=c++17",),
                    name_expressions=NAME_EXPRESSIONS,
                )
                if hasattr(module, "compile"):  # compile now, so errors surface here
                    module.compile()
                _modules[device] = module
    return module


def _function(name: str):
    """The kernel ``name`` on the current device."""
    import cupy

    key = (cupy.cuda.runtime.getDevice(), name)
    function = _functions.get(key)
    if function is None:
        function = _functions[key] = _module(key[0]).get_function(name)
    return function


def kernel(name: str):
    """The compiled kernel ``name`` (one of ``NAME_EXPRESSIONS``), for xpnet's own callers."""
    if name not in NAME_EXPRESSIONS:
        raise ValueError(f"no kernel {name!r}; known: {NAME_EXPRESSIONS}")
    return _function(name)


def warmup() -> None:
    """Compile (or load from CuPy's cache) every kernel now rather than on first use."""
    for name in NAME_EXPRESSIONS:
        _function(name)


@functools.cache
def _multiprocessors(device: int) -> int:
    import cupy

    return cupy.cuda.runtime.getDeviceProperties(device)["multiProcessorCount"]


# Grid cap per multiprocessor for grid-stride loops. Measured on an H100 (bench/README.md, GPU section):
# relu_backward and bias_relu gain ~5% of copy bandwidth from 16 to 128 blocks per SM.
BLOCKS_PER_SM = 128


def blocks_for(work_items: int, threads: int = THREADS, *, per_sm: int | None = None) -> int:
    """Blocks for a grid-stride loop over ``work_items``: enough to fill the GPU, never zero.

    Any count is correct (the loops stride over the rest), so the cap only bounds the launch.
    """
    import cupy

    cap = (per_sm or BLOCKS_PER_SM) * _multiprocessors(cupy.cuda.runtime.getDevice())
    return int(max(1, min(cap, -(-work_items // threads))))


# --- checks at the Python boundary -------------------------------------------------------------


def _describe(a) -> str:
    return f"{type(a).__module__}.{type(a).__name__}"


def _problem_with_array(name, a, kinds) -> tuple[type, str] | None:
    """(exception type, message) for the first thing wrong with ``a``, or ``None``."""
    import cupy

    if not isinstance(a, cupy.ndarray):
        return TypeError, f"{name} must be a cupy.ndarray, got {_describe(a)}"
    if _C_TYPE.get(a.dtype) not in kinds.values():
        return TypeError, f"{name} has dtype {a.dtype.name}; these kernels take {' or '.join(kinds)}"
    if not a.flags.c_contiguous:
        return ValueError, (
            f"{name} of shape {a.shape} is not C-contiguous (strides {a.strides}); "
            f"pass cupy.ascontiguousarray({name})"
        )
    device = cupy.cuda.runtime.getDevice()
    if a.data.device_id != device:
        return ValueError, f"{name} is on GPU {a.data.device_id} but the current device is GPU {device}"
    return None


_ROLES = {
    "relu_backward": (("dy", FLOATS), ("y", FLOATS)),
    "bias_relu": (("x", FLOATS), ("b", FLOATS)),
    "softmax": (("x", FLOATS),),
    "softmax_cross_entropy": (("logits", FLOATS), ("labels", LABELS)),
}


def _problem(op, arrays) -> tuple[type, str] | None:
    roles = _ROLES.get(op)
    if roles is None:
        return ValueError, f"no CUDA kernel for {op!r}"
    if op == "softmax_cross_entropy" and len(arrays) == 3:
        return ValueError, "no CUDA kernel takes per-row weights (the xp reference does)"
    if len(arrays) != len(roles):
        return TypeError, f"{op} takes {len(roles)} arrays, got {len(arrays)}"
    for (name, kinds), a in zip(roles, arrays):
        problem = _problem_with_array(name, a, kinds)
        if problem:
            return problem
    floats = [a.dtype for (name, kinds), a in zip(roles, arrays) if kinds is FLOATS]
    if any(d != floats[0] for d in floats):
        return TypeError, f"{op} needs operands of one dtype, got {', '.join(d.name for d in floats)}"
    return None


def unsupported(op: str, *arrays) -> str | None:
    """Why ``op`` cannot run on ``arrays`` here (dtype, layout, device), or ``None``."""
    problem = _problem(op, arrays)
    return problem[1] if problem else None


def worth_it(op: str, *arrays) -> bool:
    """Always, for CuPy arrays: one fused launch beats the reference's several at any size."""
    return True


def _require(op, *arrays):
    problem = _problem(op, arrays)
    if problem:
        raise problem[0](problem[1])


def _output(out, like, name="out"):
    """``out`` checked to fit ``like`` (shape, dtype, contiguity), or a new empty array."""
    import cupy

    if out is None:
        return cupy.empty_like(like)
    problem = _problem_with_array(name, out, FLOATS)
    if problem:
        raise problem[0](problem[1])
    if out.shape != like.shape or out.dtype != like.dtype:
        raise ValueError(
            f"{name} has shape {out.shape} and dtype {out.dtype}; expected {like.shape} and {like.dtype}"
        )
    return out


def _vector_width(*arrays) -> int:
    """16-byte loads where every pointer is 16-byte aligned, else scalar ones."""
    width = 16 // arrays[0].dtype.itemsize
    return width if all(a.data.ptr % 16 == 0 for a in arrays) else 1


def _c_type(a) -> str:
    return _C_TYPE[a.dtype]


# --- the kernels -----------------------------------------------------------------------------


def relu_backward(dy, y, out=None):
    """``dy`` where ``y > 0`` else 0 (``y`` the ReLU output), elementwise; ``out=dy`` allowed.

    Parameters
    ----------
    dy, y : cupy.ndarray
        Same shape, same float32/float64 dtype, C-contiguous.
    out : cupy.ndarray, optional
        Written and returned; shape and dtype of ``dy``.
    """
    _require("relu_backward", dy, y)
    if dy.shape != y.shape:
        raise ValueError(f"dy {dy.shape} and y {y.shape} must have the same shape")
    out = _output(out, dy)
    n = dy.size
    if n:
        v = _vector_width(dy, y, out)
        _function(f"relu_backward<{_c_type(dy)}, {v}>")(
            (blocks_for(-(-n // v)),), (THREADS,), (dy, y, out, np.int64(n))
        )
    return out


def bias_relu(x, b, out=None):
    """``relu(x + b)`` for ``x`` (N, F) and ``b`` (F,); ``out=x`` works in place.

    Parameters
    ----------
    x : cupy.ndarray, shape (N, F), float32 or float64, C-contiguous
    b : cupy.ndarray, shape (F,), same dtype
    out : cupy.ndarray, optional, shape (N, F)
    """
    _require("bias_relu", x, b)
    if x.ndim != 2 or b.ndim != 1 or b.shape[0] != x.shape[1]:
        raise ValueError(f"bias of shape {b.shape} does not fit x of shape {x.shape}")
    out = _output(out, x)
    n, f = x.size, x.shape[1]
    if n:
        v = _vector_width(x, b, out)
        if f % v:
            v = 1
        _function(f"bias_relu<{_c_type(x)}, {v}>")(
            (blocks_for(n // v),), (THREADS,), (x, b, out, np.int64(n), np.int64(f))
        )
    return out


def group_width(cols: int) -> int:
    """Lanes per row for rows of ``cols`` values: about 8 values per lane, a warp at most."""
    lanes = 1
    while lanes < 32 and lanes * 8 < cols:
        lanes *= 2
    return lanes


def softmax(x, out=None, *, group=None):
    """Softmax of each row of a 2-D array; ``out=x`` works in place.

    ``exp(x - m) / sum(exp(x - m))`` with ``m`` the row maximum. Rows of up to ``NARROW_ROW``
    values are staged through shared memory, rows of up to ``WIDE_ROW`` go to groups of
    ``group_width(cols)`` lanes (``group`` forces a group width, for tests and benchmarks), and
    wider ones to a block per row.
    """
    _require("softmax", x)
    if x.ndim != 2:
        raise ValueError(f"softmax expects a 2-D array (rows, classes), got shape {x.shape}")
    out = _output(out, x)
    if x.size:
        name, grid, shared = _row_kernel("softmax", _c_type(x), None, x, out, group)
        _function(name)((grid,), (THREADS,), (x, out, np.int64(x.shape[0]), np.int64(x.shape[1])),
                        shared_mem=shared)
    return out


def _row_kernel(op, c_type, label_type, x, out, group):
    """(kernel name, grid, dynamic shared bytes) for a row operation on ``x`` into ``out``."""
    rows, cols = x.shape
    prefix = f"{op}<{c_type}" if label_type is None else f"{op}<{c_type}, {label_type}"
    suffix = "" if label_type is None else f", {label_type}"
    if group is None and cols <= NARROW_ROW:
        return f"{op}_narrow<{c_type}{suffix}>", blocks_for(rows), THREADS * cols * x.dtype.itemsize
    if group is None and cols > WIDE_ROW:
        v = _vector_width(x, out)
        if cols % v:
            v = 1
        return f"{op}_block<{c_type}{suffix}, {v}>", blocks_for(rows, 1), 0
    lanes = group or group_width(cols)
    if lanes not in GROUP_WIDTHS:
        raise ValueError(f"group must be one of {GROUP_WIDTHS}, got {lanes}")
    return f"{prefix}, {lanes}>", blocks_for(rows * lanes), 0


def softmax_cross_entropy(logits, labels, grad_out=None, *, group=None):
    """Mean cross-entropy and its gradient in one pass: ``(loss, grad)``.

    ``loss`` is a 0-d CuPy array of the logits' dtype (summed on the device with atomics, so
    its last bits may vary from run to run); ``grad = (softmax(z) - onehot(y)) / N``.
    A label outside ``[0, C)`` makes the loss NaN (it cannot be checked without a host sync).

    Parameters
    ----------
    logits : cupy.ndarray, shape (N, C), float32 or float64, C-contiguous
    labels : cupy.ndarray, shape (N,), int32, int64 or uint8
    grad_out : cupy.ndarray, optional, shape (N, C); may be ``logits`` itself (in place)
    """
    import cupy

    _require("softmax_cross_entropy", logits, labels)
    if logits.ndim != 2 or labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels must have shape ({logits.shape[0] if logits.ndim else '?'},) to match logits "
            f"{logits.shape}, got {labels.shape}"
        )
    grad = _output(grad_out, logits, "grad_out")
    rows, cols = logits.shape
    if rows == 0:  # the mean of nothing, as the reference computes it
        return cupy.asarray(np.nan, dtype=logits.dtype), grad
    loss = cupy.zeros((), dtype=logits.dtype)
    accumulate_cross_entropy(logits, labels, grad, loss, 1.0 / rows, 1.0 / rows, group=group)
    return loss, grad


def accumulate_cross_entropy(logits, labels, grad, loss_sum, grad_scale, loss_scale, correct=None,
                             *, group=None):
    """The launch behind ``softmax_cross_entropy``, for training loops that keep sums.

    ``grad = (softmax(z) - onehot(y)) * grad_scale``; ``loss_sum += loss_scale * sum_i loss_i``
    and, if ``correct`` (a 0-d uint64 CuPy array) is given, ``correct += #{i: argmax z_i == y_i}``.
    Arguments are trusted: callers check them (as ``softmax_cross_entropy`` does).
    """
    rows, cols = logits.shape
    f = np.float32 if logits.dtype == np.float32 else np.float64
    name, grid, shared = _row_kernel("softmax_cross_entropy", _c_type(logits), _C_TYPE[labels.dtype],
                                     logits, grad, group)
    args = (logits, labels, grad, loss_sum, np.int64(rows), np.int64(cols), f(grad_scale),
            f(loss_scale), correct if correct is not None else np.uint64(0))
    _function(name)((grid,), (THREADS,), args, shared_mem=shared)
