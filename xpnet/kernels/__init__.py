"""Which implementation runs a hot op: the ``xp`` reference or a hand-written kernel.

``xpnet.functional`` holds the math; this module only decides. A kernel module
(``numba_cpu`` for NumPy arrays, ``cuda`` for CuPy arrays) offers functions with the same names
and arguments as their twins in ``xpnet.functional`` (plus ``out=``), and three questions:

- ``unavailable() -> str | None``: why the module cannot run at all (package or device missing);
- ``unsupported(op, *arrays) -> str | None``: why it cannot run *these* arrays (dtype, layout);
- ``worth_it(op, *arrays) -> bool``: whether ``impl="auto"`` should prefer it at this size.

Kernel modules are imported lazily, on the first call that could use them, so ``import xpnet``
never imports numba or cupy. ``XPNET_KERNELS=xp`` in the environment turns ``"auto"`` into
``"xp"`` (the reference everywhere); an explicit ``impl=`` still wins.
"""

from __future__ import annotations

import importlib
import os

from ..backend import array_library

IMPLS = ("auto", "xp", "numba", "cuda")
#: The ops each kernel family implements. Not every family has every op: one its family lacks
#: runs the reference under ``"auto"`` and is an error when forced.
OPS_OF_IMPL = {
    "numba": (
        "relu_backward", "bias_relu", "softmax", "softmax_cross_entropy",
        "conv2d", "conv2d_backward", "max_pool2d", "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward",
        "shift_images",
    ),
    "cuda": ("relu_backward", "bias_relu", "softmax", "softmax_cross_entropy"),
}
#: The ops every kernel family implements (the signature-parity tests walk each family's list).
OPS = tuple(op for op in OPS_OF_IMPL["numba"] if all(op in ops for ops in OPS_OF_IMPL.values()))

_MODULE_OF_IMPL = {"numba": "numba_cpu", "cuda": "cuda"}
_modules: dict[str, object] = {}


def namespace_of(x):
    """The array API namespace of ``x`` (NumPy itself for ndarrays: NumPy >= 2.1 is compliant)."""
    library = array_library(x)
    if library == "numpy":
        import numpy

        return numpy
    if library == "cupy":
        import array_api_compat.cupy

        return array_api_compat.cupy
    import array_api_compat

    return array_api_compat.array_namespace(x)


def _native_impl(x) -> str | None:
    """The kernel family that can run on ``x``'s kind of array, if any."""
    return {"numpy": "numba", "cupy": "cuda"}.get(array_library(x))


def kernel_module(impl: str):
    """The kernel module behind ``impl`` ("numba" or "cuda"), imported on first use."""
    if impl not in _modules:
        _modules[impl] = importlib.import_module(f"{__name__}.{_MODULE_OF_IMPL[impl]}")
    return _modules[impl]


def default_impl() -> str:
    """What ``impl="auto"`` means here: ``$XPNET_KERNELS`` (``"auto"`` when unset), validated."""
    forced = os.environ.get("XPNET_KERNELS", "auto")
    if forced not in IMPLS:
        raise ValueError(f"XPNET_KERNELS must be one of {IMPLS}, got {forced!r}")
    return forced


def select(op: str | None, impl: str, *arrays):
    """The kernel for ``op`` on ``arrays``, or ``None`` where the ``xp`` reference should run.

    ``op=None`` means no kernel exists for this call (an unsupported axis, say): fine for
    ``"auto"`` and ``"xp"``, an error for a forced kernel. A forced ``impl`` that cannot run
    raises, naming why; ``"auto"`` quietly falls back to the reference.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = default_impl()
        if op is None:  # XPNET_KERNELS names a default, not a demand on ops without kernels
            return None
    if impl == "xp":
        return None
    if impl == "auto":
        native = _native_impl(arrays[0])
        if native is None or op is None or op not in OPS_OF_IMPL[native]:
            return None
        module = kernel_module(native)
        if module.unavailable() or module.unsupported(op, *arrays):
            return None
        return getattr(module, op) if module.worth_it(op, *arrays) else None

    module = kernel_module(impl)
    reason = module.unavailable()
    if reason:
        raise RuntimeError(f"impl={impl!r} is not available: {reason}")
    if op is None or op not in OPS_OF_IMPL[impl]:
        what = "this call" if op is None else op
        raise ValueError(f"impl={impl!r} has no kernel for {what}; use impl='auto' or 'xp'")
    reason = module.unsupported(op, *arrays)
    if reason:
        raise ValueError(f"impl={impl!r} cannot run {op}: {reason}")
    return getattr(module, op)


def available() -> dict[str, str | None]:
    """For each kernel family, ``None`` if it can run here, else the reason it cannot."""
    return {impl: kernel_module(impl).unavailable() for impl in _MODULE_OF_IMPL}
