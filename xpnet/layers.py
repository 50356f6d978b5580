"""Layers: objects that build their own parameters from their input shape, with an explicit
``forward`` and ``backward`` written once against ``xp`` (through ``xpnet.functional``).

Images are channels-last, as in Keras: ``(N, H, W, C)``. Parameters are kept in the layout
Keras uses for its weights (Dense kernel ``(fan_in, units)``, Conv2D kernel
``(kh, kw, in_channels, filters)``, biases ``(units,)``), which is also the layout the math
here wants (a convolution is one product of the im2col matrix and the reshaped kernel).

Adding a layer is one class (see README, "Layout"): hyperparameters in ``__init__`` (returned
by ``get_config``), ``build(input_shape, *, rng, dtype, backend) -> output_shape``, and
``forward``/``backward`` over functions of ``xpnet.functional``. Every subclass is registered
by its class name in ``LAYERS``, which is how model files find it again.
"""

from __future__ import annotations

import math

import numpy as np

from . import functional as F
from .kernels import namespace_of

__all__ = [
    "Layer", "Dense", "Conv2D", "MaxPool2D", "AvgPool2D", "Flatten", "Dropout", "RandomShift", "LAYERS", "INITS",
    "init_weights", "check_activation",
]

INITS = ("he", "glorot")

#: class name -> layer class; every subclass of ``Layer`` registers itself here
LAYERS: dict[str, type] = {}


def check_activation(activation):
    if activation is not None and activation not in F.ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: expected one of {tuple(F.ACTIVATIONS)} or None")


def _check_init(init):
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}: expected one of {INITS}")


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def init_weights(rng: np.random.Generator, shape, fan_in: int, fan_out: int, init: str) -> np.ndarray:
    """Draw a float64 weight array of ``shape`` on the host.

    ``"he"``: normal with std ``sqrt(2 / fan_in)`` (for ReLU); ``"glorot"``: uniform on
    ``+-sqrt(6 / (fan_in + fan_out))`` (for tanh/sigmoid).
    """
    _check_init(init)
    if init == "he":
        return rng.normal(0.0, math.sqrt(2.0 / fan_in), size=shape)
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape)


class Layer:
    """Base class of every layer.

    A subclass sets ``param_names`` (its parameter attributes, in file and ``get_weights``
    order; the gradient of ``W`` is kept in ``dW`` and so on) and writes ``__init__``,
    ``get_config``, ``build``, ``forward`` and ``backward``.
    """

    param_names: tuple[str, ...] = ()
    input_shape: tuple | None = None
    output_shape: tuple | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        known = LAYERS.get(cls.__name__)
        if known is not None and known.__module__ == __name__ and cls.__module__ != __name__:
            raise TypeError(f"a layer class named {cls.__name__!r} already exists in xpnet.layers: pick another name")
        LAYERS[cls.__name__] = cls

    # -- what a subclass writes ------------------------------------------------------------

    def get_config(self) -> dict:
        """The constructor's arguments, as JSON-able values."""
        return {}

    def build(self, input_shape: tuple, *, rng: np.random.Generator, dtype: str, backend) -> tuple:
        """Create the parameters for inputs of ``input_shape`` (no batch axis); return the
        output shape. ``rng`` draws initial weights on the host; ``backend.asarray`` moves them."""
        return tuple(input_shape)

    def forward(self, x, *, training=False):
        raise NotImplementedError

    def backward(self, dy, *, need_dx=True):
        """Given ``dL/dy``, leave each parameter's gradient in ``d<name>`` and return ``dL/dx``
        (or ``None`` when ``need_dx`` is false)."""
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)

    @property
    def built(self) -> bool:
        return self.output_shape is not None

    def setup(self, input_shape, *, rng, dtype, backend) -> tuple:
        """Build the layer for ``input_shape`` and record its input and output shapes."""
        self.input_shape = tuple(int(d) for d in input_shape)
        self.output_shape = tuple(int(d) for d in self.build(self.input_shape, rng=rng, dtype=dtype, backend=backend))
        return self.output_shape

    @property
    def params(self) -> list:
        return [getattr(self, name) for name in self.param_names]

    @property
    def grads(self) -> list:
        return [getattr(self, "d" + name, None) for name in self.param_names]

    def count_params(self) -> int:
        return sum(int(math.prod(p.shape)) for p in self.params)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    def _saved_for_backward(self, *arrays):
        if any(a is None for a in arrays):
            raise RuntimeError(f"{type(self).__name__}.backward() needs a forward(..., training=True) first")
        return arrays

    def _through_activation(self, dy):
        """``(x, dL/dz)`` for a layer ``y = act(z(x))`` that kept ``_x`` and ``_y`` in training."""
        x, y = self._saved_for_backward(self._x, self._y)
        return x, (dy if self.activation is None else F.DERIVATIVES[self.activation](dy, y))


