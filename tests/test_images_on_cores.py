"""Convolution and pooling with each batch's images spread over the cores
(``numba_cpu.images_on_cores``), the training step built on it (``ImagesOnCoresStep``) and
inference (``predict``/``evaluate``) in the same setting.

Every kernel inside the context must give what its serial driver gives: each image's outputs
and input gradients bit for bit, kernel gradients (summed per slice of images, then added) to
rounding. Batches of 1-7 images over 2-4 parts (more parts than images included), every
convolution path (the row loop, the filter vectors, im2col + BLAS), pooling with odd windows
and overlapping strides; the scratch buffers are poisoned with NaN first, and the serial
drivers fail if called where a parallel one should run.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import xpnet
from xpnet import functional as F
from xpnet import training
from xpnet.layers import AvgPool2D, Conv2D, Dense, Dropout, Flatten, MaxPool2D, RandomShift
from xpnet.training import ImagesOnCoresStep, ReferenceStep, images_on_cores_step_for

PARALLEL_DRIVERS = {
    "conv2d_rows": "conv2d_rows_parallel", "conv2d_rows_grads": "conv2d_rows_grads_parallel",
    "conv2d_filter_vectors": "conv2d_filter_vectors_parallel",
    "conv2d_filter_vectors_grad": "conv2d_filter_vectors_grad_parallel",
    "conv2d_filter_vectors_input_grad": "conv2d_filter_vectors_input_grad_parallel",
    "im2col": "im2col_parallel", "col2im": "col2im_parallel", "max_pool": "max_pool_parallel",
    "avg_pool": "avg_pool_parallel", "max_pool_backward": "max_pool_backward_parallel",
    "avg_pool_backward": "avg_pool_backward_parallel",
}


class _Guarded:
    """The compiled-loops module as ``numba_cpu`` sees it, with every serial conv/pool driver
    failing while ``on`` and every parallel one counting its calls (the module itself is left
    alone: the parallel drivers call the serial ones inside numba)."""

    def __init__(self, loops):
        self._loops, self.on, self.calls = loops, False, {}

    def __getattr__(self, name):
        kernel = getattr(self._loops, name)
        if name in PARALLEL_DRIVERS and self.on:
            raise AssertionError(f"the serial driver {name} ran inside images_on_cores")
        if name in PARALLEL_DRIVERS.values():
            self.calls[name] = self.calls.get(name, 0) + 1
        return kernel


@pytest.fixture
def spread(numba_cpu, monkeypatch):
    """Returns ``(run, calls)``: ``run(parts, fn)`` calls ``fn`` inside ``images_on_cores``,
    NaN in every scratch buffer of this thread first, the serial drivers refused; ``calls``
    counts the parallel drivers' calls."""
    guarded = _Guarded(numba_cpu._get_loops())
    monkeypatch.setattr(numba_cpu, "_get_loops", lambda: guarded)

    def run(parts, fn):
        for buffer in vars(numba_cpu._scratch_buffers).values():
            buffer.fill(np.nan)
        guarded.on = True
        try:
            with numba_cpu.images_on_cores(parts):
                return fn()
        finally:
            guarded.on = False

    return run, guarded.calls


TOLERANCE = {"float32": dict(rtol=2e-5, atol=1e-5), "float64": dict(rtol=1e-12, atol=1e-12)}

