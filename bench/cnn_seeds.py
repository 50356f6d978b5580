"""Train the LeNet-5 recipe (``xpnet train --arch lenet5``) on MNIST for seeds 0-2 and print
each seed's test accuracy per epoch and the mean; ``--json PATH`` keeps the numbers.

    python bench/cnn_seeds.py [--seeds 0 1 2] [--epochs 15] [--lr 2e-3] [--json out.json]

Test accuracy is read after every epoch for the record only: the reported number is the last
epoch's, never the best one (no model selection on the test set).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

import xpnet
from xpnet.datasets import load_mnist
from xpnet.recipes import RECIPES, lenet5


def main(argv=None):
    recipe = RECIPES["lenet5"]
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=recipe["epochs"])
    parser.add_argument("--lr", type=float, default=recipe["lr"])
    parser.add_argument("--batch-size", type=int, default=recipe["batch_size"])
    parser.add_argument("--schedule", default=recipe["schedule"])
    parser.add_argument("--optimizer", default=recipe["optimizer"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    X, y = load_mnist("train")
    Xt, yt = load_mnist("test")
    settings = dict(epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                    schedule=args.schedule)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, xpnet {xpnet.__version__}; "
          f"LeNet-5, {settings}", flush=True)
    runs = []
    for seed in args.seeds:
        model = lenet5(seed=seed)
        start = time.perf_counter()
        history = model.fit(X, y, validation_data=(Xt, yt), verbose=0, **settings)
        seconds = time.perf_counter() - start
        curve = [round(a, 4) for a in history["val_accuracy"]]
        runs.append({"seed": seed, "test_accuracy": curve[-1], "per_epoch": curve, "seconds": seconds})
        print(f"seed {seed}: test accuracy {curve[-1]:.2%} after {len(curve)} epochs, {seconds:.1f} s; per epoch {curve}",
              flush=True)
    mean = float(np.mean([r["test_accuracy"] for r in runs]))
    print(f"mean over seeds {args.seeds}: {mean:.2%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": settings, "runs": runs, "mean_test_accuracy": mean}, f, indent=1)


if __name__ == "__main__":
    main()
