import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mambamorph.errors import InputError
from mambamorph.metrics import dice_per_roi, folding_percent
from mambamorph.nn.spatial import integrate_velocity, voxel_to_grid, warp
from mambamorph.optimize import IOConfig, instance_optimise
from mambamorph.optimize import instance as instance_mod

SHAPE = (32, 32, 32)
FAST = IOConfig(levels=(4, 2), sim_grids=(2, 1), iterations=(30, 30), mind_grid=1,
                mind_dilations=(2,), lam=0.5, sim_strides=(1, 1))


def _blobs(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, *SHAPE, generator=g)
    for _ in range(4):
        x = F.avg_pool3d(x, 5, stride=1, padding=2, count_include_pad=False)
    return (x - x.min()) / (x.max() - x.min())


def _smooth_velocity(seed, amplitude):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(1, 3, 4, 4, 4, generator=g)
    v = F.interpolate(v, size=SHAPE, mode="trilinear", align_corners=True)
    return amplitude * v / v.abs().max()


@pytest.fixture(scope="module")
def pair():
    """Moving image and labels; the fixed image is the moving one warped by a known smooth
    diffeomorphism, with a different (non-linear, decreasing) intensity map."""
    mov = _blobs(0)
    labels = torch.bucketize(mov, torch.tensor([0.3, 0.4, 0.5, 0.6, 0.7])).to(torch.uint8)
    true_flow = integrate_velocity(_smooth_velocity(1, 4.0), 7)
    target = warp(mov, true_flow, padding_mode="border")
    fixed = (1.0 - target) ** 2
    fixed_labels = warp(labels, true_flow, mode="nearest", padding_mode="border")
    return mov, fixed, labels, fixed_labels, target, true_flow


def _dice(a, b):
    return float(np.mean(dice_per_roi(a, b, (1, 2, 3, 4, 5))))


def test_io_recovers_a_known_smooth_warp(pair):
    mov, fixed, labels, fixed_labels, target, _ = pair
    res = instance_optimise(mov, fixed, cfg=FAST)
    assert res.flow.shape == (1, 3, *SHAPE) and res.velocity.shape == (1, 3, *SHAPE)
    assert len(res.loss_curve) == 60 and res.loss_curve[-1] < res.loss_curve[30]  # last level
    assert not res.stopped_early and res.seconds > 0
    before_mse = float((mov - target).square().mean())
    after_mse = float((warp(mov, res.flow, padding_mode="border") - target).square().mean())
    assert after_mse < 0.5 * before_mse
    before = _dice(labels, fixed_labels)
    after = _dice(warp(labels, res.flow, mode="nearest", padding_mode="border"), fixed_labels)
    assert after > before + 0.05
    assert folding_percent(res.flow) == 0.0
    # final="full": the flow is the exponential of the returned velocity
    torch.testing.assert_close(res.flow, integrate_velocity(res.velocity, 7))



def test_io_on_sub_lattices_recovers_the_warp_too(pair):
    """sim_strides: the similarity on one of the 8 sub-lattices of stride 2 per iteration; the
    known warp is recovered about as well as with every voxel (same settings otherwise)."""
    mov, fixed, labels, fixed_labels, target, _ = pair
    cfg = IOConfig(**{**FAST.__dict__, "sim_strides": (1, 2)})
    res = instance_optimise(mov, fixed, cfg=cfg)
    full = instance_optimise(mov, fixed, cfg=FAST)
    assert not res.stopped_early and folding_percent(res.flow) == 0.0
    before = _dice(labels, fixed_labels)
    after = _dice(warp(labels, res.flow, mode="nearest", padding_mode="border"), fixed_labels)
    after_full = _dice(warp(labels, full.flow, mode="nearest", padding_mode="border"),
                       fixed_labels)
    assert after > before + 0.05 and after > after_full - 0.02
    # the first level (stride 1) is untouched by the second level's stride
    assert res.loss_curve[:30] == full.loss_curve[:30]


