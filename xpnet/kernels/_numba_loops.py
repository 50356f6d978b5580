"""The compiled loops behind ``xpnet.kernels.numba_cpu`` (imports numba: import lazily).

Every kernel here writes into arrays its caller allocated and checked; the checks, the choice
of serial or parallel, and the public signatures live in ``numba_cpu``. Each op comes twice:
a serial driver and a ``parallel=True`` one (``prange`` over blocks of rows), because thread
start-up costs more than a small array's whole computation.

Why an exponential of our own: numba (like NumPy here) calls a scalar ``exp`` per element, and
that call, not memory, bounds softmax. ``exp_nonpositive`` is straight-line arithmetic that LLVM
turns into AVX2/FMA code: ``exp(x) = 2**k * exp(r)`` with ``k = round(x / ln 2)``,
``r = x - k ln 2`` (``|r| <= ln2 / 2``; ln 2 split Cody-Waite style, so ``r`` is rounded once),
``exp(r)`` by its Taylor polynomial (degree 12 in float64: truncation < 2e-16; degree 7 in
float32: < 6e-9), and ``2**k`` built from its exponent bits. Softmax only ever needs ``exp`` of
``x - max <= 0``, so only that half-line is handled. Results that fall into the subnormal
range are still produced (gradually, as NumPy does): ``exp(r) * 2**(k + 64)`` is a normal
number, so that product is exact, and the one rounding happens in the final ``* 2**-64``.
"""

from __future__ import annotations

import math
import platform

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

