"""Drop-in replacements for PyTorch's norm layers that run normlab's kernels.

Each class subclasses its PyTorch counterpart (``normlab.torch.BatchNorm2d`` is an
``nn.BatchNorm2d``): constructor arguments, defaults, state-dict keys, buffers
(``num_batches_tracked`` and ``momentum=None`` included), train/eval behaviour and error
messages are PyTorch's own; only the arithmetic goes through normlab, forward and backward,
inside a ``torch.autograd.Function``.

Memory: contiguous CPU float32 tensors are read and written in place (no copy); a
channels-last or otherwise strided input is copied to contiguous first and the output given
back in the input's memory format. Other devices and dtypes (CUDA, float64, bfloat16) fall
back to PyTorch's own op for that call. Bad input raises PyTorch's own exception (the call is
handed to PyTorch's op, which raises it).

``SyncBatchNorm`` works on CPU through ``torch.distributed`` with the gloo backend (PyTorch's
own raises on CPU tensors). ``convert`` swaps every norm layer of any model for normlab's,
keeping its parameters and buffers; ``recalibrate`` is PreciseBN.
"""

try:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "normlab.torch needs PyTorch (pip install torch); normlab.functional works on numpy without it"
    ) from e

from . import _native
from ._autograd import (
    _native_ok,
    _np,
    _inverse_std,
    _update_running,
    _values_per_channel,
    _BatchNormTrain,
    _Affine,
    _GroupNorm,
    _BatchRenormTrain,
    _LpBatchNormTrain,
    _SyncBatchNorm,
)

# torch has loaded its OpenMP runtime: normlab's kernels run with its team asleep rather than
# spin-waiting on the cores they need (see python/src/omp.rs).
_native._find_openmp()

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GroupNorm",
    "LayerNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "SyncBatchNorm",
    "FrozenBatchNorm2d",
    "BatchRenorm2d",
    "GhostBatchNorm2d",
    "LpBatchNorm2d",
    "batch_norm",
    "group_norm",
    "layer_norm",
    "instance_norm",
    "convert",
    "recalibrate",
]


