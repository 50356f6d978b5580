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
