"""The convolution kernels' algorithms side by side: filter vectors against im2col + BLAS.

    python bench/conv_paths.py [--repeat 30]

For LeNet-5's second convolution and wider ones (64 images, float32, OpenBLAS on one thread),
prints the median ms of ``numba_cpu.conv2d`` and ``conv2d_backward`` with the filter-vector
loops (forward, kernel gradient and, at stride 1, input gradient) allowed for any width, and
with im2col + BLAS only. The row-wise direct loop is off in
both (it takes few channels x filters only). Timings, not a benchmark: run it on a quiet
machine, and compare numbers from one run only.
"""

from __future__ import annotations

import argparse

import numpy as np
from cnn_step_profile import median_ms  # (bench/ is on the path of a script run from it)
from threadpoolctl import threadpool_limits

from xpnet.kernels import numba_cpu

#: (images, kernel, padding): LeNet-5's second convolution, its first layer with 16 filters,
#: and wider layers of the kind small CNNs stack
SHAPES = [
    ((64, 13, 13, 6), (3, 3, 6, 16), "valid"),
    ((64, 28, 28, 1), (3, 3, 1, 16), "same"),
    ((64, 14, 14, 16), (3, 3, 16, 32), "same"),
    ((64, 14, 14, 32), (3, 3, 32, 32), "same"),
    ((64, 7, 7, 32), (3, 3, 32, 64), "same"),
    ((64, 14, 14, 64), (3, 3, 64, 64), "same"),
    ((64, 8, 8, 128), (3, 3, 128, 128), "same"),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    numba_cpu.DIRECT_MAX_CHANNEL_FILTERS = 0
    print("images, kernel, padding: forward / backward ms, filter vectors | im2col + BLAS")
    with threadpool_limits(1, "blas"):
        for x_shape, k_shape, padding in SHAPES:
            x = rng.standard_normal(x_shape).astype(np.float32)
            kernel = rng.standard_normal(k_shape).astype(np.float32)
            bias = rng.standard_normal(k_shape[3]).astype(np.float32)
            dy = rng.standard_normal(numba_cpu.conv2d(x, kernel, bias, padding=padding).shape).astype(np.float32)
            times = []
            for limit in (10**9, 0):
                numba_cpu.FILTER_VECTORS_MAX_CHANNEL_FILTERS = limit
                times += [median_ms(lambda: numba_cpu.conv2d(x, kernel, bias, padding=padding), args.repeat),
                          median_ms(lambda: numba_cpu.conv2d_backward(dy, x, kernel, padding=padding), args.repeat)]
            print(f"  {x_shape} * {k_shape} {padding:5s}  {times[0]:7.3f} / {times[1]:7.3f} | "
                  f"{times[2]:7.3f} / {times[3]:7.3f}")


if __name__ == "__main__":
    main()