# (kernel shape, strides, padding, input (H, W, C)): one per convolution path
CONVOLUTIONS = {
    "row loop": ((3, 3, 1, 6), 1, "valid", (11, 9, 1)),
    "row loop, same, row stride 2": ((3, 2, 2, 5), (2, 1), "same", (8, 7, 2)),
    "filter vectors": ((3, 3, 3, 16), 1, "valid", (9, 10, 3)),
    "filter vectors, same, strided": ((2, 3, 2, 16), 2, "same", (9, 11, 2)),
    "filter vectors, same, 12 channels": ((2, 2, 12, 16), 1, "same", (6, 5, 12)),
    "im2col": ((3, 3, 4, 7), (1, 2), "valid", (8, 9, 4)),
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", list(CONVOLUTIONS))
@pytest.mark.parametrize("n, parts", [(2, 2), (5, 2), (7, 3), (3, 4)])
def test_a_convolution_spread_over_parts_equals_its_serial_run(spread, numba_cpu, rng, dtype, case, n, parts):
    run, calls = spread
    kernel_shape, strides, padding, image = CONVOLUTIONS[case]
    if case.startswith("filter vectors") and dtype == "float64":
        kernel_shape = (*kernel_shape[:3], 8)  # a float64 vector holds 8
    x = rng.standard_normal((n, *image)).astype(dtype)
    kernel = rng.standard_normal(kernel_shape).astype(dtype)
    bias = rng.standard_normal(kernel_shape[3]).astype(dtype)
    geometry = dict(strides=strides, padding=padding)
    want = numba_cpu.conv2d(x, kernel, bias, **geometry)
    dy = rng.standard_normal(want.shape).astype(dtype)
    want_dx, want_dk, want_db = numba_cpu.conv2d_backward(dy, x, kernel, **geometry)
    got = run(parts, lambda: numba_cpu.conv2d(x, kernel, bias, **geometry))
    got_dx, got_dk, got_db = run(parts, lambda: numba_cpu.conv2d_backward(dy, x, kernel, **geometry))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_dx, want_dx)
    np.testing.assert_allclose(got_dk, want_dk, **TOLERANCE[dtype])
    np.testing.assert_allclose(got_db, want_db, **TOLERANCE[dtype])
    assert not np.isnan(got_dk).any() and not np.isnan(got_db).any()
    assert calls, "no parallel driver ran"


@pytest.mark.parametrize("n, parts", [(2, 2), (5, 2), (7, 3)])
def test_the_row_loop_through_a_relu_spread_over_parts_equals_its_serial_run(spread, numba_cpu, rng, n, parts):
    run, calls = spread
    x = rng.standard_normal((n, 11, 9, 1)).astype(np.float32)
    kernel = rng.standard_normal((3, 3, 1, 6)).astype(np.float32)
    y = np.maximum(numba_cpu.conv2d(x, kernel), 0)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    want = numba_cpu.conv2d_backward(dy, x, kernel, need_dx=False, relu_output=y)
    got = run(parts, lambda: numba_cpu.conv2d_backward(dy, x, kernel, need_dx=False, relu_output=y))
    assert calls == {"conv2d_rows_grads_parallel": 1}
    for g, w in zip(got[1:], want[1:], strict=True):
        np.testing.assert_allclose(g, w, **TOLERANCE["float32"])


def test_filters_that_fill_vectors_take_the_loop_on_the_cores_at_any_width(spread, numba_cpu, rng):
    """Above ``FILTER_VECTORS_MAX_CHANNEL_FILTERS`` a serial convolution takes im2col + BLAS; on
    the cores (BLAS on one of them) the filter-vector loop, whatever the width."""
    run, calls = spread
    x = rng.standard_normal((5, 7, 8, 72)).astype(np.float32)
    kernel = rng.standard_normal((3, 3, 72, 16)).astype(np.float32)  # 72 x 16 = 1152 channels x filters
    assert 72 * 16 > numba_cpu.FILTER_VECTORS_MAX_CHANNEL_FILTERS
    want = F.conv2d(x.astype(np.float64), kernel.astype(np.float64), impl="xp")
    dy = rng.standard_normal(want.shape)
    want_grads = F.conv2d_backward(dy, x.astype(np.float64), kernel.astype(np.float64), impl="xp")
    got = run(2, lambda: numba_cpu.conv2d(x, kernel))
    got_grads = run(2, lambda: numba_cpu.conv2d_backward(dy.astype(np.float32), x, kernel))
    assert calls == {"conv2d_filter_vectors_parallel": 1, "conv2d_filter_vectors_grad_parallel": 1,
                     "conv2d_filter_vectors_input_grad_parallel": 1}
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-3)
    calls.clear()
    numba_cpu.conv2d(x, kernel)  # serially: im2col + BLAS
    assert "conv2d_filter_vectors_parallel" not in calls


