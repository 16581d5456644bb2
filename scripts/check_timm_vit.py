#!/usr/bin/env python3
"""Load a normlab ViT checkpoint (pre-norm, --norm layernorm or rms) into timm's
VisionTransformer with strict=True and compare both on the test images: identical classes and
logits within 1e-4.

  .venv-torch/bin/python scripts/check_timm_vit.py runs/NAME/model.safetensors [DATA_DIR]

Needs timm (pip install timm). The model spec, norm and input standardization come from the
checkpoint's metadata; normlab's logits from `normlab eval --logits`.
"""
import json
import os
import subprocess
import sys
import tempfile
from functools import partial

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fmnist_torch import load  # noqa: E402


def timm_vit(model, norm, input_shape, classes):
    """timm's VisionTransformer for normlab's `vit:D,L,H,P,R` and `--norm layernorm|rms`."""
    from timm.layers import RmsNorm
    from timm.models.vision_transformer import VisionTransformer

    name, cfg = model.split(":")
    parts = cfg.split(",")
    if name != "vit" or parts[-1] == "post":
        sys.exit(f"error: {model} is not a pre-norm vit (timm's VisionTransformer is pre-norm)")
    d, depth, heads, patch, ratio = (int(p) for p in parts[:5])
    kind, _, opts = norm.partition(":")
    eps = float(dict(o.split("=") for o in opts.split(",") if "=" in o).get("eps", "1e-6"))
    layers = {"layernorm": partial(torch.nn.LayerNorm, eps=eps), "rms": partial(RmsNorm, eps=eps)}
    if kind not in layers:
        sys.exit(f"error: --norm {norm}: timm's VisionTransformer takes layernorm or rms here")
    c, h, _ = input_shape
    return VisionTransformer(img_size=h, patch_size=patch, in_chans=c, num_classes=classes, embed_dim=d,
                             depth=depth, num_heads=heads, mlp_ratio=ratio, norm_layer=layers[kind])


def main():
    ckpt = sys.argv[1]
    data_dir = sys.argv[2] if len(sys.argv) > 2 else "/usr/share/datasets/fashion-mnist"
    with safe_open(ckpt, "pt") as f:
        meta = f.metadata()
    spec = json.loads(meta["normlab.model"])
    stats = json.loads(meta["normlab.input_norm"])
    model = timm_vit(spec["model"], spec["norm"], spec["input"], spec["classes"])
    model.load_state_dict(load_file(ckpt), strict=True)
    model.eval()
    images = load(data_dir, "t10k-images-idx3-ubyte").astype(np.float32)
    x = torch.from_numpy((images / 255.0 - stats["mean"]) / stats["std"]).float().unsqueeze(1)
    with torch.no_grad():
        logits = torch.cat([model(b) for b in x.split(500)])
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "logits.safetensors")
        exe = os.environ.get("NORMLAB", "target/release/normlab")
        subprocess.run([exe, "eval", "--checkpoint", ckpt, "--data", data_dir, "--logits", out],
                       check=True, capture_output=True, text=True)
        ours = load_file(out)["logits"]
    differ = int((logits.argmax(1) != ours.argmax(1)).sum())
    diff = float((logits - ours).abs().max())
    print(f"timm strict load ok: {spec['model']} --norm {spec['norm']}")
    print(f"{len(x)} test images: {differ} predicted classes differ; largest logit difference {diff:.2e}")
    sys.exit(0 if differ == 0 and diff <= 1e-4 else 1)


if __name__ == "__main__":
    main()
