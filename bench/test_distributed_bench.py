"""The data-parallel scaling script (``distributed_scaling.py``) kept running: in quick mode,
2,048 MNIST images for one epoch, one process against ``mpiexec -n 2``. It only checks that both
train to the same accuracy (the same global batches); the timings come from the full script."""

from __future__ import annotations

import os

import pytest

import distributed_scaling
from conftest import QUICK


@pytest.mark.skipif(not QUICK, reason="the full measurement is `python bench/distributed_scaling.py`")
def test_two_ranks_and_one_process_train_alike():
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install -e '.[mpi]')")
    if not os.environ.get("XPNET_DATA"):
        pytest.skip("real MNIST not found: set XPNET_DATA to the folder holding mnist/")
    report = distributed_scaling.main(["--quick"])
    row = report["rows"]["784-50-25-10"]
    one, two = row["1 process x 2 threads"], row["2 ranks x 1 thread"]
    assert one["test_accuracy"] > 0.3 and abs(one["test_accuracy"] - two["test_accuracy"]) < 0.01, row
