"""Tests of mambamorph.metrics: analytic tables, brute-force references, MONAI and SimpleITK."""

import time
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.distance import cdist

from mambamorph.labels import ROI_IDS
from mambamorph.runtime import PeakMemory, Timer, timed
from mambamorph.metrics import (compressed_percent, dice_per_roi, folding_percent, hd95,
                                hd95_per_roi, jacobian_determinant, sdlogj, surface_distances)

# ---------------------------------------------------------------------------------- helpers


def _coords(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape],
                                indexing="ij"))


def _ball_pair(r1, r2, spacing, margin=3.0):
    """Two concentric balls of radii r1 < r2 mm, built in mm space on a grid of ``spacing``."""
    extent = r2 + margin
    shape = [int(np.ceil(2 * extent / s)) + 1 for s in spacing]
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    g = np.meshgrid(*axes, indexing="ij")
    r = np.sqrt(sum(x ** 2 for x in g))
    return r <= r1, r <= r2


def _random_blobs(shape, seed, level=0.6):
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    return noise > level * noise.std()


def _surface_plain(mask):
    """A voxel of the mask with a 6-neighbour outside it (the array outside is background)."""
    p = np.pad(mask, 1)
    core = tuple(slice(1, -1) for _ in range(mask.ndim))
    out = np.zeros_like(mask)
    for axis in range(mask.ndim):
        for step in (-1, 1):
            out |= ~np.roll(p, step, axis=axis)[core]
    return mask & out


def _hd95_brute(a, b, spacing, variant):
    pa = np.argwhere(_surface_plain(a)) * np.asarray(spacing)
    pb = np.argwhere(_surface_plain(b)) * np.asarray(spacing)
    d = cdist(pa, pb)
    d_ab, d_ba = d.min(axis=1), d.min(axis=0)
    if variant == "pooled":
        return np.percentile(np.concatenate([d_ab, d_ba]), 95)
    return max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))


# ---------------------------------------------------------------------------------- Dice

def test_dice_per_roi_values():
    a = np.zeros((4, 4, 4), dtype=np.int16)
    b = np.zeros_like(a)
    a[:2], b[:1] = 2, 2      # ROI 2: |A| = 32, |B| = 16, overlap 16 -> 2*16/48
    a[3], b[3] = 3, 3        # ROI 3: identical
    b[2] = 4                 # ROI 4: only in b
    d = dice_per_roi(a, b)
    assert d.shape == (len(ROI_IDS),)
    assert d[0] == pytest.approx(2 / 3) and d[1] == 1.0 and d[2] == 0.0
    assert np.isnan(d[3:]).all()


# ---------------------------------------------------------------------------------- HD95

@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 1.0, 2.5), (0.8, 1.2, 2.0)])
@pytest.mark.parametrize("r1, r2", [(5.0, 10.0), (6.0, 12.0), (4.0, 7.0)])
@pytest.mark.parametrize("variant", ["pooled", "max"])
def test_hd95_concentric_balls(spacing, r1, r2, variant):
    # surface voxels of a digital ball of radius r lie at radii in (r - max(spacing), r] (each
    # has a 6-neighbour outside, one spacing further at most), so the distances between the two
    # surfaces are within one voxel of r2 - r1: the tolerance is the largest spacing.
    a, b = _ball_pair(r1, r2, spacing)
    hd = hd95(a, b, spacing, variant=variant)
    assert abs(hd - (r2 - r1)) <= max(spacing)
    assert hd95(b, a, spacing, variant=variant) == pytest.approx(hd)


@pytest.mark.parametrize("p, q, spacing", [
    ((1, 2, 3), (4, 2, 1), (1.0, 1.0, 1.0)),
    ((1, 2, 3), (4, 2, 1), (0.5, 2.0, 2.5)),
    ((0, 0, 0), (5, 6, 7), (1.0, 1.5, 3.0)),
])
def test_hd95_single_voxels_is_their_distance(p, q, spacing):
    a = np.zeros((6, 7, 8), dtype=bool)
    b = np.zeros_like(a)
    a[p], b[q] = True, True
    expected = float(np.linalg.norm((np.subtract(p, q)) * np.asarray(spacing)))
    for variant in ("pooled", "max"):
        assert hd95(a, b, spacing, variant=variant) == pytest.approx(expected, rel=1e-12)


def test_hd95_identical_and_edge_touching():
    a = np.zeros((6, 7, 8), dtype=bool)
    a[:, 2:5, 3:6] = True  # touches the array faces of axis 0: those faces are surface
    assert hd95(a, a) == 0.0
    b = a.copy()
    b[0] = False  # drop the face slice at the array edge
    d_ab, d_ba = surface_distances(a, b, (2.0, 1.0, 1.0))
    # the 6x3x3 block erodes to its 4x1x1 core (the edge faces are surface): 54 - 4 voxels
    assert d_ab.size == 50
    # the centre of a's face at slice 0 is one slice (2 mm) from b's new face; b's face
    # centre lies 1 mm from a's side surface
    assert d_ab.max() == pytest.approx(2.0) and d_ba.max() == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.7, 1.3, 2.5)])
