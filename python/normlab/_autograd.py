"""The autograd functions of ``normlab.torch``: normlab's kernels (``normlab._native``) on the
tensors' own memory, forward and backward, and the plumbing between tensors and arrays.
Imported by ``normlab.torch``; not an API of its own. The backward passes are not themselves
differentiable (``once_differentiable``): a double backward through them raises instead of
silently giving zero second derivatives."""

import numpy as np
import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from . import _native

# ---------------------------------------------------------------------------------------------
# Plumbing: which tensors normlab takes, and their memory as numpy arrays.


_F32, _STRIDED = torch.float32, torch.strided


def _native_ok(*tensors):
    """Whether normlab's kernels take these tensors (CPU float32; None is fine). A plain loop
    over properties: it runs on every call of every module (a generator over `t.device.type`
    cost 3 µs of a 50 µs call)."""
    for t in tensors:
        if t is not None and not (t.is_cpu and t.dtype is _F32 and t.layout is _STRIDED):
            return False
    return True


def _np(t):
    """The tensor's own memory as a numpy array (t must be contiguous)."""
    return t.detach().numpy()


def _vec(t):
    return None if t is None else t.detach().contiguous().numpy()


def _memory_format(x):
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _back_to(t, fmt):
    return t if fmt == torch.contiguous_format else t.contiguous(memory_format=fmt)


def _inverse_std(var, eps):
    """1/sqrt(var + eps) computed in float64, rounded once to float32 (normlab's inverse_std)."""
    return (1.0 / torch.sqrt(var.detach().double() + eps)).float()


def _update_running(running, batch, momentum):
    """running = (1 - momentum)·running + momentum·batch, computed in float64 as PyTorch's CPU
    kernel does."""
    with torch.no_grad():
        running.copy_((1.0 - momentum) * running.double() + momentum * batch.double())


def _values_per_channel(x):
    n = x.shape[0]
    for d in x.shape[2:]:
        n *= d
    return n


# ---------------------------------------------------------------------------------------------
# Autograd functions over the kernels.


class _BatchNormTrain(torch.autograd.Function):
    """Batch statistics (per virtual batch for Ghost BN): y = (x − μ_B)/sqrt(σ²_B + eps)·γ + β;
    the running statistics, when given, are updated in the same native call."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, virtual_batch, running_mean, running_var, momentum):
        fmt = _memory_format(x)
        xc = x.contiguous()
        y = torch.empty_like(xc)
        running = (None, None) if running_mean is None or running_var is None else (_np(running_mean), _np(running_var))
        mean, var = _native.bn_train_forward(
            _np(xc), _np(y), _vec(weight), _vec(bias), eps, virtual_batch, running[0], running[1], momentum
        )
        ctx.save_for_backward(xc, weight)
        ctx.stats, ctx.eps, ctx.virtual_batch, ctx.fmt = (mean, var), eps, virtual_batch, fmt
        return _back_to(y, fmt)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        xc, weight = ctx.saved_tensors
        dyc = dy.contiguous()
        dx = torch.empty_like(xc)
        gain = _vec(weight) if weight is not None else np.ones(xc.shape[1], np.float32)
        mean, var = ctx.stats
        sum_dy, sum_dy_xhat = _native.bn_train_backward(
            _np(xc), _np(dyc), _np(dx), mean, var, gain, ctx.eps, ctx.virtual_batch
        )
        dw = torch.from_numpy(sum_dy_xhat).float() if ctx.needs_input_grad[1] else None
        db = torch.from_numpy(sum_dy).float() if ctx.needs_input_grad[2] else None
        return (_back_to(dx, ctx.fmt) if ctx.needs_input_grad[0] else None), dw, db, None, None, None, None, None


class _Affine(torch.autograd.Function):
    """Fixed statistics: y = (x − mean)·inv·γ + β (eval mode, FrozenBatchNorm2d); the
    statistics are constants, as in PyTorch's eval-mode autograd."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, inv):
        fmt = _memory_format(x)
        xc = x.contiguous()
        c = xc.shape[1]
        gain = weight.detach() if weight is not None else torch.ones(c)
        scale = (inv * gain).contiguous()
        shift = bias.detach().contiguous() if bias is not None else torch.zeros(c)
        y = torch.empty_like(xc)
        mean64 = mean.detach().double().contiguous()
        _native.bn_fixed_forward(_np(xc), _np(y), mean64.numpy(), _np(scale), _np(shift))
        ctx.save_for_backward(xc, gain.contiguous(), mean64, inv.contiguous())
        ctx.fmt = fmt
        return _back_to(y, fmt)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        xc, gain, mean64, inv = ctx.saved_tensors
        dyc = dy.contiguous()
        dx = torch.empty_like(xc) if ctx.needs_input_grad[0] else None
        sum_dy, sum_dy_xhat = _native.bn_fixed_backward(
            _np(xc), _np(dyc), None if dx is None else _np(dx), mean64.numpy(), _np(inv), _np(gain)
        )
        dw = torch.from_numpy(sum_dy_xhat).float() if ctx.needs_input_grad[1] else None
        db = torch.from_numpy(sum_dy).float() if ctx.needs_input_grad[2] else None
        return (None if dx is None else _back_to(dx, ctx.fmt)), dw, db, None, None


