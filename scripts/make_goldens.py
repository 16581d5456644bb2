#!/usr/bin/env python3
"""Generate PyTorch golden files for normlab's tests.

Run from the repository root:  .venv-torch/bin/python scripts/make_goldens.py [NAME...]
Writes tests/goldens/*.safetensors (all, or the named ones: batch_norm, seed_cnn_steps,
norm_family, eval_backward, lstm, conv, vgg_steps, vit). Never edit the outputs by hand; rerun this script.
"""
import json
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fmnist_torch import seed_cnn  # noqa: E402
from pytorch_weights import vgg  # noqa: E402
from vit_torch import Vit, VitBlock  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "goldens")
torch.set_num_threads(1)


def batch_norm_cases():
    """BatchNorm1d/2d: a train step (forward, backward, buffer update), then an eval forward."""
    shapes2d = [(4, 3, 5, 5), (2, 8, 1, 1), (16, 6, 3, 3), (3, 5, 7, 4), (17, 2, 8, 8)]  # 8x8, N > 16: streaming kernels
    shapes1d = [(8, 10), (2, 4), (6, 3, 5)]
    configs = [
        dict(name="default", eps=1e-5, momentum=0.1, affine=True, track=True),
        dict(name="momentum_none", eps=1e-5, momentum=None, affine=True, track=True),
        dict(name="no_affine", eps=1e-5, momentum=0.1, affine=False, track=True),
        dict(name="no_track", eps=1e-5, momentum=0.1, affine=True, track=False),
        dict(name="keras_like", eps=1e-3, momentum=0.01, affine=True, track=True),
    ]
    tensors, cases = {}, []
    g = torch.Generator().manual_seed(1234)
    for shape in shapes2d + shapes1d:
        for cfg in configs:
            i = len(cases)
            p = f"case{i}."
            dims = 2 if len(shape) == 4 else 1
            cls = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
            c = shape[1]
            bn = cls(c, eps=cfg["eps"], momentum=cfg["momentum"], affine=cfg["affine"],
                     track_running_stats=cfg["track"])
            x = (torch.randn(shape, generator=g) * 2.0 + 0.5).requires_grad_(True)
            dy = torch.randn(shape, generator=g)
            x_eval = torch.randn(shape, generator=g) * 1.5 - 0.3
            with torch.no_grad():
                if cfg["affine"]:
                    bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    bn.bias.copy_(torch.randn(c, generator=g))
                    tensors[p + "weight"] = bn.weight.detach().clone()
                    tensors[p + "bias"] = bn.bias.detach().clone()
                if cfg["track"]:
                    bn.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                    bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                    bn.num_batches_tracked.fill_(3)
                    tensors[p + "running_mean_in"] = bn.running_mean.clone()
                    tensors[p + "running_var_in"] = bn.running_var.clone()
            bn.train()
            y = bn(x)
            y.backward(dy)
            tensors[p + "x"] = x.detach().clone()
            tensors[p + "dy"] = dy
            tensors[p + "y_train"] = y.detach().clone()
            tensors[p + "dx"] = x.grad.clone()
            if cfg["affine"]:
                tensors[p + "dweight"] = bn.weight.grad.clone()
                tensors[p + "dbias"] = bn.bias.grad.clone()
            if cfg["track"]:
                tensors[p + "running_mean_out"] = bn.running_mean.clone()
                tensors[p + "running_var_out"] = bn.running_var.clone()
                tensors[p + "num_batches_tracked_out"] = bn.num_batches_tracked.clone()
            bn.eval()
            with torch.no_grad():
                tensors[p + "x_eval"] = x_eval
                tensors[p + "y_eval"] = bn(x_eval)
            cases.append(dict(cfg, dims=dims, shape=list(shape)))
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, os.path.join(OUT, "batch_norm.safetensors"), metadata={"cases": json.dumps(cases)})
    print(f"batch_norm.safetensors: {len(cases)} cases")


def seed_cnn_steps():
    """Three full training steps of seed-cnn with SGD (nesterov, weight decay), Adam (L2) and AdamW."""
    torch.manual_seed(7)
    init = seed_cnn()
    tensors = {f"init.{k}": v.clone() for k, v in init.state_dict().items()}
    steps, batch = 3, 8
    for s in range(steps):
        tensors[f"x{s}"] = torch.randn(batch, 1, 28, 28)
        tensors[f"y{s}"] = torch.randint(0, 10, (batch,), dtype=torch.int64)
    runs = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.05, nesterov=True),
        "adam": lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=0.5),
        "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.5),
    }
    for name, make in runs.items():
        model = seed_cnn()
        model.load_state_dict(init.state_dict())
        model.train()
        opt = make(model.parameters())
        losses = []
        for s in range(steps):
            opt.zero_grad()
            loss = F.cross_entropy(model(tensors[f"x{s}"]), tensors[f"y{s}"])
            loss.backward()
            opt.step()
            losses.append(loss.item())
        tensors[f"{name}.losses"] = torch.tensor(losses, dtype=torch.float64)
        for k, v in model.state_dict().items():
            tensors[f"{name}.{k}"] = v.clone()
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "seed_cnn_steps.safetensors"))
    print("seed_cnn_steps.safetensors written")


