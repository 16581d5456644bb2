#!/usr/bin/env python3
"""Check normlab's ONNX export against ONNX Runtime: for each checkpoint, export it (and, where
it has BatchNorm, export it folded), pass onnx.checker.check_model (full_check), run it in ONNX
Runtime on the test images, and compare with `normlab eval --logits` on the same checkpoint:
largest |logit difference| at most 1e-4 and the same predicted class for every image.

  .venv-torch/bin/python scripts/check_onnx.py --normlab target/release/normlab \
      --work /tmp/onnx-check CHECKPOINT [CHECKPOINT ...] [--data DIR] [--test-limit N]

Exit status 0 only when every checkpoint and form passes; one line per check on stdout.
"""
import argparse
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
from safetensors.numpy import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fmnist_torch import load  # noqa: E402

TOLERANCE = 1e-4


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    return p.returncode, (p.stdout + p.stderr).strip()


def check(args, ckpt, fold, images, tag):
    suffix = "-folded" if fold else ""
    onnx_path = os.path.join(args.work, f"{tag}{suffix}.onnx")
    logits_path = os.path.join(args.work, f"{tag}{suffix}.logits.safetensors")
    fold_flag = ["--fold"] if fold else []
    code, out = run([args.normlab, "export", "--checkpoint", ckpt, "--out", onnx_path, "--force"] + fold_flag)
    if code != 0:
        nothing = ("no BatchNorm layers to fold", "nothing to fold")
        return None if fold and any(n in out for n in nothing) else f"export failed: {out}"
    limit = ["--test-limit", str(args.test_limit)] if args.test_limit else []
    code, out = run([args.normlab, "eval", "--checkpoint", ckpt, "--logits", logits_path, "--force",
                     "--data", args.data] + fold_flag + limit)
    if code != 0:
        return f"normlab eval failed: {out}"
    expected = load_file(logits_path)["logits"]
    model = onnx.load(onnx_path)
    onnx.checker.check_model(model, full_check=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
    x = images[: expected.shape[0]]
    got = np.concatenate([sess.run(["logits"], {"image": x[i:i + 1000]})[0] for i in range(0, len(x), 1000)])
    diff = float(np.abs(got.astype(np.float64) - expected).max())
    same = int((got.argmax(1) == expected.argmax(1)).sum())
    ok = diff <= TOLERANCE and same == len(x)
    nodes = len(model.graph.node)
    line = (f"{'PASS' if ok else 'FAIL'} {tag}{suffix}: {nodes} nodes, opset {model.opset_import[0].version}, "
            f"max |logit diff| {diff:.2e} over {len(x)} images, same class {same}/{len(x)}")
    return line


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--normlab", default="target/release/normlab")
    ap.add_argument("--work", required=True)
    ap.add_argument("--data", default=os.environ.get("NORMLAB_DATA", "/usr/share/datasets/fashion-mnist"))
    ap.add_argument("--test-limit", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    raw = load(args.data, "t10k-images-idx3-ubyte").astype(np.float32) / 255.0
    images = raw[:, None, :, :]
    failed = 0
    for i, ckpt in enumerate(args.checkpoints):
        tag = f"{i}-" + os.path.basename(os.path.dirname(os.path.abspath(ckpt)))
        for fold in (False, True):
            line = check(args, ckpt, fold, images, tag)
            if line is None:
                print(f"skip {tag}-folded: nothing to fold")
                continue
            if not line.startswith("PASS"):
                failed += 1
                if not line.startswith("FAIL"):
                    line = f"FAIL {tag}{'-folded' if fold else ''}: {line}"
            print(line, flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
