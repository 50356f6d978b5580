"""ONNX export: a built model as an ONNX graph that onnxruntime (or any ONNX runtime) can run.

The graph takes what ``predict`` takes as floats: float32 rows of the model's own input shape,
already scaled to [0, 1], with a dynamic batch axis (channels-last ``(N, H, W, C)`` images for a
CNN, ``(N, features)`` for an MLP). It outputs the class probabilities ``(N, n_classes)``, the
softmax of the logits, as ``predict_proba`` does. The graph is always float32, the type runtimes
serve: a float64 model's weights are rounded to float32, so its probabilities match
``predict_proba`` to float32 precision (~1e-7), not bit for bit.

ONNX convolutions and pooling are channels-first (NCHW), so the graph transposes into that
layout before the first of them and back before ``Flatten``: ``Flatten`` keeps xpnet's (H, W, C)
order, and the ``Dense`` kernel after it is used as it is.

Each layer type has one function in ``ONNX_OPS``, keyed by its exact class (a subclass may compute
something else, so it is not exported as its parent). A layer of your own exports once you add
its function, which gets the graph being built, the layer and the name of its input tensor, and
returns the name of its output tensor::

    def export_negate(g, layer, x):
        return g.node("Neg", [x])

    ONNX_OPS[Negate] = export_negate

``onnx`` is imported here only, when a model is exported (``pip install 'xpnet[onnx]'``).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from . import functional as F
from .files import atomic_write_bytes, check_file_target
from .layers import AvgPool2D, Conv2D, Dense, Dropout, Flatten, MaxPool2D, RandomShift

__all__ = ["to_onnx", "export_onnx", "ONNX_OPS", "OPSET"]

OPSET = 17  # run by onnxruntime 1.13 (2022) and later
IR_VERSION = 8  # the IR version of opset 17 (onnx 1.12): newer onnx writes a later one older runtimes refuse

#: the ONNX operator of each of xpnet's activations (``xpnet.functional.ACTIVATIONS``)
ACTIVATION_OPS = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid"}


def _import_onnx():
    try:
        import onnx
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install 'xpnet[onnx]'") from None
    return onnx


class OnnxGraph:
    """The graph being built: its nodes, its weights, and which tensors are channels-first.

    Names are scoped by layer (``layers.2.W``, ``layers.2.Conv``), as in the model file.
    """

    def __init__(self, onnx, to_numpy):
        self._helper, self._numpy_helper = onnx.helper, onnx.numpy_helper
        self._to_numpy = to_numpy
        self.nodes, self.initializers = [], []
        self.scope = ""
        self._channels_first: set[str] = set()
        self._uses = Counter()

    def _name(self, base: str) -> str:
        name = self.scope + base
        self._uses[name] += 1
        return name if self._uses[name] == 1 else f"{name}_{self._uses[name]}"

    def node(self, op: str, inputs: list[str], *, output=None, channels_first=False, **attributes) -> str:
        """Add an ``op`` node on the named ``inputs``; return the name of its output.
        ``channels_first`` marks an output in NCHW layout."""
        name = self._name(op)
        output = output or name
        self.nodes.append(self._helper.make_node(op, inputs, [output], name=name, **attributes))
        if channels_first:
            self._channels_first.add(output)
        return output

    def weight(self, name: str, array, *, axes=None) -> str:
        """Add a parameter (on any backend) as a float32 initializer, its axes permuted to
        ``axes`` if given; return its name."""
        name = self._name(name)
        host = np.asarray(self._to_numpy(array))
        if not np.isfinite(host).all():  # a graph that outputs NaN is not worth writing
            raise ValueError(f"cannot export: tensor {name!r} holds NaN or infinite values")
        host = host if axes is None else host.transpose(axes)
        self.initializers.append(self._numpy_helper.from_array(np.ascontiguousarray(host, dtype=np.float32), name))
        return name

    def channels_first(self, x: str) -> str:
        """``x`` in ONNX's image layout (N, C, H, W), transposed from channels-last if need be."""
        return x if x in self._channels_first else self.node("Transpose", [x], perm=[0, 3, 1, 2], channels_first=True)

    def channels_last(self, x: str) -> str:
        """``x`` in xpnet's image layout (N, H, W, C): transposed back if it is channels-first."""
        return self.node("Transpose", [x], perm=[0, 2, 3, 1]) if x in self._channels_first else x

    def activation(self, x: str, activation) -> str:
        """``activation`` applied to ``x`` (elementwise: the layout is kept)."""
        if activation is None:
            return x
        return self.node(ACTIVATION_OPS[activation], [x], channels_first=x in self._channels_first)


# -- one function per layer type: (graph, layer, input name) -> output name ---------------------


