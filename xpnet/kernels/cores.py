"""Who runs on the CPU's cores during a training step or a forward pass: numba's parallel
kernels or OpenBLAS's threads, one at a time.

OpenBLAS's idle threads spin for a while after each product, and so do numba's (OpenMP) after
each parallel kernel: the two sets on the same cores slow each other by far more than either
gains (LeNet-5, 2-core Intel Xeon: 22-58 ms a step against 3.5 ms). A step that runs numba's
kernels on every core holds BLAS on one thread (``OneBlasThread``).
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["cores", "numba_owns_cores", "OneBlasThread"]


def cores() -> int:
    """The cores this process may run on (its CPU affinity), at most numba's thread count
    (``NUMBA_NUM_THREADS`` sets both)."""
    import numba

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        usable = os.cpu_count() or 1
    return max(1, min(usable, numba.config.NUMBA_NUM_THREADS))


def numba_owns_cores() -> bool:
    """Whether a step holds BLAS on one thread now (``OneBlasThread``): numba's threads own the
    cores, so other numba kernels may go parallel too (the optimizers' fused updates do)."""
    return OneBlasThread._taken > 0


class OneBlasThread:
    """BLAS on one thread while numba's threads use the cores. ``take()`` limits it;
    ``give_back()`` restores it, except inside ``held()``, which keeps any limit taken until it
    ends: a training loop pays for it once instead of every step (~20 us a step)."""

    _taken = 0  # limits taken in this process and not yet given back (``numba_owns_cores``)

    def __init__(self):
        self._blas = self._limit = None  # threadpoolctl's handle on the BLAS libraries, the limit
        self._held = False

    def take(self):
        if self._limit is None:
            if self._blas is None:
                from threadpoolctl import ThreadpoolController

                self._blas = ThreadpoolController().select(user_api="blas")
            self._limit = self._blas.limit(limits=1)
            OneBlasThread._taken += 1

    def give_back(self):
        if self._limit is not None and not self._held:
            self._limit.restore_original_limits()
            self._limit = None
            OneBlasThread._taken -= 1

    @contextlib.contextmanager
    def held(self):
        self._held = True
        try:
            yield
        finally:
            self._held = False
            self.give_back()
