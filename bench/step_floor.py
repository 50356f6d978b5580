"""A training step against its GEMM floor, interleaved, so both see the same machine.

pytest-benchmark times one implementation after another; on a shared machine the load moves
between them (a floor measured in a busy minute flatters the step, and the other way round).
Here blocks of one epoch's worth of steps (469) alternate: xpnet's step as ``fit`` runs it
(gather, forward, loss, backward, update), then the floor (only the step's matrix products,
``conftest.gemm_floor_step``), repeated; each block's time per step is kept and
the ratio of each xpnet block to the floor block beside it reported (median and quartiles).

    XPNET_DATA=/work/shared/data python bench/step_floor.py [--blocks 15]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import test_training_bench as tb  # noqa: E402  (the same step and floor the benchmarks time)
from conftest import gemm_floor_step  # noqa: E402


def per_step_us(step, steps):
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps * 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=15, help="interleaved blocks per implementation")
    args = parser.parse_args(argv)

    import xpnet

    xpnet.kernels.kernel_module("numba").warmup(("float32",), ("int64",))
    pixels, y, _, _ = tb.mnist_pixels()
    floats = tb.mnist()[0]
    steps = tb._steps_per_epoch(floats.shape[0])
    print(f"{steps} steps per block, {args.blocks} blocks each, interleaved; time per step in us")
    for config, widths in tb.CONFIGS.items():
        floor = gemm_floor_step(widths, floats, tb.BATCH)
        for name, data in (("xpnet (uint8 input)", pixels), ("xpnet (float32 input)", floats)):
            step = tb._xpnet_step_fn(tb._xpnet_model(widths), data, y)
            for _ in range(50):  # warm caches, buffers and BLAS threads
                step()
                floor()
            ours, theirs = [], []
            for _ in range(args.blocks):
                ours.append(per_step_us(step, steps))
                theirs.append(per_step_us(floor, steps))
            ratio = np.array(ours) / np.array(theirs)
            q1, med, q3 = np.percentile(ratio, [25, 50, 75])
            print(
                f"{config} {name}: step {np.median(ours):.1f} us, floor {np.median(theirs):.1f} us (medians); "
                f"step / floor median {med:.2f}x (quartiles {q1:.2f}-{q3:.2f}x, best {ratio.min():.2f}x)"
            )


if __name__ == "__main__":
    main()
