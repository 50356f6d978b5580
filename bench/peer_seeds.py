"""The 784-50-25-10 recipe (SGD lr 0.1, batch 128, 10 epochs, float32) over several seeds:
xpnet against PyTorch eager and JAX (one jitted program per epoch), side by side.

For each seed, the three train one after another in this process, from the same seed, each
through the code the training benchmarks time (``test_training_bench``: ``MLP.fit`` on the
uint8 images for xpnet; PyTorch and JAX on the float32 images scaled once, untimed; JAX's
epoch program compiled before the clock starts). Prints each training's time and test
accuracy, the ratios of the summed times and the mean accuracies, and writes them as JSON.

    XPNET_DATA=/work/shared/data python bench/peer_seeds.py [--seeds 0 1 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import test_training_bench as tb  # noqa: E402  (the trainings the benchmarks time)

IMPLS = ("xpnet", "torch", "jax-scan")
WIDTHS = tb.CONFIGS["784-50-25-10"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    X, y, _, _ = tb.mnist()
    rows = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        for seed in args.seeds:
            tb.SEED = seed
            for impl in IMPLS:
                train, accuracy = tb._run(impl, WIDTHS, X, y, tb.RUN_EPOCHS, monkeypatch)
                start = time.perf_counter()
                train()
                seconds = time.perf_counter() - start
                rows.append(dict(seed=seed, impl=impl, seconds=seconds, test_accuracy=float(accuracy())))
                print(f"seed {seed} {impl:9s} {seconds:6.3f} s  test accuracy {rows[-1]['test_accuracy']:.4f}",
                      flush=True)
    summary = {}
    for impl in IMPLS:
        mine = [r for r in rows if r["impl"] == impl]
        summary[impl] = dict(seconds=sum(r["seconds"] for r in mine),
                             mean_accuracy=float(np.mean([r["test_accuracy"] for r in mine])))
    ours = summary["xpnet"]
    for peer in IMPLS[1:]:
        theirs = summary[peer]
        print(f"xpnet / {peer}: time {ours['seconds']:.2f} / {theirs['seconds']:.2f} s = "
              f"{ours['seconds'] / theirs['seconds']:.2f}x; mean test accuracy {100 * ours['mean_accuracy']:.2f}% vs "
              f"{100 * theirs['mean_accuracy']:.2f}%")
    if args.json:
        from conftest import _cpu_model, _isa, _versions

        from xpnet.files import atomic_write_bytes

        machine = dict(cpu=_cpu_model(), cores=os.cpu_count(), isa=_isa(), versions=_versions(),
                       python=platform.python_version())
        record = dict(machine=machine, seeds=args.seeds, epochs=tb.RUN_EPOCHS, runs=rows, summary=summary)
        atomic_write_bytes(args.json, (json.dumps(record, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()