def _data(shape, g, offset=0.0, spread=1.0):
    """float32 inputs, returned as float64 so the reference is computed exactly on them."""
    return (torch.randn(shape, generator=g, dtype=torch.float64) * spread + offset).float().double()


def _rand_affine(module, g):
    with torch.no_grad():
        if getattr(module, "weight", None) is not None:
            module.weight.copy_((torch.rand(module.weight.shape, generator=g) + 0.5).float().double())
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(torch.randn(module.bias.shape, generator=g).float().double())


def renorm_reference(x, gamma, beta, rm, rv, t, eps, momentum, rmax, dmax, warmup):
    """Batch Renormalization (Ioffe 2017, Keras' renorm): r and d are constants for backward."""
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    w = float(warmup)
    ramp = lambda end: min(max((t - w / 8) / (end - w / 8), 0.0), 1.0)
    rmax_t, dmax_t = 1 + (rmax - 1) * ramp(w), dmax * ramp(w * 5 / 8)
    mu = x.mean(dims)
    var = x.var(dims, unbiased=False)
    sigma_b = (var + eps).sqrt()
    sigma = (rv + eps).sqrt()
    r = (sigma_b / sigma).clamp(1 / rmax_t, rmax_t).detach()
    d = ((mu - rm) / sigma).clamp(-dmax_t, dmax_t).detach()
    xhat = (x - mu.view(shape)) / sigma_b.view(shape)
    y = gamma.view(shape) * (xhat * r.view(shape) + d.view(shape)) + beta.view(shape)
    m = x.numel() / x.shape[1]
    new_rm = (1 - momentum) * rm + momentum * mu.detach()
    new_rv = (1 - momentum) * rv + momentum * var.detach() * m / (m - 1)
    return y, new_rm, new_rv


def lp_reference(x, gamma, beta, rm, rs, eps, momentum, p):
    """Lp-norm BN (Santurkar et al.): centre by the batch mean, divide by mean |z| or max |z|."""
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    mu = x.mean(dims, keepdim=True)
    z = x - mu
    if p == "l1":
        scale = z.abs().mean(dims, keepdim=True)
    else:
        scale = z.abs().amax(dim=dims, keepdim=True)
    y = gamma.view(shape) * z / (scale + eps) + beta.view(shape)
    new_rm = (1 - momentum) * rm + momentum * mu.detach().flatten()
    new_rs = (1 - momentum) * rs + momentum * scale.detach().flatten()
    return y, new_rm, new_rs