class Dense(Layer):
    """Fully connected layer ``y = act(x @ W + b)`` on flat inputs ``(N, features)``.

    Parameters
    ----------
    units : int
    activation : None, "relu", "tanh" or "sigmoid"
        Applied after the bias; ReLU runs fused with the bias add (``F.bias_relu``).
    init : "he" or "glorot"

    Weights: ``W`` (fan_in, units), ``b`` (units,).
    """

    param_names = ("W", "b")

    def __init__(self, units, activation=None, *, init="he"):
        self.units = _positive_int("units", units)
        check_activation(activation)
        _check_init(init)
        self.activation, self.init = activation, init
        self.W = self.b = self.dW = self.db = None
        self._x = self._y = None

    def get_config(self):
        return {"units": self.units, "activation": self.activation, "init": self.init}

    def build(self, input_shape, *, rng, dtype, backend):
        if len(input_shape) != 1:
            raise ValueError(f"Dense takes flat inputs (features,), got {input_shape}: put a Flatten() before it")
        fan_in = input_shape[0]
        W = init_weights(rng, (fan_in, self.units), fan_in, self.units, self.init)
        self.W = backend.asarray(W.astype(dtype))
        self.b = backend.asarray(np.zeros(self.units, dtype=dtype))
        return (self.units,)

    def forward(self, x, *, training=False):
        z = x @ self.W
        if self.activation == "relu":
            y = F.bias_relu(z, self.b, out=z)  # z is a fresh product: safe to overwrite
        elif self.activation is None:
            y = z + self.b
        else:
            y = F.ACTIVATIONS[self.activation](z + self.b)
        if training:
            self._x, self._y = x, y
        return y

    def backward(self, dy, *, need_dx=True):
        """``dW = x.T @ dz``, ``db = sum(dz)``; returns ``dL/dx = dz @ W.T``."""
        x, dz = self._through_activation(dy)
        self.dW = x.T @ dz
        self.db = namespace_of(dz).sum(dz, axis=0)
        return dz @ self.W.T if need_dx else None


