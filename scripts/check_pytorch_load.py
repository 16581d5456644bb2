#!/usr/bin/env python3
"""Load a normlab seed-cnn checkpoint into the equivalent PyTorch module with strict=True and
check that both predict the same classes on the test set.

  .venv-torch/bin/python scripts/check_pytorch_load.py runs/NAME/model.safetensors [DATA_DIR]
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fmnist_torch import load, seed_cnn  # noqa: E402


def main():
    ckpt = sys.argv[1]
    data_dir = sys.argv[2] if len(sys.argv) > 2 else "/usr/share/datasets/fashion-mnist"
    with safe_open(ckpt, "pt") as f:
        meta = f.metadata()
    norm = json.loads(meta["normlab.input_norm"])
    with safe_open(ckpt, "pt") as f:
        width = f.get_tensor("conv1.weight").shape[0]
    model = seed_cnn(width)
    model.load_state_dict(load_file(ckpt), strict=True)
    model.eval()
    images = load(data_dir, "t10k-images-idx3-ubyte").astype(np.float32)
    labels = load(data_dir, "t10k-labels-idx1-ubyte").astype(np.int64)
    x = torch.from_numpy((images / 255.0 - norm["mean"]) / norm["std"]).float().unsqueeze(1)
    with torch.no_grad():
        logits = model(x)
    torch_pred = logits.argmax(1).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        pred_file = os.path.join(tmp, "pred.json")
        exe = os.environ.get("NORMLAB", "target/release/normlab")
        out = subprocess.run([exe, "eval", "--checkpoint", ckpt, "--data", data_dir, "--json",
                              "--predictions", pred_file], check=True, capture_output=True, text=True)
        normlab = json.loads(out.stdout)
        normlab_pred = np.array(json.load(open(pred_file)))
    loss = F.cross_entropy(logits, torch.from_numpy(labels)).item()
    acc = float((torch_pred == labels).mean())
    differ = int((torch_pred != normlab_pred).sum())
    print(f"pytorch  strict load ok; test accuracy {acc:.4f}  loss {loss:.6f}")
    print(f"normlab  test accuracy {normlab['test_accuracy']:.4f}  loss {normlab['test_loss']:.6f}")
    print(f"predictions that differ: {differ} of {len(labels)}")
    sys.exit(0 if differ == 0 else 1)


if __name__ == "__main__":
    main()