def test_io_config_from_json():
    cfg = IOConfig.from_json('{"lam": 1.2, "sim_strides": [1, 2]}')
    assert cfg == IOConfig(lam=1.2, sim_strides=(1, 2))
    assert IOConfig.from_json("") == IOConfig()
    with pytest.raises(InputError, match="unknown fields"):
        IOConfig.from_json('{"lambda": 1}')
    with pytest.raises(InputError, match="not JSON"):
        IOConfig.from_json("{lam: 1}")
    with pytest.raises(InputError, match="JSON object"):
        IOConfig.from_json("[1, 2]")


def test_lattice_order_visits_every_sub_lattice_once_per_cycle():
    for k in (1, 2, 3):
        order = instance_mod._lattice_order(k)
        assert sorted(order) == sorted(__import__("itertools").product(range(k), repeat=3))
    assert instance_mod._lattice_order(2)[:2] == [(0, 0, 0), (0, 1, 1)]


def test_lattice_points_read_the_upsampled_field_exactly():
    """The displacement IO reads at a sub-lattice's points (three 1D interpolations of the
    control grid) equals the control field upsampled to the similarity grid (_upsample_field)
    and sliced, and grid_sample with border padding at those points, values and gradients;
    the fixed descriptors and the points are that lattice's."""
    g = torch.Generator().manual_seed(3)
    u = torch.randn(1, 3, 6, 7, 5, dtype=torch.float64, generator=g)
    ff = torch.rand(1, 4, 24, 28, 20, dtype=torch.float64, generator=g)
    full = instance_mod._upsample_field(u, 4.0, (24, 28, 20))
    lattices = instance_mod._lattices(ff, 2, 4.0, (6, 7, 5))
    assert len(lattices) == 8
    for (f_o, base, weights), o in zip(lattices, instance_mod._lattice_order(2)):
        sl = (slice(None), slice(None), slice(o[0], None, 2), slice(o[1], None, 2),
              slice(o[2], None, 2))
        ua = u.clone().requires_grad_(True)
        disp = instance_mod._read_separable(ua, weights) * 4.0
        torch.testing.assert_close(disp, full[sl], atol=1e-12, rtol=0)
        ub = u.clone().requires_grad_(True)
        coarse = (base + 0.5) / 4.0 - 0.5
        ref = F.grid_sample(ub, voxel_to_grid(coarse, (6, 7, 5)), mode="bilinear",
                            padding_mode="border", align_corners=True) * 4.0
        torch.testing.assert_close(disp, ref, atol=1e-12, rtol=0)
        w = torch.randn(disp.shape, dtype=torch.float64, generator=g)
        (disp * w).sum().backward()
        (ref * w).sum().backward()
        torch.testing.assert_close(ua.grad, ub.grad, atol=1e-12, rtol=0)
        assert torch.equal(f_o, ff[sl])
        assert torch.equal(base[0, :, 0, 0, 0], torch.tensor(o, dtype=torch.float64))
        assert torch.equal(base[0, 0, 1, 0, 0] - base[0, 0, 0, 0, 0], torch.tensor(2.0,
                                                                                   dtype=torch.float64))


def test_axis_weights_clamp_at_the_border_and_sum_to_one():
    w = instance_mod._axis_weights(torch.tensor([-0.7, 0.0, 0.25, 2.5, 3.0, 4.2],
                                                dtype=torch.float64), 4)
    torch.testing.assert_close(w.sum(1), torch.ones(6, dtype=torch.float64))
    assert w[0, 0] == 1 and w[1, 0] == 1 and w[4, 3] == 1 and w[5, 3] == 1
    torch.testing.assert_close(w[2, :2], torch.tensor([0.75, 0.25], dtype=torch.float64))
    torch.testing.assert_close(w[3, 2:], torch.tensor([0.5, 0.5], dtype=torch.float64))
    one = instance_mod._axis_weights(torch.tensor([-1.0, 0.3, 2.0]), 1)  # an axis of one voxel
    assert torch.equal(one, torch.ones(3, 1))


