"""Named architectures and the training recipes that go with them (what ``xpnet train --arch``
builds and its defaults).

    >>> from xpnet.recipes import lenet5
    >>> model = lenet5(seed=0)            # the write-up's LeNet-5: 60,074 parameters
"""

from __future__ import annotations

from .layers import AvgPool2D, Conv2D, Dense, Flatten
from .model import MLP, Sequential

__all__ = ["lenet5", "build", "RECIPES", "ARCHS"]


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


#: the fit settings each architecture trains with by default (``xpnet train --arch NAME``)
RECIPES = {
    # the Digit Recognition write-up's net and batch, at the like-for-like rate on a mean loss (README, results)
    "mlp": {"epochs": 10, "batch_size": 128, "optimizer": "sgd", "lr": 0.1, "schedule": "constant"},
    # measured on MNIST: see README, "Results", for the accuracy over seeds 0-2
    "lenet5": {"epochs": 15, "batch_size": 128, "optimizer": "adam", "lr": 2e-3, "schedule": "cosine"},
}

ARCHS = tuple(RECIPES)


def build(arch: str, *, layers=None, activation="relu", dtype="float32", seed=None, backend=None):
    """The model ``xpnet train --arch`` trains: ``"mlp"`` from ``layers`` widths, or ``"lenet5"``."""
    if arch == "mlp":
        return MLP(layers or [784, 50, 25, 10], activation=activation, dtype=dtype, seed=seed, backend=backend)
    if arch == "lenet5":
        if layers is not None:
            raise ValueError("--layers sets the MLP's widths; lenet5's layers are fixed")
        return lenet5(dtype=dtype, seed=seed, backend=backend)
    raise ValueError(f"unknown architecture {arch!r}: expected one of {ARCHS}")