class _GroupNorm(torch.autograd.Function):
    """Statistics per (sample, group) of an (N, C, S) view: GroupNorm, InstanceNorm (G = C),
    nn.LayerNorm ((N, numel(normalized_shape), 1), G = 1)."""

    @staticmethod
    def forward(ctx, x, weight, bias, view, groups, eps):
        fmt = _memory_format(x)
        xc = x.contiguous()
        y = torch.empty_like(xc)
        n, c, s = view
        w = None if weight is None else weight.detach().reshape(-1)
        b = None if bias is None else bias.detach().reshape(-1)
        mean, var = _native.gn_train_forward(_np(xc), _np(y), n, c, s, groups, eps, _vec(w), _vec(b))
        ctx.save_for_backward(xc, weight)
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.stats, ctx.view, ctx.groups, ctx.eps, ctx.fmt = (mean, var), view, groups, eps, fmt
        return _back_to(y, fmt)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        xc, weight = ctx.saved_tensors
        dyc = dy.contiguous()
        dx = torch.empty_like(xc)
        n, c, s = ctx.view
        mean, var = ctx.stats
        w = None if weight is None else _vec(weight.reshape(-1))
        # dγ and dβ rounded by the kernel straight into new float32 tensors.
        dweight = torch.empty(weight.shape) if ctx.needs_input_grad[1] else None
        dbias = torch.empty(ctx.bias_shape) if ctx.needs_input_grad[2] else None
        _native.gn_train_backward(
            _np(xc), _np(dyc), _np(dx), n, c, s, ctx.groups, ctx.eps, w, mean, var,
            None if dweight is None else _np(dweight).reshape(-1),
            None if dbias is None else _np(dbias).reshape(-1),
        )
        return (_back_to(dx, ctx.fmt) if ctx.needs_input_grad[0] else None), dweight, dbias, None, None, None


