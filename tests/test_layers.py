"""Layers: every layer type's gradients against finite differences (NumPy and array_api_strict),
against PyTorch on random shapes, and what building, configs and the registry promise."""

from __future__ import annotations

import numpy as np
import pytest

import xpnet
from conftest import central_differences
from xpnet.layers import LAYERS, AvgPool2D, Conv2D, Dense, Dropout, Flatten, Layer, MaxPool2D, RandomShift

# (layer, input shape without the batch axis): every layer type, strides, paddings, activations
LAYER_CASES = [
    (lambda: Dense(4, activation="relu"), (5,)),
    (lambda: Dense(3, activation="tanh"), (4,)),
    (lambda: Dense(3, activation="sigmoid", init="glorot"), (4,)),
    (lambda: Dense(3), (6,)),
    (lambda: Conv2D(3, 3, activation="relu"), (5, 6, 2)),
    (lambda: Conv2D(2, (2, 3), strides=2, padding="same", activation="tanh"), (5, 7, 2)),
    (lambda: Conv2D(2, 3, strides=(1, 2), padding="same"), (4, 5, 1)),
    (lambda: Conv2D(2, 1, activation="sigmoid"), (3, 3, 3)),
    (lambda: MaxPool2D(2), (4, 6, 2)),
    (lambda: MaxPool2D(3, strides=2), (7, 5, 2)),  # overlapping windows
    (lambda: AvgPool2D(2), (5, 5, 2)),  # a row and a column no window reads
    (lambda: AvgPool2D((2, 3), strides=1), (4, 5, 1)),
    (lambda: Flatten(), (3, 2, 2)),
]


def _build(make, shape, backend, seed=0):
    layer = make()
    layer.setup(shape, rng=np.random.default_rng(seed), dtype="float64", backend=backend)
    for p in layer.params:  # biases away from zero: every parameter gets a real check
        p[...] = backend.asarray(np.random.default_rng(seed + 1).normal(size=tuple(p.shape)) * 0.5)
    return layer


def _norm_close(got, want, rtol):
    """Norm-wise: entries near zero cannot blow up the ratio the way an element-wise check does."""
    err = np.linalg.norm(got - want)
    assert err <= rtol * max(np.linalg.norm(want), 1e-12), (err, np.linalg.norm(want))


