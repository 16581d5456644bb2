"""The loader's options from Python: a streamed image folder trains as the cached one."""

import numpy as np
import pytest
import torch

import normlab

Image = pytest.importorskip("PIL.Image")


def write_folder(root, n=8):
    rng = np.random.default_rng(0)
    for split in ["train", "test"]:
        for c in ["a", "b"]:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)).save(d / f"{i}.png")


def test_a_streamed_folder_trains_as_the_cached_one(tmp_path):
    write_folder(tmp_path / "data")
    common = dict(model="seed-cnn:4", epochs=2, batch_size=4, data=tmp_path / "data", resize=(8, 8),
                  augment="random-resized-crop,flip", progress=False)
    cached = normlab.train(out=tmp_path / "cached", **common)
    streamed = normlab.train(out=tmp_path / "streamed", cache_limit=0, decode_threads=2, **common)
    a, b = normlab.load_state_dict(cached.checkpoint), normlab.load_state_dict(streamed.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    epoch = streamed.metrics["epochs"][0]
    assert epoch["decoded_images"] == 16 and epoch["loader_images_per_sec"] > 0
    assert cached.metrics["epochs"][0]["decoded_images"] == 0
    fixed = normlab.train(out=tmp_path / "fixed", shuffle=False, **common)
    assert fixed.metrics["config"]["shuffle"] is False
    with pytest.raises(TypeError, match="cache_limit takes a number of bytes"):
        normlab.train(out=tmp_path / "bad", cache_limit="lots", **common)
