"""Optimizers and learning-rate schedules, written once against ``xp``.

An optimizer updates parameters in place (``p -= ...``), so the arrays a model holds stay the
same objects on the same device. Learning-rate schedules are per-epoch factors on the base rate.

Each optimizer owns its state (``state``: one dict of arrays per parameter, named by the class)
and its hyperparameters, and applies its own update: the ``xp`` formula (the reference) or, for
NumPy arrays, its fused Numba kernel (one in-place pass over all the parameters in one call,
the same formula in the same order and precision, bit for bit; ``XPNET_KERNELS=xp`` turns the
kernels off). A new optimizer is one subclass: ``_update`` (and ``_fused_step`` if it has a
kernel).
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
import operator

import numpy as np

from . import kernels
from .kernels import namespace_of
from .kernels.cores import cores, numba_owns_cores

__all__ = [
    "Optimizer", "SGD", "Adam", "AdamW", "StepLR", "CosineLR", "make_optimizer", "make_schedule", "DEFAULT_LR",
]

#: the learning rate each optimizer takes when none is given, in the library and the CLI alike
#: (``xpnet train``'s recipes set their own: the MLP recipe trains with SGD at 0.1)
DEFAULT_LR = {"sgd": 0.01, "adam": 1e-3, "adamw": 1e-3}

#: The fewest parameter values a fused update splits among the cores (where numba's threads own
#: them): a parallel region costs ~5 us to start. 784-50-25-10's 40,785 values, Adam: 25.6 us on
#: one core, 18 us on two (2-core Intel Xeon); break-even near 16,000.
PARALLEL_UPDATE_MIN_ELEMENTS = 1 << 15


# --- schedules -------------------------------------------------------------------------------


class StepLR:
    """Multiply the rate by ``gamma`` every ``step_size`` epochs."""

    def __init__(self, step_size: int, gamma: float = 0.1):
        if not isinstance(step_size, int) or step_size < 1:
            raise ValueError(f"step_size must be a positive integer, got {step_size!r}")
        self.step_size, self.gamma = step_size, _check_rate("gamma", gamma)

    def __call__(self, epoch: int, epochs: int) -> float:
        return self.gamma ** (epoch // self.step_size)

    def __repr__(self):
        return f"StepLR(step_size={self.step_size}, gamma={self.gamma})"


class CosineLR:
    """Cosine decay from the base rate to ``min_factor`` times it over the run's epochs."""

    def __init__(self, min_factor: float = 0.0):
        self.min_factor = _check_rate("min_factor", min_factor)

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
        bound = f"in [0, {upper})" if upper is not None else ">= 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return float(value)


def _defined_in(cls, name):
    return next(c for c in cls.__mro__ if name in c.__dict__)


@functools.cache
def _kernel_follows_formula(cls) -> bool:
    """Whether ``cls``'s fused kernel comes from where its formula (``_update``) does: a subclass
    that changes the formula but not the kernel gets the formula."""
    return _defined_in(cls, "_update") is _defined_in(cls, "_fused_step")


