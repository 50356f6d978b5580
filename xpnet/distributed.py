"""Data-parallel training over the engines clusters already run: MPI between processes (mpi4py),
NCCL between GPUs (through CuPy, its unique id sent over MPI).

Launch the same script or CLI under ``mpiexec -n K`` (or ``srun``): ``fit`` finds the launcher
(``distributed=None``, the default) or is told (``distributed=True``), and then

- rank 0's initial weights go to every rank, and so does each epoch's shuffling order;
- every global batch of ``batch_size`` rows is split between the ranks (``shard``), each rank
  computes the mean-loss gradient of its rows, and one all-reduce per step (all gradients in
  one flat buffer) sums them weighted by each rank's share of the rows: the gradient of the
  global batch, so K ranks train as one process would, to rounding;
- the epoch's loss and accuracy are summed over the ranks; only rank 0 prints and records.

A rank that raises ends the whole job (``MPI_Abort``) after saying why on stderr, so the
others never wait forever in a collective call. ``pip install -e ".[mpi]"`` brings mpi4py and
the MPICH wheel, whose ``mpiexec`` runs the job: ``mpiexec -n 2 xpnet train``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import numpy as np

__all__ = ["Communicator", "MPICommunicator", "NCCLCommunicator", "launched_ranks", "launched_rank", "communicator",
           "shard", "failure_ends_the_job", "share_start"]

# The variables a launcher sets for the job's size: MPICH's Hydra (and Intel MPI), Open MPI, PMIx, Slurm.
_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "SLURM_NTASKS")


_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")


#: how long a failing rank waits, its reason printed, before ending the job (see ``abort``)
ABORT_DRAIN_SECONDS = 0.5


def _launcher_variable(names) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return None


def launched_ranks() -> int:
    """How many processes the launcher started this job with (1 when not under one)."""
    return _launcher_variable(_SIZE_VARIABLES) or 1


def launched_rank() -> int:
    """This process's rank as the launcher numbered it (0 when not under one), known before MPI
    starts: the CLI uses it to leave printing and recording to rank 0."""
    return _launcher_variable(_RANK_VARIABLES) or 0


def shard(lo: int, hi: int, rank: int, size: int) -> tuple[int, int]:
    """This rank's rows ``[start, stop)`` of the global batch ``[lo, hi)``: contiguous and as
    even as can be (the first ``(hi - lo) % size`` ranks take one row more); may be empty."""
    rows, extra = divmod(hi - lo, size)
    start = lo + rank * rows + min(rank, extra)
    return start, start + rows + (rank < extra)


class Communicator:
    """What data-parallel training needs from an engine; ``rank``, ``size`` and four calls."""

    rank: int = 0
    size: int = 1

    def broadcast(self, array, root: int = 0) -> None:
        """Overwrite ``array`` on every rank with root's, in place."""
        raise NotImplementedError

    def broadcast_object(self, obj, root: int = 0):
        """Root's ``obj`` (any picklable value; the others pass None), returned on every rank.
        Between the job's own processes only: nothing read from a file goes through it."""
        raise NotImplementedError

    def sum(self, array) -> None:
        """Replace ``array`` on every rank by the elementwise sum over all ranks, in place."""
        raise NotImplementedError

    def abort(self, message: str) -> None:
        """End the whole job after ``message`` (from one rank: the others may be in a collective)."""
        raise NotImplementedError


