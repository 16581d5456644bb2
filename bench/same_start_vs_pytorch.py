#!/usr/bin/env python3
"""normlab and PyTorch trained from the same start: for each seed, normlab's initial seed-cnn
weights and its per-epoch sample orders (written by `examples/init_and_order.rs`) are loaded
into PyTorch, which then trains exactly as `normlab train --seed S` does (Adam lr 1e-3, batch
128, inputs standardized with the training set's mean and std). `normlab train` runs the same
seed. Per-epoch test accuracies of both are printed side by side: with the weights and batches
equal, what differs is the arithmetic alone.

  .venv-torch/bin/python bench/same_start_vs_pytorch.py [--epochs 10] [--seeds 0,1] [--threads 2]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from fmnist_torch import evaluate, seed_cnn, standardized_splits, train_epoch  # noqa: E402


def run(cmd):
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default=os.environ.get("NORMLAB_DATA", "/usr/share/datasets/fashion-mnist"))
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    xtr, ytr, xte, yte = standardized_splits(args.data)
    run(["cargo", "build", "--release", "--quiet", "--example", "init_and_order", "--bin", "normlab"])
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in [int(s) for s in args.seeds.split(",")]:
            prefix = os.path.join(tmp, f"s{seed}")
            run(["target/release/examples/init_and_order", str(seed), str(args.epochs), str(len(xtr)), prefix])
            order = np.fromfile(prefix + ".order.u32", dtype="<u4").reshape(args.epochs, len(xtr))
            out = os.path.join(tmp, f"run{seed}")
            run(["target/release/normlab", "train", "--epochs", str(args.epochs), "--seed", str(seed),
                 "--threads", str(args.threads), "--data", args.data, "--out", out])
            with open(os.path.join(out, "metrics.json")) as f:
                ours = [e["test_accuracy"] for e in json.load(f)["epochs"]]

            model = seed_cnn()
            model.load_state_dict(load_file(prefix + ".init.safetensors"), strict=True)
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            theirs = []
            for epoch in range(args.epochs):
                train_epoch(model, opt, xtr, ytr, torch.from_numpy(order[epoch].astype(np.int64)))
                theirs.append(evaluate(model, xte, yte)[0])
                print(f"  seed {seed} epoch {epoch + 1}: normlab {ours[epoch]:.4f}, PyTorch {theirs[-1]:.4f}",
                      flush=True)
            results[seed] = {"normlab": ours, "pytorch": theirs}
    for side in ("normlab", "pytorch"):
        finals = [r[side][-1] for r in results.values()]
        print(f"{side:8} epoch {args.epochs}: " + " ".join(f"{a:.4f}" for a in finals)
              + f"  mean {np.mean(finals):.4f}, {sum(a >= 0.90 for a in finals)} of {len(finals)} >= 0.90")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