@pytest.mark.parametrize("make, shape", LAYER_CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_every_layer_gradient_matches_central_differences(make, shape, backend, rng):
    layer = _build(make, shape, backend)
    x_host = rng.normal(size=(2, *shape))
    x = backend.asarray(x_host)
    y = layer.forward(x, training=True)
    weights = rng.normal(size=tuple(y.shape))  # loss = sum(y * weights): dL/dy = weights
    dx = backend.to_numpy(layer.backward(backend.asarray(weights)))
    grads = [backend.to_numpy(g).copy() for g in layer.grads]

    def loss_of_input(value):
        return float(np.sum(backend.to_numpy(layer.forward(backend.asarray(value))) * weights))

    _norm_close(dx, central_differences(loss_of_input, x_host), 1e-7)
    assert np.abs(dx).max() > 1e-3, "a zero gradient would make the check vacuous"
    for p, g in zip(layer.params, grads):
        host = backend.to_numpy(p).copy()

        def loss_of_param(value, p=p):
            p[...] = backend.asarray(value)
            return loss_of_input(x_host)

        numeric = central_differences(loss_of_param, host)
        p[...] = backend.asarray(host)
        _norm_close(g, numeric, 1e-7)


def test_dropout_zeroes_a_fraction_scales_the_rest_and_routes_the_gradient(rng):
    layer = Dropout(0.3)
    layer.setup((50, 40), rng=np.random.default_rng(4), dtype="float64", backend=xpnet.get_backend("cpu"))
    x = rng.uniform(1, 2, size=(20, 50, 40))
    y = layer.forward(x, training=True)
    kept = y != 0
    assert abs(kept.mean() - 0.7) < 0.01
    np.testing.assert_allclose(y[kept], x[kept] / 0.7)
    dy = rng.normal(size=x.shape)
    np.testing.assert_allclose(layer.backward(dy), np.where(kept, dy / 0.7, 0.0), rtol=1e-15, atol=0)
    assert layer.forward(x) is x  # inference: the identity
    again = Dropout(0.3)
    again.setup((50, 40), rng=np.random.default_rng(4), dtype="float64", backend=xpnet.get_backend("cpu"))
    np.testing.assert_array_equal(again.forward(x, training=True), y)  # seeded: reproducible


def _offsets_of(x, y, pixels):
    """For each image, the (down, right) in [-pixels, pixels] that turns x into y (asserting one does)."""
    found = []
    candidates = [(a, b) for a in range(-pixels, pixels + 1) for b in range(-pixels, pixels + 1)]
    for k in range(x.shape[0]):
        matches = [(a, b) for a, b in candidates
                   if np.array_equal(xpnet.functional.shift_images(x[k:k + 1], np.array([a]), np.array([b])), y[k:k + 1])]
        assert len(matches) == 1, (k, matches)
        found.append(matches[0])
    return found


def test_random_shift_moves_each_image_by_its_own_offsets_within_range(rng, backend):
    layer = RandomShift(2)
    layer.setup((9, 8, 2), rng=np.random.default_rng(3), dtype="float64", backend=backend)
    x = rng.uniform(1, 2, size=(80, 9, 8, 2))  # no zeros: a shift is recognisable by its zero fill
    y = backend.to_numpy(layer.forward(backend.asarray(x), training=True))
    offsets = _offsets_of(x, y, 2)  # each image is x moved within [-2, 2] along each axis, zero fill
    assert len(set(offsets)) >= 20  # of the 25 pairs: drawn per image, not one per batch
    assert {a for a, _ in offsets} == {b for _, b in offsets} == {-2, -1, 0, 1, 2}
    # the backward pass shifts back (the adjoint): <y, g> == <x, dx>
    g = rng.normal(size=x.shape)
    dx = backend.to_numpy(layer.backward(backend.asarray(g)))
    assert abs(np.sum(y * g) - np.sum(x * dx)) <= 1e-12 * np.sum(np.abs(y * g))
    down, right = (np.array(v) for v in zip(*offsets))
    np.testing.assert_array_equal(dx, xpnet.functional.shift_images(g, -down, -right))
    # the next batch gets new offsets
    again = backend.to_numpy(layer.forward(backend.asarray(x), training=True))
    assert _offsets_of(x, again, 2) != offsets


def test_random_shift_is_seeded_by_the_model_and_the_identity_at_inference(rng):
    x = rng.uniform(1, 2, size=(16, 6, 6, 1))

    def shifted(seed):
        model = xpnet.Sequential([RandomShift(1), Flatten(), Dense(3)], input_shape=(6, 6, 1), seed=seed)
        return model.layers[0].forward(x, training=True)

    np.testing.assert_array_equal(shifted(4), shifted(4))  # seeded: reproducible
    assert not np.array_equal(shifted(4), shifted(5))
    dy = rng.normal(size=x.shape)
    for layer, training in [(_built(RandomShift(2), (6, 6, 1)), False), (_built(RandomShift(0), (6, 6, 1)), True)]:
        assert layer.forward(x, training=training) is x  # inference, or pixels=0: the identity
        assert layer.backward(dy) is dy and layer.backward(dy, need_dx=False) is None
    assert _built(RandomShift(2), (6, 6, 1)).forward(x) is x  # forward's default: inference
    assert RandomShift().pixels == 2 and RandomShift(np.int64(3)).get_config() == {"pixels": 3}


def test_a_model_stops_its_backward_pass_at_the_first_layer_with_parameters(rng):
    """Layers in front of it have nothing to learn: the convolution behind a RandomShift computes
    no input gradient, and the shift's backward does not run."""
    model = xpnet.Sequential([RandomShift(1), Conv2D(2, 3, activation="relu"), Flatten(), Dense(3)],
                             input_shape=(6, 6, 1), dtype="float64", seed=0)
    calls = []
    shift, conv = model.layers[0], model.layers[1]
    shift.backward = lambda dy, *, need_dx=True: calls.append("shift")
    conv_backward = conv.backward
    conv.backward = lambda dy, *, need_dx=True: calls.append(("conv", need_dx)) or conv_backward(dy, need_dx=need_dx)
    model.forward(rng.uniform(1, 2, size=(4, 6, 6, 1)), training=True)
    model.backward(rng.normal(size=(4, 3)))
    assert calls == [("conv", False)]
    assert conv.dW is not None and np.abs(conv.dW).max() > 0


# --- against PyTorch -----------------------------------------------------------------------------


def _torch():
    return pytest.importorskip("torch", reason="PyTorch is the independent reference here (pip install torch)")


def _nchw(torch, a):
    return torch.tensor(np.ascontiguousarray(np.moveaxis(a, -1, 1)), requires_grad=True)


def _nhwc(t):
    return np.moveaxis(t.detach().numpy(), 1, -1)


@pytest.mark.parametrize("trial", range(12))
def test_conv_and_pooling_layers_equal_pytorch(trial):
    torch = _torch()
    tf = torch.nn.functional
    r = np.random.default_rng(trial)
    n, c, f = (int(v) for v in r.integers(1, 4, 3))
    kh, kw = (int(v) for v in r.integers(1, 4, 2))
    sh, sw = (int(v) for v in r.integers(1, 3, 2))
    padding = ["valid", "same"][trial % 2]
    h, w = kh + int(r.integers(0, 6)), kw + int(r.integers(0, 6))
    x = r.normal(size=(n, h, w, c))

    conv = _build(lambda: Conv2D(f, (kh, kw), strides=(sh, sw), padding=padding), (h, w, c), xpnet.get_backend("cpu"), trial)
    y = conv.forward(x, training=True)
    dy = r.normal(size=y.shape)
    dx = conv.backward(dy)
    xt = _nchw(torch, x)
    kt = torch.tensor(np.ascontiguousarray(conv.W.transpose(3, 2, 0, 1)), requires_grad=True)
    bt = torch.tensor(conv.b, requires_grad=True)
    pads = (0, 0, 0, 0)
    if padding == "same":  # TensorFlow's split: the odd pixel after
        ph = max((-(-h // sh) - 1) * sh + kh - h, 0)
        pw = max((-(-w // sw) - 1) * sw + kw - w, 0)
        pads = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    yt = tf.conv2d(tf.pad(xt, pads), kt, bt, stride=(sh, sw))
    yt.backward(_nchw(torch, dy))
    np.testing.assert_allclose(y, _nhwc(yt), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, _nhwc(xt.grad), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(conv.dW, kt.grad.numpy().transpose(2, 3, 1, 0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(conv.db, bt.grad.numpy(), rtol=1e-12, atol=1e-12)

    for layer, torch_pool in ((MaxPool2D((kh, kw), (sh, sw)), tf.max_pool2d), (AvgPool2D((kh, kw), (sh, sw)), tf.avg_pool2d)):
        layer.setup((h, w, c), rng=np.random.default_rng(0), dtype="float64", backend=xpnet.get_backend("cpu"))
        y = layer.forward(x, training=True)
        dy = r.normal(size=y.shape)
        dx = layer.backward(dy)
        xt = _nchw(torch, x)
        yt = torch_pool(xt, (kh, kw), (sh, sw))
        yt.backward(_nchw(torch, dy))
        np.testing.assert_allclose(y, _nhwc(yt), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dx, _nhwc(xt.grad), rtol=1e-12, atol=1e-12)


def test_max_pool_ties_send_the_gradient_to_the_first_maximum_as_pytorch():
    torch = _torch()
    x = np.zeros((1, 4, 4, 1))
    x[0, :2, :2, 0] = 5.0  # one window, four equal maxima
    x[0, 2, 3, 0] = x[0, 3, 2, 0] = 7.0
    layer = MaxPool2D(2)
    layer.setup((4, 4, 1), rng=None, dtype="float64", backend=xpnet.get_backend("cpu"))
    y = layer.forward(x, training=True)
    dx = layer.backward(np.ones_like(y))
    xt = _nchw(torch, x)
    torch.nn.functional.max_pool2d(xt, 2).sum().backward()
    np.testing.assert_array_equal(dx, _nhwc(xt.grad))
    assert dx[0, 0, 0, 0] == 1 and dx[0, :2, :2, 0].sum() == 1


def lenet5(**kwargs):
    """The write-up's LeNet-5 (Keras, seed 001): 60,074 parameters."""
    return xpnet.Sequential(
        [
            Conv2D(6, 3, activation="relu"), AvgPool2D(2), Conv2D(16, 3, activation="relu"), AvgPool2D(2), Flatten(),
            Dense(120, activation="relu"), Dense(84, activation="relu"), Dense(10),
        ],
        **kwargs,
    )


def test_lenet5_has_the_write_ups_parameter_count_and_equals_pytorch():
    torch = _torch()
    model = lenet5(input_shape=(28, 28, 1), dtype="float64", seed=0)
    assert model.count_params() == 60_074
    weights = model.get_weights()
    assert [w.shape for w in weights] == [
        (3, 3, 1, 6), (6,), (3, 3, 6, 16), (16,), (400, 120), (120,), (120, 84), (84,), (84, 10), (10,),
    ]
    r = np.random.default_rng(1)
    model.set_weights([r.normal(size=w.shape) * 0.3 for w in weights])
    x = r.uniform(size=(3, 28, 28, 1))
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 3), torch.nn.ReLU(), torch.nn.AvgPool2d(2), torch.nn.Conv2d(6, 16, 3), torch.nn.ReLU(),
        torch.nn.AvgPool2d(2),
    ).double()
    head = torch.nn.Sequential(
        torch.nn.Linear(400, 120), torch.nn.ReLU(), torch.nn.Linear(120, 84), torch.nn.ReLU(), torch.nn.Linear(84, 10)
    ).double()
    w = model.get_weights()
    with torch.no_grad():
        for module, (k, b) in zip([net[0], net[3]], [(w[0], w[1]), (w[2], w[3])]):
            module.weight[...] = torch.tensor(k.transpose(3, 2, 0, 1))
            module.bias[...] = torch.tensor(b)
        for module, (k, b) in zip([head[0], head[2], head[4]], [(w[4], w[5]), (w[6], w[7]), (w[8], w[9])]):
            module.weight[...] = torch.tensor(k.T)
            module.bias[...] = torch.tensor(b)
        features = net(torch.tensor(np.moveaxis(x, -1, 1)))
        logits = head(features.permute(0, 2, 3, 1).reshape(3, -1))  # Keras flattens channels-last
    np.testing.assert_allclose(model.predict_proba(x), torch.softmax(logits, 1).numpy(), rtol=1e-12, atol=1e-14)


# --- building, configs, the registry ---------------------------------------------------------------


def test_shapes_are_inferred_from_the_data_at_the_first_fit(rng):
    model = xpnet.Sequential([Conv2D(2, 3, activation="relu"), MaxPool2D(2), Flatten(), Dense(3)], seed=0)
    assert not model.built
    with pytest.raises(RuntimeError, match="not built"):
        model.predict(np.zeros((1, 8, 8), np.uint8))
    X = rng.integers(0, 256, size=(30, 8, 8), dtype=np.uint8)  # (N, H, W): one channel
    model.fit(X, np.arange(30) % 3, epochs=1, batch_size=8, verbose=0)
    assert model.input_shape == (8, 8, 1)
    assert [layer.output_shape for layer in model.layers] == [(6, 6, 2), (3, 3, 2), (18,), (3,)]
    np.testing.assert_array_equal(model.predict(X), model.predict(X.reshape(30, 64)))  # same values, flat rows


def test_summary_lists_each_layer_its_output_shape_and_parameters():
    lines = []
    lenet5(input_shape=(28, 28, 1)).summary(print_fn=lines.append)
    text = "\n".join(lines)
    assert "Conv2D" in text and "(None, 26, 26, 6)" in text and "(None, 5, 5, 16)" in text
    assert "(None, 400)" in text and "48,120" in text and "Total params: 60,074" in text


@pytest.mark.parametrize(
    "layers, shape, match",
    [
        ([Conv2D(2, 3), Dense(3)], (8, 8, 1), "Dense takes flat inputs.*Flatten"),
        ([Dense(3)], (8, 8, 1), "Dense takes flat inputs"),
        ([Flatten(), Dense(1)], (4,), "n_classes >= 2"),
        ([Conv2D(2, 5), Flatten(), Dense(2)], (3, 3, 1), "window of 5 does not fit"),
        ([MaxPool2D(2), Flatten(), Dense(2)], (6,), "MaxPool2D takes images"),
    ],
)
def test_layers_that_do_not_fit_their_input_are_refused_at_build(layers, shape, match):
    with pytest.raises(ValueError, match=match):
        xpnet.Sequential(layers, input_shape=shape)


def test_bad_layer_arguments_and_reuse_are_refused():
    for make, match in [
        (lambda: Conv2D(0, 3), "filters"), (lambda: Conv2D(2, 3, padding="full"), "padding"),
        (lambda: Dense(3, activation="gelu"), "activation"), (lambda: MaxPool2D((2, 0)), "pool_size"),
        (lambda: Dropout(1.0), "rate"), (lambda: Conv2D(2, 3, strides=True), "strides"),
    ]:
        with pytest.raises(ValueError, match=match):
            make()
    dense = Dense(2)
    with pytest.raises(ValueError, match="appears twice"):
        xpnet.Sequential([dense, dense])
    xpnet.Sequential([dense], input_shape=(3,))
    with pytest.raises(ValueError, match="already built"):
        xpnet.Sequential([dense], input_shape=(3,))
    with pytest.raises(TypeError, match="not an xpnet.layers.Layer"):
        xpnet.Sequential([Dense(2), "relu"])


def test_config_rebuilds_the_same_architecture_through_the_registry():
    model = xpnet.Sequential(
        [RandomShift(1), Conv2D(3, (3, 2), strides=(2, 1), padding="same", activation="tanh"), MaxPool2D(2, strides=1),
         Flatten(), Dropout(0.25), Dense(4, init="glorot")],
        input_shape=(9, 8, 2), dtype="float64", seed=5,
    )
    again = xpnet.Sequential.from_config(model.config)
    assert again.config == model.config
    for a, b in zip(model.get_weights(), again.get_weights()):  # the same seed draws the same weights
        np.testing.assert_array_equal(a, b)
    assert {"Dense", "Conv2D", "MaxPool2D", "AvgPool2D", "Flatten", "Dropout", "RandomShift"} <= set(LAYERS)


class Scale(Layer):
    """The README's recipe for a new layer: one learned scale per feature, ``y = x * s``."""

    param_names = ("s",)

    def __init__(self, start=1.0):
        self.start = start

    def get_config(self):
        return {"start": self.start}

    def build(self, input_shape, *, rng, dtype, backend):
        self.s = backend.asarray(np.full(input_shape, self.start, dtype=dtype))
        return input_shape

    def forward(self, x, *, training=False):
        if training:
            self._x = x
        return x * self.s

    def backward(self, dy, *, need_dx=True):
        xp = xpnet.kernels.namespace_of(dy)
        self.ds = xp.sum(dy * self._x, axis=0)
        return dy * self.s if need_dx else None


def test_a_new_layer_is_one_class_that_trains_saves_and_loads(tmp_path, rng, backend):
    model = xpnet.Sequential([Scale(0.5), Dense(8, activation="relu"), Dense(3)], input_shape=(6,), dtype="float64",
                             seed=1, backend=backend)
    X = rng.normal(size=(90, 6))
    y = (X[:, 0] > 0).astype(int) + (X[:, 1] > 0)
    before = model.get_weights()[0].copy()
    model.fit(X, y, epochs=3, batch_size=16, lr=0.1, verbose=0)  # the reference step runs it
    assert not np.array_equal(model.get_weights()[0], before)
    if backend.name != "cpu":
        return
    model.save(tmp_path / "scaled.safetensors")
    loaded = xpnet.load(tmp_path / "scaled.safetensors")
    assert type(loaded.layers[0]) is Scale
    np.testing.assert_array_equal(loaded.predict_proba(X), model.predict_proba(X))
    with pytest.raises(TypeError, match="already exists"):
        type("Dense", (Layer,), {"__module__": "mine"})


# --- what each layer promises, checked exactly -----------------------------------------------


@pytest.mark.parametrize("make, error, message", [
    (lambda: Dense(0), ValueError, "units must be a positive integer, got 0"),
    (lambda: Dense(2.5), ValueError, "units must be a positive integer, got 2.5"),
    (lambda: Dense(3, init="xavier"), ValueError, "unknown init 'xavier': expected one of ('he', 'glorot')"),
    (lambda: Conv2D(0, 3), ValueError, "filters must be a positive integer, got 0"),
    (lambda: Conv2D(2, 0), ValueError, "kernel_size must be a positive int or a pair of them, got 0"),
    (lambda: Conv2D(2, 3, strides=0), ValueError, "strides must be a positive int or a pair of them, got 0"),
    (lambda: Conv2D(2, 3, activation="gelu"), ValueError,
     "unknown activation 'gelu': expected one of ('relu', 'tanh', 'sigmoid') or None"),
    (lambda: MaxPool2D(0), ValueError, "pool_size must be a positive int or a pair of them, got 0"),
    (lambda: AvgPool2D(2, strides=0), ValueError, "strides must be a positive int or a pair of them, got 0"),
    (lambda: Dropout("0.5"), ValueError, "rate must be a fraction in [0, 1), got '0.5'"),
    (lambda: RandomShift(-1), ValueError, "pixels must be >= 0, got -1"),
    (lambda: RandomShift(1.5), TypeError, "pixels must be an int, got 1.5"),
    (lambda: RandomShift(True), TypeError, "pixels must be an int, got True"),
    (lambda: RandomShift("2"), TypeError, "pixels must be an int, got '2'"),
    (lambda: xpnet.Sequential([RandomShift(2), Dense(2)], input_shape=(784,)), ValueError,
     "layers[0] RandomShift: RandomShift takes images (H, W, C), got inputs of shape (784,)"),
    (lambda: xpnet.Sequential([Flatten(), RandomShift(2), Dense(2)], input_shape=(4, 4, 1)), ValueError,
     "layers[1] RandomShift: RandomShift takes images (H, W, C), got inputs of shape (16,)"),
    (lambda: xpnet.Sequential([Conv2D(2, 3), Flatten(), Dense(2)], input_shape=(6,)), ValueError,
     "layers[0] Conv2D: Conv2D takes images (H, W, C), got inputs of shape (6,)"),
])
def test_bad_layer_arguments_are_refused_saying_what_is_wrong(make, error, message):
    with pytest.raises(error) as info:
        make()
    assert str(info.value) == message


def test_repr_shows_the_constructor_arguments():
    assert repr(Dense(3)) == "Dense(units=3, activation=None, init='he')"


def _built(layer, input_shape, dtype="float32"):
    layer.setup(input_shape, rng=np.random.default_rng(0), dtype=dtype, backend=xpnet.get_backend("cpu"))
    return layer


@pytest.mark.parametrize("make, shape", LAYER_CASES + [(lambda: Dropout(0.5), (4,)), (lambda: RandomShift(1), (4, 5, 2))])
def test_parameters_and_outputs_keep_the_model_dtype(make, shape):
    layer = _built(make(), shape)
    assert all(p.dtype == np.float32 for p in layer.params)
    x = np.random.default_rng(1).normal(size=(2, *shape)).astype(np.float32)
    assert layer.forward(x, training=True).dtype == np.float32


@pytest.mark.parametrize("make, shape", [case for case in LAYER_CASES if "Flatten" not in repr(case[0]())]
                         + [(lambda: Dropout(0.5), (4,)), (lambda: RandomShift(1), (4, 5, 2))])
def test_backward_needs_a_training_forward_and_need_dx_false_gives_no_input_gradient(make, shape):
    layer = _built(make(), shape)
    x = np.random.default_rng(1).normal(size=(2, *shape)).astype(np.float32)
    name = type(layer).__name__
    if name not in ("Dropout", "RandomShift"):  # they keep nothing at inference: their backward is the identity
        with pytest.raises(RuntimeError) as info:
            layer.backward(np.ones((2, *layer.output_shape), np.float32))
        assert str(info.value) == f"{name}.backward() needs a forward(..., training=True) first"
        y = layer.forward(x)  # inference (the default) keeps nothing either
        with pytest.raises(RuntimeError):
            layer.backward(np.ones_like(y))
    y = layer.forward(x, training=True)
    assert layer.backward(np.ones_like(y), need_dx=False) is None
    assert layer.backward(np.ones_like(y)).shape == x.shape


def test_flatten_gives_no_input_gradient_when_not_needed():
    layer = _built(Flatten(), (3, 2))
    assert layer.backward(np.ones((4, 6)), need_dx=False) is None


def test_dropout_at_inference_or_rate_zero_passes_values_and_gradients_through():
    x, dy = np.arange(8.0).reshape(2, 4), np.ones((2, 4))
    for layer, training in [(_built(Dropout(0.5), (4,)), False), (_built(Dropout(0.0), (4,)), True)]:
        np.testing.assert_array_equal(layer.forward(x, training=training), x)
        np.testing.assert_array_equal(layer.backward(dy), dy)


def test_conv2d_uses_its_strides_and_padding_per_axis(rng):
    layer = _built(Conv2D(2, 3, strides=(2, 1), padding="same", activation="relu"), (7, 5, 1), dtype="float64")
    assert layer.output_shape == (4, 5, 2)
    x = rng.normal(size=(3, 7, 5, 1))
    want = np.maximum(xpnet.functional.conv2d(x, layer.W, strides=(2, 1), padding="same", impl="xp") + layer.b, 0)
    np.testing.assert_allclose(layer.forward(x), want, rtol=1e-12)


def test_pooling_defaults_to_two_by_two_windows_on_any_image_shape():
    assert _built(MaxPool2D(), (6, 4, 1)).output_shape == (3, 2, 1)
    assert _built(AvgPool2D(3, strides=(1, 2)), (6, 7, 1)).output_shape == (4, 3, 1)


@pytest.mark.parametrize("init, check", [
    ("glorot", lambda W, fan_in, fan_out: 0.98 < np.abs(W).max() / np.sqrt(6 / (fan_in + fan_out)) <= 1),
    ("he", lambda W, fan_in, fan_out: abs(W.std() / np.sqrt(2 / fan_in) - 1) < 0.05),
])
def test_conv2d_initial_weights_follow_its_fan_in_and_fan_out(init, check):
    layer = _built(Conv2D(32, (3, 2), init=init), (6, 6, 8), dtype="float64")  # 1536 weights
    assert check(layer.W, 3 * 2 * 8, 3 * 2 * 32)


def test_a_user_layer_registers_by_name_and_may_be_redefined_but_not_shadow_a_builtin(monkeypatch):
    import xpnet.layers

    monkeypatch.setattr(xpnet.layers, "LAYERS", dict(LAYERS))  # leave the real registry as it was

    class Scale(Layer):  # no build: the shape passes through
        def forward(self, x, *, training=False):
            return 2 * x

    assert xpnet.layers.LAYERS["Scale"] is Scale
    assert _built(Scale(), (3, 4)).output_shape == (3, 4)

    class Scale(Layer):  # noqa: F811 -- redefined, as when a notebook cell runs again
        pass

    assert xpnet.layers.LAYERS["Scale"] is Scale
    with pytest.raises(TypeError, match="a layer class named 'Dense' already exists in xpnet.layers"):
        type("Dense", (Layer,), {})
