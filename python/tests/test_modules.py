"""Every drop-in module against its PyTorch counterpart: random shapes and batch sizes 1..64,
train and eval, output within 1e-5 relative, every gradient within 1e-4, running statistics
after several steps within 1e-5. normlab's own variants against normlab's engine layer."""

import random

import numpy as np
import pytest
import torch
from torch import nn

import normlab.functional as NF
import normlab.torch as nt
from conftest import assert_close

STEPS = 4


class _NoFallback:
    """Stands in for torch.nn.functional inside normlab.torch: a call means the module fell back
    to PyTorch's op where normlab's kernels should have run."""

    def __getattr__(self, name):
        def refuse(*args, **kwargs):
            raise AssertionError(f"normlab.torch fell back to torch.nn.functional.{name}")

        return refuse


@pytest.fixture
def native_only(monkeypatch):
    monkeypatch.setattr(nt, "F", _NoFallback())


def shapes_2d(rng, min_batch=1):
    for _ in range(4):
        yield rng.randint(min_batch, 64), rng.randint(1, 12), rng.randint(1, 9), rng.randint(1, 9)


def compare(ours, theirs, make_input, steps=STEPS, eval_too=True):
    """Runs both modules `steps` training steps on the same inputs and output gradients, then
    once in eval mode; checks outputs, input and parameter gradients, and buffers."""
    ours.load_state_dict(theirs.state_dict())
    with torch.no_grad():
        for p in list(ours.parameters()) + list(theirs.parameters()):
            pass
        for po, pt in zip(ours.parameters(), theirs.parameters()):
            v = torch.rand_like(pt) + 0.5
            po.copy_(v)
            pt.copy_(v)
    modes = [True] * steps + ([False] if eval_too else [])
    for step, training in enumerate(modes):
        ours.train(training)
        theirs.train(training)
        x = make_input()
        xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yt = ours(xo), theirs(xt)
        assert_close(yo, yt, 1e-5, f"output, step {step}, training={training}")
        g = torch.randn_like(yt)
        yo.backward(g)
        yt.backward(g)
        assert_close(xo.grad, xt.grad, 1e-4, f"input gradient, step {step}")
        for (n, po), pt in zip(ours.named_parameters(), theirs.parameters()):
            assert_close(po.grad, pt.grad, 1e-4, f"{n} gradient, step {step}")
            po.grad, pt.grad = None, None
    for (n, bo), bt in zip(ours.named_buffers(), theirs.buffers()):
        if bo.dtype == torch.long:
            assert bo.item() == bt.item(), n
        else:
            assert_close(bo, bt, 1e-5, n)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm2d(momentum, affine, native_only):
    rng = random.Random(1)
    for n, c, h, w in shapes_2d(rng):
        if n * h * w == 1:
            n = 2
        theirs = nn.BatchNorm2d(c, momentum=momentum, affine=affine)
        ours = nt.BatchNorm2d(c, momentum=momentum, affine=affine)
        compare(ours, theirs, lambda: torch.randn(n, c, h, w) * 3 + 1)


def test_batchnorm2d_without_running_stats(native_only):
    theirs = nn.BatchNorm2d(5, track_running_stats=False)
    ours = nt.BatchNorm2d(5, track_running_stats=False)
    compare(ours, theirs, lambda: torch.randn(6, 5, 4, 4))


@pytest.mark.parametrize("length", [None, 7])
def test_batchnorm1d(length, native_only):
    rng = random.Random(2)
    for _ in range(4):
        n, c = rng.randint(2, 64), rng.randint(1, 40)
        shape = (n, c) if length is None else (n, c, length)
        compare(nt.BatchNorm1d(c), nn.BatchNorm1d(c), lambda: torch.randn(shape) * 2 - 1)


def test_syncbatchnorm_in_one_process_is_batchnorm(native_only):
    compare(nt.SyncBatchNorm(6), nn.BatchNorm2d(6), lambda: torch.randn(10, 6, 5, 5))


@pytest.mark.parametrize("affine", [True, False])
def test_groupnorm(affine, native_only):
    rng = random.Random(3)
    for n, _, h, w in shapes_2d(rng):
        groups = rng.choice([1, 2, 4])
        c = groups * rng.randint(1, 6)
        compare(nt.GroupNorm(groups, c, affine=affine), nn.GroupNorm(groups, c, affine=affine), lambda: torch.randn(n, c, h, w))


