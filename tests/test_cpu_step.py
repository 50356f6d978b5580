"""The buffered NumPy training step (``xpnet.kernels.cpu_step``) against the reference step,
its batch gather, what it covers, and the optimizers' fused updates it trains with."""

from __future__ import annotations

import numpy as np
import pytest

import xpnet.functional as F
from xpnet import kernels

from test_kernels import _assert_close

RTOL = {np.float32: 1e-5, np.float64: 1e-12}


def _skip_without_numba():
    reason = kernels.kernel_module("numba").unavailable()
    if reason:
        pytest.skip(reason)


def _reference_step(model, xb, yb, monkeypatch):
    monkeypatch.setenv("XPNET_KERNELS", "xp")
    logits = model.forward(xb, training=True)
    loss, dlogits = F.softmax_cross_entropy(logits, yb)
    model.backward(dlogits)
    correct = int(np.sum(np.argmax(logits, axis=1) == yb))
    grads = [np.array(g) for g in model.gradients()]
    monkeypatch.delenv("XPNET_KERNELS")
    return float(loss) * yb.shape[0], correct, grads


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_cpu_fast_step_equals_the_reference_step(dtype, rng, monkeypatch):
    import xpnet
    from xpnet.training import training_step_for

    if kernels.kernel_module("numba").unavailable():
        pytest.skip(kernels.kernel_module("numba").unavailable())
    model = xpnet.MLP([13, 17, 9, 5], dtype=dtype, seed=3)
    xb = rng.standard_normal((23, 13)).astype(dtype)
    yb = rng.integers(0, 5, 23)
    want_loss, want_correct, want_grads = _reference_step(model, xb, yb, monkeypatch)
    monkeypatch.delenv("XPNET_KERNELS", raising=False)
    step = training_step_for(model.layers, 32)
    assert step is not None
    for layer in model.layers:  # poison: the fast step must write every gradient element
        layer.dW = layer.db = None
    for buffer in step.dW + step.db:
        buffer.fill(np.nan)
    loss, correct = step(xb, yb)
    rtol = RTOL[np.dtype(dtype).type]
    assert correct == want_correct
    assert abs(loss - want_loss) <= rtol * abs(want_loss)
    got = model.gradients()
    assert all(g is b for g, b in zip(got, [a for pair in zip(step.dW, step.db) for a in pair]))
    assert len(step.gradients()) == len(got) and all(g is b for g, b in zip(got, step.gradients()))
    # norm-wise: the fast step sums db in another order than NumPy's pairwise sum, so an entry
    # that cancels to near 0 can differ relative to itself, never relative to the gradient
    for g, w in zip(got, want_grads):
        _assert_close(g, w, rtol, scale=np.max(np.abs(w)))