def test_io_starts_from_a_given_velocity(pair):
    mov, fixed, *_ = pair
    v = _smooth_velocity(2, 1.5)
    # no iterations, no smoothing, full grid: the result is the start's exponential
    cfg = IOConfig(levels=(1,), sim_grids=(1,), iterations=(0,), mind_grid=1, smooth_passes=0,
                   sim_strides=(1,))
    res = instance_optimise(mov, fixed, init_velocity=v, cfg=cfg)
    torch.testing.assert_close(res.velocity, v)
    torch.testing.assert_close(res.flow, integrate_velocity(v, 7))
    # a start on the grid pooled by 2 (coarse voxels) is carried to the image grid
    half = F.avg_pool3d(v, 2) / 2
    res = instance_optimise(mov, fixed, init_velocity=half, cfg=cfg)
    err = (res.velocity - v).abs()  # pooling + upsampling error (a missed x2 would give ~0.4)
    assert err.mean() < 0.02 and err.max() < 0.25
    # a displacement start (first-order log) lands near the same field
    res = instance_optimise(mov, fixed, init_flow=integrate_velocity(v, 7), cfg=cfg)
    assert (res.flow - integrate_velocity(v, 7)).abs().max() < 0.5


def test_io_network_start_improves_on_it(pair):
    """A start halfway to the truth is improved, not thrown away."""
    mov, fixed, labels, fixed_labels, target, _ = pair
    half = 0.5 * _smooth_velocity(1, 4.0)
    start_dice = _dice(warp(labels, integrate_velocity(half, 7), mode="nearest",
                            padding_mode="border"), fixed_labels)
    res = instance_optimise(mov, fixed, init_velocity=half, cfg=FAST)
    after = _dice(warp(labels, res.flow, mode="nearest", padding_mode="border"), fixed_labels)
    assert after > start_dice


def test_io_nan_loss_returns_the_last_finite_state(pair, monkeypatch):
    mov, fixed, *_ = pair
    calls = {"n": 0}
    real = instance_mod.warped_mind_ssd_loss

    def flaky(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out * float("nan") if calls["n"] >= 5 else out

    monkeypatch.setattr(instance_mod, "warped_mind_ssd_loss", flaky)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        res = instance_optimise(mov, fixed, cfg=FAST)
    assert res.stopped_early and len(res.loss_curve) == 4
    assert torch.isfinite(res.flow).all() and torch.isfinite(res.velocity).all()
    assert folding_percent(res.flow) == 0.0


def test_io_bad_input(pair):
    mov, fixed, *_ = pair
    with pytest.raises(InputError, match="moving image is constant"):
        instance_optimise(torch.zeros_like(mov), fixed, cfg=FAST)
    with pytest.raises(InputError, match="fixed image is constant"):
        instance_optimise(mov, torch.full_like(fixed, 0.7), cfg=FAST)
    bad = fixed.clone()
    bad[0, 0, 3, 3, 3] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        instance_optimise(mov, bad, cfg=FAST)
    with pytest.raises(InputError, match="level factor 3"):
        instance_optimise(mov, fixed, cfg=IOConfig(levels=(3,), sim_grids=(1,), iterations=(1,),
                                                   mind_grid=1))
    with pytest.raises(InputError, match="one iteration count"):
        instance_optimise(mov, fixed, cfg=IOConfig(levels=(4, 2), iterations=(1,)))
    with pytest.raises(InputError, match="similarity strides"):  # default strides: 2 levels
        instance_optimise(mov, fixed, cfg=IOConfig(levels=(4,), sim_grids=(2,), iterations=(1,)))
    with pytest.raises(InputError, match="stride 2 does not fit"):  # a 1-voxel similarity grid
        instance_optimise(mov, fixed, cfg=IOConfig(levels=(32,), sim_grids=(32,),
                                                   iterations=(1,), sim_strides=(2,)))
    with pytest.raises(InputError, match="pooled by an integer factor"):
        instance_optimise(mov, fixed, init_velocity=torch.zeros(1, 3, 10, 10, 10), cfg=FAST)
    with pytest.raises(InputError, match=r"\(1, 1, D0, D1, D2\)"):
        instance_optimise(mov[0], fixed, cfg=FAST)
