#!/usr/bin/env python3
"""Read a normlab run's TensorBoard events back with the tensorboard package's own reader and
check them against the run's steps.csv and metrics.json: every per-step scalar (train/loss,
train/lr, train/images_per_sec, train/data_wait_seconds, train/loader_images_per_sec) at every step, the per-epoch scalars, and one |γ| histogram per
norm layer per epoch whose count is the layer's channels.

  .venv-torch/bin/python scripts/check_tensorboard.py RUN_DIR

Exit status 0 when everything matches; the first mismatch is printed otherwise.
"""
import csv
import json
import os
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def fail(msg):
    sys.exit(f"FAIL: {msg}")


def close(a, b):
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


def main():
    run = sys.argv[1]
    acc = EventAccumulator(os.path.join(run, "tb"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    with open(os.path.join(run, "steps.csv")) as f:
        steps = list(csv.DictReader(f))
    with open(os.path.join(run, "metrics.json")) as f:
        metrics = json.load(f)
    for tag, col in [("train/loss", "loss"), ("train/lr", "lr"), ("train/images_per_sec", "images_per_sec"),
                     ("train/data_wait_seconds", "data_wait_s"), ("train/loader_images_per_sec", "loader_images_per_sec")]:
        if tag not in tags["scalars"]:
            fail(f"no scalar {tag} (tags: {tags['scalars']})")
        events = acc.Scalars(tag)
        if [e.step for e in events] != [int(r["step"]) for r in steps]:
            fail(f"{tag}: steps differ from steps.csv")
        for e, r in zip(events, steps):
            # Event values are float32.
            if abs(e.value - float(r[col])) > 1e-4 * max(1.0, abs(float(r[col]))):
                fail(f"{tag} at step {e.step}: {e.value} vs steps.csv {r[col]}")
    for key in ["train_loss", "train_accuracy", "test_loss", "test_accuracy", "data_wait_seconds",
                "loader_images_per_sec"]:
        events = acc.Scalars(f"epoch/{key}")
        want = [(m["epoch"], m[key]) for m in metrics["epochs"]]
        got = [(e.step, e.value) for e in events]
        # Event values are float32: a relative tolerance for the large rates.
        if len(got) != len(want) or any(g[0] != w[0] or abs(g[1] - w[1]) > 1e-5 * max(1.0, abs(w[1]))
                                         for g, w in zip(got, want)):
            fail(f"epoch/{key}: {got} vs metrics.json {want}")
    histos = [t for t in tags["histograms"] if t.startswith("gamma_abs/")]
    if not histos:
        fail("no gamma_abs/* histograms")
    for t in histos:
        events = acc.Histograms(t)
        if [e.step for e in events] != [m["epoch"] for m in metrics["epochs"]]:
            fail(f"{t}: one histogram per epoch expected, got steps {[e.step for e in events]}")
        for e in events:
            v = e.histogram_value
            if v.num <= 0 or sum(v.bucket) != v.num or v.min < 0:
                fail(f"{t} epoch {e.step}: bad histogram {v}")
    print(f"PASS {run}: {len(steps)} steps x 5 scalars, {len(metrics['epochs'])} epochs x 6 scalars, "
          f"{len(histos)} |γ| histograms per epoch ({', '.join(sorted(histos))})")


if __name__ == "__main__":
    main()
