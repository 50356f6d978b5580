"""ONNX export, checked by running the graphs in onnxruntime against ``predict_proba``: every layer
type on odd shapes, trained MLP and LeNet-5 models on the real MNIST test set, the file it writes
and ``xpnet export``."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

import xpnet
from xpnet.cli import main
from xpnet.export import IR_VERSION, ONNX_OPS, OPSET, to_onnx
from xpnet.layers import AvgPool2D, Conv2D, Dense, Dropout, Flatten, Layer, MaxPool2D, RandomShift
from xpnet.recipes import lenet5

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def onnx_proba(source, X):
    """What onnxruntime computes for ``X`` with the graph of ``source``: an xpnet model, or the
    path of an ONNX file."""
    if isinstance(source, xpnet.Sequential):
        source = to_onnx(source).SerializeToString()
    session = ort.InferenceSession(source if isinstance(source, bytes) else str(source),
                                   providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"input": X})[0]


def randomized(model, seed=0):
    """``model`` with every weight redrawn, biases included (a fresh model's are zero and would
    hide a bias in the wrong place), scaled by the fan-in so the probabilities do not saturate."""
    rng = np.random.default_rng(seed)
    flat = xpnet.Sequential.get_weights(model)  # the flat list, for an MLP too
    model.set_weights([rng.normal(0.0, 1.0, size=w.shape) / math.sqrt(math.prod(w.shape[:-1])) for w in flat])
    return model


def assert_same_as_predict_proba(model, X):
    expected = model.predict_proba(X)
    got = onnx_proba(model, X)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


# -- every layer type, odd shapes ----------------------------------------------------------------

CASES = {
    "mlp-tanh": lambda: xpnet.MLP([13, 7, 5, 3], activation="tanh", seed=1),
    "mlp-sigmoid-float64": lambda: xpnet.MLP([6, 4, 2], activation="sigmoid", dtype="float64", seed=2),
    # an even kernel on odd sizes with stride 2: "same" pads one pixel more after than before
    "conv-same-stride2-maxpool": lambda: xpnet.Sequential(
        [Conv2D(3, (4, 3), strides=2, padding="same", activation="relu"), MaxPool2D((2, 3), strides=(1, 2)),
         Flatten(), Dense(5, activation="sigmoid"), Dropout(0.3), Dense(4)],
        input_shape=(9, 7, 2), seed=3),
    "conv-valid-strides-avgpool-1x1": lambda: xpnet.Sequential(
        [Conv2D(4, 3, strides=(2, 1), activation="tanh"), AvgPool2D(3, strides=2), Conv2D(2, 1, padding="same"),
         Flatten(), Dense(3)],
        input_shape=(11, 8, 3), seed=4),
    "pool-first-then-same-conv": lambda: xpnet.Sequential(
        [AvgPool2D(2, strides=1), Conv2D(2, 3, padding="same", activation="sigmoid"), MaxPool2D(2), Flatten(),
         Dense(2)],
        input_shape=(7, 5, 1), seed=5),
    "conv-float64": lambda: xpnet.Sequential(
        [Conv2D(2, 3, strides=2, padding="same"), Flatten(), Dense(3)], input_shape=(8, 9, 1), dtype="float64", seed=6),
    "flatten-rows-not-images": lambda: xpnet.Sequential(
        [Flatten(), Dropout(0.5), Dense(3, activation="relu"), Dense(2)], input_shape=(5, 6), seed=7),
    "dropout-last": lambda: xpnet.Sequential([Dense(3), Dropout(0.2)], input_shape=(4,), seed=8),
    "random-shift-first-and-between": lambda: xpnet.Sequential(
        [RandomShift(2), Conv2D(2, 3, activation="relu"), RandomShift(1), MaxPool2D(2), Flatten(), Dense(3)],
        input_shape=(8, 7, 1), seed=9),
}


@pytest.mark.parametrize("case", CASES)
def test_each_layer_type_matches_predict_proba(case):
    model = randomized(CASES[case]())
    rng = np.random.default_rng(11)
    for n in (1, 5):  # one graph, any batch size
        assert_same_as_predict_proba(model, rng.random((n, *model.input_shape), dtype=np.float32))


def test_the_graph_says_what_it_takes_and_gives():
    proto = to_onnx(lenet5(seed=0))
    (given,), (out,) = proto.graph.input, proto.graph.output
    dims = lambda info: [d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim]  # noqa: E731
    assert (given.name, dims(given)) == ("input", ["N", 28, 28, 1])
    assert (out.name, dims(out)) == ("probabilities", ["N", 10])
    assert given.type.tensor_type.elem_type == out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [o.version for o in proto.opset_import] == [OPSET] and proto.ir_version == IR_VERSION
    assert proto.producer_name == "xpnet"
    assert {t.name for t in proto.graph.initializer} == {f"layers.{i}.{w}" for i in (0, 2, 5, 6, 7) for w in "Wb"}
    # into NCHW before the first convolution, back to channels-last before Flatten: two transposes only
    assert [n.op_type for n in proto.graph.node].count("Transpose") == 2


def test_training_only_layers_add_no_node():
    """RandomShift and Dropout act in training only: the graph passes their input on."""
    model = xpnet.Sequential([RandomShift(2), Conv2D(2, 3, activation="relu"), RandomShift(1), MaxPool2D(2), Flatten(),
                              Dropout(0.5), Dense(3)], input_shape=(8, 7, 1), seed=9)
    ops = [(n.name.split(".")[1], n.op_type) for n in to_onnx(model).graph.node if n.name.startswith("layers.")]
    assert ops == [("1", "Transpose"), ("1", "Conv"), ("1", "Relu"), ("3", "MaxPool"), ("4", "Transpose"),
                   ("4", "Flatten"), ("6", "Gemm")]


def test_weights_are_float32_even_for_a_float64_model():
    proto = to_onnx(xpnet.MLP([4, 3, 2], dtype="float64", seed=0))
    assert {t.data_type for t in proto.graph.initializer} == {onnx.TensorProto.FLOAT}


# -- layers it does not know -----------------------------------------------------------------------


class OnnxTestNegate(Layer):
    """A layer no exporter knows (uniquely named: layer classes register by name)."""

    def forward(self, x, *, training=False):
        return -x


class OnnxTestDense(Dense):
    """A subclass may compute something else than its parent: not exported as a Dense."""


@pytest.mark.parametrize("layer, name", [(OnnxTestNegate(), "OnnxTestNegate"), (OnnxTestDense(2), "OnnxTestDense")])
def test_an_unknown_layer_type_is_a_clear_error(layer, name):
    model = xpnet.Sequential([Dense(3), layer, Dense(2)], input_shape=(4,))
    with pytest.raises(ValueError, match=rf"layers\[1\] to ONNX: no exporter for layer type {name} \(known: Dense, "):
        to_onnx(model)


def test_a_new_layer_exports_once_its_function_is_registered(monkeypatch):
    monkeypatch.setitem(ONNX_OPS, OnnxTestNegate, lambda g, layer, x: g.node("Neg", [x]))
    model = randomized(xpnet.Sequential([Dense(3), OnnxTestNegate(), Dense(2)], input_shape=(4,)))
    assert_same_as_predict_proba(model, np.random.default_rng(0).random((3, 4), dtype=np.float32))


def test_an_unbuilt_model_or_weights_that_are_not_numbers_are_refused():
    with pytest.raises(RuntimeError, match="not built"):
        to_onnx(xpnet.Sequential([Dense(2)]))
    model = xpnet.MLP([4, 3, 2], seed=0)
    model.layers[1].b[0] = np.inf
    with pytest.raises(ValueError, match=r"tensor 'layers\.1\.b' holds NaN or infinite values"):
        to_onnx(model)


def test_without_onnx_the_error_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` fail
    with pytest.raises(ImportError, match=r"pip install 'xpnet\[onnx\]'"):
        xpnet.MLP([4, 2]).export_onnx(tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_import_xpnet_does_not_import_onnx():
    code = ("import sys, xpnet; xpnet.MLP([4, 2]).predict_proba([[0.0] * 4]); "
            "assert not {'onnx', 'onnxruntime', 'xpnet.export'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the file --------------------------------------------------------------------------------------


def test_export_onnx_writes_a_file_onnxruntime_runs(tmp_path):
    model = randomized(lenet5(seed=0))
    path = tmp_path / "lenet.onnx"
    path.write_bytes(b"an older export")
    model.export_onnx(path)  # replaces it
    onnx.checker.check_model(onnx.load(path))
    X = np.random.default_rng(1).random((4, 28, 28, 1), dtype=np.float32)
    np.testing.assert_allclose(onnx_proba(path, X), model.predict_proba(X), rtol=0, atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == ["lenet.onnx"]  # no temporary file left


def test_a_folder_or_a_missing_folder_is_refused(tmp_path):
    model = xpnet.MLP([4, 2])
    with pytest.raises(IsADirectoryError, match=rf"{tmp_path} is a folder; give a file name such as .*model\.onnx"):
        model.export_onnx(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model.export_onnx(tmp_path / "nope" / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_or_interrupted_export_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    with pytest.raises(ValueError, match="OnnxTestNegate"):
        xpnet.Sequential([OnnxTestNegate(), Dense(2)], input_shape=(3,)).export_onnx(path)

    def interrupt(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        xpnet.MLP([4, 2]).export_onnx(path)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


# -- xpnet export ------------------------------------------------------------------------------------


def test_cli_export_writes_the_saved_models_graph(tmp_path, capsys):
    model = randomized(lenet5(seed=0))
    model.save(tmp_path / "m.safetensors")
    out = tmp_path / "m.onnx"
    assert main(["export", str(tmp_path / "m.safetensors"), "--onnx", str(out)]) == 0
    assert capsys.readouterr().out == (f"wrote {out}: ONNX opset {OPSET}, input float32 (N, 28, 28, 1) scaled to "
                                       "[0, 1], output class probabilities (N, 10)\n")
    X = np.random.default_rng(2).random((3, 28, 28, 1), dtype=np.float32)
    np.testing.assert_allclose(onnx_proba(out, X), model.predict_proba(X), rtol=0, atol=1e-6)


def test_cli_export_errors_are_one_line(tmp_path, capsys, monkeypatch):
    xpnet.MLP([4, 2]).save(tmp_path / "m.safetensors")
    assert main(["export", str(tmp_path / "m.safetensors"), "--onnx", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"xpnet export: error: {tmp_path} is a folder; give a file name such as "
                                       f"{tmp_path / 'model.onnx'}\n")
    (tmp_path / "junk").write_bytes(b"not a model")
    assert main(["export", str(tmp_path / "junk"), "--onnx", str(tmp_path / "m.onnx")]) == 2
    assert "is not a readable xpnet model file" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert main(["export", str(tmp_path / "m.safetensors"), "--onnx", str(tmp_path / "m.onnx")]) == 2
    assert capsys.readouterr().err == "xpnet export: error: ONNX export needs the onnx package: pip install 'xpnet[onnx]'\n"
    assert not (tmp_path / "m.onnx").exists()


# -- trained models on the real MNIST test set ------------------------------------------------------


def assert_same_on_mnist_test_set(model, X_test):
    X = (X_test / 255.0).astype(np.float32).reshape(len(X_test), *model.input_shape)  # floats, as predict takes
    expected, labels = model.predict_proba(X), model.predict(X)
    got = onnx_proba(model, X)
    assert np.array_equal(got.argmax(axis=1), labels)  # the same class for all 10,000 images
    assert np.abs(got - expected).max() <= 1e-5


def test_a_trained_mlp_on_the_mnist_test_set(mnist):
    X_train, y_train, X_test, y_test = mnist
    model = xpnet.MLP([784, 64, 32, 10], seed=0)
    model.fit(X_train, y_train, epochs=2, lr=0.1, verbose=0)
    assert model.evaluate(X_test, y_test)["accuracy"] > 0.93  # trained: its classes are not a guess
    assert_same_on_mnist_test_set(model, X_test)


def test_a_trained_lenet5_on_the_mnist_test_set(mnist):
    X_train, y_train, X_test, y_test = mnist
    model = lenet5(seed=0)
    model.fit(X_train[:8000], y_train[:8000], epochs=1, optimizer="adam", lr=2e-3, verbose=0)
    assert model.evaluate(X_test, y_test)["accuracy"] > 0.9
    assert_same_on_mnist_test_set(model, X_test)
