"""Decode + augment throughput: normlab's streaming loader against PyTorch's DataLoader on the
same image folder, side by side, alternating rounds.

normlab: `normlab data bench` (the training split streamed with --cache-limit 0: decode,
resize, normalize, augment, in batches, by N decode threads). PyTorch: torchvision's
ImageFolder (PIL) with Resize((H, W)), RandomHorizontalFlip, ToTensor and Normalize, in a
DataLoader(batch_size, shuffle=True, num_workers=N); 0 workers is its single-process loader.
Each side reads one epoch; the ratio is normlab images/s over PyTorch images/s.

    .venv-torch/bin/python bench/loader_vs_pytorch.py DIR --resize 64 --threads 2 --rounds 3
"""

import argparse
import json
import subprocess
import time

import torch
from torchvision import datasets, transforms


def torch_rate(folder, size, workers, batch):
    tf = transforms.Compose(
        [
            transforms.Resize((size, size)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
        ]
    )
    ds = datasets.ImageFolder(f"{folder}/train", transform=tf)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers)
    t0 = time.perf_counter()
    n = 0
    for x, _ in dl:
        n += x.shape[0]
    return n / (time.perf_counter() - t0)


def normlab_rate(binary, folder, size, threads, batch):
    out = subprocess.run(
        [binary, "data", "bench", "--data", folder, "--resize", f"{size}x{size}", "--augment", "flip",
         "--decode-threads", str(threads), "--batch-size", str(batch), "--json"],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out)["images_per_sec"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("folder")
    p.add_argument("--resize", type=int, default=64)
    p.add_argument("--threads", type=int, nargs="+", default=[0, 2])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--binary", default="target/release/normlab")
    a = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for w in a.threads:
        ours, theirs = [], []
        for _ in range(a.rounds):
            theirs.append(torch_rate(a.folder, a.resize, w, a.batch))
            ours.append(normlab_rate(a.binary, a.folder, a.resize, max(w, 1), a.batch))
        ratios = [o / t for o, t in zip(ours, theirs)]
        rows.append({"workers": w, "normlab_threads": max(w, 1), "normlab": ours, "pytorch": theirs,
                     "ratio_min": min(ratios), "ratio_median": sorted(ratios)[len(ratios) // 2]})
        print(f"workers {w} (normlab decode threads {max(w, 1)}): normlab {min(ours):.0f}-{max(ours):.0f} img/s, "
              f"PyTorch {min(theirs):.0f}-{max(theirs):.0f} img/s, ratio min {min(ratios):.2f}x median "
              f"{sorted(ratios)[len(ratios) // 2]:.2f}x", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
