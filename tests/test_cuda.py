"""The CUDA backend: kernels/*.cu compile (nvcc, no GPU needed), and on a GPU every kernel equals
the xp reference, checks its arguments, and training stays on the device and learns.

GPU tests carry the ``cuda`` mark: they skip with a reason without CuPy or a GPU, and
``--require-cuda`` turns those skips into failures.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import xpnet
from conftest import central_differences
from xpnet import functional as F
from xpnet import kernels, optim
from xpnet.kernels import cuda

KERNEL_DIR = Path(__file__).resolve().parents[1] / "kernels"
CU_FILES = sorted(KERNEL_DIR.glob("*.cu"))


# --- without a GPU ---------------------------------------------------------------------------


def _nvcc():
    return shutil.which("nvcc") or ("/usr/local/bin/nvcc" if Path("/usr/local/bin/nvcc").exists() else None)


def test_there_are_cuda_sources():
    assert KERNEL_DIR / "xpnet_kernels.cu" in CU_FILES
    assert cuda.source_path().samefile(KERNEL_DIR / "xpnet_kernels.cu")


@pytest.mark.parametrize("arch", ["sm_75", "sm_80", "sm_90"])
@pytest.mark.parametrize("path", CU_FILES, ids=lambda p: p.name)
def test_every_cu_file_compiles_with_nvcc(path, arch, tmp_path):
    """Each .cu compiles with every instantiation xpnet launches (taking a kernel template's
    address instantiates it, so the compiler sees the real code, not just the templates), with
    warnings as errors: ptxas's too (on sm_75, a launch bound of more threads than an SM holds)."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (on PATH or at /usr/local/bin/nvcc)")
    probe = tmp_path / f"probe_{path.stem}.cu"
    lines = [f'#include "{path}"']
    if path.name == "xpnet_kernels.cu":
        lines += ["static void* const xpnet_probes[] = {"]
        lines += [f"    (void*)&{name}," for name in cuda.NAME_EXPRESSIONS]
        lines += ["};", "void* xpnet_probe(int i) { return xpnet_probes[i]; }"]
    probe.write_text("\n".join(lines) + "\n")
    result = subprocess.run(
        [nvcc, "-std=c++17", f"-arch={arch}", "-Werror", "all-warnings", "-c", str(probe),
         "-o", str(tmp_path / "probe.o")],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.parametrize("sms", [1, 8, 132])
@pytest.mark.parametrize("M,N,K", [(128, 50, 784), (128, 256, 784), (96, 50, 784), (128, 25, 50), (128, 128, 256),
                                   (1, 1, 257), (1, 1, 100_000), (7, 300, 1000), (4096, 4096, 784)])
def test_k_splits_cover_k_in_whole_tiles(M, N, K, sms):
    """The slices cover K exactly once, in whole 32-wide tiles but the last, none empty; K is
    split only where the output's tiles fill less than half the GPU and K is longer than 8 tiles."""
    from xpnet.kernels.cuda_graph import k_splits

    S, kc = k_splits(M, N, K, sms)
    tiles = -(-M // 32) * -(-N // 32)
    if K <= 256 or 2 * tiles >= sms:
        assert (S, kc) == (1, K)
        return
    assert S > 1 and kc % 32 == 0 and kc >= 64
    assert (S - 1) * kc < K <= S * kc
    assert S * tiles <= max(sms, tiles) * 2  # enough blocks to fill the GPU, not many more


def test_seed_002s_first_product_splits_13_ways_on_132_sms():
    from xpnet.kernels.cuda_graph import k_splits

    assert k_splits(128, 50, 784, 132) == (13, 64)  # 8 tiles -> 104 blocks of 2 steps of K each
    assert k_splits(96, 50, 784, 132) == (13, 64)  # the epoch's last batch of 96
    assert k_splits(128, 256, 784, 132) == (5, 160)


def test_every_name_expression_is_a_kernel_of_the_source():
    source = cuda.source_path().read_text()
    bounds = r"__launch_bounds__\([\w<>:, ]+\)"
    defined = set(re.findall(rf"__global__ void (?:{bounds}\s*)?(\w+)\(", source))
    defined |= set(re.findall(rf"{bounds}\s*\n(\w+)\(", source))
    used = {name.split("<")[0] for name in cuda.NAME_EXPRESSIONS}
    assert used <= defined, used - defined
    assert not re.search(r"#include\s*<", source), "no CUDA toolkit header: pip-installed CuPy lacks them"


def test_kernel_functions_mirror_the_reference_signatures():
    """Same names and argument order as xpnet.functional (plus out=/grad_out=)."""
    for op in kernels.OPS:
        ref = [p.name for p in inspect.signature(getattr(F, op)).parameters.values()
               if p.kind is p.POSITIONAL_ONLY]
        ours = list(inspect.signature(getattr(cuda, op)).parameters)
        assert ours[: len(ref)] == ref, (op, ours, ref)
        assert ours[len(ref)] in ("out", "grad_out")


def test_import_xpnet_never_imports_cupy():
    code = "import sys, xpnet, xpnet.functional, xpnet.kernels.cuda; print('cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(
                             filter(None, [str(KERNEL_DIR.parent), os.environ.get("PYTHONPATH")]))})
    assert out.stdout.strip() == "False"


def test_unavailable_gives_the_reason_or_none():
    """None exactly when CuPy and a GPU are there (found here without xpnet), else the reason."""
    reason = cuda.unavailable()
    try:
        import cupy
    except ImportError:
        assert reason == "CuPy is not installed (pip install 'xpnet[cuda12]' or 'xpnet[cuda13]')"
        return
    try:
        has_gpu = cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        has_gpu = False
    if has_gpu:
        assert reason is None
    else:
        assert isinstance(reason, str) and reason.startswith("CuPy found no") and "GPU" in reason


