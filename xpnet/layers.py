"""Layers: objects with an explicit ``forward`` and ``backward``, written once against ``xp``.

A layer keeps what its backward pass needs from the last ``forward(..., training=True)`` and,
after ``backward``, the gradient of each parameter in ``grads`` (same order as ``params``).
``MLP`` is a convenience over a list of them; a CNN will add Conv2D/pooling layers beside ``Dense``.
"""

from __future__ import annotations

import math

import numpy as np

from . import functional as F

ACTIVATIONS = ("relu", "tanh", "sigmoid")
INITS = ("he", "glorot")


def check_activation(activation):
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: expected one of {ACTIVATIONS}")


def init_weights(rng: np.random.Generator, fan_in: int, fan_out: int, init: str) -> np.ndarray:
    """Draw a (fan_in, fan_out) float64 weight matrix on the host.

    ``"he"``: normal with std ``sqrt(2 / fan_in)`` (for ReLU); ``"glorot"``: uniform on
    ``+-sqrt(6 / (fan_in + fan_out))`` (for tanh/sigmoid).
    """
    if init == "he":
        return rng.normal(0.0, math.sqrt(2.0 / fan_in), size=(fan_in, fan_out))
    if init == "glorot":
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, size=(fan_in, fan_out))
    raise ValueError(f"unknown init {init!r}: expected one of {INITS}")


class Layer:
    """Base class: ``forward(x, training)``, ``backward(dy) -> dx``, ``params``, ``grads``."""

    params: list = []
    grads: list = []

    def forward(self, x, *, training=False):
        raise NotImplementedError

    def backward(self, dy, *, need_dx=True):
        raise NotImplementedError


class Dense(Layer):
    """Fully connected layer ``y = act(x @ W + b)``.

    Parameters
    ----------
    W : array (fan_in, fan_out)
    b : array (fan_out,)
    activation : None, "relu", "tanh" or "sigmoid"
        Applied after the bias; ReLU runs fused with the bias add (``F.bias_relu``).
    """

    def __init__(self, W, b, *, activation=None):
        check_activation(activation)
        if W.ndim != 2 or b.ndim != 1 or b.shape[0] != W.shape[1]:
            raise ValueError(f"W {tuple(W.shape)} and b {tuple(b.shape)} do not make a dense layer")
        self.W, self.b = W, b
        self.activation = activation
        self.dW = self.db = None
        self._x = self._y = None

    @property
    def params(self):
        return [self.W, self.b]

    @property
    def grads(self):
        return [self.dW, self.db]

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.W.shape[0]), int(self.W.shape[1]))

    def forward(self, x, *, training=False):
        z = x @ self.W
        if self.activation == "relu":
            y = F.bias_relu(z, self.b, out=z)  # z is a fresh product: safe to overwrite
        elif self.activation == "tanh":
            y = F.tanh(z + self.b)
        elif self.activation == "sigmoid":
            y = F.sigmoid(z + self.b)
        else:
            y = z + self.b
        if training:
            self._x, self._y = x, y
        return y

    def backward(self, dy, *, need_dx=True):
        """Given ``dL/dy``, store ``dW = x.T @ dz``, ``db = sum(dz)`` and return ``dL/dx = dz @ W.T``."""
        if self._x is None:
            raise RuntimeError("backward() needs a forward(..., training=True) first")
        if self.activation == "relu":
            dz = F.relu_backward(dy, self._y)
        elif self.activation == "tanh":
            dz = F.tanh_backward(dy, self._y)
        elif self.activation == "sigmoid":
            dz = F.sigmoid_backward(dy, self._y)
        else:
            dz = dy
        xp = F.kernels.namespace_of(dz)
        self.dW = self._x.T @ dz
        self.db = xp.sum(dz, axis=0)
        return dz @ self.W.T if need_dx else None
