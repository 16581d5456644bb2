"""What normlab's PyTorch scripts share: the IDX reader, the standardized Fashion-MNIST splits, one
training epoch and the test evaluation as `normlab train` runs them, and the PyTorch twins of
normlab's models."""
import gzip
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

VGG_DEFAULT = "32,32,M,64,64,M,128,128,M"


def read_idx(path):
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    rank = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(rank)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank).reshape(dims)


def load(data_dir, stem):
    """One IDX file of an MNIST-format folder, plain or .gz."""
    for name in (stem, stem + ".gz"):
        path = os.path.join(data_dir, name)
        if os.path.exists(path):
            return read_idx(path)
    sys.exit(f"error: {data_dir} has no {stem}[.gz]; install dataset-fashion-mnist or pass --data")


def standardized_splits(data_dir):
    """(x_train, y_train, x_test, y_test) as torch tensors, images [N, 1, 28, 28] standardized with
    the training set's pixel mean and std taken in f64, as `normlab train` does."""
    xtr = load(data_dir, "train-images-idx3-ubyte").astype(np.float32) / 255.0
    ytr = torch.from_numpy(load(data_dir, "train-labels-idx1-ubyte").astype(np.int64))
    xte = load(data_dir, "t10k-images-idx3-ubyte").astype(np.float32) / 255.0
    yte = torch.from_numpy(load(data_dir, "t10k-labels-idx1-ubyte").astype(np.int64))
    mean, std = xtr.astype(np.float64).mean(), xtr.astype(np.float64).std()
    xtr = torch.from_numpy(((xtr - mean) / std).astype(np.float32)).unsqueeze(1)
    xte = torch.from_numpy(((xte - mean) / std).astype(np.float32)).unsqueeze(1)
    return xtr, ytr, xte, yte


def train_epoch(model, opt, x, y, order, batch=128):
    """One epoch over the samples in `order` (an int64 tensor), in batches of `batch` (the last
    one shorter); returns the mean training loss."""
    model.train()
    loss_sum = 0.0
    for i in range(0, len(order), batch):
        idx = order[i:i + batch]
        opt.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        loss_sum += loss.item() * len(idx)
    return loss_sum / len(order)


def evaluate(model, x, y):
    """(test accuracy, test loss) in eval mode (BN uses its running statistics)."""
    model.eval()
    with torch.no_grad():
        logits = model(x)
        return (logits.argmax(1) == y).float().mean().item(), F.cross_entropy(logits, y).item()


def seed_cnn(width=32):
    """Conv(1->W, 3x3, pad 1, no bias) - BN - ReLU - MaxPool 2 - Linear, with normlab's names
    (conv1, bn1, fc1) so load_state_dict(strict=True) takes a normlab checkpoint."""
    class SeedCnn(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.fc1 = nn.Linear(width * 14 * 14, 10)

        def forward(self, x):
            x = nn.functional.max_pool2d(nn.functional.relu(self.bn1(self.conv1(x))), 2)
            return self.fc1(x.flatten(1))

    return SeedCnn()


def model(name):
    """seed-cnn or vgg[:cfg] (BN + ReLU after every conv) as an nn.Sequential, for benchmarks."""
    if name == "seed-cnn":
        return seed_cnn()
    cfg = name.split(":", 1)[1] if ":" in name else VGG_DEFAULT
    layers, c, hw = [], 1, 28
    for item in cfg.split(","):
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            hw //= 2
        else:
            layers += [nn.Conv2d(c, int(item), 3, padding=1, bias=False), nn.BatchNorm2d(int(item)), nn.ReLU()]
            c = int(item)
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * hw * hw, 10))