def export_dense(g: OnnxGraph, layer: Dense, x: str) -> str:
    """``act(x @ W + b)``: one Gemm; the kernel is already (fan_in, units)."""
    y = g.node("Gemm", [x, g.weight("W", layer.W), g.weight("b", layer.b)])
    return g.activation(y, layer.activation)


def export_conv2d(g: OnnxGraph, layer: Conv2D, x: str) -> str:
    """A Conv with the kernel as ONNX wants it, (filters, C, kh, kw), and explicit padding:
    Keras's "same" puts the odd pixel after, which the pads state exactly."""
    (_, top, bottom), (_, left, right) = (
        F.conv_output_size(size, window, stride, layer.padding)
        for size, window, stride in zip(layer.input_shape[:2], layer.kernel_size, layer.strides)
    )
    y = g.node(
        "Conv", [g.channels_first(x), g.weight("W", layer.W, axes=(3, 2, 0, 1)), g.weight("b", layer.b)],
        channels_first=True, kernel_shape=list(layer.kernel_size), strides=list(layer.strides),
        pads=[top, left, bottom, right],
    )
    return g.activation(y, layer.activation)


def _export_pool(op: str):
    def export_pool(g: OnnxGraph, layer, x: str) -> str:
        """Windows without padding, as xpnet's pooling (so AveragePool never counts a pad)."""
        return g.node(op, [g.channels_first(x)], channels_first=True, kernel_shape=list(layer.pool_size),
                      strides=list(layer.strides))

    return export_pool


def export_flatten(g: OnnxGraph, layer: Flatten, x: str) -> str:
    """Flattened in channels-last order, as xpnet's Flatten, so the next Dense's rows line up."""
    return g.node("Flatten", [g.channels_last(x)], axis=1)


def export_dropout(g: OnnxGraph, layer: Dropout, x: str) -> str:
    """The identity: dropout acts in training only."""
    return x


def export_random_shift(g: OnnxGraph, layer: RandomShift, x: str) -> str:
    """The identity: the shifts act in training only."""
    return x


#: layer class -> the function that adds it to an ``OnnxGraph``
ONNX_OPS = {
    Dense: export_dense,
    Conv2D: export_conv2d,
    MaxPool2D: _export_pool("MaxPool"),
    AvgPool2D: _export_pool("AveragePool"),
    Flatten: export_flatten,
    Dropout: export_dropout,
    RandomShift: export_random_shift,
}


def to_onnx(model):
    """The ONNX model (an ``onnx.ModelProto``, checked by ``onnx.checker``) of a built model.

    Input ``"input"``: float32 ``(N, *model.input_shape)``, values as ``predict`` takes floats
    (pixels already scaled to [0, 1]). Output ``"probabilities"``: float32 ``(N, n_classes)``.

    Raises
    ------
    ValueError
        A layer type without a function in ``ONNX_OPS``, or weights that are NaN or infinite.
    RuntimeError
        The model is not built.
    ImportError
        ``onnx`` is not installed.
    """
    from . import __version__

    model._require_built()
    for i, layer in enumerate(model.layers):  # before any work: an unknown layer is the likely failure
        if type(layer) not in ONNX_OPS:
            known = ", ".join(cls.__name__ for cls in ONNX_OPS)
            raise ValueError(
                f"cannot export layers[{i}] to ONNX: no exporter for layer type {type(layer).__name__} "
                f"(known: {known}); add one to xpnet.export.ONNX_OPS"
            )
    onnx = _import_onnx()
    helper, float32 = onnx.helper, onnx.TensorProto.FLOAT
    g = OnnxGraph(onnx, model.backend.to_numpy)
    x = "input"
    for i, layer in enumerate(model.layers):
        g.scope = f"layers.{i}."
        x = ONNX_OPS[type(layer)](g, layer, x)
    g.scope = ""
    g.node("Softmax", [x], output="probabilities", axis=1)
    graph = helper.make_graph(
        g.nodes, type(model).__name__, initializer=g.initializers,
        inputs=[helper.make_tensor_value_info("input", float32, ["N", *model.input_shape])],
        outputs=[helper.make_tensor_value_info("probabilities", float32, ["N", model.n_classes])],
    )
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
        producer_name="xpnet", producer_version=__version__,
        doc_string=f"{model!r}: float32 input scaled to [0, 1], class probabilities out",
    )
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export_onnx(model, path) -> None:
    """Write ``to_onnx(model)`` to ``path``, atomically (a temporary file, then a rename).

    Raises ``IsADirectoryError`` for a folder, ``FileNotFoundError`` for a missing folder, and
    what ``to_onnx`` raises; a refused export leaves any file at ``path`` as it was.
    """
    path = check_file_target(path, "model.onnx")
    atomic_write_bytes(path, to_onnx(model).SerializeToString())
