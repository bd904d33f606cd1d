"""Tests of mambamorph.losses: analytic values, a plain reference, gradients, bad input."""

import numpy as np
import pytest
import torch

from mambamorph.losses import SMOOTH_WEIGHT, grad_l2, soft_dice_loss
from mambamorph.similarity import lncc_loss

SHAPE = (6, 8, 10)


def _box(shape, sl):
    m = torch.zeros(shape)
    m[sl] = 1.0
    return m


# ---------------------------------------------------------------- soft Dice

def _two_channel(a0, a1):
    return torch.stack([a0, a1])[None]  # (1, 2, D0, D1, D2)


A = _box(SHAPE, (slice(0, 4), slice(None), slice(None)))       # 4 of 6 slabs
HALF = _box(SHAPE, (slice(2, 6), slice(None), slice(None)))    # overlaps A on 2 of 4 slabs
DISJ = _box(SHAPE, (slice(4, 6), slice(None), slice(None)))    # 2 slabs, no overlap with A
EMPTY = torch.zeros(SHAPE)


@pytest.mark.parametrize("pred, target, expected", [
    (_two_channel(A, 1 - A), _two_channel(A, 1 - A), -1.0),                    # identical
    (_two_channel(A, DISJ), _two_channel(DISJ, A), 0.0),                       # disjoint
    (_two_channel(A, A), _two_channel(HALF, A), -(0.5 + 1.0) / 2),             # half overlap
    (_two_channel(A, EMPTY), _two_channel(A, EMPTY), -0.5),                    # empty counts 0
    (_two_channel(0.5 * A, A), _two_channel(A, A), -(2 * 0.5 / 1.5 + 1) / 2),  # soft values
])
def test_soft_dice_table(pred, target, expected):
    out = soft_dice_loss(pred, target)
    assert out.shape == ()
    assert out.item() == pytest.approx(expected, abs=1e-6)


def test_soft_dice_mean_over_batch_and_symmetry():
    pred = torch.cat([_two_channel(A, A), _two_channel(A, DISJ)])     # (2, 2, ...)
    target = torch.cat([_two_channel(A, A), _two_channel(HALF, DISJ)])
    # item 0: dice 1, 1; item 1: dice 0.5, 1
    assert soft_dice_loss(pred, target).item() == pytest.approx(-3.5 / 4, abs=1e-6)
    assert soft_dice_loss(target, pred).item() == pytest.approx(-3.5 / 4, abs=1e-6)


def test_soft_dice_matches_plain_reference():
    g = torch.Generator().manual_seed(1)
    pred = torch.rand(2, 3, *SHAPE, generator=g, dtype=torch.float64)
    target = (torch.rand(2, 3, *SHAPE, generator=g) > 0.5).double()
    p, t = pred.numpy(), target.numpy()
    ref = np.mean([[2 * (p[b, k] * t[b, k]).sum() / max((p[b, k] + t[b, k]).sum(), 1e-5)
                    for k in range(3)] for b in range(2)])
    assert soft_dice_loss(pred, target).item() == pytest.approx(-ref, rel=1e-12)