class MPICommunicator(Communicator):
    """Over an mpi4py communicator (``MPI.COMM_WORLD`` by default), on NumPy arrays."""

    def __init__(self, comm=None):
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise ImportError(
                "distributed training needs mpi4py and an MPI library: pip install 'xpnet[mpi]'"
            ) from exc
        self._mpi = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    def broadcast(self, array, root=0):
        self.comm.Bcast(_contiguous(array), root=root)

    def broadcast_object(self, obj, root=0):
        return self.comm.bcast(obj, root=root)

    def sum(self, array):
        self.comm.Allreduce(self._mpi.IN_PLACE, _contiguous(array), op=self._mpi.SUM)

    def abort(self, message):
        print(f"xpnet: rank {self.rank} of {self.size} failed, ending the job: {message}", file=sys.stderr, flush=True)
        # the launcher forwards this line from a pipe; MPI_Abort at once can tear the job down
        # before it is read (seen under load: an empty stderr). A job that is ending can wait.
        time.sleep(ABORT_DRAIN_SECONDS)
        _unlink_mpi_shared_memory()
        self.comm.Abort(1)


#: the names MPICH gives its shared-memory segments (the ``mpich`` wheel's ``mpiexec``)
MPI_SEGMENT_PREFIXES = ("mpich_shm_",)


