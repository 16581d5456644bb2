#!/usr/bin/env python3
"""normlab.torch's drop-in modules inside PyTorch against PyTorch's own, side by side.

  .venv-torch/bin/python bench/python_vs_torch.py [--threads 2] [--rounds 5] [--quick]
      [--only modules,resnet] [--json FILE]

(after `.venv-torch/bin/pip install ./python`). Two tables:

- modules: forward + backward of each drop-in module (BatchNorm2d, GroupNorm, LayerNorm over
  (C, H, W), InstanceNorm2d) against PyTorch's at the shapes of bench/kernels_vs_pytorch.py,
  the Python call overhead included (autograd.Function, tensor <-> numpy views).
- resnet: a training step (forward, cross-entropy, backward, SGD) of a ResNet-18 in
  torchvision's layout (written out below; torchvision is not needed), batch 32 at 64x64, as
  built and after `normlab.torch.convert`.

Both sides run in this process with the same thread count (torch.set_num_threads and
normlab.set_num_threads). A shared host slows down in bursts, so the sides alternate per entry
for --rounds rounds; each round gives one ratio (PyTorch time / normlab time, > 1 means
normlab is faster) and the report is the minimum and the median of those ratios.
"""
import argparse
import json
import os
import sys
import statistics

import torch
import torch.nn as nn
import torch.nn.functional as F

import normlab
import normlab.torch as nt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels_vs_pytorch import median_time  # noqa: E402

SHAPES = [
    (128, 32, 28, 28),
    (128, 64, 14, 14),
    (64, 128, 16, 16),
    (32, 256, 7, 7),
    (8, 64, 56, 56),
    (256, 16, 32, 32),
]


def modules(c, h, w):
    """(name, PyTorch's module, normlab's) for C channels on H x W maps."""
    return [
        ("BatchNorm2d", nn.BatchNorm2d(c), nt.BatchNorm2d(c)),
        ("GroupNorm", nn.GroupNorm(min(32, c), c), nt.GroupNorm(min(32, c), c)),
        ("LayerNorm", nn.LayerNorm([c, h, w]), nt.LayerNorm([c, h, w])),
        ("InstanceNorm2d", nn.InstanceNorm2d(c, affine=True), nt.InstanceNorm2d(c, affine=True)),
    ]


def fwd_bwd(layer, x, dy):
    xg = x.clone().requires_grad_(True)

    def run():
        xg.grad = None
        layer.zero_grad(set_to_none=True)
        layer(xg).backward(dy)

    return run


# --- ResNet-18, torchvision's layout ------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, inplanes = [], 64
        for planes, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers.append(nn.Sequential(BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes)))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def train_step(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def run():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return run


def bn_shapes(model, x):
    """The input shapes of the model's BatchNorm layers in one forward."""
    shapes, hooks = [], []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            hooks.append(m.register_forward_hook(lambda m, inp, out: shapes.append(tuple(inp[0].shape))))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return shapes


def bn_time(shapes, cls, reps):
    """Forward + backward of a BN layer of class `cls` at each shape, summed: the BN part of one
    training step, timed alone."""
    total = 0.0
    for shape in shapes:
        x, dy = torch.randn(shape), torch.randn(shape)
        total += median_time(fwd_bwd(cls(shape[1]), x, dy), reps)
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run, not a measurement)")
    ap.add_argument("--only", default="modules,resnet")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    normlab.set_num_threads(a.threads)
    torch.manual_seed(0)
    only = a.only.split(",")
    reps = 3 if a.quick else 15
    rows = {}
    if "modules" in only:
        cases = []
        for shape in SHAPES:
            n, c, h, w = shape
            x, dy = torch.rand(shape) * 4 - 2, torch.rand(shape) * 4 - 2
            for name, theirs, ours in modules(c, h, w):
                cases.append((name, shape, fwd_bwd(theirs, x, dy), fwd_bwd(ours, x, dy)))
        for r in range(a.rounds):
            for name, shape, theirs, ours in cases:
                row = rows.setdefault((name, shape), dict(torch_ms=[], normlab_ms=[], ratio=[]))
                tt, tn = median_time(theirs, reps), median_time(ours, reps)
                row["torch_ms"].append(tt * 1e3)
                row["normlab_ms"].append(tn * 1e3)
                row["ratio"].append(tt / tn)
        print(f"forward+backward inside PyTorch, {a.threads} threads, {a.rounds} alternating rounds")
        print(f"{'module':<16} {'shape':<18} {'torch ms':>9} {'normlab ms':>10} {'ratio min':>9} {'median':>7}")
        worst = {}
        for (name, shape), row in rows.items():
            rmin, rmed = min(row["ratio"]), statistics.median(row["ratio"])
            worst[name] = min(worst.get(name, rmed), rmed)
            print(f"{name:<16} {str(list(shape)):<18} {statistics.median(row['torch_ms']):>9.2f} "
                  f"{statistics.median(row['normlab_ms']):>10.2f} {rmin:>9.2f} {rmed:>7.2f}")
        for name, r in worst.items():
            print(f"  {name:<16} worst shape's median ratio {r:.2f}x")
    if "resnet" in only:
        x = torch.randn(32, 3, 64, 64)
        y = torch.randint(0, 1000, (32,))
        stock = ResNet18()
        converted = nt.convert(ResNet18())
        converted.load_state_dict(stock.state_dict())
        steps = {"stock": train_step(stock, x, y), "converted": train_step(converted, x, y)}
        times = {"stock": [], "converted": []}
        ratios = []
        step_reps = 2 if a.quick else 5
        for r in range(a.rounds):
            for k in ("stock", "converted"):
                times[k].append(median_time(steps[k], step_reps))
            ratios.append(times["stock"][-1] / times["converted"][-1])
        ips = {k: 32 / statistics.median(v) for k, v in times.items()}
        shapes = bn_shapes(stock, x)
        bn_ms = {"stock": bn_time(shapes, nn.BatchNorm2d, step_reps) * 1e3, "converted": bn_time(shapes, nt.BatchNorm2d, step_reps) * 1e3}
        step_ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        share = {k: bn_ms[k] / step_ms[k] for k in step_ms}
        print(f"\nResNet-18 training step, batch 32 at 64x64, {a.threads} threads, {a.rounds} alternating rounds")
        print(f"  stock {ips['stock']:.1f} images/s, converted {ips['converted']:.1f} images/s; "
              f"ratio min {min(ratios):.2f}x, median {statistics.median(ratios):.2f}x")
        print(f"  step {step_ms['stock']:.0f} ms stock, {step_ms['converted']:.0f} ms converted; its {len(shapes)} "
              f"BatchNorm layers alone (forward + backward, timed apart): {bn_ms['stock']:.1f} ms PyTorch's "
              f"({share['stock']:.0%} of the step), {bn_ms['converted']:.1f} ms normlab's ({share['converted']:.0%})")
        rows[("resnet18", (32, 3, 64, 64))] = dict(images_per_sec=ips, ratio=ratios, bn_ms=bn_ms, step_ms=step_ms)
    if a.json:
        with open(a.json, "w") as f:
            json.dump([{"entry": k[0], "shape": list(k[1]), **v} for k, v in rows.items()], f, indent=1)


if __name__ == "__main__":
    main()
