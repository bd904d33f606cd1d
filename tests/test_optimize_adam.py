"""The pair optimisers' Adam (mambamorph.optimize.adam) against torch.optim.Adam, and why it
exists: using it does not import torch._dynamo."""

import math
import subprocess
import sys

import pytest
import torch

from mambamorph.optimize.adam import Adam, cosine_lr


def _loss(a, b):
    return (a ** 2).sum() * 0.5 + torch.sin(b).sum() + (a.sum() * b.sum()) ** 2 * 0.01


def test_adam_matches_torch_adam_with_a_cosine_schedule():
    torch.manual_seed(0)
    start = [torch.randn(5, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    ours = [t.clone().requires_grad_() for t in start]
    ref = [t.clone().requires_grad_() for t in start]
    total = 25
    opt = Adam(ours, lr=[0.1, 0.03])
    ref_opt = torch.optim.Adam([{"params": [ref[0]], "lr": 0.1}, {"params": [ref[1]], "lr": 0.03}])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, total, eta_min=0.0)
    for i in range(total):
        opt.zero_grad()
        _loss(*ours).backward()
        opt.step(cosine_lr(i, total))
        ref_opt.zero_grad()
        _loss(*ref).backward()
        ref_opt.step()
        sched.step()
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert not torch.equal(ours[0], start[0])  # it moved


def test_adam_leaves_a_tensor_without_gradient_alone_and_checks_its_step_sizes():
    a = torch.ones(3, requires_grad=True)
    b = torch.ones(2, requires_grad=True)
    opt = Adam([a, b], lr=0.5)
    a.sum().backward()
    opt.step()
    assert torch.allclose(a.detach(), torch.full((3,), 0.5))  # first Adam step: lr * sign(grad)
    assert torch.equal(b.detach(), torch.ones(2))
    with pytest.raises(ValueError, match="2 step sizes for 1 tensors"):
        Adam([a], lr=[0.1, 0.2])


def test_cosine_lr_ends_and_starts_where_the_schedule_does():
    assert cosine_lr(0, 30) == 1.0
    assert cosine_lr(15, 30) == pytest.approx(0.5)
    assert cosine_lr(30, 30) == pytest.approx(0.0, abs=1e-15)
    assert cosine_lr(10, 30) == pytest.approx(0.5 * (1 + math.cos(math.pi / 3)))


def test_the_pair_optimisers_do_not_import_torch_dynamo():
    """torch.optim imports torch._dynamo on first use (1.3-1.6 CPU s per process); the affine
    stage and instance optimisation, which every register command runs, must not."""
    code = (
        "import sys, numpy as np, torch\n"
        "from mambamorph import io\n"
        "from mambamorph.optimize import IOConfig, instance_optimise\n"
        "from mambamorph.optimize.affine import align_affine\n"
        "rng = np.random.default_rng(0)\n"
        "a = np.diag([2.0, 2.0, 2.0, 1.0])\n"
        "m, f = (rng.random((16, 16, 16)).astype(np.float32) for _ in range(2))\n"
        "align_affine(io.Volume.from_array(m, a), io.Volume.from_array(f, a), iterations=2)\n"
        "cfg = IOConfig(levels=(4,), sim_grids=(2,), iterations=(2,), sim_strides=(1,))\n"
        "instance_optimise(torch.from_numpy(m)[None, None], torch.from_numpy(f)[None, None],\n"
        "                  cfg=cfg)\n"
        "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "False"