def norm_family_cases():
    """Every spec PyTorch has (and transcriptions of Batch Renorm and Lp BN): a train step
    through `normlab layer`'s tensor names, then an eval forward with the updated buffers."""
    g = torch.Generator().manual_seed(99)
    tensors, cases = {}, []

    def module_case(spec, make, shape, offset=0.0, spread=1.0, eval_after=True, constant_channel=False):
        i = len(cases)
        p = f"case{i}."
        module = make(shape).double()
        _rand_affine(module, g)
        x = _data(shape, g, offset, spread)
        if constant_channel:
            x[:, 0] = offset + 0.5
        x.requires_grad_(True)
        dy = _data(shape, g)
        inputs = {"x": x.detach(), "dy": dy}
        for k in ("weight", "bias"):
            if getattr(module, k, None) is not None:
                inputs[k] = getattr(module, k).detach().clone()
        if getattr(module, "running_mean", None) is not None:
            with torch.no_grad():
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=g).float().double() * 0.1)
                module.running_var.copy_((torch.rand(module.running_var.shape, generator=g) + 0.5).float().double())
            inputs["running_mean"], inputs["running_var"] = module.running_mean.clone(), module.running_var.clone()
        module.train()
        y = module(x)
        y.backward(dy)
        out = {"y": y.detach(), "dx": x.grad}
        for k in ("weight", "bias"):
            if k in inputs:
                out["d" + k] = getattr(module, k).grad
        if "running_mean" in inputs:
            out["running_mean"], out["running_var"] = module.running_mean, module.running_var
        for k, v in inputs.items():
            tensors[p + "in." + k] = v.float()
        for k, v in out.items():
            tensors[p + "out." + k] = v.float()
        if eval_after:
            module.eval()
            xe = _data(shape, g, offset, spread)
            with torch.no_grad():
                tensors[p + "eval.x"] = xe.float()
                tensors[p + "eval.y"] = module(xe).float()
        cases.append(dict(spec=spec, shape=list(shape), eval=eval_after))

    GN = lambda G, affine=True: (lambda s: nn.GroupNorm(G, s[1], affine=affine))
    LNE = lambda affine=True: (lambda s: nn.LayerNorm(list(s[1:]), elementwise_affine=affine))
    IN2 = lambda **kw: (lambda s: nn.InstanceNorm2d(s[1], **kw))
    IN1 = lambda **kw: (lambda s: nn.InstanceNorm1d(s[1], **kw))
    BN2 = lambda **kw: (lambda s: nn.BatchNorm2d(s[1], **kw))
    BN1 = lambda **kw: (lambda s: nn.BatchNorm1d(s[1], **kw))
    for G in (1, 2, 3, 6):
        module_case(f"gn:{G}", GN(G), (4, 6, 5, 5))
    module_case("gn:4", GN(4), (1, 12, 3, 3))
    module_case("gn:3", GN(3), (3, 6, 1, 1))
    module_case("gn:5", GN(5), (2, 10))
    module_case("gn:2,affine=false", GN(2, False), (3, 4, 3, 3))
    module_case("gn", GN(5), (2, 5, 4, 4))
    module_case("ln", GN(1), (4, 6, 5, 5))
    module_case("ln", GN(1), (1, 5, 4, 4))
    module_case("ln", GN(1), (5, 7))
    module_case("layernorm", LNE(), (4, 6, 5, 5))
    module_case("layernorm", LNE(), (1, 3, 2, 2))
    module_case("layernorm", LNE(), (6, 10))
    module_case("layernorm:affine=false", LNE(False), (3, 5, 3, 3))
    module_case("in", IN2(), (4, 6, 5, 5))
    module_case("in", IN2(), (1, 3, 4, 4))
    module_case("in:affine=true", IN2(affine=True), (3, 5, 4, 3))
    module_case("in:affine=true,track=true", IN2(affine=True, track_running_stats=True), (4, 6, 5, 5))
    module_case("in:track=true,momentum=0.3", IN2(track_running_stats=True, momentum=0.3), (2, 3, 4, 4))
    module_case("in", IN1(), (3, 5, 7))
    module_case("bn", BN2(), (5, 7, 3, 3))
    module_case("bn", BN1(), (9, 5))
    # Large offsets and small spreads, and a constant channel (y = beta, finite gradients).
    for offset, spread in ((1e4, 1e-2), (1e6, 1.0)):
        module_case("bn", BN2(), (8, 3, 6, 6), offset, spread)
        module_case("gn:2", GN(2), (4, 6, 5, 5), offset, spread)
        module_case("layernorm", LNE(), (3, 4, 5, 5), offset, spread)
        module_case("in:affine=true", IN2(affine=True), (3, 4, 5, 5), offset, spread)
    module_case("bn", BN2(), (4, 3, 5, 5), constant_channel=True)
    module_case("in:affine=true", IN2(affine=True), (2, 3, 4, 4), constant_channel=True)
    # 21 blocks of 50 values: the small-block kernels take two tiles, the second starting at
    # block 16, in the middle of a sample (group 1), so each block must find its own gamma.
    module_case("gn:3", GN(3), (7, 6, 5, 5))

    # Transcribed formulas (torch autograd in float64), no PyTorch module to compare with.
    def formula_case(spec, shape, run, t=3):
        i = len(cases)
        p = f"case{i}."
        c = shape[1]
        x = _data(shape, g, 0.3, 1.7).requires_grad_(True)
        dy = _data(shape, g)
        gamma = (torch.rand(c, generator=g) + 0.5).float().double().requires_grad_(True)
        beta = torch.randn(c, generator=g).float().double().requires_grad_(True)
        rm = (torch.randn(c, generator=g) * 0.5).float().double()
        rv = (torch.rand(c, generator=g) * 3 + 0.2).float().double()
        y, new_rm, new_rv = run(x, gamma, beta, rm, rv, t)
        y.backward(dy)
        ins = dict(x=x.detach(), dy=dy, weight=gamma.detach(), bias=beta.detach(), running_mean=rm)
        var_key = "running_scale" if spec.startswith("bn-l") else "running_var"
        ins[var_key] = rv
        ins_i64 = {"num_batches_tracked": torch.tensor(t, dtype=torch.int64)}
        outs = dict(y=y.detach(), dx=x.grad, dweight=gamma.grad, dbias=beta.grad, running_mean=new_rm)
        outs[var_key] = new_rv
        for k, v in ins.items():
            tensors[p + "in." + k] = v.float()
        for k, v in ins_i64.items():
            tensors[p + "in." + k] = v
        for k, v in outs.items():
            tensors[p + "out." + k] = v.float()
        cases.append(dict(spec=spec, shape=list(shape), eval=False))

    brn = lambda rmax, dmax, warmup, eps=1e-5, m=0.1: (
        lambda x, gm, bt, rm, rv, t: renorm_reference(x, gm, bt, rm, rv, t, eps, m, rmax, dmax, warmup))
    formula_case("brn:rmax=3,dmax=5,warmup=100", (6, 4, 3, 3), brn(3, 5, 100), t=1000)
    formula_case("brn:rmax=3,dmax=5,warmup=100", (6, 4, 3, 3), brn(3, 5, 100), t=40)
    formula_case("brn:rmax=1.5,dmax=0.5,warmup=8", (8, 5), brn(1.5, 0.5, 8), t=500)
    formula_case("brn:rmax=3,dmax=5,warmup=100", (4, 3, 2, 2), brn(3, 5, 100), t=0)
    lp = lambda p, eps=1e-5, m=0.1: (lambda x, gm, bt, rm, rs, t: lp_reference(x, gm, bt, rm, rs, eps, m, p))
    formula_case("bn-l1", (5, 4, 3, 3), lp("l1"))
    formula_case("bn-l1", (7, 6), lp("l1"))
    formula_case("bn-linf", (5, 4, 3, 3), lp("linf"))
    formula_case("bn-linf", (7, 6), lp("linf"))
    # RMSNorm (no bias), after the others so that their random draws stay as they were; eps
    # 1e-6 as timm's RmsNorm and normlab's default (torch.nn.RMSNorm's default is the dtype's).
    RMS = lambda affine=True: (lambda s: nn.RMSNorm(list(s[1:]), eps=1e-6, elementwise_affine=affine))
    module_case("rms", RMS(), (4, 6, 5, 5))
    module_case("rms", RMS(), (6, 10))
    module_case("rms", RMS(), (1, 3, 2, 2))
    module_case("rms:affine=false", RMS(False), (3, 5, 3, 3))
    module_case("rms", RMS(), (3, 4, 5, 5), 3.0, 0.01)
    module_case("rms:eps=1e-5", (lambda s: nn.RMSNorm(list(s[1:]), eps=1e-5)), (5, 2, 7, 7))
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "norm_family.safetensors"),
              metadata={"cases": json.dumps(cases)})
    print(f"norm_family.safetensors: {len(cases)} cases")