OPTIMIZER_SETTINGS = [
    ("sgd", {}),
    ("sgd", {"momentum": 0.9}),
    ("sgd", {"momentum": 0.8, "nesterov": True}),
    ("sgd", {"momentum": 0.9, "weight_decay": 0.03}),
    ("adam", {"lr": 0.01}),
    ("adam", {"lr": 0.01, "weight_decay": 0.03}),
    ("adamw", {"lr": 0.01, "weight_decay": 0.3}),
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name, settings_", OPTIMIZER_SETTINGS)
def test_fused_update_equals_the_reference_update_bit_for_bit(name, settings_, dtype, rng, monkeypatch):
    """An optimizer's Numba update on NumPy arrays is its ``xp`` formula, rounded the same way."""
    from xpnet.optim import make_optimizer

    _skip_without_numba()
    want_opt, got_opt = make_optimizer(name, **settings_), make_optimizer(name, **settings_)
    got = [rng.standard_normal(s).astype(dtype) for s in [(13, 17), (17,), (17, 5), (5,)]]
    want = [p.copy() for p in got]
    calls = []
    assert got_opt._fused_for(got, [np.empty_like(p) for p in got]) is not None  # the fused path really runs
    for _ in range(3):  # state (velocity, moments, t) carries over between steps
        grads = [rng.standard_normal(p.shape).astype(dtype) for p in want]
        monkeypatch.setenv("XPNET_KERNELS", "xp")
        want_opt.step(want, [g.copy() for g in grads])
        monkeypatch.delenv("XPNET_KERNELS")
        got_opt.step(got, grads)
        calls.append(got_opt._fused_for(got, grads) is not None)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and np.array_equal(g, w)
    assert all(calls)
    for sg, sw in zip(got_opt.state, want_opt.state):
        assert sg.keys() == sw.keys()
        assert all(np.array_equal(sg[k], sw[k]) for k in sg)


def test_fused_update_steps_aside_where_it_does_not_apply(rng, monkeypatch):
    from xpnet.optim import SGD

    _skip_without_numba()
    monkeypatch.delenv("XPNET_KERNELS", raising=False)
    params = [np.ones((3, 4)), np.ones(4)]
    grads = [rng.standard_normal(p.shape) for p in params]
    assert SGD(0.1)._fused_for(params, grads) is not None

    class MySGD(SGD):  # a new formula without a new kernel: the formula runs
        def _update(self, p, g, state):
            p -= 2 * self.lr * g

    mine = MySGD(0.1)
    assert mine._fused_for(params, grads) is None
    mine.step(params, grads)
    np.testing.assert_array_equal(params[0], 1 - 2 * (0.1 * grads[0]))
    # a strided parameter, mixed dtypes, or XPNET_KERNELS=xp: the reference, with the same result
    strided = np.ones((3, 4))[:, ::2]
    g = rng.standard_normal((3, 2))
    assert SGD(0.1)._fused_for([strided], [g]) is None
    SGD(0.1).step([strided], [g])
    np.testing.assert_array_equal(strided, 1 - 0.1 * g)
    assert SGD(0.1)._fused_for([np.ones(3, np.float32)], [np.ones(3)]) is None
    monkeypatch.setenv("XPNET_KERNELS", "xp")
    assert SGD(0.1)._fused_for(params, grads) is None


def test_scikit_learn_estimators_fused_adam_is_its_reference_bit_for_bit(rng, monkeypatch):
    """The estimator's Adam (L2 on kernels only, epsilon before the bias correction) through
    the one-call kernel: the overridden decay and corrections reach it."""
    pytest.importorskip("sklearn")
    from xpnet.sklearn import _Adam

    _skip_without_numba()
    want_opt, got_opt = (_Adam(0.01, betas=(0.9, 0.999), eps=1e-8) for _ in range(2))
    want_opt.penalty = got_opt.penalty = 0.05
    got = [rng.standard_normal(s).astype(np.float32) for s in [(9, 6), (6,), (6, 3), (3,)]]
    want = [p.copy() for p in got]
    for _ in range(3):
        grads = [rng.standard_normal(p.shape).astype(np.float32) * 1e-6 for p in want]
        grads[0][0] = 0  # weights moved by the penalty alone: where the estimator's epsilon matters
        monkeypatch.setenv("XPNET_KERNELS", "xp")
        want_opt.step(want, [g.copy() for g in grads])
        monkeypatch.delenv("XPNET_KERNELS")
        got_opt.step(got, grads)
        assert got_opt._fused_for(got, grads) is not None
        assert all(np.array_equal(g, w) for g, w in zip(got, want))


def _twin_optimizers_after_a_step(name, rng, monkeypatch):
    """Two optimizers ``name`` (SGD with momentum) and two copies of the same parameters, each
    after the same first step (fused: numba on, ``XPNET_KERNELS`` unset)."""
    from xpnet.optim import make_optimizer

    _skip_without_numba()
    monkeypatch.delenv("XPNET_KERNELS", raising=False)
    settings_ = {"momentum": 0.9} if name == "sgd" else {}
    got_opt, want_opt = make_optimizer(name, lr=0.1, **settings_), make_optimizer(name, lr=0.1, **settings_)
    got = [rng.standard_normal(s) for s in [(4, 3), (3,)]]
    want = [p.copy() for p in got]
    grads = [rng.standard_normal(p.shape) for p in got]
    got_opt.step(got, grads)
    want_opt.step(want, grads)
    return got_opt, want_opt, got, want


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_fused_state_is_one_buffer_that_follows_replaced_arrays(name, rng, monkeypatch):
    """The state dicts hold slices of one flat buffer; a state array set from outside (a loaded
    checkpoint) is taken in, and replaced parameters are updated, never stale views of old ones."""
    got_opt, want_opt, got, want = _twin_optimizers_after_a_step(name, rng, monkeypatch)
    key = "v"
    first = got_opt.state[0][key]
    assert first.base is not None and first.base is got_opt.state[1][key].base  # one buffer
    # a checkpoint's arrays replace the state; the parameters are replaced by copies
    got_opt.state[0][key] = got_opt.state[0][key].copy() + 1
    want_opt.state[0][key] = want_opt.state[0][key] + 1
    got = [p.copy() for p in got]
    grads = [rng.standard_normal(p.shape) for p in got]
    got_opt.step(got, grads)
    monkeypatch.setenv("XPNET_KERNELS", "xp")
    want_opt.step(want, grads)
    assert all(np.array_equal(g, w) for g, w in zip(got, want))
    assert all(np.array_equal(g[key], w[key]) for g, w in zip(got_opt.state, want_opt.state))


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_state_loaded_into_a_running_optimizer_is_the_one_its_next_step_uses(name, rng, monkeypatch):
    """The same optimizer and parameters, its state replaced mid-training (``load_state_dict``):
    the fused step takes the loaded arrays in, as the reference does."""
    got_opt, want_opt, got, want = _twin_optimizers_after_a_step(name, rng, monkeypatch)
    saved = {k: v + 0.5 for k, v in got_opt.state_dict().items()}  # another run's state
    got_opt.load_state_dict(saved, got)
    want_opt.load_state_dict(saved, want)
    grads = [rng.standard_normal(p.shape) for p in got]
    got_opt.step(got, grads)
    assert got_opt._fused_for(got, grads) is not None
    monkeypatch.setenv("XPNET_KERNELS", "xp")
    want_opt.step(want, grads)
    assert all(np.array_equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_an_optimizer_steps_a_model_without_parameters(name):
    from xpnet.optim import make_optimizer

    make_optimizer(name).step([], [])


def test_the_fused_kernels_refuse_state_buffers_of_the_wrong_size(numba_cpu):
    loops = numba_cpu._get_loops()
    ps = (np.ones(3), np.ones(2))
    coef = np.ones((2, 5))
    with pytest.raises(ValueError, match="velocity buffer"):
        loops.sgd_step(ps, ps, np.zeros(4), coef, 0.9, False)
    with pytest.raises(ValueError, match="moment buffers"):
        loops.adam_step(ps, ps, np.zeros(5), np.zeros(4), coef, 0.9, 0.1, 0.99, 0.01)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_fused_updates_flush_subnormals_and_give_the_mode_back(name, dtype, rng, monkeypatch):
    """Inside a fused update a subnormal state value or gradient counts as zero and a result
    that would be subnormal is stored as zero; every other value is the reference's, bit for
    bit. Afterwards the thread's floating-point mode is the caller's: NumPy makes subnormals."""
    import platform

    from xpnet.optim import make_optimizer

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the fused updates flush subnormals on x86 only")
    got_opt, want_opt, got, want = _twin_optimizers_after_a_step(name, rng, monkeypatch)
    got, want = [p.astype(dtype) for p in got], [p.astype(dtype) for p in want]
    tiny = np.finfo(dtype).tiny
    keys = ("m", "v") if name == "adam" else ("v",)
    for opt, params in ((got_opt, got), (want_opt, want)):  # the state in the parameters' dtype
        opt.load_state_dict(opt.state_dict(), params)
    for key in keys:
        got_opt.state[0][key].flat[:4] = [tiny / 2, -tiny / 16, tiny / 2**20, tiny]  # 3 subnormal, then normal
        want_opt.state[0][key].flat[:4] = [0, 0, 0, tiny]  # as the update sees them
    grads = [rng.standard_normal(p.shape).astype(dtype) for p in got]
    grads[0].flat[:4] = [tiny / 4, 0, 0, 0]  # a subnormal gradient; the normal state entry decays alone
    want_grads = [g.copy() for g in grads]
    want_grads[0].flat[0] = 0
    got_opt.step(got, grads)
    assert got_opt._fused_for(got, grads) is not None
    monkeypatch.setenv("XPNET_KERNELS", "xp")
    want_opt.step(want, want_grads)
    assert all(np.array_equal(g, w) for g, w in zip(got, want))
    for key in keys:
        reference = want_opt.state[0][key]
        assert 0 < abs(reference.flat[3]) < tiny  # the decayed normal entry: subnormal in the reference
        flushed = np.where(np.abs(reference) < tiny, 0, reference)
        assert np.array_equal(got_opt.state[0][key], flushed) and np.array_equal(got_opt.state[1][key], want_opt.state[1][key])
    assert np.array([tiny], dtype)[0] / 4 != 0 and dtype(tiny) * dtype(0.5) != 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("parts", [2, 3, 5])
@pytest.mark.parametrize("kind", ["sgd", "momentum", "nesterov", "adam"])
def test_the_parallel_updates_equal_the_serial_ones(kind, parts, dtype, numba_cpu, rng):
    """Each parameter split into ``parts`` slices (some shorter than ``parts``: empty slices):
    every value and every state entry bit for bit the serial update's, over three steps."""
    loops = numba_cpu._get_loops()
    shapes = [37 * 5, 1, 3, 64, 7]
    params = [rng.standard_normal(n).astype(dtype) for n in shapes]
    total = sum(shapes)
    coef = np.column_stack([rng.uniform(0, 1e-2, len(shapes)), rng.uniform(0.9, 1, len(shapes)),
                            rng.uniform(1e-3, 1e-1, (len(shapes), 3))]).astype(dtype)
    start = {"adam": [rng.random(total).astype(dtype) for _ in range(2)], "sgd": [np.zeros(0, dtype)]}.get(
        kind, [rng.random(total).astype(dtype)])  # Adam's moments, a velocity, or none
    runs = []
    for parallel in (False, True):
        ps = tuple(p.copy() for p in params)
        state = [s.copy() for s in start]
        for step in range(3):
            gs = tuple(np.random.default_rng(step).standard_normal(n).astype(dtype) for n in shapes)
            if kind == "adam":
                args = (ps, gs, *state, coef[:, :5], *(dtype(c) for c in (0.9, 0.1, 0.999, 0.001)))
                name = "adam_step"
            else:
                args = (ps, gs, state[0], coef[:, :3], dtype(0.9), kind == "nesterov")
                name = "sgd_step"
            if parallel:
                getattr(loops, name + "_parallel")(*args, parts)
            else:
                getattr(loops, name)(*args)
        runs.append((ps, state))
    (serial, serial_state), (split, split_state) = runs
    assert all(np.array_equal(a, b) for a, b in zip(serial, split))
    assert all(np.array_equal(a, b) for a, b in zip(serial_state, split_state))
    assert not np.array_equal(serial[0], params[0])


def test_a_fused_update_splits_among_the_cores_only_while_numba_owns_them(numba_cpu, rng, monkeypatch):
    """Serial, unless a step holds BLAS on one thread (``OneBlasThread``) and there are at least
    ``PARALLEL_UPDATE_MIN_ELEMENTS`` values; serial again once the limit is given back."""
    from xpnet import optim
    from xpnet.kernels.cores import OneBlasThread, cores, numba_owns_cores

    monkeypatch.delenv("XPNET_KERNELS", raising=False)
    if cores() < 2:
        pytest.skip("one core: every update is serial")
    loops = numba_cpu._get_loops()
    calls = []
    for name in ("adam_step", "adam_step_parallel"):
        kernel = getattr(loops, name)
        monkeypatch.setattr(loops, name, lambda *a, _k=kernel, _n=name: (calls.append((_n, a[-1])), _k(*a)))
    least = optim.PARALLEL_UPDATE_MIN_ELEMENTS
    large = [rng.standard_normal(10), rng.standard_normal(least - 10)]  # counted over all parameters
    small = [rng.standard_normal(10), rng.standard_normal(least - 11)]
    opt, small_opt, one_core_opt = optim.Adam(1e-3), optim.Adam(1e-3), optim.Adam(1e-3)
    ones = lambda params: [np.ones_like(p) for p in params]  # noqa: E731
    opt.step(large, ones(large))
    blas = OneBlasThread()
    assert not numba_owns_cores()
    blas.take()
    try:
        assert numba_owns_cores()
        opt.step(large, ones(large))
        small_opt.step(small, ones(small))
        monkeypatch.setattr(optim, "cores", lambda: 1)  # a process allowed one core
        one_core_opt.step(large, ones(large))
    finally:
        blas.give_back()
    assert not numba_owns_cores()
    opt.step(large, ones(large))
    assert [name for name, _ in calls] == ["adam_step", "adam_step_parallel", "adam_step", "adam_step", "adam_step"]
    assert calls[1][1] == cores()


def test_an_optimizer_pickles_after_a_fused_step(rng):
    import pickle

    from xpnet.optim import Adam

    _skip_without_numba()
    opt = Adam(0.01)
    params = [rng.standard_normal((3, 2)), rng.standard_normal(2)]
    opt.step(params, [np.ones((3, 2)), np.ones(2)])
    copy = pickle.loads(pickle.dumps(opt))
    again = [p.copy() for p in params]
    opt.step(params, [np.ones((3, 2)), np.ones(2)])
    copy.step(again, [np.ones((3, 2)), np.ones(2)])
    assert all(np.array_equal(a, b) for a, b in zip(params, again))
    assert copy.state[0]["t"] == 2


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("n", [1, 3, 4, 7, 32])
def test_cpu_take_batch_equals_np_take(n, dtype, rng):
    import xpnet
    from xpnet.training import training_step_for

    _skip_without_numba()
    X = rng.standard_normal((50, 13)).astype(dtype)
    y = rng.integers(0, 2, 50)
    step = training_step_for(xpnet.MLP([13, 4, 2], dtype=dtype, seed=0).layers, 32)
    idx = rng.integers(-3, 53, n)  # out-of-range indices clip, as np.take(mode="clip")
    step._input_buffer("x", np.dtype(dtype)).fill(np.nan)  # poison
    step._y.fill(-1)
    xb, yb = step.take_batch(X, y, idx)
    assert xb.shape == (n, 13) and yb.shape == (n,)
    np.testing.assert_array_equal(xb, np.take(X, idx, axis=0, mode="clip"))
    np.testing.assert_array_equal(yb, np.take(y, idx, mode="clip"))
    xb, yb = step.take_batch(np.asfortranarray(X), y[::-1], idx)  # the np.take fallback
    np.testing.assert_array_equal(xb, np.take(X, idx, axis=0, mode="clip"))
    np.testing.assert_array_equal(yb, np.take(y[::-1], idx, mode="clip"))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_cpu_take_batch_scales_every_byte_as_scale_pixels(dtype, rng):
    import xpnet
    from xpnet.training import training_step_for

    _skip_without_numba()
    X = rng.permutation(np.arange(256 * 7) % 256).astype(np.uint8).reshape(256, 7)  # each byte 7x
    y = rng.integers(0, 2, 256)
    step = training_step_for(xpnet.MLP([7, 4, 2], dtype=dtype, seed=0).layers, 256)
    assert step.takes_pixels
    idx = rng.permutation(256)
    step._input_buffer("x", np.dtype(dtype)).fill(np.nan)  # poison
    xb, yb = step.take_batch(X, y, idx)
    want = F.scale_pixels(X[idx], np.dtype(dtype))
    assert xb.dtype == want.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(xb, want)  # bit for bit, all 256 values
    np.testing.assert_array_equal(yb, y[idx])
    xb, _ = step.take_batch(X[:, ::-1], y, idx[:5])  # a strided uint8 array: the np.take fallback
    np.testing.assert_array_equal(xb, F.scale_pixels(X[idx[:5], ::-1], np.dtype(dtype)))
    outside = np.array([-4, 0, 255, 300])  # out-of-range indices clip there too
    xb, yb = step.take_batch(X[:, ::-1], y, outside)
    np.testing.assert_array_equal(xb, F.scale_pixels(X[[0, 0, 255, 255], ::-1], np.dtype(dtype)))
    np.testing.assert_array_equal(yb, y[[0, 0, 255, 255]])


@pytest.mark.parametrize("shuffle", [True, False])
def test_fit_on_uint8_pixels_equals_fit_on_scaled_floats(shuffle, rng):
    """fit keeps uint8 data as uint8 on the fast CPU path and scales each batch: the same
    training, bit for bit, as on the floats ``X / 255`` (validation split included)."""
    import xpnet

    _skip_without_numba()
    X = rng.integers(0, 256, (300, 12)).astype(np.uint8)
    y = rng.integers(0, 3, 300)
    runs = []
    for data in (X, X.astype(np.float32) / np.float32(255)):
        model = xpnet.MLP([12, 8, 3], seed=5)
        history = model.fit(
            data, y, epochs=2, batch_size=32, lr=0.1, validation_split=0.2, shuffle=shuffle, verbose=0
        )
        runs.append((model, history))
    (a, ha), (b, hb) = runs
    for pa, pb in zip(a.parameters(), b.parameters()):
        np.testing.assert_array_equal(pa, pb)
    assert ha.history.keys() == hb.history.keys()
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert ha.history[key] == hb.history[key]


def test_cpu_fast_step_steps_aside_where_it_does_not_apply(monkeypatch):
    """The step covers exactly ReLU MLPs of ``Dense`` layers: a subclass of Dense (which may
    compute something else), a layer it has never seen, tanh, or XPNET_KERNELS=xp get None."""
    import xpnet
    from xpnet.layers import Dense, Dropout, Flatten
    from xpnet.training import training_step_for

    _skip_without_numba()
    monkeypatch.delenv("XPNET_KERNELS", raising=False)
    assert training_step_for(xpnet.MLP([4, 3, 2], seed=0).layers, 8) is not None
    assert training_step_for(xpnet.MLP([4, 3, 2], activation="tanh", seed=0).layers, 8) is None

    class ScaledDense(Dense):
        def forward(self, x, *, training=False):
            return 2 * super().forward(x, training=training)

    for layers in ([ScaledDense(3, activation="relu"), Dense(2)], [Dense(3, activation="relu"), Dropout(0.5), Dense(2)],
                   [Flatten(), Dense(3, activation="relu"), Dense(2)]):
        model = xpnet.Sequential(layers, input_shape=(4,), seed=0)
        assert training_step_for(model.layers, 8) is None
        X, y = np.random.default_rng(0).standard_normal((20, 4)), np.arange(20) % 2
        model.fit(X, y, epochs=1, batch_size=8, verbose=0)  # the reference step trains it
    monkeypatch.setenv("XPNET_KERNELS", "xp")
    assert training_step_for(xpnet.MLP([4, 3, 2], seed=0).layers, 8) is None


