"""Data-parallel scaling on one machine: ``mpiexec -n 2`` with one thread per rank against one
process with two threads, seed 002's recipe (784-50-25-10, SGD lr 0.1, batch 128 global,
10 epochs) and 784-256-128-10 the same way, on the real MNIST.

    python bench/distributed_scaling.py --out bench/results/cpu-2core-mpi.json
    python bench/distributed_scaling.py --quick          # 2,048 images, 1 epoch (CI)

Each configuration runs in fresh processes: one training untimed first (numba's compile or
cache load, BLAS start-up), then ``--repeats`` timed trainings; the time is ``fit`` alone, as
rank 0 measures it (the ranks finish together: the last all-reduce joins them). Thread counts
are set through the environment before NumPy starts (OpenBLAS, OpenMP, numba).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from conftest import _cpu_model  # bench/conftest.py: the CPU model every result file records

CONFIGS = {"784-50-25-10": [784, 50, 25, 10], "784-256-128-10": [784, 256, 128, 10]}


def _threads(n: int) -> dict:
    n = str(n)
    return {"OPENBLAS_NUM_THREADS": n, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "NUMBA_NUM_THREADS": n}


def train(widths, epochs, repeats, limit, distributed):
    """Inside one process (one rank): train, time, print a JSON line from rank 0."""
    import numpy as np

    import xpnet
    from xpnet.datasets import load_mnist

    root = os.environ.get("XPNET_DATA")
    root = Path(root) / "mnist" if root else None
    X, y = load_mnist("train", root=root, progressbar=False)
    Xt, yt = load_mnist("test", root=root, progressbar=False)
    X, y = X.reshape(len(X), -1)[:limit], y[:limit]
    settings = dict(batch_size=128, optimizer="sgd", lr=0.1, verbose=0, distributed=distributed)
    xpnet.MLP(widths, seed=2).fit(X, y, epochs=1, **settings)  # untimed: compile, BLAS start-up
    seconds, accuracy = [], None
    for _ in range(repeats):
        model = xpnet.MLP(widths, seed=2)
        start = time.perf_counter()
        model.fit(X, y, epochs=epochs, **settings)
        seconds.append(time.perf_counter() - start)
        accuracy = model.score(Xt.reshape(len(Xt), -1), yt)
    rank = 0
    if distributed:
        from mpi4py import MPI

        rank = MPI.COMM_WORLD.Get_rank()
    if rank == 0:
        print(json.dumps({"seconds": seconds, "test_accuracy": accuracy, "numpy": np.__version__}), flush=True)


def _launch(command, env):
    result = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2,048 images, 1 epoch, 1 repeat, the small net only")
    args = parser.parse_args(argv)
    epochs, repeats, limit = (1, 1, 2048) if args.quick else (10, args.repeats, None)
    configs = {"784-50-25-10": CONFIGS["784-50-25-10"]} if args.quick else CONFIGS
    mpiexec = str(Path(sys.executable).with_name("mpiexec"))
    me = [sys.executable, str(Path(__file__).resolve()), "--train"]
    report = {"command": " ".join(sys.argv), "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                                         "processor": _cpu_model()}, "rows": {}}
    for name, widths in configs.items():
        spec = [json.dumps(widths), str(epochs), str(repeats), str(limit or 0)]
        one = _launch(me + spec + ["0"], _threads(2))
        two = _launch([mpiexec, "-n", "2", *me, *spec, "1"], _threads(1))
        ratio = min(two["seconds"]) / min(one["seconds"])
        report["rows"][name] = {"1 process x 2 threads": one, "2 ranks x 1 thread": two, "ranks_over_threads": ratio}
        print(f"{name}: 1 process x 2 threads {min(one['seconds']):.2f} s ({one['test_accuracy']:.4f}), "
              f"2 ranks x 1 thread {min(two['seconds']):.2f} s ({two['test_accuracy']:.4f}): {ratio:.2f}x", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--train":
        widths, epochs, repeats, limit, distributed = sys.argv[2:]
        train(json.loads(widths), int(epochs), int(repeats), int(limit) or None, distributed == "1")
    else:
        main()
