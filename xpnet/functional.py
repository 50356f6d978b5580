"""The math of xpnet, written once against the array API standard.

Every function here is the *reference*: the single source of truth for its formula, and the
fallback wherever no hand-written kernel applies. Each takes ``impl="auto"|"xp"|"numba"|"cuda"``;
``xpnet.kernels.select`` decides whether a kernel (same name, same arguments, in
``xpnet.kernels.numba_cpu`` or ``xpnet.kernels.cuda``) runs instead.

Numerics contract
-----------------
- softmax subtracts the row maximum before ``exp``, so any finite logits are safe (no overflow,
  no 0/0); the loss is computed from logits as ``logsumexp(z) - z[y]``, never ``log(softmax)``.
- cross-entropy gradient of the *mean* loss: ``(softmax(z) - onehot(y)) / N``.
- ReLU's derivative at 0 is taken as 0: ``relu_backward(dy, y) = dy where y > 0 else 0``.
- results keep the input's floating dtype (no float64 creep); nothing is clipped.

``out=``, where offered, is honoured exactly: the result is written into ``out`` (which must
have the result's shape and dtype) and ``out`` is returned.
"""

from __future__ import annotations

from . import kernels

__all__ = [
    "relu",
    "relu_backward",
    "bias_relu",
    "tanh",
    "tanh_backward",
    "sigmoid",
    "sigmoid_backward",
    "softmax",
    "log_softmax",
    "logsumexp",
    "cross_entropy",
    "softmax_cross_entropy",
    "softmax_cross_entropy_backward",
    "scale_pixels",
]


def _namespace(x):
    return kernels.namespace_of(x)


def _no_kernel(impl, x):
    """Validate ``impl`` for a function that only has the reference: a forced kernel is an error."""
    kernels.select(None, impl, x)


def _write(out, value):
    """Honour ``out=`` on the reference path: copy ``value`` into ``out`` and return it."""
    if out is None:
        return value
    if tuple(out.shape) != tuple(value.shape) or out.dtype != value.dtype:
        raise ValueError(
            f"out has shape {tuple(out.shape)} and dtype {out.dtype}; "
            f"expected {tuple(value.shape)} and {value.dtype}"
        )
    out[...] = value
    return out


def _check_rows(name, x):
    if x.ndim != 2:
        raise ValueError(f"{name} expects a 2-D array (rows, classes), got shape {tuple(x.shape)}")


def _check_labels(logits, labels):
    _check_rows("logits", logits)
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels must have shape ({logits.shape[0]},) to match logits {tuple(logits.shape)}, "
            f"got {tuple(labels.shape)}"
        )


# --- activations -----------------------------------------------------------------------------


def relu(x, /, *, impl="auto"):
    """``max(x, 0)`` elementwise; same shape and dtype as ``x``."""
    _no_kernel(impl, x)
    xp = _namespace(x)
    return xp.where(x > 0, x, xp.zeros_like(x))


def relu_backward(dy, y, /, *, out=None, impl="auto"):
    """Gradient through ReLU given its output ``y``: ``dy`` where ``y > 0``, else 0.

    ``y`` is the ReLU *output* (``y > 0`` exactly where the input was > 0), so the forward pass
    need not keep its input. The derivative at 0 is 0.
    """
    if tuple(dy.shape) != tuple(y.shape):
        raise ValueError(f"dy {tuple(dy.shape)} and y {tuple(y.shape)} must have the same shape")
    kernel = kernels.select("relu_backward", impl, dy, y)
    if kernel is not None:
        return kernel(dy, y, out=out)
    xp = _namespace(dy)
    return _write(out, xp.where(y > 0, dy, xp.zeros_like(dy)))


def bias_relu(x, b, /, *, out=None, impl="auto"):
    """``relu(x + b)`` for ``x`` of shape (N, F) and a bias ``b`` of shape (F,).

    Fused in the kernels (one pass over ``x``); ``out=x`` is allowed and works in place.
    """
    _check_rows("x", x)
    if b.ndim != 1 or b.shape[0] != x.shape[1]:
        raise ValueError(f"bias of shape {tuple(b.shape)} does not fit x of shape {tuple(x.shape)}")
    kernel = kernels.select("bias_relu", impl, x, b)
    if kernel is not None:
        return kernel(x, b, out=out)
    xp = _namespace(x)
    z = x + b
    return _write(out, xp.where(z > 0, z, xp.zeros_like(z)))


def tanh(x, /, *, impl="auto"):
    """Hyperbolic tangent elementwise."""
    _no_kernel(impl, x)
    return _namespace(x).tanh(x)


def tanh_backward(dy, y, /, *, impl="auto"):
    """Gradient through tanh given its output ``y``: ``dy * (1 - y**2)``."""
    _no_kernel(impl, dy)
    return dy * (1 - y * y)


