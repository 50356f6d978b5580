"""Pictures of the data and of a trained model (matplotlib, the optional extra ``plot``).

Every plotting function returns a ``matplotlib.figure.Figure`` and, given ``path``, also writes it
as a PNG (atomically). Figures are made without ``pyplot``, so no GUI backend or global figure
state is involved and they are safe to make from any thread; in a notebook, show one by leaving it
as the cell's value. matplotlib is imported inside the functions: ``import xpnet`` never needs it.

The numbers behind the pictures (``confusion_counts``, ``class_accuracies``) are plain NumPy on
label arrays, usable without matplotlib.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .files import atomic_write_bytes

__all__ = [
    "examples_per_class",
    "mean_image_per_class",
    "training_curves",
    "confusion_matrix",
    "per_class_accuracy",
    "worst_misclassified",
    "confusion_counts",
    "class_accuracies",
    "save_png",
]


# -- the numbers -------------------------------------------------------------------------------


def confusion_counts(y_true, y_pred, n_classes: int | None = None) -> np.ndarray:
    """Confusion matrix of counts: ``C[i, j]`` = how many of class ``i`` were predicted ``j``.

    Parameters
    ----------
    y_true, y_pred : array_like of int, shape (N,)
    n_classes : int, optional
        Default: one more than the largest label seen.

    Returns
    -------
    ndarray of int64, shape (n_classes, n_classes)
    """
    y_true, y_pred = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred must have the same length, got {y_true.shape[0]} and {y_pred.shape[0]}")
    if n_classes is None:
        n_classes = int(max(y_true.max(initial=-1), y_pred.max(initial=-1))) + 1
    if max(y_true.max(initial=-1), y_pred.max(initial=-1)) >= n_classes:
        raise ValueError(f"labels must be below n_classes={n_classes}")
    flat = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes)


def class_accuracies(y_true, y_pred, n_classes: int | None = None) -> np.ndarray:
    """Per-class accuracy (recall): ``C[i, i] / sum_j C[i, j]``; NaN for a class with no examples.

    Returns
    -------
    ndarray of float64, shape (n_classes,)
    """
    counts = confusion_counts(y_true, y_pred, n_classes)
    support = counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(counts) / support, np.nan)


def _labels(y, name) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class labels, got shape {y.shape}")
    if y.size and (y.dtype.kind not in "iu" or y.min() < 0):
        raise ValueError(f"{name} must hold non-negative integer labels, got dtype {y.dtype}")
    return y.astype(np.int64)


def _images(X, name="X") -> np.ndarray:
    """(N, H, W) images from (N, H, W) or flat (N, H*W) square images."""
    X = np.asarray(X)
    if X.ndim == 2:
        side = int(round(np.sqrt(X.shape[1])))
        if side * side != X.shape[1]:
            raise ValueError(f"{name} rows of {X.shape[1]} values are not square images; pass (N, H, W)")
        X = X.reshape(-1, side, side)
    if X.ndim != 3:
        raise ValueError(f"{name} must be images (N, H, W) or flat square images (N, H*W), got shape {X.shape}")
    return X


# -- pictures of the data ------------------------------------------------------------------------


def examples_per_class(X, y, *, path=None, classes=None):
    """One example image of each class (the first one in ``X``), in a row.

    Parameters
    ----------
    X : array, shape (N, H, W) or (N, H*W)
    y : array of int, shape (N,)
    path : str or path-like, optional
        Also save the figure there as a PNG.
    classes : sequence of int, optional
        Which classes, in order; default every label present.
    """
    X, y = _images(X), _labels(y, "y")
    classes = np.unique(y) if classes is None else np.asarray(classes)
    images, titles = [], []
    for c in classes:
        where = np.flatnonzero(y == c)
        if where.size == 0:
            raise ValueError(f"no example of class {c} in y")
        images.append(X[where[0]])
        titles.append(str(c))
    fig = _image_grid(images, titles, columns=len(images), suptitle="One example per class")
    return _finish(fig, path)


def mean_image_per_class(X, y, *, path=None):
    """The average image of each class: what a typical digit of each class looks like."""
    X, y = _images(X), _labels(y, "y")
    classes = np.unique(y)
    means = [X[y == c].mean(axis=0, dtype=np.float64) for c in classes]
    titles = [f"{c} (n={int((y == c).sum())})" for c in classes]
    fig = _image_grid(means, titles, columns=len(means), suptitle="Mean image per class")
    return _finish(fig, path)


# -- pictures of training and of a trained model -----------------------------------------------------


def training_curves(history, *, path=None):
    """Loss and accuracy per epoch, training and (when recorded) validation.

    Parameters
    ----------
    history : History, dict of lists, or list of per-epoch dicts
        ``model.fit``'s return value, its ``.history``, or the lines of a run's metrics.jsonl.
    """
    metrics = _metric_lists(history)
    if not metrics.get("loss"):
        raise ValueError("history has no 'loss' values: train for at least one epoch")
    from matplotlib.ticker import MaxNLocator

    epochs = np.arange(1, len(metrics["loss"]) + 1)
    fig = _figure(figsize=(9, 3.6))
    for ax, name in zip(fig.subplots(1, 2), ("loss", "accuracy")):
        for key, label, style in ((name, "train", "-o"), (f"val_{name}", "validation", "-s")):
            values = metrics.get(key)
            if values:
                ax.plot(epochs[: len(values)], values, style, markersize=3, label=label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Training curves")
    return _finish(fig, path)


def confusion_matrix(y_true, y_pred, *, path=None, n_classes=None, normalize=False):
    """Confusion matrix as a heat map: rows are true classes, columns predicted ones.

    With ``normalize`` each row is divided by its class's size (so the diagonal is the per-class
    accuracy); otherwise cells show counts.
    """
    counts = confusion_counts(y_true, y_pred, n_classes)
    shown = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1) if normalize else counts
    k = counts.shape[0]
    fig = _figure(figsize=(6.2, 5.4))
    ax = fig.subplots()
    # Log-like colour scale: the diagonal dwarfs the mistakes, which are what one looks for.
    im = ax.imshow(np.log1p(shown * (1000 if normalize else 1)), cmap="Blues")
    for i in range(k):
        for j in range(k):
            text = f"{shown[i, j]:.2f}" if normalize else str(shown[i, j])
            light = im.norm(im.get_array()[i, j]) > 0.6
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if light else "black")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    ax.set_title(f"Confusion matrix (accuracy {accuracy:.2%}, {counts.sum()} images)")
    return _finish(fig, path)


def per_class_accuracy(y_true, y_pred, *, path=None, n_classes=None):
    """Bar chart of each class's accuracy, with the overall accuracy as a line."""
    acc = class_accuracies(y_true, y_pred, n_classes)
    counts = confusion_counts(y_true, y_pred, n_classes)
    overall = np.trace(counts) / max(counts.sum(), 1)
    fig = _figure(figsize=(7, 3.6))
    ax = fig.subplots()
    bars = ax.bar(np.arange(len(acc)), np.nan_to_num(acc), color="#4f81bd")
    for bar, a in zip(bars, acc):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), "n/a" if np.isnan(a) else f"{a:.1%}",
                ha="center", va="bottom", fontsize=7)
    ax.axhline(overall, color="#c0504d", linestyle="--")
    finite = acc[np.isfinite(acc)]
    low = min(float(finite.min()) if finite.size else 0.0, overall)
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.set_xticks(range(len(acc)))
    ax.set_xlabel("class")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Accuracy per class (dashed: overall {overall:.2%})")
    return _finish(fig, path)


