"""xpnet: a small, fast neural-network library on NumPy (``"cpu"``) or CuPy (``"cuda"``).

    >>> import xpnet
    >>> model = xpnet.MLP([784, 50, 25, 10], seed=0)            # doctest: +SKIP
    >>> model.fit(X, y, epochs=10, batch_size=128, lr=0.1)       # doctest: +SKIP
    >>> from xpnet.layers import Conv2D, AvgPool2D, Flatten, Dense
    >>> cnn = xpnet.Sequential([Conv2D(6, 3, activation="relu"), AvgPool2D(2), Flatten(), Dense(10)])

``import xpnet`` is light: NumPy only. Numba, CuPy, safetensors, pooch and matplotlib are
imported on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

from .backend import Backend, BackendError, current_backend, get_backend, set_backend, use_backend

# name -> module that defines it; imported on first access (PEP 562)
_LAZY = {
    "MLP": "model",
    "Sequential": "model",
    "load": "model",
    "Dense": "layers",
    "EarlyStopping": "callbacks",
    "History": "callbacks",
    "Callback": "callbacks",
}
_SUBMODULES = ("files", "functional", "kernels", "layers", "model", "optim", "callbacks", "training", "datasets",
               "baselines", "io", "plots", "runs", "draw", "cli", "sklearn", "export", "recipes")

__all__ = ["Backend", "BackendError", "current_backend", "get_backend", "set_backend", "use_backend",
           *_LAZY, *_SUBMODULES, "__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'xpnet' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
