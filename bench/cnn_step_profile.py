"""Where a LeNet-5 training step's time goes on the CPU, and what spreading its images over the cores gives.

    python bench/cnn_step_profile.py [--batch 128] [--repeat 30] [--arch lenet5]

Prints, on random data (median of ``--repeat`` calls each, ms):

- one reference step (forward, loss, backward; no update) on the whole batch, its kernels
  serial, with OpenBLAS on its default threads and on one thread, and as ``fit`` runs it on
  several cores (``xpnet.training.ImagesOnCoresStep``: convolution and pooling spread each
  batch's images over the cores, OpenBLAS on one thread);
- per layer, forward and backward inside that step's setting.

Timings, not a benchmark: run it on a quiet machine, and compare numbers from one run only.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

from xpnet import functional as F
from xpnet import recipes
from xpnet.kernels import cores, numba_cpu
from xpnet.training import ImagesOnCoresStep, ReferenceStep


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
    parser.add_argument("--arch", choices=["lenet5", "cnn_shift"], default="lenet5")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    X = rng.random((args.batch, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, args.batch)
    model = getattr(recipes, args.arch)(seed=0)
    parts = cores.cores()
    whole = ReferenceStep(model)
    spread = ImagesOnCoresStep(model, parts)
    print(f"{args.arch}, batch {args.batch}, {parts} cores; ms per step (median of {args.repeat})")
    rows_line = lambda label, ms: print(f"  {label:44s} {ms:6.2f}")  # noqa: E731
    rows_line("kernels serial, OpenBLAS default threads", median_ms(lambda: whole(X, y), args.repeat))
    with threadpool_limits(1, "blas"):
        rows_line("kernels serial, OpenBLAS on one thread", median_ms(lambda: whole(X, y), args.repeat))
    rows_line(f"images on {parts} cores, OpenBLAS on one thread", median_ms(lambda: spread(X, y), args.repeat))
    with threadpool_limits(1, "blas"), numba_cpu.images_on_cores(parts):
        print(f"per layer, images on {parts} cores, OpenBLAS on one thread (forward / backward, ms):")
        inputs = [X]
        for layer in model.layers:
            inputs.append(layer.forward(inputs[-1], training=True))
        grads = [F.softmax_cross_entropy(inputs[-1], y)[1]]
        for layer in reversed(model.layers):
            grads.append(layer.backward(grads[-1]))
        grads.reverse()  # grads[i + 1]: dL/d(output of layer i)
        total = 0.0
        for i, layer in enumerate(model.layers):
            forward = median_ms(lambda: layer.forward(inputs[i], training=True), args.repeat)
            layer.forward(inputs[i], training=True)
            backward = median_ms(lambda: layer.backward(grads[i + 1], need_dx=i > 0), args.repeat)
            total += forward + backward
            print(f"  {type(layer).__name__:11s} -> {str(layer.output_shape):13s} {forward:6.3f} / {backward:6.3f}")
        print(f"  all layers: {total:.2f}")


if __name__ == "__main__":
    main()