def _unlink_mpi_shared_memory() -> None:
    """Remove the names of the MPI shared-memory segments this process has mapped. MPICH removes
    them at ``MPI_Finalize``, which an aborted job never reaches: each failed job would leave
    its segment (2 MB a node) in ``/dev/shm``, that is in memory, until the machine restarts.
    Every rank still running keeps its mapping; Linux only (elsewhere nothing happens)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {fields[5].strip() for fields in (line.split(None, 5) for line in maps) if len(fields) == 6}
    except OSError:
        return
    for path in paths:
        if path.startswith("/dev/shm/") and os.path.basename(path).startswith(MPI_SEGMENT_PREFIXES):
            with contextlib.suppress(OSError):  # already gone (" (deleted)"), or another user's
                os.unlink(path)


class NCCLCommunicator(Communicator):
    """NCCL between GPUs, one per rank (device ``rank % device count``), on CuPy arrays; MPI
    starts it (rank 0's unique id is broadcast over ``mpi``) and carries the aborts."""

    def __init__(self, mpi: MPICommunicator | None = None):
        try:
            import cupy
            from cupy.cuda import nccl
        except ImportError as exc:
            raise ImportError(
                "NCCL training needs CuPy with NCCL: pip install 'xpnet[cuda12]' or 'xpnet[cuda13]'"
            ) from exc
        self.mpi = mpi or MPICommunicator()
        self.rank, self.size = self.mpi.rank, self.mpi.size
        cupy.cuda.Device(self.rank % cupy.cuda.runtime.getDeviceCount()).use()
        uid = self.mpi.comm.bcast(nccl.get_unique_id() if self.rank == 0 else None, root=0)  # a tuple of ints
        self._nccl, self._cupy = nccl, cupy
        self.comm = nccl.NcclCommunicator(self.size, uid, self.rank)

    def _call(self, name, array, *args):
        kinds = {"float32": self._nccl.NCCL_FLOAT32, "float64": self._nccl.NCCL_FLOAT64, "int64": self._nccl.NCCL_INT64}
        if array.dtype.name not in kinds or not array.flags.c_contiguous:
            raise TypeError(f"NCCL takes C-contiguous float32, float64 or int64 arrays, got {array.dtype}")
        stream = self._cupy.cuda.get_current_stream().ptr
        ptr = array.data.ptr
        getattr(self.comm, name)(ptr, ptr, array.size, kinds[array.dtype.name], *args, stream)

    def broadcast(self, array, root=0):
        if isinstance(array, np.ndarray):  # host data (the epoch's order) goes over MPI
            return self.mpi.broadcast(array, root)
        self._call("broadcast", array, root)

    def broadcast_object(self, obj, root=0):
        return self.mpi.broadcast_object(obj, root)

    def sum(self, array):
        if isinstance(array, np.ndarray):  # host data (the epoch's totals) goes over MPI
            return self.mpi.sum(array)
        self._call("allReduce", array, self._nccl.NCCL_SUM)

    def abort(self, message):
        self.mpi.abort(message)


def _contiguous(array):
    if not (isinstance(array, np.ndarray) and array.flags.c_contiguous):
        raise TypeError(f"MPI buffers must be C-contiguous NumPy arrays, got {type(array).__name__}")
    return array


def communicator(backend_name: str) -> Communicator:
    """The communicator for a model on ``backend_name``: NCCL on "cuda", MPI otherwise."""
    return NCCLCommunicator() if backend_name == "cuda" else MPICommunicator()


def for_fit(distributed, backend_name: str) -> Communicator | None:
    """``fit``'s ``distributed`` setting made a communicator: None (the default) means one when
    a launcher started several processes, True always one, False never."""
    if distributed is None:
        distributed = launched_ranks() > 1
    if not isinstance(distributed, (bool, np.bool_)):
        raise TypeError(f"distributed must be None, True or False, got {distributed!r}")
    return communicator(backend_name) if distributed else None


@contextlib.contextmanager
def failure_ends_the_job(comm: Communicator | None):
    """An exception or a Ctrl-C on one rank of several ends every rank, after a line naming the
    rank and the error: the others may be waiting for this one in a collective call, where a
    signal never reaches Python (a Ctrl-C under ``mpiexec`` lands on every rank, but one blocked
    in MPI never sees it). ``comm`` None: one process, nothing to end."""
    try:
        yield
    except (Exception, KeyboardInterrupt) as exc:
        if comm is not None and comm.size > 1 and not getattr(exc, "_ended_the_job", False):
            exc._ended_the_job = True  # said once, where it was first caught (MPI_Abort may return)
            comm.abort(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        raise


def share_start(comm: Communicator, model, optimizer, first_epoch: int, stateful=()) -> int:
    """Make every rank start where rank 0 does: its weights, its first epoch, its optimizer's
    state and its ``stateful`` callbacks' (a resumed run's, read from its checkpoint on rank 0
    alone: the ranks' EarlyStopping must decide alike, or one would stop while the others wait
    for it); return that first epoch."""
    kinds = [type(cb).__name__ for cb in stateful]
    start = None
    if comm.rank == 0:
        to_numpy = model.backend.to_numpy
        state = {name: to_numpy(value) for name, value in optimizer.state_dict().items()}
        start = {"epoch": first_epoch, "state": state, "callbacks": [cb.state_dict() for cb in stateful],
                 "kinds": kinds}
    start = comm.broadcast_object(start)
    params = model.parameters()
    if comm.rank != 0:
        if start["kinds"] != kinds:
            raise ValueError(f"rank {comm.rank} trains with the callbacks {kinds} (those keeping state), "
                             f"rank 0 with {start['kinds']}: give every rank the same")
        optimizer.load_state_dict(start["state"], params)
        for cb, state in zip(stateful, start["callbacks"]):
            cb.load_state_dict(state)
    for p in params:
        comm.broadcast(p)
    return start["epoch"]


class GradientSum:
    """The one all-reduce of a step: every gradient, weighted by this rank's share of the global
    batch's rows, into one flat buffer, summed over the ranks, and back into the gradients."""

    def __init__(self, comm: Communicator, xp, params):
        self.comm = comm
        offsets = np.cumsum([0] + [int(p.size) for p in params]).tolist()
        self.spans = list(zip(offsets[:-1], offsets[1:]))  # each gradient's slice of the buffer
        self.flat = xp.zeros(offsets[-1], dtype=params[0].dtype)

    def __call__(self, grads, share: float):
        flat, spans = self.flat, self.spans
        if share == 0:  # no rows here (a short last batch): take part with zeros
            flat[...] = 0
        else:
            for g, (lo, hi) in zip(grads, spans):
                flat[lo:hi] = g.reshape(-1)
            if share != 1:
                flat *= flat.dtype.type(share)
        self.comm.sum(flat)
        for g, (lo, hi) in zip(grads, spans):
            g[...] = flat[lo:hi].reshape(g.shape)
        return grads
