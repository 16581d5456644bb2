#!/usr/bin/env python3
"""Generate PyTorch golden files for normlab's tests.

Run from the repository root:  .venv-torch/bin/python scripts/make_goldens.py
Writes tests/goldens/*.safetensors. Never edit the outputs by hand; rerun this script.
"""
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "goldens")
torch.set_num_threads(1)


def batch_norm_cases():
    """BatchNorm1d/2d: a train step (forward, backward, buffer update), then an eval forward."""
    shapes2d = [(4, 3, 5, 5), (2, 8, 1, 1), (16, 6, 3, 3), (3, 5, 7, 4)]
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


class SeedCnn(nn.Module):
    """The articles' network: Conv(1->32, 3x3, pad 1, no bias) - BN - ReLU - MaxPool 2 - Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.fc1 = nn.Linear(32 * 14 * 14, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        return self.fc1(torch.flatten(x, 1))


def seed_cnn_steps():
    """Three full training steps of seed-cnn with SGD (nesterov, weight decay), Adam (L2) and AdamW."""
    torch.manual_seed(7)
    init = SeedCnn()
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
        model = SeedCnn()
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


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    batch_norm_cases()
    seed_cnn_steps()