@pytest.mark.parametrize("pool", ["max", "avg"])
@pytest.mark.parametrize("window, strides", [((2, 2), None), ((3, 2), (2, 1)), ((3, 3), (1, 2))])
@pytest.mark.parametrize("n, parts", [(2, 2), (7, 3), (3, 4)])
def test_pooling_spread_over_parts_equals_its_serial_run_bit_for_bit(spread, numba_cpu, rng, pool, window, strides,
                                                                     n, parts):
    run, calls = spread
    x = rng.standard_normal((n, 9, 8, 3))
    x[0, 1, 1, 0] = x[0, 1, 2, 0]  # a tie inside a window: the first in row-major order wins
    forward, backward = getattr(numba_cpu, f"{pool}_pool2d"), getattr(numba_cpu, f"{pool}_pool2d_backward")
    geometry = dict(pool_size=window, strides=strides)
    y = forward(x, **geometry)
    dy = rng.standard_normal(y.shape)
    args = (dy, x, y) if pool == "max" else (dy, x)
    np.testing.assert_array_equal(run(parts, lambda: forward(x, **geometry)), y)
    np.testing.assert_array_equal(run(parts, lambda: backward(*args, **geometry)), backward(*args, **geometry))
    assert calls == {f"{pool}_pool_parallel": 1, f"{pool}_pool_backward_parallel": 1}


def test_a_part_per_image_at_most_and_one_image_runs_serially(numba_cpu, rng, monkeypatch):
    guarded = _Guarded(numba_cpu._get_loops())
    monkeypatch.setattr(numba_cpu, "_get_loops", lambda: guarded)
    x = rng.standard_normal((1, 6, 6, 2))
    with numba_cpu.images_on_cores(4):
        assert [numba_cpu._image_parts(n) for n in (0, 1, 2, 3, 9)] == [1, 1, 2, 3, 4]
        got = numba_cpu.avg_pool2d(x)
    assert guarded.calls == {}
    np.testing.assert_array_equal(got, numba_cpu.avg_pool2d(x))
    assert numba_cpu._image_parts(9) == 1  # outside: serial


def test_images_on_cores_holds_in_its_thread_only_and_ends_with_the_block(numba_cpu):
    limit = numba_cpu.ON_CORES_PARALLEL_MIN_ELEMENTS["relu_backward"]
    assert limit < numba_cpu.PARALLEL_MIN_ELEMENTS["relu_backward"]
    seen = []
    with numba_cpu.images_on_cores(2):
        with numba_cpu.images_on_cores(3):
            seen.append(numba_cpu._image_parts(8))
        seen.append(numba_cpu._image_parts(8))  # the outer block's parts again
        seen.append(numba_cpu._parallel("relu_backward", limit))
        other = threading.Thread(target=lambda: seen.append(numba_cpu._image_parts(8)))
        other.start()
        other.join()
    assert seen == [3, 2, True, 1]
    assert not numba_cpu._parallel("relu_backward", limit) and numba_cpu._image_parts(8) == 1
    with pytest.raises(KeyError), numba_cpu.images_on_cores(2):
        raise KeyError("a failed step")
    assert numba_cpu._image_parts(8) == 1


# --- the training step -------------------------------------------------------------------------


@pytest.fixture
def two_cores(numba_cpu, monkeypatch):
    """``kernels.cores`` reports (at least) 2 cores."""
    from xpnet.kernels import cores

    monkeypatch.setattr(cores, "cores", lambda: 2)
    return cores


def small_cnn(dtype="float64", seed=0, extra=(), first=()):
    layers = [*first, Conv2D(3, 3, activation="relu"), MaxPool2D(2), Conv2D(4, 2, padding="same", activation="tanh"),
              AvgPool2D(2), Flatten(), *extra, Dense(7, activation="relu"), Dense(5)]
    return xpnet.Sequential(layers, input_shape=(9, 9, 2), dtype=dtype, seed=seed)


def batch(rng, n, dtype=np.float64):
    return rng.standard_normal((n, 9, 9, 2)).astype(dtype), rng.integers(0, 5, n)


