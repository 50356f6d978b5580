"""Optimizers: formulas against PyTorch's, and a new optimizer as one class (AdamW)."""

from __future__ import annotations

import numpy as np
import pytest

import xpnet
from xpnet.optim import SGD, Adam, AdamW, make_optimizer


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