# reassoc lets LLVM vectorize the row sums and maxima; contract fuses multiply-adds. No
# nnan/ninf: NaN and inf inputs must flow through as they do in the reference.
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
# error_model="numpy": a float division is IEEE's (x / 0 is inf), with no zero test and no
# exception path in the loop, which otherwise keeps LLVM from vectorizing any loop that divides
# (Adam's update of a 400 x 120 float32 kernel: 154 us with the test, 21 us without, the same bits)
_JIT = dict(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
_INLINE = dict(cache=True, fastmath=FASTMATH, inline="always", error_model="numpy")

# Rows are processed in blocks of about this many elements: small enough to stay in L1 across
# the block's passes (max, shift, exp, sum and scale), large enough to amortise a loop.
BLOCK_ELEMENTS = 2048


def block_rows(n_cols: int) -> int:
    """Rows per block for rows of ``n_cols`` elements (at least one row)."""
    return max(1, BLOCK_ELEMENTS // max(n_cols, 1))


# --- a vectorizable exp ----------------------------------------------------------------------


@intrinsic
def _pow2(typingctx, k):
    """``2.0 ** k`` for an integer-valued float ``k`` in the normal exponent range, from bits."""
    if not isinstance(k, types.Float):
        return None

    def codegen(context, builder, signature, args):
        (kf,) = args
        width, bias, mantissa_bits = (32, 127, 23) if k.bitwidth == 32 else (64, 1023, 52)
        int_type = ir.IntType(width)
        ki = builder.fptosi(kf, ir.IntType(32))  # cvttps2dq / cvttpd2dq: vectorizes on AVX2
        if width == 64:
            ki = builder.sext(ki, int_type)
        biased = builder.add(ki, ir.Constant(int_type, bias))
        bits = builder.shl(biased, ir.Constant(int_type, mantissa_bits))
        return builder.bitcast(bits, kf.type)

    return k(k), codegen


@intrinsic
def _reduce_ln2(typingctx, x, k, ln2_hi, ln2_lo):
    """``x - k * ln2_hi - k * ln2_lo`` as two fused multiply-adds: the first is exact (``ln2_hi``
    has trailing zero bits), the second rounds once. Written as ``llvm.fma`` calls because numba's
    fastmath puts reassoc on every float operation, and with plain operations LLVM folds the
    two steps into ``x - k * ln2``, losing what splitting ln 2 is for (float64 ``exp(-700)``
    then errs by ~100 ulp instead of ~2)."""
    if not all(isinstance(t, types.Float) and t == x for t in (k, ln2_hi, ln2_lo)):
        return None

    def codegen(context, builder, signature, args):
        x, k, hi, lo = args
        fma = builder.module.declare_intrinsic("llvm.fma", [x.type], ir.FunctionType(x.type, [x.type] * 3))
        minus_k = builder.fneg(k)
        return builder.call(fma, [minus_k, lo, builder.call(fma, [minus_k, hi, x])])

    return x(x, k, ln2_hi, ln2_lo), codegen


@intrinsic
def _maxnum(typingctx, a, b):
    """``llvm.maxnum(a, b)`` with nnan and nsz: the form of a maximum that LLVM's loop vectorizer
    turns into a SIMD reduction. A ``v if v > m else m`` select, with or without fastmath, stays
    a scalar chain of dependent compares (measured: 0.52 ns per element on an AVX-512 Zen 4,
    0.03 ns as maxnum). maxnum returns the other operand where one is NaN."""
    if not (isinstance(a, types.Float) and a == b):
        return None

    def codegen(context, builder, signature, args):
        t = args[0].type
        fn = builder.module.declare_intrinsic("llvm.maxnum", [t], ir.FunctionType(t, [t, t]))
        return builder.call(fn, args, fastmath=("nnan", "nsz"))

    return a(a, b), codegen


def exp_nonpositive(x):
    """``exp(x)`` for ``x <= 0`` (NaN stays NaN), as vectorizable arithmetic. Numba only."""
    raise NotImplementedError("exp_nonpositive runs inside numba-compiled code only")


_F32 = np.float32
_LOG2E_32, _LN2_HI_32, _LN2_LO_32 = _F32(1.442695040888963), _F32(0.693359375), _F32(-2.12194440e-4)
_LOWEST_32 = _F32(-104.0)  # exp(-104) < the smallest float32 subnormal / 2: rounds to 0
_HALF_32 = _F32(0.5)
_C32 = tuple(_F32(1.0 / math.factorial(n)) for n in range(8))
_SHIFT_32, _UNSHIFT_32 = _F32(64.0), _F32(2.0**-64)  # k >= -150 here, so 2**(k + 64) is normal

_LOG2E_64, _LN2_HI_64, _LN2_LO_64 = 1.4426950408889634, 0.6931471803691238, 1.9082149292705877e-10
_LOWEST_64 = -746.0  # exp(-746) < the smallest float64 subnormal / 2: rounds to 0
_C64 = tuple(1.0 / math.factorial(n) for n in range(13))
_SHIFT_64, _UNSHIFT_64 = 64.0, 2.0**-64  # k >= -1077 here, so 2**(k + 64) is normal


@overload(exp_nonpositive, inline="always", fastmath=FASTMATH)
def _exp_nonpositive_impl(x):
    if x == types.float32:
        c0, c1, c2, c3, c4, c5, c6, c7 = _C32

        def exp32(x):
            xc = np.maximum(x, _LOWEST_32)  # NaN-propagating, and no branch for the inliner
            k = np.floor(xc * _LOG2E_32 + _HALF_32)
            r = _reduce_ln2(xc, k, _LN2_HI_32, _LN2_LO_32)
            p = ((((((c7 * r + c6) * r + c5) * r + c4) * r + c3) * r + c2) * r + c1) * r + c0
            return (p * _pow2(k + _SHIFT_32)) * _UNSHIFT_32

        return exp32
    if x == types.float64:
        c = _C64

        def exp64(x):
            xc = np.maximum(x, _LOWEST_64)
            k = np.floor(xc * _LOG2E_64 + 0.5)
            r = _reduce_ln2(xc, k, _LN2_HI_64, _LN2_LO_64)
            p = c[12]
            p = p * r + c[11]
            p = p * r + c[10]
            p = p * r + c[9]
            p = p * r + c[8]
            p = p * r + c[7]
            p = p * r + c[6]
            p = p * r + c[5]
            p = p * r + c[4]
            p = p * r + c[3]
            p = p * r + c[2]
            p = p * r + c[1]
            p = p * r + c[0]
            return (p * _pow2(k + _SHIFT_64)) * _UNSHIFT_64

        return exp64
    return None


# --- pieces of the softmax family, on one block of rows ----------------------------------------
# Each piece takes the block's own slices, so every loop counts from 0: with a start of 0 numba
# can drop its negative-index wraparound, and only then does LLVM vectorize the loop.


@njit(**_INLINE)
def _row_max(row):
    """Maximum of a row, ignoring NaN (a SIMD reduction, see ``_maxnum``). A NaN in the row
    still ends as a NaN softmax row, because ``x - max`` of that element is NaN and so is the
    row's sum; +inf gives ``inf - inf = NaN`` as in the reference."""
    m = row[0]
    for j in range(1, row.shape[0]):
        m = _maxnum(m, row[j])
    return m


@njit(**_INLINE)
def _shift_rows(x, out):
    """``out[i] = x[i] - max(x[i])`` for every row (``x`` may have any strides)."""
    for i in range(x.shape[0]):
        m = _row_max(x[i])
        for j in range(x.shape[1]):
            out[i, j] = x[i, j] - m


@njit(**_INLINE)
def _exp_inplace(flat):
    """``flat[k] = exp(flat[k])`` for values <= 0: one vectorized loop, whatever the row length."""
    for k in range(flat.shape[0]):
        flat[k] = exp_nonpositive(flat[k])


@njit(**_INLINE)
def _row_sum(row):
    s = row.dtype.type(0)
    for j in range(row.shape[0]):
        s += row[j]
    return s


# Rows at least this wide are long enough for one vectorized loop per row; narrower rows go
# through the block-wide flat exp instead (a 10-wide row would leave most vector lanes idle).
WIDE_ROW = 64


@njit(**_INLINE)
def _exp_shifted_row_sum(x_row, out_row):
    """``out_row = exp(x_row - max)``; returns ``(sum, max)``. One read of x, one write of out."""
    m = _row_max(x_row)
    s = out_row.dtype.type(0)
    for j in range(x_row.shape[0]):
        e = exp_nonpositive(x_row[j] - m)
        out_row[j] = e
        s += e
    return s, m


@njit(**_INLINE)
def _softmax_block(x, out, flat):
    """Softmax of the rows of ``x`` into ``out``; ``flat`` is ``out`` seen as one 1-D array."""
    one = out.dtype.type(1)
    if x.shape[1] >= WIDE_ROW:
        for i in range(x.shape[0]):
            row = out[i]
            inv = one / _exp_shifted_row_sum(x[i], row)[0]
            for j in range(row.shape[0]):
                row[j] *= inv
        return
    _shift_rows(x, out)
    _exp_inplace(flat)
    for i in range(out.shape[0]):
        row = out[i]
        inv = one / _row_sum(row)
        for j in range(row.shape[0]):
            row[j] *= inv


@njit(**_INLINE)
def _xent_row_gradient(row, y, s, inv_n):
    """``row`` holds a row's shifted exponentials summing to ``s``: turn it into that row's part
    of the mean loss's gradient, ``(softmax - onehot(y)) * inv_n``."""
    one = row.dtype.type(1)
    inv = one / s
    p_y = row[y] * inv
    scale = inv * inv_n
    for j in range(row.shape[0]):
        row[j] *= scale
    row[y] = (p_y - one) * inv_n


@njit(**_INLINE)
def _softmax_xent_block(x, labels, weights, grad, flat, inv_n):
    """Gradient of the mean loss into ``grad``; returns the block's summed loss (float64).

    ``weights``: empty, or each row's weight (its loss and gradient times it); a weight of 1
    changes no bit of either."""
    weighted = weights.shape[0] > 0
    loss = 0.0
    if x.shape[1] >= WIDE_ROW:
        for i in range(x.shape[0]):
            row = grad[i]
            s, m = _exp_shifted_row_sum(x[i], row)
            w = weights[i] if weighted else 1.0
            loss += w * (math.log(s) - (x[i, labels[i]] - m))
            _xent_row_gradient(row, labels[i], s, weights[i] * inv_n if weighted else inv_n)
        return loss
    _shift_rows(x, grad)
    for i in range(x.shape[0]):
        w = weights[i] if weighted else 1.0
        loss -= w * grad[i, labels[i]]  # -(z_y - max z)
    _exp_inplace(flat)
    for i in range(grad.shape[0]):
        row = grad[i]
        s = _row_sum(row)
        w = weights[i] if weighted else 1.0
        loss += w * math.log(s)
        _xent_row_gradient(row, labels[i], s, weights[i] * inv_n if weighted else inv_n)
    return loss


# --- drivers: serial and parallel over blocks of rows -----------------------------------------


@njit(**_JIT)
def softmax_serial(x, out, flat, rows):
    n, c = x.shape
    for i0 in range(0, n, rows):
        i1 = min(i0 + rows, n)
        _softmax_block(x[i0:i1], out[i0:i1], flat[i0 * c : i1 * c])


@njit(parallel=True, **_JIT)
def softmax_parallel(x, out, flat, rows):
    n, c = x.shape
    for b in prange((n + rows - 1) // rows):
        i0, i1 = b * rows, min(b * rows + rows, n)
        _softmax_block(x[i0:i1], out[i0:i1], flat[i0 * c : i1 * c])


@njit(**_JIT)
def softmax_xent_serial(x, labels, weights, grad, flat, rows):
    """Returns the summed loss (float64); ``grad`` gets the gradient of the mean loss
    (``weights``: empty, or each row's weight; see ``_softmax_xent_block``)."""
    n, c = x.shape
    inv_n = grad.dtype.type(1 / n)
    total = 0.0
    for i0 in range(0, n, rows):
        i1 = min(i0 + rows, n)
        total += _softmax_xent_block(
            x[i0:i1], labels[i0:i1], weights[i0:i1], grad[i0:i1], flat[i0 * c : i1 * c], inv_n
        )
    return total


@njit(parallel=True, **_JIT)
def softmax_xent_parallel(x, labels, weights, grad, flat, rows):
    n, c = x.shape
    n_blocks = (n + rows - 1) // rows
    inv_n = grad.dtype.type(1 / n)
    partial = np.empty(n_blocks, dtype=np.float64)
    for b in prange(n_blocks):
        i0, i1 = b * rows, min(b * rows + rows, n)
        partial[b] = _softmax_xent_block(
            x[i0:i1], labels[i0:i1], weights[i0:i1], grad[i0:i1], flat[i0 * c : i1 * c], inv_n
        )
    return partial.sum()


@njit(**_JIT)
def labels_out_of_range(labels, n_classes):
    """Index of the first label outside [0, n_classes), or -1."""
    for i in range(labels.shape[0]):
        if labels[i] < 0 or labels[i] >= n_classes:
            return i
    return -1


# --- vectors written as LLVM IR --------------------------------------------------------------
# LLVM's vectorizer does a long loop well and a short one badly: a run of 18 or 50 values is
# below its unrolled vector body (64 floats on AVX-512), so it runs all scalar, and a sum kept in
# an array chains every multiply-add through a store and a load. The intrinsics built from these
# helpers emit whole vectors themselves and keep sums in registers; a run that is no multiple of
# the vector ends with a vector that overlaps the one before it (``_vectors``).

VECTOR_BYTES = 64  # one AVX-512 register (two AVX2 ones, which LLVM splits it into)
_I32, _I64 = ir.IntType(32), ir.IntType(64)


def _array_data(context, builder, array_type, array):
    return context.make_array(array_type)(context, builder, array).data


def _operands(context, builder, signature, args):
    """An intrinsic's arguments as its code uses them: an array's data pointer, a scalar itself."""
    return [_array_data(context, builder, t, v) if isinstance(t, types.Array) else v
            for t, v in zip(signature.args, args)]


def _vector_type(context, array_type, nbytes=VECTOR_BYTES):
    """The LLVM vector of ``nbytes`` of the array's elements."""
    return ir.VectorType(context.get_data_type(array_type.dtype), nbytes * 8 // array_type.dtype.bitwidth)


def _vector_pointer(context, builder, array_type, array, index, nbytes=VECTOR_BYTES):
    """``&array[index]`` as a pointer to a vector of ``nbytes`` (1-D C-contiguous array), and
    that vector type."""
    vector = _vector_type(context, array_type, nbytes)
    pointer = builder.gep(_array_data(context, builder, array_type, array), [index])
    return builder.bitcast(pointer, vector.as_pointer()), vector


def _splat(builder, vector, value):
    one = builder.insert_element(ir.Constant(vector, ir.Undefined), value, ir.Constant(_I32, 0))
    zeros = ir.Constant(ir.VectorType(_I32, vector.count), [0] * vector.count)
    return builder.shuffle_vector(one, ir.Constant(vector, ir.Undefined), zeros)


def _vector_suffix(element):
    """LLVM's name for a vector element type in an intrinsic's name: f32, f64, i16, ..."""
    if isinstance(element, ir.FloatType):
        return "f32"
    if isinstance(element, ir.DoubleType):
        return "f64"
    return f"i{element.width}"


def _vector_fma(builder, vector, a, b, c):
    name = f"llvm.fma.v{vector.count}{_vector_suffix(vector.element)}"
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector, [vector] * 3), name)
    return builder.call(fma, [a, b, c])


def _loop_with_sums(builder, lo, hi, first, step):
    """Emit ``for k in [lo, hi): sums = step(k, sums)`` with the vectors ``sums`` held in
    registers from ``first`` on; returns them after the loop (``first`` if it never runs)."""
    entry = builder.block
    loop, done = builder.append_basic_block("sums.loop"), builder.append_basic_block("sums.done")
    builder.cbranch(builder.icmp_signed("<", lo, hi), loop, done)
    builder.position_at_end(loop)
    k = builder.phi(_I64)
    sums = [builder.phi(value.type) for value in first]
    new = step(k, sums)
    k_next = builder.add(k, ir.Constant(_I64, 1))
    body_end = builder.block
    k.add_incoming(lo, entry)
    k.add_incoming(k_next, body_end)
    for acc, a0, a1 in zip(sums, first, new):
        acc.add_incoming(a0, entry)
        acc.add_incoming(a1, body_end)
    builder.cbranch(builder.icmp_signed("<", k_next, hi), loop, done)
    builder.position_at_end(done)
    results = [builder.phi(value.type) for value in first]
    for res, a0, a1 in zip(results, first, new):
        res.add_incoming(a0, entry)
        res.add_incoming(a1, body_end)
    return results


def vector_lanes(dtype) -> int:
    """Elements of ``dtype`` in one vector: the shortest run the vector loops take (the sparse
    first layer's narrowest layer)."""
    return VECTOR_BYTES // np.dtype(dtype).itemsize


@njit(**_INLINE)
def _vectors(width, lanes):
    """Where each vector of a row of ``width`` starts (the last one may overlap the one before),
    and from which lane on each is new (0, or the overlap)."""
    count = (width + lanes - 1) // lanes
    starts = np.empty(count + 3, np.int64)  # + 3: a group of four may read past the last
    firsts = np.zeros(count + 3, np.int64)
    for m in range(count):
        starts[m] = min(m * lanes, width - lanes)
        firsts[m] = m * lanes - starts[m]
    return count, starts, firsts


@intrinsic
def _move_vector(typingctx, src, i, dst, j):
    """``dst[j:j+L] = src[i:i+L]`` for one vector of ``VECTOR_BYTES`` (1-D C arrays)."""
    if not (isinstance(src, types.Array) and isinstance(dst, types.Array) and src.dtype == dst.dtype):
        return None

    def codegen(context, builder, signature, args):
        src_t, _, dst_t, _ = signature.args
        src_v, i_v, dst_v, j_v = args
        source, _ = _vector_pointer(context, builder, src_t, src_v, i_v)
        target, _ = _vector_pointer(context, builder, dst_t, dst_v, j_v)
        align = src_t.dtype.bitwidth // 8
        builder.store(builder.load(source, align=align), target, align=align)
        return context.get_dummy_value()

    return types.void(src, i, dst, j), codegen


@njit(**_INLINE)
def _copy_run(src, i, dst, j, n, lanes):
    """``dst[j:j+n] = src[i:i+n]`` in whole vectors, the last one overlapping (``n >= lanes``):
    a run of 18 values is two vector copies, where a loop would run all 18 as scalars."""
    for k in range(0, n - lanes, lanes):
        _move_vector(src, i + k, dst, j + k)
    _move_vector(src, i + n - lanes, dst, j + n - lanes)


# --- elementwise: ReLU backward and bias + ReLU ------------------------------------------------


@njit(**_INLINE)
def _same_array(a, b):
    """Whether ``a`` and ``b`` are the same memory seen the same way (``out=x`` in place)."""
    return a.ctypes.data == b.ctypes.data and a.strides == b.strides


# In place (``out`` is ``x``), a kernel runs a loop that names the array once: given two names
# for one array, LLVM's runtime overlap check sends the vectorized loop to its scalar fallback
# (bias + ReLU at (128, 50): 2.7 us in place against 1.3 us; ReLU backward 6.5 us against 1.8).


@njit(**_INLINE)
def _relu_backward_row(dy, y, out, in_place):
    zero = dy.dtype.type(0)
    if in_place:
        for j in range(out.shape[0]):
            out[j] = out[j] if y[j] > 0 else zero
    else:
        for j in range(out.shape[0]):
            out[j] = dy[j] if y[j] > 0 else zero


# The flat parallel driver hands each thread chunks of this many elements.
FLAT_CHUNK = 1 << 14


@njit(**_JIT)
def relu_backward_flat_serial(dy, y, out):
    _relu_backward_row(dy, y, out, _same_array(dy, out))


@njit(parallel=True, **_JIT)
def relu_backward_flat_parallel(dy, y, out):
    in_place, n = _same_array(dy, out), dy.shape[0]
    for c in prange((n + FLAT_CHUNK - 1) // FLAT_CHUNK):
        k0, k1 = c * FLAT_CHUNK, min(c * FLAT_CHUNK + FLAT_CHUNK, n)
        _relu_backward_row(dy[k0:k1], y[k0:k1], out[k0:k1], in_place)


@njit(**_JIT)
def relu_backward_2d_serial(dy, y, out):
    in_place = _same_array(dy, out)
    for i in range(dy.shape[0]):
        _relu_backward_row(dy[i], y[i], out[i], in_place)


@njit(parallel=True, **_JIT)
def relu_backward_2d_parallel(dy, y, out):
    in_place = _same_array(dy, out)
    for i in prange(dy.shape[0]):
        _relu_backward_row(dy[i], y[i], out[i], in_place)


# Streaming stores, for outputs too large for the cache: a plain store first reads the line it
# writes into the cache (a fourth stream for ReLU backward's three), and the result evicts data
# that is reused. A non-temporal store writes whole lines to memory, but only as one aligned
# 32-byte vector, which LLVM's vectorizer will not emit from a loop (it cannot prove the
# alignment); these intrinsics emit that vector store themselves.

STREAM_BYTES = 32


def _store_streaming(builder, value, pointer):
    store = builder.store(value, pointer, align=STREAM_BYTES)
    store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))


@intrinsic
def _relu_backward_vector_streaming(typingctx, dy, y, out, i):
    """``out[i:i+L] = dy[i:i+L] where y[i:i+L] > 0 else 0`` for one vector of ``L`` elements,
    stored non-temporally; ``out[i]`` must lie on a ``STREAM_BYTES`` boundary."""
    arrays = (dy, y, out)
    if not all(isinstance(a, types.Array) and a.dtype == dy.dtype for a in arrays):
        return None
    if dy.dtype not in (types.float32, types.float64):
        return None

    def codegen(context, builder, signature, args):
        dy_type, y_type, out_type, _ = signature.args
        dy_v, y_v, out_v, index = args
        dy_ptr, vector = _vector_pointer(context, builder, dy_type, dy_v, index, STREAM_BYTES)
        y_ptr, _ = _vector_pointer(context, builder, y_type, y_v, index, STREAM_BYTES)
        out_ptr, _ = _vector_pointer(context, builder, out_type, out_v, index, STREAM_BYTES)
        itemsize = dy_type.dtype.bitwidth // 8
        zero = ir.Constant(vector, [ir.Constant(vector.element, 0.0)] * vector.count)
        positive = builder.fcmp_ordered(">", builder.load(y_ptr, align=itemsize), zero)
        _store_streaming(builder, builder.select(positive, builder.load(dy_ptr, align=itemsize), zero), out_ptr)
        return context.get_dummy_value()

    return types.void(dy, y, out, i), codegen


@intrinsic
def _copy_vector_streaming(typingctx, src, dst, i):
    """``dst[i:i+L] = src[i:i+L]`` for one vector, stored non-temporally (as above)."""
    if not (isinstance(src, types.Array) and isinstance(dst, types.Array) and src.dtype == dst.dtype):
        return None

    def codegen(context, builder, signature, args):
        src_type, dst_type, _ = signature.args
        src_v, dst_v, index = args
        src_ptr, _ = _vector_pointer(context, builder, src_type, src_v, index, STREAM_BYTES)
        dst_ptr, _ = _vector_pointer(context, builder, dst_type, dst_v, index, STREAM_BYTES)
        _store_streaming(builder, builder.load(src_ptr, align=src_type.dtype.bitwidth // 8), dst_ptr)
        return context.get_dummy_value()

    return types.void(src, dst, i), codegen


@intrinsic
def _fence(typingctx):
    """A full memory fence: streaming stores are weakly ordered, and another thread (or the
    caller after a parallel loop) must see them all."""

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


@njit(**_INLINE)
def _streaming_span(out):
    """``(head, body_end)``: ``out[:head]`` runs up to the first ``STREAM_BYTES`` boundary and
    ``out[head:body_end]`` is whole vectors from there."""
    n, itemsize = out.shape[0], out.itemsize
    head = min(n, (-out.ctypes.data) % STREAM_BYTES // itemsize)
    lanes = STREAM_BYTES // itemsize
    return head, head + (n - head) // lanes * lanes


@njit(**_INLINE)
def _relu_backward_row_streaming(dy, y, out):
    head, body_end = _streaming_span(out)
    _relu_backward_row(dy[:head], y[:head], out[:head], False)
    for i in range(head, body_end, STREAM_BYTES // out.itemsize):
        _relu_backward_vector_streaming(dy, y, out, i)
    _relu_backward_row(dy[body_end:], y[body_end:], out[body_end:], False)
    _fence()


@njit(parallel=True, **_JIT)
def relu_backward_flat_streaming(dy, y, out):
    """``relu_backward_flat_parallel`` with streaming stores, for outputs larger than the cache
    (an element is read before its vector is written, so ``out`` may be ``dy``)."""
    n = dy.shape[0]
    for c in prange((n + FLAT_CHUNK - 1) // FLAT_CHUNK):
        k0, k1 = c * FLAT_CHUNK, min(c * FLAT_CHUNK + FLAT_CHUNK, n)
        _relu_backward_row_streaming(dy[k0:k1], y[k0:k1], out[k0:k1])


@njit(**_INLINE)
def _bias_relu_row(x_row, b, out_row, in_place):
    zero = x_row.dtype.type(0)
    if in_place:
        for j in range(out_row.shape[0]):
            z = out_row[j] + b[j]
            out_row[j] = z if z > 0 else zero
    else:
        for j in range(out_row.shape[0]):
            z = x_row[j] + b[j]
            out_row[j] = z if z > 0 else zero


@njit(**_JIT)
def bias_relu_serial(x, b, out):
    in_place = _same_array(x, out)
    for i in range(x.shape[0]):
        _bias_relu_row(x[i], b, out[i], in_place)


@njit(parallel=True, **_JIT)
def bias_relu_parallel(x, b, out):
    in_place = _same_array(x, out)
    for i in prange(x.shape[0]):
        _bias_relu_row(x[i], b, out[i], in_place)


@njit(parallel=True, **_JIT)
def copy_parallel(src, dst):
    """``dst[:] = src`` on all threads: the memory-copy reference the benchmarks compare to."""
    for k in prange(src.shape[0]):
        dst[k] = src[k]


@njit(parallel=True, **_JIT)
def copy_streaming(src, dst):
    """``dst[:] = src`` on all threads with streaming stores: the copy that moves no more bytes
    than it counts (a plain store reads each destination line first)."""
    n = src.shape[0]
    for c in prange((n + FLAT_CHUNK - 1) // FLAT_CHUNK):
        k0, k1 = c * FLAT_CHUNK, min(c * FLAT_CHUNK + FLAT_CHUNK, n)
        s, d = src[k0:k1], dst[k0:k1]
        head, body_end = _streaming_span(d)
        d[:head] = s[:head]
        for i in range(head, body_end, STREAM_BYTES // d.itemsize):
            _copy_vector_streaming(s, d, i)
        d[body_end:] = s[body_end:]
        _fence()


# --- fused pieces of a NumPy training step (used by ``cpu_step``) ------------------------------


@njit(**_JIT)
def bias_add_inplace(z, b):
    """``z += b`` row by row (the linear output layer's bias)."""
    for i in range(z.shape[0]):
        row = z[i]
        for j in range(row.shape[0]):
            row[j] += b[j]


@njit(**_JIT)
def column_sums(a, out):
    """``out[j] = sum_i a[i, j]`` (rows accumulated in order, in ``a``'s dtype)."""
    for j in range(a.shape[1]):
        out[j] = 0
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            out[j] += a[i, j]


@njit(**_JIT)
def relu_backward_colsum_inplace(dh, y, col_sum):
    """``dh = dh where y > 0 else 0`` in place, and ``col_sum = dh.sum(axis=0)``, row by row.

    Two short loops per row (select, then accumulate) so each one vectorizes; the row is still
    in L1 for the second. One array for input and output, so the loops vectorize (see ``_same_array``).
    """
    zero = dh.dtype.type(0)
    for j in range(dh.shape[1]):
        col_sum[j] = 0
    for i in range(dh.shape[0]):
        row, y_row = dh[i], y[i]
        for j in range(row.shape[0]):
            row[j] = row[j] if y_row[j] > 0 else zero
        for j in range(row.shape[0]):
            col_sum[j] += row[j]


@njit(**_JIT)
def count_argmax_hits(x, labels):
    """How many rows have their first maximum at ``labels[i]`` (``np.argmax`` ties: first wins)."""
    hits = 0
    for i in range(x.shape[0]):
        best = 0
        for j in range(1, x.shape[1]):
            if x[i, j] > x[i, best]:
                best = j
        hits += best == labels[i]
    return hits


@njit(**_JIT)
def loss_head(logits, labels, weights, grad, flat, rows, db):
    """The training step's loss in one call: labels checked, correct predictions counted, the
    fused softmax + cross-entropy gradient into ``grad`` (each row's times its weight, where
    ``weights`` is not empty) and its column sums into ``db``.

    Returns ``(loss_sum, hits, bad)``: ``bad`` is the index of the first label outside
    ``[0, classes)`` (nothing else is computed then), or -1.
    """
    bad = labels_out_of_range(labels, logits.shape[1])
    if bad >= 0:
        return 0.0, 0, bad
    hits = count_argmax_hits(logits, labels)
    loss = softmax_xent_serial(logits, labels, weights, grad, flat, rows)
    column_sums(grad, db)
    return loss, hits, -1


@njit(**_INLINE)
def _clip_row(idx, i, last):
    return min(max(idx[i], 0), last)


@njit(**_JIT)
def take_batch(X, y, idx, x_out, y_out):
    """``x_out[i] = X[idx[i]]`` and ``y_out[i] = y[idx[i]]``, indices clipped to ``[0, len(X))``
    as ``np.take(..., mode="clip")``.

    Four rows are copied side by side: random rows of a large training set are bound by memory
    latency, and four streams in flight gather 128 MNIST rows in ~32 us against ~48 us for
    ``np.take`` (and ~44 us one row at a time) on the 2-core machine. Serial on purpose: a
    ``parallel=True`` gather alone was faster still, but numba's OpenMP workers then spin beside
    OpenBLAS's threads and a whole training step took 8.6 ms instead of 0.33 ms.
    """
    n, last = idx.shape[0], X.shape[0] - 1
    for i in range(n):
        y_out[i] = y[_clip_row(idx, i, last)]
    i = 0
    while i + 4 <= n:
        a, b = X[_clip_row(idx, i, last)], X[_clip_row(idx, i + 1, last)]
        c, d = X[_clip_row(idx, i + 2, last)], X[_clip_row(idx, i + 3, last)]
        oa, ob, oc, od = x_out[i], x_out[i + 1], x_out[i + 2], x_out[i + 3]
        for j in range(a.shape[0]):
            oa[j] = a[j]
            ob[j] = b[j]
            oc[j] = c[j]
            od[j] = d[j]
        i += 4
    while i < n:
        src, dst = X[_clip_row(idx, i, last)], x_out[i]
        for j in range(src.shape[0]):
            dst[j] = src[j]
        i += 1


# no fastmath: the rounding below is exact only as written
@njit(cache=True, nogil=True, error_model="numpy")
def take_pixel_batch(X, y, idx, raw, x_out, y_out):
    """``take_batch`` for uint8 pixels: ``x_out = X[idx] / 255`` in ``x_out``'s dtype, bit for
    bit ``xpnet.functional.scale_pixels`` (tests check all 256 byte values, in both dtypes).

    Two passes: the rows' bytes into ``raw`` (a quarter of the bytes float rows would fetch from
    random places), then one contiguous conversion that vectorizes. 128 MNIST rows, in a loop
    of gathers on the 2-core machine: 25 us, against 37 us for float32 rows and 33 us for a
    single pass that converts while it gathers. A division does not vectorize cheaply, so
    ``u / 255`` is ``q = u * (1/255)`` plus one correction step ``q + (u - 255 q) * (1/255)``,
    which gives the correctly rounded quotient for every byte (``q`` alone misses 126 of the
    256 in float32).
    """
    take_batch(X, y, idx, raw, y_out)
    one, c = x_out.dtype.type(1), x_out.dtype.type(255)
    r = one / c
    src, dst = raw.reshape(-1), x_out.reshape(-1)
    for k in range(dst.shape[0]):
        u = x_out.dtype.type(src[k])
        q = u * r
        dst[k] = q + (u - q * c) * r


# --- optimizer updates in place, one pass, no temporaries (used by ``xpnet.optim``) ----------
# The formulas are ``xpnet.optim``'s, operation by operation in the same order and precision,
# and compiled without fastmath: no fused multiply-add, so each intermediate rounds as NumPy's
# ``p -= lr * g`` does and the result is bit for bit the reference update (tests check it),
# subnormal numbers aside (below).
# Scalars come in already in the parameters' dtype, as NumPy casts a Python float operand.
# One call updates every parameter: ``ps``/``gs`` are tuples of their 1-D views, the state
# arrays are flat buffers holding each parameter's state one after the other, and ``coef[i]``
# holds parameter ``i``'s scalars, starting with the weight decay: ``l2`` (coupled, added to
# the gradient; 0 = none) and ``keep`` (decoupled, ``p *= keep`` first; 1 = none).

_EXACT = dict(cache=True, nogil=True, error_model="numpy")

# Subnormal numbers are flushed to zero inside the updates (the x86 MXCSR's flush-to-zero and
# denormals-are-zero bits, set on entry and restored on exit; nothing else runs in between).
# Where they arise, they take the CPU's slow path: with scikit-learn's epsilon, Adam shrinks an
# always-zero pixel's weights by ~5% a step, their moments turn subnormal after a few epochs and
# the update of 784-50-25-10 went from 29 to 90 us a step. A flushed value is below the smallest
# normal number (1.2e-38 in float32): no other value of an update changes.
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
_MXCSR_FTZ_DAZ = 0x8040


def _mxcsr_access(builder, name, slot):
    pointer = builder.bitcast(slot, ir.IntType(8).as_pointer())
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [pointer.type]), name)
    builder.call(fn, [pointer])


@intrinsic
def _flush_subnormals(typingctx):
    """Set this thread's flush-to-zero and denormals-are-zero modes; returns the previous
    floating-point mode for ``_restore_fp_mode`` (off x86: 0, and nothing changes)."""

    def codegen(context, builder, signature, args):
        if not _X86:
            return ir.Constant(_I32, 0)
        slot = cgutils.alloca_once(builder, _I32)
        _mxcsr_access(builder, "llvm.x86.sse.stmxcsr", slot)
        previous = builder.load(slot)
        builder.store(builder.or_(previous, ir.Constant(_I32, _MXCSR_FTZ_DAZ)), slot)
        _mxcsr_access(builder, "llvm.x86.sse.ldmxcsr", slot)
        return previous

    return types.uint32(), codegen


@intrinsic
def _restore_fp_mode(typingctx, mode):
    """Put back the floating-point mode ``_flush_subnormals`` returned."""
    if mode != types.uint32:
        return None

    def codegen(context, builder, signature, args):
        if _X86:
            slot = cgutils.alloca_once_value(builder, args[0])
            _mxcsr_access(builder, "llvm.x86.sse.ldmxcsr", slot)
        return context.get_dummy_value()

    return types.void(mode), codegen


@njit(**_EXACT)
def _decayed(p, g, k, l2, keep):
    """Element ``k``'s gradient with the coupled decay, and its parameter with the decoupled one."""
    gk, pk = g[k], p[k]
    if l2 != 0:
        gk = gk + l2 * pk
    if keep != 1:
        pk = pk * keep
    return gk, pk


@njit(**_EXACT)
def _parameter_count(ps):
    total = 0
    for i in range(len(ps)):
        total += ps[i].shape[0]
    return total


@njit(**_EXACT)
def _sgd_part(ps, gs, v, coef, momentum, nesterov, t, parts):
    """SGD on part ``t`` of ``parts`` of every parameter (a contiguous slice of each)."""
    at = 0
    for i in range(len(ps)):
        n = ps[i].shape[0]
        lo, hi = _part(n, t, parts)
        p, g = ps[i][lo:hi], gs[i][lo:hi]
        l2, keep, lr = coef[i, 0], coef[i, 1], coef[i, 2]
        if v.shape[0] == 0:
            for k in range(p.shape[0]):
                gk, pk = _decayed(p, g, k, l2, keep)
                p[k] = pk - lr * gk
            continue
        vf = v[at + lo:at + hi]
        for k in range(p.shape[0]):
            gk, pk = _decayed(p, g, k, l2, keep)
            vk = vf[k] * momentum
            vk += gk
            vf[k] = vk
            p[k] = pk - lr * (gk + momentum * vk if nesterov else vk)
        at += n


@njit(**_EXACT)
def _check_velocity(ps, v):
    if v.shape[0] != 0 and v.shape[0] != _parameter_count(ps):
        raise ValueError("the velocity buffer must hold every parameter, or nothing")


@njit(**_EXACT)
def sgd_step(ps, gs, v, coef, momentum, nesterov):
    """``coef[i] = (l2, keep, lr)``. Without momentum (``v`` empty) ``p -= lr * g``; with it
    ``v = momentum * v + g`` and ``p -= lr * (g + momentum * v if nesterov else v)``."""
    _check_velocity(ps, v)
    mode = _flush_subnormals()
    _sgd_part(ps, gs, v, coef, momentum, nesterov, 0, 1)
    _restore_fp_mode(mode)


@njit(parallel=True, **_EXACT)
def sgd_step_parallel(ps, gs, v, coef, momentum, nesterov, parts):
    """``sgd_step`` with every parameter split into ``parts`` slices, one per core (the same
    values: each element's update is its own)."""
    _check_velocity(ps, v)
    for t in prange(parts):
        mode = _flush_subnormals()  # (the mode is each thread's own)
        _sgd_part(ps, gs, v, coef, momentum, nesterov, t, parts)
        _restore_fp_mode(mode)


@njit(**_EXACT)
def _adam_part(ps, gs, m, v, coef, beta1, one_minus_beta1, beta2, one_minus_beta2, t, parts):
    """Adam on part ``t`` of ``parts`` of every parameter (a contiguous slice of each)."""
    at = 0
    for i in range(len(ps)):
        n = ps[i].shape[0]
        lo, hi = _part(n, t, parts)
        p, g = ps[i][lo:hi], gs[i][lo:hi]
        l2, keep, step, bias2, eps = coef[i, 0], coef[i, 1], coef[i, 2], coef[i, 3], coef[i, 4]
        mf, vf = m[at + lo:at + hi], v[at + lo:at + hi]
        for k in range(p.shape[0]):
            gk, pk = _decayed(p, g, k, l2, keep)
            mk = mf[k] * beta1
            mk += one_minus_beta1 * gk
            mf[k] = mk
            vk = vf[k] * beta2
            vk += one_minus_beta2 * (gk * gk)
            vf[k] = vk
            p[k] = pk - step * mk / (np.sqrt(vk / bias2) + eps)
        at += n


@njit(**_EXACT)
def _check_moments(ps, m, v):
    if m.shape[0] != _parameter_count(ps) or v.shape[0] != m.shape[0]:
        raise ValueError("the moment buffers must hold every parameter")


@njit(**_EXACT)
def adam_step(ps, gs, m, v, coef, beta1, one_minus_beta1, beta2, one_minus_beta2):
    """``coef[i] = (l2, keep, step, bias2, eps)``: ``m = b1 m + (1 - b1) g``,
    ``v = b2 v + (1 - b2) g**2``, ``p -= step m / (sqrt(v / bias2) + eps)`` with
    ``step = lr / (1 - b1**t)`` and ``bias2 = 1 - b2**t``."""
    _check_moments(ps, m, v)
    mode = _flush_subnormals()
    _adam_part(ps, gs, m, v, coef, beta1, one_minus_beta1, beta2, one_minus_beta2, 0, 1)
    _restore_fp_mode(mode)


@njit(parallel=True, **_EXACT)
def adam_step_parallel(ps, gs, m, v, coef, beta1, one_minus_beta1, beta2, one_minus_beta2, parts):
    """``adam_step`` with every parameter split into ``parts`` slices, one per core."""
    _check_moments(ps, m, v)
    for t in prange(parts):
        mode = _flush_subnormals()
        _adam_part(ps, gs, m, v, coef, beta1, one_minus_beta1, beta2, one_minus_beta2, t, parts)
        _restore_fp_mode(mode)


# --- convolution and pooling: channels-last images (N, H, W, C), C-contiguous ------------------
# Compiled exactly (``_EXACT``): these loops copy, compare and add in the reference's order, so
# pooling is bit for bit ``xpnet.functional``'s and im2col/col2im feed BLAS the same matrices.
# Each driver loops over the images serially; the parallel drivers further down run it on a
# slice of the images per core (inside a training step that holds BLAS on one thread).


@njit(**_EXACT)
def _im2col_image(x, kh, kw, sh, sw, top, left, oh, ow, cols):
    """The im2col rows of one image ``x`` (H, W, C): row ``p * ow + q`` holds the window at
    output (p, q), pixel by pixel in (i, j) row-major order, each pixel's C channels; padding
    reads as zeros. ``cols`` may have one column more than ``kh * kw * C``: it gets 1 (a bias
    column). A window's row of ``kw`` pixels inside the image is one copy of ``kw * C``
    contiguous values (LeNet's second layer, 64 images: 0.17 ms for the whole im2col, against
    0.24 ms copying pixel by pixel, 6 values at a time)."""
    h, w, c = x.shape
    zero, one = cols.dtype.type(0), cols.dtype.type(1)
    width = kh * kw * c
    span = kw * c  # a window's row of pixels: contiguous in x (C order) and in its im2col row
    lanes = VECTOR_BYTES // cols.itemsize
    for p in range(oh):
        out = cols[p * ow : (p + 1) * ow]
        for i in range(kh):
            r = p * sh + i - top
            if r < 0 or r >= h:
                for q in range(ow):
                    for k in range(i * span, (i + 1) * span):
                        out[q, k] = zero
                continue
            src, pixels = x[r], x[r].reshape(-1)
            for q in range(ow):
                s0 = q * sw - left
                row = out[q]
                if 0 <= s0 and s0 + kw <= w and span >= lanes:  # the window row inside: one copy
                    _copy_run(pixels, s0 * c, row, i * span, span, lanes)
                    continue
                for j in range(kw):
                    base, s = (i * kw + j) * c, s0 + j
                    if 0 <= s < w:
                        for ch in range(c):
                            row[base + ch] = src[s, ch]
                    else:
                        for ch in range(c):
                            row[base + ch] = zero
        if cols.shape[1] > width:
            for q in range(ow):
                out[q, width] = one


@njit(**_EXACT)
def im2col(x, kh, kw, sh, sw, top, left, oh, ow, cols):
    """im2col of images ``x`` (N, H, W, C) into ``cols`` (N * oh * ow, kh * kw * C [+ 1])."""
    per_image = oh * ow
    for b in range(x.shape[0]):
        _im2col_image(x[b], kh, kw, sh, sw, top, left, oh, ow, cols[b * per_image : (b + 1) * per_image])


@njit(**_EXACT)
def _col2im_image(dcols, kh, kw, sh, sw, top, left, oh, ow, dx):
    """``dx`` (H, W, C) = the adjoint of ``_im2col_image``: each column block (i, j) of
    ``dcols`` added onto the pixels it was read from, padding dropped. Blocks are added in
    (i, j) order, every window for each, as ``functional._scatter_windows`` does, so every
    pixel sums its terms in the reference's order."""
    h, w, c = dx.shape
    pixels = dx.reshape(h, w * c)
    flat = dx.reshape(-1)
    for k in range(flat.shape[0]):
        flat[k] = 0
    for i in range(kh):
        for j in range(kw):
            base = (i * kw + j) * c
            for p in range(oh):
                r = p * sh + i - top
                if r < 0 or r >= h:
                    continue
                target = pixels[r]
                for q in range(ow):
                    s = q * sw + j - left
                    if s < 0 or s >= w:
                        continue
                    row = dcols[p * ow + q]
                    for ch in range(c):
                        target[s * c + ch] += row[base + ch]


@njit(**_EXACT)
def col2im(dcols, kh, kw, sh, sw, top, left, oh, ow, dx):
    """col2im of ``dcols`` (N * oh * ow, kh * kw * C) onto ``dx`` (N, H, W, C), overwritten."""
    per_image = oh * ow
    for b in range(dx.shape[0]):
        _col2im_image(dcols[b * per_image : (b + 1) * per_image], kh, kw, sh, sw, top, left, oh, ow, dx[b])


# Pooling runs along whole image rows: for output row p, ``run[m]`` (m over the row's pixels
# from the first window's to the last's, all C channels) takes the window's first offset and
# then each further offset (i, j) as one contiguous, vectorized pass over the row shifted by j
# pixels; every ``sw``-th pixel of ``run`` is then an output. That is ``sw`` times the
# arithmetic of a window-by-window loop, in vector lanes instead of loops C values long
# (LeNet's first pooling, C = 6: ~0.5 ms window by window). Each output still combines its
# window's pixels in row-major order, as the reference does.


@njit(**_EXACT)
def _max_into(run, src):
    """``run = np.maximum(run, src)`` elementwise: a NaN on either side gives NaN."""
    for m in range(run.shape[0]):
        a, v = run[m], src[m]
        t = v if v > a else a  # a NaN ``a`` stays
        run[m] = v if v != v else t


@njit(**_EXACT)
def _add_into(run, src):
    for m in range(run.shape[0]):
        run[m] += src[m]


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _pool(x, kh, kw, sh, sw, y, is_max):
    h, w, c = x.shape[1], x.shape[2], x.shape[3]
    oh, ow = y.shape[1], y.shape[2]
    span = ((ow - 1) * sw + 1) * c
    run = np.empty(span, y.dtype)
    size = y.dtype.type(kh * kw)
    for b in range(x.shape[0]):
        pixels = x[b].reshape(h, w * c)
        rows = y[b].reshape(oh, ow * c)
        for p in range(oh):
            first = pixels[p * sh]
            for m in range(span):
                run[m] = first[m]
            for i in range(kh):
                src = pixels[p * sh + i]
                for j in range(kw):
                    if i == 0 and j == 0:
                        continue
                    if is_max:
                        _max_into(run, src[j * c : j * c + span])
                    else:
                        _add_into(run, src[j * c : j * c + span])
            out = rows[p]
            for q in range(ow):
                for ch in range(c):
                    v = run[q * sw * c + ch]
                    out[q * c + ch] = v if is_max else v / size


@njit(**_EXACT)
def max_pool(x, kh, kw, sh, sw, y):
    """``y[n, p, q] = max`` over the window at (p, q) of ``x`` (N, H, W, C), taken as
    ``np.maximum`` of the window's pixels in row-major order: a NaN anywhere gives NaN."""
    _pool(x, kh, kw, sh, sw, y, True)


@njit(**_EXACT)
def avg_pool(x, kh, kw, sh, sw, y):
    """``y[n, p, q] = (sum of the window's pixels, row-major) / (kh * kw)``, as the reference."""
    _pool(x, kh, kw, sh, sw, y, False)


@njit(**_EXACT)
def _max_pool_backward_apart(dy, x, y, kh, kw, sh, sw, dx):
    """``max_pool_backward`` for windows that do not overlap (strides >= the window): each
    window's pixels written once, a pixel's channels side by side (vector selects, no branch),
    ``0 + dy`` at the pick (as the reference adds into zeros: -0 becomes +0) and 0 elsewhere."""
    oh, ow, c = dy.shape[1], dy.shape[2], dy.shape[3]
    zero = dx.dtype.type(0)
    pick = np.empty(c, dtype=np.int64)  # the offset i * kw + j of each channel's first maximum
    for b in range(dy.shape[0]):
        for p in range(oh):
            for q in range(ow):
                target, g = y[b, p, q], dy[b, p, q]
                for ch in range(c):
                    pick[ch] = -1
                for i in range(kh):
                    for j in range(kw):
                        k, src = i * kw + j, x[b, p * sh + i, q * sw + j]
                        for ch in range(c):
                            pick[ch] = k if pick[ch] < 0 and src[ch] == target[ch] else pick[ch]
                for i in range(kh):
                    for j in range(kw):
                        k, out = i * kw + j, dx[b, p * sh + i, q * sw + j]
                        for ch in range(c):
                            out[ch] = zero + g[ch] if pick[ch] == k else zero


@njit(**_EXACT)
def max_pool_backward(dy, x, y, kh, kw, sh, sw, dx):
    """``dx`` (zeroed here) gets each window's ``dy`` at the first pixel, in row-major window
    order, equal to ``y`` (none if ``y`` is NaN); overlapping windows add, in the reference's
    order (window offset by window offset)."""
    h, w = dx.shape[1], dx.shape[2]
    oh, ow, c = dy.shape[1], dy.shape[2], dy.shape[3]
    apart = sh >= kh and sw >= kw
    flat = dx.reshape(-1)
    if not (apart and sh == kh and sw == kw and oh * sh == h and ow * sw == w):  # unless windows tile dx
        for k in range(flat.shape[0]):
            flat[k] = 0
    if apart:  # cnn_shift's first pooling, 128 images, serially: 1.3 ms, against 7.7 ms for the
        # general loops below (2-core Intel Xeon)
        _max_pool_backward_apart(dy, x, y, kh, kw, sh, sw, dx)
        return
    first = np.empty((oh, ow, c), dtype=np.int64)  # offset i * kw + j of each window's pick
    for b in range(dy.shape[0]):
        xb, yb, dyb, dxb = x[b], y[b], dy[b], dx[b]
        for p in range(oh):
            for q in range(ow):
                for ch in range(c):
                    target, pick = yb[p, q, ch], -1
                    for i in range(kh):
                        for j in range(kw):
                            if pick < 0 and xb[p * sh + i, q * sw + j, ch] == target:
                                pick = i * kw + j
                    first[p, q, ch] = pick
        for i in range(kh):
            for j in range(kw):
                k = i * kw + j
                for p in range(oh):
                    for q in range(ow):
                        for ch in range(c):
                            if first[p, q, ch] == k:
                                dxb[p * sh + i, q * sw + j, ch] += dyb[p, q, ch]


@njit(**_EXACT)
def avg_pool_backward(dy, kh, kw, sh, sw, dx):
    """``dx`` (zeroed here) += ``dy / (kh * kw)`` over every window's pixels. Each output row's
    shares are spread over a row (``spread``, zeros between windows when ``sw`` > 1) and added
    at every window offset (i, j) in order, in one contiguous pass per offset and row: each
    pixel sums its terms in the reference's order (the zeros added change no value: ``dx``
    starts at +0, so it never holds a -0 that + 0 would flip)."""
    h, w, c = dx.shape[1], dx.shape[2], dx.shape[3]
    oh, ow = dy.shape[1], dy.shape[2]
    span = ((ow - 1) * sw + 1) * c
    size = dy.dtype.type(kh * kw)
    spread = np.zeros((oh, span), dtype=dy.dtype)
    flat = dx.reshape(-1)
    for k in range(flat.shape[0]):
        flat[k] = 0
    for b in range(dy.shape[0]):
        shares = dy[b].reshape(oh, ow * c)
        pixels = dx[b].reshape(h, w * c)
        for p in range(oh):
            for q in range(ow):
                for ch in range(c):
                    spread[p, q * sw * c + ch] = shares[p, q * c + ch] / size
        for i in range(kh):
            for j in range(kw):
                for p in range(oh):
                    _add_into(pixels[p * sh + i, j * c : j * c + span], spread[p])


# --- direct convolution along image rows (stride 1 across columns) ------------------------------
# With few channels im2col is a poor trade: LeNet's first layer (C = 1, 6 filters) turns a
# 100 KB batch into a 3.5 MB matrix of 9 columns, and a product 6 columns wide keeps BLAS far
# from its peak. Here an output row of OW pixels x F filters is one contiguous run of OW * F
# values, and so is every term added to it once each input value is repeated F times
# (``expanded``) and each kernel tap tiled OW times (``tiled``):
#     y[p, :] += expanded[r, c, j * F : j * F + OW * F] * tiled[i, j, c, :]
# one vectorized multiply-add loop per tap (i, j, c). The same runs give the kernel gradient.


def _pairs_dot(count):
    """An intrinsic: ``out[o + s] = init[i + s] + sum over k < n of a[a_at[k] + s] * b[b_at[k] + s]``
    for the ``count`` vectors starting at ``starts[0..count)`` (flat arrays of one float dtype).
    Every ``init`` vector is read before any ``out`` one is written, so ``out`` may be ``init``."""

    @intrinsic
    def pairs_dot(typingctx, a, a_at, b, b_at, n, starts, out, o, init, i):
        arrays = (a, b, out, init)
        if not all(isinstance(t, types.Array) and t.dtype == a.dtype for t in arrays):
            return None
        if a.dtype not in (types.float32, types.float64):
            return None

        def codegen(context, builder, signature, args):
            a_p, aa_p, b_p, ba_p, n_v, st_p, out_p, o_v, init_p, i_v = _operands(context, builder, signature, args)
            vector = _vector_type(context, signature.args[0])
            align = signature.args[0].dtype.bitwidth // 8
            at = lambda base, offset: builder.bitcast(builder.gep(base, [offset]), vector.as_pointer())  # noqa: E731
            starts = [builder.load(builder.gep(st_p, [ir.Constant(_I64, m)])) for m in range(count)]
            first = [builder.load(at(init_p, builder.add(i_v, s)), align=align) for s in starts]

            def step(k, sums):
                a_k, b_k = builder.load(builder.gep(aa_p, [k])), builder.load(builder.gep(ba_p, [k]))
                return [
                    _vector_fma(builder, vector, builder.load(at(a_p, builder.add(a_k, s)), align=align),
                                builder.load(at(b_p, builder.add(b_k, s)), align=align), acc)
                    for s, acc in zip(starts, sums)
                ]

            for s, res in zip(starts, _loop_with_sums(builder, ir.Constant(_I64, 0), n_v, first, step)):
                builder.store(res, at(out_p, builder.add(o_v, s)), align=align)
            return context.get_dummy_value()

        return types.void(a, a_at, b, b_at, n, starts, out, o, init, i), codegen

    return pairs_dot


_pairs_dot_1, _pairs_dot_2, _pairs_dot_3, _pairs_dot_4 = (_pairs_dot(count) for count in (1, 2, 3, 4))


# A convolution's taps in registers: for one vector of an output row, its kernel vectors are the
# same in every output row of an image, so this keeps all of them (``taps``, a constant of the
# compiled code) in registers and walks the rows, each row loading only its input vectors: half
# the loads of ``_pairs_dot``, which reads both operands of every multiply-add. The sums are
# the same multiply-adds in the same order, so the results are ``_pairs_dot``'s, bit for bit.
# The kernel gradient keeps its nine sums in registers likewise (``_rows_taps_gradient``).

def _rows_times_taps(taps):
    """An intrinsic: for ``p < rows``, ``out[o + p * o_step + s] = init[i + s] + sum over t of
    e[e_at[t] + p * e_step + s] * k[k_at[t] + s]`` (one vector at ``s``; flat arrays)."""

    @intrinsic
    def rows_times_taps(typingctx, e, e_at, e_step, k, k_at, s, rows, out, o, o_step, init, i):
        if not all(isinstance(t, types.Array) and t.dtype == e.dtype for t in (e, k, out, init)):
            return None

        def codegen(context, builder, signature, args):
            e_p, ea_p, es_v, k_p, ka_p, s_v, rows_v, out_p, o_v, os_v, init_p, i_v = _operands(
                context, builder, signature, args)
            vector = _vector_type(context, signature.args[0])
            align = signature.args[0].dtype.bitwidth // 8
            at = lambda base, offset: builder.bitcast(builder.gep(base, [offset]), vector.as_pointer())  # noqa: E731
            index = lambda p, t: builder.load(builder.gep(p, [ir.Constant(_I64, t)]))  # noqa: E731
            e_at = [builder.add(index(ea_p, t), s_v) for t in range(taps)]
            kernel = [builder.load(at(k_p, builder.add(index(ka_p, t), s_v)), align=align) for t in range(taps)]
            first = builder.load(at(init_p, builder.add(i_v, s_v)), align=align)

            def step(p, _):
                row, acc = builder.mul(p, es_v), first
                for t in range(taps):
                    acc = _vector_fma(builder, vector, builder.load(at(e_p, builder.add(row, e_at[t])), align=align),
                                      kernel[t], acc)
                builder.store(acc, at(out_p, builder.add(builder.add(o_v, builder.mul(p, os_v)), s_v)), align=align)
                return []

            _loop_with_sums(builder, ir.Constant(_I64, 0), rows_v, [], step)
            return context.get_dummy_value()

        return types.void(e, e_at, e_step, k, k_at, s, rows, out, o, o_step, init, i), codegen

    return rows_times_taps


#: the tap count (kh * kw * C) whose kernel vectors the direct convolution keeps in registers:
#: a 3x3 kernel over one channel, as image models' first layers have (LeNet-5's)
TAPS_IN_REGISTERS = 9
_rows_times_9_taps = _rows_times_taps(TAPS_IN_REGISTERS)


def _rows_taps_gradient(taps):
    """An intrinsic, the kernel gradient of ``_rows_times_taps``: for one vector at ``s``,
    ``dt[dt_at[t] + s] += sum over p < rows of e[e_at[t] + p * e_step + s] * g'[p]`` for each
    ``t < taps`` and ``dbias[s] += sum over p of g'[p]``, where ``g'[p]`` is ``g[g_at + p * g_step
    + s]`` with its lanes below ``first`` zeroed (a row's last vector overlaps the one before:
    those lanes are summed there). The ``taps + 1`` sums stay in registers over the rows, each
    row's gradient vector loaded once for all of them (one MNIST image through LeNet-5's first
    layer, cache warm: 2.9 us against 3.3 us loading both operands of every multiply-add, the
    same sums in the same order)."""

    @intrinsic
    def rows_taps_gradient(typingctx, e, e_at, e_step, g, g_at, g_step, s, first, rows, dt, dt_at, dbias):
        if not all(isinstance(a, types.Array) and a.dtype == e.dtype for a in (e, g, dt, dbias)):
            return None

        def codegen(context, builder, signature, args):
            e_p, ea_p, es_v, g_p, ga_v, gs_v, s_v, first_v, rows_v, dt_p, dta_p, db_p = _operands(
                context, builder, signature, args)
            vector = _vector_type(context, signature.args[0])
            align = signature.args[0].dtype.bitwidth // 8
            at = lambda base, offset: builder.bitcast(builder.gep(base, [offset]), vector.as_pointer())  # noqa: E731
            index = lambda p, t: builder.load(builder.gep(p, [ir.Constant(_I64, t)]))  # noqa: E731
            e_at = [builder.add(index(ea_p, t), s_v) for t in range(taps)]
            dt_at = [builder.add(index(dta_p, t), s_v) for t in range(taps)]
            lane_numbers = ir.Constant(ir.VectorType(_I64, vector.count), list(range(vector.count)))
            new = builder.icmp_signed(">=", lane_numbers, _splat(builder, lane_numbers.type, first_v))
            zero = ir.Constant(vector, [0.0] * vector.count)
            first = [builder.load(at(dt_p, a), align=align) for a in dt_at] + [builder.load(at(db_p, s_v), align=align)]
            g_s = builder.add(ga_v, s_v)

            def row(p, sums):
                grad = builder.load(at(g_p, builder.add(g_s, builder.mul(p, gs_v))), align=align)
                grad = builder.select(new, grad, zero)
                e_row = builder.mul(p, es_v)
                return [_vector_fma(builder, vector, builder.load(at(e_p, builder.add(e_row, e_at[t])), align=align),
                                    grad, sums[t]) for t in range(taps)] + [builder.fadd(sums[taps], grad)]

            totals = _loop_with_sums(builder, ir.Constant(_I64, 0), rows_v, first, row)
            for where, total in zip(dt_at, totals):
                builder.store(total, at(dt_p, where), align=align)
            builder.store(totals[taps], at(db_p, s_v), align=align)
            return context.get_dummy_value()

        return types.void(e, e_at, e_step, g, g_at, g_step, s, first, rows, dt, dt_at, dbias), codegen

    return rows_taps_gradient


_rows_9_taps_gradient = _rows_taps_gradient(TAPS_IN_REGISTERS)


@njit(**_EXACT)
def shift_images(x, down, right, y):
    """``y[k, i, j] = x[k, i - down[k], j - right[k]]`` where that pixel exists, else 0
    (``xpnet.functional.shift_images``): each output row is a run of one input row, copied in
    whole vectors (``_copy_run``), between zeros. An offset past the image's size is clipped to
    it (all zeros either way; no sum below can overflow)."""
    h, w, c = x.shape[1], x.shape[2], x.shape[3]
    flat_x, flat_y = x.reshape(-1), y.reshape(-1)
    zero, lanes, row_size = y.dtype.type(0), VECTOR_BYTES // y.itemsize, w * c
    for k in range(x.shape[0]):
        rows, cols = min(max(down[k], -h), h), min(max(right[k], -w), w)
        lo, hi = max(cols, 0), min(w + cols, w)  # the output columns that have a source pixel
        for i in range(h):
            o, source = (k * h + i) * row_size, i - rows
            if source < 0 or source >= h or lo >= hi:
                for j in range(o, o + row_size):
                    flat_y[j] = zero
                continue
            start, n = (k * h + source) * row_size + (lo - cols) * c, (hi - lo) * c
            for j in range(o, o + lo * c):
                flat_y[j] = zero
            if n >= lanes:
                _copy_run(flat_x, start, flat_y, o + lo * c, n, lanes)
            else:
                for j in range(n):
                    flat_y[o + lo * c + j] = flat_x[start + j]
            for j in range(o + hi * c, o + row_size):
                flat_y[j] = zero


@njit(**_INLINE)
def _vector_group(count, m):
    """How many vectors from ``m`` on one call takes: at most 4, and never the overlapping last
    vector without the one it overlaps (a call reads all its ``init`` before it writes)."""
    left = count - m
    return 3 if left == 5 else min(left, 4)


@njit(**_INLINE)
def _pairs_dot_row(a, a_at, b, b_at, n, count, starts, out, o, init, i):
    """``_pairs_dot`` over all ``count`` vectors of a row, four at a time."""
    m = 0
    while m < count:
        group = _vector_group(count, m)
        at = starts[m:]
        if group == 4:
            _pairs_dot_4(a, a_at, b, b_at, n, at, out, o, init, i)
        elif group == 3:
            _pairs_dot_3(a, a_at, b, b_at, n, at, out, o, init, i)
        elif group == 2:
            _pairs_dot_2(a, a_at, b, b_at, n, at, out, o, init, i)
        else:
            _pairs_dot_1(a, a_at, b, b_at, n, at, out, o, init, i)
        m += group


def _splat_store(nbytes):
    """An intrinsic: ``dst[j:j+L] = value`` for one vector of ``nbytes`` (a 1-D C array)."""

    @intrinsic
    def splat_store(typingctx, dst, j, value):
        if not (isinstance(dst, types.Array) and dst.dtype == value):
            return None

        def codegen(context, builder, signature, args):
            dst_t = signature.args[0]
            target, vector = _vector_pointer(context, builder, dst_t, args[0], args[1], nbytes)
            builder.store(_splat(builder, vector, args[2]), target, align=dst_t.dtype.bitwidth // 8)
            return context.get_dummy_value()

        return types.void(dst, j, value), codegen

    return splat_store


_splat_vector, _splat_half = _splat_store(VECTOR_BYTES), _splat_store(VECTOR_BYTES // 2)


@njit(**_JIT)
def _expand_rows(x, left, f, expanded):
    """``expanded[r, c, t] = x[r, t // f - left, c]``, or 0 where that column is padding: each
    input value repeated F times, as one store of a vector of it per value (half a vector for
    F up to half its lanes: fewer stores across two cache lines), each store's excess lanes
    overwritten by the next value's. One MNIST image with F = 6: 0.38 us, against 1.1 us as a
    gather that LLVM vectorized and 1.2 us with a loop over each value's vectors."""
    h, w, c = x.shape
    width = expanded.shape[2]
    columns, lanes = width // f, VECTOR_BYTES // expanded.itemsize
    stores = (f + lanes - 1) // lanes  # vectors per value (more than one for F above the lanes)
    span = lanes // 2 if 2 * f <= lanes else stores * lanes  # what a value's stores cover
    whole = min(columns, max(0, (width - span) // f + 1))  # the columns whose stores fit the row
    zero = expanded.dtype.type(0)
    for r in range(h):
        pixels = x[r]
        for ch in range(c):
            row = expanded[r, ch]
            if 2 * f <= lanes:
                for q in range(whole):
                    s = q - left
                    _splat_half(row, q * f, pixels[s, ch] if 0 <= s < w else zero)
            elif f <= lanes:
                for q in range(whole):
                    s = q - left
                    _splat_vector(row, q * f, pixels[s, ch] if 0 <= s < w else zero)
            else:
                for q in range(whole):
                    s = q - left
                    value = pixels[s, ch] if 0 <= s < w else zero
                    for k in range(stores):
                        _splat_vector(row, q * f + k * lanes, value)
            for q in range(whole, columns):  # the row's last values: no store past its end
                s = q - left
                value = pixels[s, ch] if 0 <= s < w else zero
                for m in range(q * f, (q + 1) * f):
                    row[m] = value


@njit(**_INLINE)
def _relu_inplace(values):
    """``max(v, 0)`` as ``xpnet.functional.relu`` (NaN gives 0), on one image's output while it
    is in cache: the ReLU after a convolution without a pass over the batch of its own. (``v``
    where ``v > 0``: ReLU's backward taken through itself.)"""
    _relu_backward_row(values, values, values, True)


@njit(**_JIT)
def conv2d_rows(x, tiled, bias_row, relu, sh, top, left, expanded, y):
    """``y`` (N, OH, OW, F) = the convolution of ``x`` (N, H, W, C) at column stride 1 and row
    stride ``sh``; ``tiled`` (kh, kw, C, OW * F) is the kernel tiled OW times, ``bias_row``
    (OW * F) the bias tiled likewise (zeros for none), ``relu``: ReLU applied; ``expanded`` is (H,
    C, padded W * F) scratch.
    An output row of at least one vector is summed in registers over its taps (``_pairs_dot``),
    else in memory."""
    n, h = x.shape[0], x.shape[1]
    kh, kw, c, run = tiled.shape
    oh, f, width = y.shape[1], y.shape[3], expanded.shape[2]
    count, starts, _ = _vectors(max(run, 1), VECTOR_BYTES // y.itemsize)
    in_registers = run * y.itemsize >= VECTOR_BYTES
    flat_e, flat_t, flat_y = expanded.reshape(-1), tiled.reshape(-1), y.reshape(-1)
    a_at, b_at = np.empty(kh * kw * c, np.int64), np.empty(kh * kw * c, np.int64)
    # every output row sees every tap (no padding rows): the kernel's vectors stay in registers
    whole = in_registers and kh * kw * c == TAPS_IN_REGISTERS and top == 0 and (oh - 1) * sh + kh <= h
    if whole:
        for i in range(kh):
            for j in range(kw):
                for ch in range(c):
                    t = (i * kw + j) * c + ch
                    a_at[t], b_at[t] = (i * c + ch) * width + j * f, t * run
    for b in range(n):
        _expand_rows(x[b], left, f, expanded)
        if whole:
            for m in range(count):
                _rows_times_9_taps(flat_e, a_at, sh * c * width, flat_t, b_at, starts[m], oh, flat_y, b * oh * run,
                                   run, bias_row, 0)
        else:
            rows = y[b].reshape(oh, run)
            for p in range(oh):
                taps = 0  # the taps that fall inside the image: their rows of expanded and of tiled
                for i in range(kh):
                    r = p * sh + i - top
                    if r < 0 or r >= h:
                        continue
                    for j in range(kw):
                        for ch in range(c):
                            a_at[taps] = (r * c + ch) * width + j * f
                            b_at[taps] = ((i * kw + j) * c + ch) * run
                            taps += 1
                if in_registers:
                    _pairs_dot_row(flat_e, a_at, flat_t, b_at, taps, count, starts, flat_y, (b * oh + p) * run,
                                   bias_row, 0)
                    continue
                acc = rows[p]
                for m in range(run):
                    acc[m] = bias_row[m]
                for k in range(taps):
                    for m in range(run):
                        acc[m] += flat_e[a_at[k] + m] * flat_t[b_at[k] + m]
        if relu:
            _relu_inplace(flat_y[b * oh * run : (b + 1) * oh * run])


@njit(**_JIT)
def conv2d_rows_grads(dy, relu_y, x, sh, top, left, expanded, dtiled, dbias_row):
    """The kernel and bias gradients of ``conv2d_rows``, per output column: ``dtiled`` (kh, kw,
    C, OW * F) and ``dbias_row`` (OW * F), both overwritten; the caller sums over the OW columns.
    With ``relu_y`` (the ReLU's output after the convolution; no images: none), ``dy`` is
    taken through the ReLU first, an image at a time into a scratch that stays in cache,
    instead of a pass over the whole batch (``relu_backward``) whose result is read back.
    Each tap's gradient row is summed over an image's output rows in registers (``_pairs_dot``)
    where a row is at least one vector, else in memory."""
    n, h = x.shape[0], x.shape[1]
    kh, kw, c, run = dtiled.shape
    oh, f, width = dy.shape[1], dy.shape[3], expanded.shape[2]
    count, starts, firsts = _vectors(max(run, 1), VECTOR_BYTES // dy.itemsize)
    in_registers = run * dy.itemsize >= VECTOR_BYTES
    flat_e, flat_dy, flat_dt = expanded.reshape(-1), dy.reshape(-1), dtiled.reshape(-1)
    flat_dt[:] = 0
    dbias_row[:] = 0
    relu = relu_y.shape[0] > 0
    through_relu = np.empty(oh * run if relu else 0, dy.dtype)
    a_at, b_at = np.empty(max(oh, kh * kw * c), np.int64), np.empty(max(oh, kh * kw * c), np.int64)
    # as in conv2d_rows: every output row sees every tap, whose sums then stay in registers
    whole = in_registers and kh * kw * c == TAPS_IN_REGISTERS and top == 0 and (oh - 1) * sh + kh <= h
    if whole:
        for i in range(kh):
            for j in range(kw):
                for ch in range(c):
                    t = (i * kw + j) * c + ch
                    a_at[t], b_at[t] = (i * c + ch) * width + j * f, t * run
    for b in range(n):
        _expand_rows(x[b], left, f, expanded)
        grads, at = flat_dy, b * oh * run  # this image's gradient rows: grads[at + p * run :][:run]
        if relu:
            _relu_backward_row(dy[b].reshape(-1), relu_y[b].reshape(-1), through_relu, False)
            grads, at = through_relu, 0
        if whole:
            for m in range(count):
                _rows_9_taps_gradient(flat_e, a_at, sh * c * width, grads, at, run, starts[m], firsts[m], oh, flat_dt,
                                      b_at, dbias_row)
            continue
        for p in range(oh):
            for m in range(run):
                dbias_row[m] += grads[at + p * run + m]
        for i in range(kh):
            for j in range(kw):
                for ch in range(c):
                    used = 0  # the output rows this tap saw inside the image
                    for p in range(oh):
                        r = p * sh + i - top
                        if 0 <= r < h:
                            a_at[used] = (r * c + ch) * width + j * f
                            b_at[used] = at + p * run
                            used += 1
                    tap = ((i * kw + j) * c + ch) * run
                    if in_registers:
                        _pairs_dot_row(flat_e, a_at, grads, b_at, used, count, starts, flat_dt, tap, flat_dt, tap)
                        continue
                    for k in range(used):
                        for m in range(run):
                            flat_dt[tap + m] += flat_e[a_at[k] + m] * grads[b_at[k] + m]


# --- direct convolution with the filters as vectors (F a multiple of the vector) -------------------
# LeNet-5's second layer (6 channels, 16 filters) as im2col + BLAS: a (N*OH*OW, 54) @ (54, 16)
# product, too thin for BLAS's blocking, after a pass that writes the 54 columns. Here each
# output pixel's 16 filters are one vector: a tap (one input value) is one broadcast and one
# multiply-add into it, four pixels side by side sharing each kernel vector they load
# (64 images, one thread, Intel Xeon: forward 0.14 ms against 0.48, kernel gradient 0.12 against
# 0.51 with its im2col).

#: output pixels whose sums one call keeps in registers (a row's last group overlaps the one
#: before: each call writes its pixels whole, so a pixel computed twice is written twice alike)
PIXELS_IN_REGISTERS = 4


@intrinsic
def _pixels_times_kernel(typingctx, x, x_at, x_step, row_step, rows, run, k, k_at, k_step, bias, b_at, out, o_at,
                         o_step):
    """For ``p < PIXELS_IN_REGISTERS``: ``out[o_at + p * o_step :][:L] = bias[b_at:][:L] + sum
    over i < rows, t < run of x[x_at + p * x_step + i * row_step + t] * k[k_at + (i * run + t) *
    k_step :][:L]`` (one vector of L filters; flat C arrays). A pixel's window is ``rows`` runs
    of ``run`` contiguous values (kw * C, channels-last), one per kernel row."""
    if not all(isinstance(a, types.Array) and a.dtype == x.dtype for a in (x, k, bias, out)):
        return None

    def codegen(context, builder, signature, args):
        x_p, xa, xs, rs, rows_v, run_v, k_p, ka, ks, b_p, ba, out_p, oa, os_ = _operands(
            context, builder, signature, args)
        vector = _vector_type(context, signature.args[0])
        align = signature.args[0].dtype.bitwidth // 8
        at = lambda base, offset: builder.bitcast(builder.gep(base, [offset]), vector.as_pointer())  # noqa: E731
        pixel = [builder.add(xa, builder.mul(ir.Constant(_I64, p), xs)) for p in range(PIXELS_IN_REGISTERS)]

        def kernel_row(i, sums):
            x_row = builder.mul(i, rs)
            k_row = builder.add(ka, builder.mul(builder.mul(i, run_v), ks))

            def tap(t, sums):
                kernel = builder.load(at(k_p, builder.add(k_row, builder.mul(t, ks))), align=align)
                x_t = builder.add(x_row, t)
                return [_vector_fma(builder, vector, _splat(builder, vector, builder.load(
                    builder.gep(x_p, [builder.add(start, x_t)]))), kernel, acc) for start, acc in zip(pixel, sums)]

            return _loop_with_sums(builder, ir.Constant(_I64, 0), run_v, sums, tap)

        first = builder.load(at(b_p, ba), align=align)
        sums = _loop_with_sums(builder, ir.Constant(_I64, 0), rows_v, [first] * PIXELS_IN_REGISTERS, kernel_row)
        for p, acc in enumerate(sums):
            builder.store(acc, at(out_p, builder.add(oa, builder.mul(ir.Constant(_I64, p), os_))), align=align)
        return context.get_dummy_value()

    return types.void(x, x_at, x_step, row_step, rows, run, k, k_at, k_step, bias, b_at, out, o_at, o_step), codegen


def _taps_gradient(taps):
    """An intrinsic: ``dk[dk_at + t * dk_step :][:L] += sum over r < oh, s < ow of
    x[x_at + r * x_row + s * x_col + t] * dy[dy_at + (r * ow + s) * dy_step :][:L]`` for
    ``t < taps`` (one image's share of ``taps`` kernel rows, their vectors in registers)."""

    @intrinsic
    def taps_gradient(typingctx, x, x_at, x_row, x_col, oh, ow, dy, dy_at, dy_step, dk, dk_at, dk_step):
        if not all(isinstance(a, types.Array) and a.dtype == x.dtype for a in (x, dy, dk)):
            return None

        def codegen(context, builder, signature, args):
            x_p, xa, xr, xc, oh_v, ow_v, dy_p, da, ds, dk_p, ka, ks = _operands(context, builder, signature, args)
            vector = _vector_type(context, signature.args[0])
            align = signature.args[0].dtype.bitwidth // 8
            at = lambda base, offset: builder.bitcast(builder.gep(base, [offset]), vector.as_pointer())  # noqa: E731
            rows_of_dk = [builder.add(ka, builder.mul(ir.Constant(_I64, t), ks)) for t in range(taps)]

            def output_row(r, sums):
                x_r = builder.add(xa, builder.mul(r, xr))
                dy_r = builder.add(da, builder.mul(builder.mul(r, ow_v), ds))

                def output_pixel(s, sums):
                    grad = builder.load(at(dy_p, builder.add(dy_r, builder.mul(s, ds))), align=align)
                    x_s = builder.add(x_r, builder.mul(s, xc))
                    return [_vector_fma(builder, vector, _splat(builder, vector, builder.load(
                        builder.gep(x_p, [builder.add(x_s, ir.Constant(_I64, t))]))), grad, acc)
                        for t, acc in enumerate(sums)]

                return _loop_with_sums(builder, ir.Constant(_I64, 0), ow_v, sums, output_pixel)

            first = [builder.load(at(dk_p, row), align=align) for row in rows_of_dk]
            for row, acc in zip(rows_of_dk, _loop_with_sums(builder, ir.Constant(_I64, 0), oh_v, first, output_row)):
                builder.store(acc, at(dk_p, row), align=align)
            return context.get_dummy_value()

        return types.void(x, x_at, x_row, x_col, oh, ow, dy, dy_at, dy_step, dk, dk_at, dk_step), codegen

    return taps_gradient


_taps_gradient_8, _taps_gradient_6, _taps_gradient_4, _taps_gradient_3, _taps_gradient_2, _taps_gradient_1 = (
    _taps_gradient(t) for t in (8, 6, 4, 3, 2, 1))


@njit(**_INLINE)
def _channel_block(c):
    """The channels one gradient call takes (its kernel rows in registers): the most of 8, 6,
    4, 3, 2, 1 that divides ``c``."""
    for block in (8, 6, 4, 3, 2):
        if c % block == 0:
            return block
    return 1


@njit(**_JIT)
def conv2d_filter_vectors(x, kernel, bias, relu, sh, sw, y):
    """``y = conv2d(x, kernel) + bias`` (then ReLU, with ``relu``) with no padding (``x`` padded
    already), the F filters a multiple of one vector, at least ``PIXELS_IN_REGISTERS`` output
    columns."""
    n, h, w, c = x.shape
    kh, kw, _, f = kernel.shape
    oh, ow = y.shape[1], y.shape[2]
    lanes = VECTOR_BYTES // x.itemsize
    xf, kf, yf = x.reshape(-1), kernel.reshape(-1), y.reshape(-1)
    run, row_step, x_step = kw * c, w * c, sw * c
    for b in range(n):
        for r in range(oh):
            x_row = (b * h + r * sh) * row_step
            o_row = (b * oh + r) * ow * f
            for group in range(0, ow, PIXELS_IN_REGISTERS):
                s = min(group, ow - PIXELS_IN_REGISTERS)  # the first output column of the group
                for v in range(0, f, lanes):
                    _pixels_times_kernel(xf, x_row + s * x_step, x_step, row_step, kh, run, kf, v, f, bias, v,
                                         yf, o_row + s * f + v, f)
        if relu:
            _relu_inplace(yf[b * oh * ow * f : (b + 1) * oh * ow * f])


@njit(**_JIT)
def conv2d_filter_vectors_grad(x, dy, relu_y, sh, sw, dkernel, dbias):
    """``dkernel`` and ``dbias`` of ``conv2d_filter_vectors`` (its ``dy`` C-contiguous), summed
    over images; the bias's sums while each image's ``dy`` is in cache (a pass of its own over
    the batch took 0.04 ms of LeNet-5's second layer on 128 images). With ``relu_y`` (no images:
    none), ``dy`` is taken through that ReLU an image at a time, as ``conv2d_rows_grads`` does."""
    n, h, w, c = x.shape
    kh, kw, _, f = dkernel.shape
    oh, ow = dy.shape[1], dy.shape[2]
    lanes = VECTOR_BYTES // x.itemsize
    xf, dyf, dkf = x.reshape(-1), dy.reshape(-1), dkernel.reshape(-1)
    dkf[:] = 0
    dbias[:] = 0
    relu = relu_y.shape[0] > 0
    through_relu = np.empty(oh * ow * f if relu else 0, dy.dtype)
    block = _channel_block(c)
    for b in range(n):
        grads, at = dyf, b * oh * ow * f  # this image's gradient: grads[at:][:oh * ow * f]
        if relu:
            _relu_backward_row(dy[b].reshape(-1), relu_y[b].reshape(-1), through_relu, False)
            grads, at = through_relu, 0
        for pixel in range(oh * ow):
            for k in range(f):
                dbias[k] += grads[at + pixel * f + k]
        for i in range(kh):
            for j in range(kw):
                for c0 in range(0, c, block):
                    x_at, k_at = ((b * h + i) * w + j) * c + c0, ((i * kw + j) * c + c0) * f
                    for v in range(0, f, lanes):
                        args = (xf, x_at, sh * w * c, sw * c, oh, ow, grads, at + v, f, dkf, k_at + v, f)
                        if block == 8:
                            _taps_gradient_8(*args)
                        elif block == 6:
                            _taps_gradient_6(*args)
                        elif block == 4:
                            _taps_gradient_4(*args)
                        elif block == 3:
                            _taps_gradient_3(*args)
                        elif block == 2:
                            _taps_gradient_2(*args)
                        else:
                            _taps_gradient_1(*args)



# --- a convolution's input gradient, its filters as the vectors summed ------------------------------
# ``dx`` of a stride-1 convolution is the convolution of ``dy`` (zero-padded by the kernel less one
# pixel on each side) with the kernel flipped, its channels and filters swapped: each ``dx``
# value a sum over taps and the F filters. With F a multiple of the vector, a group of pixels x
# channels keeps one vector of partial sums each in registers over all taps, and adds its lanes up
# once at the end (``_lane_sums``); every ``dx`` value is written once. im2col's way, ``dy @
# kernel.T`` (BLAS) then col2im, adds each value's nine terms into memory one window at a time
# (LeNet-5's second layer, 128 images, two cores, Intel Xeon: 0.19-0.28 ms, the machine's spread,
# against 0.63-0.74 ms).


def _lane_sums(builder, vector, sums):
    """The lanes of each vector of ``sums`` added up, as vectors: lane ``l`` of vector ``m`` is
    the sum of ``sums[m * L + l]`` (L lanes; the last vector padded with zeros). Each halving
    step adds the two halves of every segment of two vectors, side by side in one vector."""
    lanes = vector.count
    sums = list(sums) + [ir.Constant(vector, [0.0] * lanes)] * (-len(sums) % lanes)
    out = []
    for start in range(0, len(sums), lanes):
        level, segment = sums[start : start + lanes], lanes
        while segment > 1:
            half = segment // 2
            first = [m * segment + t for m in range(lanes // segment) for t in range(half)]
            mask = lambda idx: ir.Constant(ir.VectorType(_I32, lanes), idx + [lanes + i for i in idx])  # noqa: E731
            low, high = mask(first), mask([i + half for i in first])
            level = [builder.fadd(builder.shuffle_vector(a, b, low), builder.shuffle_vector(a, b, high))
                     for a, b in zip(level[0::2], level[1::2])]
            segment = half
        out.append(level[0])
    return out


def _pixels_channels_dot(pixels, channels):
    """An intrinsic: for ``p < pixels``, ``c < channels``, ``out[o_at + p * o_pixel + c] = sum
    over i < rows, u < run of d[d_at + p * d_pixel + i * d_row + u] * k[k_at + c * k_c + i * k_row
    + u]`` (flat C arrays; ``run`` a multiple of the vector): a group of pixels x channels, each
    summed in one vector of partial sums in registers."""

    @intrinsic
    def pixels_channels_dot(typingctx, d, d_at, d_pixel, d_row, k, k_at, k_c, k_row, rows, run, out, o_at, o_pixel):
        if not all(isinstance(a, types.Array) and a.dtype == d.dtype for a in (d, k, out)):
            return None

        def codegen(context, builder, signature, args):
            d_p, da, dp, dr, k_p, ka, kc, kr, rows_v, run_v, out_p, oa, op = _operands(
                context, builder, signature, args)
            vector = _vector_type(context, signature.args[0])
            align = signature.args[0].dtype.bitwidth // 8
            at = lambda base, offset: builder.bitcast(builder.gep(base, [offset]), vector.as_pointer())  # noqa: E731
            const = lambda v: ir.Constant(_I64, v)  # noqa: E731
            pixel = [builder.add(da, builder.mul(const(p), dp)) for p in range(pixels)]
            channel = [builder.add(ka, builder.mul(const(c), kc)) for c in range(channels)]

            def kernel_row(i, sums):
                d_i, k_i = builder.mul(i, dr), builder.mul(i, kr)

                def tap(v, sums):
                    u = builder.mul(v, const(vector.count))
                    ds = [builder.load(at(d_p, builder.add(builder.add(p, d_i), u)), align=align) for p in pixel]
                    ks = [builder.load(at(k_p, builder.add(builder.add(c, k_i), u)), align=align) for c in channel]
                    return [_vector_fma(builder, vector, ds[a // channels], ks[a % channels], acc)
                            for a, acc in enumerate(sums)]

                return _loop_with_sums(builder, const(0), builder.sdiv(run_v, const(vector.count)), sums, tap)

            zero = ir.Constant(vector, [0.0] * vector.count)
            sums = _loop_with_sums(builder, const(0), rows_v, [zero] * (pixels * channels), kernel_row)
            totals = _lane_sums(builder, vector, sums)
            lanes, count = vector.count, pixels * channels

            def store_each(first):  # sums a >= first, one by one
                for a in range(first, count):
                    p, c = divmod(a, channels)
                    value = builder.extract_element(totals[a // lanes], ir.Constant(_I32, a % lanes))
                    builder.store(value, builder.gep(out_p, [builder.add(oa, builder.add(builder.mul(const(p), op),
                                                                                         const(c)))]), align=align)

            # the pixels' channels side by side in ``out`` (all of them in the group): whole vectors
            with builder.if_else(builder.icmp_signed("==", op, const(channels))) as (side_by_side, apart):
                with side_by_side:
                    for m in range(count // lanes):
                        builder.store(totals[m], at(out_p, builder.add(oa, const(m * lanes))), align=align)
                    store_each(count // lanes * lanes)
                with apart:
                    store_each(0)
            return context.get_dummy_value()

        return types.void(d, d_at, d_pixel, d_row, k, k_at, k_c, k_row, rows, run, out, o_at, o_pixel), codegen

    return pixels_channels_dot


#: channels (up to 8) an input-gradient call sums for a group of pixels, and how many pixels
#: (4 up to 6 channels, 3 for 7 and 8: at most 24 vectors of sums in registers); above 8
#: channels, blocks of 8 (the last one overlapping the one before: its values written twice alike)
INPUT_GRAD_CHANNEL_BLOCK = 8
INPUT_GRAD_MIN_WIDTH = 4
_input_dots = tuple(_pixels_channels_dot(4 if c <= 6 else 3, c) for c in range(1, INPUT_GRAD_CHANNEL_BLOCK + 1))
(_input_dot_1, _input_dot_2, _input_dot_3, _input_dot_4, _input_dot_5, _input_dot_6, _input_dot_7,
 _input_dot_8) = _input_dots


@njit(**_INLINE)
def _input_dot(block, d, d_at, d_pixel, d_row, k, k_at, k_c, k_row, rows, run, out, o_at, o_pixel):
    """The ``_pixels_channels_dot`` of ``block`` channels."""
    args = (d, d_at, d_pixel, d_row, k, k_at, k_c, k_row, rows, run, out, o_at, o_pixel)
    if block == 8:
        _input_dot_8(*args)
    elif block == 7:
        _input_dot_7(*args)
    elif block == 6:
        _input_dot_6(*args)
    elif block == 5:
        _input_dot_5(*args)
    elif block == 4:
        _input_dot_4(*args)
    elif block == 3:
        _input_dot_3(*args)
    elif block == 2:
        _input_dot_2(*args)
    else:
        _input_dot_1(*args)


@njit(**_JIT)
def conv2d_filter_vectors_input_grad(dy, relu_y, flipped, top, left, padded, dx):
    """``dx`` (N, H, W, C) of a stride-1 convolution with ``top``/``left`` padding, from ``dy``
    (N, OH, OW, F; F a multiple of the vector; W at least ``INPUT_GRAD_MIN_WIDTH``): ``flipped``
    (kh, C, kw, F) is the kernel flipped, ``flipped[i, c, j] = kernel[kh - 1 - i, kw - 1 - j, c]``,
    ``padded`` (OH + 2 (kh - 1), OW + 2 (kw - 1), F) scratch for one image of ``dy`` and its
    zeros. With ``relu_y`` (no images: none), ``dy`` goes through that ReLU as it is copied there."""
    n, oh, ow, f = dy.shape
    h, w, c = dx.shape[1], dx.shape[2], dx.shape[3]
    kh, kw, wp = flipped.shape[0], flipped.shape[2], padded.shape[1]
    pf, kf, xf = padded.reshape(-1), flipped.reshape(-1), dx.reshape(-1)
    pf[:] = 0
    block = min(c, INPUT_GRAD_CHANNEL_BLOCK)
    group = 4 if block <= 6 else 3  # the pixels of one call (see ``_input_dots``)
    relu = relu_y.shape[0] > 0
    for b in range(n):
        for p in range(oh):
            row = pf[((p + kh - 1) * wp + kw - 1) * f : ((p + kh - 1) * wp + kw - 1 + ow) * f]
            if relu:
                _relu_backward_row(dy[b, p].reshape(-1), relu_y[b, p].reshape(-1), row, False)
            else:
                row[:] = dy[b, p].reshape(-1)
        for r in range(h):
            for s0 in range(0, w, group):
                s = min(s0, w - group)  # a row's last group overlaps the one before: written twice alike
                for c0 in range(0, c, block):
                    c1 = min(c0, c - block)
                    _input_dot(block, pf, ((r + top) * wp + s + left) * f, f, wp * f, kf, c1 * kw * f, kw * f,
                               c * kw * f, kh, kw * f, xf, ((b * h + r) * w + s) * c + c1, c)


# --- convolution and pooling with the images split among the cores -------------------------------
# Inside a training step that owns the cores (``numba_cpu.images_on_cores``), each driver above
# runs once per part, a part a contiguous slice of the batch's images, all parts at once. An
# image's outputs are computed as the serial driver computes them, bit for bit; a kernel
# gradient sums over the images, so each part sums its own into ``partials[t]`` and the caller
# adds the parts up.


@njit(**_INLINE)
def _part(n, t, parts):
    """Images ``[lo, hi)`` of part ``t`` of ``parts``."""
    return n * t // parts, n * (t + 1) // parts


@njit(parallel=True, **_EXACT)
def im2col_parallel(x, kh, kw, sh, sw, top, left, oh, ow, cols, parts):
    per_image = oh * ow
    for t in prange(parts):
        lo, hi = _part(x.shape[0], t, parts)
        im2col(x[lo:hi], kh, kw, sh, sw, top, left, oh, ow, cols[lo * per_image : hi * per_image])


@njit(parallel=True, **_EXACT)
def col2im_parallel(dcols, kh, kw, sh, sw, top, left, oh, ow, dx, parts):
    per_image = oh * ow
    for t in prange(parts):
        lo, hi = _part(dx.shape[0], t, parts)
        col2im(dcols[lo * per_image : hi * per_image], kh, kw, sh, sw, top, left, oh, ow, dx[lo:hi])


@njit(parallel=True, **_EXACT)
def max_pool_parallel(x, kh, kw, sh, sw, y, parts):
    for t in prange(parts):
        lo, hi = _part(x.shape[0], t, parts)
        max_pool(x[lo:hi], kh, kw, sh, sw, y[lo:hi])


@njit(parallel=True, **_EXACT)
def avg_pool_parallel(x, kh, kw, sh, sw, y, parts):
    for t in prange(parts):
        lo, hi = _part(x.shape[0], t, parts)
        avg_pool(x[lo:hi], kh, kw, sh, sw, y[lo:hi])


@njit(parallel=True, **_EXACT)
def max_pool_backward_parallel(dy, x, y, kh, kw, sh, sw, dx, parts):
    for t in prange(parts):
        lo, hi = _part(dx.shape[0], t, parts)
        max_pool_backward(dy[lo:hi], x[lo:hi], y[lo:hi], kh, kw, sh, sw, dx[lo:hi])


@njit(parallel=True, **_EXACT)
def avg_pool_backward_parallel(dy, kh, kw, sh, sw, dx, parts):
    for t in prange(parts):
        lo, hi = _part(dx.shape[0], t, parts)
        avg_pool_backward(dy[lo:hi], kh, kw, sh, sw, dx[lo:hi])


@njit(parallel=True, **_EXACT)
def shift_images_parallel(x, down, right, y, parts):
    for t in prange(parts):
        lo, hi = _part(x.shape[0], t, parts)
        shift_images(x[lo:hi], down[lo:hi], right[lo:hi], y[lo:hi])


@njit(parallel=True, **_JIT)
def conv2d_rows_parallel(x, tiled, bias_row, relu, sh, top, left, expanded, y):
    """``conv2d_rows`` with one part per ``expanded[t]`` (each part's scratch)."""
    parts = expanded.shape[0]
    for t in prange(parts):
        lo, hi = _part(x.shape[0], t, parts)
        conv2d_rows(x[lo:hi], tiled, bias_row, relu, sh, top, left, expanded[t], y[lo:hi])


@njit(parallel=True, **_JIT)
def conv2d_rows_grads_parallel(dy, relu_y, x, sh, top, left, expanded, dtiled, dbias_row):
    """``conv2d_rows_grads`` with one part per ``expanded[t]``; part ``t``'s sums in
    ``dtiled[t]`` and ``dbias_row[t]``."""
    parts = expanded.shape[0]
    for t in prange(parts):  # (an empty relu_y, sliced, stays empty: no ReLU)
        lo, hi = _part(x.shape[0], t, parts)
        conv2d_rows_grads(dy[lo:hi], relu_y[lo:hi], x[lo:hi], sh, top, left, expanded[t], dtiled[t], dbias_row[t])


@njit(parallel=True, **_JIT)
def conv2d_filter_vectors_parallel(x, kernel, bias, relu, sh, sw, y, parts):
    for t in prange(parts):
        lo, hi = _part(x.shape[0], t, parts)
        conv2d_filter_vectors(x[lo:hi], kernel, bias, relu, sh, sw, y[lo:hi])


@njit(parallel=True, **_JIT)
def conv2d_filter_vectors_grad_parallel(x, dy, relu_y, sh, sw, dkernel, dbias):
    """``conv2d_filter_vectors_grad`` with one part per ``dkernel[t]`` and ``dbias[t]``, its sums."""
    parts = dkernel.shape[0]
    for t in prange(parts):
        lo, hi = _part(x.shape[0], t, parts)
        conv2d_filter_vectors_grad(x[lo:hi], dy[lo:hi], relu_y[lo:hi], sh, sw, dkernel[t], dbias[t])


@njit(parallel=True, **_JIT)
def conv2d_filter_vectors_input_grad_parallel(dy, relu_y, flipped, top, left, padded, dx):
    """``conv2d_filter_vectors_input_grad`` with one part per ``padded[t]`` (each part's scratch)."""
    parts = padded.shape[0]
    for t in prange(parts):
        lo, hi = _part(dy.shape[0], t, parts)
        conv2d_filter_vectors_input_grad(dy[lo:hi], relu_y[lo:hi], flipped, top, left, padded[t], dx[lo:hi])


# --- a sparse first layer: rows of a CSR matrix times a dense kernel (used by ``cpu_step``) ----
# Most inputs of an image set are zero (81% of MNIST's pixels); a first layer that skips them does
# a fifth of the multiply-adds of the dense product. Each row's nonzeros, as ``(indptr, indices,
# values)`` of a CSR matrix, meet the kernel's rows they select, in a loop over the nonzeros with
# up to four vectors of sums in registers (a plain numba loop took ~18 cycles a nonzero for a row
# of 50 units). A row's overlapping last vector: in the forward product its lanes are computed
# twice, in the same order, so both stores agree; in the gradient its repeated lanes are masked
# to zero.

def _sparse_intrinsic_types(indices, values, table, W):
    """Integer column indices; values of ``W``'s float dtype, or bytes that index ``table``."""
    return (
        isinstance(indices, types.Array) and isinstance(indices.dtype, types.Integer)
        and isinstance(values, types.Array) and isinstance(table, types.Array) and isinstance(W, types.Array)
        and W.dtype in (types.float32, types.float64) and table.dtype == W.dtype
        and (values.dtype == W.dtype or values.dtype == types.uint8)
    )


def _entry(context, builder, sig_types, pointers, k):
    """The ``k``-th nonzero: its column (an i64) and its value (``table[byte]`` for bytes)."""
    ind_t, val_t, _ = sig_types
    ind_p, val_p, table_p = pointers
    column = builder.load(builder.gep(ind_p, [k]))
    column = builder.sext(column, _I64) if ind_t.dtype.signed else builder.zext(column, _I64)
    value = builder.load(builder.gep(val_p, [k]))
    if isinstance(val_t.dtype, types.Integer):  # a pixel: its scaled value, exactly as scale_pixels
        value = builder.load(builder.gep(table_p, [builder.zext(value, _I64)]))
    return column, value


def _row_times_kernel(count):
    """An intrinsic: ``out[o + s] = init[s] + sum over k in [lo, hi) of values[k] * W[indices[k]
    * width + s]`` for the ``count`` vectors starting at ``starts[0..count)`` (flat arrays)."""

    @intrinsic
    def row_times_kernel(typingctx, indices, values, table, lo, hi, W, width, starts, out, o, init):
        if not _sparse_intrinsic_types(indices, values, table, W):
            return None

        def codegen(context, builder, signature, args):
            ind_t, val_t, tab_t, w_t = (signature.args[k] for k in (0, 1, 2, 5))
            ind_p, val_p, tab_p, lo_v, hi_v, w_p, width_v, st_p, out_p, o_v, init_p = _operands(
                context, builder, signature, args)
            vector = _vector_type(context, w_t)
            align = w_t.dtype.bitwidth // 8
            at = lambda base, offset: builder.bitcast(builder.gep(base, [offset]), vector.as_pointer())  # noqa: E731
            starts = [builder.load(builder.gep(st_p, [ir.Constant(_I64, m)])) for m in range(count)]
            first = [builder.load(at(init_p, s), align=align) for s in starts]

            def step(k, sums):
                column, value = _entry(context, builder, (ind_t, val_t, tab_t), (ind_p, val_p, tab_p), k)
                value, row = _splat(builder, vector, value), builder.mul(column, width_v)
                weights = [builder.load(at(w_p, builder.add(row, s)), align=align) for s in starts]
                return [_vector_fma(builder, vector, value, w, acc) for w, acc in zip(weights, sums)]

            for s, res in zip(starts, _loop_with_sums(builder, lo_v, hi_v, first, step)):
                builder.store(res, at(out_p, builder.add(o_v, s)), align=align)
            return context.get_dummy_value()

        return types.void(indices, values, table, lo, hi, W, width, starts, out, o, init), codegen

    return row_times_kernel


def _row_into_gradient(count):
    """An intrinsic: ``dW[indices[k] * width + s + l] += values[k] * dz[o + s + l]`` for k in
    ``[lo, hi)`` and the ``count`` vectors starting at ``starts[m]``, lanes ``l >= firsts[m]``."""

    @intrinsic
    def row_into_gradient(typingctx, indices, values, table, lo, hi, dW, width, starts, firsts, dz, o):
        if not _sparse_intrinsic_types(indices, values, table, dW):
            return None

        def codegen(context, builder, signature, args):
            ind_t, val_t, tab_t, w_t = (signature.args[k] for k in (0, 1, 2, 5))
            ind_p, val_p, tab_p, lo_v, hi_v, w_p, width_v, st_p, fi_p, dz_p, o_v = _operands(
                context, builder, signature, args)
            vector = _vector_type(context, w_t)
            align = w_t.dtype.bitwidth // 8
            at = lambda base, offset: builder.bitcast(builder.gep(base, [offset]), vector.as_pointer())  # noqa: E731
            lanes = ir.VectorType(_I64, vector.count)
            lane = ir.Constant(lanes, list(range(vector.count)))
            zero = ir.Constant(vector, [ir.Constant(vector.element, 0.0)] * vector.count)
            starts, grads = [], []
            for m in range(count):
                s = builder.load(builder.gep(st_p, [ir.Constant(_I64, m)]))
                first = builder.load(builder.gep(fi_p, [ir.Constant(_I64, m)]))
                kept = builder.icmp_signed(">=", lane, _splat(builder, lanes, first))
                starts.append(s)
                grads.append(builder.select(kept, builder.load(at(dz_p, builder.add(o_v, s)), align=align), zero))
            def step(k, _):
                column, value = _entry(context, builder, (ind_t, val_t, tab_t), (ind_p, val_p, tab_p), k)
                value, row = _splat(builder, vector, value), builder.mul(column, width_v)
                pointers = [at(w_p, builder.add(row, s)) for s in starts]
                old = [builder.load(p, align=align) for p in pointers]  # every load before any store
                new = [_vector_fma(builder, vector, value, g, a) for g, a in zip(grads, old)]
                for p, a in reversed(list(zip(pointers, new))):  # an overlapping last vector first
                    builder.store(a, p, align=align)
                return []

            _loop_with_sums(builder, lo_v, hi_v, [], step)
            return context.get_dummy_value()

        return types.void(indices, values, table, lo, hi, dW, width, starts, firsts, dz, o), codegen

    return row_into_gradient


_ROW_TIMES_KERNEL = tuple(_row_times_kernel(count) for count in (1, 2, 3, 4))
_ROW_INTO_GRADIENT = tuple(_row_into_gradient(count) for count in (1, 2, 3, 4))
_row_times_kernel_1, _row_times_kernel_2, _row_times_kernel_3, _row_times_kernel_4 = _ROW_TIMES_KERNEL
_row_into_gradient_1, _row_into_gradient_2, _row_into_gradient_3, _row_into_gradient_4 = _ROW_INTO_GRADIENT


@intrinsic
def _prefetch(typingctx, array, index):
    """Ask for the cache line of ``array[index]`` (no fault if it is never read)."""
    if not isinstance(array, types.Array):
        return None

    def codegen(context, builder, signature, args):
        pointer = builder.gep(_array_data(context, builder, signature.args[0], args[0]), [args[1]])
        pointer = builder.bitcast(pointer, ir.IntType(8).as_pointer())
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [pointer.type, _I32, _I32, _I32]), "llvm.prefetch.p0"
        )
        builder.call(fn, [pointer, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
        return context.get_dummy_value()

    return types.void(array, index), codegen


@njit(**_INLINE)
def _prefetch_row(indptr, indices, values, r):
    lo, hi = indptr[r], indptr[r + 1]
    for k in range(lo, hi, 16):
        _prefetch(indices, k)
        _prefetch(values, k)


@njit(**_INLINE)
def _sparse_rows_times_kernel(indptr, indices, values, table, idx, W, b, z, relu, row_lo, row_hi):
    width, last = W.shape[1], indptr.shape[0] - 2
    count, starts, _ = _vectors(width, VECTOR_BYTES // W.itemsize)
    flat_w, flat_z = W.reshape(-1), z.reshape(-1)
    zero = W.dtype.type(0)
    for i in range(row_lo, min(row_lo + 2, row_hi)):
        _prefetch_row(indptr, indices, values, _clip_row(idx, i, last))
    for i in range(row_lo, row_hi):
        if i + 2 < row_hi:  # random rows of a large set: fetch ahead, or wait on memory
            _prefetch_row(indptr, indices, values, _clip_row(idx, i + 2, last))
        r = _clip_row(idx, i, last)
        lo, hi, o = indptr[r], indptr[r + 1], i * width
        m = 0
        while m < count:
            group = min(count - m, 4)
            at = starts[m:]
            if group == 4:
                _row_times_kernel_4(indices, values, table, lo, hi, flat_w, width, at, flat_z, o, b)
            elif group == 3:
                _row_times_kernel_3(indices, values, table, lo, hi, flat_w, width, at, flat_z, o, b)
            elif group == 2:
                _row_times_kernel_2(indices, values, table, lo, hi, flat_w, width, at, flat_z, o, b)
            else:
                _row_times_kernel_1(indices, values, table, lo, hi, flat_w, width, at, flat_z, o, b)
            m += group
        if relu:
            for j in range(o, o + width):
                v = flat_z[j]
                flat_z[j] = v if v > 0 else zero


@njit(**_INLINE)
def _sparse_rows_into_gradient(indptr, indices, values, table, idx, dz, dW, starts, firsts, m_lo, m_hi, row_lo, row_hi):
    """Add rows ``row_lo:row_hi``'s share of the gradient into the vectors ``m_lo:m_hi`` of
    ``dW``'s rows (zeroed by the caller)."""
    width, last = dW.shape[1], indptr.shape[0] - 2
    flat_w, flat_dz = dW.reshape(-1), dz.reshape(-1)
    for i in range(row_lo, row_hi):
        r = _clip_row(idx, i, last)
        lo, hi, o = indptr[r], indptr[r + 1], i * width
        m = m_lo
        while m < m_hi:
            group = min(m_hi - m, 4)
            at, new_from = starts[m:], firsts[m:]
            if group == 4:
                _row_into_gradient_4(indices, values, table, lo, hi, flat_w, width, at, new_from, flat_dz, o)
            elif group == 3:
                _row_into_gradient_3(indices, values, table, lo, hi, flat_w, width, at, new_from, flat_dz, o)
            elif group == 2:
                _row_into_gradient_2(indices, values, table, lo, hi, flat_w, width, at, new_from, flat_dz, o)
            else:
                _row_into_gradient_1(indices, values, table, lo, hi, flat_w, width, at, new_from, flat_dz, o)
            m += group


@njit(**_JIT)
def sparse_linear_serial(indptr, indices, values, table, idx, W, b, z, relu):
    """``z[i] = row idx[i] @ W + b`` (ReLU'd with ``relu``) for a CSR matrix ``(indptr, indices,
    values)`` whose byte values stand for ``table[value]``; rows of ``idx`` clip to the matrix as
    ``np.take(mode="clip")``. ``W.shape[1]`` must be at least one vector (``vector_lanes``)."""
    _sparse_rows_times_kernel(indptr, indices, values, table, idx, W, b, z, relu, 0, idx.shape[0])


@njit(parallel=True, **_JIT)
def sparse_linear_parallel(indptr, indices, values, table, idx, W, b, z, relu, parts):
    n = idx.shape[0]
    for t in prange(parts):
        lo, hi = n * t // parts, n * (t + 1) // parts
        _sparse_rows_times_kernel(indptr, indices, values, table, idx, W, b, z, relu, lo, hi)


@njit(**_JIT)
def sparse_linear_grad_serial(indptr, indices, values, table, idx, dz, dW, partials):
    """``dW = (rows idx of the CSR matrix).T @ dz``: what ``sparse_linear`` multiplied, the
    gradient of its kernel. ``partials`` is the parallel driver's; unused here."""
    count, starts, firsts = _vectors(dW.shape[1], VECTOR_BYTES // dW.itemsize)
    dW[...] = 0
    _sparse_rows_into_gradient(indptr, indices, values, table, idx, dz, dW, starts, firsts, 0, count, 0, idx.shape[0])


@njit(parallel=True, **_JIT)
def sparse_linear_grad_parallel(indptr, indices, values, table, idx, dz, dW, partials):
    """As ``sparse_linear_grad_serial``, the batch rows split into ``len(partials) + 1`` parts:
    the first sums into ``dW``, each other into its partial, and the partials are added to
    ``dW`` after. (Parts that own columns instead share the cache lines where a row of ``dW``
    changes hands: 784-50-25-10 at batch 128 took 2.2x as long.)"""
    n, parts = idx.shape[0], partials.shape[0] + 1
    count, starts, firsts = _vectors(dW.shape[1], VECTOR_BYTES // dW.itemsize)
    for t in prange(parts):
        target = dW if t == 0 else partials[t - 1]
        target[...] = 0
        _sparse_rows_into_gradient(indptr, indices, values, table, idx, dz, target, starts, firsts, 0, count,
                                   n * t // parts, n * (t + 1) // parts)
    rows = dW.shape[0]
    for t in prange(parts):
        for r in range(rows * t // parts, rows * (t + 1) // parts):
            out = dW[r]
            for p in range(parts - 1):
                partial = partials[p, r]
                for j in range(out.shape[0]):
                    out[j] += partial[j]


# --- a whole training step of a ReLU MLP whose first layer runs sparse, in one call ---------------
# (used by ``cpu_step`` where scipy is importable: numba's ``np.dot`` calls BLAS through it)
# Each core takes a share of the batch's rows through every layer, forward and back: all of a
# step is row by row except the weight gradients, which each core sums over its own rows into
# its own part of ``dW_parts``/``db_parts``; the parts are then added into the first, which is the
# step's gradient. One call and one start of the threads a step, where a Python loop over the
# layers starts them three times and calls ~15 kernels. The per-layer arrays come as tuples of
# ``MAX_FUSED_LAYERS`` (the unused ones empty), so that one compiled kernel serves every depth.

MAX_FUSED_LAYERS = 5


@njit(**_INLINE)
def _dot_rows(a, b, out):
    """``out = a @ b``, also where ``a`` has no rows or columns (numba's dot writes nothing then)."""
    if a.shape[0] == 0 or a.shape[1] == 0:
        out[...] = 0
    else:
        np.dot(a, b, out)


@njit(**_INLINE)
def _sparse_mlp_rows(indptr, indices, values, table, idx, Ws, bs, zs, dzs, dW_parts, db_parts, labels, weights,
                     rows, depth, inv_n, t, lo, hi):
    """Rows ``lo:hi`` of the batch forward and back; their weight gradients into part ``t``.
    Returns their summed loss and correct count."""
    _sparse_rows_times_kernel(indptr, indices, values, table, idx, Ws[0], bs[0], zs[0], depth > 1, lo, hi)
    for k in range(1, depth):
        z = zs[k][lo:hi]
        _dot_rows(zs[k - 1][lo:hi], Ws[k], z)
        if k < depth - 1:
            bias_relu_serial(z, bs[k], z)
        else:
            bias_add_inplace(z, bs[k])
    last = depth - 1
    logits, dz, y = zs[last][lo:hi], dzs[last][lo:hi], labels[lo:hi]
    hits = count_argmax_hits(logits, y)
    row_weights = weights[lo:hi]  # (empty where there are none)
    loss = 0.0
    for i0 in range(0, hi - lo, rows):
        i1 = min(i0 + rows, hi - lo)
        loss += _softmax_xent_block(logits[i0:i1], y[i0:i1], row_weights[i0:i1], dz[i0:i1], dz[i0:i1].reshape(-1),
                                    inv_n)
    column_sums(dz, db_parts[last][t])
    for k in range(last, 0, -1):
        dz, h = dzs[k][lo:hi], zs[k - 1][lo:hi]
        _dot_rows(h.T, dz, dW_parts[k][t])
        dh = dzs[k - 1][lo:hi]
        _dot_rows(dz, Ws[k].T, dh)
        relu_backward_colsum_inplace(dh, h, db_parts[k - 1][t])
    dW = dW_parts[0][t]
    count, starts, firsts = _vectors(dW.shape[1], VECTOR_BYTES // dW.itemsize)
    dW[...] = 0
    _sparse_rows_into_gradient(indptr, indices, values, table, idx, dzs[0], dW, starts, firsts, 0, count, lo, hi)
    return loss, hits


@njit(parallel=True, **_JIT)
def sparse_mlp_step(indptr, indices, values, table, idx, Ws, bs, zs, dzs, dW_parts, db_parts, labels, weights, rows,
                    depth, stats):
    """One step of a ``depth``-layer ReLU MLP (linear output, mean softmax cross-entropy) on rows
    ``idx`` of a CSR matrix (as ``sparse_linear_serial`` takes it): outputs into ``zs``, the
    gradient of the loss by each layer's output into ``dzs``, each layer's weight gradients into
    ``dW_parts[k][0]``/``db_parts[k][0]``, the batch's rows split among ``stats.shape[0]``
    parts (each part's sums in its own ``dW_parts[k][t]``, added into the first at the end).
    ``labels`` hold the batch's ``len(idx)`` labels, ``weights`` each row's factor (or nothing);
    ``rows`` is the loss head's block (``block_rows``). Returns the index of the first label
    outside ``[0, classes)`` (nothing is computed then), or -1: ``stats[t]`` then holds part
    ``t``'s summed loss and correct count.
    """
    n, parts = idx.shape[0], stats.shape[0]
    bad = labels_out_of_range(labels, Ws[depth - 1].shape[1])
    if bad >= 0:
        return bad
    inv_n = Ws[0].dtype.type(1 / n)
    for t in prange(parts):
        loss, hits = _sparse_mlp_rows(indptr, indices, values, table, idx, Ws, bs, zs, dzs, dW_parts, db_parts,
                                      labels, weights, rows, depth, inv_n, t, n * t // parts, n * (t + 1) // parts)
        stats[t, 0], stats[t, 1] = loss, hits
    for t in prange(parts if parts > 1 else 0):  # each part adds up a share of every gradient's rows
        for k in range(depth):
            sums = dW_parts[k]
            for r in range(sums.shape[1] * t // parts, sums.shape[1] * (t + 1) // parts):
                out = sums[0, r]
                for p in range(1, parts):
                    partial = sums[p, r]
                    for j in range(out.shape[0]):
                        out[j] += partial[j]
            if t == 0:
                out = db_parts[k][0]
                for p in range(1, parts):
                    partial = db_parts[k][p]
                    for j in range(out.shape[0]):
                        out[j] += partial[j]
    return -1


# --- a whole epoch of such steps, each followed by the optimizer's fused update, in one call --------
# (``CpuTrainingStep.run_epoch``: no Python between the steps.) The update's scalars of every step
# come computed beforehand in ``coefs`` (``Optimizer.fused_updates``: they depend on the step count
# and the batch, not on the values); each step is then exactly ``sparse_mlp_step`` and the update
# kernel as the Python loop calls them, and the epoch's sums are added in the loop's order.


@njit(**_EXACT)
def _epoch_batch(indptr, indices, values, table, order, lo, hi, y, labels, factors, Ws, bs, zs, dzs, dW_parts,
                 db_parts, rows, depth, stats, totals):
    """The step on rows ``order[lo:hi]`` (their labels gathered into ``labels``; their factors
    ``factors[lo:hi]``, none where ``factors`` is empty); its summed loss and correct count added
    to ``totals``. Returns False, having added nothing, where a label is out of range."""
    idx = order[lo:hi]
    yb = labels[: hi - lo]
    for i in range(hi - lo):
        yb[i] = y[idx[i]]
    weights = factors[lo:hi] if factors.shape[0] != 0 else factors
    if sparse_mlp_step(indptr, indices, values, table, idx, Ws, bs, zs, dzs, dW_parts, db_parts, yb, weights, rows,
                       depth, stats) >= 0:
        return False
    loss, hits = 0.0, 0.0
    for t in range(stats.shape[0]):
        loss += stats[t, 0]
        hits += stats[t, 1]
    totals[0] += loss
    totals[1] += hits
    return True


@njit(**_EXACT)
def sparse_mlp_epoch_adam(indptr, indices, values, table, order, batch, y, labels, factors, Ws, bs, zs, dzs,
                          dW_parts, db_parts, rows, depth, stats, totals, ps, gs, m, v, coefs, beta1, one_minus_beta1,
                          beta2, one_minus_beta2, parts):
    """``coefs.shape[0]`` steps over ``order`` in batches of ``batch`` rows (the last may be
    shorter), each ``sparse_mlp_step`` then ``adam_step`` with the scalars ``coefs[k]`` (split
    into ``parts`` slices where ``parts > 1``); the epoch's summed loss and correct count added to
    ``totals``. Returns the steps taken: fewer where a batch has a label out of range (that
    batch changes nothing)."""
    n = order.shape[0]
    for k in range(coefs.shape[0]):
        lo = k * batch
        if not _epoch_batch(indptr, indices, values, table, order, lo, min(lo + batch, n), y, labels, factors, Ws,
                            bs, zs, dzs, dW_parts, db_parts, rows, depth, stats, totals):
            return k
        if parts > 1:
            adam_step_parallel(ps, gs, m, v, coefs[k], beta1, one_minus_beta1, beta2, one_minus_beta2, parts)
        else:
            adam_step(ps, gs, m, v, coefs[k], beta1, one_minus_beta1, beta2, one_minus_beta2)
    return coefs.shape[0]


# (One kernel per update rather than the update passed in: a function argument makes numba
# compile the kernel anew in every process, out of reach of its cache.)
@njit(**_EXACT)
def sparse_mlp_epoch_sgd(indptr, indices, values, table, order, batch, y, labels, factors, Ws, bs, zs, dzs,
                         dW_parts, db_parts, rows, depth, stats, totals, ps, gs, v, coefs, momentum, nesterov, parts):
    """``sparse_mlp_epoch_adam`` with ``sgd_step`` as the update."""
    n = order.shape[0]
    for k in range(coefs.shape[0]):
        lo = k * batch
        if not _epoch_batch(indptr, indices, values, table, order, lo, min(lo + batch, n), y, labels, factors, Ws,
                            bs, zs, dzs, dW_parts, db_parts, rows, depth, stats, totals):
            return k
        if parts > 1:
            sgd_step_parallel(ps, gs, v, coefs[k], momentum, nesterov, parts)
        else:
            sgd_step(ps, gs, v, coefs[k], momentum, nesterov)
    return coefs.shape[0]


@njit(parallel=True, **_JIT)
def csr_row_counts(X, counts, parts):
    """``counts[i]`` = the nonzeros of row ``i`` of ``X``."""
    n = X.shape[0]
    for t in prange(parts):
        for i in range(n * t // parts, n * (t + 1) // parts):
            row = X[i]
            c = 0
            for j in range(row.shape[0]):
                c += row[j] != 0
            counts[i] = c


_COMPRESS_LANES = 16  # the values a compressing store takes at once (one AVX-512 register of 32-bit values)


@intrinsic
def _compress_nonzeros(typingctx, row, j, columns, values, at):
    """Of ``row[j:j + 16]``, the nonzero values (converted to ``values``' dtype) and their
    column numbers, stored one after the other from ``columns[at]`` and ``values[at]`` by
    compressing stores (AVX-512's ``vpcompress``; LLVM expands them elsewhere); returns how
    many. NaN is nonzero; -0.0 is zero."""
    if not all(isinstance(a, types.Array) and a.layout == "C" for a in (row, columns, values)) or not isinstance(
        columns.dtype, types.Integer
    ):
        return None

    def codegen(context, builder, signature, args):
        row_t, _, col_t, val_t, _ = signature.args
        row_p, j_v, col_p, val_p, at_v = _operands(context, builder, signature, args)
        lanes = _COMPRESS_LANES
        x_type, c_type, v_type = (context.get_data_type(t.dtype) for t in (row_t, col_t, val_t))
        x = builder.load(builder.bitcast(builder.gep(row_p, [j_v]), ir.VectorType(x_type, lanes).as_pointer()),
                         align=row_t.dtype.bitwidth // 8)
        zero = ir.Constant(ir.VectorType(x_type, lanes), [ir.Constant(x_type, 0)] * lanes)
        if isinstance(row_t.dtype, types.Float):
            kept = builder.fcmp_unordered("!=", x, zero)  # (unordered: NaN is kept)
        else:
            kept = builder.icmp_unsigned("!=", x, zero)
        first = _splat(builder, ir.VectorType(c_type, lanes), builder.trunc(j_v, c_type))
        numbers = builder.add(first, ir.Constant(ir.VectorType(c_type, lanes), list(range(lanes))))
        if x_type != v_type:  # float64 data for float32 values, or the other way
            convert = builder.fptrunc if row_t.dtype.bitwidth > val_t.dtype.bitwidth else builder.fpext
            x = convert(x, ir.VectorType(v_type, lanes))
        for vector, base in ((numbers, col_p), (x, val_p)):
            pointer = builder.gep(base, [at_v])
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [vector.type, pointer.type, kept.type]),
                f"llvm.masked.compressstore.v{lanes}{_vector_suffix(vector.type.element)}")
            builder.call(fn, [vector, pointer, kept])
        bits = builder.bitcast(kept, ir.IntType(lanes))
        popcount = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.IntType(lanes), [ir.IntType(lanes)]), f"llvm.ctpop.i{lanes}")
        return builder.zext(builder.call(popcount, [bits]), _I64)

    return types.int64(row, j, columns, values, at), codegen


@njit(parallel=True, **_JIT)
def csr_fill(X, indptr, indices, values, parts):
    """Fill a CSR matrix whose ``indptr`` is set: ``indices``/``values`` of ``X``'s nonzeros,
    row by row.
    A row's nonzeros are gathered 16 values at a time by compressing stores into a scratch row,
    then copied out: 12 ms for MNIST's 47M float32 pixels on the 2-core Intel Xeon, against 27
    ms written as a loop that stores every column and keeps the nonzero ones (uint8 pixels: 16
    ms either way). An ``indptr`` that does not count ``X``'s nonzeros is a ValueError, never a
    write past the arrays."""
    n, d = X.shape
    if indptr.shape[0] != n + 1 or indices.shape[0] != indptr[n] or values.shape[0] != indptr[n]:
        raise ValueError("csr_fill: indices and values must hold the indptr[-1] nonzeros of X's rows")
    wrong = np.zeros(parts, np.int64)  # rows whose nonzeros indptr miscounts, per part
    lanes = _COMPRESS_LANES
    whole = d - d % lanes
    for t in prange(parts):
        columns = np.empty(d, indices.dtype)  # a row's nonzeros (c <= j: never past d)
        found = np.empty(d, values.dtype)
        for i in range(n * t // parts, n * (t + 1) // parts):
            row, start = X[i], indptr[i]
            c = 0
            for j in range(0, whole, lanes):
                c += _compress_nonzeros(row, j, columns, found, c)
            for j in range(whole, d):
                columns[c] = j
                found[c] = row[j]
                c += row[j] != 0
            if c != indptr[i + 1] - start:
                wrong[t] += 1
                continue
            for k in range(c):
                indices[start + k] = columns[k]
                values[start + k] = found[k]
    if wrong.sum():
        raise ValueError("csr_fill: indptr does not count the nonzeros of X's rows")
