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


def norm_layer(norm, c):
    """normlab's --norm bn or gn:G as a PyTorch module on c channels."""
    if norm == "bn":
        return nn.BatchNorm2d(c)
    if norm.startswith("gn:"):
        return nn.GroupNorm(int(norm[3:]), c)
    sys.exit(f"error: no PyTorch twin for --norm {norm}")


def resnet(norm="bn", widths=(16, 16, 32, 32, 64, 64)):
    """normlab's resnet: a 16-channel 3x3 stem, three stages of two basic blocks (16, 32, 64
    channels, strides 1, 2, 2; a 1x1 conv + norm shortcut where the shape changes), global
    average pooling and a linear classifier."""
    class Block(nn.Module):
        def __init__(self, cin, mid, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, mid, 3, stride, 1, bias=False)
            self.bn1 = norm_layer(norm, mid)
            self.conv2 = nn.Conv2d(mid, cout, 3, 1, 1, bias=False)
            self.bn2 = norm_layer(norm, cout)
            self.shortcut = None
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm_layer(norm, cout))

        def forward(self, x):
            h = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            return F.relu(h + (x if self.shortcut is None else self.shortcut(x)))

    blocks, c = [], 16
    for b, mid in enumerate(widths):
        out, stride = [(16, 1), (32, 2), (64, 2)][b // 2]
        blocks.append(Block(c, mid, out, stride if b % 2 == 0 else 1))
        c = out
    return nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), norm_layer(norm, 16), nn.ReLU(), *blocks,
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


def model(name, norm="bn"):
    """seed-cnn, vgg[:cfg] (norm + ReLU after every conv) or resnet, for benchmarks."""
    if name == "seed-cnn":
        return seed_cnn()
    if name == "resnet":
        return resnet(norm)
    cfg = name.split(":", 1)[1] if ":" in name else VGG_DEFAULT
    layers, c, hw = [], 1, 28
    for item in cfg.split(","):
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            hw //= 2
        else:
            layers += [nn.Conv2d(c, int(item), 3, padding=1, bias=False), norm_layer(norm, int(item)), nn.ReLU()]
            c = int(item)
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * hw * hw, 10))
