"""Streaming-store width, A/B: relu_backward and the streaming copy compiled with vectors of
STREAM_BYTES (32 or 64) bytes, median and min of 21 calls on three large shapes. Each width in
its own process and numba cache (the width is baked into the compiled code):

    for sb in 32 64; do NUMBA_CACHE_DIR=/tmp/xpnet-stream-$sb python bench/stream_width_ab.py $sb; done
"""

from __future__ import annotations

import sys
import time

import numpy as np

from xpnet.kernels import _numba_loops as L


def timed(fn, n=21):
    fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return np.median(times) * 1e3, min(times) * 1e3


def main(width: int) -> None:
    L.STREAM_BYTES = width  # before anything is compiled in this process
    rows = []
    for shape in [(4096, 4096), (8192, 1024), (1024, 32768)]:
        rng = np.random.default_rng(0)
        dy = rng.standard_normal(shape).astype(np.float32)
        y = np.maximum(rng.standard_normal(shape).astype(np.float32), 0)
        out = np.empty_like(dy)
        a, b, o = dy.reshape(-1), y.reshape(-1), out.reshape(-1)
        relu_med, relu_min = timed(lambda: L.relu_backward_flat_streaming(a, b, o))
        assert np.array_equal(out, np.where(y > 0, dy, 0))  # checked, not only timed
        copy_med, copy_min = timed(lambda: L.copy_streaming(a, o))
        rows.append(f"{shape}: relu {relu_med:.2f}/{relu_min:.2f} ms ({3 * dy.nbytes / relu_min / 1e6:.0f} GB/s) "
                    f"copy {copy_med:.2f}/{copy_min:.2f} ms ({2 * dy.nbytes / copy_min / 1e6:.0f} GB/s)")
    print(width, " | ".join(rows))


if __name__ == "__main__":
    main(int(sys.argv[1]))
