#!/usr/bin/env python3
"""ViT training speed: normlab against timm's VisionTransformer in PyTorch, side by side.

  .venv-torch/bin/python bench/vit_vs_timm.py [--models vit:64,4,4,4 vit:128,6,4,4]
      [--rounds 3] [--images 3840] [--threads 2]

Both train the same configuration on Fashion-MNIST (1x28x28, 10 classes): batch 128, AdamW
(lr 1e-3), LayerNorm eps 1e-6, 2 threads. normlab: `normlab train --train-limit IMAGES
--epochs 1`, its training images/s (the steps only, no evaluation). timm: the same number of
images in steps of forward, cross-entropy, backward and AdamW, timed after 2 warm-up steps.
The sides alternate for --rounds rounds; each round gives a ratio normlab/timm (> 1: normlab
faster), reported as the minimum and the median.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
from fmnist_torch import standardized_splits  # noqa: E402


def timm_images_per_second(model, x, y, batch):
    from timm.models.vision_transformer import VisionTransformer
    d, depth, heads, patch, *rest = (int(v) for v in model.split(":")[1].split(","))
    net = VisionTransformer(img_size=28, patch_size=patch, in_chans=1, num_classes=10, embed_dim=d, depth=depth,
                            num_heads=heads, mlp_ratio=rest[0] if rest else 4)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net.train()

    def step(i):
        xb, yb = x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(xb), yb).backward()
        opt.step()

    steps = len(x) // batch
    step(0)
    step(1)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    return steps * batch / (time.perf_counter() - t0)


def normlab_images_per_second(exe, model, images, threads):
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([exe, "train", "--model", model, "--optimizer", "adamw", "--epochs", "1",
                              "--train-limit", str(images), "--test-limit", "100", "--threads", str(threads),
                              "--out", os.path.join(tmp, "run")], check=True, capture_output=True, text=True)
    m = re.search(r"([0-9.]+) training images/s", out.stdout)
    if not m:
        sys.exit(f"error: no images/s in normlab's output:\n{out.stdout}")
    return float(m.group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["vit:64,4,4,4", "vit:128,6,4,4"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images", type=int, default=3840)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    exe = os.environ.get("NORMLAB", "target/release/normlab")
    xtr, ytr, _, _ = standardized_splits(a.data)
    x, y = xtr[:a.images], ytr[:a.images]
    rows = []
    print(f"ViT training, batch 128, AdamW, {a.threads} threads, {a.images} images per run, {a.rounds} alternating rounds")
    print(f"{'model':<16}{'timm img/s':>12}{'normlab img/s':>15}{'ratio min':>11}{'median':>8}")
    for model in a.models:
        ours, theirs = [], []
        for _ in range(a.rounds):
            theirs.append(timm_images_per_second(model, x, y, 128))
            ours.append(normlab_images_per_second(exe, model, a.images, a.threads))
        ratios = [o / t for o, t in zip(ours, theirs)]
        rows.append({"model": model, "timm": theirs, "normlab": ours, "ratios": ratios})
        print(f"{model:<16}{statistics.median(theirs):>12.0f}{statistics.median(ours):>15.0f}"
              f"{min(ratios):>10.2f}x{statistics.median(ratios):>7.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