def eval_backward_cases():
    """Backward in eval mode, as PyTorch's autograd gives it: with running statistics they are
    constants (dx = dy*gamma/sqrt(rv + eps)); a norm without them normalizes with batch
    statistics in eval too, so its backward is the training one. Buffers never change."""
    g = torch.Generator().manual_seed(1414)
    tensors, cases = {}, []

    def record(i, spec, shape, ins, outs):
        p = f"case{i}."
        for k, v in ins.items():
            tensors[p + "in." + k] = v if v.dtype == torch.int64 else v.float()
        for k, v in outs.items():
            tensors[p + "out." + k] = v.float()
        cases.append(dict(spec=spec, shape=list(shape)))

    def module_case(spec, make, shape, offset=0.0, spread=1.0):
        i = len(cases)
        module = make(shape).double()
        _rand_affine(module, g)
        x = _data(shape, g, offset, spread).requires_grad_(True)
        dy = _data(shape, g)
        ins = {"x": x.detach(), "dy": dy}
        if getattr(module, "weight", None) is not None:
            ins["weight"], ins["bias"] = module.weight.detach().clone(), module.bias.detach().clone()
        if getattr(module, "running_mean", None) is not None:
            with torch.no_grad():
                rm = torch.randn(module.running_mean.shape, generator=g) * spread * 0.3 + offset
                module.running_mean.copy_(rm.float().double())
                rv = (torch.rand(module.running_var.shape, generator=g) + 0.5) * spread * spread
                module.running_var.copy_(rv.float().double())
                module.num_batches_tracked.fill_(7)
            ins["running_mean"], ins["running_var"] = module.running_mean.clone(), module.running_var.clone()
            ins["num_batches_tracked"] = torch.tensor(7, dtype=torch.int64)
        module.eval()
        y = module(x)
        y.backward(dy)
        outs = {"y": y.detach(), "dx": x.grad}
        if "weight" in ins:
            outs["dweight"], outs["dbias"] = module.weight.grad, module.bias.grad
        record(i, spec, shape, ins, outs)

    BN2 = lambda **kw: (lambda s: nn.BatchNorm2d(s[1], **kw))
    BN1 = lambda **kw: (lambda s: nn.BatchNorm1d(s[1], **kw))
    IN2 = lambda **kw: (lambda s: nn.InstanceNorm2d(s[1], **kw))
    GN = lambda G: (lambda s: nn.GroupNorm(G, s[1]))
    LNE = lambda: (lambda s: nn.LayerNorm(list(s[1:])))
    # With running statistics: BN and the variants whose eval mode is BN's.
    module_case("bn", BN2(), (5, 7, 3, 3))
    module_case("bn", BN1(), (9, 5))
    module_case("bn", BN2(), (4, 3, 9, 9))
    module_case("bn:affine=false", BN2(affine=False), (4, 5, 3, 3))
    module_case("bn:momentum=none", BN2(), (3, 4, 2, 2))
    module_case("bn", BN2(), (6, 3, 4, 4), offset=1e4, spread=1e-2)
    module_case("ghost:2", BN2(), (4, 3, 3, 3))
    module_case("brn:rmax=3,dmax=5,warmup=100", BN2(), (4, 3, 3, 3))
    module_case("bn-noisy", BN2(), (4, 3, 3, 3))
    module_case("in:affine=true,track=true", IN2(affine=True, track_running_stats=True), (4, 6, 5, 5))
    module_case("in:track=true,momentum=0.3", IN2(track_running_stats=True, momentum=0.3), (2, 3, 4, 4))
    # Without running statistics: batch statistics in eval, the training backward.
    module_case("bn:track=false", BN2(track_running_stats=False), (5, 4, 3, 3))
    module_case("bn:track=false", BN1(track_running_stats=False), (8, 6))
    module_case("in", IN2(), (3, 5, 4, 4))
    module_case("in:affine=true", IN2(affine=True), (3, 5, 4, 3))
    module_case("gn:2", GN(2), (4, 6, 5, 5))
    module_case("gn:5", GN(5), (2, 10))
    module_case("ln", GN(1), (4, 6, 5, 5))
    module_case("layernorm", LNE(), (4, 6, 5, 5))

    # Lp BN in eval: y = gamma*(x - running_mean)/(running_scale + eps) + beta (a transcription).
    def lp_eval_case(spec, shape, eps=1e-5):
        i = len(cases)
        c = shape[1]
        view = [1, -1] + [1] * (len(shape) - 2)
        x = _data(shape, g, 0.3, 1.7).requires_grad_(True)
        dy = _data(shape, g)
        gamma = (torch.rand(c, generator=g) + 0.5).float().double().requires_grad_(True)
        beta = torch.randn(c, generator=g).float().double().requires_grad_(True)
        rm = (torch.randn(c, generator=g) * 0.5).float().double()
        rs = (torch.rand(c, generator=g) * 2 + 0.3).float().double()
        y = gamma.view(view) * (x - rm.view(view)) / (rs.view(view) + eps) + beta.view(view)
        y.backward(dy)
        ins = dict(x=x.detach(), dy=dy, weight=gamma.detach(), bias=beta.detach(), running_mean=rm,
                   running_scale=rs, num_batches_tracked=torch.tensor(7, dtype=torch.int64))
        record(i, spec, shape, ins, dict(y=y.detach(), dx=x.grad, dweight=gamma.grad, dbias=beta.grad))

    lp_eval_case("bn-l1", (5, 4, 3, 3))
    lp_eval_case("bn-linf", (7, 6))
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "eval_backward.safetensors"),
              metadata={"cases": json.dumps(cases)})
    print(f"eval_backward.safetensors: {len(cases)} cases")