def test_compiled_kernels_are_cached_per_device(monkeypatch):
    """A kernel loaded on one GPU is never launched on another: run against a stand-in for
    CuPy with two devices, whose modules load functions into the current device only."""
    current = {"device": 0}

    class RawModule:
        def __init__(self, code, options, name_expressions):
            self.device = current["device"]

        def get_function(self, name):
            assert current["device"] == self.device
            return (self.device, name)

    runtime = types.SimpleNamespace(getDevice=lambda: current["device"])
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime),
                                                                   RawModule=RawModule))
    monkeypatch.setattr(cuda, "_modules", {})
    monkeypatch.setattr(cuda, "_functions", {})
    name = cuda.NAME_EXPRESSIONS[0]
    assert cuda.kernel(name) == (0, name)
    current["device"] = 1
    assert cuda.kernel(name) == (1, name)
    current["device"] = 0
    assert cuda.kernel(name) == (0, name)
    assert sorted(cuda._modules) == [0, 1]


# --- the row reductions' rules for NaN and inf, modelled on the host ----------------------------
# A model of xpnet_kernels.cu's above / combine / reference_sum and of its in-register pass, in
# the kernels' own folding orders, checked against the reference on rows of special values: it
# checks the rules (the kernels themselves run in the GPU tests below, on the same rows).


def _above(a, b):
    return a > b or (a != a and b == b)


def _combine(m, s, m2, s2):
    if _above(m2, m):
        return m2, s * np.exp(m - m2) + s2
    if m2 > -np.inf:
        return m, s + s2 * np.exp(m2 - m)
    return m, s


def _reference_sum(m, s):
    return np.nan if m == np.inf else s


def _grouped_model(row, lanes):
    """rows_grouped (and the streamed wide path): each lane folds its strided values, then the
    lanes fold by a butterfly of shuffles."""
    parts = []
    for lane in range(lanes):
        m, s = -np.inf, 0.0
        for x in row[lane::lanes]:
            m, s = _combine(m, s, x, 1.0)
        parts.append((m, s))
    o = lanes // 2
    while o:
        parts = [_combine(*parts[i], *parts[i ^ o]) for i in range(lanes)]
        o //= 2
    m, s = parts[0]
    s = _reference_sum(m, s)
    return np.exp(row - m) / s


def _in_register_model(row, threads):
    """rows_blocked with the row in registers: each thread keeps exp(x - its max), then the
    block folds the threads' (max, sum), then each thread rescales its values."""
    shares = [row[t::threads] for t in range(threads)]
    kept = []
    for share in shares:
        m = -np.inf
        for x in share:
            if x > m:
                m = x
        a = np.exp(share - (0.0 if m == -np.inf else m))
        s = a.sum()
        if s != s:
            m = s
        kept.append((m, s, a))
    m, s = -np.inf, 0.0
    for m2, s2, _ in kept:
        m, s = _combine(m, s, m2, s2)
    s = _reference_sum(m, s)
    out = np.empty_like(row)
    for t, (m2, _, a) in enumerate(kept):
        out[t::threads] = a * (np.exp(m2 - m) / s)
    return out