# ---------------------------------------------------------------------------------------------
# Functional forms (torch.nn.functional's signatures).


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """``torch.nn.functional.batch_norm`` through normlab's kernels (PyTorch's own op for
    tensors normlab does not take, and for input it refuses, so its error is PyTorch's)."""
    dims = input.shape
    channels = (dims[1],) if len(dims) >= 2 else None
    fine = (
        _native_ok(input, running_mean, running_var, weight, bias)
        and channels is not None
        and input.numel() > 0
        and (running_mean is None or running_mean.shape == channels)
        and (running_var is None or running_var.shape == channels)
        and (weight is None or weight.shape == channels)
        and (bias is None or bias.shape == channels)
    )
    if not fine or (training and _values_per_channel(input) <= 1) or (not training and running_mean is None):
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if not training:
        return _Affine.apply(input, weight, bias, running_mean, _inverse_std(running_var, eps))
    return _BatchNormTrain.apply(input, weight, bias, eps, 0, running_mean, running_var, momentum)


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.group_norm`` through normlab's kernels."""
    shape = input.shape
    c = shape[1] if len(shape) >= 2 else -1
    fine = (
        _native_ok(input, weight, bias)
        and len(shape) >= 2
        and input.numel() > 0
        and num_groups > 0
        and c % num_groups == 0
        and (weight is None or weight.shape == (c,))
        and (bias is None or bias.shape == (c,))
    )
    if not fine:
        return F.group_norm(input, num_groups, weight, bias, eps)
    return _GroupNorm.apply(input, weight, bias, (shape[0], c, input.numel() // (shape[0] * c)), num_groups, eps)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.layer_norm`` through normlab's kernels."""
    shape = tuple(normalized_shape)
    k, dims = len(shape), input.shape
    fine = (
        _native_ok(input, weight, bias)
        and k > 0
        and len(dims) >= k
        and dims[len(dims) - k:] == shape
        and input.numel() > 0
        and (weight is None or weight.shape == shape)
        and (bias is None or bias.shape == shape)
    )
    if not fine:
        return F.layer_norm(input, shape, weight, bias, eps)
    c = 1
    for d in shape:
        c *= d
    return _GroupNorm.apply(input, weight, bias, (input.numel() // c, c, 1), 1, eps)


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True, momentum=0.1, eps=1e-5):
    """``torch.nn.functional.instance_norm`` through normlab's kernels."""
    dims = input.shape
    c = dims[1] if len(dims) >= 2 else -1
    fine = (
        _native_ok(input, running_mean, running_var, weight, bias)
        and len(dims) >= 3
        and input.numel() > 0
        and all(t is None or t.shape == (c,) for t in (running_mean, running_var, weight, bias))
    )
    s = input.numel() // (dims[0] * c) if fine else 0
    if not fine or (use_input_stats and s <= 1) or (not use_input_stats and running_mean is None):
        return F.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    if not use_input_stats:
        return _Affine.apply(input, weight, bias, running_mean, _inverse_std(running_var, eps))
    y = _GroupNorm.apply(input, weight, bias, (input.shape[0], c, s), c, eps)
    if running_mean is not None and running_var is not None:
        # PyTorch's instance norm is BN over (1, N·C, ...): per-instance statistics, then the
        # running statistics move toward their mean over the samples (variance unbiased over S).
        with torch.no_grad():
            xc = input.detach().reshape(input.shape[0], c, s).double()
            _update_running(running_mean, xc.mean(dim=2).mean(dim=0), momentum)
            _update_running(running_var, xc.var(dim=2, unbiased=True).mean(dim=0), momentum)
    return y


# ---------------------------------------------------------------------------------------------
# Modules: PyTorch's classes with normlab's arithmetic.


class _BatchNormForward:
    """`_BatchNorm.forward` of PyTorch, with normlab's `batch_norm`."""

    def forward(self, input):
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        return batch_norm(
            input,
            self.running_mean if use_running else None,
            self.running_var if use_running else None,
            self.weight,
            self.bias,
            bn_training,
            factor,
            self.eps,
        )


class BatchNorm1d(_BatchNormForward, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with normlab's kernels."""


class BatchNorm2d(_BatchNormForward, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with normlab's kernels."""


class BatchNorm3d(_BatchNormForward, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` with normlab's kernels."""


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` with normlab's kernels."""

    def forward(self, input):
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` with normlab's kernels."""

    def forward(self, input):
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class _InstanceNormForward:
    def _apply_instance_norm(self, input):
        return instance_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
        )


class InstanceNorm1d(_InstanceNormForward, nn.InstanceNorm1d):
    """``nn.InstanceNorm1d`` with normlab's kernels."""


class InstanceNorm2d(_InstanceNormForward, nn.InstanceNorm2d):
    """``nn.InstanceNorm2d`` with normlab's kernels."""


class InstanceNorm3d(_InstanceNormForward, nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` with normlab's kernels."""


class SyncBatchNorm(nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` that also runs on CPU: in training, with a process group of more
    than one process (``torch.distributed`` initialized, e.g. gloo), statistics over the
    global batch; otherwise ``BatchNorm``. Works for any [N, C, *] input."""

    def forward(self, input):
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_running else None
        running_var = self.running_var if use_running else None
        group = None
        if bn_training and self.training and dist.is_available() and dist.is_initialized():
            group = self.process_group or dist.group.WORLD
            if dist.get_world_size(group) <= 1:
                group = None
        if group is None or not _native_ok(input, self.weight, self.bias):
            if group is not None:
                raise ValueError(
                    f"normlab SyncBatchNorm synchronizes CPU float32 tensors; got {input.dtype} on {input.device}"
                )
            return batch_norm(input, running_mean, running_var, self.weight, self.bias, bn_training, factor, self.eps)
        y, mean, var, count = _SyncBatchNorm.apply(input, self.weight, self.bias, self.eps, group)
        if running_mean is not None and running_var is not None:
            m = float(count)
            _update_running(running_mean, mean, factor)
            _update_running(running_var, var.double() * m / (m - 1), factor)
        return y


class FrozenBatchNorm2d(nn.Module):
    """torchvision's ``FrozenBatchNorm2d``: BatchNorm2d whose statistics and affine are fixed
    buffers (no parameters); y = (x − running_mean)/sqrt(running_var + eps)·weight + bias."""

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def forward(self, x):
        if not _native_ok(x) or x.dim() < 2 or x.numel() == 0 or x.shape[1] != self.weight.shape[0]:
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            shift = self.bias - self.running_mean * scale
            shape = (1, -1) + (1,) * (x.dim() - 2)
            return x * scale.reshape(shape) + shift.reshape(shape)
        return _Affine.apply(x, self.weight, self.bias, self.running_mean, _inverse_std(self.running_var, self.eps))

    def __repr__(self):
        return f"{self.__class__.__name__}({self.weight.shape[0]}, eps={self.eps})"


class GhostBatchNorm2d(nn.BatchNorm2d):
    """Ghost BatchNorm (Hoffer et al.): in training, BN statistics over virtual batches of
    ``virtual_batch`` samples (it must divide the batch); the running statistics move toward
    the virtual batches' average (Keras' Ghost BN). Eval as BatchNorm2d. normlab's ``ghost:V``."""

    def __init__(self, num_features, virtual_batch, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if virtual_batch < 1:
            raise ValueError(f"virtual_batch must be >= 1, got {virtual_batch}")
        self.virtual_batch = virtual_batch

    def extra_repr(self):
        return super().extra_repr() + f", virtual_batch={self.virtual_batch}"

    def forward(self, input):
        self._check_input_dim(input)
        if not self.training and self.track_running_stats:
            return batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        if not _native_ok(input, self.weight, self.bias):
            raise TypeError(f"GhostBatchNorm2d runs on CPU float32 tensors; got {input.dtype} on {input.device}")
        n, v = input.shape[0], self.virtual_batch
        if n % v:
            raise ValueError(f"ghost BN virtual batch {v} does not divide the batch of {n}")
        if v * _values_per_channel(input) // n <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
        running = self.training and self.track_running_stats
        f = 0.0
        if running:
            self.num_batches_tracked.add_(1)
            f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        rm, rv = (self.running_mean, self.running_var) if running else (None, None)
        y = _BatchNormTrain.apply(input, self.weight, self.bias, self.eps, v, rm, rv, f)
        return y


class BatchRenorm2d(nn.BatchNorm2d):
    """Batch Renormalization (Ioffe 2017): in training y = γ·(x̂·r + d) + β with
    r = clip(σ_B/σ, 1/rmax, rmax), d = clip((μ_B − μ)/σ, ±dmax) from the running statistics, r
    and d held constant in backward; rmax ramps from 1 and dmax from 0 over ``warmup`` steps
    (normlab's ``brn``). Eval as BatchNorm2d."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, rmax=3.0, dmax=5.0, warmup=1000, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, True, device, dtype)
        self.rmax, self.dmax, self.warmup = float(rmax), float(dmax), int(warmup)

    def extra_repr(self):
        return super().extra_repr() + f", rmax={self.rmax}, dmax={self.dmax}, warmup={self.warmup}"

    def _limits(self):
        t = float(self.num_batches_tracked)
        w = float(max(self.warmup, 1))

        def ramp(end):
            return min(max((t - w / 8.0) / (end - w / 8.0), 0.0), 1.0)

        return 1.0 + (self.rmax - 1.0) * ramp(w), self.dmax * ramp(w * 5.0 / 8.0)

    def forward(self, input):
        self._check_input_dim(input)
        if not self.training:
            return batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        if not _native_ok(input, self.weight, self.bias):
            raise TypeError(f"BatchRenorm2d runs on CPU float32 tensors; got {input.dtype} on {input.device}")
        if _values_per_channel(input) <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
        mean, var = _native.bn_channel_stats(_np(input.contiguous()))
        rmax, dmax = self._limits()
        sigma = torch.sqrt(self.running_var.double() + self.eps)
        sigma_b = torch.sqrt(torch.from_numpy(var).double() + self.eps)
        r = (sigma_b / sigma).clamp(1.0 / rmax, rmax).float()
        d = ((torch.from_numpy(mean) - self.running_mean.double()) / sigma).clamp(-dmax, dmax).float()
        y = _BatchRenormTrain.apply(input, self.weight, self.bias, mean, var, r, d, self.eps)
        self.num_batches_tracked.add_(1)
        f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        m = _values_per_channel(input)
        _update_running(self.running_mean, torch.from_numpy(mean), f)
        _update_running(self.running_var, torch.from_numpy(var).double() * m / (m - 1), f)
        return y


def _rename_buffer(old, new):
    def hook(module, state_dict, prefix, local_metadata):
        if prefix + old in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)
        return state_dict

    return hook


def _rename_key(old, new):
    def hook(state_dict, prefix, *args):
        if prefix + old in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)

    return hook


class LpBatchNorm2d(nn.BatchNorm2d):
    """Lp BatchNorm (Santurkar et al. 2018): centre by the batch mean, divide by the mean L1
    norm (``p=1``) or the L∞ norm (``p=float('inf')``) of the centred values + eps; the
    ``running_var`` attribute keeps the running scale, saved as ``running_scale`` as in
    normlab's checkpoints (normlab's ``bn-l1``/``bn-linf``)."""

    def __init__(self, num_features, p=1, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        # normlab's checkpoints (and the engine's layer) call the running scale running_scale.
        self._register_state_dict_hook(_rename_buffer("running_var", "running_scale"))
        self._register_load_state_dict_pre_hook(_rename_key("running_scale", "running_var"))
        if p == 1:
            self.p = "1"
        elif p == float("inf") or p == "inf":
            self.p = "inf"
        else:
            raise ValueError(f"p must be 1 or float('inf'), got {p}")

    def extra_repr(self):
        return super().extra_repr() + f", p={self.p}"

    def forward(self, input):
        self._check_input_dim(input)
        if not _native_ok(input, self.weight, self.bias):
            raise TypeError(f"LpBatchNorm2d runs on CPU float32 tensors; got {input.dtype} on {input.device}")
        if not self.training and self.track_running_stats:
            inv = (1.0 / (self.running_var.double() + self.eps)).float()
            return _Affine.apply(input, self.weight, self.bias, self.running_mean, inv)
        if _values_per_channel(input) <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
        y, mean, scale = _LpBatchNormTrain.apply(input, self.weight, self.bias, self.p, self.eps)
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            _update_running(self.running_mean, mean, f)
            _update_running(self.running_var, scale.double(), f)
        return y


# ---------------------------------------------------------------------------------------------
# Whole models.

_OURS = (
    BatchNorm1d, BatchNorm2d, BatchNorm3d, GroupNorm, LayerNorm, InstanceNorm1d, InstanceNorm2d,
    InstanceNorm3d, SyncBatchNorm, FrozenBatchNorm2d, GhostBatchNorm2d, BatchRenorm2d, LpBatchNorm2d,
)


def _swap(old, sync, process_group):
    """normlab's module for PyTorch's `old`, built with old's settings and holding old's very
    parameter and buffer tensors (an optimizer built on the model keeps working), or None."""
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    if isinstance(old, _OURS) and not (sync and isinstance(old, bn) and not isinstance(old, SyncBatchNorm)):
        return None
    kind = type(old)
    if isinstance(old, bn) and (sync or kind is nn.SyncBatchNorm or isinstance(old, SyncBatchNorm)):
        group = process_group if sync else old.process_group
        new = SyncBatchNorm(old.num_features, old.eps, old.momentum, old.affine, old.track_running_stats, group)
    elif kind in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, BatchNorm1d, BatchNorm2d, BatchNorm3d):
        cls = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}[
            1 if isinstance(old, nn.BatchNorm1d) else 2 if isinstance(old, nn.BatchNorm2d) else 3
        ]
        new = cls(old.num_features, old.eps, old.momentum, old.affine, old.track_running_stats)
    elif kind in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
        cls = {nn.InstanceNorm1d: InstanceNorm1d, nn.InstanceNorm2d: InstanceNorm2d, nn.InstanceNorm3d: InstanceNorm3d}[kind]
        new = cls(old.num_features, old.eps, old.momentum, old.affine, old.track_running_stats)
    elif kind is nn.GroupNorm:
        new = GroupNorm(old.num_groups, old.num_channels, old.eps, old.affine)
    elif kind is nn.LayerNorm:
        new = LayerNorm(old.normalized_shape, old.eps, old.elementwise_affine, bias=old.bias is not None)
    else:
        return None
    for name in list(new._parameters):
        new._parameters[name] = old._parameters.get(name)
    for name in list(new._buffers):
        new._buffers[name] = old._buffers.get(name)
    new.train(old.training)
    return new


def convert(module, sync=False, process_group=None):
    """Swaps every PyTorch norm layer in ``module`` (BatchNorm1d/2d/3d, SyncBatchNorm, GroupNorm,
    LayerNorm, InstanceNorm1d/2d/3d) for normlab's, in place, keeping its parameters and
    buffers (the same tensors); with ``sync=True`` every BatchNorm becomes a ``SyncBatchNorm``
    over ``process_group`` (like ``nn.SyncBatchNorm.convert_sync_batchnorm``). Returns the
    module (a new one when ``module`` itself is a norm layer)."""
    top = _swap(module, sync, process_group)
    if top is not None:
        return top
    for name, child in list(module.named_children()):
        new = _swap(child, sync, process_group)
        if new is not None:
            setattr(module, name, new)
        else:
            convert(child, sync, process_group)
    return module


def recalibrate(model, loader, batches=None):
    """PreciseBN (``normlab recalibrate``, torch.optim.swa_utils.update_bn): resets the running
    statistics of every BatchNorm with running statistics (normlab's or PyTorch's) and sets
    them to the equal-weight average of the batch statistics of ``batches`` batches of
    ``loader`` (all when None), with the rest of the model in eval mode (no dropout). Each
    item of ``loader`` is an input tensor or a tuple/list whose first element is one.
    Returns the number of batches used."""
    bns = [
        m for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]
    if not bns:
        raise ValueError("the model has no BatchNorm layer with running statistics: nothing to recalibrate")
    if batches is not None and batches < 1:
        raise ValueError(f"batches must be at least 1, got {batches}")
    was_training = model.training
    momenta = [m.momentum for m in bns]
    used = 0
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for item in loader:
                if batches is not None and used >= batches:
                    break
                x = item[0] if isinstance(item, (tuple, list)) else item
                model(x)
                used += 1
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)
    if used == 0:
        raise ValueError("the loader gave no batch")
    return used
