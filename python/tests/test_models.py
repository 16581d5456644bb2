"""Whole models: `convert` trains like the unconverted model, SyncBatchNorm over two gloo
processes equals one process on the whole batch, `recalibrate` is PreciseBN."""

import copy
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import normlab.torch as nt
from conftest import assert_close


class Mixed(nn.Module):
    """A model mixing BatchNorm2d, GroupNorm, InstanceNorm2d with running statistics,
    LayerNorm and BatchNorm1d."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            # No bias before a norm that removes it (its gradient would be 0 and its value noise).
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.GroupNorm(4, 8),
            nn.ReLU(),
            nn.Conv2d(8, 6, 3, padding=1, bias=False),
            nn.InstanceNorm2d(6, affine=True, track_running_stats=True),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.LayerNorm(24), nn.ReLU(), nn.Linear(24, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5)
        )

    def forward(self, x):
        return self.head(self.features(x))


def test_convert_swaps_every_norm_and_trains_like_the_original():
    torch.manual_seed(0)
    theirs = Mixed()
    ours = nt.convert(copy.deepcopy(theirs))
    kinds = {type(m) for m in ours.modules()}
    assert {nt.BatchNorm2d, nt.GroupNorm, nt.InstanceNorm2d, nt.LayerNorm, nt.BatchNorm1d} <= kinds
    assert not kinds & {nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d, nn.LayerNorm, nn.BatchNorm1d}
    assert list(ours.state_dict()) == list(theirs.state_dict())
    opt_t = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9)
    for step in range(10):
        x = torch.randn(16, 3, 8, 8)
        labels = torch.randint(0, 5, (16,))
        losses = []
        for model, opt in ((theirs, opt_t), (ours, opt_o)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), labels)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[1] - losses[0]) <= 1e-5 * abs(losses[0]), f"step {step}: {losses}"
    for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        if a.dtype == torch.long:
            assert torch.equal(a, b), k
        else:
            assert_close(a, b, 1e-4, k)


def test_convert_keeps_the_very_parameter_tensors_and_mode():
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).eval()
    w = m[1].weight
    nt.convert(m)
    assert isinstance(m[1], nt.BatchNorm2d) and m[1].weight is w and not m[1].training
    single = nt.convert(nn.GroupNorm(2, 4))
    assert isinstance(single, nt.GroupNorm)
    synced = nt.convert(nn.Sequential(nn.BatchNorm2d(4), nn.BatchNorm1d(3)), sync=True)
    assert all(isinstance(x, nt.SyncBatchNorm) for x in synced)


def test_recalibrate_is_the_equal_weight_average_of_batch_statistics():
    torch.manual_seed(1)
    for cls in (nn.BatchNorm2d, nt.BatchNorm2d):
        model = nn.Sequential(nn.Conv2d(2, 3, 3), cls(3), nn.Dropout(0.5)).train()
        batches = [torch.randn(8, 2, 6, 6) * (i + 1) for i in range(5)]
        used = nt.recalibrate(model, [(x, 0) for x in batches], batches=4)
        assert used == 4 and model.training and model[1].momentum == 0.1
        with torch.no_grad():
            feats = [model[0](x) for x in batches[:4]]
        mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
        var = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in feats]).mean(0)
        assert_close(model[1].running_mean, mean, 1e-5, "running_mean")
        assert_close(model[1].running_var, var, 1e-5, "running_var")
        assert model[1].num_batches_tracked.item() == 4
    with pytest.raises(ValueError, match="no BatchNorm"):
        nt.recalibrate(nn.Linear(2, 2), [torch.zeros(1, 2)])


# --- SyncBatchNorm over two gloo processes ----------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_worker(rank, world, port, x, g, state, out_dir):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        m = nt.SyncBatchNorm(x.shape[2])
        m.load_state_dict(state)
        half = x.shape[1] // world
        results = {}
        for step in range(3):
            xs = x[step, rank * half:(rank + 1) * half].clone().requires_grad_()
            y = m(xs)
            y.backward(g[step, rank * half:(rank + 1) * half])
            grads = torch.cat([m.weight.grad, m.bias.grad])
            dist.all_reduce(grads)  # the summed parameter gradients (DDP's job)
            results[step] = (y.detach(), xs.grad, grads.clone())
            m.weight.grad = m.bias.grad = None
        results["state"] = m.state_dict()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_syncbatchnorm_over_two_gloo_processes_equals_one_process_on_the_whole_batch():
    torch.manual_seed(2)
    steps, n, c = 3, 12, 5
    x = torch.randn(steps, n, c, 6, 6) * 2 + 0.5
    g = torch.randn(steps, n, c, 6, 6)
    ref = nn.BatchNorm2d(c)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    state = copy.deepcopy(ref.state_dict())
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_sync_worker, args=(2, _free_port(), x, g, state, out), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(2)]
    for step in range(steps):
        xr = x[step].clone().requires_grad_()
        y = ref(xr)
        y.backward(g[step])
        y_sync = torch.cat([ranks[r][step][0] for r in range(2)])
        dx_sync = torch.cat([ranks[r][step][1] for r in range(2)])
        assert_close(y_sync, y, 1e-5, f"output, step {step}")
        assert_close(dx_sync, xr.grad, 1e-5, f"input gradient, step {step}")
        for r in range(2):
            assert_close(ranks[r][step][2], torch.cat([ref.weight.grad, ref.bias.grad]), 1e-5, "summed γ, β gradients")
        ref.weight.grad = ref.bias.grad = None
    for r in range(2):
        for k, v in ref.state_dict().items():
            got = ranks[r]["state"][k]
            if v.dtype == torch.long:
                assert torch.equal(got, v), k
            else:
                assert_close(got, v, 1e-5, f"rank {r} {k}")
