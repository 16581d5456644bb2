#!/usr/bin/env python3
"""Training images/s of normlab against PyTorch (CPU, same thread count), side by side.

  .venv-torch/bin/python bench/train_vs_pytorch.py [--model seed-cnn|vgg] [--images 20000]
      [--threads 2] [--repeats 3] [--batch-size 128] [--data DIR] [--json FILE]

Each repeat trains PyTorch, then normlab, on the same first N Fashion-MNIST training images
(Adam, lr 1e-3, BN after every conv). PyTorch is timed over its training loop only (data
already normalized in memory); normlab's rate is the images/s its `train` command reports,
which includes batch assembly and its first, allocating batch.
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
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
from fmnist_torch import load, model as build_model  # noqa: E402


def pytorch_rate(args, x, y):
    torch.manual_seed(0)
    model = build_model(args.model)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    perm = torch.randperm(len(x))
    bs = args.batch_size
    # Warm-up batches (allocator, kernels) are not timed.
    for i in range(3):
        idx = perm[i * bs:(i + 1) * bs]
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    t0 = time.perf_counter()
    for i in range(0, len(x), bs):
        idx = perm[i:i + bs]
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return len(x) / (time.perf_counter() - t0)


def normlab_rate(args):
    exe = os.environ.get("NORMLAB", "target/release/normlab")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run")
        subprocess.run([exe, "train", "--model", args.model, "--epochs", "1", "--batch-size", str(args.batch_size),
                        "--train-limit", str(args.images), "--test-limit", "100", "--threads", str(args.threads),
                        "--data", args.data, "--out", out], check=True, capture_output=True)
        with open(os.path.join(out, "metrics.json")) as f:
            return json.load(f)["train_images_per_sec"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="seed-cnn")
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--data", default=os.environ.get("NORMLAB_DATA", "/usr/share/datasets/fashion-mnist"))
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    images = load(args.data, "train-images-idx3-ubyte")[:args.images].astype(np.float32) / 255.0
    labels = load(args.data, "train-labels-idx1-ubyte")[:args.images].astype(np.int64)
    x = torch.from_numpy((images - images.mean()) / images.std()).unsqueeze(1).contiguous()
    y = torch.from_numpy(labels)
    print(f"model {args.model}, {args.images} images, batch {args.batch_size}, {args.threads} threads, "
          f"torch {torch.__version__}")
    print(f"{'repeat':>6}  {'pytorch img/s':>13}  {'normlab img/s':>13}  {'ratio':>6}")
    rows = []
    for r in range(args.repeats):
        pt = pytorch_rate(args, x, y)
        nl = normlab_rate(args)
        rows.append(dict(repeat=r + 1, pytorch=pt, normlab=nl, ratio=nl / pt))
        print(f"{r + 1:>6}  {pt:>13.0f}  {nl:>13.0f}  {nl / pt:>6.2f}")
    med = statistics.median(row["ratio"] for row in rows)
    print(f"median ratio normlab/pytorch: {med:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(vars(args), rows=rows, median_ratio=med), f, indent=2)


if __name__ == "__main__":
    main()