def sigmoid(x, /, *, impl="auto"):
    """Logistic function, as ``(1 + tanh(x / 2)) / 2`` so that no ``exp`` can overflow."""
    _no_kernel(impl, x)
    return (1 + _namespace(x).tanh(x / 2)) / 2


def sigmoid_backward(dy, y, /, *, impl="auto"):
    """Gradient through the logistic function given its output ``y``: ``dy * y * (1 - y)``."""
    _no_kernel(impl, dy)
    return dy * y * (1 - y)


# --- softmax family --------------------------------------------------------------------------


def logsumexp(x, /, *, axis=-1, keepdims=False, impl="auto"):
    """``log(sum(exp(x), axis))`` computed as ``m + log(sum(exp(x - m)))`` with ``m = max(x)``."""
    _no_kernel(impl, x)
    xp = _namespace(x)
    m = xp.max(x, axis=axis, keepdims=True)
    s = m + xp.log(xp.sum(xp.exp(x - m), axis=axis, keepdims=True))
    return s if keepdims else xp.squeeze(s, axis=axis)


def log_softmax(x, /, *, axis=-1, impl="auto"):
    """``x - logsumexp(x)`` along ``axis``: finite for any finite ``x``."""
    _no_kernel(impl, x)
    return x - logsumexp(x, axis=axis, keepdims=True)


def softmax(x, /, *, axis=-1, out=None, impl="auto"):
    """``exp(x - max) / sum(exp(x - max))`` along ``axis``.

    Kernels handle the common case, a 2-D array normalised along its last axis.
    """
    if x.ndim == 2 and axis in (-1, 1):
        kernel = kernels.select("softmax", impl, x)
        if kernel is not None:
            return kernel(x, out=out)
    else:
        _no_kernel(impl, x)
    xp = _namespace(x)
    e = xp.exp(x - xp.max(x, axis=axis, keepdims=True))
    return _write(out, e / xp.sum(e, axis=axis, keepdims=True))


def _onehot(labels, n_classes, dtype, xp):
    classes = xp.arange(n_classes, dtype=labels.dtype)
    return xp.astype(labels[:, None] == classes[None, :], dtype)


def _check_label_range(labels, n_classes, xp):
    """Out-of-range labels would silently select nothing from the one-hot: refuse them."""
    if labels.shape[0] and bool(xp.any((labels < 0) | (labels >= n_classes))):
        raise ValueError(f"labels must lie in [0, {n_classes}); some are outside")


def cross_entropy(logits, labels, /, *, reduction="mean", impl="auto"):
    """Cross-entropy of integer ``labels`` under ``softmax(logits)``, from the logits.

    ``loss_i = logsumexp(z_i) - z_i[y_i]``; ``reduction`` is ``"mean"`` (a 0-d array),
    ``"sum"`` (0-d) or ``"none"`` (shape (N,)).
    """
    _check_labels(logits, labels)
    _no_kernel(impl, logits)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    xp = _namespace(logits)
    _check_label_range(labels, logits.shape[1], xp)
    picked = xp.sum(logits * _onehot(labels, logits.shape[1], logits.dtype, xp), axis=1)
    losses = logsumexp(logits, axis=1) - picked
    if reduction == "none":
        return losses
    total = xp.sum(losses)
    return total / losses.shape[0] if reduction == "mean" else total


def softmax_cross_entropy_backward(logits, labels, /, *, out=None, impl="auto"):
    """Gradient of the *mean* cross-entropy w.r.t. the logits: ``(softmax(z) - onehot(y)) / N``."""
    _, grad = softmax_cross_entropy(logits, labels, grad_out=out, impl=impl)
    return grad


def softmax_cross_entropy(logits, labels, /, *, grad_out=None, impl="auto"):
    """Mean cross-entropy and its gradient in one pass: returns ``(loss, grad)``.

    ``loss`` is a 0-d array of the logits' dtype (on the logits' device, so a training loop can
    accumulate it without a host synchronisation); ``grad`` is ``(softmax(z) - onehot(y)) / N``.
    """
    _check_labels(logits, labels)
    kernel = kernels.select("softmax_cross_entropy", impl, logits, labels)
    if kernel is not None:
        return kernel(logits, labels, grad_out=grad_out)
    xp = _namespace(logits)
    loss = cross_entropy(logits, labels)  # checks the labels' range too
    onehot = _onehot(labels, logits.shape[1], logits.dtype, xp)
    grad = (softmax(logits, impl="xp") - onehot) / logits.shape[0]
    return loss, _write(grad_out, grad)


# --- inputs ----------------------------------------------------------------------------------


def scale_pixels(x, dtype, /):
    """uint8 pixels as floats in [0, 1]: ``x / 255``, correctly rounded in ``dtype``.

    The one formula behind every place xpnet turns images into inputs (``MLP`` given uint8
    data, and the CPU training step's gather kernel, which is tested equal to it on all 256
    byte values).
    """
    xp = _namespace(x)
    return xp.astype(x, dtype) / 255
