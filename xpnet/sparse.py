"""Rows of a sparse data set, as training and inference take them: ``SparseRows`` (CSR).

A scipy sparse matrix given to ``fit``, ``predict`` or ``evaluate`` on the CPU backend stays
sparse (``SparseRows.from_scipy``): the NumPy fast step of a ReLU MLP runs its first layer over
the nonzeros alone, and every other step and inference take dense batches of its rows
(``take``), so the whole set is never made dense (100,000 features over 60,000 rows would take
24 GB as float32). ``SparseRows.of`` builds the same from a dense array that is mostly zeros
(MNIST: 19% of the pixels), for the fast step.

A leaf module: NumPy only (the Numba kernels that build from dense arrays are imported on use).
"""

from __future__ import annotations

import math
import sys

import numpy as np

__all__ = ["SparseRows", "is_scipy_sparse"]


def is_scipy_sparse(X) -> bool:
    """Whether ``X`` is a scipy sparse matrix or array (never imports scipy: without it loaded,
    nothing is one)."""
    sparse = sys.modules.get("scipy.sparse")
    return sparse is not None and sparse.issparse(X)


def _pixel_table(dtype):
    """What each byte of uint8 pixels stands for in ``dtype`` (``scale_pixels``'s values)."""
    from .functional import scale_pixels

    return scale_pixels(np.arange(256, dtype=np.uint8), np.dtype(dtype))


class SparseRows:
    """The rows of a 2-D array as a CSR matrix (``indptr``, ``indices``, ``values``).

    ``values`` hold the model's float dtype, or uint8 pixels that stand for ``table[byte]``
    (``scale_pixels``): bytes stay bytes, so MNIST's 9M nonzeros take 3 bytes each (a 16-bit
    column and the byte) instead of 8. Columns are uint16 where there are at most 65,536, else
    int32. Each row's columns ascend, none twice. ``input_shape`` is the shape ``take`` gives
    each row (the model's input shape, of the same number of values).
    """

    def __init__(self, shape, indptr, indices, values, table, input_shape=None):
        self.shape, self.indptr, self.indices, self.values, self.table = shape, indptr, indices, values, table
        self.input_shape = tuple(input_shape) if input_shape is not None else (shape[1],)

    @property
    def dtype(self):
        """The dtype of the rows ``take`` gives."""
        return self.table.dtype if self.values.dtype == np.uint8 else self.values.dtype

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1] - self.indptr[0])

    @staticmethod
    def _column_dtype(d: int):
        return np.uint16 if d <= 1 << 16 else np.int32

    @classmethod
    def from_scipy(cls, X, dtype, input_shape=None):
        """From a scipy sparse matrix or array of floats (kept as ``dtype``) or uint8 pixels.

        Raises TypeError for other dtypes (as dense input: integers are never guessed to be
        pixels or values) and ValueError for NaN or inf among the stored values.
        """
        csr = X.tocsr()
        if not csr.has_canonical_format:  # duplicates summed, columns sorted: as the dense rows
            csr = csr.copy()
            csr.sum_duplicates()
        n, d = csr.shape
        if csr.dtype == np.uint8:
            values, table = np.ascontiguousarray(csr.data), _pixel_table(dtype)
        elif csr.dtype.kind == "f":
            values, table = np.ascontiguousarray(csr.data, dtype=dtype), np.empty(0, dtype)
            finite = np.isfinite(values)
            if not finite.all():
                k = int(np.argmin(finite))
                row = int(np.searchsorted(csr.indptr, k, side="right") - 1)
                raise ValueError(f"X contains NaN or inf (first at row {row}, column {csr.indices[k]}: {values[k]})")
        else:
            raise TypeError(
                f"sparse X has dtype {csr.dtype}: pass floats (used as they are) or uint8 pixels (scaled by 1/255)"
            )
        indptr = np.asarray(csr.indptr, np.int64)
        indices = np.asarray(csr.indices, cls._column_dtype(d))
        return cls((n, d), indptr, indices, values, table, input_shape)

    @classmethod
    def of(cls, X, dtype, parts: int = 1, max_density: float = 1.0):
        """From a dense 2-D NumPy array of floats (their values converted to ``dtype``) or uint8,
        or None where more than ``max_density`` of its values are nonzero. ``parts`` threads
        count and copy the rows. Building it is mostly the page faults of new memory (~40 ms for
        MNIST on the 2-core EPYC): the columns and values take memory that earlier rows (and
        results of the Numba kernels) gave back where there is some of their size
        (``numba_cpu.release_kept_buffers`` frees it). (A float64 value so small that it is 0
        in float32 is kept, as a stored 0.)"""
        if X.dtype not in (np.float32, np.float64, np.uint8):
            raise TypeError(f"sparse rows take float32, float64 or uint8 data, got {X.dtype}")
        from .kernels import numba_cpu

        loops = numba_cpu._get_loops()
        n, d = X.shape
        parts = max(1, min(parts, n))
        counts = np.empty(n, np.int64)
        loops.csr_row_counts(X, counts, parts)
        indptr = np.zeros(n + 1, np.int64)
        np.cumsum(counts, out=indptr[1:])
        nnz = int(indptr[-1])
        if nnz > max_density * X.size:
            return None
        table = _pixel_table(dtype) if X.dtype == np.uint8 else np.empty(0, dtype)
        # (memory that earlier rows gave back where there is some: fresh pages fault on first write)
        indices = numba_cpu._fresh((nnz,), cls._column_dtype(d))
        values = numba_cpu._fresh((nnz,), np.uint8 if X.dtype == np.uint8 else dtype)
        loops.csr_fill(X, indptr, indices, values, parts)
        return cls(X.shape, indptr, indices, values, table)

    def __getitem__(self, key):
        """Rows ``lo:hi`` (a slice of step 1, or ``(slice, ...)``) as SparseRows sharing these arrays."""
        if isinstance(key, tuple) and len(key) == 2 and key[1] is Ellipsis:
            key = key[0]
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError(f"SparseRows take a slice of rows, got {key!r}")
        lo, hi, _ = key.indices(self.shape[0])
        hi = max(lo, hi)
        return SparseRows((hi - lo, self.shape[1]), self.indptr[lo : hi + 1], self.indices, self.values, self.table,
                          self.input_shape)

    def take(self, idx, out=None):
        """Rows ``idx`` as a dense array of shape ``(len(idx), *input_shape)`` (indices out of
        range clip, as ``np.take(mode="clip")``), into ``out`` where given."""
        idx = np.clip(np.asarray(idx, np.int64), 0, self.shape[0] - 1)
        n = idx.shape[0]
        dense = np.zeros((n, self.shape[1]), self.dtype) if out is None else out.reshape(n, self.shape[1])
        if out is not None:
            dense[...] = 0
        starts = self.indptr[idx]
        counts = self.indptr[idx + 1] - starts
        total = int(counts.sum())
        if total:
            ends = np.cumsum(counts)
            # the position of every stored value of these rows: its row's start plus its rank there
            at = np.arange(total) - np.repeat(ends - counts, counts) + np.repeat(starts, counts)
            values = self.values[at] if self.values.dtype != np.uint8 else self.table[self.values[at]]
            dense[np.repeat(np.arange(n), counts), self.indices[at]] = values
        return dense.reshape(n, *self.input_shape)

    def dense(self):
        """All rows, dense (for a chunk of inference rows)."""
        return self.take(np.arange(self.shape[0]))

    def __repr__(self):
        share = self.nnz / max(1, math.prod(self.shape))
        return f"SparseRows(shape={self.shape}, nnz={self.nnz} ({share:.1%}), dtype={self.dtype})"
