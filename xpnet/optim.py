"""Optimizers and learning-rate schedules, written once against ``xp``.

An optimizer updates parameters in place (``p -= ...``), so the arrays a model holds stay the
same objects on the same device. Learning-rate schedules are per-epoch factors on the base rate.
"""

from __future__ import annotations

import math

from .kernels import namespace_of

__all__ = ["Optimizer", "SGD", "Adam", "StepLR", "CosineLR", "make_optimizer", "make_schedule"]


# --- schedules -------------------------------------------------------------------------------


class StepLR:
    """Multiply the rate by ``gamma`` every ``step_size`` epochs."""

    def __init__(self, step_size: int, gamma: float = 0.1):
        if not isinstance(step_size, int) or step_size < 1:
            raise ValueError(f"step_size must be a positive integer, got {step_size!r}")
        self.step_size, self.gamma = step_size, float(gamma)

    def __call__(self, epoch: int, epochs: int) -> float:
        return self.gamma ** (epoch // self.step_size)

    def __repr__(self):
        return f"StepLR(step_size={self.step_size}, gamma={self.gamma})"


class CosineLR:
    """Cosine decay from the base rate to ``min_factor`` times it over the run's epochs."""

    def __init__(self, min_factor: float = 0.0):
        self.min_factor = float(min_factor)

    def __call__(self, epoch: int, epochs: int) -> float:
        progress = epoch / max(epochs, 1)
        return self.min_factor + (1 - self.min_factor) * (1 + math.cos(math.pi * progress)) / 2

    def __repr__(self):
        return f"CosineLR(min_factor={self.min_factor})"


def make_schedule(schedule):
    """``None``, ``"constant"``, ``"cosine"``, or a callable ``(epoch, epochs) -> factor``."""
    if schedule is None or schedule == "constant":
        return None
    if schedule == "cosine":
        return CosineLR()
    if callable(schedule):
        return schedule
    raise ValueError(f"unknown schedule {schedule!r}: expected 'constant', 'cosine' or a callable")


# --- optimizers ------------------------------------------------------------------------------


def _check_rate(name, value, *, upper=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (upper is not None and value >= upper):
        bound = f"[0, {upper})" if upper is not None else ">= 0"
        raise ValueError(f"{name} must be in {bound}, got {value!r}")
    return float(value)


class Optimizer:
    """Base class. ``step(params, grads)`` updates each parameter in place.

    ``lr`` is the current rate: ``base_lr * schedule(epoch, epochs)`` once ``start_epoch`` ran.
    """

    def __init__(self, lr: float, *, weight_decay: float = 0.0, schedule=None):
        self.base_lr = _check_rate("lr", lr)
        if self.base_lr == 0:
            raise ValueError("lr must be > 0, got 0")
        self.lr = self.base_lr
        self.weight_decay = _check_rate("weight_decay", weight_decay)
        self.schedule = make_schedule(schedule)
        self.state: list[dict] | None = None

    def start_epoch(self, epoch: int, epochs: int) -> None:
        self.lr = self.base_lr * (self.schedule(epoch, epochs) if self.schedule else 1.0)

    def step(self, params, grads) -> None:
        if self.state is None:
            self.state = [{} for _ in params]
        for p, g, state in zip(params, grads, self.state):
            if self.weight_decay:
                g = g + self.weight_decay * p  # L2 penalty (coupled), as in torch.optim
            self._update(p, g, state)

    def _update(self, p, g, state) -> None:
        raise NotImplementedError


class SGD(Optimizer):
    """Stochastic gradient descent, with optional (Nesterov) momentum.

    ``v = momentum * v + g``; the step is ``v`` (or ``g + momentum * v`` with Nesterov);
    ``p -= lr * step``. ``momentum=0`` is plain SGD.
    """

    def __init__(self, lr=0.01, *, momentum=0.0, nesterov=False, weight_decay=0.0, schedule=None):
        super().__init__(lr, weight_decay=weight_decay, schedule=schedule)
        self.momentum = _check_rate("momentum", momentum, upper=1.0)
        if nesterov and not self.momentum:
            raise ValueError("nesterov=True needs momentum > 0")
        self.nesterov = bool(nesterov)

    def _update(self, p, g, state):
        if self.momentum:
            if "v" not in state:
                state["v"] = namespace_of(p).zeros_like(p)
            v = state["v"]
            v *= self.momentum
            v += g
            g = g + self.momentum * v if self.nesterov else v
        p -= self.lr * g

    def __repr__(self):
        return f"SGD(lr={self.base_lr}, momentum={self.momentum}, nesterov={self.nesterov})"


class Adam(Optimizer):
    """Adam (Kingma & Ba): bias-corrected first and second moment estimates.

    ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g**2``,
    ``p -= lr * (m / (1 - b1**t)) / (sqrt(v / (1 - b2**t)) + eps)``.
    """

    def __init__(self, lr=1e-3, *, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, schedule=None):
        super().__init__(lr, weight_decay=weight_decay, schedule=schedule)
        self.beta1 = _check_rate("betas[0]", betas[0], upper=1.0)
        self.beta2 = _check_rate("betas[1]", betas[1], upper=1.0)
        self.eps = _check_rate("eps", eps)

    def _update(self, p, g, state):
        xp = namespace_of(p)
        if "m" not in state:
            state.update(m=xp.zeros_like(p), v=xp.zeros_like(p), t=0)
        state["t"] += 1
        m, v, t = state["m"], state["v"], state["t"]
        m *= self.beta1
        m += (1 - self.beta1) * g
        v *= self.beta2
        v += (1 - self.beta2) * (g * g)
        step = self.lr / (1 - self.beta1**t)
        p -= step * m / (xp.sqrt(v / (1 - self.beta2**t)) + self.eps)

    def __repr__(self):
        return f"Adam(lr={self.base_lr}, betas=({self.beta1}, {self.beta2}), eps={self.eps})"


OPTIMIZERS = {"sgd": SGD, "adam": Adam}


def make_optimizer(optimizer="sgd", *, lr=None, momentum=None, nesterov=False, weight_decay=0.0, schedule=None):
    """An Optimizer from a name (``"sgd"``, ``"adam"``) and settings, or one given as is.

    Settings given beside an Optimizer instance are refused rather than silently ignored.
    """
    if isinstance(optimizer, Optimizer):
        given = {"lr": lr, "momentum": momentum, "schedule": schedule}
        clash = [k for k, v in given.items() if v is not None] + (["weight_decay"] if weight_decay else [])
        if clash:
            raise ValueError(f"set {', '.join(clash)} on the optimizer object, not beside it")
        return optimizer
    if not isinstance(optimizer, str) or optimizer.lower() not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}: expected one of {sorted(OPTIMIZERS)} or an Optimizer")
    name = optimizer.lower()
    kwargs = {"weight_decay": weight_decay, "schedule": schedule}
    if lr is not None:
        kwargs["lr"] = lr
    if name == "sgd":
        return SGD(momentum=momentum or 0.0, nesterov=nesterov, **kwargs)
    if momentum is not None or nesterov:
        raise ValueError("momentum/nesterov apply to 'sgd' only; Adam has betas")
    return Adam(**kwargs)