class Optimizer:
    """Base class. ``step(params, grads)`` updates each parameter in place.

    ``lr`` is the current rate: ``base_lr * schedule(epoch, epochs)`` once ``start_epoch`` ran.
    ``weight_decay`` is an L2 penalty added to the gradient (coupled, as in ``torch.optim``);
    ``AdamW`` decouples it.
    """

    def __init__(self, lr: float, *, weight_decay: float = 0.0, schedule=None):
        self.base_lr = _check_rate("lr", lr)
        if self.base_lr == 0:
            raise ValueError("lr must be > 0, got 0")
        self.lr = self.base_lr
        self.weight_decay = _check_rate("weight_decay", weight_decay)
        self.schedule = make_schedule(schedule)
        self.state: list[dict] | None = None
        self._fused = None  # the arrays the last fused step took: the same objects need no check

    def __getstate__(self):
        return {**self.__dict__, "_fused": None}  # a cache of views and compiled kernels: made again

    def start_epoch(self, epoch: int, epochs: int) -> None:
        factor = self.schedule(epoch, epochs) if self.schedule else 1.0
        # a negative factor would train backwards, a NaN silently stop learning
        if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not (
            math.isfinite(factor) and factor >= 0
        ):
            raise ValueError(
                f"the schedule {self.schedule!r} gave the factor {factor!r} for epoch {epoch} of {epochs}; "
                "a schedule must return a finite number >= 0"
            )
        self.lr = self.base_lr * float(factor)

    def start_batch(self, rows: int, weight: float) -> None:
        """Told by ``fit`` before each step (not on the CUDA graph path, which takes ``SGD``
        and ``Adam`` as they are): the batch's rows (the global batch's, across ranks) and their
        summed sample weight (``rows`` without ``sample_weight``). The gradients are of the
        batch's (weighted) mean loss, so xpnet's optimizers need neither; a penalty that is
        relative to the batch's weight (scikit-learn's ``alpha``) reads them."""

    def hyperparameters(self) -> dict:
        """The settings a fused update reads, by name (the CUDA graph path reads these)."""
        return {"lr": self.lr, "weight_decay": self.weight_decay}

    def step(self, params, grads) -> None:
        """Update ``params`` in place from ``grads`` (one gradient per parameter, in order)."""
        if len(grads) != len(params):
            raise ValueError(f"step needs one gradient per parameter: got {len(grads)} gradients for {len(params)}")
        if self.state is None:
            self.state = [{} for _ in params]
        fused = self._fused_for(params, grads)
        if fused is not None:
            self._fused_step(fused)
            return
        for p, g, state in zip(params, grads, self.state):
            rate, shrink = self._coupled_decay(p), self._decoupled_decay(p)
            if rate:
                g = g + rate * p
            if shrink:
                p *= 1 - shrink
            self._update(p, g, state)

    def fused_updates(self, params, grads, batches):
        """The fused updates of the next ``len(batches)`` steps, for a caller that runs the steps
        and their updates itself (``kernels.cpu_step``'s whole epoch in one kernel), or ``None``
        where this optimizer has no fused update for these arrays (nothing is changed then).

        ``batches``: each step's ``(rows, weight)``, as ``start_batch`` takes them. Returns
        ``(kernel, parts, args)``: step ``k``'s update is ``_numba_loops`` function ``kernel``
        (its ``_parallel`` driver with ``parts`` last where ``parts > 1``) on ``args``, whose
        scalars array holds a row per step: the step takes row ``k``. A fused update's scalars
        depend on the step count and the batch, never on the values, so they are all known
        now: this tells ``start_batch`` of every batch and advances the state's step counts,
        as those steps would; the caller must then take them all.
        """
        fused = self._fused_for(params, grads)
        if fused is None or not batches:
            return None
        if self.state is None:
            self.state = [{} for _ in params]
        calls = fused.recording = []
        try:
            for rows, weight in batches:
                self.start_batch(rows, weight)
                self._fused_step(fused)
        finally:
            fused.recording = None
        kernel, parts, args, _ = calls[0]
        for call in calls[1:]:  # every step the same kernel on the same arrays and settings
            if call[:2] != (kernel, parts) or not all(map(_same_argument, call[2], args)):
                raise RuntimeError(f"{self!r}'s fused update changed within the steps: {call[0]} on other arguments")
        coefs = np.stack([call[3] for call in calls])
        return kernel, parts, tuple(coefs if a is fused._coef else a for a in args)

    #: the names of each parameter's state once it has taken a step
    state_keys: tuple = ()

    def state_dict(self) -> dict:
        """The state, as named arrays (safetensors holds them: a checkpoint needs no pickle).

        ``"{i}.{key}"`` is parameter ``i``'s ``key`` (``state_keys``): the live arrays, on the
        parameters' device, and step counts as 0-d int64 NumPy arrays. Empty before the first step.
        """
        return {
            f"{i}.{key}": np.asarray(value, dtype=np.int64) if isinstance(value, numbers.Integral) else value
            for i, entry in enumerate(self.state or ())
            for key, value in entry.items()
        }

    def load_state_dict(self, state: dict, params) -> None:
        """Continue from ``state`` (``state_dict``'s, arrays from any device, e.g. read from a
        file) for ``params``: each array must have its parameter's shape and is copied to the
        parameter's device and dtype, so the next ``step`` is the one the saved optimizer would
        have taken.

        Raises
        ------
        ValueError
            A name this optimizer does not keep for these parameters, a missing name, or a shape
            that is not the parameter's.
        """
        params = list(params)
        if not state:
            self.state = None
            return
        entries = [{} for _ in params]
        for name, value in state.items():
            index, _, key = name.partition(".")
            if not (index.isdigit() and int(index) < len(params) and key in self.state_keys):
                raise ValueError(
                    f"optimizer state {name!r} is not one {self!r} keeps for {len(params)} parameters "
                    f"(each has {', '.join(self.state_keys) or 'none'})"
                )
            p = params[int(index)]
            if key == "t":
                entries[int(index)][key] = int(value)
                continue
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(
                    f"optimizer state {name!r} has shape {tuple(value.shape)}, its parameter {tuple(p.shape)}"
                )
            xp = namespace_of(p)
            copy = xp.empty_like(p)  # C-contiguous, the parameter's dtype: what a fused update takes
            copy[...] = xp.asarray(value)
            entries[int(index)][key] = copy
        for i, entry in enumerate(entries):
            missing = [f"{i}.{key}" for key in self.state_keys if key not in entry]
            if missing:
                raise ValueError(f"optimizer state for {self!r} lacks {', '.join(missing)}")
        self.state = entries

    def _coupled_decay(self, p) -> float:
        """The L2 rate added to ``p``'s gradient (``g + rate * p``; 0 = none)."""
        return self.weight_decay

    def _decoupled_decay(self, p) -> float:
        """The share ``p`` shrinks by before the update (``p *= 1 - share``; 0 = none)."""
        return 0.0

    def _update(self, p, g, state) -> None:
        """The reference update of one parameter (its decay applied), against ``xp``."""
        raise NotImplementedError

    _fused_step = None  # (fused: _FusedParameters) -> None: every parameter's update in one kernel

    def _decays(self, fused, columns: int):
        """``fused``'s scalars array for a kernel that takes ``columns`` scalars per parameter,
        each parameter's ``(l2, keep)`` in the first two."""
        coef = fused.scalars(columns)
        coef[:, 0] = [self._coupled_decay(p) for p in fused.params]
        coef[:, 1] = [1 - self._decoupled_decay(p) for p in fused.params]
        return coef

    def _fused_for(self, params, grads):
        """The parameters and gradients as one fused kernel takes them, where this optimizer
        has one and every parameter and gradient is a C-contiguous NumPy array of one float
        dtype; else ``None``."""
        if self._fused_step is None or kernels.default_impl() not in ("auto", "numba"):
            return None
        if not _kernel_follows_formula(type(self)):
            return None
        fused = self._fused
        if fused is None or not fused.holds(params):
            if not params or type(params[0]) is not np.ndarray or params[0].dtype not in (np.float32, np.float64):
                return None
            dtype = params[0].dtype
            for p in params:
                if not (type(p) is np.ndarray and p.dtype == dtype and p.flags.c_contiguous):
                    return None
            numba_cpu = kernels.kernel_module("numba")
            if numba_cpu.unavailable():
                return None
            fused = self._fused = _FusedParameters(params, numba_cpu._get_loops())
        return fused if fused.take_gradients(grads) else None