def lstm_cases():
    """nn.LSTM (float64 reference on float32 inputs): the output sequence, final states and BPTT
    gradients of loss = sum(dy * h_T of the top layer). LN-LSTM (Ba et al. 2016) and the two
    BN-LSTMs (Cooijmans et al. 2016; statistics per step or shared) against a transcription of
    their formulas: a = N_x(x W_ih^T) + N_h(h W_hh^T) + b_ih + b_hh, c = f c + i g,
    h = o tanh(N_c(c)), LN over each sample's features, BN over the batch of each step (biased
    variance to normalize, unbiased in the running statistics, momentum 0.1)."""
    g = torch.Generator().manual_seed(2016)
    tensors, cases = {}, []

    def rnd(*shape, lo=-1.0, hi=1.0):
        return (torch.rand(*shape, generator=g) * (hi - lo) + lo).float().double()

    def ln(z, w, b, eps=1e-5):
        mu = z.mean(-1, keepdim=True)
        var = z.var(-1, unbiased=False, keepdim=True)
        return (z - mu) / torch.sqrt(var + eps) * w + b

    def bn(z, w, b, rm, rv, t, per_step, eps=1e-5, m=0.1):
        mu, var = z.mean(0), z.var(0, unbiased=False)
        k = t if per_step else 0
        n = z.shape[0]
        rm[k] = (1 - m) * rm[k] + m * mu.detach()
        rv[k] = (1 - m) * rv[k] + m * var.detach() * n / (n - 1)
        y = (z - mu) / torch.sqrt(var + eps) * w
        return y + b if b is not None else y

    def bn_eval(z, w, b, rm, rv, t, per_step, eps=1e-5):
        k = t if per_step else 0
        y = (z - rm[k]) / torch.sqrt(rv[k] + eps) * w
        return y + b if b is not None else y

    def transcription(x, P, norm, layers, H, running, train=True):
        n, T, _ = x.shape
        inp = x
        hs, cs = [], []
        for l in range(layers):
            h = torch.zeros(n, H, dtype=torch.float64)
            c = torch.zeros(n, H, dtype=torch.float64)
            outs = []
            for t in range(T):
                zx = inp[:, t] @ P[f"weight_ih_l{l}"].T
                zh = h @ P[f"weight_hh_l{l}"].T
                if norm == "ln":
                    nx = ln(zx, P[f"ln_ih_l{l}.weight"], P[f"ln_ih_l{l}.bias"])
                    nh = ln(zh, P[f"ln_hh_l{l}.weight"], P[f"ln_hh_l{l}.bias"])
                else:
                    per_step = norm == "bn"
                    f = bn if train else bn_eval
                    nx = f(zx, P[f"bn_ih_l{l}.weight"], None, *running[f"bn_ih_l{l}"], t, per_step)
                    nh = f(zh, P[f"bn_hh_l{l}.weight"], None, *running[f"bn_hh_l{l}"], t, per_step)
                a = nx + nh + P[f"bias_ih_l{l}"] + P[f"bias_hh_l{l}"]
                i_, f_, g_, o_ = a.chunk(4, 1)
                i_, f_, g_, o_ = torch.sigmoid(i_), torch.sigmoid(f_), torch.tanh(g_), torch.sigmoid(o_)
                c = f_ * c + i_ * g_
                if norm == "ln":
                    cn = ln(c, P[f"ln_c_l{l}.weight"], P[f"ln_c_l{l}.bias"])
                else:
                    f = bn if train else bn_eval
                    cn = f(c, P[f"bn_c_l{l}.weight"], P[f"bn_c_l{l}.bias"], *running[f"bn_c_l{l}"], t, norm == "bn")
                h = o_ * torch.tanh(cn)
                outs.append(h)
            inp = torch.stack(outs, 1)
            hs.append(h)
            cs.append(c)
        return inp, torch.stack(hs), torch.stack(cs)

    def case(norm, n, T, I, H, layers):
        i = len(cases)
        P = {}
        k = 1.0 / H ** 0.5
        for l in range(layers):
            inp = I if l == 0 else H
            P[f"weight_ih_l{l}"] = rnd(4 * H, inp, lo=-k, hi=k)
            P[f"weight_hh_l{l}"] = rnd(4 * H, H, lo=-k, hi=k)
            P[f"bias_ih_l{l}"] = rnd(4 * H, lo=-k, hi=k)
            P[f"bias_hh_l{l}"] = rnd(4 * H, lo=-k, hi=k)
            if norm == "ln":
                for site, f in [("ih", 4 * H), ("hh", 4 * H), ("c", H)]:
                    P[f"ln_{site}_l{l}.weight"] = rnd(f, lo=0.5, hi=1.5)
                    P[f"ln_{site}_l{l}.bias"] = rnd(f, lo=-0.3, hi=0.3)
            elif norm != "none":
                for site, f in [("ih", 4 * H), ("hh", 4 * H), ("c", H)]:
                    P[f"bn_{site}_l{l}.weight"] = rnd(f, lo=0.05, hi=0.6)
                P[f"bn_c_l{l}.bias"] = rnd(H, lo=-0.3, hi=0.3)
        x = rnd(n, T, I, lo=-2.0, hi=2.0).requires_grad_(True)
        dy = rnd(n, H)
        for v in P.values():
            v.requires_grad_(True)
        running = {}
        if norm in ("bn", "bn-shared"):
            for l in range(layers):
                for site, f in [("ih", 4 * H), ("hh", 4 * H), ("c", H)]:
                    steps = T if norm == "bn" else 1
                    running[f"bn_{site}_l{l}"] = (torch.zeros(steps, f, dtype=torch.float64),
                                                  torch.ones(steps, f, dtype=torch.float64))
        if norm == "none":
            lstm = nn.LSTM(I, H, layers, batch_first=True).double()
            with torch.no_grad():
                for name, p in lstm.named_parameters():
                    p.copy_(P[name])
            out, (hn, cn) = lstm(x)
            (out[:, -1] * dy).sum().backward()
            grads = {name: p.grad for name, p in lstm.named_parameters()}
        else:
            out, hn, cn = transcription(x, P, norm, layers, H, running)
            (out[:, -1] * dy).sum().backward()
            grads = {name: p.grad for name, p in P.items()}
        p = f"case{i}."
        tensors[p + "in.x"] = x.detach().float()
        tensors[p + "in.dy"] = dy.float()
        for name, v in P.items():
            tensors[p + "in." + name] = v.detach().float()
        tensors[p + "out.seq"] = out.detach().float()
        tensors[p + "out.h_n"] = hn.detach().float()
        tensors[p + "out.c_n"] = cn.detach().float()
        tensors[p + "out.dx"] = x.grad.float()
        for name, v in grads.items():
            tensors[p + "grad." + name] = v.float()
        if running:
            for site, (rm, rv) in running.items():
                shape = (T, rm.shape[1]) if norm == "bn" else (rm.shape[1],)
                tensors[p + f"out.{site}.running_mean"] = rm.reshape(shape).float()
                tensors[p + f"out.{site}.running_var"] = rv.reshape(shape).float()
            with torch.no_grad():
                ev, _, _ = transcription(x, {k: v.detach() for k, v in P.items()}, norm, layers, H, running, False)
            tensors[p + "out.eval_h_last"] = ev[:, -1].float()
        cases.append(dict(norm=norm, n=n, steps=T, input=I, hidden=H, layers=layers, params=sorted(P)))

    for norm in ["none", "ln", "bn", "bn-shared"]:
        case(norm, 4, 5, 3, 4, 1)
        case(norm, 6, 7, 5, 3, 2)
    case("none", 8, 28, 28, 16, 1)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "lstm.safetensors"),
              metadata={"cases": json.dumps(cases)})
    print(f"lstm.safetensors: {len(cases)} cases")


