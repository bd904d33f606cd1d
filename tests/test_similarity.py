import math

import numpy as np
import pytest
import torch

from mambamorph.similarity import (MIND_OFFSET_PAIRS, lncc_loss, mi_loss, mind_ssc,
                                   mind_ssd_loss, mutual_information, sampled_mind_ssd_loss,
                                   warped_mind_ssd_loss)


def _smooth_image(shape, seed, dtype=torch.float32):
    """A smooth random image in [0, 1] (random noise blurred by three 3^3 box filters)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, *shape, generator=g, dtype=torch.float64)
    for _ in range(3):
        x = torch.nn.functional.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False)
    x = (x - x.min()) / (x.max() - x.min())
    return x.to(dtype)


# ---------------------------------------------------------------------------------- MIND-SSC

def test_mind_offsets_are_the_twelve_sqrt2_pairs():
    pairs = {frozenset(p) for p in MIND_OFFSET_PAIRS}
    assert len(pairs) == 12
    for a, b in MIND_OFFSET_PAIRS:
        assert sum(abs(v) for v in a) == 1 and sum(abs(v) for v in b) == 1
        assert sum((u - v) ** 2 for u, v in zip(a, b)) == 2  # orthogonal, not opposite


@pytest.mark.parametrize("radius,dilation", [(1, 2), (2, 1), (0, 3), (1, 1)])
def test_mind_matches_convexadam(radius, dilation):
    ca = pytest.importorskip("convexAdam.convex_adam_utils")
    x = _smooth_image((12, 14, 10), seed=radius * 10 + dilation)
    ours = mind_ssc(x, radius, dilation)
    ref = ca.MINDSSC(x, radius, dilation, device="cpu")
    assert ours.shape == (1, 12, 12, 14, 10)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_mind_plain_reference_one_voxel():
    """One channel at one interior voxel, by hand from the definition."""
    x = _smooth_image((9, 9, 9), seed=1, dtype=torch.float64)
    r, d = 1, 2
    out = mind_ssc(x, r, d)
    img = x[0, 0].numpy()
    pad = np.pad(img, d, mode="edge")
    dist = np.zeros((12, 9, 9, 9))
    for c, (a, b) in enumerate(MIND_OFFSET_PAIRS):
        for p in np.ndindex(9, 9, 9):
            qa = tuple(pi + d + d * ai for pi, ai in zip(p, a))
            qb = tuple(pi + d + d * bi for pi, bi in zip(p, b))
            dist[(c, *p)] = (pad[qa] - pad[qb]) ** 2
    dist = np.pad(dist, ((0, 0), (r, r), (r, r), (r, r)), mode="edge")
    box = np.zeros((12, 9, 9, 9))
    for p in np.ndindex(9, 9, 9):
        box[(slice(None), *p)] = dist[:, p[0]:p[0] + 3, p[1]:p[1] + 3, p[2]:p[2] + 3].mean(
            axis=(1, 2, 3))
    box -= box.min(axis=0, keepdims=True)
    var = box.mean(axis=0, keepdims=True)
    var = np.clip(var, 1e-3 * var.mean(), 1e3 * var.mean())
    np.testing.assert_allclose(out[0].numpy(), np.exp(-box / var), rtol=1e-10, atol=1e-12)


def test_mind_invariant_to_affine_intensity_map():
    x = _smooth_image((16, 16, 16), seed=2, dtype=torch.float64)
    ref = mind_ssc(x)
    for a, b in ((2.0, 0.5), (0.1, -3.0), (-1.0, 1.0)):
        torch.testing.assert_close(mind_ssc(a * x + b), ref, rtol=1e-9, atol=1e-10)


def test_mind_shifted_image_gives_shifted_features():
    x = _smooth_image((24, 24, 24), seed=3, dtype=torch.float64)
    t = (2, -1, 3)
    shifted = torch.roll(x, shifts=t, dims=(2, 3, 4))
    fa, fb = mind_ssc(x), mind_ssc(shifted)
    # roll wraps around; compare the interior, far from the wrapped faces and replicate borders.
    # The per-image variance clamp bound depends on the global mean, which barely changes.
    m = 7
    a = fa[..., m:-m, m:-m, m:-m]
    b = fb[..., m + t[0]:24 - m + t[0], m + t[1]:24 - m + t[1], m + t[2]:24 - m + t[2]]
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_mind_constant_image_and_range():
    ones = mind_ssc(torch.full((1, 1, 6, 6, 6), 0.3))
    assert torch.equal(ones, torch.ones_like(ones))
    f = mind_ssc(_smooth_image((10, 10, 10), seed=4))
    assert f.min() > 0 and f.max() <= 1
    assert torch.allclose(f.max(dim=1).values, torch.ones(1, 10, 10, 10))  # the min-subtraction


def test_mind_gradcheck():
    x = _smooth_image((5, 6, 5), seed=5, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: mind_ssc(v, 1, 1), (x,))


def test_mind_bad_input():
    with pytest.raises(ValueError, match="mind_ssc"):
        mind_ssc(torch.rand(1, 2, 4, 4, 4))
    with pytest.raises(ValueError, match="dilation"):
        mind_ssc(torch.rand(1, 1, 4, 4, 4), dilation=0)


@pytest.mark.parametrize("shape,radius,dilation", [((1, 1, 9, 10, 11), 1, 2),
                                                    ((2, 1, 5, 6, 7), 0, 1),
                                                    ((1, 1, 8, 3, 8), 2, 3),
                                                    ((1, 1, 1, 6, 2), 1, 1),
                                                    ((1, 1, 2, 1, 5), 1, 2)])
def test_mind_cpu_kernels_match_the_definition(shape, radius, dilation):
    """The numba path (mind_ssc of a CPU image without gradient) equals the torch definition:
    float64 to 1e-12, float32 to float rounding; borders (replicate padding), offsets beyond
    an axis, and axes of one and two voxels (the radius-1 box kernel's edge cases) included."""
    from mambamorph.similarity import _mind_ssc_torch
    from mambamorph.similarity_cpu import mind_ssc_cpu

    g = torch.Generator().manual_seed(5)
    x = torch.rand(shape, dtype=torch.float64, generator=g) * 300 - 40
    fast = mind_ssc_cpu(x, radius, dilation)
    assert fast.shape == (shape[0], 12, *shape[2:]) and fast.dtype == torch.float64
    assert torch.allclose(fast, _mind_ssc_torch(x, radius, dilation), atol=1e-12, rtol=0)
    assert torch.equal(mind_ssc(x, radius, dilation), fast)  # the path mind_ssc takes
    x32 = x.float()
    assert torch.allclose(mind_ssc_cpu(x32, radius, dilation),
                          _mind_ssc_torch(x32, radius, dilation), atol=2e-5, rtol=0)
    flat = mind_ssc_cpu(torch.full(shape, 3.0), radius, dilation)  # constant: exp(0) = 1
    assert torch.equal(flat, torch.ones_like(flat))


def test_mind_ssd_values():
    a = mind_ssc(_smooth_image((10, 10, 10), seed=6))
    b = mind_ssc(_smooth_image((10, 10, 10), seed=7))
    assert mind_ssd_loss(a, a).item() == 0.0
    expected = (a - b).square().sum(dim=1).mean()
    assert mind_ssd_loss(a, b).item() == pytest.approx(expected.item(), rel=1e-6)
    # a mask keeps only its voxels
    mask = torch.zeros(1, 1, 10, 10, 10)
    mask[..., :5, :, :] = 1
    part = (a - b).square().sum(dim=1)[:, :5].mean()
    assert mind_ssd_loss(a, b, mask).item() == pytest.approx(part.item(), rel=1e-6)
    with pytest.raises(ValueError, match="mind_ssd_loss"):
        mind_ssd_loss(a, b[..., :9])



def test_warped_mind_ssd_fused_path_equals_the_composition():
    """The CPU fast path (descriptors without gradient: fused kernel) and the composition
    (descriptors with gradient: warp then mind_ssd_loss) give one value and one flow gradient."""
    from mambamorph.nn.spatial import warp

    a = mind_ssc(_smooth_image((10, 12, 9), seed=6)).double()
    b = mind_ssc(_smooth_image((10, 12, 9), seed=7)).double()
    flow = (torch.randn(1, 3, 10, 12, 9, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(1)) * 2).requires_grad_()
    for padding_mode in ("border", "zeros"):
        fused = warped_mind_ssd_loss(a, b, flow, padding_mode)
        g_fused, = torch.autograd.grad(fused, flow)
        a_req = a.clone().requires_grad_()  # forces the composition
        comp = warped_mind_ssd_loss(a_req, b, flow, padding_mode)
        g_comp, = torch.autograd.grad(comp, flow)
        plain = mind_ssd_loss(warp(a, flow, padding_mode=padding_mode), b)
        assert fused.item() == pytest.approx(comp.item(), rel=1e-12)
        assert fused.item() == pytest.approx(plain.item(), rel=1e-12)
        assert torch.allclose(g_fused, g_comp, atol=1e-14, rtol=1e-10)
    with pytest.raises(ValueError, match="warped_mind_ssd_loss"):
        warped_mind_ssd_loss(a, b, flow[..., :8])


def test_warped_mind_ssd_fused_path_in_float32_matches_float64():
    """The fused kernel in float32 (what instance optimisation runs; its interior fast path
    sums the channels in the image's dtype, reassociated) against float64, both paddings, a
    field that moves up to several voxels: value and gradient to about 1e-7 relative."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 24, 14, 16, 12, generator=g)
    b = torch.rand(1, 24, 14, 16, 12, generator=g)
    flow = torch.randn(1, 3, 14, 16, 12, generator=g) * 1.5
    for padding_mode in ("border", "zeros"):
        f32 = flow.clone().requires_grad_()
        f64 = flow.double().requires_grad_()
        l32 = warped_mind_ssd_loss(a, b, f32, padding_mode)
        l64 = warped_mind_ssd_loss(a.double(), b.double(), f64, padding_mode)
        g32, = torch.autograd.grad(l32, f32)
        g64, = torch.autograd.grad(l64, f64)
        assert l32.item() == pytest.approx(l64.item(), rel=1e-6)
        assert (g32.double() - g64).abs().max() < 1e-5 * g64.abs().max()


def test_sampled_mind_ssd_fused_path_equals_grid_sample():
    """MIND-SSD at chosen points (inside, outside: border padding) on the CPU fast path and on
    the grid_sample path, float64; and at the points of the whole grid it is the warped loss."""
    g = torch.Generator().manual_seed(4)
    m = torch.rand(1, 6, 9, 10, 8, dtype=torch.float64, generator=g)
    f = torch.rand(1, 6, 4, 5, 4, dtype=torch.float64, generator=g)
    span = torch.tensor([12.0, 13.0, 11.0], dtype=torch.float64).view(1, 3, 1, 1, 1)
    pts = (torch.rand(1, 3, 4, 5, 4, dtype=torch.float64, generator=g) * span - 2.0)
    pts.requires_grad_()
    fused = sampled_mind_ssd_loss(m, f, pts)
    g_fused, = torch.autograd.grad(fused, pts)
    slow = sampled_mind_ssd_loss(m.clone().requires_grad_(), f, pts)  # grid_sample path
    g_slow, = torch.autograd.grad(slow, pts)
    assert fused.item() == pytest.approx(slow.item(), rel=1e-12)
    assert torch.allclose(g_fused, g_slow, atol=1e-14, rtol=1e-10)
    assert g_fused.abs().max() > 0
    flow = torch.randn(1, 3, 9, 10, 8, dtype=torch.float64, generator=g)
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in (9, 10, 8)],
                                      indexing="ij")).unsqueeze(0)
    b = torch.rand(1, 6, 9, 10, 8, dtype=torch.float64, generator=g)
    assert sampled_mind_ssd_loss(m, b, grid + flow).item() == pytest.approx(
        warped_mind_ssd_loss(m, b, flow, "border").item(), rel=1e-12)
    with pytest.raises(ValueError, match="sampled_mind_ssd_loss"):
        sampled_mind_ssd_loss(m, f, pts[..., :3])

# ---------------------------------------------------------------------------------- local NCC

def _ncc_reference(a, b, w, eps):
    """Plain per-voxel loop; windows clipped to the volume."""
    r = w // 2
    cc = np.empty(a.shape)
    for i, j, k in np.ndindex(a.shape):
        win = (slice(max(i - r, 0), i + r + 1), slice(max(j - r, 0), j + r + 1),
               slice(max(k - r, 0), k + r + 1))
        wa, wb = a[win], b[win]
        cov = (wa * wb).mean() - wa.mean() * wb.mean()
        cc[i, j, k] = cov ** 2 / (wa.var() * wb.var() + eps)
    return -cc.mean()


def test_lncc_matches_plain_reference():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(1, 1, 5, 6, 7, generator=g, dtype=torch.float64)
    b = a ** 2 + 0.3 * torch.rand(1, 1, 5, 6, 7, generator=g, dtype=torch.float64)
    for w in (3, 5):
        ref = _ncc_reference(a[0, 0].numpy(), b[0, 0].numpy(), w, 1e-5)
        assert lncc_loss(a, b, window=w).item() == pytest.approx(ref, rel=1e-9)


def test_lncc_values():
    g = torch.Generator().manual_seed(4)
    a = torch.rand(2, 1, 16, 16, 16, generator=g)
    b = torch.rand(2, 1, 16, 16, 16, generator=g)
    # identical or affinely related: -1 up to eps / var^2 (var of U(0,1) windows is ~1/12)
    for other in (a, 2 * a + 3, 1 - a):
        assert lncc_loss(a, other).item() == pytest.approx(-1.0, abs=5e-3)
    # independent noise: the squared correlation of 729 samples is ~1/729
    assert -0.01 < lncc_loss(a, b).item() <= 0.0


def test_lncc_gradients_and_errors():
    a = torch.rand(1, 1, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    b = torch.rand(1, 1, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: lncc_loss(x, y, window=3), (a, b))
    with pytest.raises(ValueError, match="window"):
        lncc_loss(a, b, window=4)
    with pytest.raises(ValueError, match="lncc_loss"):
        lncc_loss(a, b[..., :5])


# ------------------------------------------------------------------------- mutual information

def _entropy(p):
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def test_mi_of_an_image_with_itself_is_its_entropy():
    """Values on bin centres and a narrow kernel: hard bins, MI(a, a) = H(a)."""
    g = torch.Generator().manual_seed(0)
    bins = 8
    k = torch.randint(0, bins, (1, 1, 10, 10, 10), generator=g)
    a = ((k.double() + 0.5) / bins)
    p = np.bincount(k.flatten().numpy(), minlength=bins) / k.numel()
    mi = mutual_information(a, a, bins=bins, sigma=0.05)
    assert mi.item() == pytest.approx(_entropy(p), rel=1e-9)
    # a bijective relabelling of the bins (here 1 - a) keeps all the information
    assert mutual_information(a, 1 - a, bins=bins, sigma=0.05).item() == pytest.approx(
        _entropy(p), rel=1e-9)


def test_mi_analytic_cases():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(1, 1, 20, 20, 20, generator=g, dtype=torch.float64)
    b = torch.rand(1, 1, 20, 20, 20, generator=g, dtype=torch.float64)
    # independent noise: MI ~ (bins-1)^2 / (2 N) bias of the plug-in estimate, here tiny
    assert 0.0 <= mutual_information(a, b, bins=8).item() < 0.01
    # a constant image carries no information about anything
    c = torch.full_like(a, 0.4)
    assert mutual_information(a, c, bins=8).item() == pytest.approx(0.0, abs=1e-12)
    # an increasing map of the intensities keeps most of it; noise removes some
    mi_self = mutual_information(a, a).item()
    assert mutual_information(a, 0.5 * a + 0.25).item() > 0.5 * mi_self
    assert mutual_information(a, 0.5 * a + 0.5 * b).item() < mutual_information(a, a).item()
    # mi_loss is the negative batch mean
    assert mi_loss(a, b, bins=8).item() == pytest.approx(
        -mutual_information(a, b, bins=8).item())


def test_mi_mask_and_gradcheck_and_errors():
    a = torch.rand(1, 1, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    b = torch.rand(1, 1, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: mutual_information(x, y, bins=4), (a, b))
    mask = torch.zeros(1, 1, 4, 4, 4, dtype=torch.float64)
    mask[..., :2, :, :] = 1
    sub = mutual_information(a[..., :2, :, :], b[..., :2, :, :], bins=4)
    torch.testing.assert_close(mutual_information(a, b, bins=4, mask=mask), sub)
    with pytest.raises(ValueError, match="bins"):
        mutual_information(a, b, bins=1)
    with pytest.raises(ValueError, match="one shape"):
        mutual_information(a, b[..., :3])
    assert math.isfinite(mi_loss(a, b).item())