def _same_argument(a, b) -> bool:
    """Whether two update calls' arguments are the same: the same array, or equal scalars."""
    return a is b or (not isinstance(a, np.ndarray) and not isinstance(a, tuple) and a == b)


class _FusedParameters:
    """What one fused kernel call takes for a list of parameters and their gradients.

    ``p``/``g``: tuples of their 1-D views (numba passes a tuple of arrays cheaply: one call
    updates them all). ``state_buffer(state, key)``: one flat buffer whose consecutive slices
    are every parameter's ``state[i][key]`` (the state dicts hold the slices, so ``state_dict``
    and the reference step see the same arrays). ``scalars(columns)``: a reused
    ``(parameters, columns)`` array for each parameter's scalars, in the parameters' dtype.
    """

    def __init__(self, params, loops):
        self.params, self.grads, self.loops = list(params), [], loops
        self.p = tuple(p.reshape(-1) for p in self.params)
        self.g = ()
        self.dtype = self.params[0].dtype
        self.offsets = np.cumsum([0] + [p.size for p in self.params]).tolist()
        self.empty = np.empty(0, self.dtype)
        self._coef = self._cores = None
        self._buffers = {}  # key -> the flat buffer and the slices the state holds
        self.recording = None  # a list while ``Optimizer.fused_updates`` collects the calls

    def holds(self, params) -> bool:
        """Whether these are the very arrays this was made for (checked at every step: a model's
        arrays may be replaced, and a view of a replaced array would update nothing)."""
        return len(params) == len(self.params) and all(map(operator.is_, params, self.params))

    def take_gradients(self, grads) -> bool:
        """Point ``g`` at ``grads`` (the reference step returns new arrays every step; a fast
        step, the same ones); ``False`` where one is not a C-contiguous NumPy array of its
        parameter's dtype and shape."""
        if len(grads) == len(self.grads) and all(map(operator.is_, grads, self.grads)):
            return True
        for p, g in zip(self.params, grads):  # as many of each: step checked
            if not (type(g) is np.ndarray and g.dtype == self.dtype and g.flags.c_contiguous and g.shape == p.shape):
                return False
        self.grads, self.g = list(grads), tuple(g.reshape(-1) for g in grads)
        return True

    def run(self, kernel: str, *args) -> None:
        """The update kernel ``kernel`` of ``loops`` on ``args``; its parallel driver, each
        parameter split among the cores, while numba's threads own them (a training step holds
        BLAS on one thread: ``kernels.cores.numba_owns_cores``) and there are enough parameters
        to split (``PARALLEL_UPDATE_MIN_ELEMENTS``). The same values either way. While
        ``recording`` is a list, the call is appended to it instead (with a copy of the scalars)."""
        parts = 1
        if self.offsets[-1] >= PARALLEL_UPDATE_MIN_ELEMENTS and numba_owns_cores():
            if self._cores is None:
                self._cores = cores()
            parts = self._cores
        if self.recording is not None:
            self.recording.append((kernel, parts, args, self._coef.copy()))
        elif parts > 1:
            getattr(self.loops, kernel + "_parallel")(*args, parts)
        else:
            getattr(self.loops, kernel)(*args)

    def scalars(self, columns: int):
        if self._coef is None or self._coef.shape[1] != columns:
            self._coef = np.empty((len(self.params), columns), self.dtype)
        return self._coef

    def state_buffer(self, state: list, key: str):
        """The flat buffer behind every ``state[i][key]``: made (zeros, or a copy of the arrays
        there, e.g. loaded from a checkpoint) where the state does not hold its slices yet."""
        buffer, views = self._buffers.get(key, (None, ()))
        if len(views) != len(state) or not all(map(operator.is_, map(dict.get, state, itertools.repeat(key)), views)):
            buffer = np.zeros(self.offsets[-1], self.dtype)
            views = [buffer[lo:hi].reshape(p.shape) for lo, hi, p in zip(self.offsets, self.offsets[1:], self.params)]
            for entry, view in zip(state, views):
                if key in entry:
                    view[...] = entry[key]
                entry[key] = view
            self._buffers[key] = buffer, views
        return buffer


