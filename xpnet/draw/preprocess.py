"""Turn a grey-level drawing into a 28x28 digit the way MNIST itself was made.

MNIST's recipe (LeCun et al.): the ink's bounding box is scaled to fit a 20x20 box keeping its
aspect ratio (anti-aliasing gives grey levels), then placed in a 28x28 field so that its centre of
mass lands on the field's centre. Measured on the real test set, every digit's bounding box is 20
pixels on its long side and its centre of mass sits at row 14.0 +- 0.3, column 14.0 +- 0.3 (index
coordinates), so that is where we put it. NumPy only.
"""

from __future__ import annotations

import numpy as np

__all__ = ["preprocess", "resize_area", "MIN_SIDE", "MAX_SIDE"]

MIN_SIDE = 28
MAX_SIDE = 512
FIELD = 28  # side of the output image
BOX = 20  # side of the box the ink is scaled to fit
CENTRE = 14.0  # where MNIST puts the centre of mass (row and column, index coordinates)


def preprocess(image, *, threshold: float = 0.0) -> np.ndarray:
    """MNIST-style 28x28 image from a drawing of any size (ink bright on dark).

    Parameters
    ----------
    image : array_like, shape (H, W), 28 <= H, W <= 512
        Grey levels in [0, 255], 0 the background.
    threshold : float
        Pixels brighter than this count as ink when finding the bounding box.

    Returns
    -------
    ndarray, shape (28, 28), float64
        Grey levels in [0, 255], the brightest pixel at 255; all zeros if there is no ink.

    Raises
    ------
    ValueError
        If the image is not 2-D, has a side outside [28, 512], or values that are not finite
        or outside [0, 255].
    """
    img = validate_image(image)
    if not 0 <= threshold <= 255:
        raise ValueError(f"threshold must lie in [0, 255], got {threshold!r}")
    ink = img > threshold
    if not ink.any():
        return np.zeros((FIELD, FIELD))
    rows = np.flatnonzero(ink.any(axis=1))
    cols = np.flatnonzero(ink.any(axis=0))
    # Brightest pixel to 1 before resizing: scaling up afterwards would overflow to inf (and NaN)
    # for faint ink such as 1e-310, whose resized values underflow.
    crop = img[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] / img.max()

    h, w = crop.shape
    scale = BOX / max(h, w)
    digit = resize_area(crop, (max(1, round(h * scale)), max(1, round(w * scale))))
    digit = digit / digit.max() * 255.0  # in this order the brightest is exactly 255, none above

    # Integer shift putting the centre of mass on (14, 14), clamped so no ink leaves the field.
    mass = digit.sum()
    cy = (digit.sum(axis=1) @ np.arange(digit.shape[0])) / mass
    cx = (digit.sum(axis=0) @ np.arange(digit.shape[1])) / mass
    top = int(np.clip(round(CENTRE - cy), 0, FIELD - digit.shape[0]))
    left = int(np.clip(round(CENTRE - cx), 0, FIELD - digit.shape[1]))
    out = np.zeros((FIELD, FIELD))
    out[top : top + digit.shape[0], left : left + digit.shape[1]] = digit
    return out


def validate_image(image) -> np.ndarray:
    """The drawing as a float64 (H, W) array, or ValueError saying what is wrong with it."""
    try:
        img = np.asarray(image)
    except ValueError as e:  # ragged nested lists
        raise ValueError(f"image must be a rectangular 2-D array of numbers ({e})") from None
    if img.dtype.kind not in "iuf":
        raise ValueError(f"image must hold numbers, got dtype {img.dtype}")
    if img.ndim != 2:
        raise ValueError(f"image must be 2-D (rows of pixels), got shape {img.shape}")
    h, w = img.shape
    if not (MIN_SIDE <= h <= MAX_SIDE and MIN_SIDE <= w <= MAX_SIDE):
        raise ValueError(
            f"image must be between {MIN_SIDE}x{MIN_SIDE} and {MAX_SIDE}x{MAX_SIDE} pixels, "
            f"got {h}x{w}"
        )
    img = img.astype(np.float64)
    if not np.isfinite(img).all():
        raise ValueError("image values must be finite numbers")
    lo, hi = img.min(), img.max()
    if lo < 0 or hi > 255:
        raise ValueError(f"image values must lie in [0, 255], got values in [{lo:g}, {hi:g}]")
    return img


def resize_area(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize by area averaging: each output pixel is the mean of the input area it covers.

    Exact for any ratio, up or down; separable, so it is two small matrix products,
    ``R @ image @ C.T`` with ``R[i, j]`` the share of output row ``i`` that input row ``j`` covers.

    Parameters
    ----------
    image : ndarray, shape (H, W)
    shape : (int, int)
        Output (rows, columns), each >= 1.

    Returns
    -------
    ndarray, shape ``shape``, float64
    """
    rows = _area_weights(image.shape[0], shape[0])
    cols = _area_weights(image.shape[1], shape[1])
    return rows @ np.asarray(image, dtype=np.float64) @ cols.T


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix: overlap of output cell i, [i, i+1) * n_in/n_out, with input cell j."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    lo, hi = edges[:-1, None], edges[1:, None]
    j = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0.0, None)
    return overlap / (n_in / n_out)
