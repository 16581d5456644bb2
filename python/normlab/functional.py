"""Every norm of normlab's family as a function on numpy float32 arrays, mirroring
``torch.nn.functional`` (names, argument order, defaults), and their backward.

For checking an implementation of your own against normlab (as ``normlab layer`` does from
the shell). Inputs are [N, C, *] float32 arrays; a non-contiguous one is copied. The
forward functions update ``running_mean``/``running_var`` in place when training, as
PyTorch does. Each ``*_backward`` returns ``(dx, dweight, dbias)`` (None where there is no
weight/bias).
"""

import math

import numpy as np

from . import _native

__all__ = [
    "batch_norm",
    "batch_norm_backward",
    "group_norm",
    "group_norm_backward",
    "layer_norm",
    "layer_norm_backward",
    "instance_norm",
    "instance_norm_backward",
    "norm",
]


def _f32(a, name):
    if a is None:
        return None
    a = np.asarray(a)
    if a.dtype != np.float32:
        raise TypeError(f"{name} must be a float32 array, got {a.dtype}")
    return np.ascontiguousarray(a)


def _input(x):
    x = _f32(x, "input")
    if x is None or x.ndim < 2:
        raise ValueError(f"input must be [N, C, *], got shape {None if x is None else x.shape}")
    return x


def _values_per_channel(x):
    return x.shape[0] * int(np.prod(x.shape[2:], dtype=np.int64))


def _check_batch(x):
    if _values_per_channel(x) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}"
        )


def _inverse_std(var, eps):
    # 1/sqrt(var + eps) in float64, rounded once: normlab's inverse_std.
    return (1.0 / np.sqrt(var.astype(np.float64) + eps)).astype(np.float32)


def _update_running(running, batch, momentum):
    running[...] = ((1.0 - momentum) * running.astype(np.float64) + momentum * batch).astype(np.float32)


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """``torch.nn.functional.batch_norm`` on numpy arrays."""
    x = _input(input)
    c = x.shape[1]
    w, b = _f32(weight, "weight"), _f32(bias, "bias")
    y = np.empty_like(x)
    if training:
        _check_batch(x)
        mean, var = _native.bn_train_forward(x, y, w, b, eps)
        if running_mean is not None and running_var is not None:
            m = _values_per_channel(x)
            _update_running(running_mean, mean, momentum)
            _update_running(running_var, var.astype(np.float64) * m / (m - 1), momentum)
        return y
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var are needed when training=False")
    inv = _inverse_std(_f32(running_var, "running_var"), eps)
    scale = inv * (w if w is not None else np.ones(c, np.float32))
    shift = b if b is not None else np.zeros(c, np.float32)
    _native.bn_fixed_forward(x, y, running_mean.astype(np.float64), scale, shift)
    return y


def batch_norm_backward(grad_output, input, weight=None, running_mean=None, running_var=None, training=True, eps=1e-5):
    """dx, dweight, dbias of ``batch_norm``: with the batch statistics when ``training`` (they
    are recomputed from ``input``), else with the running ones (constants)."""
    x, dy = _input(input), _f32(grad_output, "grad_output")
    c = x.shape[1]
    w = _f32(weight, "weight")
    gain = w if w is not None else np.ones(c, np.float32)
    dx = np.empty_like(x)
    if training:
        _check_batch(x)
        mean, var = _native.bn_channel_stats(x)
        sum_dy, sum_dy_xhat = _native.bn_train_backward(x, dy, dx, mean, var, gain, eps)
    else:
        inv = _inverse_std(_f32(running_var, "running_var"), eps)
        sum_dy, sum_dy_xhat = _native.bn_fixed_backward(x, dy, dx, running_mean.astype(np.float64), inv, gain)
    if w is None:
        return dx, None, None
    return dx, sum_dy_xhat.astype(np.float32), sum_dy.astype(np.float32)


