"""xpnet.distributed: sharding, launcher detection, the gradient all-reduce, and data-parallel
``fit`` and ``xpnet train`` under a real ``mpiexec -n 2`` (MPICH from the ``mpi`` extra)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xpnet import distributed as D

WORKER = Path(__file__).with_name("mpi_worker.py")
LAUNCHER_VARIABLES = D._SIZE_VARIABLES + D._RANK_VARIABLES


def _mpiexec():
    """mpiexec beside this Python (the mpich wheel's), else on PATH; skip without it or mpi4py."""
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install -e '.[mpi]')")
    found = Path(sys.executable).with_name("mpiexec")
    path = str(found) if found.exists() else shutil.which("mpiexec")
    if path is None:
        pytest.skip("no mpiexec (pip install -e '.[mpi]' brings MPICH's)")
    return path


def _clean_env(monkeypatch):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_shards_cover_every_row_of_a_batch_once_and_evenly(size):
    for lo, hi in [(0, 0), (0, 1), (0, 7), (128, 256), (10, 23)]:
        parts = [D.shard(lo, hi, rank, size) for rank in range(size)]
        rows = [r for start, stop in parts for r in range(start, stop)]
        assert rows == list(range(lo, hi))
        counts = [stop - start for start, stop in parts]
        assert max(counts) - min(counts) <= 1 and counts == sorted(counts, reverse=True)


def test_the_launcher_is_found_from_its_variables(monkeypatch):
    _clean_env(monkeypatch)
    assert (D.launched_ranks(), D.launched_rank()) == (1, 0)
    assert D.for_fit(None, "cpu") is None and D.for_fit(False, "cpu") is None
    for size, rank in [("PMI_SIZE", "PMI_RANK"), ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
                       ("SLURM_NTASKS", "SLURM_PROCID")]:
        _clean_env(monkeypatch)
        monkeypatch.setenv(size, "4")
        monkeypatch.setenv(rank, "3")
        assert (D.launched_ranks(), D.launched_rank()) == (4, 3), size
    made = []
    monkeypatch.setattr(D, "communicator", lambda backend_name: made.append(backend_name) or "comm")
    for ranks, expected in (("1", None), ("2", "comm")):  # fit turns on from two processes
        _clean_env(monkeypatch)
        monkeypatch.setenv("PMI_SIZE", ranks)
        assert D.for_fit(None, "cpu") == expected
    assert D.for_fit(True, "cuda") == "comm" and made == ["cpu", "cuda"]


def test_distributed_must_be_none_or_a_bool():
    with pytest.raises(TypeError, match="distributed must be None, True or False, got 'yes'"):
        D.for_fit("yes", "cpu")


class _Doubling(D.Communicator):
    """Stands for two ranks holding the same values: a sum doubles them."""

    size = 2

    def sum(self, array):
        array *= 2


def test_the_gradient_sum_weights_by_share_and_takes_part_with_zeros():
    rng = np.random.default_rng(0)
    params = [rng.standard_normal((3, 4)), rng.standard_normal(4)]
    grads = [p.copy() for p in params]
    D.GradientSum(_Doubling(), np, params)(grads, 0.25)
    for g, p in zip(grads, params):
        np.testing.assert_allclose(g, 2 * 0.25 * p)
    D.GradientSum(_Doubling(), np, params)(grads, 0.0)  # an empty shard: zeros, even over NaN
    grads[0][0, 0] = np.nan
    D.GradientSum(_Doubling(), np, params)(grads, 0.0)
    assert all(not g.any() for g in grads)
    # one buffer exactly as large as the gradients, in their dtype: the all-reduce's volume
    small = D.GradientSum(_Doubling(), np, [p.astype(np.float32) for p in params])
    assert small.flat.shape == (16,) and small.flat.dtype == np.float32 and small.spans == [(0, 12), (12, 16)]


def test_mpi_takes_c_contiguous_numpy_buffers_only():
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install -e '.[mpi]')")
    comm = D.MPICommunicator()  # this process alone: a one-rank job
    for bad, name in ((np.zeros((3, 4))[:, ::2], "ndarray"), ([1.0, 2.0], "list")):
        with pytest.raises(TypeError, match=f"^MPI buffers must be C-contiguous NumPy arrays, got {name}$"):
            comm.sum(bad)
        with pytest.raises(TypeError, match="^MPI buffers must be C-contiguous"):
            comm.broadcast(bad)
    ok = np.arange(4.0)
    comm.sum(ok)
    comm.broadcast(ok)
    assert ok.tolist() == [0.0, 1.0, 2.0, 3.0] and comm.broadcast_object({"a": 1}) == {"a": 1}