class Conv2D(Layer):
    """2-D convolution of channels-last images, ``y = act(conv2d(x, W) + b)``.

    Parameters
    ----------
    filters : int
    kernel_size : int or (kh, kw)
    strides : int or (sh, sw), default 1
    padding : "valid" (no padding) or "same" (zeros, output ``ceil(size / stride)``)
    activation : None, "relu", "tanh" or "sigmoid"
    init : "he" or "glorot" (fan-in ``kh * kw * in_channels``)

    Weights: ``W`` (kh, kw, in_channels, filters), ``b`` (filters,).
    """

    param_names = ("W", "b")

    def __init__(self, filters, kernel_size, strides=1, padding="valid", activation=None, *, init="he"):
        self.filters = _positive_int("filters", filters)
        self.kernel_size = F._pair("kernel_size", kernel_size)
        self.strides = F._pair("strides", strides)
        if padding not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")
        check_activation(activation)
        _check_init(init)
        self.padding, self.activation, self.init = padding, activation, init
        self.W = self.b = self.dW = self.db = None
        self._x = self._y = None

    def get_config(self):
        return {"filters": self.filters, "kernel_size": list(self.kernel_size), "strides": list(self.strides),
                "padding": self.padding, "activation": self.activation, "init": self.init}

    def build(self, input_shape, *, rng, dtype, backend):
        if len(input_shape) != 3:
            raise ValueError(f"Conv2D takes images (H, W, C), got inputs of shape {input_shape}")
        (h, w, c), (kh, kw) = input_shape, self.kernel_size
        rows = F.conv_output_size(h, kh, self.strides[0], self.padding)[0]
        cols = F.conv_output_size(w, kw, self.strides[1], self.padding)[0]
        fan_in, fan_out = kh * kw * c, kh * kw * self.filters
        W = init_weights(rng, (kh, kw, c, self.filters), fan_in, fan_out, self.init)
        self.W = backend.asarray(W.astype(dtype))
        self.b = backend.asarray(np.zeros(self.filters, dtype=dtype))
        return (rows, cols, self.filters)

    def forward(self, x, *, training=False):
        relu = self.activation == "relu"  # applied by the convolution's kernel as it writes, where it can
        y = F.conv2d(x, self.W, self.b, strides=self.strides, padding=self.padding, relu=relu)
        if not (relu or self.activation is None):
            y = F.ACTIVATIONS[self.activation](y)
        if training:
            self._x, self._y = x, y
        return y

    def backward(self, dy, *, need_dx=True):
        if self.activation == "relu":  # through the ReLU inside the convolution's gradient where it can
            x, y = self._saved_for_backward(self._x, self._y)
            dz, relu_output = dy, y
        else:
            (x, dz), relu_output = self._through_activation(dy), None
        dx, self.dW, self.db = F.conv2d_backward(
            dz, x, self.W, strides=self.strides, padding=self.padding, need_dx=need_dx, relu_output=relu_output
        )
        return dx


class _Pool2D(Layer):
    """Shared shape logic of the pooling layers (windows without padding, as Keras's default)."""

    def __init__(self, pool_size=2, strides=None):
        self.pool_size = F._pair("pool_size", pool_size)
        self.strides = self.pool_size if strides is None else F._pair("strides", strides)
        self._x = self._y = None

    def get_config(self):
        return {"pool_size": list(self.pool_size), "strides": list(self.strides)}

    def build(self, input_shape, *, rng, dtype, backend):
        if len(input_shape) != 3:
            raise ValueError(f"{type(self).__name__} takes images (H, W, C), got inputs of shape {input_shape}")
        rows, cols = (F.conv_output_size(input_shape[a], self.pool_size[a], self.strides[a], "valid")[0] for a in (0, 1))
        return (rows, cols, input_shape[2])


class MaxPool2D(_Pool2D):
    """Maximum over ``pool_size`` windows moved by ``strides`` (default: ``pool_size``)."""

    def forward(self, x, *, training=False):
        y = F.max_pool2d(x, pool_size=self.pool_size, strides=self.strides)
        if training:
            self._x, self._y = x, y
        return y

    def backward(self, dy, *, need_dx=True):
        x, y = self._saved_for_backward(self._x, self._y)
        return F.max_pool2d_backward(dy, x, y, pool_size=self.pool_size, strides=self.strides) if need_dx else None


class AvgPool2D(_Pool2D):
    """Mean over ``pool_size`` windows moved by ``strides`` (default: ``pool_size``)."""

    def forward(self, x, *, training=False):
        if training:
            self._x = x
        return F.avg_pool2d(x, pool_size=self.pool_size, strides=self.strides)

    def backward(self, dy, *, need_dx=True):
        (x,) = self._saved_for_backward(self._x)
        return F.avg_pool2d_backward(dy, x, pool_size=self.pool_size, strides=self.strides) if need_dx else None


