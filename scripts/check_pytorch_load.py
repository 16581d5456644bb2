#!/usr/bin/env python3
"""Load a normlab seed-cnn or lstm (--norm none) checkpoint into the equivalent PyTorch module
with strict=True and check that both predict the same classes on the test set.

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


def lstm_classifier(hidden, layers):
    """normlab's lstm[:H[,layers]] with --norm none: nn.LSTM(28, H, layers, batch_first=True)
    reading the image's rows, then nn.Linear(H, 10) on the last hidden state."""
    class LstmClassifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(28, hidden, layers, batch_first=True)
            self.fc = torch.nn.Linear(hidden, 10)

        def forward(self, x):
            out, _ = self.lstm(x.squeeze(1))
            return self.fc(out[:, -1])

    return LstmClassifier()


def main():
    ckpt = sys.argv[1]
    data_dir = sys.argv[2] if len(sys.argv) > 2 else "/usr/share/datasets/fashion-mnist"
    with safe_open(ckpt, "pt") as f:
        meta = f.metadata()
    norm = json.loads(meta["normlab.input_norm"])
    with safe_open(ckpt, "pt") as f:
        keys = set(f.keys())
        if "lstm.weight_ih_l0" in keys:
            hidden = f.get_tensor("lstm.weight_hh_l0").shape[1]
            layers = sum(1 for k in keys if k.startswith("lstm.weight_ih_l"))
            model = lstm_classifier(hidden, layers)
        else:
            model = seed_cnn(f.get_tensor("conv1.weight").shape[0])
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
