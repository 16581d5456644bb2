"""The engine from Python: train in process, resume, Ctrl-C, checkpoints PyTorch loads."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import normlab

DATA = "/usr/share/datasets/fashion-mnist"
needs_data = pytest.mark.skipif(
    not os.path.exists(os.path.join(DATA, "train-images-idx3-ubyte.gz")),
    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)",
)


@needs_data
def test_train_resume_and_load_state_dict(tmp_path):
    out = tmp_path / "run"
    run = normlab.train(
        model="vgg:8,M,16,M", norm="gn:4", epochs=1, train_limit=512, test_limit=256,
        batch_size=64, data=DATA, out=out, progress=False, eval_train=True,
    )
    m = run.metrics
    # eval_train: each epoch's fit, the model in eval mode on its 512 training images.
    fit = m["epochs"][0]["fit"]
    assert fit["loss"] > 0 and 0.0 <= fit["accuracy"] <= 1.0 and m["config"]["eval_train"] is True
    assert m["status"] == "complete" and len(m["epochs"]) == 1
    assert m["config"]["model"] == "vgg:8,M,16,M" and m["config"]["norm"] == "gn:4"
    assert 0.0 <= m["test_accuracy"] <= 1.0
    assert len(run.steps) == 512 // 64 and set(run.steps[0]) >= {"step", "loss", "lr"}
    again = normlab.train(resume=out, epochs=2, progress=False)
    assert len(again.metrics["epochs"]) == 2
    with pytest.raises(ValueError, match="only epochs and threads"):
        normlab.train(resume=out, epochs=3, norm="bn")
    with pytest.raises(TypeError, match="unexpected keyword argument 'epoch'"):
        normlab.train(epoch=1)
    with pytest.raises(ValueError, match="unknown norm spec"):
        normlab.train(norm="bogus")
    with pytest.raises(ValueError, match="sides must be in"):
        normlab.train(resize=(0, 28))
    with pytest.raises(ValueError, match="lr must be > 0"):
        normlab.train(lr=-1.0)
    state = normlab.load_state_dict(run.checkpoint)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert state["conv1.weight"].shape == (8, 1, 3, 3) and state["fc1.weight"].shape == (10, 16 * 7 * 7)
    # The same layers in PyTorch load it strictly.
    twin = torch.nn.Module()
    twin.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1, bias=False)
    twin.bn1 = torch.nn.GroupNorm(4, 8)
    twin.conv2 = torch.nn.Conv2d(8, 16, 3, padding=1, bias=False)
    twin.bn2 = torch.nn.GroupNorm(4, 16)
    twin.fc1 = torch.nn.Linear(16 * 7 * 7, 10)
    twin.load_state_dict(state, strict=True)


@needs_data
def test_a_vit_trains_from_python_with_timms_norm_by_default(tmp_path):
    run = normlab.train(model="vit:16,1,2,7", epochs=1, train_limit=256, test_limit=64, batch_size=64,
                        data=DATA, out=tmp_path / "vit", progress=False)
    assert run.metrics["config"]["norm"] == "layernorm:eps=0.000001"
    state = normlab.load_state_dict(run.checkpoint)
    assert state["pos_embed"].shape == (1, 17, 16) and state["blocks.0.attn.qkv.weight"].shape == (48, 16)
    with pytest.raises(ValueError, match="not divisible by its 3 heads"):
        normlab.train(model="vit:16,1,3,7")


def test_unknown_study_is_a_value_error():
    with pytest.raises(ValueError, match="unknown study"):
        normlab.study("no-such-study", quick=True)


@needs_data
def test_ctrl_c_stops_the_run_resumably(tmp_path):
    out = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import signal
        import normlab
        # Python leaves SIGINT ignored when its parent started it so (a job put in the
        # background by a non-interactive shell, as CI may be): the Ctrl-C handling under test
        # needs Python's own handler.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        normlab.train(epochs=50, train_limit=4096, test_limit=256, data={DATA!r}, out={str(out)!r}, progress=False)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "model.safetensors").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "KeyboardInterrupt: interrupted: the last checkpoint is" in err, err
    assert "normlab.train(resume=" in err
    done = json.loads((out / "metrics.json").read_text())["epochs"]
    assert len(done) >= 1
    run = normlab.train(resume=out, epochs=len(done) + 1, progress=False)
    assert run.metrics["status"] == "complete" and len(run.metrics["epochs"]) == len(done) + 1
