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
from pathlib import Path

import numpy as np
import pytest

import xpnet
from conftest import central_differences
from xpnet import functional as F
from xpnet import kernels
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


COLS = [1, 2, 3, 10, 16, 17, 33, 100, 257, 1000, 1024, 1025, 3000, 4099, 12288]


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
                                       (50, 257), (13, 1025), (9, 3000), (5, 4099), (3, 12288)])
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
            grid(m + extra, n), (256,), (A_, B_, C, aux, i32(m), i32(n), i32(k), i32(lda), i32(ldb), i32(ldc)))
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


@pytest.mark.cuda
@pytest.mark.parametrize("optimizer", [
    dict(name="sgd", lr=0.05),
    dict(name="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3),
    dict(name="sgd", lr=0.05, momentum=0.9, nesterov=True),
    dict(name="adam", lr=1e-3, weight_decay=1e-4),
])
def test_graph_trainer_equals_the_eager_loop(cp, rng, optimizer):
    """Two epochs through the captured graphs leave the same float64 weights as the eager loop,
    with a last batch shorter than the others (103 = 3 * 32 + 7)."""
    from xpnet.kernels.cuda_graph import GraphTrainer
    from xpnet.optim import make_optimizer

    settings = dict(optimizer)
    name = settings.pop("name")
    X = cp.asarray(rng.standard_normal((103, 20)))
    y = cp.asarray(rng.integers(0, 7, 103))
    models = [xpnet.MLP([20, 33, 17, 7], dtype="float64", seed=3, backend="cuda") for _ in range(2)]
    opts = [make_optimizer(name, **settings) for _ in range(2)]
    trainer = GraphTrainer(models[0], opts[0], X, y, batch_size=32)
    assert trainer.launches_per_step == 3 * 3 + 2
    for epoch in range(2):
        order = cp.asarray(np.random.default_rng(epoch).permutation(103))
        for opt in opts:
            opt.start_epoch(epoch, 2)
        loss_sum, correct = trainer.run_epoch(order)
        eager_loss, eager_correct = _eager_epoch(models[1], opts[1], X, y, order, 32)
        assert float(loss_sum) == pytest.approx(eager_loss, rel=1e-12)
        assert int(correct) == eager_correct
    for (W0, b0), (W1, b1) in zip(models[0].get_weights(), models[1].get_weights()):
        np.testing.assert_allclose(W0, W1, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(b0, b1, rtol=1e-10, atol=1e-12)
    if name == "adam":
        assert opts[0].state[0]["t"] == 2 * 4


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
