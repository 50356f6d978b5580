"""Run records: every training run leaves a folder that says what it was and how it went.

A run folder holds

- ``run.lock``: the run's claim on the folder. The process that records the run holds an
  exclusive ``flock`` on it for the run's life and writes its pid, host and start time in it. A
  second run started on the same folder fails at once; the kernel drops the lock when the process
  ends, however it ends, so a killed run never blocks its folder, and a reader tells a running
  run (lock held) from a killed one (lock free, no ``summary.json``);
- ``config.json``: everything needed to reproduce the run: the model's layers, activation, init,
  dtype and seed, the fit settings (optimizer, lr, batch size, epochs, ...), the backend, the
  versions of xpnet, NumPy and Python, and whatever the caller adds (dataset hashes, the command);
- ``metrics.jsonl``: one JSON object per finished epoch, flushed and fsynced as it is written, so
  an interrupted run keeps every epoch it finished;
- ``model.safetensors``: the model after the last finished epoch (replaced atomically each epoch),
  so the last line of metrics.jsonl always describes it; weights that ``EarlyStopping`` restores
  once training has ended are the caller's model, not the folder's;
- ``checkpoint.safetensors``: what training needs besides the weights to go on exactly where
  that epoch ended (replaced with the model, atomically, before the epoch's metrics line): the
  optimizer's state (moments, step counts), the shuffling and dropout generators' states, the
  state of the callbacks before the recorder (``Callback.state_dict``), the epoch, and a
  fingerprint of the weights it goes with. ``RunRecorder(resume=True)`` (``fit(...,
  run_dir=DIR, resume=True)``, ``xpnet train --resume DIR``) continues from it;
- ``summary.json``: written when training ends: the status (completed, stopped early, diverged
  or interrupted), the epoch whose weights ``model.safetensors`` holds (``model_epoch``, numbered
  as in metrics.jsonl), the training's ``warnings``, and the evaluation and plots of that model
  file, never of a model that is not on disk;
- the plots (PNG), when matplotlib is installed.

``RunRecorder`` is the callback that writes it (``fit(..., run_dir=DIR)`` adds one);
``list_runs`` and ``compare_runs`` read them back for ``xpnet runs``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import signal
import socket
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from .callbacks import Callback, keeping_state
from .files import atomic_write_bytes
from .io import tensors_sha256
from .training import rng_states, set_rng_states

try:
    import fcntl
except ImportError:  # Windows: no flock; a run's claim on its folder is not enforced there
    fcntl = None

__all__ = [
    "RunRecorder",
    "is_running",
    "read_run",
    "read_metrics",
    "list_runs",
    "compare_runs",
    "format_runs_table",
    "format_comparison",
    "cli_runs",
]

CONFIG = "config.json"
METRICS = "metrics.jsonl"
MODEL = "model.safetensors"
CHECKPOINT = "checkpoint.safetensors"
SUMMARY = "summary.json"
LOCK = "run.lock"
PLOTS = ("curves.png", "confusion.png", "per_class_accuracy.png", "worst_misclassified.png")  # all it draws


class RunRecorder(Callback):
    """Record a training run in ``run_dir`` (see the module docstring for what is written).

    Parameters
    ----------
    run_dir : str or path-like
        The run's folder; created if missing. Refused (``FileExistsError``) while another run is
        recording into it, and if it already holds a run, unless ``overwrite``.
    config : dict, optional
        Added to config.json (nested dicts are merged), e.g. ``{"data": dataset_hashes()}``.
    eval_data : (X, y), optional
        Images and labels to draw the confusion matrix, per-class accuracy and worst mistakes of
        the final model from (the training curves are drawn in any case).
    plots : bool
        Draw the plots at the end of training (skipped, and said so, without matplotlib).
    overwrite : bool
        Replace a run already recorded in ``run_dir`` (never one still running).
    resume : bool
        Continue the unfinished run recorded in ``run_dir`` (interrupted or killed) from its
        checkpoint: ``on_train_begin`` checks that the model and fit settings are the recorded
        ones, restores the weights, optimizer state, generators and the state of the callbacks
        before this one (``Callback.state_dict``; the same kinds as recorded), sets
        ``initial_epoch``, and drops a metrics line cut short by a kill. ``config`` is recorded
        under ``resumed``.

    The folder is claimed (see ``claim``) when training begins and released when it ends.
    """

    def __init__(self, run_dir, config=None, *, eval_data=None, plots=True, overwrite=False, resume=False):
        if config is not None and not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        if eval_data is not None and len(eval_data) != 2:
            raise ValueError("eval_data must be a pair (X, y)")
        if overwrite and resume:
            raise ValueError("overwrite replaces the run in the folder, resume continues it: not both")
        self.run_dir = Path(run_dir)
        self.extra_config = dict(config or {})
        self.eval_data = eval_data
        self.plots = plots
        self.overwrite = overwrite
        self.resume = resume
        self.summary = None  # summary.json's content, once written
        self._planned_epochs = None
        self._epochs_done = 0
        self._start = None
        self._lock = None  # the open run.lock while this recorder holds the folder
        self._claimed = False  # whether this recorder ever held it
        self._saved_epoch = None  # the epoch whose weights model.safetensors holds
        self._saved_fingerprint = None  # and those weights' fingerprint

    def claim(self) -> None:
        """Take ``run_dir`` for this run: create it, lock its run.lock, and with ``overwrite``
        remove the files of the run it held. ``on_train_begin`` does this; call it earlier to fail
        before loading data. Closing the lock (at the end of training, or when the process dies)
        releases the folder.

        Raises
        ------
        FileExistsError
            Another run is recording into ``run_dir`` (its pid, host and start time are named), or
            ``run_dir`` already holds a run and neither ``overwrite`` nor ``resume`` is set.
        FileNotFoundError, ValueError
            With ``resume``: ``run_dir`` holds no recorded run, or a finished one.
        """
        if self._lock is not None:
            return
        run = self.run_dir
        if self.resume and not (run / CONFIG).is_file():
            raise FileNotFoundError(f"{run} holds no recorded run to resume (no {CONFIG})")
        run.mkdir(parents=True, exist_ok=True)
        lock = _lock_folder(run)
        try:
            # checked under the lock, so two runs cannot both find the folder free
            if self.resume:
                status = _read_json_object(run / SUMMARY).get("status") if (run / SUMMARY).exists() else None
                if status not in (None, "interrupted"):
                    raise ValueError(f"{run} holds a finished run ({status}): there is nothing to resume")
            elif (run / CONFIG).exists() or (run / METRICS).exists():
                if not self.overwrite:
                    raise FileExistsError(
                        f"{run} already holds a recorded run; choose another folder, replace it (overwrite=True, "
                        f"xpnet train --overwrite) or, if unfinished, continue it (resume=True, xpnet train --resume)"
                    )
                for name in (CONFIG, METRICS, SUMMARY, MODEL, CHECKPOINT, *PLOTS):
                    (run / name).unlink(missing_ok=True)
            owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}
            lock.seek(0)
            lock.truncate()
            lock.write(json.dumps(owner).encode("utf-8") + b"\n")
            _sync(lock)
        except BaseException:
            lock.close()
            raise
        self._lock, self._claimed = lock, True

    def release(self) -> None:
        """Give ``run_dir`` back (``on_train_end`` does this)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def discard(self) -> None:
        """After a start that failed: give ``run_dir`` back and, if no epoch was recorded in it,
        remove what this recorder wrote there (and the folder, if that empties it), so a failed
        start leaves no empty run. A resumed run, or a folder this recorder never claimed, is kept."""
        claimed = self._claimed
        self.release()
        if not claimed or self.resume or read_metrics(self.run_dir):
            return
        for name in (CONFIG, METRICS, SUMMARY, LOCK):
            (self.run_dir / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.run_dir.rmdir()  # only when empty

    # -- the hooks ---------------------------------------------------------------------------

    def on_train_begin(self, logs):
        self.claim()
        try:
            self._begin(logs)
        except BaseException:
            self.release()  # fit calls no on_train_end when a callback's on_train_begin fails
            raise

    def _begin(self, logs):
        if self.resume:
            self._resume(logs)
            return
        run = self.run_dir
        self._start = time.time()
        self._planned_epochs = logs.get("epochs")
        self._epochs_done = 0
        self._saved_epoch = self._saved_fingerprint = None
        model = self.model
        config = {
            "name": run.name,
            "started": _now(),
            "model": dict(model.config),
            "n_params": int(model.count_params()),
            "backend": model.backend.name,
            "fit": _jsonable(dict(logs)),
            "versions": versions(),
            "platform": {"machine": platform.machine(), "system": platform.system(), "processor": platform.processor()},
        }
        config = _merge(config, _jsonable(self.extra_config))
        with open(run / METRICS, "w", encoding="utf-8") as f:  # first: a folder with a config has its metrics
            _sync(f)
        _write_text_atomic(run / CONFIG, json.dumps(config, indent=2) + "\n")

    def _resume(self, logs):
        """Continue the run in the folder (see ``resume``)."""
        run, model = self.run_dir, self.model
        config = _read_json_object(run / CONFIG)
        recorded = _flatten({"model": config.get("model"), "fit": config.get("fit")})
        now = _flatten(_jsonable({"model": model.config, "fit": dict(logs)}))
        differ = [k for k in sorted(set(recorded) | set(now)) if recorded.get(k) != now.get(k)]
        if differ:
            shown = "; ".join(f"{k} was {recorded.get(k)!r}, now {now.get(k)!r}" for k in differ[:3])
            raise ValueError(
                f"{run} was recorded with other settings ({shown}): resume it with the same model and fit settings"
            )
        metrics = read_metrics(run)
        epoch = self._restore_checkpoint(metrics)
        lines = "".join(json.dumps(m, allow_nan=False) + "\n" for m in metrics)  # without a line cut by a kill
        _write_text_atomic(run / METRICS, lines)
        (run / SUMMARY).unlink(missing_ok=True)  # the run goes on: it is running again, not interrupted
        entry = {"started": _now(), "from_epoch": epoch + 1, "backend": model.backend.name}
        config["resumed"] = [*config.get("resumed", []), _merge(entry, _jsonable(self.extra_config))]
        _write_text_atomic(run / CONFIG, json.dumps(config, indent=2) + "\n")
        self._start = time.time() - (metrics[-1].get("elapsed") or 0.0)
        self._planned_epochs = logs.get("epochs")
        self._epochs_done = epoch + 1
        self._saved_epoch, self._saved_fingerprint = epoch, _fingerprint(model)
        self.initial_epoch = epoch + 1

    def _restore_checkpoint(self, metrics) -> int:
        """Put the model, its generators and the optimizer back as the checkpoint has them; return its epoch."""
        from .io import CHECKPOINT_FORMATS, read_model_file
        from .model import load

        run, model = self.run_dir, self.model
        if not metrics:
            raise ValueError(f"{run} finished no epoch: there is nothing to resume; start it again (overwrite)")
        if not (run / CHECKPOINT).is_file():
            raise FileNotFoundError(f"{run / CHECKPOINT} is missing, so the run cannot be resumed")
        tensors, meta = read_model_file(run / CHECKPOINT, formats=CHECKPOINT_FORMATS)
        epoch = int(meta.get("epoch", -1))
        if epoch != metrics[-1]["epoch"]:
            raise ValueError(f"{run / CHECKPOINT} holds epoch {epoch + 1} but {METRICS} ends at epoch "
                             f"{metrics[-1]['epoch'] + 1} (the run was killed while saving): it cannot be resumed")
        model.set_weights(load(run / MODEL, backend=model.backend).get_weights())
        if _fingerprint(model) != meta.get("model_fingerprint"):
            raise ValueError(f"{run / CHECKPOINT} does not go with the weights in {run / MODEL} "
                             "(the run was killed while saving): it cannot be resumed")
        set_rng_states(model, json.loads(meta.get("rng", "{}")))
        state = {name.removeprefix("optimizer."): a for name, a in tensors.items() if name.startswith("optimizer.")}
        self.optimizer.load_state_dict(state, model.parameters())
        if "callbacks" in meta:  # checkpoints written before callbacks kept state hold none: they start afresh
            self._restore_callbacks(json.loads(meta["callbacks"]), tensors)
        return epoch

    def _stateful_callbacks(self) -> list:
        """The callbacks before this recorder (they have seen each epoch's end when it saves)
        that keep state across epochs."""
        return keeping_state(self.callbacks_before)

    def _restore_callbacks(self, recorded: list, tensors: dict) -> None:
        callbacks = self._stateful_callbacks()
        names = [type(cb).__name__ for cb in callbacks]
        if [entry["type"] for entry in recorded] != names:
            raise ValueError(f"{self.run_dir} was recorded with the callbacks {[e['type'] for e in recorded]} "
                             f"(those keeping state, before the recorder), now {names}: resume it with the same")
        for k, (cb, entry) in enumerate(zip(callbacks, recorded)):
            prefix = f"callbacks.{k}."
            arrays = {name.removeprefix(prefix): a for name, a in tensors.items() if name.startswith(prefix)}
            cb.load_state_dict({**entry["state"], **arrays})

    def _save_checkpoint(self, epoch, fingerprint):
        from .io import CHECKPOINT_FORMATS, write_model_file

        to_numpy = self.model.backend.to_numpy
        tensors = {f"optimizer.{name}": to_numpy(a) for name, a in self.optimizer.state_dict().items()}
        callbacks = []  # each stateful callback's JSON values; its arrays go with the tensors
        for k, cb in enumerate(self._stateful_callbacks()):
            state = cb.state_dict()
            arrays = {name for name, value in state.items() if isinstance(value, np.ndarray)}
            tensors.update({f"callbacks.{k}.{name}": np.ascontiguousarray(state[name]) for name in arrays})
            callbacks.append({"type": type(cb).__name__, "state": {n: v for n, v in state.items() if n not in arrays}})
        (kind, version), = CHECKPOINT_FORMATS.items()
        metadata = {"format": kind, "format_version": version, "epoch": str(int(epoch)),
                    "model_fingerprint": fingerprint, "rng": json.dumps(rng_states(self.model)),
                    "optimizer": repr(self.optimizer), "callbacks": json.dumps(callbacks)}
        write_model_file(self.run_dir / CHECKPOINT, tensors, metadata)

    def on_epoch_end(self, epoch, logs):
        line = {"epoch": int(epoch), **_jsonable(dict(logs)), "elapsed": round(time.time() - self._start, 3)}
        fingerprint = _fingerprint(self.model)
        # A Ctrl-C waits until the model, its checkpoint and its metrics line are all on disk, so
        # the last line of metrics.jsonl always describes the model and the checkpoint beside it.
        with _sigint_deferred():
            self.model.save(self.run_dir / MODEL)
            if self.optimizer is not None:  # a recorder driven by hand, not by fit, keeps no checkpoint
                self._save_checkpoint(epoch, fingerprint)
            with open(self.run_dir / METRICS, "a", encoding="utf-8") as f:
                f.write(json.dumps(line, allow_nan=False) + "\n")
                _sync(f)
            # inside the block: a Ctrl-C held back is raised as it ends, and the summary it leads
            # to must already count this epoch
            self._saved_epoch, self._saved_fingerprint = int(epoch), fingerprint
            self._epochs_done += 1

    def on_train_end(self, logs):
        try:
            self._write_summary(logs)
        finally:
            self.release()

    def _write_summary(self, logs):
        """summary.json, describing the model file in the folder (see ``_saved_model``).

        ``logs`` may carry ``warnings`` (one-line strings) and ``diverged`` (training was stopped
        because it diverged), besides ``epochs_run``.
        """
        done = self._epochs_done
        if logs.get("diverged"):
            status = "diverged"
        elif getattr(self.model, "stop_training", False):
            status = "stopped early"
        elif self._planned_epochs is not None and done < self._planned_epochs:
            status = "interrupted"
        else:
            status = "completed"
        summary = {"status": status, "epochs_run": done, "model_epoch": None,
                   "warnings": [str(w) for w in logs.get("warnings") or ()],
                   "finished": _now(), "seconds": round(time.time() - self._start, 3)}
        proba = None
        if done:
            summary["model_epoch"] = self._saved_epoch
            if self.eval_data is not None:
                X, y = self.eval_data
                proba = np.asarray(self._saved_model().predict_proba(X))
                summary["eval_accuracy"] = float((proba.argmax(axis=1) == np.asarray(y)).mean())
                summary["eval_size"] = int(len(y))
        if self.plots and done:
            summary["plots"] = self._draw_plots(proba)
        _write_text_atomic(self.run_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
        self.summary = summary

    def _saved_model(self):
        """The model in model.safetensors: the model in memory when training left it with the
        weights of the last finished epoch, else (a Ctrl-C mid-epoch, or weights that
        ``EarlyStopping`` restored before this callback's end) the file, read back."""
        if _fingerprint(self.model) == self._saved_fingerprint:
            return self.model  # bit for bit the model in the file
        from .model import load

        return load(self.run_dir / MODEL, backend=self.model.backend)

    def _draw_plots(self, proba):
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return "not drawn: matplotlib is not installed (pip install 'xpnet[plot]')"
        from . import plots

        run = self.run_dir
        curves, confusion, per_class, worst = PLOTS
        plots.training_curves(read_metrics(run), path=run / curves)
        if proba is None:
            return [curves]
        X, y = self.eval_data
        y_pred = proba.argmax(axis=1)
        plots.confusion_matrix(y, y_pred, path=run / confusion)
        plots.per_class_accuracy(y, y_pred, path=run / per_class)
        if not _images(X):  # rows of features (a data file), not pictures to show
            return [curves, confusion, per_class]
        plots.worst_misclassified(X, y, proba, path=run / worst)
        return list(PLOTS)


def _images(X) -> bool:
    """Whether the rows of ``X`` are images: (N, H, W[, C]), or flat rows of a square's size."""
    shape = np.shape(X)
    return len(shape) >= 3 or (len(shape) == 2 and math.isqrt(shape[1]) ** 2 == shape[1])


def _fingerprint(model) -> str:
    """The sha256 of the model's parameters: tells whether a model holds the saved weights."""
    to_numpy = model.backend.to_numpy
    return tensors_sha256({str(i): to_numpy(p) for i, p in enumerate(model.parameters())})


def _lock_folder(run: Path):
    """``run/run.lock``, open and exclusively flock-ed by this process.

    Raises FileExistsError naming the folder and the run that holds it.
    """
    fd = os.open(run / LOCK, os.O_RDWR | os.O_CREAT, 0o666)  # never truncated: it may name the holder
    lock = os.fdopen(fd, "r+b")
    if fcntl is None:
        return lock
    # A few tries: ``is_running`` probes the lock with a shared flock for a few microseconds.
    for _ in range(20):
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return lock
        except BlockingIOError:
            time.sleep(0.01)
    lock.close()
    holder = _lock_owner(run)
    who = f" (pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')})" if holder else ""
    raise FileExistsError(f"{run} is in use by another run{who}; wait for it to end or choose another folder")


def _lock_owner(run: Path) -> dict:
    """What ``run/run.lock`` says about the process that claimed the folder ({} if unreadable)."""
    try:
        owner = json.loads((run / LOCK).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def is_running(run_dir) -> bool | None:
    """Whether a live process holds ``run_dir``'s claim: True, False (the run ended, or its
    process was killed), or None for a folder with no run.lock (recorded before claims existed)
    or where flock does not exist."""
    try:
        f = open(Path(run_dir) / LOCK, "rb")
    except FileNotFoundError:
        return None
    with f:  # closing releases the probe's own shared lock
        if fcntl is None:
            return None
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False


def versions() -> dict:
    """Versions of Python and of the libraries a result can depend on (without importing them)."""
    from . import __version__

    out = {"python": platform.python_version(), "xpnet": __version__, "numpy": np.__version__}
    for package in ("numba", "cupy-cuda12x", "cupy-cuda13x", "array-api-compat", "safetensors"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return out


# -- reading runs back ---------------------------------------------------------------------------


def read_metrics(run_dir) -> list[dict]:
    """The epochs recorded in ``run_dir/metrics.jsonl``, in order (none if there is no such file).

    A last line without its newline that is not valid JSON was cut short by a killed process and
    is ignored; any other line that is not a JSON object with numbers for its figures raises
    ValueError naming the file and line.
    """
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    lines = _read_text(path).split("\n")  # after a final newline comes "", skipped below
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            epoch = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            if number == len(lines):
                break
            raise ValueError(f"{where}: not valid JSON ({e})") from None
        _expect(epoch, dict, where)
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "seconds"):
            _expect(epoch.get(key), (int, float), f"{where}: {key!r}")
        out.append(epoch)
    return out


def read_run(run_dir) -> dict:
    """One run as a dict: ``name``, ``path``, ``config``, ``metrics`` (list), ``summary`` (or None)
    and the figures ``list_runs`` shows (``layers``, ``optimizer``, ``best_val_accuracy``,
    ``status``, ``warnings``, ...).

    Raises
    ------
    FileNotFoundError
        ``run_dir`` holds no config.json, or no metrics.jsonl (written before config.json).
    ValueError
        A file of the run is damaged: not UTF-8, not JSON, or not shaped as xpnet writes it.
        The message names the file (and line) and what is wrong.
    """
    run = Path(run_dir)
    if not (run / CONFIG).is_file():
        raise FileNotFoundError(f"{run} is not a run folder: it has no {CONFIG}")
    if not (run / METRICS).is_file():
        raise FileNotFoundError(f"{run / METRICS} is missing")
    config = _read_json_object(run / CONFIG)
    fit = _expect(config.get("fit"), dict, f"{run / CONFIG}: 'fit'") or {}
    model = _expect(config.get("model"), dict, f"{run / CONFIG}: 'model'") or {}
    _expect(model.get("layers"), list, f"{run / CONFIG}: 'model.layers'")
    started = _expect(config.get("started"), str, f"{run / CONFIG}: 'started'") or ""
    metrics = read_metrics(run)
    if metrics and not (run / MODEL).is_file():
        raise FileNotFoundError(f"{run / MODEL} is missing, though {METRICS} records {len(metrics)} epoch(s)")
    summary = None
    if (run / SUMMARY).exists():
        summary = _read_json_object(run / SUMMARY)
        if not isinstance(summary.get("status"), str):
            raise ValueError(f"{run / SUMMARY}: 'status' is missing or not a string")
        _expect(summary.get("warnings"), list, f"{run / SUMMARY}: 'warnings'")
    val = [m["val_accuracy"] for m in metrics if m.get("val_accuracy") is not None]
    return {
        "name": run.name,
        "path": str(run),
        "config": config,
        "metrics": metrics,
        "summary": summary,
        "started": started,
        "layers": _architecture(model),
        "optimizer": str(fit.get("optimizer", "?")).split("(")[0],
        "lr": fit.get("lr"),
        "batch_size": fit.get("batch_size"),
        "epochs": f"{len(metrics)}/{fit.get('epochs', '?')}",
        "best_val_accuracy": max(val) if val else None,
        "final_accuracy": metrics[-1].get("accuracy") if metrics else None,
        "seconds": sum(m.get("seconds") or 0.0 for m in metrics),
        "status": summary["status"] if summary else _unfinished_status(run, metrics),
        "warnings": [str(w) for w in summary.get("warnings") or ()] if summary else [],
    }


def _unfinished_status(run: Path, metrics) -> str:
    """The status of a run with no summary.json: still training, or its process is gone."""
    running = is_running(run)
    if running is None:  # no claim recorded: nothing tells a live run from a dead one
        return "running or killed" if metrics else "no epoch finished"
    return "running" if running else "killed"


def list_runs(runs_dir="runs") -> list[dict]:
    """Every run folder directly inside ``runs_dir``: the readable ones as ``read_run`` gives
    them, oldest first, then each unreadable one as ``{"name", "path", "error"}``, the error one
    line naming the file and what is wrong with it. A folder holding none of a run's files is
    not a run folder and is left out.
    """
    root = Path(runs_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no runs folder at {root}")
    runs, unreadable = [], []
    for folder in sorted(root.iterdir()):
        try:
            if folder.is_dir() and any((folder / name).exists() for name in (CONFIG, METRICS, SUMMARY, MODEL)):
                runs.append(read_run(folder))
        except (OSError, ValueError) as e:  # one damaged folder must not hide the others
            unreadable.append({"name": folder.name, "path": str(folder), "error": _one_line(e)})
    runs.sort(key=lambda r: (r["started"], r["name"]))
    return runs + unreadable


def compare_runs(a, b) -> dict:
    """Two runs side by side.

    Returns
    -------
    dict
        ``runs``: the two ``read_run`` dicts; ``config``: ``[(key, value_a, value_b), ...]`` over
        the union of their flattened config keys (``fit.lr``, ``model.layers``, ...), differing
        keys first; ``metrics``: ``[(epoch, metrics_a or None, metrics_b or None), ...]``.
    """
    run_a, run_b = read_run(a), read_run(b)
    flat_a, flat_b = _flatten(run_a["config"]), _flatten(run_b["config"])
    keys = sorted(set(flat_a) | set(flat_b))
    rows = [(k, flat_a.get(k), flat_b.get(k)) for k in keys]
    rows.sort(key=lambda r: (r[1] == r[2], r[0]))  # differences first
    n = max(len(run_a["metrics"]), len(run_b["metrics"]))
    by_epoch = [
        (i, run_a["metrics"][i] if i < len(run_a["metrics"]) else None,
         run_b["metrics"][i] if i < len(run_b["metrics"]) else None)
        for i in range(n)
    ]
    return {"runs": (run_a, run_b), "config": rows, "metrics": by_epoch}


# -- text for the terminal -----------------------------------------------------------------------


def format_runs_table(runs) -> str:
    """``list_runs``'s result as an aligned text table, then a line for each unreadable run."""
    if not runs:
        return "no runs recorded"
    unreadable = [f"{r['name']}: unreadable: {r['error']}" for r in runs if "error" in r]
    runs = [r for r in runs if "error" not in r]
    header = ["name", "layers", "optimizer", "lr", "batch", "epochs", "best val acc", "train time", "started", "status"]
    rows = [
        [r["name"], r["layers"], r["optimizer"], _num(r["lr"]), _num(r["batch_size"]), r["epochs"],
         _pct(r["best_val_accuracy"]), f"{r['seconds']:.1f} s", r["started"][:19].replace("T", " "), _status(r)]
        for r in runs
    ]
    return "\n".join(([_table(header, rows)] if runs else []) + unreadable)


def _status(run) -> str:
    n = len(run["warnings"])
    return run["status"] + (f" ({n} warning{'s' * (n > 1)})" if n else "")


def format_comparison(comparison) -> str:
    """``compare_runs``'s result as text: configs (differences marked ``*``), then metrics per epoch."""
    run_a, run_b = comparison["runs"]
    a, b = run_a["name"], run_b["name"]
    config_rows = [
        ["*" if va != vb else "", key, _value(va), _value(vb)] for key, va, vb in comparison["config"]
        if key not in ("name", "started")
    ]
    out = ["config (* = differs)", _table(["", "key", a, b], config_rows), ""]
    names = [k for k in ("loss", "accuracy", "val_loss", "val_accuracy", "seconds")
             if any(m and k in m for _, ma, mb in comparison["metrics"] for m in (ma, mb))]
    header = ["epoch"] + [f"{k} {side}" for k in names for side in ("A", "B")]
    metric_rows = [
        [str(epoch + 1)] + [_num(m.get(k)) if m else "" for k in names for m in (ma, mb)]
        for epoch, ma, mb in comparison["metrics"]
    ]
    out += [f"metrics per epoch (A = {a}, B = {b})", _table(header, metric_rows), ""]
    out.append(f"best val accuracy: A {_pct(run_a['best_val_accuracy'])}, B {_pct(run_b['best_val_accuracy'])}; "
               f"status: A {_status(run_a)}, B {_status(run_b)}")
    for side, run in (("A", run_a), ("B", run_b)):
        out += [f"warning ({side}): {w}" for w in run["warnings"]]
    return "\n".join(out)


def cli_runs(args) -> int:
    """``xpnet runs [DIR]`` lists runs; ``xpnet runs compare A B`` compares two."""
    try:
        if getattr(args, "compare", None):
            print(format_comparison(compare_runs(*args.compare)))
        else:
            print(format_runs_table(list_runs(args.dir or "runs")))
    except (OSError, ValueError) as e:
        print(f"xpnet runs: {_one_line(e)}", file=sys.stderr)
        return 1
    return 0


# -- plumbing ------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="milliseconds")


@contextlib.contextmanager
def _sigint_deferred():
    """Hold back SIGINT (Ctrl-C) for the duration of the block, then deliver it.

    Only the main thread can set signal handlers; elsewhere the block runs unprotected.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        signal.raise_signal(signal.SIGINT)  # now, to whatever handled it before


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def _read_json_object(path: Path) -> dict:
    """The JSON object in ``path``; ValueError naming the file when it holds anything else."""
    try:
        value = json.loads(_read_text(path))
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return _expect(value, dict, str(path))


_KINDS = {dict: "a JSON object", list: "a JSON array", str: "a string", (int, float): "a number"}


def _expect(value, kind, where: str):
    """``value`` when it is None or a ``kind``; else ValueError saying what ``where`` should be."""
    if value is not None and not isinstance(value, kind):
        shown = json.dumps(value)
        raise ValueError(f"{where} is not {_KINDS[kind]}: {shown if len(shown) <= 40 else shown[:37] + '...'}")
    return value


def _one_line(e: Exception) -> str:
    return " ".join(str(e).splitlines())


def _sync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _write_text_atomic(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _jsonable(obj):
    """``obj`` with NumPy scalars/arrays as Python values and non-finite floats as None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _flatten(d: dict, prefix="") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _architecture(model_config: dict) -> str:
    """A short name for a model's layers: MLP widths ``784-50-25-10``, else the layer types
    (``Conv2D6-AvgPool2D-...-Dense10``)."""
    parts = []
    for layer in model_config.get("layers") or []:
        if isinstance(layer, dict):
            size = layer.get("units", layer.get("filters", ""))
            parts.append(f"{layer.get('type', '?')}{size}")
        else:
            parts.append(str(layer))
    return "-".join(parts)


def _num(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _pct(v) -> str:
    return "-" if v is None else f"{v:.2%}"


def _value(v) -> str:
    text = "-" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else _num(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _one_line_cells(cells) -> list[str]:
    return [" ".join(str(c).splitlines()) for c in cells]  # a newline in a config value must not break a row


def _table(header, rows) -> str:
    header, rows = _one_line_cells(header), [_one_line_cells(r) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line("-" * w for w in widths), *map(line, rows)])
