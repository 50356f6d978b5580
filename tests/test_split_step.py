"""The training step split into row slices run at once (``xpnet.kernels.split_step``): the same
loss, count and gradients as the reference step, only where it applies, kernels serial inside."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import xpnet
from xpnet import training
from xpnet.kernels import numba_cpu as kernels_module
from xpnet.layers import AvgPool2D, Conv2D, Dense, Dropout, Flatten, MaxPool2D, RandomShift
from xpnet.training import ReferenceStep, split_step_for


@pytest.fixture
def split_step(numba_cpu, monkeypatch):
    """``xpnet.kernels.split_step`` on a machine of (at least) 4 cores."""
    from xpnet.kernels import split_step

    monkeypatch.setattr(split_step, "cores", lambda: 4)
    return split_step


def small_cnn(dtype="float64", seed=0, extra=(), first=()):
    layers = [*first, Conv2D(3, 3, activation="relu"), MaxPool2D(2), Conv2D(4, 2, padding="same", activation="tanh"),
              AvgPool2D(2), Flatten(), *extra, Dense(7, activation="relu"), Dense(5)]
    return xpnet.Sequential(layers, input_shape=(9, 9, 2), dtype=dtype, seed=seed)


def batch(rng, n, dtype=np.float64):
    return rng.standard_normal((n, 9, 9, 2)).astype(dtype), rng.integers(0, 5, n)


@pytest.mark.parametrize("rows", [131, 128, 97])
def test_a_split_step_gives_the_reference_steps_loss_count_and_gradients(split_step, rng, rows):
    X, y = batch(rng, rows)
    reference, split = small_cnn(), small_cnn()
    step = split_step_for(split, rows)
    assert type(step) is split_step.SplitStep and step.parts == min(4, rows // 32)
    want_loss, want_correct = ReferenceStep(reference)(X, y)
    loss, correct = step(X, y)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-13)
    assert int(correct) == int(want_correct) > 0
    for got, want in zip(step.gradients(), reference.gradients(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    # and a second batch after the parameters moved: the parts read the model's arrays each call
    for layer in split.layers + reference.layers:
        for name in layer.param_names:
            setattr(layer, name, getattr(layer, name) * 0.5)
    X, y = batch(rng, rows)
    np.testing.assert_allclose(float(step(X, y)[0]), float(ReferenceStep(reference)(X, y)[0]), rtol=1e-13)
    for got, want in zip(step.gradients(), reference.gradients(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_each_part_weighs_its_own_rows(split_step, rng):
    """Row factors (``fit``'s sample weights over their batch's mean) reach every part as its own
    slice: three parts, a middle one included, give the reference step's weighted gradients."""
    X, y = batch(rng, 131)
    scales = rng.choice([0.0, 0.5, 1.0, 3.0], size=131)
    reference, split = small_cnn(), small_cnn()
    step = split_step.SplitStep(split, ReferenceStep, 3)
    want_loss, _ = ReferenceStep(reference)(X, y, scales)
    loss, _ = step(X, y, scales)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-13)
    for got, want in zip(step.gradients(), reference.gradients(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_blas_gets_its_threads_back_after_a_step_and_after_a_held_run(split_step, rng):
    """A step limits BLAS to one thread while its parts run and gives the limit back after;
    inside ``held()`` (``fit``'s whole run) the limit stays until the run ends."""
    from threadpoolctl import threadpool_info

    def blas_threads():  # NumPy's BLAS, which the parts' products run on
        return [lib["num_threads"] for lib in threadpool_info()
                if lib["user_api"] == "blas" and "numpy" in lib["filepath"]]

    before = blas_threads()
    if not before or max(before) < 2:
        pytest.skip(f"BLAS runs on one thread here ({before})")
    step = split_step.SplitStep(small_cnn(), ReferenceStep, 2)
    step(*batch(rng, 64))
    assert blas_threads() == before
    with step._blas.held():
        step(*batch(rng, 64))
        assert blas_threads() == [1] * len(before)
    assert blas_threads() == before


def test_fit_with_the_split_step_trains_as_the_reference_does(split_step, rng, monkeypatch):
    X, y = batch(rng, 300)
    models = {}
    for kernels in ("auto", "xp"):
        monkeypatch.setenv("XPNET_KERNELS", kernels)
        model = models[kernels] = small_cnn()
        history = model.fit(X, y, epochs=2, batch_size=100, optimizer="adam", lr=1e-2, verbose=0,
                            validation_split=0.1)
        models[kernels, "history"] = history.history
    for got, want in zip(models["auto"].get_weights(), models["xp"].get_weights(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(models["auto", "history"][key], models["xp", "history"][key], rtol=1e-9)


@pytest.mark.parametrize("kernels", ["auto", "xp"])
def test_uint8_images_train_as_the_same_images_scaled_up_front(split_step, rng, monkeypatch, kernels):
    """fit keeps uint8 images as they are and the (split or reference) step scales each batch:
    the same weights, bit for bit, as training on the scaled floats, shuffled or in order, with
    a validation split taken from the pixels."""
    monkeypatch.setenv("XPNET_KERNELS", kernels)
    pixels = rng.integers(0, 256, size=(130, 9, 9, 2), dtype=np.uint8)
    y = rng.integers(0, 5, 130)
    floats = xpnet.functional.scale_pixels(pixels, np.dtype(np.float64))
    for shuffle in (True, False):
        got, want = small_cnn(seed=1), small_cnn(seed=1)
        steps = []
        monkeypatch.setattr(training, "_training_step", lambda *a, original=training._training_step, **k: (
            steps.append(original(*a, **k)) or steps[-1]))
        got_history = got.fit(pixels, y, epochs=2, batch_size=64, optimizer="adam", lr=1e-2, verbose=0,
                              shuffle=shuffle, validation_split=0.2).history
        want_history = want.fit(floats, y, epochs=2, batch_size=64, optimizer="adam", lr=1e-2, verbose=0,
                                shuffle=shuffle, validation_split=0.2).history
        assert steps[0].takes_pixels and type(steps[0]) is type(steps[1])
        assert (type(steps[0]) is split_step.SplitStep) == (kernels == "auto")
        for g, w in zip(got.get_weights(), want.get_weights(), strict=True):
            np.testing.assert_array_equal(g, w)
        got_history.pop("seconds"), want_history.pop("seconds")
        assert got_history == want_history


def test_fit_takes_the_split_step_where_it_applies(split_step, rng, monkeypatch):
    taken = []
    monkeypatch.setattr(split_step.SplitStep, "__call__",
                        lambda self, xb, yb, scales=None, call=split_step.SplitStep.__call__:
                        taken.append(len(yb)) or call(self, xb, yb, scales))
    X, y = batch(rng, 200)
    small_cnn().fit(X, y, epochs=1, batch_size=128, verbose=0)
    assert taken == [128, 72]


class Doubled(Dense):
    """A layer the split step has never seen (a subclass of one it knows)."""


@pytest.mark.parametrize("layers", [
    {"extra": [Dropout(0.2)]},  # random draws: a split would draw another mask
    {"first": [RandomShift(1)]},
    {"extra": [Doubled(6)]},  # exact types only
], ids=["dropout", "random-shift", "a-subclass"])
def test_layers_the_split_step_does_not_know_get_the_reference(split_step, layers):
    assert split_step_for(small_cnn(**layers), 128) is None


def test_the_split_step_steps_aside(split_step, monkeypatch):
    model = small_cnn()
    assert split_step_for(model, 128) is not None
    # Dense layers alone: OpenBLAS already runs their products on every core
    assert split_step_for(xpnet.MLP([12, 8, 3], activation="tanh", seed=0), 128) is None
    pooled = xpnet.Sequential([AvgPool2D(3), Flatten(), Dense(3)], input_shape=(9, 9, 2), seed=0)
    assert split_step_for(pooled, 128) is not None
    assert split_step_for(model, 63) is None  # fewer than 32 rows a part
    assert split_step_for(small_cnn(dtype="float32"), 64).parts == 2
    monkeypatch.setattr(split_step, "cores", lambda: 1)
    assert split_step_for(model, 128) is None
    monkeypatch.undo()
    monkeypatch.setenv("XPNET_KERNELS", "xp")  # the reference, alone
    assert split_step_for(model, 128) is None
    monkeypatch.setenv("XPNET_KERNELS", "auto")
    monkeypatch.setattr(kernels_module, "unavailable", lambda: "numba is not installed")
    assert split_step_for(model, 128) is None


def test_a_split_step_is_not_taken_for_arrays_it_does_not_cover(split_step, monkeypatch):
    import array_api_strict

    model = small_cnn(dtype="float64")
    layer = model.layers[0]
    layer.W = array_api_strict.asarray(layer.W)
    assert split_step_for(model, 128) is None
    layer.W = np.asarray(layer.W, dtype=np.float16)
    assert split_step_for(model, 128) is None


def test_distributed_training_does_not_split_the_batch(split_step, monkeypatch):
    calls = []
    monkeypatch.setattr(training, "split_step_for", lambda model, batch_size: calls.append(batch_size))
    assert type(training._training_step(small_cnn(), 128, split=False)) is ReferenceStep
    assert calls == []
    training._training_step(small_cnn(), 128)
    assert calls == [128]


class RecordingStep(ReferenceStep):
    """The reference step, noting the thread, OpenBLAS's thread count and whether the kernels
    run serially in each part."""

    seen: list = []

    def __call__(self, xb, yb, scales=None):
        from threadpoolctl import threadpool_info

        blas = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
        self.seen.append((threading.current_thread(), blas, kernels_module._parallel("softmax", 1 << 40)))
        return super().__call__(xb, yb, scales)


def test_the_parts_run_in_their_own_threads_on_one_blas_thread_and_serial_kernels(split_step, rng):
    RecordingStep.seen = []
    step = split_step.SplitStep(small_cnn(), RecordingStep, 3)
    step(*batch(rng, 99))
    threads = {seen[0] for seen in RecordingStep.seen}
    assert len(threads) == 3 and threading.current_thread() in threads  # one part in the caller's thread
    others = threads - {threading.current_thread()}
    assert all(t.name == "xpnet-step-part" and t.daemon for t in others)  # named; never keep a process alive
    assert all(set(blas) <= {1} and parallel is False for _, blas, parallel in RecordingStep.seen)
    assert kernels_module._parallel("softmax", 1 << 40)  # and only inside the parts


class FailingStep(ReferenceStep):
    """Fails in the part of a thread other than the caller's, after the caller's part is done."""

    def __call__(self, xb, yb, scales=None):
        if self.model is not self.first_model:
            raise FloatingPointError("part failed")
        return super().__call__(xb, yb, scales)


def test_a_part_that_fails_fails_the_step(split_step, rng):
    model = small_cnn()
    FailingStep.first_model = model
    step = split_step.SplitStep(model, FailingStep, 2)
    with pytest.raises(FloatingPointError, match="part failed"):
        step(*batch(rng, 64))


def test_a_batch_smaller_than_the_parts_leaves_the_empty_parts_out(split_step, rng):
    model, reference = small_cnn(), small_cnn()
    step = split_step.SplitStep(model, ReferenceStep, 4)
    X, y = batch(rng, 3)
    np.testing.assert_allclose(float(step(X, y)[0]), float(ReferenceStep(reference)(X, y)[0]), rtol=1e-13)
    for got, want in zip(model.gradients(), reference.gradients(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_serial_kernels_holds_in_its_thread_only_and_ends_with_the_block(numba_cpu):
    big = 1 << 40
    seen = []
    with numba_cpu.serial_kernels():
        with numba_cpu.serial_kernels():
            pass
        seen.append(numba_cpu._parallel("softmax", big))  # still serial after a nested block ends
        other = threading.Thread(target=lambda: seen.append(numba_cpu._parallel("softmax", big)))
        other.start()
        other.join()
    assert seen == [False, True]
    assert numba_cpu._parallel("softmax", big) and not numba_cpu._parallel("softmax", 1)


def test_cores_is_the_affinity_at_most_numbas_threads(numba_cpu, monkeypatch):
    import os

    import numba

    from xpnet.kernels import split_step

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(numba.config, "NUMBA_NUM_THREADS", 8)
    assert split_step.cores() == 3
    monkeypatch.setattr(numba.config, "NUMBA_NUM_THREADS", 2)
    assert split_step.cores() == 2
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS, Windows
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert split_step.cores() == 1


def test_a_process_that_trained_split_exits(tmp_path):
    """The part threads wait for work forever: they must not keep the interpreter from exiting."""
    import subprocess
    import sys

    code = (
        "import numpy as np, xpnet\n"
        "from xpnet.kernels import split_step\n"
        "from xpnet.layers import AvgPool2D, Dense, Flatten\n"
        "split_step.cores = lambda: 2\n"
        "model = xpnet.Sequential([AvgPool2D(2), Flatten(), Dense(3)], input_shape=(4, 4, 1), seed=0)\n"
        "rng = np.random.default_rng(0)\n"
        "model.fit(rng.random((64, 4, 4, 1)), rng.integers(0, 3, 64), epochs=1, batch_size=64, verbose=0)\n"
        "assert split_step._workers, 'the split step did not run'\n"
        "print('trained')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "trained", done.stderr