def test_hd95_matches_brute_force(seed, spacing):
    a = _random_blobs((14, 15, 16), seed)
    b = _random_blobs((14, 15, 16), seed + 100)
    assert a.any() and b.any()
    for variant in ("pooled", "max"):
        assert hd95(a, b, spacing, variant=variant) == pytest.approx(
            _hd95_brute(a, b, spacing, variant), rel=1e-12)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 1.0, 2.5), (0.6, 1.4, 1.1)])
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_hd95_max_matches_monai(seed, spacing):
    """MONAI 1.6 uses the same surface (scipy binary_erosion with the 6-neighbourhood, outside =
    background, XOR with the mask), exact Euclidean distances in mm (KD-tree on CPU) and a linear
    percentile (torch.quantile); its distances are float32, hence the 1e-5 relative tolerance."""
    monai_hd = pytest.importorskip("monai.metrics").compute_hausdorff_distance
    a = _random_blobs((20, 22, 24), seed)
    b = _random_blobs((20, 22, 24), seed + 50)
    ref = monai_hd(torch.from_numpy(a)[None, None].float(), torch.from_numpy(b)[None, None].float(),
                   include_background=True, percentile=95, spacing=list(spacing))
    assert hd95(a, b, spacing, variant="max") == pytest.approx(float(ref[0, 0]), rel=1e-5)


def test_hd95_empty_rules():
    shape = (5, 6, 7)
    a = np.zeros(shape, dtype=bool)
    b = np.zeros(shape, dtype=bool)
    b[2, 3, 4] = True
    sp = (1.0, 2.0, 0.5)
    diagonal = np.sqrt((4 * 1.0) ** 2 + (5 * 2.0) ** 2 + (6 * 0.5) ** 2)
    assert np.isnan(hd95(a, a, sp))                          # both empty
    assert hd95(a, b, sp) == pytest.approx(diagonal)           # one empty: diagonal (default)
    assert hd95(b, a, sp, variant="max") == pytest.approx(diagonal)
    assert np.isnan(hd95(a, b, sp, empty="nan"))
    assert hd95(a, b, sp, empty=99.0) == 99.0
    with pytest.raises(ValueError, match="empty"):
        hd95(a, b, sp, empty="zero")
    with pytest.raises(ValueError, match="non-empty"):
        surface_distances(a, b)


def test_hd95_per_roi_table():
    a = np.zeros((12, 12, 12), dtype=np.int32)
    b = np.zeros_like(a)
    a[2:6, 2:6, 2:6] = 2
    b[3:7, 2:6, 2:6] = 2    # ROI 2 shifted one voxel along axis 0
    a[8:10, 8:10, 8:10] = 3
    b[8:10, 8:10, 8:10] = 3  # ROI 3 identical
    a[0, 0, 0] = 4          # ROI 4 only in a
    sp = (2.0, 1.0, 1.0)
    out = hd95_per_roi(torch.from_numpy(a)[None, None], b, spacing=sp)
    assert out.shape == (len(ROI_IDS),)
    assert out[0] == pytest.approx(_hd95_brute(a == 2, b == 2, sp, "pooled"))
    assert 0.0 < out[0] <= 2.0
    assert out[1] == 0.0
    assert out[2] == pytest.approx(np.sqrt(22 ** 2 + 11 ** 2 + 11 ** 2))
    assert np.isnan(out[3:]).all()
    assert np.nanmean(hd95_per_roi(a, b, sp, roi_ids=(2, 3))) == pytest.approx(out[0] / 2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(spacing=(1.0, 1.0)), "spacing"),
    (dict(spacing=(1.0, 0.0, 1.0)), "spacing"),
    (dict(variant="mean"), "variant"),
])
def test_hd95_bad_arguments(kwargs, match):
    a = np.zeros((4, 4, 4), dtype=np.int32)
    with pytest.raises(ValueError, match=match):
        hd95_per_roi(a, a, **kwargs)
    with pytest.raises(ValueError, match="same shape"):
        hd95_per_roi(a, a[:3])


# ---------------------------------------------------------------------------------- Jacobian

