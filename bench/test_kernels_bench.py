"""Kernel benchmarks: each hot op x implementation x shape, beside a memory copy of the same size.

Groups are ``"<op> <rows>x<cols>"``; implementations:

- ``xp``: the reference in ``xpnet.functional`` on NumPy (``impl="xp"``);
- ``numba``: the kernel as ``impl="auto"`` runs it (serial or parallel by its threshold);
- ``numba-serial`` / ``numba-parallel``: the same kernel with its threshold forced one way,
  the measurements behind ``numba_cpu.PARALLEL_MIN_ELEMENTS``;
- ``torch``: PyTorch CPU eager on the same memory (``torch.from_numpy``), skipped without torch.

Each row is one of two calls: ``out`` writes into a preallocated output where the
implementation allows one (torch's cross-entropy gradient cannot take one: it is autograd's),
``fresh`` returns a new result, the call users make (``F.softmax(x)``, ``torch.softmax(x, 1)``);
the forced serial and parallel drivers are measured with ``out`` only.
Before timing, every benchmark runs its call once and checks the result against the ``xp``
reference (in float64); a numba benchmark whose kernel cannot run, or that ``impl="auto"``
would not send to the kernel, fails rather than skips. ``extra_info["bytes"]`` is what the
op must read and write at least; conftest.py turns it into GB/s. The ``copy`` group is the
machine's limit measured in the same run: one NumPy thread, all numba threads, and all numba
threads with streaming (non-temporal) stores.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import xpnet.functional as F
from xpnet import kernels

from conftest import QUICK

if QUICK:
    SHAPES = [(128, 10), (1000, 10), (64, 2048)]
    COPY_SHAPES = [(64, 2048)]
    IMPLS = ["xp", "numba", "torch"]
else:
    SHAPES = [(128, 10), (128, 50), (60000, 10), (8192, 1024), (1024, 32768), (4096, 4096)]
    COPY_SHAPES = [(8192, 1024), (1024, 32768), (4096, 4096)]
    IMPLS = ["xp", "numba", "numba-serial", "numba-parallel", "torch"]
OPS = ["softmax", "softmax_xent", "relu_backward", "bias_relu"]
DTYPE = np.float32  # the MLP's dtype


@functools.lru_cache(maxsize=4)
def _arrays(shape):
    """Logits-like data, labels and a bias for ``shape`` (drawn once per shape)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32) * 4
    dy = rng.standard_normal(shape, dtype=np.float32)
    labels = rng.integers(0, shape[1], shape[0])
    b = rng.standard_normal(shape[1], dtype=np.float32)
    return x, dy, labels, b


def _bytes(op, shape):
    n = shape[0] * shape[1] * np.dtype(DTYPE).itemsize
    return {
        "softmax": 2 * n,
        "softmax_xent": 2 * n + shape[0] * 8,
        "relu_backward": 3 * n,
        "bias_relu": 2 * n + shape[1] * 4,
    }[op]


def _numba_kernels_or_fail():
    """The numba kernel module; a benchmark of a kernel that cannot run fails, never skips."""
    module = kernels.kernel_module("numba")
    if module.unavailable():
        pytest.fail(f"the numba kernels cannot run: {module.unavailable()}")
    return module


def _as_numpy(result):
    """A call's result as a tuple of float64 NumPy arrays (loss and gradient for softmax_xent)."""
    parts = result if isinstance(result, tuple) else (result,)
    return tuple(np.asarray(p.detach().numpy() if hasattr(p, "detach") else p, dtype=np.float64) for p in parts)


def _check_against_reference(op, call, shape):
    """Run ``call`` once and compare it with the xp reference (float64 on the same float32
    inputs): exact for the elementwise ops, float32 rounding for the exponentials."""
    x, dy, labels, b = _arrays(shape)
    x64, b64 = x.astype(np.float64), b.astype(np.float64)
    want = {
        "softmax": lambda: (F.softmax(x64, impl="xp"),),
        "softmax_xent": lambda: F.softmax_cross_entropy(x64, labels, impl="xp"),
        "relu_backward": lambda: (F.relu_backward(dy, np.maximum(x, 0), impl="xp"),),
        "bias_relu": lambda: (F.bias_relu(x, b, impl="xp"),),
    }[op]()
    got = _as_numpy(call())
    assert len(got) == len(want), (op, len(got), len(want))
    for g, w in zip(got, want):
        w = np.asarray(w, dtype=np.float64)
        assert g.shape == w.shape, (op, g.shape, w.shape)
        if op in ("relu_backward", "bias_relu"):
            np.testing.assert_array_equal(g, w)
        else:  # float32 results against float64 math: a few float32 ulps
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(w).max())))