@pytest.mark.parametrize("random_layers", [False, True], ids=["cnn", "with-dropout-and-shifts"])
@pytest.mark.parametrize("rows", [131, 2, 1])
def test_the_step_gives_the_reference_steps_loss_count_and_gradients(two_cores, rng, random_layers, rows):
    X, y = batch(rng, rows)
    scales = rng.choice([0.0, 0.5, 1.0, 3.0], size=rows)
    layers = lambda: {"extra": [Dropout(0.3)], "first": [RandomShift(1)]} if random_layers else {}  # noqa: E731
    reference, spread = small_cnn(**layers()), small_cnn(**layers())
    step = images_on_cores_step_for(spread)
    assert type(step) is ImagesOnCoresStep and step.cores == 2
    for weights in (None, scales):
        want_loss, want_correct = ReferenceStep(reference)(X, y, weights)
        loss, correct = step(X, y, weights)
        np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-13)
        assert int(correct) == int(want_correct)
        for got, want in zip(step.gradients(), reference.gradients(), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_the_step_runs_the_parallel_kernels_on_one_blas_thread(two_cores, numba_cpu, rng, monkeypatch):
    from threadpoolctl import threadpool_info

    seen = []

    class Recording(_Guarded):
        def __getattr__(self, name):
            if name.endswith("_parallel"):
                seen.append((name, [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]))
            return super().__getattr__(name)

    recording = Recording(numba_cpu._get_loops())
    monkeypatch.setattr(numba_cpu, "_get_loops", lambda: recording)
    recording.on = True  # no serial convolution or pooling driver
    images_on_cores_step_for(small_cnn())(*batch(rng, 64))
    assert {"conv2d_rows_parallel", "max_pool_parallel", "avg_pool_backward_parallel"} <= {name for name, _ in seen}
    assert all(set(blas) <= {1} for _, blas in seen)
    assert numba_cpu._image_parts(64) == 1  # and only inside the step


def test_blas_gets_its_threads_back_after_a_step_and_after_a_held_run(two_cores, rng):
    """A step limits BLAS to one thread while it runs and gives the limit back after; inside
    ``running()`` (``fit``'s whole run) the limit stays until the run ends."""
    from threadpoolctl import threadpool_info

    def blas_threads():  # NumPy's BLAS, which the step's products run on
        return [lib["num_threads"] for lib in threadpool_info()
                if lib["user_api"] == "blas" and "numpy" in lib["filepath"]]

    before = blas_threads()
    if not before or max(before) < 2:
        pytest.skip(f"BLAS runs on one thread here ({before})")
    step = images_on_cores_step_for(small_cnn())
    step(*batch(rng, 64))
    assert blas_threads() == before
    with step.running():
        step(*batch(rng, 64))
        assert blas_threads() == [1] * len(before)
    assert blas_threads() == before


def test_a_failing_step_gives_blas_and_the_kernels_back(two_cores, numba_cpu, rng):
    step = images_on_cores_step_for(small_cnn())
    X, y = batch(rng, 8)
    with pytest.raises(ValueError):
        step(X[:, :5], y)  # the wrong image size
    assert step._blas._limit is None and numba_cpu._image_parts(8) == 1


def test_fit_with_the_step_trains_as_the_reference_does(two_cores, rng, monkeypatch):
    X, y = batch(rng, 300)
    models, taken = {}, []
    monkeypatch.setattr(ImagesOnCoresStep, "__call__", lambda self, xb, yb, scales=None,
                        call=ImagesOnCoresStep.__call__: taken.append(len(yb)) or call(self, xb, yb, scales))
    for kernels in ("auto", "xp"):
        monkeypatch.setenv("XPNET_KERNELS", kernels)
        model = models[kernels] = small_cnn(extra=[Dropout(0.2)])
        history = model.fit(X, y, epochs=2, batch_size=128, optimizer="adam", lr=1e-2, verbose=0,
                            validation_split=0.1)
        models[kernels, "history"] = history.history
    assert taken == [128, 128, 14] * 2  # auto only: 270 training rows, two epochs
    for got, want in zip(models["auto"].get_weights(), models["xp"].get_weights(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(models["auto", "history"][key], models["xp", "history"][key], rtol=1e-9)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kernels", ["auto", "xp"])
def test_uint8_images_train_as_the_same_images_scaled_up_front(two_cores, rng, monkeypatch, kernels, dtype):
    """fit keeps uint8 images as they are and the step scales each batch to the model's dtype:
    the same weights, bit for bit, as training on the scaled floats, shuffled or in order, with
    a validation split taken from the pixels."""
    monkeypatch.setenv("XPNET_KERNELS", kernels)
    pixels = rng.integers(0, 256, size=(130, 9, 9, 2), dtype=np.uint8)
    y = rng.integers(0, 5, 130)
    floats = xpnet.functional.scale_pixels(pixels, np.dtype(dtype))
    for shuffle in (True, False):
        got, want = small_cnn(dtype, seed=1), small_cnn(dtype, seed=1)
        steps = []
        monkeypatch.setattr(training, "_training_step", lambda *a, original=training._training_step, **k: (
            steps.append(original(*a, **k)) or steps[-1]))
        got_history = got.fit(pixels, y, epochs=2, batch_size=64, optimizer="adam", lr=1e-2, verbose=0,
                              shuffle=shuffle, validation_split=0.2).history
        want_history = want.fit(floats, y, epochs=2, batch_size=64, optimizer="adam", lr=1e-2, verbose=0,
                                shuffle=shuffle, validation_split=0.2).history
        assert steps[0].takes_pixels and type(steps[0]) is type(steps[1])
        assert (type(steps[0]) is ImagesOnCoresStep) == (kernels == "auto")
        for g, w in zip(got.get_weights(), want.get_weights(), strict=True):
            np.testing.assert_array_equal(g, w)
        got_history.pop("seconds"), want_history.pop("seconds")
        assert got_history == want_history


class Doubled(Conv2D):
    """A layer the step has never seen (a subclass of one it knows)."""


def test_the_step_is_taken_where_an_image_layer_is_and_nowhere_else(two_cores, numba_cpu, monkeypatch):
    model = small_cnn()
    assert type(images_on_cores_step_for(model)) is ImagesOnCoresStep
    for layer in (Conv2D(2, 3), MaxPool2D(3), AvgPool2D(3)):  # any one of them is enough
        model_of_one = xpnet.Sequential([layer, Flatten(), Dense(3)], input_shape=(9, 9, 2), seed=0)
        assert images_on_cores_step_for(model_of_one) is not None
    # Dense layers alone: OpenBLAS already runs their products on every core
    assert images_on_cores_step_for(xpnet.MLP([12, 8, 3], activation="tanh", seed=0)) is None
    # exact types only
    assert images_on_cores_step_for(xpnet.Sequential([Doubled(2, 3), Flatten(), Dense(3)],
                                                     input_shape=(9, 9, 2), seed=0)) is None
    monkeypatch.setattr(two_cores, "cores", lambda: 1)
    assert images_on_cores_step_for(model) is None
    monkeypatch.setattr(two_cores, "cores", lambda: 2)
    monkeypatch.setenv("XPNET_KERNELS", "xp")  # the reference, alone
    assert images_on_cores_step_for(model) is None
    monkeypatch.setenv("XPNET_KERNELS", "numba")
    assert images_on_cores_step_for(model) is not None
    monkeypatch.setattr(numba_cpu, "unavailable", lambda: "numba is not installed")
    assert images_on_cores_step_for(model) is None


def test_the_step_is_not_taken_for_arrays_it_does_not_cover(two_cores):
    import array_api_strict

    model = small_cnn(dtype="float64")
    layer = model.layers[0]
    layer.W = array_api_strict.asarray(layer.W)
    assert images_on_cores_step_for(model) is None
    layer.W = np.asarray(layer.W, dtype=np.float16)
    assert images_on_cores_step_for(model) is None


def test_distributed_training_keeps_each_rank_on_its_core(two_cores, monkeypatch):
    calls = []
    monkeypatch.setattr(training, "images_on_cores_step_for", lambda model: calls.append(model))
    assert type(training._training_step(small_cnn(), 128, all_cores=False)) is ReferenceStep
    assert calls == []
    training._training_step(small_cnn(), 128)
    assert len(calls) == 1


def test_cores_is_the_affinity_at_most_numbas_threads(numba_cpu, monkeypatch):
    import os

    import numba

    from xpnet.kernels import cores

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(numba.config, "NUMBA_NUM_THREADS", 8)
    assert cores.cores() == 3
    monkeypatch.setattr(numba.config, "NUMBA_NUM_THREADS", 2)
    assert cores.cores() == 2
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS, Windows
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert cores.cores() == 1


# --- inference -----------------------------------------------------------------------------------


def test_predict_and_evaluate_spread_the_images_too_and_give_blas_back(two_cores, numba_cpu, rng, monkeypatch):
    from threadpoolctl import threadpool_info

    def blas_threads():
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    model = small_cnn()
    X, y = batch(rng, 40)
    want_proba, want_eval = model.predict_proba(X), model.evaluate(X, y)
    monkeypatch.setattr(xpnet.model, "_PREDICT_CHUNK", 16)  # three chunks, the last of 8 images
    seen = []

    class Recording(_Guarded):
        def __getattr__(self, name):
            if name.endswith("_parallel"):
                seen.append((name, blas_threads()))
            return super().__getattr__(name)

    recording = Recording(numba_cpu._get_loops())
    monkeypatch.setattr(numba_cpu, "_get_loops", lambda: recording)
    recording.on = True  # no serial convolution or pooling driver
    before = blas_threads()
    np.testing.assert_allclose(model.predict_proba(X), want_proba, rtol=1e-12, atol=1e-15)
    assert model.evaluate(X, y) == pytest.approx(want_eval, rel=1e-12)
    np.testing.assert_array_equal(model.predict(X), want_proba.argmax(axis=1))
    assert sum(name == "conv2d_rows_parallel" for name, _ in seen) == 3 * 3 * 2  # 3 chunks, 3 calls, 2 convolutions
    assert all(set(blas) <= {1} for _, blas in seen) and blas_threads() == before


def test_inference_runs_serially_where_images_do_not_spread(two_cores, numba_cpu, rng, monkeypatch):
    guarded = _Guarded(numba_cpu._get_loops())
    monkeypatch.setattr(numba_cpu, "_get_loops", lambda: guarded)
    mlp = xpnet.MLP([12, 8, 3], activation="tanh", seed=0)
    mlp.predict(rng.standard_normal((5, 12)))
    monkeypatch.setattr(two_cores, "cores", lambda: 1)
    small_cnn().predict(batch(rng, 9)[0])
    monkeypatch.setattr(two_cores, "cores", lambda: 2)
    monkeypatch.setenv("XPNET_KERNELS", "xp")
    small_cnn().predict(batch(rng, 9)[0])
    assert guarded.calls == {}


def test_the_step_gathers_pixels_as_the_reference_does(numba_cpu, rng):
    """uint8 rows gathered and scaled by the Numba kernel: bit for bit the reference's batch,
    in the model's input shape and dtype; float rows (and other label dtypes) as the reference."""
    for dtype in ("float32", "float64"):
        model = xpnet.Sequential([Conv2D(2, 3), Flatten(), Dense(3)], input_shape=(5, 4, 1), dtype=dtype, seed=0)
        step, reference = ImagesOnCoresStep(model, 2), ReferenceStep(model)
        X = rng.integers(0, 256, (9, 20), dtype=np.uint8)
        X[0] = np.arange(20) + 236  # bytes up to 255
        y, idx = rng.integers(0, 3, 9), rng.permutation(9)[:7]
        got, want = step.take_batch(X, y, idx), reference.take_batch(X, y, idx)
        assert got[0].shape == (7, 5, 4, 1) and got[0].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        floats = X.astype(np.float64) / 255
        np.testing.assert_array_equal(step.take_batch(floats, y, idx)[0], reference.take_batch(floats, y, idx)[0])
        small = y.astype(np.uint8)
        np.testing.assert_array_equal(step.take_batch(X, small, idx)[1], reference.take_batch(X, small, idx)[1])