SHAPE = (9, 10, 11)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_fold_along_each_axis_is_counted(axis):
    # u_axis = f(x_axis) with f = 0 before t=2, slope -2 on [2, 5], constant after: central
    # differences give det -1 strictly inside, 0 at t = 2 and t = 5, +1 elsewhere.
    lo, hi = 2, 5
    x = _coords(SHAPE)[axis]
    flow = np.zeros((3, *SHAPE))
    flow[axis] = -2.0 * (np.clip(x, lo, hi) - lo)
    det = jacobian_determinant(flow)
    t = x.astype(int)
    expected = np.where((t > lo) & (t < hi), -1.0, np.where((t == lo) | (t == hi), 0.0, 1.0))
    np.testing.assert_allclose(det, expected, atol=1e-12)
    n_folded = (hi - lo + 1) * np.prod(SHAPE) // SHAPE[axis]
    assert np.sum(det <= 0) == n_folded
    assert folding_percent(flow) == pytest.approx(100.0 * n_folded / np.prod(SHAPE))
    # the reference code's defect: the same field with its components reversed shows no fold
    if axis != 1:
        assert folding_percent(flow[::-1].copy()) == 0.0


@pytest.mark.parametrize("i, j", [(0, 1), (1, 2), (2, 0), (0, 2)])
def test_shear_has_det_one(i, j):
    flow = np.zeros((3, *SHAPE))
    flow[i] = 0.5 * _coords(SHAPE)[j]
    np.testing.assert_allclose(jacobian_determinant(flow), 1.0, atol=1e-12)
    assert folding_percent(flow) == 0.0
    assert sdlogj(flow) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("scales", [(0.5, 0.5, 0.5), (-0.3, 0.2, 1.0), (0.1, -0.6, 0.0)])
def test_scaling_has_known_det(scales):
    x = _coords(SHAPE)
    flow = np.stack([s * (x[k] - 4.0) for k, s in enumerate(scales)])
    np.testing.assert_allclose(jacobian_determinant(flow), np.prod(1 + np.array(scales)),
                               atol=1e-12)


def test_compressed_percent_on_a_uniform_compression():
    # x -> x / 8 along axis 0 and identity elsewhere: det 0.125 (exact in binary) everywhere
    x = _coords(SHAPE)
    flow = np.zeros((3, *SHAPE))
    flow[0] = -0.875 * x[0]
    mask = np.zeros(SHAPE, dtype=bool)
    mask[2:6, 3:7, 4:8] = True
    assert compressed_percent(flow, mask) == pytest.approx(100.0)
    assert compressed_percent(flow, mask, threshold=0.125) == 0.0  # strictly below
    assert compressed_percent(np.zeros((3, *SHAPE)), mask) == 0.0
    assert np.isnan(compressed_percent(flow, np.zeros(SHAPE, dtype=bool)))


def test_compressed_percent_counts_only_the_mask_and_folds():
    # the fold of test_fold_along_each_axis_is_counted: det -1 for x0 in 3..4, 0 at 2 and 5
    lo, hi = 2, 5
    x = _coords(SHAPE)[0]
    flow = np.zeros((3, *SHAPE))
    flow[0] = -2.0 * (np.clip(x, lo, hi) - lo)
    mask = np.zeros(SHAPE, dtype=bool)
    mask[:5] = True  # slices 0..4: 2, 3, 4 have det <= 0 < 0.2
    assert compressed_percent(flow, mask) == pytest.approx(60.0)
    assert compressed_percent(flow, ~mask) == pytest.approx(100.0 * 1 / 4)  # slice 5 of 5..8
    # batched, torch, one mask per field and a shared (B, 1, ...) mask
    both = torch.from_numpy(np.stack([flow, np.zeros_like(flow)]))
    np.testing.assert_allclose(compressed_percent(both, mask), [60.0, 0.0])
    np.testing.assert_allclose(compressed_percent(both, np.stack([mask, ~mask])[:, None]),
                               [60.0, 0.0])
    with pytest.raises(ValueError, match="mask"):
        compressed_percent(flow, mask[:4])


def test_batched_torch_input_and_slabs():
    g = torch.Generator().manual_seed(0)
    flows = 2.0 * torch.randn(2, 3, *SHAPE, generator=g)
    det = jacobian_determinant(flows)
    assert det.shape == (2, *SHAPE) and det.dtype == np.float64
    for slab in (1, 2, 4, 100):
        np.testing.assert_array_equal(jacobian_determinant(flows, slab=slab), det)
    # plain reference: one np.gradient over the whole volume
    f = flows[1].double().numpy()
    grads = np.stack([np.stack(np.gradient(f[i]), axis=0) for i in range(3)])  # (3, 3, ...)
    jac = np.moveaxis(grads, (0, 1), (-2, -1)) + np.eye(3)
    np.testing.assert_allclose(det[1], np.linalg.det(jac), atol=1e-10)
    pct = folding_percent(flows)
    assert pct.shape == (2,) and pct[1] == pytest.approx(100.0 * np.mean(det[1] <= 0))
    assert 0 < pct[0] < 100


