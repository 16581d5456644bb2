#!/usr/bin/env python3
"""LSTM training images/s, normlab against PyTorch's nn.LSTM on the CPU, side by side.

  .venv-torch/bin/python bench/lstm_vs_pytorch.py [--hidden 128] [--batch-size 128] [--threads 2]
      [--images 10000] [--rounds 3]

Each round trains one epoch over the first N Fashion-MNIST training images (rows as 28 steps
of 28 pixels, Adam 1e-3) in PyTorch (nn.LSTM + nn.Linear, timed over its training loop, data
already normalized in memory) and then in normlab (`normlab train --model lstm:H`, the
images/s it reports), for the plain LSTM and for the LN-LSTM (PyTorch: a transcription of its
formulas, as PyTorch has no LN-LSTM module). Each side keeps its best round.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
from check_pytorch_load import lstm_classifier  # noqa: E402
from fmnist_torch import standardized_splits  # noqa: E402


class LnLstm(nn.Module):
    """LN-LSTM of Ba et al. 2016 as normlab's `--norm ln` computes it, one layer."""

    def __init__(self, hidden):
        super().__init__()
        self.ih, self.hh = nn.Linear(28, 4 * hidden), nn.Linear(hidden, 4 * hidden)
        self.ln_ih, self.ln_hh, self.ln_c = nn.LayerNorm(4 * hidden), nn.LayerNorm(4 * hidden), nn.LayerNorm(hidden)
        self.fc = nn.Linear(hidden, 10)
        self.hidden = hidden

    def forward(self, x):
        x = x.squeeze(1)
        n = x.shape[0]
        h = x.new_zeros(n, self.hidden)
        c = x.new_zeros(n, self.hidden)
        zx = self.ih(x)
        for t in range(x.shape[1]):
            a = self.ln_ih(zx[:, t]) + self.ln_hh(self.hh(h))
            i, f, g, o = a.chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(self.ln_c(c))
        return self.fc(h)


def pytorch_rate(net, x, y, batch):
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    for k in range(0, len(order), batch):
        idx = order[k:k + batch]
        opt.zero_grad()
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
    return len(order) / (time.perf_counter() - t0)


def normlab_rate(exe, args, norm, work):
    out = os.path.join(work, f"{norm}-{time.time_ns()}")
    subprocess.run([exe, "train", "--model", f"lstm:{args.hidden}", "--norm", norm, "--epochs", "1",
                    "--batch-size", str(args.batch_size), "--train-limit", str(args.images), "--test-limit", "100",
                    "--threads", str(args.threads), "--out", out], check=True, capture_output=True)
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)["train_images_per_sec"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data", default=os.environ.get("NORMLAB_DATA", "/usr/share/datasets/fashion-mnist"))
    p.add_argument("--normlab", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                                     "target", "release", "normlab"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    xtr, ytr, _, _ = standardized_splits(args.data)
    x, y = xtr[:args.images], ytr[:args.images]
    work = tempfile.mkdtemp(prefix="normlab-lstm-")
    best = {}
    for r in range(args.rounds):
        for norm, make in [("none", lambda: lstm_classifier(args.hidden, 1)), ("ln", lambda: LnLstm(args.hidden))]:
            torch.manual_seed(r)
            pt = pytorch_rate(make(), x, y, args.batch_size)
            nl = normlab_rate(args.normlab, args, norm, work)
            best[(norm, "pytorch")] = max(best.get((norm, "pytorch"), 0), pt)
            best[(norm, "normlab")] = max(best.get((norm, "normlab"), 0), nl)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    print(f"LSTM H={args.hidden}, batch {args.batch_size}, {args.threads} threads, {args.images} images, "
          f"best of {args.rounds} alternating rounds; torch {torch.__version__}")
    for norm in ["none", "ln"]:
        n, t = best[(norm, "normlab")], best[(norm, "pytorch")]
        print(f"--norm {norm:<5} normlab {n:>8.0f} img/s   pytorch {t:>8.0f} img/s   ratio {n / t:.2f}x")


if __name__ == "__main__":
    main()
