"""Baselines that a neural network has to beat.

``NearestCentroid`` is the "average digit" classifier of the Deep Learning from Scratch post:
average the training images of each class, then give a new image the class whose average it is
closest to in mean squared error. It reaches 0.8203 on the MNIST test set.
"""

from __future__ import annotations

import numpy as np

__all__ = ["NearestCentroid", "NotFittedError"]


class NotFittedError(ValueError, AttributeError):
    """A model was used before ``fit``."""


class NearestCentroid:
    """Classify by the smallest mean squared distance to each class's mean image.

    Inputs are ``(N, features)`` or ``(N, H, W)`` (flattened), uint8 (scaled by 1/255, as the
    MLP does) or float. All arithmetic is float64.

    Attributes
    ----------
    classes_ : ndarray, shape (C,)
        The sorted distinct labels seen by ``fit``.
    centroids_ : ndarray of float64, shape (C, features)
        ``centroids_[k]`` is the mean of the training rows of class ``classes_[k]``.
    n_features_in_ : int

    Examples
    --------
    >>> X, y = load_mnist("train"); Xt, yt = load_mnist("test")      # doctest: +SKIP
    >>> NearestCentroid().fit(X, y).score(Xt, yt)                   # doctest: +SKIP
    0.8203
    """

    def fit(self, X, y):
        """Store the mean of each class's rows. Returns ``self``.

        Parameters
        ----------
        X : array_like, shape (N, features) or (N, H, W)
        y : array_like of int, shape (N,)
        """
        X = _features(X)
        y = _labels(y, len(X))
        self.classes_, index = np.unique(y, return_inverse=True)
        counts = np.bincount(index, minlength=len(self.classes_))
        # One boolean gather per class: C passes over X, quick for a classifier's few classes.
        sums = np.stack([X[index == k].sum(axis=0) for k in range(len(self.classes_))])
        self.centroids_ = sums / counts[:, None]
        self.n_features_in_ = X.shape[1]
        return self

    def mean_squared_distances(self, X):
        """Mean squared distance of every row to every centroid.

        ``d[i, k] = mean_j (x_ij - c_kj)^2 = (||x_i||^2 - 2 x_i . c_k + ||c_k||^2) / features``,
        one matrix product instead of a loop over rows.

        Returns
        -------
        ndarray of float64, shape (N, C)
        """
        X = self._check_X(X)
        c = self.centroids_
        d = (X * X).sum(axis=1)[:, None] - 2.0 * (X @ c.T) + (c * c).sum(axis=1)[None, :]
        np.maximum(d, 0.0, out=d)  # the expansion can dip just below 0 by rounding
        return d / X.shape[1]

    def predict(self, X):
        """Label of the nearest centroid for every row. Returns ndarray of shape (N,)."""
        nearest = np.argmin(self.mean_squared_distances(X), axis=1)
        return self.classes_[nearest]

    def score(self, X, y):
        """Accuracy: the fraction of rows whose predicted label equals ``y``. Returns float."""
        predicted = self.predict(X)
        y = _labels(y, len(predicted))
        return float(np.mean(predicted == y))

    def _check_X(self, X):
        if not hasattr(self, "centroids_"):
            raise NotFittedError("NearestCentroid is not fitted yet: call fit(X, y) first")
        X = _features(X)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {X.shape[1]} features, but NearestCentroid was fitted with "
                f"{self.n_features_in_}"
            )
        return X


def _features(X) -> np.ndarray:
    """X as a float64 (N, features) array; uint8 scaled by 1/255."""
    X = np.asarray(X)
    if X.dtype == np.bool_ or not (
        np.issubdtype(X.dtype, np.integer) or np.issubdtype(X.dtype, np.floating)
    ):
        raise TypeError(f"X must hold integers or real floats, got dtype {X.dtype}")
    if X.ndim == 3:
        X = X.reshape(len(X), -1)
    elif X.ndim != 2:
        raise ValueError(
            f"X must be shaped (N, features) or (N, H, W), got shape {X.shape}"
        )
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"X is empty: shape {X.shape}")
    if X.dtype == np.uint8:
        return X.astype(np.float64) / 255.0
    X = X.astype(np.float64)
    if not np.isfinite(X).all():
        raise ValueError("X contains NaN or infinity")
    return X


def _labels(y, n: int) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be 1-D, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"y must hold integer labels, got dtype {y.dtype}")
    if len(y) != n:
        raise ValueError(f"X has {n} rows but y has {len(y)} labels")
    return y
