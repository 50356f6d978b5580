"""Seed 002's recipe on the GPU over several seeds: xpnet ``fit`` (graph path) against PyTorch
eager CUDA from the same initial weights, so "equal accuracy" is judged against the spread
between seeds rather than one run each.

    python3 bench/cuda_seeds.py --seeds 5 --out cuda-seeds.json     # needs CuPy, torch, a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import xpnet  # noqa: E402
from test_cuda_bench import _sync, cp_to_np, environment, mnist_on_device, torch_run  # noqa: E402

LAYERS, EPOCHS, LR = [784, 50, 25, 10], 10, 0.1


def xpnet_fit(data, seed):
    Xtr, ytr, Xte, yte = data
    model = xpnet.MLP(LAYERS, seed=seed, backend="cuda")
    _sync()
    start = time.perf_counter()
    model.fit(Xtr, ytr, epochs=EPOCHS, batch_size=128, optimizer="sgd", lr=LR, verbose=0)
    _sync()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "test_accuracy": model.score(Xte, yte)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    data = mnist_on_device()
    host = [cp_to_np(a) for a in data]
    xpnet_fit(data, 0)  # warm-up: compile, capture, CUDA init
    torch_run(LAYERS, host, epochs=1, optimizer="sgd", lr=LR)
    rows = []
    for seed in range(args.seeds):
        init = xpnet.MLP(LAYERS, seed=seed).get_weights()
        row = {"seed": seed, "xpnet": xpnet_fit(data, seed),
               "torch": torch_run(LAYERS, host, epochs=EPOCHS, optimizer="sgd", lr=LR, init_from=init, seed=seed)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {}
    for name in ("xpnet", "torch"):
        accs = [r[name]["test_accuracy"] for r in rows]
        secs = [r[name]["seconds"] for r in rows]
        summary[name] = {"accuracy_mean": statistics.mean(accs), "accuracy_stdev": statistics.stdev(accs),
                         "accuracy_min": min(accs), "accuracy_max": max(accs), "seconds_median": statistics.median(secs)}
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"environment": environment(), "rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