def _special_rows(cols, rng):
    """Rows of special values, by name: each a case where a combine rule decides the answer."""
    inf, nan = np.inf, np.nan
    finite = rng.standard_normal(cols) * 4
    rows = {"finite": finite}
    rows["some -inf"] = np.where(rng.random(cols) < 0.5, -inf, finite)
    rows["some -inf"][0] = 1.0
    rows["one finite"] = np.full(cols, -inf)
    rows["one finite"][cols // 3] = 2.0
    rows["all -inf"] = np.full(cols, -inf)
    rows["a NaN"] = finite.copy()
    rows["a NaN"][cols // 2] = nan
    rows["a NaN among -inf"] = np.full(cols, -inf)
    rows["a NaN among -inf"][[0, cols - 1]] = [1.0, nan]
    rows["a +inf"] = finite.copy()
    rows["a +inf"][cols - 1] = inf
    rows["two +inf"] = finite.copy()
    rows["two +inf"][[0, cols // 2]] = inf
    rows["+inf and -inf"] = np.full(cols, -inf)
    rows["+inf and -inf"][cols // 2] = inf
    return rows


def _softmax_reference(row):
    with np.errstate(all="ignore"):
        e = np.exp(row - np.max(row))
        return e / e.sum()


@pytest.mark.parametrize("cols", [1, 2, 7, 33, 100])
def test_the_combine_rules_give_the_reference_on_special_values(rng, cols):
    with np.errstate(all="ignore"):
        for name, row in _special_rows(cols, rng).items():
            expected = _softmax_reference(row)
            for lanes in (1, 2, 8, 32):
                np.testing.assert_allclose(_grouped_model(row, lanes), expected, rtol=1e-13, atol=0,
                                           err_msg=f"{name}, {lanes} lanes")
            for threads in (1, 3, 16):
                np.testing.assert_allclose(_in_register_model(row, threads), expected, rtol=1e-13, atol=0,
                                           err_msg=f"{name}, {threads} threads")


# --- on a GPU --------------------------------------------------------------------------------

DTYPES = ["float32", "float64"]
TOL = {"float32": dict(rtol=2e-5, atol=1e-6), "float64": dict(rtol=1e-12, atol=1e-14)}


@pytest.fixture
def cp():
    import cupy

    return cupy


def _poisoned(cp, shape, dtype):
    return cp.full(shape, cp.nan, dtype=dtype)


def _random(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def _softmax64(x):
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _xent64(z, y):
    z = z.astype(np.float64)
    m = z.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
    return float(np.mean(lse - z[np.arange(len(y)), y]))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (1, 1), (7,), (3, 5), (129, 33), (1000, 1001), (4, 3, 2)])
def test_relu_backward_equals_reference(cp, rng, dtype, shape):
    dy, y = _random(rng, shape, dtype), _random(rng, shape, dtype)
    y.flat[:: 3] = 0.0  # the derivative at exactly 0 is 0
    out = _poisoned(cp, shape, dtype)
    got = cuda.relu_backward(cp.asarray(dy), cp.asarray(y), out=out)
    assert got is out
    np.testing.assert_array_equal(cp.asnumpy(got), np.where(y > 0, dy, 0))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (17, 4), (128, 50), (333, 257), (64, 1024)])
@pytest.mark.parametrize("misaligned", [False, True])
def test_bias_relu_equals_reference(cp, rng, dtype, shape, misaligned):
    x, b = _random(rng, shape, dtype), _random(rng, shape[1:], dtype)
    if misaligned:  # a contiguous view that starts one element in: the scalar path runs
        base = cp.empty(x.size + 1, dtype=dtype)
        xd = base[1:].reshape(shape)
        xd[...] = cp.asarray(x)
    else:
        xd = cp.asarray(x)
    expected = np.maximum(x + b, 0)
    np.testing.assert_array_equal(cp.asnumpy(cuda.bias_relu(xd, cp.asarray(b))), expected)
    inplace = cuda.bias_relu(xd, cp.asarray(b), out=xd)  # out=x works in place
    assert inplace is xd
    np.testing.assert_array_equal(cp.asnumpy(xd), expected)


# Block-per-row widths (> 1024) by path: in registers while cols / V <= R * THREADS, with V = 4 floats
# or 2 doubles where cols allows it (else 1): float32 2048, 3000, 3076 (the fourth register slot,
# 3073-4096), 4096; float64 1026, 2048 (1026-2048). Streamed: 1025, 4099, 12288; float64 3000-4096.
COLS = [1, 2, 3, 10, 16, 17, 33, 100, 257, 1000, 1024, 1025, 1026, 2048, 3000, 3076, 4096, 4099, 12288]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", COLS)
def test_softmax_equals_reference(cp, rng, dtype, cols):
    rows = 37
    x = _random(rng, (rows, cols), dtype, scale=8.0)
    x[0] = 1e4 if dtype == "float64" else 80.0  # a constant row: exact ties
    x[1, 0] = -3e4  # extreme spread: exp underflows to 0, no NaN
    out = _poisoned(cp, x.shape, dtype)
    got = cp.asnumpy(cuda.softmax(cp.asarray(x), out=out))
    np.testing.assert_allclose(got, _softmax64(x), **TOL[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("group", cuda.GROUP_WIDTHS)
@pytest.mark.parametrize("cols", [1, 10, 31, 200])
def test_softmax_every_group_width(cp, rng, group, cols):
    x = _random(rng, (45, cols), "float64", scale=5.0)
    got = cp.asnumpy(cuda.softmax(cp.asarray(x), group=group))
    np.testing.assert_allclose(got, _softmax64(x), **TOL["float64"])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_in_place(cp, rng, dtype):
    for cols in (10, 5000):
        x = _random(rng, (9, cols), dtype)
        xd = cp.asarray(x)
        assert cuda.softmax(xd, out=xd) is xd
        np.testing.assert_allclose(cp.asnumpy(xd), _softmax64(x), **TOL[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label_dtype", ["int32", "int64", "uint8"])
@pytest.mark.parametrize("rows,cols", [(1, 1), (1, 2), (7, 10), (128, 10), (300, 16), (129, 17), (129, 33),
                                       (50, 257), (13, 1025), (11, 1026), (7, 2048), (9, 3000), (6, 3076),
                                       (5, 4096), (5, 4099), (3, 12288)])
def test_softmax_cross_entropy_equals_reference(cp, rng, dtype, label_dtype, rows, cols):
    z = _random(rng, (rows, cols), dtype, scale=4.0)
    y = rng.integers(0, cols, rows).astype(label_dtype)
    grad = _poisoned(cp, z.shape, dtype)
    loss, got = cuda.softmax_cross_entropy(cp.asarray(z), cp.asarray(y), grad_out=grad)
    assert got is grad and loss.shape == () and loss.dtype == np.dtype(dtype)
    onehot = np.eye(cols)[y]
    np.testing.assert_allclose(cp.asnumpy(got), (_softmax64(z) - onehot) / rows, **TOL[dtype])
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == "float32" else dict(rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(float(loss), _xent64(z, y), **tol)


def _wide_path(cp, x):
    """How a block-per-row kernel takes rows like x's: "in registers" or "streamed"."""
    name, _, _ = cuda._row_kernel("softmax", cuda._c_type(x), None, x, x, None)
    v = int(name.rsplit(", ", 1)[1].rstrip(">"))
    registers = int(re.search(r"constexpr int R = (\d+);", cuda.source_path().read_text()).group(1))
    return "in registers" if x.shape[1] // v <= registers * cuda.THREADS else "streamed"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_wide_widths_reach_both_block_paths(cp, dtype):
    """The widths the tests use do run where COLS says (so no wide path goes untested)."""
    paths = {cols: _wide_path(cp, cp.empty((2, cols), dtype)) for cols in (1025, 1026, 2048, 3076, 4096, 4099)}
    if dtype == "float32":
        assert paths == {1025: "streamed", 1026: "streamed", 2048: "in registers", 3076: "in registers",
                         4096: "in registers", 4099: "streamed"}
    else:
        assert paths == {1025: "streamed", 1026: "in registers", 2048: "in registers", 3076: "streamed",
                         4096: "streamed", 4099: "streamed"}


SPECIAL_COLS = [10, 17, 100, 1000, 1026, 2048, 3076, 4096, 4099, 12288]  # every path, both dtypes


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", SPECIAL_COLS)
def test_softmax_of_special_values_equals_the_reference(cp, rng, dtype, cols):
    """-inf gives 0 beside a finite max (NaN on the in-register path once); NaN anywhere and a
    +inf max give a NaN row (the grouped and streamed paths once dropped NaN): as the reference."""
    rows = _special_rows(cols, rng)
    x = np.stack(list(rows.values())).astype(dtype)
    with np.errstate(all="ignore"):
        expected = np.stack([_softmax_reference(row.astype(np.float64)) for row in x])
    groups = [None] + ([1, 8, 32] if cols <= cuda.WIDE_ROW else [])
    for group in groups:
        got = cp.asnumpy(cuda.softmax(cp.asarray(x), out=_poisoned(cp, x.shape, dtype), group=group))
        for i, name in enumerate(rows):
            np.testing.assert_allclose(got[i], expected[i], **TOL[dtype], err_msg=f"{name}, group {group}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", SPECIAL_COLS)
def test_softmax_cross_entropy_of_special_values_equals_the_reference(cp, rng, dtype, cols):
    """Per kind of row, three rows labelled at a finite logit where there is one: the gradient is
    the reference's, and the loss is logsumexp(z) - z[y] (finite beside -inf logits, NaN for a
    NaN or +inf logit or a row of -inf)."""
    for name, row in _special_rows(cols, rng).items():
        z = np.stack([row] * 3).astype(dtype)
        finite = np.flatnonzero(np.isfinite(row))
        label = int(finite[-1]) if finite.size else 0
        y = np.full(3, label)
        with np.errstate(all="ignore"):
            p = _softmax_reference(row.astype(dtype).astype(np.float64))
            loss = np.log(np.sum(np.exp(z[0].astype(np.float64) - np.max(z[0])))) + np.max(z[0]) - z[0, label]
        onehot = np.eye(cols)[label]
        got_loss, grad = cuda.softmax_cross_entropy(cp.asarray(z), cp.asarray(y),
                                                    grad_out=_poisoned(cp, z.shape, dtype))
        np.testing.assert_allclose(cp.asnumpy(grad), np.stack([(p - onehot) / 3] * 3), **TOL[dtype], err_msg=name)
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == "float32" else dict(rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(float(got_loss), loss, **tol, err_msg=name)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", [10, 17, 100, 1000, 1025, 1026, 2048, 3076, 4096, 4099, 12288])
def test_correct_count_is_the_argmax_hits(cp, rng, dtype, cols):
    """The count of rows whose first maximal logit is at the label, on every path: about half
    the rows hit, exact ties count for the first maximum (as argmax has it), -inf logits beside."""
    rows = 300
    z = _random(rng, (rows, cols), dtype)
    y = rng.integers(0, cols, rows)
    hit = rng.random(rows) < 0.5
    z[hit, y[hit]] = z[hit].max(axis=1) + 1
    z[:5] = 1.0  # ties: column 0 is the first maximum, the label in rows 0-2
    y[:3], y[3:5] = 0, cols - 1
    z[5:8, : cols // 2] = -np.inf
    y[5:8] = cols - 1
    expected = int(np.sum(np.argmax(z, axis=1) == y))
    assert 50 < expected < rows - 50
    correct, loss = cp.zeros((), cp.uint64), cp.zeros((), dtype)
    cuda.accumulate_cross_entropy(cp.asarray(z), cp.asarray(y), cp.empty(z.shape, dtype), loss, 1.0 / rows,
                                  1.0 / rows, correct)
    assert int(correct) == expected
    np.testing.assert_allclose(float(loss), _xent64(z, y), rtol=1e-5 if dtype == "float32" else 1e-12)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_elementwise_kernels_past_their_unrolled_loops(cp, dtype):
    """So many elements (~52-80M on an H100) that every thread of the capped grid runs the
    unrolled loop (U vector loads in flight), then the vector and scalar remainders: each
    element equals the reference."""
    U = int(re.search(r"constexpr int U = (\d+);", cuda.source_path().read_text()).group(1))
    v = 16 // np.dtype(dtype).itemsize
    stride = cuda.blocks_for(10**15) * cuda.THREADS  # threads of the capped grid
    vectors = U * stride + stride // 2 + 1  # all threads once through the unrolled loop, half of them on
    draw = cp.random.RandomState(7)
    n = vectors * v + 3  # and a scalar tail
    dy, y = draw.standard_normal(n, dtype=dtype), draw.standard_normal(n, dtype=dtype)
    y[::5] = 0
    assert cuda.blocks_for(-(-n // v)) * cuda.THREADS == stride
    got = cuda.relu_backward(dy, y, out=_poisoned(cp, n, dtype))
    assert int(cp.count_nonzero(got != cp.where(y > 0, dy, 0))) == 0
    del got, dy, y
    f = 24 * v  # a row of 24 vectors: the column is a vector index modulo 24
    x = draw.standard_normal((-(-vectors * v // f), f), dtype=dtype)
    b = draw.standard_normal(f, dtype=dtype)
    got = cuda.bias_relu(x, b, out=_poisoned(cp, x.shape, dtype))
    assert int(cp.count_nonzero(got != cp.maximum(x + b, 0))) == 0


@pytest.mark.cuda
def test_kernels_run_on_every_gpu(cp, rng):
    """Each device gets the kernels compiled for it (they were once cached by name only)."""
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("one GPU here; the per-device cache is tested against a stand-in above")
    x = _random(rng, (5, 40), "float32")
    for device in (0, 1, 0):
        with cp.cuda.Device(device):
            got = cuda.softmax(cp.asarray(x))
            assert got.device.id == device
            np.testing.assert_allclose(cp.asnumpy(got), _softmax64(x), **TOL["float32"])


@pytest.mark.cuda
def test_softmax_cross_entropy_in_place_and_extremes(cp, rng):
    z = _random(rng, (64, 10), "float64") * 1e3  # logits far apart: loss from logits, no log(0)
    y = rng.integers(0, 10, 64)
    zd = cp.asarray(z)
    loss, grad = cuda.softmax_cross_entropy(zd, cp.asarray(y), grad_out=zd)
    assert grad is zd and np.isfinite(float(loss))
    np.testing.assert_allclose(float(loss), _xent64(z, y), rtol=1e-12)
    np.testing.assert_allclose(cp.asnumpy(grad), (_softmax64(z) - np.eye(10)[y]) / 64, atol=1e-15)


@pytest.mark.cuda
def test_softmax_cross_entropy_out_of_range_label_is_nan(cp, rng):
    z = cp.asarray(_random(rng, (4, 10), "float32"))
    loss, _ = cuda.softmax_cross_entropy(z, cp.asarray([1, 2, 10, 3]))
    assert np.isnan(float(loss))


@pytest.mark.cuda
def test_softmax_cross_entropy_gradient_by_finite_differences(cp, rng):
    """The kernel's gradient is the derivative of the kernel's own loss (float64)."""
    z = _random(rng, (6, 10), "float64")
    y = cp.asarray(rng.integers(0, 10, 6))
    _, grad = cuda.softmax_cross_entropy(cp.asarray(z), y)
    numeric = central_differences(lambda a: float(cuda.softmax_cross_entropy(cp.asarray(a), y)[0]), z)
    np.testing.assert_allclose(cp.asnumpy(grad), numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.cuda
def test_odd_shapes_beyond_one_grid(cp, rng):
    """More rows than a capped grid has threads: the grid-stride loops cover them all."""
    rows = 40 * cuda.blocks_for(10**12) * cuda.THREADS // 32 + 3
    z = _random(rng, (rows, 3), "float32")
    y = rng.integers(0, 3, rows)
    loss, grad = cuda.softmax_cross_entropy(cp.asarray(z), cp.asarray(y))
    np.testing.assert_allclose(cp.asnumpy(grad), (_softmax64(z) - np.eye(3)[y]) / rows, rtol=2e-5, atol=1e-9)
    np.testing.assert_allclose(float(loss), _xent64(z, y), rtol=1e-4)
    assert cuda.blocks_for(0) == 1 and cuda.blocks_for(1) == 1


@pytest.mark.cuda
def test_empty_inputs(cp):
    assert cuda.relu_backward(cp.empty(0), cp.empty(0)).shape == (0,)
    assert cuda.softmax(cp.empty((0, 10))).shape == (0, 10)
    loss, grad = cuda.softmax_cross_entropy(cp.empty((0, 10)), cp.empty(0, dtype=cp.int64))
    assert np.isnan(float(loss)) and grad.shape == (0, 10)


@pytest.mark.cuda
def test_bad_arguments_raise_naming_the_problem(cp):
    x = cp.ones((8, 6), dtype=cp.float32)
    with pytest.raises(ValueError, match="not C-contiguous"):
        cuda.softmax(x.T)
    with pytest.raises(ValueError, match="not C-contiguous"):
        cuda.relu_backward(x[:, ::2], x[:, ::2])
    with pytest.raises(TypeError, match="one dtype"):
        cuda.relu_backward(x, x.astype(cp.float64))
    with pytest.raises(TypeError, match="float16"):
        cuda.softmax(x.astype(cp.float16))
    with pytest.raises(TypeError, match="cupy.ndarray"):
        cuda.softmax(np.ones((2, 2), np.float32))
    with pytest.raises(TypeError, match="labels has dtype float32"):
        cuda.softmax_cross_entropy(x, cp.zeros(8, cp.float32))
    with pytest.raises(ValueError, match="labels must have shape"):
        cuda.softmax_cross_entropy(x, cp.zeros(7, cp.int64))
    with pytest.raises(ValueError, match="bias of shape"):
        cuda.bias_relu(x, cp.ones(5, cp.float32))
    with pytest.raises(ValueError, match="out has shape"):
        cuda.softmax(x, out=cp.empty((8, 5), cp.float32))
    with pytest.raises(TypeError, match="out has dtype"):
        cuda.softmax(x, out=cp.empty((8, 6), cp.int32))


@pytest.mark.cuda
def test_dispatch_picks_the_cuda_kernels(cp, rng, monkeypatch):
    monkeypatch.delenv("XPNET_KERNELS", raising=False)
    x = cp.asarray(_random(rng, (5, 10), "float32"))
    y = cp.asarray(rng.integers(0, 10, 5))
    assert kernels.select("softmax", "auto", x) is cuda.softmax
    assert kernels.select("softmax_cross_entropy", "auto", x, y) is cuda.softmax_cross_entropy
    assert kernels.select("softmax", "auto", x.T) is None  # a strided view: the reference runs
    np.testing.assert_allclose(cp.asnumpy(F.softmax(x, impl="cuda")), cp.asnumpy(F.softmax(x, impl="xp")), rtol=1e-6)
    with pytest.raises(ValueError, match="not C-contiguous"):
        F.softmax(x.T, impl="cuda")


# --- the GEMMs and the graph trainer ---------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (128, 50, 784), (33, 65, 31), (96, 10, 25), (7, 300, 129)])
def test_gemm_forms_equal_matmul(cp, rng, dtype, M, N, K):
    i32 = np.int32
    eps = np.finfo(dtype).eps

    def close(got, expected, bound):
        """Within the rounding bound of a length-k dot product: |err| <= k eps sum|a_i b_i|."""
        assert np.all(np.abs(got - expected) <= bound), np.max(np.abs(got - expected) / (bound + 1e-300))
    t = cuda.FLOATS[dtype]
    a, w, b = _random(rng, (M, K), dtype), _random(rng, (K, N), dtype), _random(rng, (N,), dtype)
    A, W, Bv = cp.asarray(a), cp.asarray(w), cp.asarray(b)
    grid = lambda m, n: (-(-n // 32), -(-m // 32))  # noqa: E731

    def run(form, A_, B_, C, aux, m, n, k, lda, ldb, ldc, extra=0):
        cuda.kernel(f"gemm<{t}, {cuda.GEMM_FORMS[form]}>")(
            grid(m + extra, n), (256,), (A_, B_, C, aux, i32(m), i32(n), i32(k), i32(lda), i32(ldb), i32(ldc), i32(k)))
        return cp.asnumpy(C)

    a64, w64 = a.astype(np.float64), w.astype(np.float64)
    ref, bound = a64 @ w64, (K + 1) * eps * (np.abs(a64) @ np.abs(w64) + np.abs(b))
    close(run("forward", A, W, _poisoned(cp, (M, N), dtype), Bv, M, N, K, K, N, N), ref + b, bound)
    close(run("forward_relu", A, W, _poisoned(cp, (M, N), dtype), Bv, M, N, K, K, N, N), np.maximum(ref + b, 0), bound)
    dy, h = _random(rng, (M, N), dtype).astype(np.float64), _random(rng, (M, K), dtype).astype(np.float64)
    dx, bound = dy @ w64.T, N * eps * (np.abs(dy) @ np.abs(w64.T))
    dyd = cp.asarray(dy.astype(dtype))
    close(run("input_grad", dyd, W, _poisoned(cp, (M, K), dtype), Bv, M, K, N, N, N, K), dx, bound)
    close(run("input_grad_relu", dyd, W, _poisoned(cp, (M, K), dtype), cp.asarray(h.astype(dtype)),
              M, K, N, N, N, K), np.where(h > 0, dx, 0), bound)
    db = _poisoned(cp, (N,), dtype)
    dW = run("weight_grad", cp.asarray(h.astype(dtype)), dyd, _poisoned(cp, (K, N), dtype), db, K, N, M, K, N, N, extra=1)
    close(dW, h.T @ dy, M * eps * (np.abs(h.T) @ np.abs(dy)))
    close(cp.asnumpy(db), dy.sum(axis=0), M * eps * np.abs(dy).sum(axis=0))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K,kc", [(128, 50, 784, 64), (128, 50, 784, 96), (33, 65, 300, 64), (1, 1, 257, 32),
                                      (7, 300, 1000, 320), (96, 10, 40, 32)])
def test_split_k_products_equal_matmul(cp, rng, dtype, M, N, K, kc):
    """x @ W in slices of K (the last one short where kc does not divide K), each into its own
    slice of the partial sums, then added up with the bias (and ReLU): the forward product the
    graph trainer splits (k_splits). Every partial and every output is poisoned first."""
    i32 = np.int32
    t = cuda.FLOATS[dtype]
    S = -(-K // kc)
    a, w, b = _random(rng, (M, K), dtype), _random(rng, (K, N), dtype), _random(rng, (N,), dtype)
    A, W, Bv = cp.asarray(a), cp.asarray(w), cp.asarray(b)
    partials = _poisoned(cp, (S, M, N), dtype)
    cuda.kernel(f"gemm<{t}, {cuda.GEMM_FORMS['partial']}>")(
        (-(-N // 32), -(-M // 32), S), (256,), (A, W, partials, Bv, i32(M), i32(N), i32(K), i32(K), i32(N), i32(N), i32(kc)))
    a64, w64 = a.astype(np.float64), w.astype(np.float64)
    eps = np.finfo(dtype).eps
    for z in range(S):  # each slice holds its own part of K and nothing else
        lo, hi = z * kc, min(K, (z + 1) * kc)
        part = a64[:, lo:hi] @ w64[lo:hi]
        bound = (hi - lo) * eps * (np.abs(a64[:, lo:hi]) @ np.abs(w64[lo:hi]))
        assert np.all(np.abs(cp.asnumpy(partials[z]) - part) <= bound), z
    bound = (K + S + 1) * eps * (np.abs(a64) @ np.abs(w64) + np.abs(b))
    for epi, expected in ((1, a64 @ w64 + b), (2, np.maximum(a64 @ w64 + b, 0))):
        out = _poisoned(cp, (M, N), dtype)
        cuda.kernel(f"sum_splits<{t}, {epi}>")((cuda.blocks_for(M * N),), (cuda.THREADS,),
                                               (partials, out, Bv, i32(M), i32(N), i32(S)))
        got = cp.asnumpy(out)
        assert np.all(np.abs(got - expected) <= bound), np.max(np.abs(got - expected) / bound)


OPTIMIZERS = {
    "sgd": lambda: optim.SGD(0.1),
    "momentum": lambda: optim.SGD(0.1, momentum=0.9, weight_decay=1e-2),
    "nesterov": lambda: optim.SGD(0.1, momentum=0.9, nesterov=True),
    "adam": lambda: optim.Adam(1e-2, betas=(0.9, 0.999)),
    "adam, other betas": lambda: optim.Adam(3e-3, betas=(0.8, 0.99), eps=1e-6),
}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_the_fused_update_equals_the_optimizers_step(cp, rng, dtype, name):
    """update_parameters, three steps over two tensors, against xpnet.optim on the host. In float32
    Adam with beta2 = 0.999, v tells 1 - beta2 rounded from double (as xpnet.optim passes it) from
    1 - float32(beta2): they are 1.3e-5 apart."""
    from xpnet.kernels.cuda_graph import update_hyperparameters

    host_opt, opt = OPTIMIZERS[name](), OPTIMIZERS[name]()
    adam = isinstance(opt, optim.Adam)
    shapes = [(7, 5), (5,)]
    host = [_random(rng, shape, dtype) for shape in shapes]
    flat = cp.asarray(np.concatenate([p.ravel() for p in host]))
    offsets = np.cumsum([0] + [int(np.prod(shape)) for shape in shapes])
    params = [flat[lo:hi].reshape(shape) for lo, hi, shape in zip(offsets[:-1], offsets[1:], shapes)]
    total = int(offsets[-1])
    state1, state2 = cp.zeros(total, dtype), cp.zeros(total, dtype)
    counters = cp.zeros(2, cp.int64)
    update = cuda.kernel(f"update_parameters<{cuda.FLOATS[dtype]}, {int(adam)}>")
    for t in (1, 2, 3):
        grads = [_random(rng, shape, dtype) for shape in shapes]
        host_opt.step(host, grads)
        counters[1] = t  # Adam's update count, which gather_rows advances in a training step
        update((1,), (cuda.THREADS,), (
            cp.asarray(np.array([p.data.ptr for p in params], np.uint64)), cp.asarray(offsets), np.int32(len(shapes)),
            cp.asarray(np.concatenate([g.ravel() for g in grads])), state1, state2,
            cp.asarray(update_hyperparameters(opt)), counters))
    # a few ulps: the kernel's fused multiply-adds round once where NumPy rounds twice
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == "float32" else dict(rtol=1e-13, atol=1e-14)
    for got, expected in zip(params, host):
        np.testing.assert_allclose(cp.asnumpy(got), expected, **tol)
    if adam:
        m = np.concatenate([s["m"].ravel() for s in host_opt.state])
        v = np.concatenate([s["v"].ravel() for s in host_opt.state])
        np.testing.assert_allclose(cp.asnumpy(state1), m, **tol)
        # a sum of squares, no cancellation: relative to the value alone (a NumPy emulation of the
        # kernel's rounding stays within 0.3 of this bound; the old 1 - float32(beta2), 13 times over)
        np.testing.assert_allclose(cp.asnumpy(state2), v, rtol=tol["rtol"], atol=0)
    elif opt.momentum:
        np.testing.assert_allclose(cp.asnumpy(state1), np.concatenate([s["v"].ravel() for s in host_opt.state]), **tol)


def _eager_epoch(model, opt, X, y, order, batch):
    xp = model.backend.xp
    params = model.parameters()
    loss_sum, correct = 0.0, 0
    for lo in range(0, X.shape[0], batch):
        idx = order[lo: lo + batch]
        xb, yb = xp.take(X, idx, axis=0), xp.take(y, idx, axis=0)
        logits = model.forward(xb, training=True)
        loss, dlogits = F.softmax_cross_entropy(logits, yb, impl="xp")
        model.backward(dlogits)
        opt.step(params, model.gradients())
        loss_sum += float(loss) * int(yb.shape[0])
        correct += int(xp.sum(xp.argmax(logits, axis=1) == yb))
    return loss_sum, correct


# graph vs eager: float64 agrees to rounding; float32 to the different summation orders of the
# graph's GEMMs and cuBLAS, a few ulps per step
GRAPH_TOL = {"float64": dict(rtol=1e-10, atol=1e-12), "float32": dict(rtol=1e-4, atol=1e-5)}
LOSS_REL = {"float64": 1e-12, "float32": 1e-5}


def _assert_same_weights(model0, model1, dtype):
    for (W0, b0), (W1, b1) in zip(model0.get_weights(), model1.get_weights()):
        np.testing.assert_allclose(W0, W1, **GRAPH_TOL[dtype])
        np.testing.assert_allclose(b0, b1, **GRAPH_TOL[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("widths", [[20, 33, 17, 7], [300, 33, 7]], ids=["short K", "first product split"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("optimizer", [
    dict(name="sgd", lr=0.05),
    dict(name="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3),
    dict(name="sgd", lr=0.05, momentum=0.9, nesterov=True),
    dict(name="adam", lr=1e-3, weight_decay=1e-4),
    dict(name="adam", lr=1e-3, schedule="cosine"),
])
def test_graph_trainer_equals_the_eager_loop(cp, rng, dtype, optimizer, widths):
    """Three epochs through the captured graphs leave the same weights as the eager loop, with a
    last batch shorter than the others (103 = 3 * 32 + 7), in both dtypes; with a first layer
    whose forward product is split along K (300 inputs) and one whose is not."""
    from xpnet.kernels.cuda_graph import GraphTrainer
    from xpnet.optim import make_optimizer

    settings = dict(optimizer)
    name = settings.pop("name")
    X = cp.asarray(rng.standard_normal((103, widths[0])).astype(dtype))
    y = cp.asarray(rng.integers(0, 7, 103))
    models = [xpnet.MLP(widths, dtype=dtype, seed=3, backend="cuda") for _ in range(2)]
    opts = [make_optimizer(name, **settings) for _ in range(2)]
    trainer = GraphTrainer(models[0], opts[0], X, y, batch_size=32)
    split = sum(S > 1 for S, _ in trainer.splits[32])
    assert split == (widths[0] == 300)  # the GPU has more SMs than 2 x the 2 output tiles
    assert trainer.launches_per_step == 3 * (len(widths) - 1) + 2 + split
    for epoch in range(3):
        order = cp.asarray(np.random.default_rng(epoch).permutation(103))
        for opt in opts:
            opt.start_epoch(epoch, 3)
        loss_sum, correct = trainer.run_epoch(order)
        eager_loss, eager_correct = _eager_epoch(models[1], opts[1], X, y, order, 32)
        assert float(loss_sum) == pytest.approx(eager_loss, rel=LOSS_REL[dtype])
        assert int(correct) == eager_correct
    _assert_same_weights(*models, dtype)
    if name == "adam":
        assert opts[0].state[0]["t"] == 3 * 4


@pytest.mark.cuda
def test_graph_trainer_refuses_momentum_turned_on_after_capture(cp, rng):
    """Momentum 0 at capture means no velocity buffer (a one-element stand-in): turning momentum on
    later (as a callback may) is refused before any launch, where it once wrote past that
    buffer. Momentum on at capture may change, and off, as xpnet.optim allows."""
    from xpnet.kernels.cuda_graph import GraphTrainer

    X = cp.asarray(rng.standard_normal((103, 20)))
    y = cp.asarray(rng.integers(0, 7, 103))
    model = xpnet.MLP([20, 33, 17, 7], dtype="float64", seed=3, backend="cuda")
    opt = optim.SGD(0.05)
    trainer = GraphTrainer(model, opt, X, y, batch_size=32)
    trainer.run_epoch()
    before = model.get_weights()
    opt.momentum = 0.9
    with pytest.raises(ValueError, match="momentum is 0.9 but was 0 when this GraphTrainer captured"):
        trainer.run_epoch()
    for (W0, b0), (W1, b1) in zip(before, model.get_weights()):
        np.testing.assert_array_equal(W0, W1)
        np.testing.assert_array_equal(b0, b1)

    models = [xpnet.MLP([20, 33, 17, 7], dtype="float64", seed=3, backend="cuda") for _ in range(2)]
    opts = [optim.SGD(0.05, momentum=0.9), optim.SGD(0.05, momentum=0.9)]
    trainer = GraphTrainer(models[0], opts[0], X, y, batch_size=32)
    for epoch, momentum in enumerate((0.9, 0.5, 0.0)):
        for o in opts:
            o.momentum = momentum
        order = cp.asarray(np.random.default_rng(epoch).permutation(103))
        trainer.run_epoch(order)
        _eager_epoch(models[1], opts[1], X, y, order, 32)
    _assert_same_weights(*models, "float64")


@pytest.mark.cuda
def test_graph_trainer_refuses_data_its_kernels_would_misread(cp, rng, monkeypatch):
    """X of another dtype or width, labels that are not integers, and an epoch order outside
    [0, N) are refused at the trainer's own boundary (fit never passes them; a caller might)."""
    from xpnet.kernels.cuda_graph import GraphTrainer, why_not

    monkeypatch.delenv("XPNET_CUDA_GRAPHS", raising=False)
    model = xpnet.MLP([20, 8, 3], dtype="float32", seed=0, backend="cuda")
    opt = optim.SGD(0.1)
    X = cp.asarray(rng.standard_normal((10, 20)).astype(np.float32))
    y = cp.asarray(rng.integers(0, 3, 10))
    assert why_not(model, opt, X, 4) is None
    assert why_not(model, opt, X.astype(cp.float64), 4).startswith("X has dtype float64")
    with pytest.raises(TypeError, match="X has dtype float64, the model float32"):
        GraphTrainer(model, opt, X.astype(cp.float64), y, 4)
    with pytest.raises(ValueError, match=r"shape \(N >= 1, 20\)"):
        GraphTrainer(model, opt, cp.ascontiguousarray(X[:, :19]), y, 4)
    with pytest.raises(TypeError, match="cupy.ndarray"):
        GraphTrainer(model, opt, cp.asnumpy(X), y, 4)
    with pytest.raises(TypeError, match="integer labels"):
        GraphTrainer(model, opt, X, y.astype(cp.float32), 4)
    with pytest.raises(ValueError, match=r"y must have shape \(10,\)"):
        GraphTrainer(model, opt, X, y[:9], 4)
    trainer = GraphTrainer(model, opt, X, y, 4)
    for order, error, match in [
        (cp.arange(1, 11), ValueError, r"in \[0, 10\), got values in \[1, 10\]"),
        (cp.arange(-1, 9), ValueError, r"in \[0, 10\)"),
        (cp.arange(9), ValueError, r"shape \(10,\)"),
        (cp.arange(10.0), TypeError, "row indices"),
        (np.arange(10), TypeError, "row indices"),
    ]:
        with pytest.raises(error, match=match):
            trainer.run_epoch(order)
    loss_sum, correct = trainer.run_epoch(cp.arange(10)[::-1])  # a valid order still trains
    assert np.isfinite(float(loss_sum)) and 0 <= int(correct) <= 10


def _fit_metrics(history):
    return {k: history[k] for k in ("loss", "accuracy", "val_loss", "val_accuracy")}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("optimizer", [dict(optimizer="sgd", lr=0.05, momentum=0.9), dict(optimizer="adam", lr=3e-3)])
def test_fit_through_graphs_equals_fit_eager(cp, rng, monkeypatch, dtype, optimizer):
    """fit through the graph trainer and through the eager CUDA loop (XPNET_CUDA_GRAPHS=0): the
    same history and weights, with a learning-rate schedule, validation data and early stopping
    (which ends both runs after their second epoch of six)."""
    from xpnet.callbacks import EarlyStopping
    from xpnet.kernels.cuda_graph import GraphTrainer

    replays = []
    run_epoch = GraphTrainer.run_epoch
    monkeypatch.setattr(GraphTrainer, "run_epoch", lambda self, order=None: replays.append(1) or run_epoch(self, order))
    X = rng.standard_normal((300, 20)).astype(dtype)
    y = rng.integers(0, 5, 300)
    runs = {}
    for graphs in ("1", "0"):
        monkeypatch.setenv("XPNET_CUDA_GRAPHS", graphs)
        model = xpnet.MLP([20, 32, 16, 5], dtype=dtype, seed=4, backend="cuda")
        stop = EarlyStopping("val_loss", patience=1, min_delta=1.0, restore_best_weights=False)
        history = model.fit(X, y, epochs=6, batch_size=32, schedule="cosine", validation_split=0.2,
                            callbacks=[stop], verbose=0, on_divergence="ignore", **optimizer)
        runs[graphs] = (model, history)
        assert len(history.epoch) == 2 and stop.stopped_epoch == 1
        assert len(replays) == (2 if graphs == "1" else 0)
        replays.clear()
    (graph_model, graph_history), (eager_model, eager_history) = runs["1"], runs["0"]
    assert graph_history["lr"] == eager_history["lr"] and graph_history["lr"][1] < graph_history["lr"][0]
    for key, values in _fit_metrics(graph_history).items():
        if "loss" in key:
            assert values == pytest.approx(eager_history[key], rel=LOSS_REL[dtype]), key
        else:  # float32: a logit tie may fall the other way, one sample of 60 validation rows
            assert values == pytest.approx(eager_history[key], abs=1 / 60 if dtype == "float32" else 0), key
    _assert_same_weights(graph_model, eager_model, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
def test_fit_on_the_eager_cuda_path_equals_the_cpu(cp, rng, monkeypatch, activation):
    """fit with graphs off and layers the graph path does not cover, from uint8 images on the
    device (scaled there, batches gathered there): the CPU's history and weights (float64)."""
    monkeypatch.setenv("XPNET_CUDA_GRAPHS", "0")
    X = rng.integers(0, 256, (200, 6, 6), dtype=np.uint8)
    y = rng.integers(0, 4, 200)
    runs = {}
    for backend, data in (("cpu", X), ("cuda", cp.asarray(X))):
        model = xpnet.MLP([36, 16, 8, 4], activation=activation, dtype="float64", seed=2, backend=backend)
        history = model.fit(data, y, epochs=3, batch_size=32, lr=0.1, momentum=0.9, validation_split=0.2,
                            verbose=0, on_divergence="ignore")
        runs[backend] = (model, history)
    (cpu_model, cpu_history), (cuda_model, cuda_history) = runs["cpu"], runs["cuda"]
    assert len(cuda_history.epoch) == 3
    for key, values in _fit_metrics(cuda_history).items():
        assert values == pytest.approx(cpu_history[key], rel=1e-9), key
    _assert_same_weights(cuda_model, cpu_model, "float64")


@pytest.mark.cuda
@pytest.mark.slow
def test_training_on_cuda_matches_cpu_accuracy(mnist):
    """Same seed, same data: the CUDA backend learns MNIST as well as the CPU (one epoch)."""
    X_train, y_train, X_test, y_test = mnist
    scores = {}
    for backend in ("cpu", "cuda"):
        model = xpnet.MLP([784, 50, 25, 10], seed=0, backend=backend)
        model.fit(X_train, y_train, epochs=2, batch_size=128, lr=0.1, verbose=0)
        scores[backend] = model.score(X_test, y_test)
    assert scores["cuda"] > 0.9
    assert abs(scores["cuda"] - scores["cpu"]) < 0.005, scores