def _group_view(x, num_groups):
    n, c = x.shape[0], x.shape[1]
    s = int(np.prod(x.shape[2:], dtype=np.int64))
    if num_groups <= 0 or c % num_groups:
        raise ValueError(f"Expected number of channels in input to be divisible by num_groups, but got input of shape {tuple(x.shape)} and num_groups={num_groups}")
    return n, c, s


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.group_norm`` on numpy arrays."""
    x = _input(input)
    n, c, s = _group_view(x, num_groups)
    y = np.empty_like(x)
    _native.gn_train_forward(x, y, n, c, s, num_groups, eps, _f32(weight, "weight"), _f32(bias, "bias"))
    return y


def group_norm_backward(grad_output, input, num_groups, weight=None, eps=1e-5):
    """dx, dweight, dbias of ``group_norm``."""
    x, dy = _input(input), _f32(grad_output, "grad_output")
    n, c, s = _group_view(x, num_groups)
    w = _f32(weight, "weight")
    mean, var = _native.gn_train_forward(x, np.empty_like(x), n, c, s, num_groups, eps, None, None)
    dx = np.empty_like(x)
    dw, db = _native.gn_train_backward(x, dy, dx, n, c, s, num_groups, eps, w, mean, var)
    if w is None:
        return dx, None, None
    return dx, dw.astype(np.float32), db.astype(np.float32)


def _layer_view(x, normalized_shape):
    normalized_shape = tuple([normalized_shape] if isinstance(normalized_shape, int) else normalized_shape)
    k = len(normalized_shape)
    if k == 0 or tuple(x.shape[x.ndim - k:]) != normalized_shape:
        raise ValueError(f"Given normalized_shape={list(normalized_shape)}, expected input with shape [*, {', '.join(map(str, normalized_shape))}], but got input of size {list(x.shape)}")
    c = math.prod(normalized_shape)
    return x.size // c, c, normalized_shape


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.layer_norm`` on numpy arrays (statistics over the trailing
    ``normalized_shape`` dims, elementwise affine)."""
    x = np.ascontiguousarray(_f32(input, "input"))
    n, c, shape = _layer_view(x, normalized_shape)
    w, b = _f32(weight, "weight"), _f32(bias, "bias")
    y = np.empty_like(x)
    _native.gn_train_forward(x, y, n, c, 1, 1, eps, None if w is None else w.ravel(), None if b is None else b.ravel())
    return y


def layer_norm_backward(grad_output, input, normalized_shape, weight=None, eps=1e-5):
    """dx, dweight, dbias of ``layer_norm`` (dweight/dbias shaped like ``normalized_shape``)."""
    x, dy = _f32(input, "input"), _f32(grad_output, "grad_output")
    n, c, shape = _layer_view(x, normalized_shape)
    w = _f32(weight, "weight")
    mean, var = _native.gn_train_forward(x, np.empty_like(x), n, c, 1, 1, eps, None, None)
    dx = np.empty_like(x)
    dw, db = _native.gn_train_backward(x, dy, dx, n, c, 1, 1, eps, None if w is None else w.ravel(), mean, var)
    if w is None:
        return dx, None, None
    return dx, dw.astype(np.float32).reshape(shape), db.astype(np.float32).reshape(shape)


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True, momentum=0.1, eps=1e-5):
    """``torch.nn.functional.instance_norm`` on numpy arrays."""
    x = _input(input)
    n, c, s = _group_view(x, x.shape[1])
    w, b = _f32(weight, "weight"), _f32(bias, "bias")
    y = np.empty_like(x)
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise ValueError("Expected running_mean and running_var to be defined when use_input_stats is false")
        inv = _inverse_std(_f32(running_var, "running_var"), eps)
        scale = inv * (w if w is not None else np.ones(c, np.float32))
        shift = b if b is not None else np.zeros(c, np.float32)
        _native.bn_fixed_forward(x, y, running_mean.astype(np.float64), scale, shift)
        return y
    if s <= 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {tuple(x.shape)}")
    mean, var = _native.gn_train_forward(x, y, n, c, s, c, eps, w, b)
    if running_mean is not None and running_var is not None:
        _update_running(running_mean, mean.reshape(n, c).mean(axis=0), momentum)
        unbiased = var.astype(np.float64).reshape(n, c) * s / (s - 1)
        _update_running(running_var, unbiased.mean(axis=0), momentum)
    return y


def instance_norm_backward(grad_output, input, weight=None, eps=1e-5):
    """dx, dweight, dbias of ``instance_norm`` with the instances' own statistics."""
    x = _input(input)
    return group_norm_backward(grad_output, x, x.shape[1], weight, eps)


def norm(spec, x, dy=None, weight=None, bias=None, training=True, **buffers):
    """Any ``--norm`` spec (``normlab norms`` lists them: bn, gn:8, ln, layernorm, in, brn,
    ghost:4, bn-l1, bn-linf, bn-noisy, ...) through normlab's own layer, as ``normlab layer``
    runs it. ``buffers`` are the layer's state-dict buffers (``running_mean``,
    ``running_var`` or, for Lp BN, ``running_scale``, and ``num_batches_tracked``). Returns a
    dict with ``y``, with ``dy`` also ``dx``, ``dweight``, ``dbias``, and the buffers after the
    call."""
    tensors = {"x": _f32(x, "x"), "dy": _f32(dy, "dy"), "weight": _f32(weight, "weight"), "bias": _f32(bias, "bias")}
    for k, v in buffers.items():
        if k == "num_batches_tracked":
            tensors[k] = None if v is None else int(v)
        else:
            tensors[k] = _f32(v, k)
    return _native.norm_layer(spec, tensors, training)
