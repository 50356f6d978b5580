"""Run by tests/test_distributed.py under ``mpiexec -n K``: data-parallel ``fit`` against the
same training in one process, on every rank; prints one JSON line per rank.

    mpiexec -n 2 python tests/mpi_worker.py equal float32 sgd 200 64 mlp
    mpiexec -n 2 python tests/mpi_worker.py cut FOLDER; mpiexec -n 2 python tests/mpi_worker.py resume FOLDER
    mpiexec -n 2 python tests/mpi_worker.py fail
"""

from __future__ import annotations

import json
import sys

import numpy as np

import xpnet
from conftest import InterruptAfter
from xpnet.callbacks import Callback


def data(n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 12)).astype(dtype)
    y = (X[:, :3].sum(axis=1) > 0).astype(np.int64) + 2 * (X[:, 3] > 0.5)
    return X, y


def build(kind, dtype, seed):
    from xpnet.layers import Conv2D, Dense, Flatten, MaxPool2D

    if kind == "mlp":
        return xpnet.MLP([12, 9, 4], dtype=dtype, seed=seed)
    layers = [Conv2D(3, 3, activation="relu"), MaxPool2D(2), Flatten(), Dense(4)]
    return xpnet.Sequential(layers, input_shape=(6, 6, 1), dtype=dtype, seed=seed)


def equal(dtype, optimizer, n, batch_size, kind="mlp", epochs=1):
    """Distributed training (each rank a different model seed, so rank 0's weights and order must
    win) against one process training the same model on the same global batches."""
    from mpi4py import MPI

    from xpnet.training import _training_step

    rank = MPI.COMM_WORLD.Get_rank()
    X, y = data(n, dtype)
    if kind == "cnn":
        X = np.concatenate([X, X[:, :12], X[:, :12]], axis=1).reshape(n, 6, 6, 1)
    settings = dict(epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 0.01,
                    verbose=0)
    parallel = build(kind, dtype, 3 if rank == 0 else 100 + rank)
    history = parallel.fit(X, y, distributed=True, **settings)
    alone = build(kind, dtype, 3)
    reference = alone.fit(X, y, distributed=False, **settings)
    pairs = [(a, b) for wa, wb in zip(parallel.get_weights(), alone.get_weights()) for a, b in zip(wa, wb)]
    row = {"rank": rank, "max_abs_diff": max(float(np.max(np.abs(a - b))) for a, b in pairs),
           "max_weight": max(float(np.max(np.abs(b))) for _, b in pairs), "loss": history["loss"],
           "loss_alone": reference["loss"], "accuracy": history["accuracy"], "accuracy_alone": reference["accuracy"],
           "step": type(_training_step(parallel, batch_size, all_cores=False)).__name__}  # a rank's step
    rows = MPI.COMM_WORLD.gather(row, root=0)  # one line from rank 0: two ranks' prints could interleave
    if rank == 0:
        print(json.dumps(rows), flush=True)


class FailOnRank1(Callback):
    def on_epoch_end(self, epoch, logs):
        from mpi4py import MPI

        if MPI.COMM_WORLD.Get_rank() == 1:
            raise RuntimeError("a planted failure on rank 1")


RESUMED = dict(epochs=4, batch_size=32, optimizer="adam", lr=0.01, verbose=0, distributed=True)


def cut(folder):
    """The run ``resume`` continues, ended by a Ctrl-C at the end of epoch 1 (the job ends)."""
    from mpi4py import MPI

    X, y = data(300, "float32")
    xpnet.MLP([12, 9, 4], seed=MPI.COMM_WORLD.Get_rank()).fit(
        X, y, run_dir=f"{folder}/cut", callbacks=[InterruptAfter(1)], **RESUMED)


def resume(folder):
    """The run ``cut`` left, resumed (rank 0 reads the checkpoint), against the same run
    uninterrupted: every rank's weights, bit for bit."""
    from mpi4py import MPI

    rank = MPI.COMM_WORLD.Get_rank()
    X, y = data(300, "float32")
    settings = RESUMED
    whole = xpnet.MLP([12, 9, 4], seed=rank)
    whole.fit(X, y, run_dir=f"{folder}/whole", **settings)
    resumed = xpnet.MLP([12, 9, 4], seed=rank)
    history = resumed.fit(X, y, run_dir=f"{folder}/cut", resume=True, **settings)
    equal = all(np.array_equal(a, b) for wa, wb in zip(resumed.get_weights(), whole.get_weights())
                for a, b in zip(wa, wb))
    rows = MPI.COMM_WORLD.gather({"rank": rank, "epochs": history.epoch, "equal": equal}, root=0)
    if rank == 0:
        print(json.dumps(rows), flush=True)


def fail():
    X, y = data(300, "float32")
    xpnet.MLP([12, 9, 4], seed=0).fit(X, y, epochs=5, batch_size=32, distributed=True, verbose=0,
                                      callbacks=[FailOnRank1()])


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "equal":
        dtype, optimizer, n, batch, kind = args
        equal(dtype, optimizer, int(n), int(batch), kind)
    elif mode == "cut":
        cut(*args)
    elif mode == "resume":
        resume(*args)
    else:
        fail()
