"""Training benchmarks on the real MNIST: one step, one epoch and a full 10-epoch run.

For each configuration (seed 002's 784-50-25-10, and 784-256-128-10; batch 128, plain SGD
lr 0.1, float32) and each implementation:

- ``xpnet``: ``MLP.fit`` as users run it: on the uint8 images as ``load_mnist`` returns them
  (fit keeps them uint8 and its step scales each gathered batch by 1/255), kernels and the
  NumPy fast path on (``XPNET_KERNELS`` unset);
- ``xpnet-float32``: the same on the float32 array PyTorch gets (scaled once, untimed);
- ``xpnet-xp``: float32 with ``XPNET_KERNELS=xp``: the reference path, no kernels;
- ``torch``: the same model in PyTorch CPU eager (float32, same batches and epochs, its default
  threads), skipped when torch is not installed;
- ``jax-scan``: JAX with each epoch one jitted XLA program (``lax.scan`` over the batches,
  ``peers.JaxScanEpoch``, its own shuffling), from xpnet's initial weights; compiled before the
  clock starts; skipped with a reason where JAX is not installed (``pip install -e ".[jax]"``);
  not in the one-step rows (its step exists only inside the epoch program);
- ``gemm-floor``: only the step's matrix products (3 forward, 3 ``dW``, 2 ``dx``), same shapes
  and dtype, the same number of steps: what a step can never beat;
- ``gemm-floor+gather`` (step only): the same products plus gathering a random batch of 128
  rows from the 188 MB training set, which every implementation must also do.

All run in one process, side by side. Every implementation but ``xpnet`` gets its inputs scaled
to float32 once, outside the timing (PyTorch's best case); ``xpnet`` pays its per-batch scaling
inside. The full runs record test accuracy in ``extra_info`` ("equal accuracy").
Quick mode (XPNET_BENCH_QUICK=1) trains on 2,048 images for 1-2 epochs so CI stays fast.

Benchmarks check before they time: every implementation's training step is run once, untimed,
from the same weights on the same batch and compared with one step of plain SGD written out in
NumPy (float64), and the xpnet implementations must run the step they claim (the Numba step for
``xpnet``/``xpnet-float32``, the reference for ``xpnet-xp``; numba missing fails, never skips).
Trainings then assert a minimum test accuracy (``MIN_ACCURACY``) and that they beat their own
untrained model.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest

import xpnet
from xpnet.optim import make_optimizer

from conftest import QUICK, gemm_floor_step

CONFIGS = {"784-50-25-10": [784, 50, 25, 10], "784-256-128-10": [784, 256, 128, 10]}
if QUICK:
    CONFIGS = {"784-50-25-10": CONFIGS["784-50-25-10"]}
BATCH, LR, SEED = 128, 0.1, 2
RUN_EPOCHS = 2 if QUICK else 10
IMPLS = ["xpnet", "xpnet-float32", "xpnet-xp", "torch", "jax-scan", "gemm-floor"]
STEP_IMPLS = [impl for impl in IMPLS if impl != "jax-scan"] + ["gemm-floor+gather"]
# Test accuracy a training must reach. Measured (seed 2, 784-50-25-10 / 784-256-128-10): one epoch
# 0.904 / 0.939 (PyTorch 0.901), ten epochs 0.970. Quick mode's 2,048 images allow no absolute
# bar (PyTorch's init learns slowly: 0.16 after one quick epoch), so there only the gain over the
# untrained model counts (MIN_GAIN; untrained models score 0.07-0.13).
MIN_ACCURACY = {"epoch": 0.0, "run": 0.0} if QUICK else {"epoch": 0.85, "run": 0.95}
MIN_GAIN = 0.03


def _data_root():
    root = os.environ.get("XPNET_DATA")
    if root:
        return Path(root) / "mnist"
    sibling = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
    return sibling if sibling.is_dir() else None


@functools.lru_cache(maxsize=1)
def mnist_pixels():
    """(X_train uint8 (N, 784), y_train int64, X_test uint8, y_test), or skip without the data."""
    from xpnet.datasets import load_mnist

    root = _data_root()
    if root is None:
        pytest.skip("real MNIST not found: set XPNET_DATA to the folder holding mnist/")
    X, y = load_mnist("train", root=root, download=False, progressbar=False)
    Xt, yt = load_mnist("test", root=root, download=False, progressbar=False)
    flat = lambda a: np.ascontiguousarray(a.reshape(len(a), -1))
    X, y, Xt, yt = flat(X), y.astype(np.int64), flat(Xt), yt.astype(np.int64)
    if QUICK:
        X, y = X[:2048], y[:2048]
    return X, y, Xt, yt


@functools.lru_cache(maxsize=1)
def mnist():
    """``mnist_pixels()`` with the images as float32 in [0, 1], scaled as MLP does."""
    from xpnet.functional import scale_pixels

    X, y, Xt, yt = mnist_pixels()
    return scale_pixels(X, np.dtype(np.float32)), y, scale_pixels(Xt, np.dtype(np.float32)), yt


def _train_inputs(impl):
    """The training images an implementation gets: uint8 for ``xpnet``, float32 otherwise."""
    return mnist_pixels()[0] if impl == "xpnet" else mnist()[0]


def _steps_per_epoch(n):
    return -(-n // BATCH)


# --- xpnet -----------------------------------------------------------------------------------------


def _xpnet_model(widths):
    return xpnet.MLP(widths, seed=SEED, dtype="float32", backend="cpu")


def _xpnet_step_fn(model, X, y):
    """One training step exactly as ``fit`` runs it (fast path when it applies)."""
    from xpnet.training import _training_step

    opt = make_optimizer("sgd", lr=LR)
    params = model.parameters()
    train_step = _training_step(model, BATCH)  # the Numba step where it applies, else the reference
    order = np.random.default_rng(0).permutation(X.shape[0])
    position = [0]

    def step():
        lo = position[0]
        position[0] = (lo + BATCH) % (X.shape[0] - BATCH + 1)
        train_step(*train_step.take_batch(X, y, order[lo : lo + BATCH]))
        opt.step(params, train_step.gradients())  # its fused update on NumPy

    return step


# --- torch -----------------------------------------------------------------------------------------


def _torch_setup(widths, X, y):
    torch = pytest.importorskip("torch")
    torch.manual_seed(SEED)
    layers = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers[:-1])
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    return torch, net, opt, torch.from_numpy(X), torch.from_numpy(y)


def _torch_epoch(torch, net, opt, Xt, yt):
    order = torch.randperm(Xt.shape[0])
    for lo in range(0, Xt.shape[0], BATCH):
        idx = order[lo : lo + BATCH]
        xb, yb = Xt[idx], yt[idx]
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(net(xb), yb)
        loss.backward()
        opt.step()


def _torch_accuracy(torch, net, X, y):
    with torch.no_grad():
        return float((net(torch.from_numpy(X)).argmax(1).numpy() == y).mean())


# --- the check before timing -------------------------------------------------------------------------


def _numpy_sgd_step(weights, X, y, lr):
    """One plain SGD step of a ReLU MLP on the mean cross-entropy, in float64, written out here."""
    hs = [np.asarray(X, np.float64)]
    for i, (W, b) in enumerate(weights):
        z = hs[-1] @ W + b
        hs.append(np.maximum(z, 0) if i < len(weights) - 1 else z)
    p = np.exp(hs[-1] - hs[-1].max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    dz = p
    dz[np.arange(len(y)), y] -= 1
    dz /= len(y)
    new = list(weights)
    for i in range(len(weights) - 1, -1, -1):
        W, b = weights[i]
        new[i] = (W - lr * (hs[i].T @ dz), b - lr * dz.sum(axis=0))
        if i > 0:
            dz = (dz @ W.T) * (hs[i] > 0)
    return new


def _assert_step_matches(after, expected, what):
    for i, ((W, b), (W_ref, b_ref)) in enumerate(zip(after, expected)):
        # float32 products over 784 inputs against float64: a few float32 ulps of the weights
        np.testing.assert_allclose(W, W_ref, rtol=1e-5, atol=1e-6, err_msg=f"{what}: layer {i} W")
        np.testing.assert_allclose(b, b_ref, rtol=1e-5, atol=1e-6, err_msg=f"{what}: layer {i} b")


def _check_step(impl, widths):
    """Run ``impl``'s training step once from xpnet's seeded initial weights on the first batch
    and compare the weights it leaves with ``_numpy_sgd_step`` (untimed; fails the benchmark)."""
    X, y, _, _ = mnist()
    xb, yb = X[:BATCH], y[:BATCH]
    start = _xpnet_model(widths).get_weights()
    expected = _numpy_sgd_step([(W.astype(np.float64), b.astype(np.float64)) for W, b in start], xb, yb, LR)
    if impl.startswith("xpnet"):
        from xpnet.kernels.cpu_step import CpuTrainingStep
        from xpnet.training import ReferenceStep, _training_step

        model = _xpnet_model(widths)
        kind = type(_training_step(model, BATCH))
        wanted = ReferenceStep if impl == "xpnet-xp" else CpuTrainingStep
        if impl != "xpnet-xp" and xpnet.kernels.kernel_module("numba").unavailable():
            pytest.fail(f"{impl} needs the numba kernels: {xpnet.kernels.kernel_module('numba').unavailable()}")
        assert kind is wanted, f"{impl} would run {kind.__name__}, not {wanted.__name__}"
        inputs = _train_inputs(impl)[:BATCH]
        model.fit(inputs, yb, epochs=1, batch_size=BATCH, lr=LR, shuffle=False, verbose=0)
        _assert_step_matches(model.get_weights(), expected, impl)
    elif impl == "jax-scan":  # an epoch of one batch is one step, whatever order it shuffles
        trainer = _jax_trainer(widths, (xb, yb, xb, yb))
        trainer.epoch()
        after = [tuple(np.asarray(a) for a in layer) for layer in trainer.params]
        _assert_step_matches(after, expected, impl)
    elif impl == "torch":
        torch, net, opt, _, _ = _torch_setup(widths, xb, yb)
        with torch.no_grad():
            for layer, (W, b) in zip(net[::2], start):
                layer.weight.copy_(torch.from_numpy(W.T.copy()))
                layer.bias.copy_(torch.from_numpy(b))
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(torch.from_numpy(xb)), torch.from_numpy(yb)).backward()
        opt.step()
        after = [(layer.weight.detach().numpy().T, layer.bias.detach().numpy()) for layer in net[::2]]
        _assert_step_matches(after, expected, impl)
    else:  # the GEMM floor computes only products: check them against plain matmuls
        rng = np.random.default_rng(0)
        Ws = [rng.standard_normal((a, b), dtype=np.float32) * 0.05 for a, b in zip(widths[:-1], widths[1:])]
        h, h_ref = xb, xb.astype(np.float64)
        for W in Ws:
            h = np.matmul(h, W, out=np.empty((BATCH, W.shape[1]), np.float32))
            h_ref = h_ref @ W
        np.testing.assert_allclose(h, h_ref, rtol=1e-4, atol=1e-5)


def _check_accuracy(scope, before, after):
    assert after > MIN_ACCURACY[scope], f"test accuracy {after:.4f} <= {MIN_ACCURACY[scope]} after the {scope}"
    assert after >= before + MIN_GAIN, f"test accuracy {after:.4f} barely beats the untrained {before:.4f}"


# --- benchmarks ------------------------------------------------------------------------------------


def _jax_trainer(widths, data):
    """JAX's epoch program from xpnet's seeded initial weights, compiled (by one untimed epoch)."""
    import peers

    recipe = {"widths": widths, "optimizer": "sgd", "lr": LR}
    trainer = peers.JaxScanEpoch(recipe, data)
    trainer.reset(SEED)
    return trainer


def _prepare(impl, monkeypatch):
    if impl == "jax-scan":
        pytest.importorskip("jax", reason="JAX is not installed (pip install -e '.[jax]')")
        pytest.importorskip("optax", reason="optax is not installed (pip install -e '.[jax]')")
    if impl == "xpnet-xp":
        monkeypatch.setenv("XPNET_KERNELS", "xp")
    else:
        monkeypatch.delenv("XPNET_KERNELS", raising=False)
    if impl in ("xpnet", "xpnet-float32"):
        module = xpnet.kernels.kernel_module("numba")
        if not module.unavailable():
            module.warmup(("float32",), ("int64",))  # compile outside the timing


@pytest.mark.parametrize("impl", STEP_IMPLS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_step(benchmark, config, impl, monkeypatch):
    widths = CONFIGS[config]
    X, y, _, _ = mnist()
    benchmark.group = f"train step {config}"
    benchmark.extra_info.update(config=config, impl=impl, scope="step", steps=1)
    _prepare(impl, monkeypatch)
    _check_step(impl, widths)
    if impl.startswith("xpnet"):
        step = _xpnet_step_fn(_xpnet_model(widths), _train_inputs(impl), y)
    elif impl.startswith("gemm-floor"):
        step = gemm_floor_step(widths, X, BATCH, gather=impl.endswith("gather"))
    else:
        torch, net, opt, Xt, yt = _torch_setup(widths, X, y)
        order = torch.randperm(Xt.shape[0])

        def step():
            idx = order[:BATCH]
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(Xt[idx]), yt[idx]).backward()
            opt.step()

    for _ in range(5):
        step()  # warm caches and allocators
    benchmark(step)


def _run(impl, widths, X, y, epochs, monkeypatch):
    """Set up one training of ``epochs`` epochs; returns (train, accuracy_after)."""
    _prepare(impl, monkeypatch)
    _, _, Xt, yt = mnist()
    if impl.startswith("xpnet"):
        model = _xpnet_model(widths)
        X = _train_inputs(impl)
        train = lambda: model.fit(X, y, epochs=epochs, batch_size=BATCH, optimizer="sgd", lr=LR, verbose=0)
        return train, lambda: model.score(Xt, yt)
    if impl == "jax-scan":
        trainer = _jax_trainer(widths, (X, y, Xt, yt))
        trainer.epoch()  # compiles the epoch program; then back to the initial weights
        trainer.reset(SEED)

        def train():
            for _ in range(epochs):
                trainer.epoch()

        return train, trainer.test_accuracy
    if impl == "gemm-floor":
        step = gemm_floor_step(widths, X, BATCH)
        n_steps = epochs * _steps_per_epoch(X.shape[0])

        def train():
            for _ in range(n_steps):
                step()

        return train, None
    torch, net, opt, Xtt, ytt = _torch_setup(widths, X, y)

    def train():
        for _ in range(epochs):
            _torch_epoch(torch, net, opt, Xtt, ytt)

    return train, lambda: _torch_accuracy(torch, net, Xt, yt)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_epoch(benchmark, config, impl, monkeypatch):
    X, y, _, _ = mnist()
    benchmark.group = f"train epoch {config}"
    benchmark.extra_info.update(config=config, impl=impl, scope="epoch", steps=_steps_per_epoch(X.shape[0]))
    _prepare(impl, monkeypatch)
    _check_step(impl, CONFIGS[config])
    train, accuracy = _run(impl, CONFIGS[config], X, y, 1, monkeypatch)
    before = accuracy() if accuracy is not None else None
    benchmark.pedantic(train, rounds=1 if QUICK else 3, iterations=1, warmup_rounds=0 if QUICK else 1)
    if accuracy is not None:
        benchmark.extra_info["test_accuracy"] = after = accuracy()
        _check_accuracy("epoch", before, after)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_full_run(benchmark, config, impl, monkeypatch):
    """A fresh model trained for 10 epochs (2 in quick mode), three times (once in quick mode),
    each from the same seed, so the minimum is a whole training; the test accuracy of the last."""
    X, y, _, _ = mnist()
    benchmark.group = f"train {RUN_EPOCHS} epochs {config}"
    benchmark.extra_info.update(
        config=config, impl=impl, scope="run", epochs=RUN_EPOCHS, steps=RUN_EPOCHS * _steps_per_epoch(X.shape[0])
    )
    run = {}
    _prepare(impl, monkeypatch)
    _check_step(impl, CONFIGS[config])

    def setup():  # untimed: a fresh model (and optimizer) for every round
        run["train"], run["accuracy"] = _run(impl, CONFIGS[config], X, y, RUN_EPOCHS, monkeypatch)
        run["before"] = run["accuracy"]() if run["accuracy"] is not None else None
        return (), {}

    benchmark.pedantic(lambda: run["train"](), setup=setup, rounds=1 if QUICK else 3, iterations=1)
    if run["accuracy"] is not None:
        benchmark.extra_info["test_accuracy"] = after = run["accuracy"]()
        _check_accuracy("run", run["before"], after)
