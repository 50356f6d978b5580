"""Backends: which array namespace ``xp`` the math runs on, and how arrays get in and out.

``"cpu"`` is NumPy, ``"cuda"`` is CuPy, ``"auto"`` is CUDA when usable and the CPU otherwise;
any array API namespace module (``array_api_strict``, say) works too. A model keeps the backend
it was built with; the process-wide default only decides what a new model gets.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import types

import numpy as np

__all__ = [
    "array_library",
    "Backend",
    "BackendError",
    "get_backend",
    "set_backend",
    "use_backend",
    "current_backend",
]


def array_library(x) -> str:
    """The library an array comes from, by its type: ``"numpy"``, ``"cupy"``,
    ``"array_api_strict"``, ... (the one place xpnet sniffs array types; CuPy arrays have no
    ``__array_namespace__`` to ask)."""
    return type(x).__module__.split(".")[0]


class BackendError(RuntimeError):
    """A backend was asked for that this machine cannot provide (package or device missing)."""


class Backend:
    """One array namespace and the few things a model needs to know about it.

    Attributes
    ----------
    name : str
        ``"cpu"``, ``"cuda"``, or the namespace module's name.
    xp : module
        The array API namespace all math runs against.
    """

    def __init__(self, name: str, xp, *, device=None):
        self.name = name
        self.xp = xp
        self.device = device

    def __repr__(self):
        return f"Backend({self.name!r})"

    def __eq__(self, other):
        return isinstance(other, Backend) and (self.name, self.xp) == (other.name, other.xp)

    def __hash__(self):
        return hash((self.name, id(self.xp)))

    def __reduce__(self):
        # a backend travels by name (its array module cannot be pickled), so a pickled or
        # deep-copied model comes back on the same backend, or fails saying which is missing
        return _backend_by_name, (self.name,)

    # -- arrays in and out --------------------------------------------------------------------

    def owns(self, x) -> bool:
        """Whether ``x`` is already an array of this backend."""
        try:
            import array_api_compat

            return array_api_compat.array_namespace(x) in (self.xp, _compat_of(self.xp))
        except TypeError:
            return False

    def asarray(self, x, dtype=None):
        """Move host data (NumPy arrays, lists, scalars) onto this backend.

        An array that already lives on another device is refused: xpnet never copies between
        devices behind your back.
        """
        foreign = _foreign_backend_name(x, self)
        if foreign is not None:
            raise TypeError(
                f"got an array of the {foreign!r} backend where the {self.name!r} backend was "
                f"expected; move it explicitly (e.g. xpnet.get_backend({foreign!r}).to_numpy(x))"
            )
        if self.name == "cpu":
            return np.asarray(x, dtype=dtype)
        return self.xp.asarray(x if self.owns(x) else np.asarray(x), dtype=dtype)

    def to_numpy(self, x) -> np.ndarray:
        """A NumPy copy (or view, on the CPU) of an array of this backend."""
        if isinstance(x, np.ndarray):
            return x
        if self.name == "cuda":
            return x.get()
        return np.asarray(x)

    def synchronize(self) -> None:
        """Wait for all queued device work (a no-op on the CPU)."""
        if self.name == "cuda":
            import cupy

            cupy.cuda.get_current_stream().synchronize()

    def rng(self, seed=None) -> np.random.Generator:
        """A host-side generator: weights drawn on the host make CPU and GPU start identical."""
        return np.random.default_rng(seed)


def _compat_of(xp):
    if getattr(xp, "__name__", "") == "cupy":
        import array_api_compat.cupy

        return array_api_compat.cupy
    return xp


def _foreign_backend_name(x, backend: Backend) -> str | None:
    """The name of the backend ``x`` belongs to if it is a device array not of ``backend``."""
    module = array_library(x)
    if isinstance(x, (np.ndarray, np.generic, list, tuple, int, float)):
        return None
    if module == "cupy":
        return None if backend.name == "cuda" else "cuda"
    if backend.owns(x):
        return None
    if hasattr(x, "__array_namespace__"):
        return module
    return None


def _cuda_backend() -> Backend:
    try:
        import cupy
    except ImportError as exc:
        raise BackendError(
            "backend 'cuda' needs CuPy, which is not installed: "
            "pip install 'xpnet[cuda12]' (or 'xpnet[cuda13]')"
        ) from exc
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CuPy raises its own CUDARuntimeError when no driver is loaded
        raise BackendError(f"backend 'cuda': CuPy is installed but found no usable GPU ({exc})") from exc
    if count < 1:
        raise BackendError("backend 'cuda': CuPy is installed but this machine has no GPU")
    import array_api_compat.cupy

    return Backend("cuda", array_api_compat.cupy, device=cupy.cuda.Device())


def _backend_by_name(name: str) -> Backend:
    """The backend a pickled ``Backend`` named: ``"cpu"``, ``"cuda"`` or a namespace module's name."""
    try:
        return get_backend(name if name in ("cpu", "cuda") else importlib.import_module(name))
    except (BackendError, ImportError) as exc:
        raise BackendError(f"cannot unpickle an object of the {name!r} backend: {exc}") from exc


_cache: dict[object, Backend] = {}


def get_backend(name="auto") -> Backend:
    """Resolve a backend from ``"cpu"``, ``"cuda"``, ``"auto"``, a Backend, or a namespace module.

    Raises
    ------
    BackendError
        ``"cuda"`` without CuPy, or without a GPU (never a silent fall-back to the CPU).
    ValueError
        An unknown name.
    """
    if isinstance(name, Backend):
        return name
    if name is None:
        return current_backend()
    if isinstance(name, types.ModuleType):
        if not hasattr(name, "asarray") or not hasattr(name, "float32"):
            raise TypeError(f"{name.__name__!r} is not an array API namespace")
        key = ("module", name.__name__)
        if key not in _cache:
            _cache[key] = Backend(name.__name__, name)
        return _cache[key]
    if not isinstance(name, str):
        raise TypeError(f"backend must be 'cpu', 'cuda', 'auto' or a namespace module, got {name!r}")
    if name == "auto":
        try:
            return get_backend("cuda")
        except BackendError:
            return get_backend("cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown backend {name!r}: expected 'cpu', 'cuda', 'auto' or a namespace module")
    if name not in _cache:
        _cache[name] = Backend("cpu", np) if name == "cpu" else _cuda_backend()
    return _cache[name]


_process_default: Backend | None = None
_scoped: contextvars.ContextVar[Backend | None] = contextvars.ContextVar("xpnet_backend", default=None)


def current_backend() -> Backend:
    """The backend new models get: a ``use_backend`` block's, else ``set_backend``'s, else
    ``$XPNET_BACKEND``, else ``"cpu"``."""
    scoped = _scoped.get()
    if scoped is not None:
        return scoped
    if _process_default is not None:
        return _process_default
    return get_backend(os.environ.get("XPNET_BACKEND", "cpu"))


def set_backend(name) -> Backend:
    """Set the process-wide default backend for models built without ``backend=``."""
    global _process_default
    _process_default = get_backend(name)
    return _process_default


@contextlib.contextmanager
def use_backend(name):
    """``with xpnet.use_backend("cuda"): ...`` sets the default inside the block only."""
    backend = get_backend(name)
    token = _scoped.set(backend)
    try:
        yield backend
    finally:
        _scoped.reset(token)
