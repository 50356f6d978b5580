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
    "ACTIVATIONS",
    "DERIVATIVES",
    "conv_output_size",
    "conv2d",
    "conv2d_backward",
    "max_pool2d",
    "max_pool2d_backward",
    "avg_pool2d",
    "avg_pool2d_backward",
    "shift_images",
    "shift_images_backward",
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


#: Activations by name, and their derivatives given the activation's *output* ``y`` (one place
#: for each: layers, the CPU training step and the CUDA graph path all read these).
ACTIVATIONS = {"relu": relu, "tanh": tanh, "sigmoid": sigmoid}
DERIVATIVES = {"relu": relu_backward, "tanh": tanh_backward, "sigmoid": sigmoid_backward}


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
    # z[y] by selection, not by a product with the one-hot: -inf * 0 is NaN for another class's -inf
    is_label = labels[:, None] == xp.arange(logits.shape[1], dtype=labels.dtype)[None, :]
    picked = xp.sum(xp.where(is_label, logits, xp.zeros_like(logits)), axis=1)
    losses = logsumexp(logits, axis=1) - picked
    if reduction == "none":
        return losses
    total = xp.sum(losses)
    return total / losses.shape[0] if reduction == "mean" else total


def softmax_cross_entropy_backward(logits, labels, /, *, out=None, impl="auto"):
    """Gradient of the *mean* cross-entropy w.r.t. the logits: ``(softmax(z) - onehot(y)) / N``."""
    _, grad = softmax_cross_entropy(logits, labels, grad_out=out, impl=impl)
    return grad


def softmax_cross_entropy(logits, labels, /, *, weights=None, grad_out=None, impl="auto"):
    """Mean cross-entropy and its gradient in one pass: returns ``(loss, grad)``.

    ``loss`` is a 0-d array of the logits' dtype (on the logits' device, so a training loop can
    accumulate it without a host synchronisation); ``grad`` is ``(softmax(z) - onehot(y)) / N``.
    ``weights`` (shape (N,), the logits' dtype and device) weigh each row's loss and gradient:
    ``loss = sum(w_i loss_i) / N``, ``grad_i = w_i (softmax(z_i) - onehot(y_i)) / N`` (weights
    whose mean is 1 make it a weighted mean, as ``fit``'s ``sample_weight`` does).
    """
    _check_labels(logits, labels)
    arrays = (logits, labels)
    if weights is not None:
        if tuple(weights.shape) != (logits.shape[0],) or weights.dtype != logits.dtype:
            raise ValueError(
                f"weights must have shape ({logits.shape[0]},) and dtype {logits.dtype} to match the logits, "
                f"got shape {tuple(weights.shape)} and dtype {weights.dtype}"
            )
        arrays += (weights,)
    kernel = kernels.select("softmax_cross_entropy", impl, *arrays)
    if kernel is not None:
        return kernel(logits, labels, grad_out=grad_out, **({} if weights is None else {"weights": weights}))
    xp = _namespace(logits)
    onehot = _onehot(labels, logits.shape[1], logits.dtype, xp)
    grad = softmax(logits, impl="xp") - onehot
    n = logits.shape[0]
    if weights is None:
        return cross_entropy(logits, labels), _write(grad_out, grad / n)  # checks the labels' range too
    losses = cross_entropy(logits, labels, reduction="none")
    return xp.sum(weights * losses) / n, _write(grad_out, grad * weights[:, None] / n)  # (weights of 1: bit for bit)


# --- inputs ----------------------------------------------------------------------------------


def scale_pixels(x, dtype, /):
    """uint8 pixels as floats in [0, 1]: ``x / 255``, correctly rounded in ``dtype``.

    The one formula behind every place xpnet turns images into inputs (``MLP`` given uint8
    data, and the CPU training step's gather kernel, which is tested equal to it on all 256
    byte values).
    """
    xp = _namespace(x)
    return xp.astype(x, dtype) / 255


# --- convolution and pooling (channels-last: images are (N, H, W, C)) ---------------------------


def _pair(name, value):
    """``k`` or ``(kh, kw)`` as a pair of positive ints."""
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(pair, (tuple, list)) or len(pair) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair)
    ):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return tuple(pair)


