"""The parallel order-0/1 resampling kernel (resample_cpu) against scipy.ndimage, its reference."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from mambamorph.resample_cpu import sample_affine


def _matrix(deg=17.0, scale=1.1, shift=(-2.3, 1.7, 0.4)):
    t = np.deg2rad(deg)
    m = np.eye(4)
    m[:3, :3] = scale * np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0],
                                  [0.0, 0.0, 1.0]])
    m[:3, 3] = shift
    return m


def _scipy(data, m, shape, order, cval):
    return ndi.affine_transform(data, m[:3, :3], offset=m[:3, 3], output_shape=shape,
                                order=order, mode="grid-constant" if order == 0 else "constant",
                                cval=cval)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_trilinear_equals_scipy(dtype):
    """order 1, mode constant: a rotated, scaled, shifted grid reaching beyond the input on every
    side gives scipy's values to float rounding, and cval at the same points."""
    rng = np.random.default_rng(0)
    data = rng.random((20, 22, 18)).astype(dtype)
    m = _matrix()
    out = sample_affine(data, m, (24, 20, 21), order=1, cval=0.5)
    ref = _scipy(data, m, (24, 20, 21), 1, 0.5)
    assert out.dtype == dtype
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12 if dtype == np.float64 else 1e-6)
    assert np.array_equal(out == 0.5, ref == 0.5) and (out == 0.5).mean() > 0.05


def test_nearest_labels_equal_scipy_including_ties_and_edges():
    """order 0, mode grid-constant: integer labels, a half-voxel shift (every coordinate a tie:
    scipy rounds up) and a grid reaching half a voxel and more beyond the input."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 40, (9, 10, 11)).astype(np.int64)
    for m in (_matrix(), _matrix(0.0, 1.0, (0.5, -0.5, 0.5)), _matrix(0.0, 1.0, (-0.75, 0.0,
                                                                                    0.25))):
        out = sample_affine(labels, m, (11, 12, 13), order=0, cval=-1)
        ref = _scipy(labels, m, (11, 12, 13), 0, -1)
        assert out.dtype == labels.dtype and np.array_equal(out, ref)


def test_exact_edges_and_axes_of_one_voxel():
    """Points exactly on the first and last voxel centres (the last reads the edge voxel, no
    extrapolation), just beyond them (cval), and an axis of one voxel."""
    rng = np.random.default_rng(2)
    data = rng.random((5, 6, 1)).astype(np.float32)
    m = np.eye(4)
    out = sample_affine(data, m, (5, 6, 1), order=1, cval=-3.0)
    np.testing.assert_allclose(out, _scipy(data, m, (5, 6, 1), 1, -3.0), rtol=0, atol=1e-6)
    assert np.array_equal(out, data)
    m[0, 3] = 1e-9  # the last row now lies beyond the last voxel centre
    out = sample_affine(data, m, (5, 6, 1), order=1, cval=-3.0)
    np.testing.assert_allclose(out, _scipy(data, m, (5, 6, 1), 1, -3.0), rtol=0, atol=1e-6)
    assert (out[-1] == -3.0).all() and (out[:-1] != -3.0).all()


def test_channels_are_sampled_together():
    rng = np.random.default_rng(3)
    data = rng.random((8, 9, 7, 3)).astype(np.float32)
    m = _matrix(9.0, 0.9, (1.0, -0.5, 0.2))
    out = sample_affine(data, m, (10, 8, 9), order=1)
    for c in range(3):
        np.testing.assert_allclose(out[..., c], _scipy(np.ascontiguousarray(data[..., c]), m,
                                                       (10, 8, 9), 1, 0.0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("order", [0, 1])
def test_displaced_points_match_map_coordinates(order):
    """With a displacement in mm (warp_to_fixed's case) against map_coordinates at the same
    points: equal to rounding of the point coordinates (summed in another order), and a
    non-finite displacement takes cval."""
    rng = np.random.default_rng(4)
    data = rng.random((12, 13, 11)).astype(np.float32)
    if order == 0:
        data = (data * 20).astype(np.int64)
    m = _matrix(5.0, 1.0, (0.3, -0.2, 0.1))
    mm_to_vox = np.diag([0.5, 0.5, 0.4])
    disp = rng.normal(0.0, 2.0, (10, 12, 9, 3))
    disp[0, 0, 0] = np.nan
    out = sample_affine(data, m, (10, 12, 9), order=order, cval=7, disp_mm=disp,
                        mm_to_voxel=mm_to_vox)
    vox = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in (10, 12, 9)],
                               indexing="ij")).reshape(3, -1)
    coords = m[:3, :3] @ vox + m[:3, 3:] + mm_to_vox @ disp.reshape(-1, 3).T
    coords[:, 0] = -100.0  # the NaN point: outside
    ref = ndi.map_coordinates(data, coords, order=order, cval=7,
                              mode="grid-constant" if order == 0 else "constant"
                              ).reshape(10, 12, 9)
    if order == 1:
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)
    else:
        assert (out != ref).mean() < 1e-3  # only exact ties could differ
    assert out[0, 0, 0] == 7
