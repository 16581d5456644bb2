#!/usr/bin/env python3
"""normlab's kernels and training against PyTorch's, side by side, same thread count.

  .venv-torch/bin/python bench/kernels_vs_pytorch.py [--threads 2] [--quick] [--rounds 3] [--json FILE]

Runs `normlab bench --filter K --json` (the kernels through normlab's layer code, plus end-to-end
training on random data) for one kernel or model K at a time, then times PyTorch on the same
shapes or model in this process, and prints normlab/PyTorch speed ratios (> 1 means normlab is
faster). A shared host slows down in bursts of seconds, so the two sides alternate per kernel
and model, for --rounds rounds, and each side keeps its best (smallest) time per kernel and
model: the same rule for both.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
from fmnist_torch import load, model as build_model  # noqa: E402


def median_time(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def torch_kernel(kernel, shape, reps):
    n, c, h, w = shape
    if kernel.startswith("bn"):
        layer = nn.BatchNorm2d(c)
    elif kernel.startswith("gn"):
        layer = nn.GroupNorm(min(32, c), c)
    elif kernel.startswith("ln"):
        layer = nn.GroupNorm(1, c)
    else:
        layer = nn.InstanceNorm2d(c)
    x = torch.rand(shape) * 4 - 2
    dy = torch.rand(shape) * 4 - 2
    if kernel == "bn_eval_fwd":
        layer.eval()

        def run():
            with torch.no_grad():
                layer(x)
    elif kernel == "bn_train_fwd":
        layer.train()

        def run():
            with torch.no_grad():
                layer(x)
    else:
        layer.train()
        xg = x.clone().requires_grad_(True)

        def run():
            xg.grad = None
            layer.zero_grad(set_to_none=True)
            layer(xg).backward(dy)
    return median_time(run, reps)


def torch_training(model_name, batch, steps):
    torch.manual_seed(0)
    model = build_model(model_name)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(batch, 1, 28, 28) * 4 - 2
    y = torch.arange(batch) % 10

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return batch / median_time(step, steps)


KERNELS = ["bn_train_fwd", "bn_train_fwd_bwd", "bn_eval_fwd", "gn_fwd_bwd", "ln_fwd_bwd", "in_fwd_bwd"]
MODELS = ["seed-cnn", "vgg"]


def normlab_bench(exe, threads, part, quick):
    """One `normlab bench --filter PART` run: (copy GB/s, kernel records of exactly that kernel,
    training records of that model)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        cmd = [exe, "bench", "--threads", str(threads), "--filter", part, "--json", out] + (["--quick"] if quick else [])
        subprocess.run(cmd, check=True, capture_output=True)
        with open(out) as f:
            run = json.load(f)
    kernels = [k for k in run["kernels"] if k["kernel"] == part]
    training = [t for t in run["training"] if t["model"].split(":")[0] == part]
    return run["copy_gb_per_s"], kernels, training


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    exe = os.environ.get("NORMLAB", "target/release/normlab")
    reps = 3 if args.quick else 15
    # Each kernel (all six shapes) and each model alternates between the two sides, a few
    # seconds apart, so a burst of host load hits both alike; each side keeps its best.
    copy, nl_kernels, nl_training, torch_ms, torch_ips = 0.0, {}, {}, {}, {}
    for _ in range(max(1, args.rounds)):
        for part in KERNELS + MODELS:
            gbs, kernels, training = normlab_bench(exe, args.threads, part, args.quick)
            copy = max(copy, gbs)
            for k in kernels:
                key = (k["kernel"], tuple(k["shape"]))
                if key not in nl_kernels or k["ms"] < nl_kernels[key]["ms"]:
                    nl_kernels[key] = k
                t = torch_kernel(k["kernel"], key[1], reps) * 1e3
                torch_ms[key] = min(t, torch_ms.get(key, t))
            for t in training:
                if t["model"] not in nl_training or t["images_per_sec"] > nl_training[t["model"]]["images_per_sec"]:
                    nl_training[t["model"]] = t
                ips = torch_training(t["model"], t["batch_size"], 3 if args.quick else 10)
                torch_ips[t["model"]] = max(ips, torch_ips.get(t["model"], ips))
    for k in nl_kernels.values():
        k["copy_fraction"] = k["gb_per_s"] / copy
    nl = dict(copy_gb_per_s=copy, kernels=list(nl_kernels.values()), training=list(nl_training.values()))
    print(f"threads {args.threads}, torch {torch.__version__}, best of {max(1, args.rounds)} alternating rounds; "
          f"memory copy {nl['copy_gb_per_s']:.1f} GB/s")
    print(f"{'kernel':<18} {'shape':<18} {'normlab ms':>10} {'torch ms':>9} {'ratio':>6} {'copy%':>6}")
    rows = []
    for k in nl["kernels"]:
        t = torch_ms[(k["kernel"], tuple(k["shape"]))]
        ratio = t / k["ms"]
        rows.append(dict(k, torch_ms=t, ratio=ratio))
        print(f"{k['kernel']:<18} {str(k['shape']):<18} {k['ms']:>10.3f} {t:>9.3f} {ratio:>6.2f} "
              f"{100 * k['copy_fraction']:>5.0f}%")
    print("minimum ratio per kernel:")
    for name in dict.fromkeys(r["kernel"] for r in rows):
        rs = [r["ratio"] for r in rows if r["kernel"] == name]
        print(f"  {name:<18} min {min(rs):.2f}x  median {statistics.median(rs):.2f}x")
    training = []
    for t in nl["training"]:
        pt = torch_ips[t["model"]]
        ratio = t["images_per_sec"] / pt
        training.append(dict(t, torch_images_per_sec=pt, ratio=ratio))
        print(f"training {t['model']:<30} normlab {t['images_per_sec']:>7.0f} img/s  torch {pt:>7.0f} img/s  "
              f"ratio {ratio:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(threads=args.threads, copy_gb_per_s=nl["copy_gb_per_s"], kernels=rows,
                           training=training), f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