def conv_output_size(size: int, window: int, stride: int, padding: str) -> tuple[int, int, int]:
    """``(output size, padding before, padding after)`` along one axis.

    ``"valid"``: no padding, ``(size - window) // stride + 1`` outputs. ``"same"``:
    ``ceil(size / stride)`` outputs, zero padding split as Keras does (the odd one after).
    """
    if padding == "valid":
        out = (size - window) // stride + 1
        if out < 1:
            raise ValueError(f"a window of {window} does not fit an input of size {size} without padding")
        return out, 0, 0
    if padding == "same":
        out = -(-size // stride)
        total = max((out - 1) * stride + window - size, 0)
        return out, total // 2, total - total // 2
    raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")


def _check_images(name, x):
    if x.ndim != 4:
        raise ValueError(f"{name} expects images of shape (N, H, W, C), got shape {tuple(x.shape)}")


def _windows(x, window, strides, out):
    """For each offset ``(i, j)`` of a window, in row-major order, the (N, OH, OW, C) slice of
    ``x`` that the offset reads at every output position."""
    (kh, kw), (sh, sw), (oh, ow) = window, strides, out
    return [
        x[:, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]


def _conv_geometry(x, kernel, strides, padding):
    _check_images("conv2d", x)
    if kernel.ndim != 4 or kernel.shape[2] != x.shape[3]:
        raise ValueError(
            f"kernel of shape {tuple(kernel.shape)} does not fit images of shape {tuple(x.shape)}: "
            "expected (kh, kw, in_channels, filters)"
        )
    strides = _pair("strides", strides)
    rows = conv_output_size(x.shape[1], kernel.shape[0], strides[0], padding)
    cols = conv_output_size(x.shape[2], kernel.shape[1], strides[1], padding)
    return strides, rows, cols


def _padded(x, rows, cols):
    (_, top, bottom), (_, left, right) = rows, cols
    if not (top or bottom or left or right):
        return x
    xp = _namespace(x)
    n, h, w, c = x.shape
    out = xp.zeros((n, h + top + bottom, w + left + right, c), dtype=x.dtype)
    out[:, top : top + h, left : left + w, :] = x
    return out


def _columns(x, kernel, strides, rows, cols):
    """im2col: the (N * OH * OW, kh * kw * C) matrix of every window's pixels, in the order of
    ``kernel.reshape(kh * kw * C, filters)``'s rows."""
    xp = _namespace(x)
    kh, kw, c, _ = kernel.shape
    windows = _windows(_padded(x, rows, cols), (kh, kw), strides, (rows[0], cols[0]))
    stacked = xp.stack(windows, axis=3)  # (N, OH, OW, kh * kw, C)
    return xp.reshape(stacked, (x.shape[0] * rows[0] * cols[0], kh * kw * c))


def conv2d(x, kernel, bias=None, /, *, strides=1, padding="valid", relu=False, impl="auto"):
    """2-D convolution (cross-correlation, as in Keras and PyTorch) of channels-last images.

    ``y[n, p, q, f] = bias[f] + sum_{i, j, c} xpad[n, p*sh + i, q*sw + j, c] * kernel[i, j, c, f]``

    Parameters
    ----------
    x : (N, H, W, C) images; kernel : (kh, kw, C, F); bias : (F,) or None
    strides : int or (sh, sw); padding : "valid" or "same" (zeros; see ``conv_output_size``)
    relu : ``relu(y)`` instead (a convolution with a ReLU after it; a kernel may apply it as it
        writes ``y`` instead of in a pass of its own)

    Returns (N, OH, OW, F), computed as one matrix product of the im2col matrix and the kernel.
    """
    strides, rows, cols = _conv_geometry(x, kernel, strides, padding)
    kernel_fn = kernels.select("conv2d", impl, *((x, kernel) if bias is None else (x, kernel, bias)))
    if kernel_fn is not None:
        return kernel_fn(x, kernel, bias, strides=strides, padding=padding, relu=relu)
    xp = _namespace(x)
    kh, kw, c, f = kernel.shape
    y = _columns(x, kernel, strides, rows, cols) @ xp.reshape(kernel, (kh * kw * c, f))
    if bias is not None:
        y = y + bias
    if relu:
        y = ACTIVATIONS["relu"](y)  # (the parameter hides the function)
    return xp.reshape(y, (x.shape[0], rows[0], cols[0], f))


def conv2d_backward(dy, x, kernel, /, *, strides=1, padding="valid", need_dx=True, relu_output=None, impl="auto"):
    """Gradients of ``conv2d(x, kernel, bias)`` given ``dy = dL/dy``: ``(dx, dkernel, dbias)``.

    ``dkernel = columns(x).T @ dy``, ``dbias = sum(dy)`` over N, OH, OW, and ``dx`` scatters
    ``dy @ kernel.T`` back onto the pixels each window read (col2im); ``dx`` is ``None`` when
    ``need_dx`` is false (a first layer needs no input gradient).

    ``relu_output``: for a convolution followed by a ReLU, the ReLU's output, ``dy`` then being
    the gradient there: it is taken back through the ReLU first (``relu_backward``), which a
    kernel may do as it goes instead of in a pass of its own.
    """
    strides, rows, cols = _conv_geometry(x, kernel, strides, padding)
    if relu_output is not None and tuple(relu_output.shape) != tuple(dy.shape):
        raise ValueError(f"relu_output {tuple(relu_output.shape)} and dy {tuple(dy.shape)} must have the same shape")
    arrays = (dy, x, kernel) if relu_output is None else (dy, x, kernel, relu_output)
    kernel_fn = kernels.select("conv2d_backward", impl, *arrays)
    if kernel_fn is not None:
        return kernel_fn(dy, x, kernel, strides=strides, padding=padding, need_dx=need_dx, relu_output=relu_output)
    if relu_output is not None:
        dy = relu_backward(dy, relu_output, impl=impl)
    xp = _namespace(x)
    kh, kw, c, f = kernel.shape
    n, oh, ow = x.shape[0], rows[0], cols[0]
    if tuple(dy.shape) != (n, oh, ow, f):
        raise ValueError(f"dy has shape {tuple(dy.shape)}; conv2d's output here is {(n, oh, ow, f)}")
    dy2 = xp.reshape(dy, (n * oh * ow, f))
    dkernel = xp.reshape(_columns(x, kernel, strides, rows, cols).T @ dy2, kernel.shape)
    dbias = xp.sum(dy2, axis=0)
    if not need_dx:
        return None, dkernel, dbias
    dcols = xp.reshape(dy2 @ xp.reshape(kernel, (kh * kw * c, f)).T, (n, oh, ow, kh * kw, c))
    (_, top, bottom), (_, left, right) = rows, cols
    h, w = x.shape[1], x.shape[2]
    dpad = xp.zeros((n, h + top + bottom, w + left + right, c), dtype=dy.dtype)
    _scatter_windows(dpad, [dcols[:, :, :, k, :] for k in range(kh * kw)], (kh, kw), strides, (oh, ow))
    return dpad[:, top : top + h, left : left + w, :], dkernel, dbias


def _scatter_windows(target, parts, window, strides, out):
    """``target``'s window slices (as ``_windows`` cuts them) += ``parts``, in place: the
    adjoint of ``_windows`` (overlapping windows add up)."""
    (kh, kw), (sh, sw), (oh, ow) = window, strides, out
    for k, part in enumerate(parts):
        i, j = divmod(k, kw)
        rows, cols = slice(i, i + sh * (oh - 1) + 1, sh), slice(j, j + sw * (ow - 1) + 1, sw)
        target[:, rows, cols, :] = target[:, rows, cols, :] + part


def _pool_geometry(x, pool_size, strides):
    _check_images("pooling", x)
    window = _pair("pool_size", pool_size)
    strides = window if strides is None else _pair("strides", strides)
    out = tuple(conv_output_size(x.shape[1 + a], window[a], strides[a], "valid")[0] for a in (0, 1))
    return window, strides, out


def max_pool2d(x, /, *, pool_size=2, strides=None, impl="auto"):
    """Maximum over each ``pool_size`` window (stride ``strides``, default ``pool_size``; no
    padding) of (N, H, W, C) images; NaN propagates."""
    window, strides, out = _pool_geometry(x, pool_size, strides)
    kernel = kernels.select("max_pool2d", impl, x)
    if kernel is not None:
        return kernel(x, pool_size=window, strides=strides)
    xp = _namespace(x)
    windows = _windows(x, window, strides, out)
    y = windows[0]
    for part in windows[1:]:
        y = xp.maximum(y, part)
    return y


def max_pool2d_backward(dy, x, y, /, *, pool_size=2, strides=None, impl="auto"):
    """Gradient of ``max_pool2d`` given its input ``x`` and output ``y``: each window's ``dy``
    goes to the first of its maxima in row-major order (as PyTorch's kernels pick them);
    windows that overlap add up."""
    window, strides, out = _pool_geometry(x, pool_size, strides)
    kernel = kernels.select("max_pool2d_backward", impl, dy, x, y)
    if kernel is not None:
        return kernel(dy, x, y, pool_size=window, strides=strides)
    xp = _namespace(x)
    if tuple(dy.shape) != tuple(y.shape):
        raise ValueError(f"dy {tuple(dy.shape)} and y {tuple(y.shape)} must have the same shape")
    dx = xp.zeros_like(x)
    zero = xp.zeros_like(dy)
    taken = xp.zeros(dy.shape, dtype=xp.bool)
    parts = []
    for part in _windows(x, window, strides, out):
        hit = (part == y) & ~taken
        parts.append(xp.where(hit, dy, zero))
        taken = taken | hit
    _scatter_windows(dx, parts, window, strides, out)
    return dx


def avg_pool2d(x, /, *, pool_size=2, strides=None, impl="auto"):
    """Mean over each ``pool_size`` window (stride ``strides``, default ``pool_size``; no
    padding) of (N, H, W, C) images."""
    window, strides, out = _pool_geometry(x, pool_size, strides)
    kernel = kernels.select("avg_pool2d", impl, x)
    if kernel is not None:
        return kernel(x, pool_size=window, strides=strides)
    windows = _windows(x, window, strides, out)
    total = windows[0]
    for part in windows[1:]:
        total = total + part
    return total / (window[0] * window[1])


def avg_pool2d_backward(dy, x, /, *, pool_size=2, strides=None, impl="auto"):
    """Gradient of ``avg_pool2d`` given its input ``x``: each window's ``dy`` spread evenly
    over its pixels; pixels no window reads get 0."""
    window, strides, out = _pool_geometry(x, pool_size, strides)
    kernel = kernels.select("avg_pool2d_backward", impl, dy, x)
    if kernel is not None:
        return kernel(dy, x, pool_size=window, strides=strides)
    xp = _namespace(x)
    share = dy / (window[0] * window[1])
    dx = xp.zeros_like(x)
    _scatter_windows(dx, [share] * (window[0] * window[1]), window, strides, out)
    return dx


# --- augmentation ----------------------------------------------------------------------------


def _check_offsets(x, down, right):
    _check_images("shift_images", x)
    xp = _namespace(x)
    for name, offsets in (("down", down), ("right", right)):
        if offsets.ndim != 1 or offsets.shape[0] != x.shape[0] or not xp.isdtype(offsets.dtype, "integral"):
            raise ValueError(
                f"{name} must be a 1-D integer array of {x.shape[0]} offsets (one per image), "
                f"got shape {tuple(offsets.shape)} and dtype {offsets.dtype}"
            )


def shift_images(x, down, right, /, *, impl="auto"):
    """Each image moved by its own whole number of pixels, the pixels it uncovers set to 0.

    ``y[n, i, j, c] = x[n, i - down[n], j - right[n], c]`` where that pixel exists, else 0:
    a positive ``down[n]`` moves image ``n``'s content down, a positive ``right[n]`` to the right;
    an offset as large as the image leaves only zeros.

    Parameters
    ----------
    x : (N, H, W, C) images; down, right : (N,) integer arrays on ``x``'s device

    Returns (N, H, W, C) of ``x``'s dtype: one gather of ``x``'s values (nothing is rounded).
    The map is linear; its adjoint is ``shift_images_backward``.
    """
    _check_offsets(x, down, right)
    kernel = kernels.select("shift_images", impl, x)
    if kernel is not None:
        return kernel(x, down, right)
    xp = _namespace(x)
    n, h, w, c = x.shape
    index = xp.int64
    down, right = xp.astype(down, index), xp.astype(right, index)
    rows = xp.arange(h, dtype=index)[None, :] - down[:, None]  # (N, H): the source row of each output row
    cols = xp.arange(w, dtype=index)[None, :] - right[:, None]  # (N, W)
    inside = (((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :])[..., None]
    rows, cols = xp.clip(rows, 0, h - 1), xp.clip(cols, 0, w - 1)  # any index in range: masked below
    images = xp.arange(n, dtype=index)[:, None, None, None]
    channels = xp.arange(c, dtype=index)[None, None, None, :]
    flat = ((images * h + rows[:, :, None, None]) * w + cols[:, None, :, None]) * c + channels
    gathered = xp.take(xp.reshape(x, (-1,)), xp.reshape(flat, (-1,)), axis=0)
    return xp.where(inside, xp.reshape(gathered, (n, h, w, c)), xp.zeros_like(x))


def shift_images_backward(dy, down, right, /, *, impl="auto"):
    """Gradient of ``shift_images(x, down, right)`` given ``dy = dL/dy``: the adjoint, which is
    the shift back, ``shift_images(dy, -down, -right)`` (a pixel that left the image has no
    gradient; an uncovered one passed none on)."""
    _check_offsets(dy, down, right)
    return shift_images(dy, -down, -right, impl=impl)