class SGD(Optimizer):
    """Stochastic gradient descent, with optional (Nesterov) momentum.

    ``v = momentum * v + g``; the step is ``v`` (or ``g + momentum * v`` with Nesterov);
    ``p -= lr * step``. ``momentum=0`` is plain SGD. State: ``v`` (with momentum).
    """

    def __init__(self, lr=DEFAULT_LR["sgd"], *, momentum=0.0, nesterov=False, weight_decay=0.0, schedule=None):
        super().__init__(lr, weight_decay=weight_decay, schedule=schedule)
        self.momentum = _check_rate("momentum", momentum, upper=1.0)
        if nesterov and not self.momentum:
            raise ValueError("nesterov=True needs momentum > 0")
        self.nesterov = bool(nesterov)
        self.state_keys = ("v",) if self.momentum else ()

    def hyperparameters(self):
        return {**super().hyperparameters(), "momentum": self.momentum, "nesterov": self.nesterov}

    def _update(self, p, g, state):
        if self.momentum:
            if "v" not in state:
                state["v"] = namespace_of(p).zeros_like(p)
            v = state["v"]
            v *= self.momentum
            v += g
            g = g + self.momentum * v if self.nesterov else v
        p -= self.lr * g

    def _fused_step(self, fused):
        coef = self._decays(fused, 3)
        coef[:, 2] = self.lr
        v = fused.state_buffer(self.state, "v") if self.momentum else fused.empty
        fused.run("sgd_step", fused.p, fused.g, v, coef, fused.dtype.type(self.momentum), self.nesterov)

    def __repr__(self):
        return f"SGD(lr={self.base_lr}, momentum={self.momentum}, nesterov={self.nesterov})"