def test_jacobian_matches_simpleitk():
    """SimpleITK's DisplacementFieldJacobianDeterminant uses the same central differences in
    the interior; on the border voxels it uses a zero-flux (replicated) neighbour, i.e. half the
    one-sided difference, so only the interior is compared. GetImageFromArray reverses the axes
    (ITK x is numpy axis 2) and ITK vector component 0 is x, so the components go in reversed
    order: (u_2, u_1, u_0)."""
    sitk = pytest.importorskip("SimpleITK")
    rng = np.random.default_rng(5)
    shape = (16, 18, 20)
    flow = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), 2.0) * 12.0
                     for _ in range(3)])
    img = sitk.GetImageFromArray(np.stack([flow[2], flow[1], flow[0]], axis=-1), isVector=True)
    ref = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(img))
    assert ref.shape == shape
    det = jacobian_determinant(flow)
    inner = (slice(1, -1),) * 3
    # ITK's output image is float32: compare to float32 precision of values of order 1..10
    np.testing.assert_allclose(det[inner], ref[inner], rtol=1e-5, atol=1e-5)
    folded = det[inner] <= 0
    assert 0 < folded.mean() < 0.5  # the field does fold somewhere
    assert np.array_equal(folded, ref[inner] <= 0)


def test_sdlogj_values():
    # u_0 = ramp of slope 1 up to t = 4, then constant: det 2, 1.5 at the kink (central
    # difference of slopes 1 and 0), 1 after; std of the log over the voxels of axis 0
    x = _coords(SHAPE)[0]
    flow = np.zeros((3, *SHAPE))
    flow[0] = np.minimum(x, 4.0)
    per_slice = np.array([2.0] * 4 + [1.5] + [1.0] * 4)
    assert sdlogj(flow) == pytest.approx(np.log(per_slice).std(), rel=1e-12)
    assert sdlogj(flow, crop=2) == pytest.approx(np.log(per_slice[2:-2]).std(), rel=1e-12)
    # a fold counts as log(1e-9)
    fold = np.zeros((3, *SHAPE))
    fold[1] = -2.0 * _coords(SHAPE)[1]
    assert sdlogj(fold) == pytest.approx(0.0, abs=1e-12)  # det -1 everywhere -> constant
    batch = np.stack([flow, fold])
    np.testing.assert_allclose(sdlogj(batch), [sdlogj(flow), 0.0], atol=1e-12)
    with pytest.raises(ValueError, match="crop"):
        sdlogj(flow, crop=5)


@pytest.mark.parametrize("bad", [np.zeros((2, 4, 4, 4)), np.zeros((1, 3, 4, 4)),
                                 np.zeros((3, 4, 4, 4), dtype=np.int32)])
def test_jacobian_bad_input(bad):
    with pytest.raises(ValueError, match="displacement"):
        jacobian_determinant(bad)


# ---------------------------------------------------------------------------------- time, memory

def test_timer_and_timed():
    with Timer() as t:
        time.sleep(0.05)
    assert 0.05 <= t.seconds < 1.0
    result, seconds = timed(lambda x: x * 2, 21, device="cpu")
    assert result == 42 and 0.0 <= seconds < 1.0


def test_peak_memory_cpu():
    size = 96 * 2 ** 20
    with PeakMemory() as big:
        x = torch.ones(size // 4, dtype=torch.float32)  # touched pages: resident
        time.sleep(0.02)
        del x
    with PeakMemory() as small:
        time.sleep(0.02)
    assert big.start_bytes > 0
    assert big.peak_bytes >= 0.8 * size
    assert small.peak_bytes < 0.3 * size


def test_peak_memory_cpu_counts_reused_heap():
    import mambamorph.runtime as m

    if not m._release_free_heap():
        pytest.skip("no glibc malloc_trim here")

    def measure(release_free):
        xs = [torch.ones(16 * 1024) for _ in range(2000)]  # 64 KB each from the heap, 125 MB
        pin = torch.ones(16)  # allocated after them: the freed block cannot be trimmed from the top
        del xs
        with PeakMemory(release_free=release_free) as mem:
            ys = [torch.ones(16 * 1024) for _ in range(2000)]
            time.sleep(0.02)
        del ys, pin
        return mem.peak_bytes

    assert measure(True) > 100 * 2 ** 20  # the block's 125 MB, although the heap already held it
    assert measure(False) < 30 * 2 ** 20  # without the release the reuse is invisible


@pytest.mark.gpu
def test_peak_memory_and_timer_cuda():
    dev = torch.device("cuda")
    keep = torch.ones(2 ** 20, device=dev)
    with PeakMemory(dev) as mem, Timer(dev) as t:
        x = torch.ones(16 * 2 ** 20, device=dev)
        del x
    assert mem.start_bytes >= keep.numel() * 4
    assert mem.peak_bytes >= mem.start_bytes + 64 * 2 ** 20
    assert t.seconds > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        timed(torch.cuda.synchronize, device=dev)
