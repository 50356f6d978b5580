"""Named architectures and the training recipes that go with them (what ``xpnet train --arch``
builds and its defaults).

    >>> from xpnet.recipes import lenet5
    >>> model = lenet5(seed=0)            # the write-up's LeNet-5: 60,074 parameters
    >>> model = cnn_shift(seed=0)         # a small CNN trained on randomly shifted digits
"""

from __future__ import annotations

from .layers import AvgPool2D, Conv2D, Dense, Dropout, Flatten, MaxPool2D, RandomShift
from .model import MLP, Sequential

__all__ = ["lenet5", "cnn_shift", "build", "RECIPES", "ARCHS"]


def lenet5(*, dtype="float32", seed=None, backend=None) -> Sequential:
    """The LeNet-5 of the Deep Learning from Scratch post (Keras there, 98.58% on MNIST): two 3x3 ReLU
    convolutions (6 and 16 filters), each followed by 2x2 average pooling, then dense layers of
    120 and 84 ReLU units and 10 logits; input (28, 28, 1)."""
    layers = [
        Conv2D(6, 3, activation="relu"), AvgPool2D(2),
        Conv2D(16, 3, activation="relu"), AvgPool2D(2),
        Flatten(),
        Dense(120, activation="relu"), Dense(84, activation="relu"), Dense(10),
    ]
    return Sequential(layers, input_shape=(28, 28, 1), dtype=dtype, seed=seed, backend=backend)


def cnn_shift(*, dtype="float32", seed=None, backend=None) -> Sequential:
    """A small CNN that sees each training digit moved by up to 2 pixels along each axis
    (``RandomShift(2)``, training only): two 3x3 ReLU convolutions (24 and 48 filters), each
    followed by 2x2 max pooling, a dense layer of 128 ReLU units with dropout 0.3, and 10
    logits; input (28, 28, 1), 165,674 parameters. See README, "Results", for its accuracy."""
    layers = [
        RandomShift(2),
        Conv2D(24, 3, activation="relu"), MaxPool2D(2),
        Conv2D(48, 3, activation="relu"), MaxPool2D(2),
        Flatten(),
        Dense(128, activation="relu"), Dropout(0.3), Dense(10),
    ]
    return Sequential(layers, input_shape=(28, 28, 1), dtype=dtype, seed=seed, backend=backend)


#: the fit settings each architecture trains with by default (``xpnet train --arch NAME``)
RECIPES = {
    # the Digit Recognition write-up's net and batch, at the like-for-like rate on a mean loss (README, results)
    "mlp": {"epochs": 10, "batch_size": 128, "optimizer": "sgd", "lr": 0.1, "schedule": "constant"},
    # measured on MNIST: see README, "Results", for the accuracy over seeds 0-2
    "lenet5": {"epochs": 15, "batch_size": 128, "optimizer": "adam", "lr": 2e-3, "schedule": "cosine"},
    # sizes chosen on the last 10,000 training images held out, never on the test set; README, "Results"
    "cnn_shift": {"epochs": 15, "batch_size": 128, "optimizer": "adam", "lr": 2e-3, "schedule": "cosine"},
}

#: the functions that build each architecture with fixed layers
_FIXED = {"lenet5": lenet5, "cnn_shift": cnn_shift}

ARCHS = tuple(RECIPES)


def build(arch: str, *, layers=None, activation="relu", dtype="float32", seed=None, backend=None):
    """The model ``xpnet train --arch`` trains: ``"mlp"`` from ``layers`` widths, or ``"lenet5"``
    or ``"cnn_shift"`` (fixed layers)."""
    if arch == "mlp":
        return MLP(layers or [784, 50, 25, 10], activation=activation, dtype=dtype, seed=seed, backend=backend)
    if arch in _FIXED:
        if layers is not None:
            raise ValueError(f"--layers sets the MLP's widths; {arch}'s layers are fixed")
        return _FIXED[arch](dtype=dtype, seed=seed, backend=backend)
    raise ValueError(f"unknown architecture {arch!r}: expected one of {ARCHS}")
