#!/usr/bin/env python3
"""Inference latency of seed-cnn, vgg and resnet at batch 1 and 128: normlab (unfolded, BN
folded, pruned 50% and folded), ONNX Runtime on normlab's exported file, and PyTorch eval of the
same architecture, all with the same thread count, side by side.

  .venv-torch/bin/python bench/inference_vs_runtimes.py [--threads 2] [--rounds 3] [--json FILE]

The checkpoints come from short `normlab train` runs on random-free synthetic data written here
(latency does not depend on the weights' values); the pruned one from `normlab prune --percent
0.5`. Each round times every side of every model in turn (normlab through `normlab bench
--inference`, which reports the median of its timed forwards; ORT and PyTorch in this process,
median of as many forwards), and each cell keeps its best round (the same rule for all sides);
the median over rounds is printed too, and the folded/PyTorch ratio of each round (min and
median). Ratios > 1 mean normlab's folded model is faster.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
from fmnist_torch import model as torch_model  # noqa: E402 (resnet included)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels_vs_pytorch import median_time  # noqa: E402

MODELS = ["seed-cnn", "vgg", "resnet"]
BATCHES = [1, 128]


def timed(fn, reps):
    """Median ms of `reps` calls after one warm-up (kernels_vs_pytorch's rule)."""
    return median_time(fn, reps) * 1e3


def reps_for(batch):
    return 200 if batch == 1 else 30


def write_idx(path, dims, payload):
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 8, len(dims)]))
        for d in dims:
            f.write(int(d).to_bytes(4, "big"))
        f.write(payload)


def setup(exe, work):
    """Synthetic MNIST-format data, one short training run per model, a pruned copy, exports."""
    data = os.path.join(work, "data")
    os.makedirs(data, exist_ok=True)
    rng = np.random.default_rng(0)
    for stem, n in [("train", 512), ("t10k", 128)]:
        write_idx(os.path.join(data, f"{stem}-images-idx3-ubyte"), [n, 28, 28],
                  rng.integers(0, 256, n * 784, dtype=np.uint8).tobytes())
        write_idx(os.path.join(data, f"{stem}-labels-idx1-ubyte"), [n], (np.arange(n) % 10).astype(np.uint8).tobytes())
    ckpts = {}
    for m in MODELS:
        run = os.path.join(work, m)
        subprocess.run([exe, "train", "--model", m, "--epochs", "1", "--data", data, "--out", run],
                       check=True, capture_output=True)
        pruned = os.path.join(work, m + "-pruned")
        subprocess.run([exe, "prune", "--checkpoint", os.path.join(run, "model.safetensors"), "--percent", "0.5",
                        "--out", pruned, "--data", data], check=True, capture_output=True)
        onnx_path = os.path.join(work, m + ".onnx")
        subprocess.run([exe, "export", "--checkpoint", os.path.join(run, "model.safetensors"), "--out", onnx_path],
                       check=True, capture_output=True)
        ckpts[m] = dict(plain=os.path.join(run, "model.safetensors"),
                        pruned=os.path.join(pruned, "model.safetensors"), onnx=onnx_path)
    return ckpts


def normlab_ms(exe, threads, ckpt, fold, work):
    out = os.path.join(work, "bench.json")
    cmd = [exe, "bench", "--inference", ckpt, "--threads", str(threads), "--json", out, "--force"]
    subprocess.run(cmd + (["--fold"] if fold else []), check=True, capture_output=True)
    with open(out) as f:
        return {r["batch"]: r["ms"] for r in json.load(f)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json")
    p.add_argument("--normlab", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                                     "target", "release", "normlab"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = tempfile.mkdtemp(prefix="normlab-inference-")
    ckpts = setup(args.normlab, work)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    sessions = {m: ort.InferenceSession(c["onnx"], opts, providers=["CPUExecutionProvider"]) for m, c in ckpts.items()}
    nets = {m: torch_model(m).eval() for m in MODELS}
    sides = ["normlab", "normlab folded", "normlab pruned+folded", "onnxruntime", "pytorch eval"]
    times = {(m, b, s): [] for m in MODELS for b in BATCHES for s in sides}
    for r in range(args.rounds):
        for m in MODELS:
            c = ckpts[m]
            for side, ckpt, fold in [("normlab", c["plain"], False), ("normlab folded", c["plain"], True),
                                     ("normlab pruned+folded", c["pruned"], True)]:
                for b, ms in normlab_ms(args.normlab, args.threads, ckpt, fold, work).items():
                    times[(m, b, side)].append(ms)
            for b in BATCHES:
                x = np.random.default_rng(1).random((b, 1, 28, 28), dtype=np.float32)
                times[(m, b, "onnxruntime")].append(timed(lambda: sessions[m].run(["logits"], {"image": x}), reps_for(b)))
                xt = torch.from_numpy(x)
                with torch.no_grad():
                    times[(m, b, "pytorch eval")].append(timed(lambda: nets[m](xt), reps_for(b)))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    print(f"threads {args.threads}, torch {torch.__version__}, onnxruntime {ort.__version__}; ms per batch, best of "
          f"{args.rounds} alternating rounds (median over rounds in brackets)")
    print(f"{'model':<9}{'batch':>6}" + "".join(f"{s:>24}" for s in sides) + f"{'folded/ORT':>12}{'folded/torch':>14}")
    rows = []
    for m in MODELS:
        for b in BATCHES:
            best = {s: min(times[(m, b, s)]) for s in sides}
            med = {s: statistics.median(times[(m, b, s)]) for s in sides}
            vs_ort = best["onnxruntime"] / best["normlab folded"]
            vs_torch = best["pytorch eval"] / best["normlab folded"]
            # The ratio within each round (both sides timed seconds apart): min and median.
            per_round = [t / f for t, f in zip(times[(m, b, "pytorch eval")], times[(m, b, "normlab folded")])]
            print(f"{m:<9}{b:>6}" + "".join(f"{best[s]:>14.3f} [{med[s]:>7.3f}]" for s in sides)
                  + f"{vs_ort:>11.2f}x{vs_torch:>13.2f}x   per round: min {min(per_round):.2f}x, "
                  f"median {statistics.median(per_round):.2f}x")
            rows.append(dict(model=m, batch=b, best_ms=best, median_ms=med, folded_vs_onnxruntime=vs_ort,
                             folded_vs_pytorch=vs_torch, folded_vs_pytorch_per_round=per_round))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(threads=args.threads, rounds=args.rounds, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
