#!/usr/bin/env python3
"""Weights trained elsewhere: trains seed-cnn and a vgg in PyTorch for one epoch on Fashion-MNIST
(normlab's tensor names: conv1, bn1, ..., fc1), saves each state dict with
safetensors.torch.save_file (no normlab metadata), and writes expected.json with PyTorch's
test accuracy and predicted classes, for `normlab eval --checkpoint F --model SPEC` to match.

  .venv-torch/bin/python scripts/pytorch_weights.py OUT [--data DIR] [--train-limit N] [--test-limit N]
"""
import argparse
import json
import os
import sys

import torch
import torch.nn as nn
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fmnist_torch import evaluate, seed_cnn, standardized_splits, train_epoch  # noqa: E402


def vgg(cfg):
    """vgg:CFG with normlab's names: conv{k}, bn{k} for the k-th conv, fc1 for the classifier."""
    class Vgg(nn.Module):
        def __init__(self):
            super().__init__()
            self.items, c, hw, k = [], 1, 28, 0
            for item in cfg.split(","):
                if item == "M":
                    self.items.append(None)
                    hw //= 2
                else:
                    k += 1
                    setattr(self, f"conv{k}", nn.Conv2d(c, int(item), 3, padding=1, bias=False))
                    setattr(self, f"bn{k}", nn.BatchNorm2d(int(item)))
                    self.items.append(k)
                    c = int(item)
            self.fc1 = nn.Linear(c * hw * hw, 10)

        def forward(self, x):
            for k in self.items:
                if k is None:
                    x = nn.functional.max_pool2d(x, 2)
                else:
                    x = nn.functional.relu(getattr(self, f"bn{k}")(getattr(self, f"conv{k}")(x)))
            return self.fc1(x.flatten(1))

    return Vgg()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--data", default=os.environ.get("NORMLAB_DATA", "/usr/share/datasets/fashion-mnist"))
    p.add_argument("--train-limit", type=int, default=60000)
    p.add_argument("--test-limit", type=int, default=10000)
    p.add_argument("--vgg", default="16,M,32,M")
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    xtr, ytr, xte, yte = standardized_splits(a.data)
    xtr, ytr = xtr[:a.train_limit], ytr[:a.train_limit]
    xte, yte = xte[:a.test_limit], yte[:a.test_limit]
    os.makedirs(a.out, exist_ok=True)
    expected = {}
    for name, model in (("seed-cnn", seed_cnn()), (f"vgg:{a.vgg}", vgg(a.vgg))):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        train_epoch(model, opt, xtr, ytr, torch.randperm(len(xtr)))
        acc, loss = evaluate(model, xte, yte)
        with torch.no_grad():
            pred = model(xte).argmax(1).tolist()
        file = name.split(":")[0] + ".safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(a.out, file))
        expected[name] = dict(file=file, test_accuracy=acc, test_loss=loss, predictions=pred)
        print(f"{name}: test accuracy {acc:.4f} on {len(yte)} images -> {file}")
    with open(os.path.join(a.out, "expected.json"), "w") as f:
        json.dump(expected, f)


if __name__ == "__main__":
    main()