def _run_ranks(args, timeout=300):
    return subprocess.run([_mpiexec(), "-n", "2", sys.executable, str(WORKER), *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("dtype,optimizer,n,batch,kind", [
    ("float32", "sgd", 200, 64, "mlp"),  # even shards, a last batch of 8
    ("float32", "adam", 301, 65, "mlp"),  # odd shards (33 and 32 rows), a last batch of 41
    ("float64", "sgd", 129, 128, "mlp"),  # a last batch of 1 row: rank 1 takes part with no rows
    ("float64", "adam", 1000, 128, "mlp"),
    ("float32", "adam", 150, 32, "cnn"),  # Conv2D, pooling: the reference step
    ("float64", "sgd", 150, 32, "cnn"),
])
def test_two_ranks_train_as_one_process_with_the_global_batch(dtype, optimizer, n, batch, kind):
    """One epoch under ``mpiexec -n 2`` (the ranks' models seeded differently: rank 0's weights
    and shuffle must win) leaves the weights one process leaves with the same global batches:
    within 1e-5 (float32) / 1e-12 (float64), weights being of order 1; the epoch's loss and
    accuracy are the global batch's on both ranks."""
    result = _run_ranks(["equal", dtype, optimizer, str(n), str(batch), kind])
    assert result.returncode == 0, result.stderr[-3000:]
    (rows,) = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("[")]
    assert sorted(r["rank"] for r in rows) == [0, 1]
    tol = 1e-5 if dtype == "float32" else 1e-12
    for r in rows:
        assert r["max_abs_diff"] <= tol and 0.1 < r["max_weight"] < 10, r
        assert r["loss"] == pytest.approx(r["loss_alone"], rel=tol) and r["accuracy"] == r["accuracy_alone"]
        # the MLP trains through the fast Numba step, the CNN through the reference one
        assert r["step"] == ("CpuTrainingStep" if kind == "mlp" else "ReferenceStep"), r["step"]


def test_a_run_resumed_under_mpiexec_ends_as_the_uninterrupted_one(tmp_path):
    """Rank 0 reads the checkpoint; MPI carries its epoch and Adam state to rank 1 (seeded
    differently), and both ranks end with the uninterrupted run's weights, bit for bit."""
    result = _run_ranks(["cut", str(tmp_path)], timeout=120)
    # the job ends (both ranks abort it, so whose line reaches stderr first is a race, and
    # a line may be lost as mpiexec tears the job down): epoch 0 is on disk, epoch 1 is not
    assert result.returncode != 0, result.stdout[-2000:]
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0]
    result = _run_ranks(["resume", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    (rows,) = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("[")]
    # cut at the end of epoch 1, before the recorder saved it: epochs 1-3 run again
    assert rows == [{"rank": 0, "epochs": [1, 2, 3], "equal": True}, {"rank": 1, "epochs": [1, 2, 3], "equal": True}]


def test_a_failure_ends_the_job_once_however_many_layers_catch_it():
    class TwoRanks(D.Communicator):
        rank, size = 0, 2

        def __init__(self):
            self.aborted = []

        def abort(self, message):  # MPI_Abort may return before the process is ended
            self.aborted.append(message)

    comm = TwoRanks()
    with pytest.raises(KeyboardInterrupt):
        with D.failure_ends_the_job(comm), D.failure_ends_the_job(comm):  # xpnet train's, then fit's
            raise KeyboardInterrupt
    with pytest.raises(ValueError, match="^a bad folder$"):
        with D.failure_ends_the_job(comm):
            raise ValueError("a bad folder")
    assert comm.aborted == ["KeyboardInterrupt", "ValueError: a bad folder"]
    with pytest.raises(ValueError), D.failure_ends_the_job(None):  # one process: nothing to end
        raise ValueError("alone")
    comm.size = 1
    with pytest.raises(ValueError), D.failure_ends_the_job(comm):
        raise ValueError("a one-rank job")
    assert len(comm.aborted) == 2


def _mpi_segments() -> set:
    shm = Path("/dev/shm")
    return {p.name for p in shm.iterdir() if p.name.startswith("mpich_shm_")} if shm.is_dir() else set()  # MPICH's


def test_a_failing_rank_ends_the_job_with_its_reason_instead_of_a_hang():
    """... and leaves no MPI shared-memory segment behind (MPICH frees it at MPI_Finalize, which
    an aborted job never reaches: each failed job would keep 2 MB of memory until a restart)."""
    before = _mpi_segments()
    result = _run_ranks(["fail"], timeout=120)
    assert result.returncode != 0
    assert "rank 1 of 2 failed, ending the job: RuntimeError: a planted failure on rank 1" in result.stderr
    assert _mpi_segments() <= before


def test_xpnet_train_under_mpiexec_records_and_prints_once(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.integers(0, 255, (300, 6, 6)).astype(np.uint8)
    y = (X.reshape(300, -1)[:, :4].sum(axis=1) > 510).astype(np.int64)
    data = tmp_path / "small.npz"
    np.savez(data, x_train=X[:240], y_train=y[:240], x_test=X[240:], y_test=y[240:])
    out = tmp_path / "runs" / "distributed"
    xpnet_cli = Path(sys.executable).with_name("xpnet")
    command = [str(xpnet_cli)] if xpnet_cli.exists() else [sys.executable, "-m", "xpnet"]
    result = subprocess.run([_mpiexec(), "-n", "2", *command, "train", "--data", str(data), "--epochs", "2",
                             "--batch-size", "32", "--out", str(out), "--quiet"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("test accuracy") == 1
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["distributed"]
    config = json.loads((out / "config.json").read_text())
    assert '"ranks": 2' in json.dumps(config), config
    assert (out / "model.safetensors").is_file()

    # rank 0 refuses the folder before training: the job ends, rank 1 does not wait for it
    again = subprocess.run([_mpiexec(), "-n", "2", *command, "train", "--data", str(data), "--out", str(out)],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert again.returncode != 0
    assert "rank 0 of 2 failed, ending the job: FileExistsError" in again.stderr, again.stderr[-3000:]


def test_without_cupy_the_nccl_path_says_what_to_install():
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed here: the GPU test below runs the NCCL path")
    with pytest.raises(ImportError, match=r"NCCL training needs CuPy with NCCL: pip install 'xpnet\[cuda12\]'"):
        D.NCCLCommunicator()
    with pytest.raises(ImportError, match="NCCL training needs CuPy"):
        D.communicator("cuda")


def test_one_rank_with_a_communicator_trains_as_without(rng):
    """``distributed=True`` in a single process (a one-rank MPI job): the same weights as a
    plain run, through the same shards, all-reduce and broadcasts."""
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install -e '.[mpi]')")
    import xpnet

    X = rng.standard_normal((90, 6))
    y = (X[:, 0] > 0).astype(np.int64)
    runs = []
    for distributed in (True, False):
        model = xpnet.MLP([6, 5, 2], dtype="float64", seed=1)
        model.fit(X, y, epochs=2, batch_size=16, optimizer="adam", lr=0.01, verbose=0, distributed=distributed)
        runs.append(model.get_weights())
    for (W0, b0), (W1, b1) in zip(*runs):
        np.testing.assert_array_equal(W0, W1)
        np.testing.assert_array_equal(b0, b1)


@pytest.mark.cuda
def test_a_one_rank_nccl_run_of_fit_equals_the_plain_cuda_run(rng, monkeypatch):
    """On a GPU: NCCL (one rank) carries the broadcasts and the all-reduce; the weights must be
    those of the non-distributed eager CUDA path (XPNET_CUDA_GRAPHS=0: the distributed run takes
    the eager loop too)."""
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install -e '.[mpi]')")
    import xpnet

    monkeypatch.setenv("XPNET_CUDA_GRAPHS", "0")
    X = rng.standard_normal((90, 6)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    runs = []
    for distributed in (True, False):
        model = xpnet.MLP([6, 5, 2], seed=1, backend="cuda")
        model.fit(X, y, epochs=2, batch_size=16, lr=0.1, verbose=0, distributed=distributed)
        runs.append(model.get_weights())
    for (W0, b0), (W1, b1) in zip(*runs):
        np.testing.assert_allclose(W0, W1, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(b0, b1, rtol=1e-6, atol=1e-7)
