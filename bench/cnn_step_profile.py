"""Where a LeNet-5 training step's time goes on the CPU, and what splitting the batch gives.

    python bench/cnn_step_profile.py [--batch 128] [--repeat 30]

Prints, on random data (median of ``--repeat`` calls each, ms):

- one reference step (forward, loss, backward; no update) on the whole batch with OpenBLAS on
  its default threads, on one thread, and as the split step runs it: one row slice per core at
  once (``xpnet.kernels.split_step``), and one slice alone;
- per layer, forward and backward on one slice (the batch / cores rows), OpenBLAS on one thread.

Timings, not a benchmark: run it on a quiet machine, and compare numbers from one run only.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

from xpnet import functional as F
from xpnet.kernels import split_step
from xpnet.recipes import lenet5
from xpnet.training import ReferenceStep


def median_ms(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    X = rng.random((args.batch, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, args.batch)
    model = lenet5(seed=0)
    parts = split_step.cores()
    split = split_step.SplitStep(model, ReferenceStep, parts)
    whole = ReferenceStep(model)
    rows = args.batch // parts
    print(f"LeNet-5, batch {args.batch}, {parts} cores; ms per step (median of {args.repeat})")
    rows_line = lambda label, ms: print(f"  {label:40s} {ms:6.2f}")  # noqa: E731
    rows_line("whole batch, OpenBLAS default threads", median_ms(lambda: whole(X, y), args.repeat))
    with threadpool_limits(1, "blas"):
        rows_line("whole batch, OpenBLAS on one thread", median_ms(lambda: whole(X, y), args.repeat))
    rows_line(f"split: {parts} slices at once", median_ms(lambda: split(X, y), args.repeat))
    with threadpool_limits(1, "blas"):
        rows_line(f"one slice of {rows} rows alone", median_ms(lambda: whole(X[:rows], y[:rows]), args.repeat))
        print(f"per layer, {rows} rows, OpenBLAS on one thread (forward / backward, ms):")
        inputs = [X[:rows]]
        for layer in model.layers:
            inputs.append(layer.forward(inputs[-1], training=True))
        grads = [F.softmax_cross_entropy(inputs[-1], y[:rows])[1]]
        for layer in reversed(model.layers):
            grads.append(layer.backward(grads[-1]))
        grads.reverse()  # grads[i + 1]: dL/d(output of layer i)
        total = 0.0
        for i, layer in enumerate(model.layers):
            forward = median_ms(lambda: layer.forward(inputs[i], training=True), args.repeat)
            layer.forward(inputs[i], training=True)
            backward = median_ms(lambda: layer.backward(grads[i + 1], need_dx=i > 0), args.repeat)
            total += forward + backward
            print(f"  {type(layer).__name__:10s} -> {str(layer.output_shape):13s} {forward:6.3f} / {backward:6.3f}")
        print(f"  all layers: {total:.2f}")


if __name__ == "__main__":
    main()
