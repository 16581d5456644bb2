#!/usr/bin/env python3
"""Test accuracy per epoch of PyTorch training the articles' network exactly as `normlab train`
does by default (Adam lr 1e-3, batch 128, constant rate, inputs standardized with the training
set's mean and std, shuffled every epoch), for several seeds: what a 10-epoch figure for
seed-cnn looks like when PyTorch produces it.

  .venv-torch/bin/python bench/accuracy_vs_pytorch.py [--epochs 10] [--seeds 0,1,2] [--threads 2]
"""
import argparse
import json
import os
import sys

import numpy as np
import torch


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
from fmnist_torch import evaluate, model as build_model, standardized_splits, train_epoch  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default=os.environ.get("NORMLAB_DATA", "/usr/share/datasets/fashion-mnist"))
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    xtr, ytr, xte, yte = standardized_splits(args.data)
    results = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        torch.manual_seed(seed)
        model = build_model("seed-cnn")
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        accs = []
        for epoch in range(args.epochs):
            train_loss = train_epoch(model, opt, xtr, ytr, torch.randperm(len(xtr)))
            acc, test_loss = evaluate(model, xte, yte)
            accs.append(acc)
            print(f"  seed {seed} epoch {epoch + 1}: train loss {train_loss:.4f}, "
                  f"test loss {test_loss:.4f}, test accuracy {acc:.4f}", flush=True)
        results[seed] = accs
        print(f"seed {seed}: " + " ".join(f"{a:.4f}" for a in accs))
    finals = [a[-1] for a in results.values()]
    print(f"epoch {args.epochs}: mean {np.mean(finals):.4f}, min {min(finals):.4f}, max {max(finals):.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
