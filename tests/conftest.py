"""Shared fixtures: a ``backend`` fixture over every namespace xpnet runs on, CUDA gating, MNIST,
the default kernels and the reference (``kernels``), two data-parallel ranks played by threads
(``thread_ranks``); and shared helpers
(``central_differences``, ``InterruptAfter``)."""

from __future__ import annotations

import copy
import os
import threading
from pathlib import Path

import numpy as np
import pytest

import xpnet
from xpnet.backend import BackendError
from xpnet.callbacks import Callback


def pytest_addoption(parser):
    parser.addoption(
        "--require-cuda",
        action="store_true",
        help="fail (instead of skip) every CUDA test when no usable GPU is found: a GPU run cannot pass by skipping",
    )


class InterruptAfter(Callback):
    """A Ctrl-C at the end of epoch ``k``: placed after a run's recorder, once that epoch is on
    disk; before it (as ``fit(run_dir=...)`` places its own, last), before the epoch is saved."""

    def __init__(self, k):
        self.k = k

    def on_epoch_end(self, epoch, logs):
        if epoch == self.k:
            raise KeyboardInterrupt


def central_differences(loss, z, h=1e-6):
    """``d loss / d z`` by central differences, one element at a time (``z`` a float64 host
    array, ``loss`` a function of such an array returning a float)."""
    numeric = np.empty_like(z)
    for i in np.ndindex(z.shape):
        plus, minus = z.copy(), z.copy()
        plus[i] += h
        minus[i] -= h
        numeric[i] = (loss(plus) - loss(minus)) / (2 * h)
    return numeric


def cuda_unavailable() -> str | None:
    """Why the CUDA backend cannot run here, or None when it can."""
    try:
        xpnet.get_backend("cuda")
    except BackendError as exc:
        return str(exc)
    return None


def skip_or_fail_without_cuda(config) -> None:
    reason = cuda_unavailable()
    if reason is None:
        return
    if config.getoption("--require-cuda"):
        pytest.fail(f"--require-cuda: {reason}")
    pytest.skip(reason)


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") is not None:
        skip_or_fail_without_cuda(item.config)


BACKENDS = ["numpy", "array_api_strict", "cuda"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each namespace the numerical core must run on: NumPy, array_api_strict, CuPy (GPU only)."""
    if request.param == "cuda":
        skip_or_fail_without_cuda(request.config)
        return xpnet.get_backend("cuda")
    if request.param == "array_api_strict":
        import array_api_strict

        return xpnet.get_backend(array_api_strict)
    return xpnet.get_backend("cpu")


@pytest.fixture(scope="session")
def numba_cpu():
    """The Numba kernel module, or a skip where numba cannot run."""
    from xpnet import kernels

    module = kernels.kernel_module("numba")
    if module.unavailable():
        pytest.skip(module.unavailable())
    return module


@pytest.fixture
def rng():
    return np.random.default_rng(20261123)


def _data_root() -> Path | None:
    root = os.environ.get("XPNET_DATA")
    if root:
        return Path(root)
    sibling = Path(__file__).resolve().parents[2] / "shared" / "data"
    return sibling if (sibling / "mnist").is_dir() else None


@pytest.fixture(scope="session")
def mnist():
    """The real MNIST: ``(X_train, y_train, X_test, y_test)`` as uint8 arrays."""
    root = _data_root()
    if root is None:
        pytest.skip("real MNIST not found: set XPNET_DATA to the folder holding mnist/")
    from xpnet.datasets import load_mnist

    X_train, y_train = load_mnist("train", root=root / "mnist")
    X_test, y_test = load_mnist("test", root=root / "mnist")
    return X_train, y_train, X_test, y_test


@pytest.fixture(scope="session")
def drawing_model(mnist):
    """The model ``xpnet draw`` trains by default, trained once per test session on the real MNIST
    (shared by the drawing server's tests and the browser tests)."""
    from xpnet.draw.server import train_quick_model

    X_train, y_train, _, _ = mnist
    return train_quick_model(X_train, y_train)


@pytest.fixture(params=["fast", "xp"])
def kernels(request, monkeypatch):
    """The default path (Numba kernels and the fused CPU step) and the reference (XPNET_KERNELS=xp)."""
    if request.param == "xp":
        monkeypatch.setenv("XPNET_KERNELS", "xp")
    else:
        monkeypatch.delenv("XPNET_KERNELS", raising=False)
    return request.param


# --- data-parallel ranks played by threads -----------------------------------------------------


class ThreadRanks:
    """``size`` ranks as threads: broadcasts and sums through shared slots and a barrier."""

    def __init__(self, size):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=10)
        self.slots = [None] * size
        self.aborted = []
        self.local = threading.local()

    def communicator(self, backend_name):
        return self.local.comm

    def run(self, train):
        """``train(rank)`` on every rank, each in its own thread; their results by rank."""
        results, errors = [None] * self.size, [None] * self.size
        self.barrier.reset()  # a job of its own, after one that failed

        def target(rank):
            self.local.comm = ThreadCommunicator(self, rank)
            try:
                results[rank] = train(rank)
            except BaseException as exc:  # noqa: BLE001 - handed back to the test
                errors[rank] = exc
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(rank,)) for rank in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        return results, errors


class ThreadCommunicator:
    def __init__(self, ranks, rank):
        self.ranks, self.rank, self.size = ranks, rank, ranks.size

    def _exchange(self, array):
        self.ranks.slots[self.rank] = np.array(array, copy=True)
        self.ranks.barrier.wait()
        slots = list(self.ranks.slots)
        self.ranks.barrier.wait()
        return slots

    def broadcast(self, array, root=0):
        array[...] = self._exchange(array)[root]

    def broadcast_object(self, obj, root=0):
        self.ranks.slots[self.rank] = obj
        self.ranks.barrier.wait()
        value = copy.deepcopy(self.ranks.slots[root])  # each rank its own, as MPI unpickles it
        self.ranks.barrier.wait()
        return value

    def sum(self, array):
        slots = self._exchange(array)
        array[...] = sum(slots[1:], slots[0])

    def abort(self, message):
        self.ranks.aborted.append((self.rank, message))
        self.ranks.barrier.abort()


@pytest.fixture
def thread_ranks(monkeypatch):
    """Two ranks played by threads, found by ``distributed=True``; the reference step (the Numba
    kernels' thread pool is not for two callers at once)."""
    from xpnet import distributed

    monkeypatch.setenv("XPNET_KERNELS", "xp")
    ranks = ThreadRanks(2)
    monkeypatch.setattr(distributed, "communicator", ranks.communicator)
    return ranks
