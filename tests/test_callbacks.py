"""History and EarlyStopping driven directly with made-up logs, on a stand-in model.

The stand-in holds its "weights" as a list of (W, b) NumPy pairs and counts how it was asked
for them, so the tests can tell which epoch's weights a callback kept and restored.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from xpnet.callbacks import Callback, DivergenceMonitor, DivergenceWarning, EarlyStopping, History


class StandIn:
    """What a callback may touch on a model: ``stop_training`` and get/set_weights."""

    def __init__(self):
        self.stop_training = False
        self.weights = [(np.zeros((2, 3)), np.zeros(3))]
        self.restored = None

    def show_epoch(self, epoch):
        """Make the current weights tell which epoch they belong to."""
        self.weights = [(np.full((2, 3), float(epoch)), np.full(3, -float(epoch)))]

    def get_weights(self):
        return [(W.copy(), b.copy()) for W, b in self.weights]

    def set_weights(self, weights):
        self.restored = [(np.array(W), np.array(b)) for W, b in weights]
        self.weights = self.restored


def drive(cb, values, key="val_loss", model=None):
    """Feed ``values`` of ``key`` one epoch at a time, as fit does: stop when asked.

    Returns the stand-in model and the epochs actually run.
    """
    model = model if model is not None else StandIn()
    cb.model = model
    cb.on_train_begin({"epochs": len(values)})
    ran = []
    for epoch, value in enumerate(values):
        model.show_epoch(epoch)
        cb.on_epoch_end(epoch, {"loss": 1.0, key: value})
        ran.append(epoch)
        if model.stop_training:
            break
    cb.on_train_end({"epochs_run": len(ran)})
    return model, ran


# --- History ---------------------------------------------------------------------------------


def test_history_records_every_key_per_epoch_and_the_settings():
    h = History()
    h.on_train_begin({"epochs": 3, "batch_size": 8})
    logs = [{"loss": 0.9, "accuracy": 0.5}, {"loss": 0.7, "accuracy": 0.6, "val_loss": 0.8}, {"loss": 0.4, "accuracy": 0.75}]
    for epoch, entry in enumerate(logs):
        h.on_epoch_end(epoch, entry)
    assert h.epoch == [0, 1, 2]
    assert h["loss"] == [0.9, 0.7, 0.4]
    assert h["accuracy"] == [0.5, 0.6, 0.75]
    assert h["val_loss"] == [0.8]  # a key logged once is recorded once, not padded
    assert h.params == {"epochs": 3, "batch_size": 8}
    assert "epochs=3" in repr(h) and "0.4" in repr(h)
    with pytest.raises(KeyError):
        h["val_accuracy"]


def test_a_new_history_is_empty_and_not_diverged():
    h = History()
    assert h.epoch == [] and h.history == {} and h.params == {}
    assert h.warnings == [] and h.diverged is False


def test_history_repr_shows_the_last_values_to_four_places():
    h = History()
    h.on_epoch_end(0, {"loss": 0.123456})
    assert repr(h) == "History(epochs=1, last={'loss': 0.1235})"


def test_history_keeps_its_own_copy_of_the_settings():
    settings = {"epochs": 2}
    h = History()
    h.on_train_begin(settings)
    settings["epochs"] = 99
    assert h.params == {"epochs": 2}


# --- EarlyStopping: which direction is better -------------------------------------------------


def test_auto_mode_treats_a_rising_accuracy_as_improvement():
    cb = EarlyStopping("val_accuracy", patience=1)
    model, ran = drive(cb, [0.5, 0.6, 0.7, 0.8], key="val_accuracy")
    assert ran == [0, 1, 2, 3] and not model.stop_training
    assert cb.best == 0.8 and cb.best_epoch == 3 and cb.stopped_epoch is None


def test_auto_mode_stops_when_accuracy_falls():
    cb = EarlyStopping("val_accuracy", patience=1)
    model, ran = drive(cb, [0.5, 0.7, 0.6, 0.9], key="val_accuracy")
    assert ran == [0, 1, 2] and model.stop_training
    assert cb.best == 0.7 and cb.best_epoch == 1 and cb.stopped_epoch == 2


def test_auto_mode_treats_a_falling_loss_as_improvement():
    cb = EarlyStopping("val_loss", patience=1)
    model, ran = drive(cb, [0.9, 0.8, 0.85, 0.1])
    assert ran == [0, 1, 2] and model.stop_training
    assert cb.best == 0.8 and cb.best_epoch == 1 and cb.stopped_epoch == 2


def test_explicit_mode_overrides_the_name():
    cb = EarlyStopping("val_loss", patience=1, mode="max")
    _, ran = drive(cb, [0.1, 0.2, 0.3])
    assert ran == [0, 1, 2] and cb.best == 0.3
    with pytest.raises(ValueError, match="mode"):
        EarlyStopping(mode="up")


@pytest.mark.parametrize("patience", [-1, 1.5, "3"])
def test_patience_must_be_a_non_negative_integer(patience):
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=patience)


def test_defaults_watch_the_validation_loss_for_three_epochs_and_restore_the_best():
    cb = EarlyStopping()
    assert cb.stopped_epoch is None and cb.best_epoch is None  # nothing known before training
    model, ran = drive(cb, [0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    assert ran == [0, 1, 2, 3] and cb.stopped_epoch == 3
    (W, _), = model.weights
    np.testing.assert_array_equal(W, np.zeros((2, 3)))  # epoch 0's weights are back


# --- min_delta: sign and strictness -----------------------------------------------------------


@pytest.mark.parametrize("min_delta", [0.1, -0.1])
def test_min_delta_is_a_margin_whatever_its_sign_loss(min_delta):
    """Improvements smaller than |min_delta| do not count, for a loss..."""
    cb = EarlyStopping("val_loss", patience=2, min_delta=min_delta)
    model, ran = drive(cb, [1.0, 0.95, 0.92, 0.5])
    assert ran == [0, 1, 2] and model.stop_training  # 0.95 and 0.92 are within 0.1 of 1.0
    assert cb.best == 1.0 and cb.best_epoch == 0


@pytest.mark.parametrize("min_delta", [0.1, -0.1])
def test_min_delta_is_a_margin_whatever_its_sign_accuracy(min_delta):
    """... and for an accuracy."""
    cb = EarlyStopping("val_accuracy", patience=2, min_delta=min_delta)
    model, ran = drive(cb, [0.5, 0.55, 0.58, 0.9], key="val_accuracy")
    assert ran == [0, 1, 2] and model.stop_training
    assert cb.best == 0.5 and cb.best_epoch == 0


def test_an_improvement_beyond_min_delta_counts():
    cb = EarlyStopping("val_loss", patience=1, min_delta=0.1)
    _, ran = drive(cb, [1.0, 0.875, 0.75, 0.625])  # exact binary fractions: 0.125 > 0.1 each time
    assert ran == [0, 1, 2, 3] and cb.best == 0.625 and cb.best_epoch == 3


def test_an_improvement_of_exactly_min_delta_does_not_count():
    """Strict: ``value < best - min_delta`` (binary fractions, so the margin is exact)."""
    cb = EarlyStopping("val_loss", patience=1, min_delta=0.25)
    _, ran = drive(cb, [1.0, 0.75])
    assert ran == [0, 1] and cb.best == 1.0 and cb.stopped_epoch == 1
    cb = EarlyStopping("val_accuracy", patience=1, min_delta=0.25)
    _, ran = drive(cb, [0.25, 0.5], key="val_accuracy")
    assert ran == [0, 1] and cb.best == 0.25 and cb.stopped_epoch == 1


def test_an_equal_value_is_not_an_improvement():
    cb = EarlyStopping("val_loss", patience=2)
    model, ran = drive(cb, [0.5, 0.5, 0.5, 0.1])
    assert ran == [0, 1, 2] and model.stop_training and cb.best_epoch == 0


# --- patience ---------------------------------------------------------------------------------


@pytest.mark.parametrize("patience", [0, 1, 2, 3])
def test_patience_counts_epochs_without_improvement(patience):
    """Best at epoch 1, then no improvement: stops at epoch 1 + max(patience, 1)... except
    patience 0 stops at the first epoch that does not improve."""
    values = [0.9, 0.5] + [0.6] * 6
    cb = EarlyStopping("val_loss", patience=patience)
    model, ran = drive(cb, values)
    stop = 1 + max(patience, 1)
    assert ran == list(range(stop + 1)) and model.stop_training and cb.stopped_epoch == stop


def test_an_improvement_resets_the_patience_count():
    cb = EarlyStopping("val_loss", patience=2)
    # epochs 2 and 4 do not improve, but each is followed by an improvement
    model, ran = drive(cb, [1.0, 0.9, 0.95, 0.8, 0.85, 0.7, 0.75, 0.76])
    assert ran == [0, 1, 2, 3, 4, 5, 6, 7] and model.stop_training and cb.stopped_epoch == 7
    assert cb.best == 0.7 and cb.best_epoch == 5


def test_state_resets_when_a_new_run_begins():
    cb = EarlyStopping("val_loss", patience=1)
    drive(cb, [0.1, 0.2])
    assert cb.best == 0.1 and cb.stopped_epoch == 1
    model, ran = drive(cb, [0.5, 0.4, 0.3])  # all worse than the first run's best
    assert ran == [0, 1, 2] and not model.stop_training
    assert cb.best == 0.3 and cb.best_epoch == 2 and cb.stopped_epoch is None


# --- restore_best_weights -----------------------------------------------------------------------


def test_restore_best_weights_restores_the_best_epoch():
    cb = EarlyStopping("val_loss", patience=2, restore_best_weights=True)
    model, ran = drive(cb, [0.9, 0.4, 0.6, 0.7, 0.1])
    assert ran == [0, 1, 2, 3]
    assert model.restored is not None
    (W, b), = model.weights
    np.testing.assert_array_equal(W, np.full((2, 3), 1.0))
    np.testing.assert_array_equal(b, np.full(3, -1.0))


def test_restore_best_weights_when_the_best_is_the_last_epoch():
    cb = EarlyStopping("val_accuracy", patience=5)
    model, _ = drive(cb, [0.1, 0.2, 0.3], key="val_accuracy")
    (W, _), = model.weights
    np.testing.assert_array_equal(W, np.full((2, 3), 2.0))


def test_without_restore_the_last_weights_stay():
    cb = EarlyStopping("val_loss", patience=1, restore_best_weights=False)
    model, ran = drive(cb, [0.1, 0.5, 0.6])
    assert ran == [0, 1] and model.restored is None
    (W, _), = model.weights
    np.testing.assert_array_equal(W, np.full((2, 3), 1.0))


def test_nothing_is_restored_when_no_epoch_ran():
    model = StandIn()
    cb = EarlyStopping()
    cb.model = model
    cb.on_train_begin({})
    cb.on_train_end({"epochs_run": 0})
    assert model.restored is None


# --- a missing monitored key --------------------------------------------------------------------


def test_a_missing_monitored_key_is_a_clear_error():
    cb = EarlyStopping("val_loss")
    cb.model = StandIn()
    cb.on_train_begin({})
    with pytest.raises(ValueError, match="val_loss") as info:
        cb.on_epoch_end(0, {"loss": 0.5, "accuracy": 0.9})
    assert "validation" in str(info.value) and "accuracy" in str(info.value)  # says what is logged
    assert not cb.model.stop_training


def test_a_first_epoch_without_a_value_counts_against_patience():
    cb = EarlyStopping("val_loss", patience=2)
    model, ran = drive(cb, [math.nan, math.nan, 0.1])
    assert ran == [0, 1] and cb.stopped_epoch == 1 and cb.best_epoch is None


def test_nan_is_never_an_improvement():
    cb = EarlyStopping("val_loss", patience=1)
    model, ran = drive(cb, [0.5, math.nan, 0.4])
    assert ran == [0, 1] and model.stop_training and cb.best == 0.5


def test_a_custom_callback_sees_the_model_and_can_stop_it():
    class StopAtTwo(Callback):
        def on_epoch_end(self, epoch, logs):
            if epoch == 2:
                self.model.stop_training = True

    model, ran = drive(StopAtTwo(), [0.1] * 6)
    assert ran == [0, 1, 2] and model.stop_training


# --- DivergenceMonitor -------------------------------------------------------------------------


def monitor_run(monitor, epochs, chance=0.1):
    """Feed made-up ``(loss, accuracy)`` epochs to ``monitor`` as fit does; return the epochs run."""
    model = StandIn()
    monitor.model = model
    monitor.on_train_begin({"epochs": len(epochs), "chance_accuracy": chance})
    ran = 0
    for epoch, (loss, accuracy) in enumerate(epochs):
        monitor.on_epoch_end(epoch, {"loss": loss, "accuracy": accuracy, "lr": 0.5})
        ran += 1
        if model.stop_training:
            break
    return ran


def test_accuracy_at_chance_for_patience_epochs_warns_once():
    monitor = DivergenceMonitor(patience=3)
    with pytest.warns(DivergenceWarning, match=r"at epoch 3, accuracy 9\.0% at chance \(10\.0%\)") as caught:
        ran = monitor_run(monitor, [(2.3, 0.105), (2.2, 0.10), (2.1, 0.09), (2.0, 0.1), (1.9, 0.1)])
    assert ran == 5  # warn only: training goes on
    assert len(caught) == 1 and len(monitor.warnings) == 1 and "lr=0.5" in monitor.warnings[0]
    assert not monitor.diverged


def test_a_loss_above_the_first_epoch_for_patience_epochs_warns():
    monitor = DivergenceMonitor(patience=2)
    with pytest.warns(DivergenceWarning, match="loss 41 above the first epoch's 40"):
        monitor_run(monitor, [(40.0, 0.5), (45.0, 0.5), (41.0, 0.5)])


def test_progress_resets_the_count():
    monitor = DivergenceMonitor(patience=3)
    # two bad epochs, one good, two bad: never three in a row
    monitor_run(monitor, [(1.0, 0.1), (1.1, 0.1), (0.5, 0.6), (1.2, 0.6), (1.3, 0.6)])
    assert monitor.warnings == []


def test_just_over_the_margin_above_chance_is_progress():
    monitor = DivergenceMonitor(patience=1, margin=0.01)
    monitor_run(monitor, [(1.0, 0.1101), (0.9, 0.12)])
    assert monitor.warnings == []
    with pytest.warns(DivergenceWarning):
        monitor_run(monitor, [(1.0, 0.1099)])


def test_accuracy_exactly_at_chance_plus_margin_is_no_progress():
    monitor = DivergenceMonitor(patience=1, margin=0.0)  # a zero margin is allowed
    with pytest.warns(DivergenceWarning, match="at chance"):
        monitor_run(monitor, [(1.0, 0.1)], chance=0.1)


def test_by_default_three_epochs_without_progress_warn():
    monitor = DivergenceMonitor()
    monitor_run(monitor, [(1.0, 0.1)] * 2)
    assert monitor.warnings == [] and monitor.diverged is False
    with pytest.warns(DivergenceWarning, match="3 epochs in a row"):
        monitor_run(monitor, [(1.0, 0.1)] * 3)


def test_the_message_names_every_symptom_and_the_learning_rate_only_when_logged():
    monitor = DivergenceMonitor(patience=2)
    monitor.model = StandIn()
    monitor.on_train_begin({"chance_accuracy": 0.1})
    monitor.on_epoch_end(0, {"loss": 1.0, "accuracy": 0.1})
    with pytest.warns(DivergenceWarning):
        monitor.on_epoch_end(1, {"loss": 2.0, "accuracy": 0.1})  # no "lr" in these logs
    assert monitor.warnings == [
        "training diverged: at epoch 2, loss 2 above the first epoch's 1 and accuracy 10.0% at chance (10.0%), "
        "2 epochs in a row without progress; lower the learning rate"
    ]


# mutmut calls every function of a mutated module through a trampoline: one more stack frame
@pytest.mark.skipif("MUTANT_UNDER_TEST" in os.environ, reason="mutmut's trampolines shift the stack")
def test_the_warning_points_at_the_users_fit_call():
    import xpnet

    X, y = np.zeros((40, 4), dtype="float32"), np.arange(40) % 4  # nothing to learn: chance
    model = xpnet.MLP([4, 3, 4], seed=0)
    with pytest.warns(DivergenceWarning, match="at chance") as caught:
        model.fit(X, y, epochs=3, batch_size=40, lr=0.01, verbose=0)
    assert [w.filename for w in caught] == [__file__]


def test_a_falling_loss_at_equal_first_value_is_not_divergence():
    monitor = DivergenceMonitor(patience=1)
    monitor_run(monitor, [(1.0, 0.9), (1.0, 0.9)])  # equal to the first: not above it
    assert monitor.warnings == []


def test_stop_ends_training_and_says_so():
    monitor = DivergenceMonitor(patience=2, stop=True)
    with pytest.warns(DivergenceWarning, match="training stopped"):
        ran = monitor_run(monitor, [(2.3, 0.1)] * 6)
    assert ran == 2 and monitor.diverged
    assert monitor.warnings[0].startswith("training diverged: at epoch 2")
    assert monitor.warnings[0].endswith("(lr=0.5); training stopped")


def test_without_a_chance_level_only_the_loss_counts():
    monitor = DivergenceMonitor(patience=1)
    monitor_run(monitor, [(1.0, 0.0), (0.9, 0.0)], chance=None)
    assert monitor.warnings == []


def test_a_new_run_starts_afresh():
    monitor = DivergenceMonitor(patience=2, stop=True)
    with pytest.warns(DivergenceWarning):
        monitor_run(monitor, [(2.3, 0.1)] * 2)
    assert monitor_run(monitor, [(1.0, 0.9), (0.5, 0.95)]) == 2
    assert monitor.warnings == [] and not monitor.diverged


@pytest.mark.parametrize("kwargs", [{"patience": 0}, {"patience": 1.5}, {"patience": True}, {"margin": -0.1},
                                    {"margin": 1.0}])
def test_divergence_monitor_settings_are_checked(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        DivergenceMonitor(**kwargs)


def test_early_stopping_goes_on_from_its_state_dict_as_if_never_stopped():
    """What a run's checkpoint keeps: after ``load_state_dict`` a fresh EarlyStopping decides
    as the one it came from, and restores the best epoch's weights in the model's own layout."""
    values = [0.9, 0.5, 0.7, 0.8, 0.4]
    whole = EarlyStopping(patience=2)
    model, ran = drive(whole, values)
    assert ran == [0, 1, 2, 3] and whole.stopped_epoch == 3 and model.restored[0][0][0, 0] == 1.0

    first = EarlyStopping(patience=2)
    model, _ = drive(first, values[:3])
    state = first.state_dict()
    assert state["best"] == 0.5 and state["wait"] == 1 and state["best_weights"] == 2
    assert all(isinstance(state[f"best_weights.{i}"], np.ndarray) for i in range(2))
    second = EarlyStopping(patience=2)
    second.model = model
    second.on_train_begin({})
    second.load_state_dict({k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in state.items()})
    model.show_epoch(3)
    model.restored = None
    second.on_epoch_end(3, {"loss": 1.0, "val_loss": values[3]})
    assert model.stop_training and second.stopped_epoch == 3 and second.best_epoch == 1
    second.on_train_end({})
    assert isinstance(model.restored[0], tuple) and model.restored[0][0][0, 0] == 1.0  # epoch 1's (W, b)
    assert model.restored[0][1][0] == -1.0


class FlatStandIn(StandIn):
    """A model whose weights are a flat list of arrays, as ``Sequential``'s are."""

    def get_weights(self):
        return [a.copy() for pair in self.weights for a in pair]

    def set_weights(self, weights):
        self.restored = [np.array(w) for w in weights]


