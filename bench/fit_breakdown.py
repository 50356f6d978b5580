"""Where a fit of xpnet's ``MLPClassifier`` goes: every call of the training step, of the
optimizer's update and of the batch gather inside ``fit``, timed (a timer around each call),
as medians and sums, for the sklearn benchmark's recipe on the real MNIST.

Where the whole epoch runs in one kernel (``CpuTrainingStep.run_epoch``), its calls are timed
instead. ``--both`` fits each seed twice, alternating: with whole epochs in one kernel, then with
``fit``'s loop over the batches (``run_epoch`` turned off).

``--after-sklearn`` fits scikit-learn's estimator before each of xpnet's, as the benchmark
does (the next fit then starts on a machine that scikit-learn's BLAS threads just left).

    XPNET_DATA=/work/shared/data python bench/fit_breakdown.py [--seeds 0 1 2] [--after-sklearn] [--both]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_sklearn_bench import RECIPE, mnist  # noqa: E402  (the benchmark's recipe and data)

from xpnet import optim  # noqa: E402
from xpnet.kernels import cpu_step  # noqa: E402
from xpnet.sklearn import MLPClassifier  # noqa: E402

TIMED = {"gather": (cpu_step.CpuTrainingStep, "take_batch"), "step": (cpu_step.CpuTrainingStep, "__call__"),
         "update": (optim.Optimizer, "step"), "epoch": (cpu_step.CpuTrainingStep, "run_epoch")}


def timed(times, key, method):
    def call(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            times[key].append(time.perf_counter() - start)
    return call


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--after-sklearn", action="store_true")
    parser.add_argument("--both", action="store_true", help="each seed with and without whole epochs in one kernel")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # (max_iter reached before convergence)
    X, y, _, _ = mnist()
    MLPClassifier(**{**RECIPE, "max_iter": 1}).fit(X[:1000], y[:1000])  # compiled before the clock
    times = collections.defaultdict(list)
    for key, (cls, name) in TIMED.items():
        setattr(cls, name, timed(times, key, getattr(cls, name)))
    whole_epochs = cpu_step.CpuTrainingStep.run_epoch
    for seed in args.seeds:
        for whole in (True, False) if args.both else (True,):
            cpu_step.CpuTrainingStep.run_epoch = whole_epochs if whole else (lambda *a, **k: None)
            if args.after_sklearn:
                from sklearn.neural_network import MLPClassifier as Theirs

                Theirs(random_state=seed, **RECIPE).fit(X, y)
            times.clear()
            start = time.perf_counter()
            MLPClassifier(random_state=seed, **RECIPE).fit(X, y)
            total = time.perf_counter() - start
            calls = ", ".join(f"{key} {len(t)} calls, median {np.median(t) * 1e6:.1f} us, sum {np.sum(t) * 1e3:.0f} ms"
                              for key, t in times.items() if t)
            how = ("whole epochs" if whole else "loop") + ": " if args.both else ""
            print(f"seed {seed}: {how}fit {total:.3f} s; {calls}")


if __name__ == "__main__":
    main()
