import pytest
import torch


def rel_err(a, b):
    """max |a − b| / max |b| (b the reference)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def assert_close(a, b, rel, what=""):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    e = rel_err(a, b)
    assert e <= rel, f"{what}: relative error {e:.2e} > {rel:.0e}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