def test_early_stopping_state_keeps_a_flat_models_layout_and_an_empty_best():
    first = EarlyStopping(patience=2)
    model, _ = drive(first, [0.9, 0.5, 0.7], model=FlatStandIn())
    state = first.state_dict()
    second = EarlyStopping(patience=2)
    second.model = model
    second.load_state_dict(state)
    model.restored = None
    second.on_train_end({})
    assert [w.shape for w in model.restored] == [(2, 3), (3,)] and model.restored[0][0, 0] == 1.0

    unseen = EarlyStopping(patience=2, restore_best_weights=False)
    drive(unseen, [0.9, 0.5])
    assert unseen.state_dict()["best_weights"] is None
    again = EarlyStopping(patience=2)
    again.model = StandIn()
    again.load_state_dict(unseen.state_dict())
    again.on_train_end({})
    assert again.model.restored is None  # nothing to restore


def test_the_divergence_monitor_goes_on_from_its_state_dict():
    monitor = DivergenceMonitor(patience=2)
    monitor.model = StandIn()
    monitor.on_train_begin({"chance_accuracy": 0.5})
    monitor.on_epoch_end(0, {"loss": 1.0, "accuracy": 0.6})
    monitor.on_epoch_end(1, {"loss": 1.5, "accuracy": 0.6})  # one bad epoch
    again = DivergenceMonitor(patience=2)
    again.model = monitor.model
    again.on_train_begin({"chance_accuracy": 0.5})
    again.load_state_dict(monitor.state_dict())
    with pytest.warns(DivergenceWarning, match="loss 1.6 above the first epoch's 1, 2 epochs in a row"):
        again.on_epoch_end(2, {"loss": 1.6, "accuracy": 0.6})
