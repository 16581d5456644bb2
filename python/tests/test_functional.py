"""normlab.functional on numpy arrays against torch.nn.functional and autograd."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import normlab.functional as NF
from conftest import assert_close


def t(a):
    return torch.from_numpy(np.asarray(a))


def autograd(fn, x, params, dy):
    x = torch.from_numpy(x.copy()).requires_grad_()
    ps = [None if p is None else torch.from_numpy(p.copy()).requires_grad_() for p in params]
    y = fn(x, *ps)
    y.backward(torch.from_numpy(dy))
    return y.detach(), x.grad, [None if p is None else p.grad for p in ps]


RNG = np.random.default_rng(0)


def rand(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_and_its_backward(training):
    x, dy = rand(9, 4, 5, 5, scale=3), rand(9, 4, 5, 5)
    w, b = rand(4) + 1, rand(4)
    rm, rv = rand(4), np.abs(rand(4)) + 0.5
    rm_t, rv_t = t(rm.copy()), t(rv.copy())
    y = NF.batch_norm(x, rm, rv, w, b, training=training, momentum=0.2)
    ref, dx_ref, (dw_ref, db_ref) = autograd(
        lambda x, w, b: F.batch_norm(x, rm_t, rv_t, w, b, training=training, momentum=0.2), x, [w, b], dy
    )
    assert_close(t(y), ref, 1e-5, "y")
    assert_close(t(rm), rm_t, 1e-5, "running_mean")
    assert_close(t(rv), rv_t, 1e-5, "running_var")
    dx, dw, db = NF.batch_norm_backward(dy, x, w, rm_t.numpy(), rv_t.numpy(), training=training)
    assert_close(t(dx), dx_ref, 1e-4, "dx")
    assert_close(t(dw), dw_ref, 1e-4, "dw")
    assert_close(t(db), db_ref, 1e-4, "db")


def test_group_layer_and_instance_norm_and_their_backward():
    x, dy = rand(5, 6, 4, 3, scale=2), rand(5, 6, 4, 3)
    w, b = rand(6) + 1, rand(6)
    ref, dx_ref, (dw_ref, db_ref) = autograd(lambda x, w, b: F.group_norm(x, 3, w, b), x, [w, b], dy)
    assert_close(t(NF.group_norm(x, 3, w, b)), ref, 1e-5, "group_norm")
    for got, want in zip(NF.group_norm_backward(dy, x, 3, w), (dx_ref, dw_ref, db_ref)):
        assert_close(t(got), want, 1e-4, "group_norm backward")

    lw, lb = rand(4, 3) + 1, rand(4, 3)
    ref, dx_ref, (dw_ref, db_ref) = autograd(lambda x, w, b: F.layer_norm(x, (4, 3), w, b), x, [lw, lb], dy)
    assert_close(t(NF.layer_norm(x, (4, 3), lw, lb)), ref, 1e-5, "layer_norm")
    for got, want in zip(NF.layer_norm_backward(dy, x, (4, 3), lw), (dx_ref, dw_ref, db_ref)):
        assert_close(t(got), want, 1e-4, "layer_norm backward")

    rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
    rm_t, rv_t = t(rm.copy()), t(rv.copy())
    ref, dx_ref, (dw_ref, db_ref) = autograd(
        lambda x, w, b: F.instance_norm(x, rm_t, rv_t, w, b, use_input_stats=True, momentum=0.3), x, [w, b], dy
    )
    assert_close(t(NF.instance_norm(x, rm, rv, w, b, momentum=0.3)), ref, 1e-5, "instance_norm")
    assert_close(t(rm), rm_t, 1e-5, "instance running_mean")
    assert_close(t(rv), rv_t, 1e-5, "instance running_var")
    for got, want in zip(NF.instance_norm_backward(dy, x, w), (dx_ref, dw_ref, db_ref)):
        assert_close(t(got), want, 1e-4, "instance_norm backward")


def test_norm_runs_any_spec_through_the_engine_layer():
    x, dy = rand(8, 4, 3, 3), rand(8, 4, 3, 3)
    out = NF.norm("gn:2", x, dy)
    ref, dx_ref, (dw_ref, db_ref) = autograd(
        lambda x, w, b: F.group_norm(x, 2, w, b), x, [np.ones(4, np.float32), np.zeros(4, np.float32)], dy
    )
    assert_close(t(out["y"]), ref, 1e-5, "y")
    assert_close(t(out["dx"]), dx_ref, 1e-4, "dx")
    assert_close(t(out["dweight"]), dw_ref, 1e-4, "dweight")
    out = NF.norm("bn", x, running_mean=np.zeros(4, np.float32), running_var=np.ones(4, np.float32), num_batches_tracked=3)
    assert out["num_batches_tracked"] == 4
    with pytest.raises(ValueError, match="ghost needs a virtual batch size"):
        NF.norm("ghost", x)


def test_bad_arrays_raise_one_clear_exception():
    with pytest.raises(TypeError, match="float32"):
        NF.batch_norm(np.zeros((4, 3)), None, None, training=True)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        NF.batch_norm(np.zeros((1, 3), np.float32), None, None, training=True)
    with pytest.raises(ValueError, match="divisible by num_groups"):
        NF.group_norm(np.zeros((2, 5, 3), np.float32), 2)
    with pytest.raises(ValueError, match="normalized_shape"):
        NF.layer_norm(np.zeros((2, 5, 3), np.float32), (5,))
    with pytest.raises(ValueError, match=r"weight has 2 values, expected 3"):
        NF.batch_norm(np.zeros((4, 3), np.float32), None, None, np.ones(2, np.float32), training=True)