class _BatchRenormTrain(torch.autograd.Function):
    """Batch Renorm: y = γ·(x̂·r + d) + β with the batch's x̂, r and d constants."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, r, d, eps):
        fmt = _memory_format(x)
        xc = x.contiguous()
        c = xc.shape[1]
        gain = weight.detach() if weight is not None else torch.ones(c)
        beta = bias.detach() if bias is not None else torch.zeros(c)
        inv = _inverse_std(torch.from_numpy(var), eps) * r
        scale = (inv * gain).contiguous()
        shift = (beta + gain * d).contiguous()
        y = torch.empty_like(xc)
        _native.bn_fixed_forward(_np(xc), _np(y), mean, _np(scale), _np(shift))
        ctx.save_for_backward(xc, (gain * r).contiguous(), r, d)
        ctx.stats, ctx.eps, ctx.fmt = (mean, var), eps, fmt
        return _back_to(y, fmt)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        xc, gain, r, d = ctx.saved_tensors
        dyc = dy.contiguous()
        dx = torch.empty_like(xc)
        mean, var = ctx.stats
        sum_dy, sum_dy_xhat = _native.bn_train_backward(_np(xc), _np(dyc), _np(dx), mean, var, _np(gain), ctx.eps)
        sd, sdx = torch.from_numpy(sum_dy), torch.from_numpy(sum_dy_xhat)
        dw = (sdx * r.double() + sd * d.double()).float() if ctx.needs_input_grad[1] else None
        db = sd.float() if ctx.needs_input_grad[2] else None
        return (_back_to(dx, ctx.fmt) if ctx.needs_input_grad[0] else None), dw, db, None, None, None, None, None


class _LpBatchNormTrain(torch.autograd.Function):
    """Lp BN: y = (x − μ_B)/(scale_B + eps)·γ + β, scale_B the mean |x − μ_B| (p = 1) or the
    largest (p = inf)."""

    @staticmethod
    def forward(ctx, x, weight, bias, p, eps):
        fmt = _memory_format(x)
        xc = x.contiguous()
        y = torch.empty_like(xc)
        mean, scale, extra = _native.lp_train_forward(_np(xc), _np(y), p, eps, _vec(weight), _vec(bias))
        ctx.save_for_backward(xc, weight)
        ctx.stats, ctx.p, ctx.eps, ctx.fmt = (mean, scale, extra), p, eps, fmt
        mean_t, scale_t = torch.from_numpy(mean), torch.from_numpy(scale)
        ctx.mark_non_differentiable(mean_t, scale_t)
        return _back_to(y, fmt), mean_t, scale_t

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dmean, _dscale):
        xc, weight = ctx.saved_tensors
        dyc = dy.contiguous()
        dx = torch.empty_like(xc)
        mean, scale, extra = ctx.stats
        sum_dy, sum_dy_u = _native.lp_train_backward(
            _np(xc), _np(dyc), _np(dx), ctx.p, ctx.eps, _vec(weight), mean, scale, extra
        )
        dw = torch.from_numpy(sum_dy_u).float() if ctx.needs_input_grad[1] else None
        db = torch.from_numpy(sum_dy).float() if ctx.needs_input_grad[2] else None
        return (_back_to(dx, ctx.fmt) if ctx.needs_input_grad[0] else None), dw, db, None, None


def _all_reduce(t, group):
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


class _SyncBatchNorm(torch.autograd.Function):
    """SyncBN over a process group: each process's per-channel mean and variance combined
    exactly (Chan et al.: μ = Σ n_k·μ_k / N, N·σ² = Σ n_k·(σ_k² + (μ_k − μ)²), two float64
    all-reductions of C values, no extra pass over x); backward all-reduces Σdy and Σdy·x̂ for
    dx over the global batch, while γ and β get this process's own share (DDP sums them)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group):
        fmt = _memory_format(x)
        xc = x.contiguous()
        c = xc.shape[1]
        local = float(_values_per_channel(xc))
        mean_k, var_k = _native.bn_channel_stats(_np(xc))
        mean_k, var_k = torch.from_numpy(mean_k), torch.from_numpy(var_k).double()
        first = _all_reduce(torch.cat([torch.full((1,), local, dtype=torch.float64), local * mean_k]), group)
        count = float(first[0])
        if count <= 1.0:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got {count:.0f} over all processes "
                f"(input size {tuple(x.shape)} here)"
            )
        mean = first[1:] / count
        second = _all_reduce(local * (var_k + (mean_k - mean) ** 2), group)
        var = (second / count).float()
        gain = weight.detach() if weight is not None else torch.ones(c)
        beta = bias.detach() if bias is not None else torch.zeros(c)
        inv = _inverse_std(var, eps)
        y = torch.empty_like(xc)
        _native.bn_fixed_forward(_np(xc), _np(y), mean.numpy(), _np((inv * gain).contiguous()), _np(beta.contiguous()))
        ctx.save_for_backward(xc, gain.contiguous())
        ctx.stats, ctx.eps, ctx.count, ctx.group, ctx.fmt = (mean.numpy(), var.numpy(), inv), eps, count, group, fmt
        ctx.mark_non_differentiable(mean, var)
        return _back_to(y, fmt), mean, var, torch.tensor(count)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dmean, _dvar, _dcount):
        xc, gain = ctx.saved_tensors
        dyc = dy.contiguous()
        mean, var, inv = ctx.stats
        sum_dy, sum_dy_xhat = _native.bn_fixed_backward(_np(xc), _np(dyc), None, mean, _np(inv.contiguous()), _np(gain))
        dw = torch.from_numpy(sum_dy_xhat).float() if ctx.needs_input_grad[1] else None
        db = torch.from_numpy(sum_dy).float() if ctx.needs_input_grad[2] else None
        sums = _all_reduce(torch.from_numpy(np.concatenate([sum_dy, sum_dy_xhat])), ctx.group)
        c = xc.shape[1]
        dx = torch.empty_like(xc)
        _native.bn_sync_dx(
            _np(xc), _np(dyc), _np(dx), mean, var, _np(gain), ctx.eps,
            sums[:c].numpy(), sums[c:].numpy(), ctx.count,
        )
        return (_back_to(dx, ctx.fmt) if ctx.needs_input_grad[0] else None), dw, db, None, None