def test_soft_dice_gradients():
    g = torch.Generator().manual_seed(2)
    pred = torch.rand(1, 2, 3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.rand(1, 2, 3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(soft_dice_loss, (pred, target))
    # a larger prediction inside the target lowers the loss: negative gradient there
    pred32 = _two_channel(0.5 * A, 0.5 * A).requires_grad_()
    soft_dice_loss(pred32, _two_channel(A, A)).backward()
    assert torch.all(pred32.grad[_two_channel(A, A) > 0] < 0)


def test_soft_dice_float16_volume_does_not_overflow():
    big = torch.ones(1, 1, 48, 48, 48, dtype=torch.float16)  # sums of 2 * 110592 > fp16 max
    assert soft_dice_loss(big, big).item() == pytest.approx(-1.0, abs=1e-6)


def test_soft_dice_bad_shapes():
    with pytest.raises(ValueError, match="soft_dice_loss"):
        soft_dice_loss(torch.zeros(1, 2, *SHAPE), torch.zeros(1, 3, *SHAPE))


# ---------------------------------------------------------------- gradient l2

def _ramp(channel, axis, slope, c=3):
    x = torch.arange(SHAPE[axis], dtype=torch.float64)
    view = [1, 1, 1]
    view[axis] = -1
    f = torch.zeros(1, c, *SHAPE, dtype=torch.float64)
    f[0, channel] = slope * x.view(view).expand(SHAPE)
    return f


@pytest.mark.parametrize("channel, axis", [(0, 0), (1, 2), (2, 1), (0, 2)])
@pytest.mark.parametrize("slope", [1.0, -0.5, 3.0])
def test_grad_l2_linear_ramp(channel, axis, slope):
    # one channel of 3 is a ramp along one axis: that axis' mean is slope^2 / 3 (one channel of
    # three), the other axes are 0, so the average over the three axes is slope^2 / 9
    assert grad_l2(_ramp(channel, axis, slope)).item() == pytest.approx(slope ** 2 / 9, rel=1e-12)


def test_grad_l2_constant_is_zero_and_matches_numpy():
    assert grad_l2(torch.full((2, 3, *SHAPE), 4.2)).item() == 0.0
    f = torch.randn(2, 3, *SHAPE, dtype=torch.float64)
    ref = np.mean([np.mean(np.diff(f.numpy(), axis=ax) ** 2) for ax in (2, 3, 4)])
    assert grad_l2(f).item() == pytest.approx(ref, rel=1e-12)


def test_grad_l2_gradients_and_weight():
    f = torch.randn(1, 3, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(grad_l2, (f,))
    assert SMOOTH_WEIGHT == pytest.approx(0.1 * 2)


@pytest.mark.parametrize("shape", [(1, 3, 4, 4), (1, 3, 1, 4, 4)])
def test_grad_l2_bad_shape(shape):
    with pytest.raises(ValueError, match="grad_l2"):
        grad_l2(torch.zeros(shape))


@pytest.mark.gpu
def test_losses_under_cuda_float16_autocast():
    dev = torch.device("cuda")
    big = torch.ones(1, 2, 48, 48, 48, device=dev, dtype=torch.float16)
    with torch.autocast("cuda", dtype=torch.float16):
        assert soft_dice_loss(big, big).item() == pytest.approx(-1.0, abs=1e-6)
        f = _ramp(0, 1, 2.0).to(dev).half()
        assert grad_l2(f).item() == pytest.approx(4.0 / 9, rel=1e-3)
        a = torch.rand(1, 1, 16, 16, 16, device=dev).half()
        assert lncc_loss(a, 2 * a + 1).item() == pytest.approx(-1.0, abs=5e-3)


def test_multiscale_dice_scale_one_is_the_paper_loss():
    from mambamorph.losses import multiscale_label_dice_loss
    from mambamorph.nn.spatial import warp

    g = torch.Generator().manual_seed(0)
    lab = torch.randint(0, 3, (1, 16, 16, 16), generator=g)
    a = torch.nn.functional.one_hot(lab, 3).permute(0, 4, 1, 2, 3).float()
    b = torch.roll(a, 2, dims=2)
    flow = 0.5 * torch.randn(1, 3, 16, 16, 16, generator=g)
    ref = soft_dice_loss(warp(a, flow), b)
    assert torch.allclose(multiscale_label_dice_loss(a, b, flow, (1,)), ref)


def test_multiscale_dice_pulls_from_further_away():
    """A blob shifted by 4 voxels: the pooled scale's gradient at zero flow reaches more voxels
    than the full-resolution one; every scale is perfect at the true shift."""
    from mambamorph.losses import multiscale_label_dice_loss

    a = torch.zeros(1, 1, 32, 32, 32)
    a[..., 8:20, 8:20, 8:20] = 1
    b = torch.roll(a, 4, dims=2)
    flow = torch.zeros(1, 3, 32, 32, 32, requires_grad=True)
    g1, = torch.autograd.grad(multiscale_label_dice_loss(a, b, flow, (1,)), flow)
    g4, = torch.autograd.grad(multiscale_label_dice_loss(a, b, flow, (4,)), flow)
    assert (g4[:, 0].abs() > 0).sum() > (g1[:, 0].abs() > 0).sum()
    true = torch.zeros(1, 3, 32, 32, 32)
    true[:, 0] = -4.0  # fixed(x) = moving(x - 4)
    assert multiscale_label_dice_loss(a, b, true, (1, 2, 4)).item() < -0.999


def test_multiscale_dice_rejects_bad_scale():
    from mambamorph.errors import InputError
    from mambamorph.losses import multiscale_label_dice_loss

    a = torch.zeros(1, 2, 12, 12, 12)
    with pytest.raises(InputError, match="does not divide"):
        multiscale_label_dice_loss(a, a, torch.zeros(1, 3, 12, 12, 12), (5,))
    with pytest.raises(InputError):
        multiscale_label_dice_loss(a, a, torch.zeros(1, 3, 12, 12, 12), ())