class Flatten(Layer):
    """``(N, d1, d2, ...) -> (N, d1 * d2 * ...)`` in row-major (channels-last) order, as Keras."""

    def build(self, input_shape, *, rng, dtype, backend):
        return (math.prod(input_shape),)

    def forward(self, x, *, training=False):
        return namespace_of(x).reshape(x, (x.shape[0], math.prod(self.input_shape)))

    def backward(self, dy, *, need_dx=True):
        return namespace_of(dy).reshape(dy, (dy.shape[0], *self.input_shape)) if need_dx else None


class _Seeded(Layer):
    """A layer that draws random numbers in training (``Dropout``'s masks, ``RandomShift``'s
    offsets) from a generator of its own, seeded from the model's at build time so that a seeded
    model trains reproducibly; a run's checkpoint saves its state (``training.rng_states``).
    Draws happen on the host, then move to the device."""

    _rng = None

    def build(self, input_shape, *, rng, dtype, backend):
        self._rng = np.random.default_rng(rng.integers(2**63))
        self._backend, self._dtype = backend, dtype
        return tuple(input_shape)


class Dropout(_Seeded):
    """Inverted dropout: in training, each element is zeroed with probability ``rate`` and the
    others are scaled by ``1 / (1 - rate)``; at inference it is the identity.

    The masks come from a generator seeded from the model's seed at build time, so a seeded
    model trains reproducibly. They are drawn on the host (then moved to the device).
    """

    def __init__(self, rate):
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (0.0 <= rate < 1.0):
            raise ValueError(f"rate must be a fraction in [0, 1), got {rate!r}")
        self.rate = float(rate)
        self._mask = None

    def get_config(self):
        return {"rate": self.rate}

    def forward(self, x, *, training=False):
        if not training or self.rate == 0.0:
            self._mask = None
            return x
        keep = self._rng.random(tuple(x.shape)) >= self.rate
        self._mask = self._backend.asarray((keep / (1.0 - self.rate)).astype(self._dtype))
        return x * self._mask

    def backward(self, dy, *, need_dx=True):
        if not need_dx:
            return None
        return dy if self._mask is None else dy * self._mask


class RandomShift(_Seeded):
    """Augmentation: in training, each image moved by its own random whole number of pixels,
    drawn uniformly from ``[-pixels, pixels]`` along the rows and, independently, along the
    columns, the uncovered pixels set to 0 (``F.shift_images``); at inference, the identity.

    On channels-last images ``(N, H, W, C)``; it has no parameters. Put first, it shows the
    network a slightly different copy of each training image at every epoch; anywhere else its
    backward pass (the shift back) is still exact. The offsets come from a generator seeded from
    the model's seed at build time, drawn on the host (then moved to the device), as
    ``Dropout``'s masks.

    Parameters
    ----------
    pixels : int >= 0, default 2
        The largest shift along each axis; 0 makes the layer the identity.
    """

    def __init__(self, pixels=2):
        if isinstance(pixels, bool) or not isinstance(pixels, (int, np.integer)):
            raise TypeError(f"pixels must be an int, got {pixels!r}")
        if pixels < 0:
            raise ValueError(f"pixels must be >= 0, got {pixels!r}")
        self.pixels = int(pixels)
        self._offsets = None

    def get_config(self):
        return {"pixels": self.pixels}

    def build(self, input_shape, *, rng, dtype, backend):
        if len(input_shape) != 3:
            raise ValueError(f"RandomShift takes images (H, W, C), got inputs of shape {input_shape}")
        return super().build(input_shape, rng=rng, dtype=dtype, backend=backend)

    def forward(self, x, *, training=False):
        if not training or self.pixels == 0:
            self._offsets = None
            return x
        down, right = self._rng.integers(-self.pixels, self.pixels + 1, size=(2, x.shape[0]))
        self._offsets = (self._backend.asarray(down), self._backend.asarray(right))
        return F.shift_images(x, *self._offsets)

    def backward(self, dy, *, need_dx=True):
        if not need_dx:
            return None
        return dy if self._offsets is None else F.shift_images_backward(dy, *self._offsets)
