"""The engine from Python: ``train`` a run, run a ``study``, read a checkpoint.

These call normlab's library in this process (not a subprocess): the GIL is released while
training, a progress bar shows on a terminal, each epoch's row is printed through
``sys.stdout`` (a notebook cell shows it), and Ctrl-C raises ``KeyboardInterrupt`` after the
current step, leaving the run folder resumable (``train(resume=folder)``), as in the shell.
"""

import csv
import json
import os

from . import _native

__all__ = ["Run", "train", "study", "load_state_dict"]


class Run:
    """A run folder: ``.metrics`` (metrics.json as a dict), ``.steps`` (steps.csv rows as dicts
    of floats), ``.checkpoint`` (the path of model.safetensors), ``.config`` (its settings)."""

    def __init__(self, folder):
        self.folder = os.fspath(folder)

    @property
    def checkpoint(self):
        return os.path.join(self.folder, "model.safetensors")

    @property
    def metrics(self):
        with open(os.path.join(self.folder, "metrics.json")) as f:
            return json.load(f)

    @property
    def config(self):
        return self.metrics["config"]

    @property
    def steps(self):
        path = os.path.join(self.folder, "steps.csv")
        if not os.path.exists(path):
            return []
        with open(path, newline="") as f:
            return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]

    def state_dict(self):
        """The checkpoint's tensors (``load_state_dict``)."""
        return load_state_dict(self.checkpoint)

    def __repr__(self):
        m = self.metrics
        return (
            f"Run({self.folder!r}: {m['config']['model']} {m['config']['norm']}, "
            f"{len(m['epochs'])} epochs, test accuracy {m['test_accuracy']:.4f}, {m['status']})"
        )


def train(model=None, norm=None, *, out=None, resume=None, progress=True, **options):
    """Trains like ``normlab train`` and returns the ``Run``.

    The keyword arguments are the CLI's options with ``_`` for ``-`` and the same defaults:
    ``model="seed-cnn"``, ``norm="bn"``, ``epochs=10``, ``batch_size=128``,
    ``optimizer="adam"``, ``lr`` (1e-3 for adam, 0.01 for sgd), ``momentum``, ``nesterov``,
    ``weight_decay``, ``no_decay_norm_bias``, ``schedule``, ``warmup``, ``seed``, ``threads``,
    ``train_limit``, ``test_limit``, ``data``, ``sparsity``, ``gamma_init``, ``dropout``,
    ``init_scale``, ``init_from``, ``augment``, ``resize=(h, w)``, ``tensorboard``, ``eval_train``,
    ``freeze_bn``, and the loader's ``cache_limit`` (bytes; 0 streams image folders and shards
    from disk), ``decode_threads``, ``skip_bad_images``, ``shuffle`` (default True) and
    ``shuffle_buffer``. ``out`` is the run folder (default ``runs/<model>-<norm>``, never an
    existing run); ``resume=folder`` continues a run (only ``epochs`` and ``threads`` may be
    given with it).
    """
    if model is not None:
        options["model"] = model
    if norm is not None:
        options["norm"] = norm
    if out is not None:
        out = os.fspath(out)
    if resume is not None:
        resume = os.fspath(resume)
    folder = _native.train_run(out=out, resume=resume, progress=progress, **options)
    return Run(folder)


def study(name, *, quick=False, seeds=3, out=None, data=None, threads=None, progress=True):
    """Runs ``normlab study NAME`` and returns its claims (results.json's ``claims``, each a
    dict with the claim, its verdict and the numbers behind it). The folder (default
    ``studies/<name>``) holds results.json, results.csv, the plots and report.html."""
    folder = _native.study_run(
        name,
        quick=quick,
        seeds=seeds,
        out=None if out is None else os.fspath(out),
        data=None if data is None else os.fspath(data),
        threads=threads,
        progress=progress,
    )
    with open(os.path.join(folder, "results.json")) as f:
        return json.load(f).get("claims", [])


def load_state_dict(path):
    """A normlab checkpoint (or any safetensors state dict of float32/int64 tensors) as a dict
    PyTorch's ``load_state_dict`` takes: torch tensors when torch is installed, else numpy."""
    arrays = _native.read_state_dict(os.fspath(path))
    try:
        import torch
    except ImportError:
        return arrays
    return {k: torch.from_numpy(v) for k, v in arrays.items()}
