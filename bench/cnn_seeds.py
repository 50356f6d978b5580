"""Train an architecture's recipe (``xpnet train --arch NAME``, LeNet-5 by default) on MNIST for
seeds 0-2 and print each seed's test accuracy per epoch and the mean; ``--json PATH`` keeps the
numbers, with the command, the date and the machine.

    python bench/cnn_seeds.py [--arch lenet5] [--seeds 0 1 2] [--epochs 15] [--lr 2e-3] [--json out.json]

Unset options take the recipe's value (``xpnet.recipes.RECIPES``). Test accuracy is read after
every epoch for the record only: the reported number is the last epoch's, never the best one
(no model selection on the test set).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

import xpnet
from xpnet.datasets import load_mnist
from xpnet.recipes import ARCHS, RECIPES, build


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="lenet5", choices=ARCHS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    for option in ("epochs", "batch-size"):
        parser.add_argument(f"--{option}", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--schedule", default=None)
    parser.add_argument("--optimizer", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    recipe = RECIPES[args.arch]
    given = {"epochs": args.epochs, "batch_size": args.batch_size, "optimizer": args.optimizer, "lr": args.lr,
             "schedule": args.schedule}
    settings = {**recipe, **{k: v for k, v in given.items() if v is not None}}
    X, y = load_mnist("train")
    Xt, yt = load_mnist("test")
    machine = (f"{_cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
               f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    parameters = build(args.arch).count_params()
    print(f"{started}; {machine}; xpnet {xpnet.__version__}; {args.arch} ({parameters:,} parameters), {settings}",
          flush=True)
    runs = []
    for seed in args.seeds:
        model = build(args.arch, seed=seed)
        start = time.perf_counter()
        history = model.fit(X, y, validation_data=(Xt, yt), verbose=0, **settings)
        seconds = time.perf_counter() - start
        curve = [round(a, 4) for a in history["val_accuracy"]]
        runs.append({"seed": seed, "test_accuracy": curve[-1], "per_epoch": curve, "seconds": round(seconds, 1),
                     "load_average_after": [round(v, 2) for v in os.getloadavg()]})
        print(f"seed {seed}: test accuracy {curve[-1]:.2%} after {len(curve)} epochs, {seconds:.1f} s; per epoch {curve}",
              flush=True)
    mean = float(np.mean([r["test_accuracy"] for r in runs]))
    print(f"mean over seeds {args.seeds}: {mean:.2%}")
    if args.json:
        record = {"command": " ".join(["python", *sys.argv]), "date": started, "machine": machine,
                  "arch": args.arch, "parameters": parameters, "settings": settings, "runs": runs,
                  "mean_test_accuracy": mean}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