def _xpnet_call(op, impl, shape, fresh=False):
    x, dy, labels, b = _arrays(shape)
    out = None if fresh else np.empty_like(x)
    y = np.maximum(x, 0)
    return {
        "softmax": lambda: F.softmax(x, out=out, impl=impl),
        "softmax_xent": lambda: F.softmax_cross_entropy(x, labels, grad_out=out, impl=impl),
        "relu_backward": lambda: F.relu_backward(dy, y, out=out, impl=impl),
        "bias_relu": lambda: F.bias_relu(x, b, out=out, impl=impl),
    }[op]


def _torch_call(op, shape, fresh=False):
    torch = pytest.importorskip("torch")
    x, dy, labels, b = (torch.from_numpy(a) for a in _arrays(shape))
    out = torch.empty_like(x)
    y = torch.clamp_min(x, 0)
    if fresh:
        return {
            "softmax": lambda: torch.softmax(x, 1),
            "softmax_xent": lambda: _torch_call(op, shape)(),  # autograd's gradient is always fresh
            "relu_backward": lambda: torch.ops.aten.threshold_backward(dy, y, 0),
            "bias_relu": lambda: torch.relu(x + b),
        }[op]

    def xent():
        logits = x.detach().requires_grad_()
        loss = torch.nn.functional.cross_entropy(logits, labels)
        (grad,) = torch.autograd.grad(loss, logits)
        return loss, grad

    def bias_relu():
        return torch.add(x, b, out=out).relu_()

    return {
        "softmax": lambda: torch.ops.aten._softmax.out(x, 1, False, out=out),
        "softmax_xent": xent,
        "relu_backward": lambda: torch.ops.aten.threshold_backward.grad_input(dy, y, 0, grad_input=out),
        "bias_relu": bias_relu,
    }[op]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("result", ["out", "fresh"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", OPS)
def test_kernel(benchmark, op, impl, result, shape, monkeypatch):
    if result == "fresh" and impl in ("numba-serial", "numba-parallel"):
        pytest.skip("the forced drivers are measured into out= only")
    fresh = result == "fresh"
    benchmark.group = f"{op} {shape[0]}x{shape[1]}"
    benchmark.extra_info.update(op=op, impl=impl if not fresh else f"{impl} fresh", result=result,
                                shape=list(shape), dtype="float32", bytes=_bytes(op, shape))
    if impl == "torch":
        call = _torch_call(op, shape, fresh)
    elif impl == "xp":
        call = _xpnet_call(op, "xp", shape, fresh)
    else:
        module = _numba_kernels_or_fail()
        kernel_op = "softmax_cross_entropy" if op == "softmax_xent" else op
        if impl != "numba":  # force the serial or the parallel driver
            forced = 0 if impl == "numba-parallel" else 1 << 62
            monkeypatch.setitem(module.PARALLEL_MIN_ELEMENTS, kernel_op, forced)
        monkeypatch.delenv("XPNET_KERNELS", raising=False)
        # "auto" must pick the kernel here, not fall back to the reference quietly
        x, dy, labels, b = _arrays(shape)
        operands = {"softmax": (x,), "softmax_cross_entropy": (x, labels), "relu_backward": (dy, x), "bias_relu": (x, b)}
        chosen = kernels.select(kernel_op, "auto", *operands[kernel_op])
        assert chosen is getattr(module, kernel_op), f"impl='auto' would not run the numba {kernel_op} here"
        call = _xpnet_call(op, "auto" if impl == "numba" else "numba", shape, fresh)
    _check_against_reference(op, call, shape)  # also compiles / warms caches outside the timing
    benchmark(call)


def _copy_numpy(src, dst):
    np.copyto(dst, src)


@pytest.mark.parametrize("shape", COPY_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", ["numpy-1-thread", "numba-all-threads", "numba-streaming"])
def test_memory_copy(benchmark, impl, shape):
    """The physical limit: read ``src`` and write ``dst`` once (bytes = 2 x size). A plain store
    also reads each destination line first; ``numba-streaming`` writes with non-temporal stores,
    as ReLU backward does past ``numba_cpu.STREAM_MIN_BYTES``, and moves only the bytes it counts."""
    src = _arrays(shape)[0]
    dst = np.empty_like(src)
    benchmark.group = f"copy {shape[0]}x{shape[1]}"
    benchmark.extra_info.update(op="copy", impl=impl, shape=list(shape), dtype="float32", bytes=2 * src.nbytes)
    if impl == "numpy-1-thread":
        call = functools.partial(_copy_numpy, src, dst)
    else:
        _numba_kernels_or_fail()
        from xpnet.kernels import _numba_loops

        copy = _numba_loops.copy_streaming if impl == "numba-streaming" else _numba_loops.copy_parallel
        call = functools.partial(copy, src.reshape(-1), dst.reshape(-1))
    dst.fill(np.nan)
    call()
    np.testing.assert_array_equal(dst, src)  # checked before timing
    benchmark(call)
    np.testing.assert_array_equal(dst, src)
