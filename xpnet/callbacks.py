"""Training callbacks and the History that ``fit`` returns."""

from __future__ import annotations

import math
import warnings

import numpy as np

__all__ = ["Callback", "History", "EarlyStopping", "DivergenceMonitor", "DivergenceWarning"]


class Callback:
    """Hooks called by ``fit``; ``self.model`` and ``self.optimizer`` (the ``xpnet.optim``
    Optimizer it trains with) are set before ``on_train_begin``.

    Setting ``self.model.stop_training = True`` ends training after the current epoch. A
    callback that continues a recorded run (``xpnet.runs.RunRecorder(resume=True)``) restores
    the model and the optimizer in ``on_train_begin`` and sets ``initial_epoch``, the epoch
    training goes on from.
    """

    model = None
    optimizer = None
    initial_epoch = None
    #: the callbacks before this one in ``fit``'s list (a run's recorder saves their state)
    callbacks_before: tuple = ()

    def state_dict(self) -> dict:
        """What this callback has gathered over the epochs so far, for a run's checkpoint: JSON
        values and NumPy arrays by name. A callback that keeps such state overrides this and
        ``load_state_dict``, so that a resumed run (``fit(resume=True)``) goes on with it as
        the uninterrupted run would have."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Take back ``state_dict``'s state; called after ``on_train_begin`` when resuming."""

    def on_train_begin(self, logs: dict) -> None:
        """``logs`` holds the run's settings (epochs, batch_size, optimizer, ...)."""

    def on_epoch_end(self, epoch: int, logs: dict) -> None:
        """``logs`` holds loss, accuracy, val_loss/val_accuracy (with validation), seconds, lr."""

    def on_train_end(self, logs: dict) -> None:
        """Called once training stops, also when it stops early or is interrupted."""


def keeping_state(callbacks) -> list:
    """The callbacks that keep state across epochs (they override ``Callback.state_dict``)."""
    return [cb for cb in callbacks if type(cb).state_dict is not Callback.state_dict]