@pytest.mark.parametrize("normalized", [(7,), (4, 5), (3, 4, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_layernorm(normalized, bias, native_only):
    rng = random.Random(4)
    for _ in range(3):
        n = rng.randint(1, 64)
        shape = (n, 3, 4, 5)[: 4 - len(normalized)] if len(normalized) < 3 else (n,)
        shape = (n,) + normalized if len(normalized) == 3 else (n, 3) + normalized
        compare(nt.LayerNorm(normalized, bias=bias), nn.LayerNorm(normalized, bias=bias), lambda: torch.randn(shape) * 4)


@pytest.mark.parametrize("affine,track", [(False, False), (True, False), (True, True), (False, True)])
def test_instancenorm2d(affine, track, native_only):
    rng = random.Random(5)
    for n, c, h, w in shapes_2d(rng):
        if h * w == 1:
            h = 2
        compare(
            nt.InstanceNorm2d(c, affine=affine, track_running_stats=track),
            nn.InstanceNorm2d(c, affine=affine, track_running_stats=track),
            lambda: torch.randn(n, c, h, w) + 0.5,
        )


def test_instancenorm1d(native_only):
    compare(nt.InstanceNorm1d(4, affine=True, track_running_stats=True), nn.InstanceNorm1d(4, affine=True, track_running_stats=True), lambda: torch.randn(9, 4, 11))


def test_frozen_batchnorm2d_matches_the_eval_batchnorm(native_only):
    ref = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        ref.running_mean.uniform_(-1, 1)
        ref.running_var.uniform_(0.5, 2)
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    frozen = nt.FrozenBatchNorm2d(6)
    state = {k: v for k, v in ref.state_dict().items()}
    frozen.load_state_dict(state)  # num_batches_tracked is dropped, as torchvision does
    assert sorted(frozen.state_dict()) == ["bias", "running_mean", "running_var", "weight"]
    x = torch.randn(7, 6, 5, 5, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = frozen(x), ref(x2)
    assert_close(y, y2, 1e-5, "output")
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    assert_close(x.grad, x2.grad, 1e-4, "input gradient")
    assert list(frozen.parameters()) == []
    assert repr(frozen) == "FrozenBatchNorm2d(6, eps=1e-05)"


def test_state_dict_keys_and_constructor_defaults_are_pytorchs():
    pairs = [
        (nt.BatchNorm2d(3), nn.BatchNorm2d(3)),
        (nt.BatchNorm1d(3, momentum=None), nn.BatchNorm1d(3, momentum=None)),
        (nt.GroupNorm(2, 4), nn.GroupNorm(2, 4)),
        (nt.LayerNorm([4, 5]), nn.LayerNorm([4, 5])),
        (nt.InstanceNorm2d(3), nn.InstanceNorm2d(3)),
        (nt.InstanceNorm2d(3, affine=True, track_running_stats=True), nn.InstanceNorm2d(3, affine=True, track_running_stats=True)),
        (nt.SyncBatchNorm(3), nn.SyncBatchNorm(3)),
    ]
    for ours, theirs in pairs:
        assert isinstance(ours, type(theirs))
        assert list(ours.state_dict()) == list(theirs.state_dict())
        assert repr(ours) == repr(theirs)
        ours.load_state_dict(theirs.state_dict(), strict=True)


def test_channels_last_input_gives_channels_last_output_and_the_same_values(native_only):
    x = torch.randn(4, 8, 6, 6)
    ours, theirs = nt.BatchNorm2d(8), nn.BatchNorm2d(8)
    xl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    xt = x.clone().requires_grad_()
    y, yt = ours(xl), theirs(xt)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, yt, 1e-5, "output")
    g = torch.randn_like(yt)
    y.backward(g)
    yt.backward(g)
    assert_close(xl.grad, xt.grad, 1e-4, "input gradient")


def test_other_dtypes_fall_back_to_pytorch():
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    ours, theirs = nt.BatchNorm2d(3).double(), nn.BatchNorm2d(3).double()
    assert torch.equal(ours(x), theirs(x))
    g1, g2 = nt.GroupNorm(1, 3).double(), nn.GroupNorm(1, 3).double()
    assert torch.equal(g1(x), g2(x))


def errors(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the type and text are what is compared
        return type(e), str(e)
    return None


@pytest.mark.parametrize(
    "make",
    [
        lambda m: m(nn.BatchNorm2d, nt.BatchNorm2d, (4,), torch.randn(2, 3, 5, 5)),  # wrong channels
        lambda m: m(nn.BatchNorm2d, nt.BatchNorm2d, (3,), torch.randn(1, 3, 1, 1)),  # batch of one
        lambda m: m(nn.BatchNorm1d, nt.BatchNorm1d, (3,), torch.randn(1, 3)),  # batch of one
        lambda m: m(nn.BatchNorm2d, nt.BatchNorm2d, (3,), torch.randint(0, 5, (2, 3, 4, 4))),  # not float
        lambda m: m(nn.BatchNorm2d, nt.BatchNorm2d, (3,), torch.randn(2, 3)),  # wrong rank
        lambda m: m(nn.GroupNorm, nt.GroupNorm, (2, 4), torch.randn(2, 6, 3, 3)),  # wrong channels
        lambda m: m(nn.GroupNorm, nt.GroupNorm, (2, 4), torch.randint(0, 5, (2, 4, 3, 3))),  # not float
        lambda m: m(nn.LayerNorm, nt.LayerNorm, ([4, 5],), torch.randn(2, 5, 4)),  # wrong shape
        lambda m: m(nn.InstanceNorm2d, nt.InstanceNorm2d, (3,), torch.randn(2, 3, 1, 1)),  # one spatial value
    ],
)
def test_bad_input_raises_pytorchs_own_exception(make):
    def both(theirs_cls, ours_cls, args, x):
        return errors(lambda: theirs_cls(*args)(x)), errors(lambda: ours_cls(*args)(x))

    theirs, ours = make(both)
    assert theirs is not None
    assert ours == theirs


def test_engine_errors_are_python_exceptions():
    import normlab._native as native

    x = np.zeros((4, 3, 2, 2), np.float32)
    with pytest.raises(ValueError, match="virtual batch 3 does not divide"):
        native.bn_train_forward(x, np.empty_like(x), None, None, 1e-5, 3)
    with pytest.raises(ValueError, match="C-contiguous"):
        native.bn_train_forward(x.transpose(0, 1, 3, 2), np.empty_like(x), None, None, 1e-5)
    with pytest.raises(ValueError, match="weight has 2 values, expected 3"):
        native.bn_train_forward(x, np.empty_like(x), np.ones(2, np.float32), None, 1e-5)
    with pytest.raises(TypeError):
        native.bn_train_forward(x.astype(np.float64), np.empty_like(x), None, None, 1e-5)
    with pytest.raises(ValueError, match="empty"):
        native.bn_channel_stats(np.zeros((0, 3), np.float32))
    with pytest.raises(ValueError, match="divisible by num_groups"):
        native.gn_train_forward(x, np.empty_like(x), 4, 3, 4, 2, 1e-5, None, None)
    with pytest.raises(ValueError, match="does not cover"):
        native.gn_train_forward(x, np.empty_like(x), 4, 3, 5, 1, 1e-5, None, None)
    with pytest.raises(ValueError, match="unknown norm spec"):
        NF.norm("bogus", x)


# --- normlab's own variants, against the engine's layer (`normlab layer`, via numpy) ------------


def engine_steps(spec, module, inputs, grads, virtual=None):
    """Runs the engine's layer for `spec` step by step from the module's state, feeding its
    buffers forward, and the module on the same data; compares everything."""
    state = {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}
    state["num_batches_tracked"] = int(state.get("num_batches_tracked", 0))
    for step, (x, g) in enumerate(zip(inputs, grads)):
        out = NF.norm(spec, x.numpy(), dy=g.numpy(), **state)
        xt = x.clone().requires_grad_()
        y = module(xt)
        y.backward(g)
        assert_close(y, torch.from_numpy(out["y"]), 1e-5, f"{spec} output, step {step}")
        assert_close(xt.grad, torch.from_numpy(out["dx"]), 1e-4, f"{spec} input gradient, step {step}")
        assert_close(module.weight.grad, torch.from_numpy(out["dweight"]), 1e-4, f"{spec} dweight")
        assert_close(module.bias.grad, torch.from_numpy(out["dbias"]), 1e-4, f"{spec} dbias")
        module.weight.grad = module.bias.grad = None
        now = module.state_dict()
        for k in [k for k in state if k.startswith("running_")]:
            assert_close(now[k], torch.from_numpy(out[k]), 1e-5, f"{spec} {k}, step {step}")
            state[k] = out[k]
        assert module.num_batches_tracked.item() == out["num_batches_tracked"]
        state["num_batches_tracked"] = out["num_batches_tracked"]
    module.eval()
    x = inputs[0] * 0.5
    out = NF.norm(spec, x.numpy(), training=False, **state)
    assert_close(module(x), torch.from_numpy(out["y"]), 1e-5, f"{spec} eval output")


def data(n, c, h, w, steps=4):
    return [torch.randn(n, c, h, w) * 2 + 1 for _ in range(steps)], [torch.randn(n, c, h, w) for _ in range(steps)]


def with_random_affine(m):
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-1, 1)
    return m


def test_ghost_batchnorm_is_the_engines_ghost_bn():
    xs, gs = data(12, 5, 4, 4)
    engine_steps("ghost:4", with_random_affine(nt.GhostBatchNorm2d(5, 4)), xs, gs)


def test_batch_renorm_is_the_engines_brn():
    xs, gs = data(8, 3, 5, 5, steps=6)
    engine_steps("brn:rmax=2,dmax=1,warmup=4", with_random_affine(nt.BatchRenorm2d(3, rmax=2, dmax=1, warmup=4)), xs, gs)


@pytest.mark.parametrize("p,spec", [(1, "bn-l1"), (float("inf"), "bn-linf")])
def test_lp_batchnorm_is_the_engines_lp_bn(p, spec):
    xs, gs = data(6, 4, 3, 3)
    engine_steps(spec, with_random_affine(nt.LpBatchNorm2d(4, p=p)), xs, gs)


def test_plain_bn_spec_agrees_with_pytorch_too():
    xs, gs = data(6, 4, 3, 3, steps=3)
    engine_steps("bn", with_random_affine(nt.BatchNorm2d(4)), xs, gs)


def test_double_backward_raises_instead_of_giving_zero():
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    y = nt.BatchNorm2d(3)(x)
    (g,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad|double backward"):
        g.sum().backward()
