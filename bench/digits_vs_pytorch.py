#!/usr/bin/env python3
"""A real image dataset that a package registry ships (not downloads): scikit-learn's copy of
the UCI handwritten digits (1,797 grey 8x8 images, `sklearn/datasets/data/digits.csv.gz`),
written as an ImageFolder tree of PNG files, then trained with normlab (reading the folder)
and with PyTorch (the same pixels, the same architecture, optimizer, batches and epochs).

  .venv-torch/bin/pip install scikit-learn pillow
  .venv-torch/bin/python bench/digits_vs_pytorch.py [--seeds 3] [--epochs 30] [--threads 2]

Prints test accuracy (mean ± std over seeds) and training images/s for vgg and resnet on each
side. The split is the first 1,437 images for training and the last 360 for testing.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from inference_vs_runtimes import torch_resnet  # noqa: E402

VGG = "32,M,64,M"


def write_folder(root):
    d = load_digits()
    pixels = np.round(d.images * 255.0 / 16.0).astype(np.uint8)
    n_train = 1437
    for i, (img, label) in enumerate(zip(pixels, d.target)):
        split = "train" if i < n_train else "test"
        cls = os.path.join(root, split, f"digit{label}")
        os.makedirs(cls, exist_ok=True)
        Image.fromarray(img, mode="L").save(os.path.join(cls, f"{i:05d}.png"))
    return pixels[:n_train], d.target[:n_train], pixels[n_train:], d.target[n_train:]


def torch_vgg(cfg, side):
    layers, c = [], 1
    for item in cfg.split(","):
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            side //= 2
        else:
            layers += [nn.Conv2d(c, int(item), 3, padding=1, bias=False), nn.BatchNorm2d(int(item)), nn.ReLU()]
            c = int(item)
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * side * side, 10))


def pytorch_run(model_name, seed, args, data):
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    net = torch_vgg(VGG, 8) if model_name == "vgg" else torch_resnet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    t_train, seen = 0.0, 0
    for _ in range(args.epochs):
        net.train()
        order = torch.randperm(len(xtr), generator=g)
        t0 = time.perf_counter()
        for k in range(0, len(order), args.batch_size):
            idx = order[k:k + args.batch_size]
            if len(idx) < 2:
                continue
            opt.zero_grad()
            F.cross_entropy(net(xtr[idx]), ytr[idx]).backward()
            opt.step()
            seen += len(idx)
        t_train += time.perf_counter() - t0
    net.eval()
    with torch.no_grad():
        acc = (net(xte).argmax(1) == yte).float().mean().item()
    return acc, seen / t_train


def normlab_run(exe, model_name, seed, args, folder, work):
    out = os.path.join(work, f"{model_name}-{seed}")
    model = f"vgg:{VGG}" if model_name == "vgg" else "resnet"
    subprocess.run([exe, "train", "--data", folder, "--model", model, "--norm", "bn", "--epochs", str(args.epochs),
                    "--batch-size", str(args.batch_size), "--seed", str(seed), "--threads", str(args.threads),
                    "--out", out], check=True, capture_output=True)
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    return m["test_accuracy"], m["train_images_per_sec"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--normlab", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                                     "target", "release", "normlab"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = tempfile.mkdtemp(prefix="normlab-digits-")
    folder = os.path.join(work, "digits")
    xtr, ytr, xte, yte = write_folder(folder)
    # PyTorch gets the training set's mean and std, as normlab computes them.
    mean, std = xtr.astype(np.float64).mean() / 255.0, (xtr.astype(np.float64) / 255.0).std()
    to_t = lambda x: torch.from_numpy(((x / 255.0 - mean) / std).astype(np.float32)).unsqueeze(1)  # noqa: E731
    data = (to_t(xtr), torch.from_numpy(ytr).long(), to_t(xte), torch.from_numpy(yte).long())
    print(f"digits: {len(xtr)} training and {len(xte)} test images, 1x8x8; {args.epochs} epochs, Adam 1e-3, "
          f"batch {args.batch_size}, {args.threads} threads, {args.seeds} seeds; torch {torch.__version__}")
    for model_name in ["vgg", "resnet"]:
        res = {"normlab": [], "pytorch": []}
        for seed in range(args.seeds):
            res["pytorch"].append(pytorch_run(model_name, seed, args, data))
            res["normlab"].append(normlab_run(args.normlab, model_name, seed, args, folder, work))
        for side, rows in res.items():
            accs, rates = [r[0] for r in rows], [r[1] for r in rows]
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            print(f"{model_name:<7} {side:<8} test accuracy {statistics.mean(accs):.4f} ± {sd:.4f}   "
                  f"training {statistics.median(rates):>8.0f} images/s")
        ratio = statistics.median([r[1] for r in res["normlab"]]) / statistics.median([r[1] for r in res["pytorch"]])
        print(f"{model_name:<7} normlab/pytorch training speed {ratio:.2f}x")


if __name__ == "__main__":
    main()
