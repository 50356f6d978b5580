"""Optimizers and schedules against torch.optim's documented formulas, written out in NumPy.

SGD (torch.optim.SGD, dampening 0): ``g += wd * p``; ``b = mu * b + g`` (``b = g`` at the first
step); ``g = g + mu * b`` with Nesterov, else ``g = b``; ``p -= lr * g``.
Adam (torch.optim.Adam, amsgrad off): ``g += wd * p``; ``m = b1 m + (1 - b1) g``;
``v = b2 v + (1 - b2) g^2``; ``p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``.
Everything in float64, several steps with a fresh gradient each.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

import xpnet
from xpnet import optim
from xpnet.optim import SGD, Adam, AdamW, CosineLR, StepLR, make_optimizer, make_schedule

STEPS = 5


def problem(seed=0):
    """Two parameters (a matrix and a vector) and a gradient for each of STEPS steps."""
    rng = np.random.default_rng(seed)
    params = [rng.normal(size=(4, 3)), rng.normal(size=3)]
    grads = [[rng.normal(size=p.shape) for p in params] for _ in range(STEPS)]
    return params, grads


def sgd_expected(params, grads, lr, momentum=0.0, nesterov=False, wd=0.0, lrs=None):
    params = [p.copy() for p in params]
    bufs = [None] * len(params)
    for t, step_grads in enumerate(grads):
        rate = lr if lrs is None else lrs[t]
        for i, (p, g) in enumerate(zip(params, step_grads)):
            g = g + wd * p
            if momentum:
                bufs[i] = g.copy() if bufs[i] is None else momentum * bufs[i] + g
                g = g + momentum * bufs[i] if nesterov else bufs[i]
            params[i] = p - rate * g
    return params


def adam_expected(params, grads, lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.0):
    params = [p.copy() for p in params]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    for t, step_grads in enumerate(grads, start=1):
        for i, (p, g) in enumerate(zip(params, step_grads)):
            g = g + wd * p
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            denom = np.sqrt(v[i]) / math.sqrt(1 - b2**t) + eps
            params[i] = p - lr / (1 - b1**t) * m[i] / denom
    return params


def run(opt, params, grads):
    live = [p.copy() for p in params]
    ids = [id(p) for p in live]
    for step_grads in grads:
        opt.step(live, [g.copy() for g in step_grads])
    assert [id(p) for p in live] == ids  # updated in place
    return live


def assert_params_close(actual, expected, rtol=1e-13):
    for a, e in zip(actual, expected):
        assert a.dtype == np.float64
        np.testing.assert_allclose(a, e, rtol=rtol, atol=0)


# --- SGD and Adam against the formulas ----------------------------------------------------------


@pytest.mark.parametrize(
    "momentum, nesterov, wd",
    [(0.0, False, 0.0), (0.0, False, 0.01), (0.9, False, 0.0), (0.9, False, 0.01), (0.8, True, 0.0), (0.8, True, 0.05)],
)
def test_sgd_matches_torch_formula(momentum, nesterov, wd):
    params, grads = problem()
    opt = SGD(lr=0.05, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    assert_params_close(run(opt, params, grads), sgd_expected(params, grads, 0.05, momentum, nesterov, wd))


def test_sgd_momentum_and_nesterov_really_differ_from_plain():
    """Guards the formula tests against a problem where the variants coincide."""
    params, grads = problem(1)
    plain = sgd_expected(params, grads, 0.05)
    heavy = sgd_expected(params, grads, 0.05, momentum=0.9)
    nesterov = sgd_expected(params, grads, 0.05, momentum=0.9, nesterov=True)
    assert not np.allclose(plain[0], heavy[0]) and not np.allclose(heavy[0], nesterov[0])


@pytest.mark.parametrize("wd", [0.0, 0.02])
@pytest.mark.parametrize("betas, eps", [((0.9, 0.999), 1e-8), ((0.5, 0.9), 1e-3)])
def test_adam_matches_torch_formula(wd, betas, eps):
    params, grads = problem(2)
    opt = Adam(lr=0.01, betas=betas, eps=eps, weight_decay=wd)
    expected = adam_expected(params, grads, 0.01, betas[0], betas[1], eps, wd)
    assert_params_close(run(opt, params, grads), expected)


def test_adam_first_step_moves_each_entry_by_about_lr():
    """Bias correction: the first step is exactly lr * g / (|g| + eps), about lr whatever |g|."""
    p = np.array([1.0, -2.0, 3.0])
    g = np.array([1e-3, -5.0, 40.0])
    live = [p.copy()]
    Adam(lr=0.1, eps=1e-12).step(live, [g])
    np.testing.assert_allclose(p - live[0], 0.1 * g / (np.abs(g) + 1e-12), rtol=1e-14)


def test_optimizers_follow_the_scheduled_rate():
    """``start_epoch`` sets ``lr = base_lr * schedule(epoch, epochs)``; steps use it."""
    params, grads = problem(3)
    opt = SGD(lr=0.2, momentum=0.5, schedule=StepLR(2, gamma=0.5))
    live = [p.copy() for p in params]
    lrs = []
    for t, step_grads in enumerate(grads):  # one step per "epoch"
        opt.start_epoch(t, len(grads))
        lrs.append(opt.lr)
        opt.step(live, [g.copy() for g in step_grads])
    assert lrs == [0.2, 0.2, 0.1, 0.1, 0.05]
    assert opt.base_lr == 0.2
    assert_params_close(live, sgd_expected(params, grads, None, momentum=0.5, lrs=lrs))


# --- schedules ------------------------------------------------------------------------------------


def test_step_lr_factors():
    s = StepLR(3, gamma=0.5)
    assert [s(e, 10) for e in range(8)] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25]
    assert StepLR(1, gamma=0.1)(2, 5) == pytest.approx(0.01, rel=1e-15)


@pytest.mark.parametrize("min_factor", [0.0, 0.1])
def test_cosine_factors(min_factor):
    s = CosineLR(min_factor)
    epochs = 8
    for e in range(epochs):
        expected = min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * e / epochs))
        assert s(e, epochs) == pytest.approx(expected, rel=1e-15, abs=1e-15)
    assert s(0, epochs) == 1.0
    assert s(4, epochs) == pytest.approx(min_factor + (1 - min_factor) / 2, rel=1e-15)
    factors = [s(e, epochs) for e in range(epochs)]
    assert all(a > b for a, b in zip(factors, factors[1:]))  # strictly decreasing
    assert factors[-1] > min_factor  # the last epoch has not reached the floor yet


def test_make_schedule_names():
    assert make_schedule(None) is None and make_schedule("constant") is None
    cosine = make_schedule("cosine")
    assert isinstance(cosine, CosineLR) and cosine(0, 4) == 1.0 and cosine(2, 4) == pytest.approx(0.5, rel=1e-15)
    custom = lambda epoch, epochs: 0.3  # noqa: E731
    assert make_schedule(custom) is custom
    with pytest.raises(ValueError, match="schedule"):
        make_schedule("linear")


@pytest.mark.parametrize("step_size", [0, -1, 1.5])
def test_step_lr_needs_a_positive_integer_step(step_size):
    with pytest.raises(ValueError, match="step_size"):
        StepLR(step_size)


def test_fit_logs_the_scheduled_rate_each_epoch(rng):
    X = rng.normal(size=(40, 5))
    y = rng.integers(0, 3, size=40)
    model = xpnet.MLP([5, 3], dtype="float64", seed=0)
    history = model.fit(X, y, epochs=5, batch_size=16, lr=0.4, schedule=StepLR(2, 0.25), verbose=0)
    assert history["lr"] == pytest.approx([0.4, 0.4, 0.1, 0.1, 0.025], rel=1e-15)
    history = model.fit(X, y, epochs=4, batch_size=16, lr=0.4, schedule="cosine", verbose=0)
    expected = [0.4 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    assert history["lr"] == pytest.approx(expected, rel=1e-15)


# --- make_optimizer: names and validation ------------------------------------------------------


def test_make_optimizer_builds_from_names():
    sgd = make_optimizer("SGD", lr=0.3, momentum=0.9, nesterov=True, weight_decay=0.01)
    assert type(sgd) is SGD and sgd.lr == 0.3 and sgd.momentum == 0.9 and sgd.nesterov and sgd.weight_decay == 0.01
    adam = make_optimizer("adam")
    assert type(adam) is Adam and adam.lr == 1e-3 and (adam.beta1, adam.beta2, adam.eps) == (0.9, 0.999, 1e-8)
    assert make_optimizer("sgd").lr == 0.01 and make_optimizer("sgd").momentum == 0.0
    given = SGD(lr=0.5)
    assert make_optimizer(given) is given


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(optimizer="rmsprop"), ValueError, "unknown optimizer"),
        (dict(optimizer=3), ValueError, "unknown optimizer"),
        (dict(lr=-0.1), ValueError, "lr"),
        (dict(lr=0), ValueError, "lr must be > 0"),
        (dict(lr=float("nan")), TypeError, "lr must be a finite number"),
        (dict(lr=float("inf")), TypeError, "lr must be a finite number"),
        (dict(lr="0.1"), TypeError, "lr"),
        (dict(lr=True), TypeError, "lr"),
        (dict(momentum=1.0), ValueError, "momentum"),
        (dict(momentum=-0.5), ValueError, "momentum"),
        (dict(nesterov=True), ValueError, "nesterov"),
        (dict(weight_decay=-1e-4), ValueError, "weight_decay"),
        (dict(optimizer="adam", momentum=0.9), ValueError, "momentum"),
        (dict(optimizer="adam", nesterov=True), ValueError, "nesterov"),
        (dict(schedule="warmup"), ValueError, "schedule"),
    ],
)
def test_make_optimizer_refuses_bad_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        make_optimizer(**kwargs)


@pytest.mark.parametrize("extra", [dict(lr=0.1), dict(momentum=0.9), dict(weight_decay=0.1), dict(schedule="cosine")])
def test_settings_beside_an_optimizer_object_are_refused(extra):
    with pytest.raises(ValueError, match=next(iter(extra))):
        make_optimizer(SGD(lr=0.1), **extra)


@pytest.mark.parametrize("betas", [(1.0, 0.999), (0.9, 1.0), (-0.1, 0.9)])
def test_adam_betas_must_be_in_unit_interval(betas):
    with pytest.raises(ValueError, match="betas"):
        Adam(betas=betas)


# --- the fused CPU update inside fit applies the schedule ----------------------------------------


def _fit_weights(monkeypatch, kernels, **settings):
    if kernels is None:
        monkeypatch.delenv("XPNET_KERNELS", raising=False)
    else:
        monkeypatch.setenv("XPNET_KERNELS", kernels)
    rng = np.random.default_rng(5)
    X = rng.normal(size=(150, 12))
    y = rng.integers(0, 4, size=150)
    model = xpnet.MLP([12, 16, 4], dtype="float64", seed=1)
    model.fit(X, y, epochs=3, batch_size=32, verbose=0, **settings)
    return model.get_weights()


@pytest.mark.parametrize("schedule", [StepLR(1, gamma=0.3), "cosine"], ids=["step", "cosine"])
@pytest.mark.parametrize(
    "settings",
    [dict(lr=0.1), dict(lr=0.1, momentum=0.9), dict(lr=0.1, momentum=0.9, nesterov=True), dict(optimizer="adam", lr=0.01)],
    ids=["sgd", "momentum", "nesterov", "adam"],
)
def test_fused_cpu_update_applies_the_schedule(monkeypatch, schedule, settings):
    """fit on NumPy updates through the optimizers' fused kernels; XPNET_KERNELS=xp runs
    ``opt.step``. Same float64 weights to ~1e-12 (only the order of a few sums differs)."""
    pytest.importorskip("numba")
    fast = _fit_weights(monkeypatch, None, schedule=schedule, **settings)
    reference = _fit_weights(monkeypatch, "xp", schedule=schedule, **settings)
    unscheduled = _fit_weights(monkeypatch, "xp", **settings)
    for (W, b), (W_ref, b_ref), (W_const, _) in zip(fast, reference, unscheduled):
        np.testing.assert_allclose(W, W_ref, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(b, b_ref, rtol=1e-12, atol=1e-14)
        assert not np.allclose(W_ref, W_const, rtol=1e-6)  # the schedule did change the outcome


def test_optim_module_exports():
    assert set(optim.__all__) >= {"SGD", "Adam", "StepLR", "CosineLR", "make_optimizer", "make_schedule"}


# --- AdamW: a new optimizer as one class ---


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_equals_pytorch_adamw(fused, rng, monkeypatch):
    torch = pytest.importorskip("torch", reason="PyTorch's AdamW is the independent reference")
    if not fused:
        monkeypatch.setenv("XPNET_KERNELS", "xp")
    params = [rng.normal(size=(5, 4)), rng.normal(size=4)]
    tparams = [torch.tensor(p.copy(), requires_grad=True) for p in params]
    opt = AdamW(0.01, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.1)
    topt = torch.optim.AdamW(tparams, lr=0.01, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.1)
    for _ in range(5):
        grads = [rng.normal(size=p.shape) for p in params]
        opt.step(params, grads)
        for t, g in zip(tparams, grads):
            t.grad = torch.tensor(g)
        topt.step()
    for p, t in zip(params, tparams):
        np.testing.assert_allclose(p, t.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_adamw_decouples_the_decay_and_is_a_name_away(rng):
    p, g = [np.ones(3)], [np.zeros(3)]
    AdamW(0.1, weight_decay=0.5).step(p, g)  # zero gradient: only the decay moves p
    np.testing.assert_allclose(p[0], 1 - 0.1 * 0.5)
    q = [np.ones(3)]
    Adam(0.1, weight_decay=0.5).step(q, [np.zeros(3)])  # coupled: the penalty goes through Adam's scaling
    assert not np.allclose(q[0], p[0])
    opt = make_optimizer("adamw", lr=2e-3)
    assert type(opt) is AdamW and opt.weight_decay == 0.01 and opt.base_lr == 2e-3
    assert make_optimizer("adam").weight_decay == 0.0 and make_optimizer("sgd").weight_decay == 0.0
    model = xpnet.MLP([6, 5, 3], seed=0)
    X = rng.normal(size=(60, 6))
    y = np.argmax(X[:, :3], axis=1)
    before = model.evaluate(X, y)["loss"]
    model.fit(X, y, epochs=5, batch_size=8, optimizer="adamw", lr=0.01, verbose=0)
    assert model.evaluate(X, y)["loss"] < 0.8 * before


def test_hyperparameters_name_what_a_fused_update_reads():
    assert SGD(0.1, momentum=0.9, nesterov=True).hyperparameters() == {
        "lr": 0.1, "weight_decay": 0.0, "momentum": 0.9, "nesterov": True}
    assert Adam(1e-3, betas=(0.8, 0.9), eps=1e-6).hyperparameters() == {
        "lr": 1e-3, "weight_decay": 0.0, "beta1": 0.8, "beta2": 0.9, "eps": 1e-6}


@pytest.mark.parametrize("factor", [-0.5, math.nan, math.inf, "0.5", None, True])
def test_a_schedule_must_give_a_finite_factor_at_least_zero(factor):
    opt = SGD(lr=0.1, schedule=lambda epoch, epochs: 1.0 if epoch == 0 else factor)
    opt.start_epoch(0, 3)
    with pytest.raises(ValueError, match=r"gave the factor .* for epoch 1 of 3; a schedule must return a finite number >= 0"):
        opt.start_epoch(1, 3)
    assert opt.lr == 0.1  # the rate is left as it was


def test_a_schedule_may_give_numpy_numbers_and_zero():
    opt = SGD(lr=0.1, schedule=lambda epoch, epochs: np.float32(0.5) if epoch else 0)
    opt.start_epoch(0, 2)
    assert opt.lr == 0.0
    opt.start_epoch(1, 2)
    assert opt.lr == 0.05 and isinstance(opt.lr, float)


@pytest.mark.parametrize("make", [lambda: StepLR(2, gamma=-0.1), lambda: CosineLR(min_factor=-1.0),
                                  lambda: CosineLR(min_factor=math.nan)])
def test_built_in_schedules_refuse_negative_factors(make):
    with pytest.raises((ValueError, TypeError), match="gamma|min_factor"):
        make()


# --- one default rate per optimizer; state that a checkpoint can hold -------------------------


def test_one_table_of_default_rates_for_the_classes_and_make_optimizer():
    assert optim.DEFAULT_LR == {"sgd": 0.01, "adam": 1e-3, "adamw": 1e-3}
    for name, cls in optim.OPTIMIZERS.items():
        assert cls().lr == make_optimizer(name).lr == optim.DEFAULT_LR[name]


STATEFUL = {
    "momentum": lambda: SGD(lr=0.1, momentum=0.9),
    "nesterov": lambda: SGD(lr=0.1, momentum=0.8, nesterov=True, weight_decay=0.01),
    "adam": lambda: Adam(lr=0.01),
    "adamw": lambda: AdamW(lr=0.01),
}


@pytest.mark.parametrize("kernels", [None, "xp"], ids=["fused", "xp"])
@pytest.mark.parametrize("make", STATEFUL.values(), ids=STATEFUL.keys())
def test_a_saved_state_continues_bit_for_bit(make, kernels, monkeypatch):
    """Two steps, the state through safetensors bytes into a new optimizer, three more steps:
    the same parameters, bit for bit, as five steps of one optimizer."""
    from safetensors.numpy import load, save

    if kernels:
        monkeypatch.setenv("XPNET_KERNELS", kernels)
    params, grads = problem(3)
    params = [p.astype(np.float32) for p in params]
    grads = [[g.astype(np.float32) for g in step] for step in grads]
    straight = run(make(), params, grads)

    first = make()
    live = run(first, params, grads[:2])
    state = load(save(first.state_dict()))  # array-only: what a checkpoint file holds
    assert {name.split(".")[1] for name in state} == set(first.state_keys)
    second = make()
    second.load_state_dict(state, live)
    resumed = run(second, live, grads[2:])
    for a, b in zip(resumed, straight):
        assert a.dtype == np.float32 and np.array_equal(a, b)
    fresh = run(make(), live, grads[2:])  # without the state: another trajectory
    assert not all(np.array_equal(a, b) for a, b in zip(fresh, straight))


def test_plain_sgd_keeps_no_state_and_a_new_optimizer_has_none():
    params, grads = problem()
    opt = SGD(lr=0.1)
    run(opt, params, grads)
    assert opt.state_dict() == {} and Adam().state_dict() == {}
    opt.load_state_dict({}, params)
    assert opt.state is None


@pytest.mark.parametrize(
    "state, match",
    [
        ({"0.m": np.zeros((4, 3)), "0.v": np.zeros((4, 3)), "0.t": np.array(1)}, r"lacks 1\.m, 1\.v, 1\.t"),
        ({"0.v": np.zeros((4, 3)), "1.v": np.zeros(3)}, r"lacks 0\.m"),
        ({"0.m": np.zeros((3, 4))}, r"'0\.m' has shape \(3, 4\), its parameter \(4, 3\)"),
        ({"2.m": np.zeros(3)}, r"'2\.m' is not one Adam.* keeps for 2 parameters \(each has m, v, t\)"),
        ({"momentum": np.zeros(3)}, r"'momentum' is not one"),
    ],
)
def test_a_state_that_is_not_this_optimizers_is_refused(state, match):
    params, _ = problem()
    with pytest.raises(ValueError, match=match):
        Adam().load_state_dict(state, params)


# --- messages, defaults and the fused-kernel switch, as a user meets them -------------------------


@pytest.mark.parametrize("make, error, message", [
    (lambda: SGD(lr=-0.1), ValueError, "lr must be >= 0, got -0.1"),
    (lambda: SGD(lr=0), ValueError, "lr must be > 0, got 0"),
    (lambda: SGD(momentum=1.0), ValueError, "momentum must be in [0, 1.0), got 1.0"),
    (lambda: SGD(weight_decay=-0.1), ValueError, "weight_decay must be >= 0, got -0.1"),
    (lambda: SGD(nesterov=True), ValueError, "nesterov=True needs momentum > 0"),
    (lambda: Adam(betas=(1.0, 0.9)), ValueError, "betas[0] must be in [0, 1.0), got 1.0"),
    (lambda: Adam(betas=(0.9, -1)), ValueError, "betas[1] must be in [0, 1.0), got -1"),
    (lambda: Adam(eps=-1), ValueError, "eps must be >= 0, got -1"),
    (lambda: Adam(eps=float("nan")), TypeError, "eps must be a finite number, got nan"),
    (lambda: CosineLR(min_factor=-1.0), ValueError, "min_factor must be >= 0, got -1.0"),
    (lambda: StepLR(2, gamma=-0.5), ValueError, "gamma must be >= 0, got -0.5"),
    (lambda: make_optimizer(SGD(), lr=0.1, momentum=0.9, schedule="cosine", weight_decay=0.1), ValueError,
     "set lr, momentum, schedule, weight_decay on the optimizer object, not beside it"),
    (lambda: SGD().load_state_dict({"0.v": np.zeros(3)}, [np.zeros(3)]), ValueError,
     "optimizer state '0.v' is not one SGD(lr=0.01, momentum=0.0, nesterov=False) keeps for 1 parameters "
     "(each has none)"),
])
def test_refusals_name_the_setting_and_the_allowed_range(make, error, message):
    with pytest.raises(error, match="^" + re.escape(message) + "$"):
        make()


def test_defaults_a_user_relies_on():
    assert StepLR(1)(2, 10) == pytest.approx(0.01)  # gamma 0.1
    opt = make_optimizer()
    assert type(opt) is SGD and opt.lr == 0.01
    opt = SGD(lr=0.1)
    opt.start_epoch(3, 10)  # no schedule: the base rate every epoch
    assert opt.lr == 0.1
    assert repr(AdamW()) == "AdamW(lr=0.001, betas=(0.9, 0.999), eps=1e-08, weight_decay=0.01)"


def test_adamw_follows_its_schedule():
    opt = AdamW(lr=0.01, schedule="cosine")
    opt.start_epoch(5, 10)
    assert opt.lr == pytest.approx(0.005)


def test_a_subclass_that_changes_the_formula_is_used_instead_of_the_kernel():
    class SignSGD(SGD):
        def _update(self, p, g, state):
            p -= self.lr * np.sign(g)

    p, g = np.array([1.0, 2.0, 3.0]), np.array([0.5, -4.0, 0.0])
    SignSGD(lr=0.1).step([p], [g])
    np.testing.assert_array_equal(p, [0.9, 2.1, 3.0])


@pytest.mark.parametrize("make", [lambda: SGD(lr=0.1, momentum=0.9), lambda: Adam(lr=0.01)], ids=["sgd", "adam"])
def test_any_parameter_layout_or_namespace_takes_the_same_steps(make):
    """Views, mixed precision, other namespaces: the update is the same (the kernel takes only what it can)."""
    import array_api_strict as xs

    params, grads = problem(3)
    expected = run(make(), params, grads)
    # a non-contiguous view of a parameter, updated in place
    base = np.zeros((3, 4))
    base[...] = params[0].T
    live = [base.T, params[1].copy()]
    opt = make()
    for step_grads in grads:
        opt.step(live, [g.copy() for g in step_grads])
    np.testing.assert_allclose(base.T, expected[0], rtol=1e-13)
    # float32 gradients for float64 parameters
    live = [p.copy() for p in params]
    opt = make()
    for step_grads in grads:
        opt.step(live, [g.astype(np.float32) for g in step_grads])
    for a, e in zip(live, run(make(), params, [[g.astype(np.float32).astype(np.float64) for g in s] for s in grads])):
        np.testing.assert_allclose(a, e, rtol=1e-6)  # Adam squares the float32 gradient in float32
    # array_api_strict arrays
    live = [xs.asarray(p.copy()) for p in params]
    opt = make()
    for step_grads in grads:
        opt.step(live, [xs.asarray(g.copy()) for g in step_grads])
    for a, e in zip(live, expected):
        np.testing.assert_allclose(np.asarray(a), e, rtol=1e-12)


def test_one_stateless_optimizer_steps_numpy_and_then_other_arrays():
    import array_api_strict as xs

    params, grads = problem(4)
    expected = run(SGD(lr=0.1), params, grads)
    opt = SGD(lr=0.1)
    np_live = [p.copy() for p in params]
    xs_live = [xs.asarray(p.copy()) for p in params]
    for step_grads in grads:
        opt.step(np_live, [g.copy() for g in step_grads])
        opt.step(xs_live, [xs.asarray(g.copy()) for g in step_grads])
    for a, b, e in zip(np_live, xs_live, expected):
        np.testing.assert_allclose(a, e, rtol=1e-13)
        np.testing.assert_allclose(np.asarray(b), e, rtol=1e-13)


def test_a_new_optimizer_is_one_subclass_and_its_subclasses_keep_its_formula():
    """The module's promise: a new optimizer is a subclass with ``_update``; no weight decay unless asked."""

    class Plain(optim.Optimizer):
        def _update(self, p, g, state):
            p -= self.lr * g

    p, g = np.array([1.0, 2.0]), np.array([0.5, -1.0])
    Plain(0.1).step([p], [g])
    np.testing.assert_allclose(p, [0.95, 2.1], rtol=1e-15)

    class SignSGD(SGD):
        def _update(self, p, g, state):
            p -= self.lr * np.sign(g)

    class Deeper(SignSGD):  # inherits the changed formula, and still no kernel for it
        pass

    p = np.array([1.0, 2.0, 3.0])
    Deeper(lr=0.1).step([p], [np.array([0.5, -4.0, 0.0])])
    np.testing.assert_array_equal(p, [0.9, 2.1, 3.0])


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_step_refuses_a_gradient_list_that_does_not_match_the_parameters(name, rng):
    params = [rng.standard_normal((3, 2)).astype(np.float32), rng.standard_normal(2).astype(np.float32)]
    opt = make_optimizer(name, lr=0.1)
    with pytest.raises(ValueError, match="one gradient per parameter: got 1 gradients for 2"):
        opt.step(params, [np.ones_like(params[0])])
    before = [p.copy() for p in params]
    opt.step(params, [np.ones_like(p) for p in params])  # then a proper step still works
    assert not np.array_equal(params[0], before[0])
