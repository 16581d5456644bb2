"""Writes a synthetic image folder (train/<class>/*, test/<class>/*) for the loader's
measurements: N training and N/10 test images of SIZE x SIZE, PNG or JPEG, ten classes, each
image a seeded colour gradient with noise (so files have realistic sizes, not constant ones).

    .venv-torch/bin/python bench/make_image_folder.py OUT --train 5000 --size 128 --format jpg
"""

import argparse
import os

import numpy as np
from PIL import Image


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--train", type=int, default=5000)
    p.add_argument("--test", type=int, default=None)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--format", choices=["png", "jpg"], default="jpg")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rng = np.random.default_rng(a.seed)
    yy, xx = np.mgrid[0 : a.size, 0 : a.size].astype(np.float32) / a.size
    for split, n in [("train", a.train), ("test", a.test if a.test is not None else max(1, a.train // 10))]:
        for c in range(a.classes):
            os.makedirs(os.path.join(a.out, split, f"class{c:02d}"), exist_ok=True)
        for i in range(n):
            c = i % a.classes
            w = rng.uniform(-1, 1, size=(3, 3))
            base = np.stack([w[k, 0] * xx + w[k, 1] * yy + w[k, 2] for k in range(3)], axis=-1)
            img = 127.5 + 60 * base + rng.normal(0, 12, size=base.shape) + 8 * c
            img = np.clip(img, 0, 255).astype(np.uint8)
            path = os.path.join(a.out, split, f"class{c:02d}", f"{i:07d}.{a.format}")
            Image.fromarray(img).save(path, quality=90) if a.format == "jpg" else Image.fromarray(img).save(path)


if __name__ == "__main__":
    main()