def worst_misclassified(X, y_true, probabilities, *, n=16, path=None, columns=8):
    """The ``n`` misclassified images the model was most sure about, with true and predicted labels.

    Parameters
    ----------
    X : array, shape (N, H, W) or (N, H*W)
    y_true : array of int, shape (N,)
    probabilities : array, shape (N, n_classes)
        ``model.predict_proba(X)``; "most sure" means the highest probability on the wrong class.
    """
    X, y_true = _images(X), _labels(y_true, "y_true")
    proba = np.asarray(probabilities, dtype=np.float64)
    if proba.ndim != 2 or proba.shape[0] != X.shape[0] or y_true.shape[0] != X.shape[0]:
        raise ValueError(
            f"X, y_true and probabilities must describe the same images: got {X.shape[0]} images, "
            f"{y_true.shape[0]} labels, probabilities of shape {proba.shape}"
        )
    y_pred = proba.argmax(axis=1)
    wrong = np.flatnonzero(y_pred != y_true)
    worst = wrong[np.argsort(-proba[wrong, y_pred[wrong]], kind="stable")][:n]
    if worst.size == 0:
        fig = _figure(figsize=(4, 1.2))
        fig.text(0.5, 0.5, "no misclassified images", ha="center", va="center")
        return _finish(fig, path)
    titles = [f"true {y_true[i]}, said {y_pred[i]}\n{proba[i, y_pred[i]]:.0%}" for i in worst]
    fig = _image_grid([X[i] for i in worst], titles, columns=min(columns, worst.size),
                      suptitle=f"Most confident mistakes ({wrong.size} of {X.shape[0]} wrong)")
    return _finish(fig, path)


# -- plumbing ----------------------------------------------------------------------------------


def _metric_lists(history) -> dict:
    if hasattr(history, "history"):
        history = history.history
    if isinstance(history, dict):
        return {k: list(v) for k, v in history.items()}
    if isinstance(history, (list, tuple)):
        out: dict = {}
        for line in history:
            for k, v in line.items():
                out.setdefault(k, []).append(v)
        return out
    raise TypeError(f"history must be a History, a dict of lists or a list of dicts, got {type(history).__name__}")


def _figure(**kwargs):
    from matplotlib.figure import Figure

    return Figure(layout="constrained", **kwargs)


def _image_grid(images, titles, *, columns, suptitle):
    rows = -(-len(images) // columns)
    fig = _figure(figsize=(1.1 * columns + 0.3, 1.35 * rows + 0.5))
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, image, title in zip(axes, images, titles):
        ax.imshow(image, cmap="gray_r", interpolation="nearest")
        ax.set_title(title, fontsize=8)
    fig.suptitle(suptitle)
    return fig


def _finish(fig, path):
    if path is not None:
        save_png(fig, path)
    return fig


def save_png(fig, path, dpi=100) -> Path:
    """Write ``fig`` to ``path`` as a PNG, atomically (a temp file, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())
    return path
