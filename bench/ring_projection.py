#!/usr/bin/env python3
"""Expected data-parallel step time with a ring all-reduce, from a measured compute time.

step = compute + 2(K-1)·alpha + 2(K-1)/K · bytes / bandwidth   (no overlap with backward)

The compute time per image comes from a measured training rate on this machine; the gradient
size from the parameter count (f32). Usage:
  bench/ring_projection.py --vgg-rate IMG_PER_S [--resnet50-gflops-per-s GFLOPS]
"""
import argparse

p = argparse.ArgumentParser()
p.add_argument("--vgg-rate", type=float, required=True, help="measured vgg training images/s (one 2-core process)")
p.add_argument("--vgg-params", type=int, default=298_000)
p.add_argument("--vgg-train-gflop", type=float, default=0.175, help="vgg training GFLOP per image (3x forward)")
p.add_argument("--alpha-us", type=float, default=20.0, help="latency per ring hop, microseconds")
p.add_argument("--batch", type=int, default=128, help="per-process batch (vgg); ResNet-50 uses 32")
a = p.parse_args()

achieved = a.vgg_rate * a.vgg_train_gflop  # GFLOP/s this machine trains at
models = [
    ("vgg (298k params)", a.batch, a.batch / a.vgg_rate, a.vgg_params * 4),
    # ResNet-50 at 224x224: 4.1 GFLOP forward, about 3x for a training step; 25.6M parameters.
    ("ResNet-50-sized (25.6M)", 32, 32 * 12.3 / achieved, 25_600_000 * 4),
]
print(f"machine: {achieved:.0f} GFLOP/s training (from vgg at {a.vgg_rate:.0f} img/s); alpha {a.alpha_us} us per hop")
print(f"{'model':<26}{'batch/proc':>11}{'compute ms':>12}{'Gbit/s':>8}" + "".join(f"{f'K={k} ms':>12}{'comm':>7}" for k in (8, 64, 512)))
for name, batch, compute, size in models:
    for gbit in (10, 100):
        row = f"{name:<26}{batch:>11}{compute * 1e3:>12.1f}{gbit:>8}"
        for k in (8, 64, 512):
            comm = 2 * (k - 1) * a.alpha_us * 1e-6 + 2 * (k - 1) / k * size / (gbit * 1e9 / 8)
            row += f"{(compute + comm) * 1e3:>12.1f}{comm / (compute + comm):>7.1%}"
        print(row)
