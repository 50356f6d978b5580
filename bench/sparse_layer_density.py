"""The sparse first layer against the dense one, by the share of nonzero inputs.

A 784-50-25-10 training step (batch 200, the NumPy fast step, Adam) on MNIST-shaped rows whose
nonzeros are a chosen share of the inputs (MNIST's own images first), timed with the first layer
sparse and dense, each in a process of its own (the sparse kernels' threads spin a while after
each loop, and would slow a dense step run beside them), the two alternating three times;
prints the median time per step and the ratio, where ``cpu_step.SPARSE_MAX_DENSITY`` comes from.

    XPNET_DATA=/work/shared/data python bench/sparse_layer_density.py
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


SETS = ("MNIST", 0.3, 0.45)


def measure(name, mode, batch=200, steps=800):
    """Microseconds per step (gather, step, Adam update), after 50 steps of warm-up."""
    import xpnet
    from xpnet.kernels import cpu_step
    from xpnet.optim import make_optimizer
    from xpnet.training import training_step_for

    import test_training_bench as tb

    xpnet.kernels.kernel_module("numba").warmup(("float32",), ("int64",))
    X, y, _, _ = tb.mnist()
    rng = np.random.default_rng(0)
    if name != "MNIST":
        values = rng.uniform(0.05, 1.0, X.shape).astype(np.float32)
        X = np.where(rng.random(X.shape, dtype=np.float32) < float(name), values, np.float32(0))
    cpu_step.SPARSE_MAX_DENSITY = 1.0 if mode == "sparse" else 0.0
    model = xpnet.MLP([784, 50, 25, 10], seed=0)
    step = training_step_for(model.layers, batch)
    opt, params = make_optimizer("adam", lr=1e-3), model.parameters()
    opt.start_epoch(0, 1)
    order = rng.permutation(X.shape[0])
    assert (type(step.take_batch(X, y, order[:batch])[0]) is np.ndarray) == (mode == "dense")
    for k in range(steps + 50):
        if k == 50:
            start = time.perf_counter()
        lo = (k * batch) % (X.shape[0] - batch)
        xb, yb = step.take_batch(X, y, order[lo:lo + batch])
        step(xb, yb)
        opt.step(params, step.gradients())
    return (time.perf_counter() - start) / steps * 1e6, np.count_nonzero(X) / X.size


def main():
    import subprocess

    if len(sys.argv) == 3:  # one measurement, in this process
        print(*measure(sys.argv[1], sys.argv[2]))
        return
    for name in SETS:
        times = {"sparse": [], "dense": []}
        for _ in range(3):
            for mode in times:
                out = subprocess.run([sys.executable, __file__, str(name), mode], capture_output=True, text=True,
                                     check=True).stdout.split()
                times[mode].append(float(out[0]))
                share = float(out[1])
        sparse, dense = np.median(times["sparse"]), np.median(times["dense"])
        label = "MNIST" if name == "MNIST" else "random"
        print(f"{label} ({share:.1%} nonzero): step {sparse:.0f} us sparse, {dense:.0f} us dense "
              f"(medians of 3 processes each): {sparse / dense:.2f}x", flush=True)


if __name__ == "__main__":
    main()
