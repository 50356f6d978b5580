"""Re-run the three seed write-ups' configurations with xpnet and print a markdown table.

    python bench/seeds.py            # needs XPNET_DATA (or the MNIST in the user cache)

Times are training wall time (fit only, data already in memory), on the machine it runs on.
"""

from __future__ import annotations

import os
import platform
import time

import numpy as np

import xpnet
from xpnet.baselines import NearestCentroid
from xpnet.datasets import load_mnist

# (seed write-up, what it published, layers, fit settings)
CONFIGS = [
    ("000: 784-10-10, full batch, 100 iterations, alpha 0.1", "61.99% test", [784, 10, 10],
     dict(epochs=100, batch_size=60000, lr=0.1)),
    ("001: 784-64-64-10 (xpnet: batch 128, 10 epochs, SGD lr 0.1)", "96.98% test (3000 full-batch epochs)",
     [784, 64, 64, 10], dict(epochs=10, batch_size=128, lr=0.1)),
    ("002: 784-50-25-10, batch 128, 10 epochs, SGD lr 0.01 (as published)", "val loss 0.1334, 5.20 s",
     [784, 50, 25, 10], dict(epochs=10, batch_size=128, lr=0.01)),
    ("002: same net, SGD lr 0.1 (the issue's recipe)", "PyTorch 96.8%, scikit-learn 96.2%",
     [784, 50, 25, 10], dict(epochs=10, batch_size=128, lr=0.1)),
    ("002: same net, best recipe: batch 64, Nesterov 0.9, lr 0.05, cosine", "-",
     [784, 50, 25, 10], dict(epochs=10, batch_size=64, lr=0.05, momentum=0.9, nesterov=True, schedule="cosine")),
    ("784-256-128-10, Adam lr 1e-3, batch 128, 10 epochs", "-",
     [784, 256, 128, 10], dict(epochs=10, batch_size=128, optimizer="adam", lr=1e-3)),
]


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    X_train, y_train = load_mnist("train")
    X_test, y_test = load_mnist("test")
    backend = os.environ.get("XPNET_BACKEND", "cpu")
    print(f"machine: {_cpu_name()}, {os.cpu_count()} cores, "
          f"backend {backend}, xpnet {xpnet.__version__}, numpy {np.__version__}\n")
    print("| configuration | published | xpnet test accuracy | test loss | training time |")
    print("| --- | --- | --- | --- | --- |")
    start = time.perf_counter()
    baseline = NearestCentroid().fit(X_train, y_train)
    accuracy = baseline.score(X_test, y_test)
    seconds = time.perf_counter() - start
    print(f"| 001: average digit (NearestCentroid) | 82.03% test | {accuracy:.2%} | - | {seconds:.2f} s (fit + score) |")
    for name, published, layers, settings in CONFIGS:
        model = xpnet.MLP(layers, seed=0, backend=backend)
        start = time.perf_counter()
        model.fit(X_train, y_train, verbose=0, **settings)
        model.backend.synchronize()
        seconds = time.perf_counter() - start
        scores = model.evaluate(X_test, y_test)
        print(f"| {name} | {published} | {scores['accuracy']:.2%} | {scores['loss']:.4f} | {seconds:.2f} s |", flush=True)


if __name__ == "__main__":
    main()