def hashed_values(n, seed):
    """n float32 values in [-1, 1) from an integer hash of (index, seed): k / 2^23 - 1 with a
    24-bit k is exact in float32, so tests/conv_golden.rs rebuilds the same inputs instead of
    the golden file carrying them."""
    m = np.uint64(0xFFFFFFFF)
    x = (np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B1) + np.uint64(seed) * np.uint64(0x85EBCA77)) & m
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x2C1B3C6D)) & m
    x ^= x >> np.uint64(12)
    x = (x * np.uint64(0x297A2D39)) & m
    x ^= x >> np.uint64(15)
    k = (x >> np.uint64(8)).astype(np.float32)
    return k / np.float32(2 ** 23) - np.float32(1)


# (N, C, OC, H=W, bias): 3x3 padding-1 convs on the maps and widths of vgg and resnet; 28 is a
# multiple of both Winograd tiles, 14 and 7 are not (edge tiles are clipped).
CONV_CASES = [(1, 32, 16, 28, False), (2, 64, 16, 14, True), (2, 128, 16, 7, False)]


def conv_cases():
    """Conv2d forward, input, weight and bias gradients in float64 on hashed float32 inputs.
    Weights are scaled by 2^-e with 4^e <= 9C (exact in float32) so outputs are of order 1."""
    tensors = {}
    for i, (n, c, oc, hw, bias) in enumerate(CONV_CASES):
        e = 0
        while 4 ** (e + 1) <= 9 * c:
            e += 1
        x = torch.from_numpy(hashed_values(n * c * hw * hw, 4 * i).reshape(n, c, hw, hw))
        w = torch.from_numpy(hashed_values(oc * c * 9, 4 * i + 1).reshape(oc, c, 3, 3) * np.float32(2.0 ** -e))
        b = torch.from_numpy(hashed_values(oc, 4 * i + 2)) if bias else None
        dy = torch.from_numpy(hashed_values(n * oc * hw * hw, 4 * i + 3).reshape(n, oc, hw, hw))
        xd, wd = x.double().requires_grad_(True), w.double().requires_grad_(True)
        bd = b.double().requires_grad_(True) if bias else None
        y = F.conv2d(xd, wd, bd, padding=1)
        y.backward(dy.double())
        tensors[f"case{i}.y"] = y.detach().float()
        tensors[f"case{i}.dx"] = xd.grad.float()
        tensors[f"case{i}.dw"] = wd.grad.float()
        if bias:
            tensors[f"case{i}.db"] = bd.grad.float()
    save_file(tensors, os.path.join(OUT, "conv.safetensors"),
              metadata={"cases": json.dumps(CONV_CASES)})
    print("conv.safetensors written")