class Adam(Optimizer):
    """Adam (Kingma & Ba): bias-corrected first and second moment estimates.

    ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g**2``,
    ``p -= lr * (m / (1 - b1**t)) / (sqrt(v / (1 - b2**t)) + eps)``. State: ``m``, ``v``, ``t``.
    """

    def __init__(self, lr=DEFAULT_LR["adam"], *, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, schedule=None):
        super().__init__(lr, weight_decay=weight_decay, schedule=schedule)
        self.beta1 = _check_rate("betas[0]", betas[0], upper=1.0)
        self.beta2 = _check_rate("betas[1]", betas[1], upper=1.0)
        self.eps = _check_rate("eps", eps)

    state_keys = ("m", "v", "t")

    def hyperparameters(self):
        return {**super().hyperparameters(), "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps}

    def _moments(self, p, state):
        if "m" not in state:
            xp = namespace_of(p)
            state.update(m=xp.zeros_like(p), v=xp.zeros_like(p), t=0)
        state["t"] += 1
        return state["m"], state["v"], state["t"]

    def _corrections(self, t: int):
        """Step ``t``'s scalars: ``(lr / (1 - b1**t), 1 - b2**t, eps)``."""
        return self.lr / (1 - self.beta1**t), 1 - self.beta2**t, self.eps

    def _update(self, p, g, state):
        m, v, t = self._moments(p, state)
        m *= self.beta1
        m += (1 - self.beta1) * g
        v *= self.beta2
        v += (1 - self.beta2) * (g * g)
        step, bias2, eps = self._corrections(t)
        p -= step * m / (namespace_of(p).sqrt(v / bias2) + eps)

    def _fused_step(self, fused):
        m, v = fused.state_buffer(self.state, "m"), fused.state_buffer(self.state, "v")
        coef, corrections = self._decays(fused, 5), {}
        for entry in self.state:  # (every parameter's count is the same, unless a state was loaded so)
            entry["t"] = t = entry.get("t", 0) + 1
            if t not in corrections:
                corrections[t] = self._corrections(t)
        coef[:, 2:] = corrections[t] if len(corrections) == 1 else [corrections[e["t"]] for e in self.state]
        b1, b2, scalar = self.beta1, self.beta2, fused.dtype.type
        fused.run("adam_step", fused.p, fused.g, m, v, coef, scalar(b1), scalar(1 - b1), scalar(b2), scalar(1 - b2))

    def __repr__(self):
        return f"{type(self).__name__}(lr={self.base_lr}, betas=({self.beta1}, {self.beta2}), eps={self.eps})"


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter, as ``torch.optim.AdamW``):
    ``p *= 1 - lr * weight_decay``, then Adam's step on the plain gradient."""

    def __init__(self, lr=DEFAULT_LR["adamw"], *, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, schedule=None):
        super().__init__(lr, betas=betas, eps=eps, weight_decay=weight_decay, schedule=schedule)

    def _coupled_decay(self, p):
        return 0.0

    def _decoupled_decay(self, p):
        return self.lr * self.weight_decay

    def __repr__(self):
        return f"{super().__repr__()[:-1]}, weight_decay={self.weight_decay})"


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def make_optimizer(optimizer="sgd", *, lr=None, momentum=None, nesterov=False, weight_decay=None, schedule=None):
    """An Optimizer from a name (``"sgd"``, ``"adam"``, ``"adamw"``) and settings, or one given as is.

    Settings left as ``None`` take the optimizer's defaults (``DEFAULT_LR``; weight decay 0,
    0.01 for AdamW). Settings given beside an Optimizer instance are refused rather than
    silently ignored.
    """
    if isinstance(optimizer, Optimizer):
        given = {"lr": lr, "momentum": momentum, "schedule": schedule, "weight_decay": weight_decay or None}
        clash = [k for k, v in given.items() if v is not None]
        if clash:
            raise ValueError(f"set {', '.join(clash)} on the optimizer object, not beside it")
        return optimizer
    if not isinstance(optimizer, str) or optimizer.lower() not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}: expected one of {sorted(OPTIMIZERS)} or an Optimizer")
    name = optimizer.lower()
    kwargs = {"schedule": schedule}
    if lr is not None:
        kwargs["lr"] = lr
    if weight_decay is not None:
        kwargs["weight_decay"] = weight_decay
    if name == "sgd":
        return SGD(momentum=momentum or 0.0, nesterov=nesterov, **kwargs)
    if momentum is not None or nesterov:
        raise ValueError(f"momentum/nesterov apply to 'sgd' only; {name} has betas")
    return OPTIMIZERS[name](**kwargs)
