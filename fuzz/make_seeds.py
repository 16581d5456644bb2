#!/usr/bin/env python3
"""Writes the fuzz targets' seed inputs into fuzz/seeds/<target>/ (small valid files that the
fuzzers mutate). Run from the repository root: python3 fuzz/make_seeds.py"""
import gzip, json, os, struct

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")

def write(target, name, data):
    d = os.path.join(root, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)

def idx(dims, payload):
    return bytes([0, 0, 8, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims) + payload

images = idx([2, 3, 3], bytes(range(18)))
labels = idx([2], bytes([1, 7]))
write("idx", "images", images)
write("idx", "labels", labels)
write("idx", "images.gz", gzip.compress(images, mtime=0))
write("idx", "images-two-members.gz", gzip.compress(images[:9], mtime=0) + gzip.compress(images[9:], mtime=0))

def safetensors(tensors, metadata):
    header, data = {"__metadata__": metadata}, b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data

f32 = lambda *v: struct.pack(f"<{len(v)}f", *v)
spec = {"model": "seed-cnn:1", "norm": "bn", "input": [1, 2, 2], "classes": 2, "dropout": 0.0}
meta = {"format": "pt", "normlab.model": json.dumps(spec), "normlab.input_norm": json.dumps({"mean": 0.5, "std": 0.25}),
        "normlab.epoch": "1"}
write("checkpoint", "seed-cnn-1", safetensors([
    ("conv1.weight", "F32", [1, 1, 3, 3], f32(*[0.1 * i for i in range(9)])),
    ("bn1.weight", "F32", [1], f32(1.0)),
    ("bn1.bias", "F32", [1], f32(0.0)),
    ("bn1.running_mean", "F32", [1], f32(0.0)),
    ("bn1.running_var", "F32", [1], f32(1.0)),
    ("bn1.num_batches_tracked", "I64", [], struct.pack("<q", 3)),
    ("fc1.weight", "F32", [2, 1], f32(0.5, -0.5)),
    ("fc1.bias", "F32", [2], f32(0.0, 0.1)),
], meta))

for i, s in enumerate(["seed-cnn|bn", "seed-cnn:3|ghost:2", "vgg:16,M,32,M|gn:4", "vgg|brn:rmax=3,dmax=5,warmup=10",
                       "resnet|bn:momentum=none,eps=1e-3", "mlp|layernorm", "seed-cnn|in:affine=true,track=true",
                       "seed-cnn|bn-noisy", "resnet:1,2,3,4,5,6|ln:eps=1e-6", "mlp|none"]):
    write("specs", f"spec{i}", s.encode())

# CIFAR-10: two records (label, then 3x32x32 bytes) and the meta file's class names.
write("cifar", "batch", bytes([3] + [7] * 3072 + [9] + list(range(256)) * 12))
write("cifar", "meta", b"airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n")

# Images: grey, RGB and 16-bit PNGs (tiny.jpg is written by tests/fuzz_smoke.rs's write_jpeg_seed).
import zlib
def png(w, h, colour_type, depth, raw_row):
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    raw = b"".join(b"\x00" + raw_row for _ in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, colour_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
write("image", "grey.png", png(4, 3, 0, 8, bytes([10, 20, 30, 40])))
write("image", "rgb.png", png(2, 2, 2, 8, bytes([255, 0, 0, 0, 255, 0])))
write("image", "grey16.png", png(2, 2, 0, 16, bytes([1, 2, 3, 4])))

# A commit record's run log: two step rows of epoch 1 and a |gamma| histogram.
f64 = lambda *v: struct.pack(f"<{len(v)}d", *v)
write("run_log", "record", safetensors([
    ("log.steps", "F64", [2, 6], f64(1, 1, 2.3, 0.1, 100.0, 1.7e9, 2, 1, 2.1, 0.1, 110.0, 1.7e9 + 1)),
    ("log.gamma.1.bn1", "F32", [3], f32(0.5, 1.0, 1.5)),
], {"format": "pt"}))
