"""The backend switch: names, defaults, scoping, clear errors, and a light import."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import xpnet
from xpnet.backend import BackendError


def test_cpu_backend_is_numpy():
    backend = xpnet.get_backend("cpu")
    assert backend.xp is np and backend.name == "cpu"
    a = backend.asarray([1.0, 2.0])
    assert isinstance(a, np.ndarray) and backend.to_numpy(a) is a
    backend.synchronize()
    assert backend.rng(3).integers(0, 10**9) == np.random.default_rng(3).integers(0, 10**9)


def test_namespace_modules_are_backends():
    import array_api_strict

    backend = xpnet.get_backend(array_api_strict)
    assert backend.xp is array_api_strict and backend.name == "array_api_strict"
    x = backend.asarray(np.arange(3.0))
    assert backend.owns(x)
    np.testing.assert_array_equal(backend.to_numpy(x), [0.0, 1.0, 2.0])
    with pytest.raises(TypeError, match="not an array API namespace"):
        xpnet.get_backend(pytest)


def gpu_state() -> str:
    """"no cupy", "no gpu" or "gpu", found without xpnet (CuPy's own device count)."""
    try:
        import cupy
    except ImportError:
        return "no cupy"
    try:
        return "gpu" if cupy.cuda.runtime.getDeviceCount() > 0 else "no gpu"
    except Exception:  # no driver: CuPy's CUDARuntimeError
        return "no gpu"


def test_cuda_without_cupy_or_gpu_is_a_clear_error_never_a_fallback():
    state = gpu_state()
    if state == "gpu":
        backend = xpnet.get_backend("cuda")
        assert backend.name == "cuda" and type(backend.asarray([1.0])).__module__.startswith("cupy")
        return
    with pytest.raises(BackendError) as info:
        xpnet.get_backend("cuda")
    if state == "no cupy":
        assert "needs CuPy" in str(info.value) and "pip install" in str(info.value)
    else:
        assert "no usable GPU" in str(info.value) or "no GPU" in str(info.value)


def test_auto_picks_cuda_when_usable_else_cpu():
    expected = "cuda" if gpu_state() == "gpu" else "cpu"
    assert xpnet.get_backend("auto").name == expected


def test_default_backend_set_and_scoped(monkeypatch):
    import array_api_strict

    import xpnet.backend as B

    monkeypatch.setattr(B, "_process_default", None)
    monkeypatch.delenv("XPNET_BACKEND", raising=False)
    assert xpnet.current_backend().name == "cpu"
    with xpnet.use_backend(array_api_strict) as inner:
        assert xpnet.current_backend() is inner
        assert xpnet.MLP([3, 2]).backend is inner
    assert xpnet.current_backend().name == "cpu"
    xpnet.set_backend(array_api_strict)
    assert xpnet.MLP([3, 2]).backend.name == "array_api_strict"
    monkeypatch.setattr(B, "_process_default", None)
    monkeypatch.setenv("XPNET_BACKEND", "array_api_strict_is_not_a_name")
    with pytest.raises(ValueError, match="unknown backend"):
        xpnet.current_backend()


def test_import_is_light():
    code = (
        "import sys, xpnet; heavy = [m for m in ('numba', 'cupy', 'matplotlib', 'torch', 'safetensors', 'pooch', "
        "'tqdm', 'array_api_compat', 'requests', 'sklearn', 'scipy', 'joblib') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