class History(Callback):
    """Per-epoch metrics: ``history["loss"]`` is the list of epoch train losses, and so on."""

    def __init__(self):
        self.epoch: list[int] = []
        self.history: dict[str, list[float]] = {}
        self.params: dict = {}
        #: what went wrong in training, one line each (``fit`` fills it; see ``DivergenceMonitor``)
        self.warnings: list[str] = []
        #: whether training ended because it diverged
        self.diverged = False

    def on_train_begin(self, logs):
        self.params = dict(logs)

    def on_epoch_end(self, epoch, logs):
        self.epoch.append(epoch)
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)

    def __getitem__(self, key):
        return self.history[key]

    def __repr__(self):
        last = {k: round(v[-1], 4) for k, v in self.history.items()}
        return f"History(epochs={len(self.epoch)}, last={last})"


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs.

    With ``restore_best_weights`` the model ends with the weights of its best epoch (the Deep
    Learning from Scratch post used patience 3 on the validation loss).
    """

    def __init__(self, monitor="val_loss", *, patience=3, min_delta=0.0, mode="auto", restore_best_weights=True):
        if not isinstance(patience, int) or patience < 0:
            raise ValueError(f"patience must be a non-negative integer, got {patience!r}")
        if mode == "auto":
            mode = "max" if "accuracy" in monitor else "min"
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min', 'max' or 'auto', got {mode!r}")
        self.monitor, self.patience, self.min_delta = monitor, patience, abs(float(min_delta))
        self.mode, self.restore_best_weights = mode, restore_best_weights
        self.best = math.inf if mode == "min" else -math.inf
        self.best_epoch = None
        self.stopped_epoch = None
        self._wait = 0
        self._best_weights = None

    def _improved(self, value):
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def on_train_begin(self, logs):
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_epoch = self.stopped_epoch = self._best_weights = None
        self._wait = 0

    def state_dict(self):
        weights = None if self._best_weights is None else _flat(self._best_weights)
        state = {"best": self.best, "best_epoch": self.best_epoch, "stopped_epoch": self.stopped_epoch,
                 "wait": self._wait, "best_weights": None if weights is None else len(weights)}
        state.update({f"best_weights.{i}": np.asarray(w) for i, w in enumerate(weights or ())})
        return state

    def load_state_dict(self, state):
        self.best, self.best_epoch, self.stopped_epoch = state["best"], state["best_epoch"], state["stopped_epoch"]
        self._wait = state["wait"]
        count = state["best_weights"]
        if count is None:
            self._best_weights = None
        else:  # in the layout the model's get_weights has (an MLP's (W, b) pairs)
            flat = iter([state[f"best_weights.{i}"] for i in range(count)])
            self._best_weights = [tuple(next(flat) for _ in w) if isinstance(w, tuple) else next(flat)
                                  for w in self.model.get_weights()]

    def on_epoch_end(self, epoch, logs):
        if self.monitor not in logs:
            raise ValueError(
                f"EarlyStopping monitors {self.monitor!r}, which this run does not log "
                f"(it logs {sorted(logs)}); pass validation data to monitor val_* metrics"
            )
        value = logs[self.monitor]
        if self._improved(value):
            self.best, self.best_epoch, self._wait = value, epoch, 0
            if self.restore_best_weights:
                self._best_weights = self.model.get_weights()
            return
        self._wait += 1
        if self._wait >= self.patience:
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def on_train_end(self, logs):
        if self.restore_best_weights and self._best_weights is not None:
            self.model.set_weights(self._best_weights)


def _flat(weights) -> list:
    return [a for w in weights for a in (w if isinstance(w, tuple) else (w,))]


class DivergenceWarning(RuntimeWarning):
    """Training is going nowhere: the loss is not finite, or has stayed up, or accuracy is at chance."""


class DivergenceMonitor(Callback):
    """Warn (and, with ``stop``, end training) when training has gone wrong.

    Training is taken to have diverged when, for ``patience`` epochs in a row, the training loss
    is above its first epoch's value or the training accuracy is no better than ``margin`` over
    chance (always answering the most common class; ``fit`` passes it as ``chance_accuracy``).
    ``fit`` adds one (its ``on_divergence``) and handles a non-finite loss itself.

    ``warnings`` holds the message given; ``diverged`` says whether it stopped training.
    """

    def __init__(self, patience=3, *, stop=False, margin=0.01):
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be a positive integer, got {patience!r}")
        if not (isinstance(margin, (int, float)) and 0 <= margin < 1):
            raise ValueError(f"margin must be a fraction in [0, 1), got {margin!r}")
        self.patience, self.stop, self.margin = patience, bool(stop), float(margin)
        self.on_train_begin({})

    def on_train_begin(self, logs):
        self.chance = logs.get("chance_accuracy")
        self.first_loss = None
        self.warnings: list[str] = []
        self.diverged = False
        self._bad = 0

    def state_dict(self):
        return {"first_loss": self.first_loss, "bad": self._bad, "warnings": list(self.warnings),
                "diverged": self.diverged}

    def load_state_dict(self, state):
        self.first_loss, self._bad = state["first_loss"], state["bad"]
        self.warnings, self.diverged = list(state["warnings"]), state["diverged"]

    def on_epoch_end(self, epoch, logs):
        loss, accuracy = logs["loss"], logs["accuracy"]
        if self.first_loss is None:
            self.first_loss = loss
        symptoms = []
        if loss > self.first_loss:
            symptoms.append(f"loss {loss:.4g} above the first epoch's {self.first_loss:.4g}")
        if self.chance is not None and accuracy <= self.chance + self.margin:
            symptoms.append(f"accuracy {accuracy:.1%} at chance ({self.chance:.1%})")
        self._bad = self._bad + 1 if symptoms else 0
        if self._bad < self.patience or self.warnings:  # say it once
            return
        lr = f" (lr={logs['lr']:.4g})" if "lr" in logs else ""
        message = (f"training diverged: at epoch {epoch + 1}, {' and '.join(symptoms)}, "
                   f"{self._bad} epochs in a row without progress; lower the learning rate{lr}")
        if self.stop:
            self.diverged = self.model.stop_training = True
            message += "; training stopped"
        self.warnings.append(message)
        warnings.warn(message, DivergenceWarning, stacklevel=4)  # at the fit() call: callback, fit, Sequential.fit
