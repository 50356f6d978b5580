"""pytest-benchmark helpers: bytes -> GB/s, machine facts, quick mode.

Run:  python -m pytest bench/ --benchmark-only --no-cov --benchmark-json=bench/results/<name>.json
CI:   XPNET_BENCH_QUICK=1 python -m pytest bench/ --benchmark-disable -q   (small shapes, < 60 s)

pyproject.toml's pytest options turn on coverage for every run; a timed run must pass ``--no-cov``
(the tracer slows the Python between kernels), and is refused without it.

Each benchmark records the bytes it must move in ``extra_info["bytes"]``; the
``pytest_benchmark_update_json`` hook below turns that into GB/s (from the fastest round and from
the median), since pytest-benchmark cannot show custom columns. ``bench/report.py`` turns the
JSON into the tables of bench/README.md.
"""

from __future__ import annotations

import os
import platform

import numpy as np
import pytest

QUICK = os.environ.get("XPNET_BENCH_QUICK", "") not in ("", "0")

#: lines benchmarks leave for the end of the run (a comparison across rows, which pytest-benchmark's
#: table cannot show); printed by ``pytest_terminal_summary``
SUMMARIES: list[str] = []


def _cpu_model() -> str:
    try:
        import cpuinfo  # py-cpuinfo

        return cpuinfo.get_cpu_info().get("brand_raw") or platform.processor()
    except Exception:  # py-cpuinfo is optional: fall back to /proc/cpuinfo
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or "unknown"


def _versions() -> dict:
    versions = {}
    for name in ("numpy", "numba", "llvmlite", "torch", "xpnet"):
        try:
            module = __import__(name)
            versions[name] = getattr(module, "__version__", "?")
        except ImportError:
            versions[name] = None
    return versions


def _isa() -> dict:
    """What the CPU offers (NumPy's SIMD levels found) and what BLAS picked for it."""
    import numpy as np

    isa = {"numpy_simd": np.__config__.CONFIG.get("SIMD Extensions", {}).get("found")}
    try:
        import threadpoolctl  # comes with scikit-learn

        isa["blas"] = [(i.get("internal_api"), i.get("architecture"), i.get("num_threads"))
                       for i in threadpoolctl.threadpool_info() if i.get("user_api") == "blas"]
    except ImportError:
        pass
    try:  # the target numba's kernels are compiled for (NUMBA_CPU_NAME overrides the host's)
        import llvmlite.binding as llvm

        features = llvm.get_host_cpu_features()
        isa["numba_target"] = os.environ.get("NUMBA_CPU_NAME") or llvm.get_host_cpu_name()
        isa["host_vector_features"] = sorted(k for k in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl")
                                             if features.get(k))
        from xpnet.kernels import numba_cpu

        if numba_cpu.unavailable() is None:  # the vector width xpnet's kernels were compiled for
            import numba

            numba_cpu._get_loops()
            isa["numba_512_bit_vectors"] = "-prefer-256-bit" in (numba.config.CPU_FEATURES or "")
    except Exception as exc:  # llvmlite missing or a platform without these queries: say so
        isa["numba_target"] = f"unknown ({exc})"
    return isa


def pytest_configure(config):
    """Refuse to time benchmarks under coverage's tracer (pyproject's addopts turn it on)."""
    timing = not config.getoption("benchmark_disable", default=False)
    traced = config.getoption("cov_source", default=None) and not config.getoption("no_cov", default=False)
    if timing and traced:
        raise pytest.UsageError("benchmarks are timed: run them with --no-cov (coverage tracing slows the timed code)")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["cpu_model"] = _cpu_model()
    machine_info["cpu_count"] = os.cpu_count()
    machine_info["versions"] = _versions()
    machine_info["loadavg_at_start"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    machine_info["quick_mode"] = QUICK
    machine_info["cpu_isa"] = _isa()
    try:
        import numba

        machine_info["numba_threads"] = numba.get_num_threads()
        machine_info["numba_threading_layer_env"] = numba.config.THREADING_LAYER
    except ImportError:
        pass
    try:
        import torch

        machine_info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Derive GB/s from ``extra_info["bytes"]``: from the fastest round and from the median."""
    for bench in output_json["benchmarks"]:
        info, stats = bench.get("extra_info", {}), bench.get("stats", {})
        if info.get("bytes") and stats.get("min"):
            info["GB/s"] = info["bytes"] / stats["min"] / 1e9
            info["GB/s median"] = info["bytes"] / stats["median"] / 1e9
    output_json["machine_info"]["loadavg_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None


def pytest_terminal_summary(terminalreporter):
    for line in SUMMARIES:
        terminalreporter.write_line(line)


@pytest.fixture
def quick():
    return QUICK


def gemm_floor_step(widths, X, batch, gather=False):
    """A function doing only the matrix products of one training step of an MLP of ``widths``
    (3 forward, 3 ``dW``, 2 ``dx`` for 4 widths) at batch ``batch``, float32, each written into a
    preallocated output as the xpnet step does (a fresh 128x256 float32 result is over glibc's
    mmap threshold: allocating it costs page faults on every call). The floor every
    implementation's step stands on: they all run these products through the same BLAS.

    ``gather=True`` adds the batch gather ``X[random rows]`` (into a buffer) to each step.
    """
    rng = np.random.default_rng(0)
    order = rng.permutation(X.shape[0])
    gathered = np.empty((batch, X.shape[1]), np.float32)
    position = [0]
    Ws = [rng.standard_normal((a, b), dtype=np.float32) * 0.05 for a, b in zip(widths[:-1], widths[1:])]
    xb = np.ascontiguousarray(X[:batch])
    acts = [xb] + [np.ones((batch, w), np.float32) for w in widths[1:]]
    grads = [np.ones((batch, w), np.float32) * 0.01 for w in widths[1:]]
    outs = [np.empty((batch, w), np.float32) for w in widths[1:]]  # forward products
    dWs = [np.empty_like(W) for W in Ws]
    dxs = [np.empty((batch, w), np.float32) for w in widths[:-1]]

    def step():
        h = xb
        if gather:
            lo = position[0]
            position[0] = (lo + batch) % (X.shape[0] - batch + 1)
            h = np.take(X, order[lo : lo + batch], axis=0, out=gathered, mode="clip")
        for W, out in zip(Ws, outs):  # forward
            h = np.matmul(h, W, out=out)
        for i in range(len(Ws) - 1, -1, -1):  # backward: dW, and dx below the first layer
            np.matmul(acts[i].T, grads[i], out=dWs[i])
            if i > 0:
                np.matmul(grads[i], Ws[i].T, out=dxs[i])

    # checked once before any timing: the products are the ones a step needs, not just fast
    step()
    h = (gathered if gather else xb).astype(np.float64)
    for W, out in zip(Ws, outs):
        h = h @ W
        np.testing.assert_allclose(out, h, rtol=1e-4, atol=1e-5 * float(np.abs(h).max()))
    np.testing.assert_allclose(dWs[0], acts[0].T.astype(np.float64) @ grads[0], rtol=1e-4, atol=1e-6)
    return step