def record_sgd_steps(model, steps, batch, tensors, prefix):
    """SGD steps (lr 0.05, momentum 0.9) of a float64 model in training mode on float32 batches
    `batch(s)` = (x, y), recorded under `prefix`: the batch, the state before each step, its
    loss and gradients, and the running statistics after it. After each step the parameters
    are rounded to float32, so that each recorded step starts from values normlab holds exactly
    (a max-pool or ReLU that flips on a rounding difference would send a whole gradient value
    elsewhere, and over free-running steps such flips compound)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for s in range(steps):
        x, y = batch(s)
        tensors[f"{prefix}x{s}"], tensors[f"{prefix}y{s}"] = x, y
        for k, v in model.state_dict().items():
            tensors[f"{prefix}before{s}.{k}"] = v.float() if v.is_floating_point() else v.clone()
        opt.zero_grad()
        loss = F.cross_entropy(model(x.double()), y)
        loss.backward()
        tensors[f"{prefix}loss{s}"] = torch.tensor([loss.item()], dtype=torch.float64)
        for k, p in model.named_parameters():
            tensors[f"{prefix}grad{s}.{k}"] = p.grad.float()
        opt.step()
        with torch.no_grad():
            for v in model.state_dict().values():
                if v.is_floating_point():
                    v.copy_(v.float().double())
        for k, v in model.state_dict().items():
            if "running" in k or "num_batches" in k:
                tensors[f"{prefix}after{s}.{k}"] = v.float() if v.is_floating_point() else v.clone()


def vgg_steps():
    """Three SGD steps of vgg:16,16,M,32,32,M,M with BN (`record_sgd_steps`)."""
    torch.manual_seed(11)
    cfg, steps, batch_size = "16,16,M,32,32,M,M", 3, 8
    model = vgg(cfg)
    model.double().train()
    tensors = {}

    def batch(_):
        return torch.randn(batch_size, 1, 28, 28), torch.randint(0, 10, (batch_size,), dtype=torch.int64)

    record_sgd_steps(model, steps, batch, tensors, "")
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "vgg_steps.safetensors"),
              metadata={"model": f"vgg:{cfg}", "steps": str(steps)})
    print("vgg_steps.safetensors written")


def _randomize_norms(module, g):
    """Norm parameters (and BN running statistics) away from 1 and 0, so a swapped γ/β or a
    missing centring shows."""
    for m in module.modules():
        if isinstance(m, (nn.LayerNorm, nn.RMSNorm, nn.BatchNorm1d)):
            with torch.no_grad():
                m.weight.copy_(1.0 + 0.3 * torch.randn(m.weight.shape, generator=g))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))


VIT_ATTENTION = (3, 7, 2, 5)  # batch, tokens, heads, head dim
VIT_BLOCK = (3, 9, 16, 2, 2)  # batch, tokens, width, heads, MLP ratio
VIT_NORMS = ["layernorm", "rms", "bn", "none"]
VIT_STEPS = [("vit:16,2,2,7,2", "layernorm", "pre"), ("vit:16,2,2,7,2,post", "layernorm", "post"),
             ("vit:16,2,2,7,2", "bn", "pre"), ("vit:16,2,2,7,2", "rms", "pre")]


def vit_cases():
    """The attention's forward and backward; one block pre and post with every norm; two SGD
    steps of small ViTs. Float64 on float32 inputs; between steps the parameters are rounded to
    float32 (as in vgg_steps), so each recorded step starts from values normlab holds exactly."""
    tensors = {}
    g = torch.Generator().manual_seed(21)
    # Attention on a fused qkv: [B·T, 3D] -> [B·T, D].
    b, t, h, hd = VIT_ATTENTION
    d = h * hd
    qkv = torch.randn(b * t, 3 * d, generator=g)
    dout = torch.randn(b * t, d, generator=g)
    x = qkv.double().reshape(b, t, 3, h, hd).permute(2, 0, 3, 1, 4).requires_grad_(True)
    q, k, v = x.unbind(0)
    attn = ((q * hd ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(b * t, d)
    out.backward(dout.double())
    tensors["attention.qkv"], tensors["attention.dout"] = qkv, dout
    tensors["attention.out"] = out.detach().float()
    tensors["attention.dqkv"] = x.grad.permute(1, 3, 0, 2, 4).reshape(b * t, 3 * d).float()
    # One block on token rows.
    b, t, d, h, ratio = VIT_BLOCK
    for norm in VIT_NORMS:
        for placement in ["pre", "post"]:
            key = f"block.{norm}.{placement}"
            torch.manual_seed(len(tensors))
            block = VitBlock(d, h, ratio, norm, placement)
            _randomize_norms(block, g)
            block = block.double().train()
            xin = torch.randn(b, t, d, generator=g)
            dy = torch.randn(b, t, d, generator=g)
            for name, p in block.state_dict().items():
                tensors[f"{key}.before.{name}"] = p.float() if p.is_floating_point() else p.clone()
            xd = xin.double().requires_grad_(True)
            y = block(xd)
            y.backward(dy.double())
            tensors[f"{key}.x"], tensors[f"{key}.dy"] = xin.reshape(b * t, d), dy.reshape(b * t, d)
            tensors[f"{key}.y"] = y.detach().reshape(b * t, d).float()
            tensors[f"{key}.dx"] = xd.grad.reshape(b * t, d).float()
            for name, p in block.named_parameters():
                tensors[f"{key}.grad.{name}"] = p.grad.float()
            for name, v in block.state_dict().items():
                if "running" in name or "num_batches" in name:
                    tensors[f"{key}.after.{name}"] = v.float() if v.is_floating_point() else v.clone()
    # Whole models: two SGD steps (momentum 0.9) on batches of 4.
    for i, (model, norm, placement) in enumerate(VIT_STEPS):
        torch.manual_seed(100 + i)
        net = Vit(1, 28, 10, 16, 2, 2, 7, ratio=2, norm=norm, placement=placement)
        _randomize_norms(net, g)
        net = net.double().train()
        with torch.no_grad():
            for v in net.state_dict().values():
                if v.is_floating_point():
                    v.copy_(v.float().double())

        def batch(_):
            return torch.randn(4, 1, 28, 28, generator=g), torch.randint(0, 10, (4,), generator=g, dtype=torch.int64)

        record_sgd_steps(net, 2, batch, tensors, f"steps{i}.")
    meta = {
        "attention": json.dumps(VIT_ATTENTION),
        "block": json.dumps(VIT_BLOCK),
        "norms": json.dumps(VIT_NORMS),
        "steps": json.dumps(VIT_STEPS),
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "vit.safetensors"), metadata=meta)
    print(f"vit.safetensors: {len(tensors)} tensors")


GOLDENS = {
    "batch_norm": batch_norm_cases,
    "seed_cnn_steps": seed_cnn_steps,
    "norm_family": norm_family_cases,
    "eval_backward": eval_backward_cases,
    "lstm": lstm_cases,
    "conv": conv_cases,
    "vgg_steps": vgg_steps,
    "vit": vit_cases,
}

if __name__ == "__main__":
    # Every golden file, or only those named: make_goldens.py eval_backward
    os.makedirs(OUT, exist_ok=True)
    for name in sys.argv[1:] or list(GOLDENS):
        GOLDENS[name]()
