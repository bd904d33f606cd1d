"""Min-max, CT window, centred crop/pad and resampling, on analytic cases."""

import nibabel as nib
import numpy as np
import pytest
import torch

from mambamorph import io
from mambamorph.data import preprocess as pp
from mambamorph.errors import InputError


# ------------------------------------------------------------------------------ intensities
def test_minmax_per_volume():
    x = torch.zeros(2, 1, 2, 2, 3)
    x[0, 0] = torch.arange(12.0).reshape(2, 2, 3) * 2 + 4  # 4 .. 26
    x[1, 0] = -torch.arange(12.0).reshape(2, 2, 3)  # -11 .. 0
    y = pp.minmax(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    torch.testing.assert_close(y[0, 0], torch.arange(12.0).reshape(2, 2, 3) / 11)
    torch.testing.assert_close(y[1, 0], 1 - torch.arange(12.0).reshape(2, 2, 3) / 11)


def test_minmax_numpy_constant_and_errors():
    y = pp.minmax(np.array([[[2.0, 4.0, 6.0]]]))
    assert isinstance(y, np.ndarray) and y.dtype == np.float32
    np.testing.assert_allclose(y, [[[0.0, 0.5, 1.0]]])
    np.testing.assert_array_equal(pp.minmax(torch.full((2, 2, 2), 7.0)), torch.zeros(2, 2, 2))
    with pytest.raises(InputError, match="NaN"):
        pp.minmax(torch.tensor([[[1.0, float("nan")]]]))
    with pytest.raises(InputError, match="D0, D1, D2"):
        pp.minmax(torch.ones(3, 3))


def test_ct_window():
    hu = torch.tensor([-1000.0, 0.0, 20.0, 40.0, 60.0, 80.0, 1000.0])
    torch.testing.assert_close(pp.ct_window(hu), torch.tensor([0, 0, 0.25, 0.5, 0.75, 1, 1.0]))
    out = pp.ct_window(np.array([-1.0, 0.0, 1.0]), level=0, width=2)
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, [0.0, 0.5, 1.0])
    with pytest.raises(InputError, match="width"):
        pp.ct_window(hu, width=0)


# ----------------------------------------------------------------------------- crop and pad
def test_crop_or_pad_centred_and_undo():
    x = torch.arange(1 * 5 * 8 * 6, dtype=torch.float32).reshape(1, 5, 8, 6) + 1
    y, info = pp.crop_or_pad(x, (2, 11, 6))
    assert y.shape == (1, 2, 11, 6)
    assert info.start == (1, -1, 0)  # crop (5-2)//2 = 1 at the start; pad (11-8)//2 = 1
    expect = torch.zeros(1, 2, 11, 6)
    expect[:, :, 1:9, :] = x[:, 1:3]
    torch.testing.assert_close(y, expect)
    back = pp.uncrop(y, info)
    keep = torch.zeros_like(x, dtype=torch.bool)
    keep[:, 1:3] = True
    torch.testing.assert_close(back[keep], x[keep])
    assert float(back[~keep].abs().max()) == 0.0
    # pad-only round trip is exact; same shape is a no-op
    z, info2 = pp.crop_or_pad(x, (7, 9, 10), value=-1.0)
    assert float(z[0, 0].max()) == -1.0 and float(z[0, -1].max()) == -1.0
    torch.testing.assert_close(pp.uncrop(z, info2), x)
    same, info3 = pp.crop_or_pad(x, (5, 8, 6))
    assert same is x and info3.start == (0, 0, 0)


def test_crop_or_pad_affine_and_errors():
    x = torch.rand(7, 4, 9)
    aff = np.array([[0, 0, -2.0, 5], [1.5, 0, 0, -3], [0, 1.0, 0, 8], [0, 0, 0, 1]])
    y, info = pp.crop_or_pad(x, (5, 6, 9))
    new = info.shift_affine(aff)
    # output voxel j shows the input voxel j + start, at the same world point
    for j in [(0, 1, 2), (4, 4, 8), (2, 3, 0)]:
        i = np.array(j) + np.array(info.start)
        np.testing.assert_allclose(new @ [*j, 1], aff @ [*i, 1])
        assert y[j] == x[tuple(i)]
    with pytest.raises(InputError):
        pp.crop_or_pad(x, (5, 6))
    with pytest.raises(InputError):
        pp.crop_or_pad(x, (5, 0, 3))
    with pytest.raises(InputError):
        pp.uncrop(torch.zeros(5, 6, 8), info)


# ------------------------------------------------------------------------------- resampling
def _grid_world(affine, shape):
    g = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    return g @ affine[:3, :3].T + affine[:3, 3]


def _linear(world):
    return 0.3 * world[..., 0] - 0.2 * world[..., 1] + 0.1 * world[..., 2] + 5.0


def test_resample_array_reproduces_linear_function():
    a_in = np.diag([2.0, 1.5, 1.0, 1.0])
    a_in[:3, 3] = (-20, -15, -12)
    shape_in = (21, 21, 25)
    data = _linear(_grid_world(a_in, shape_in))
    t = np.deg2rad(20)
    a_out = np.eye(4)
    a_out[:3, :3] = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0],
                              [0, 0, 1]]) @ np.diag([-1.2, 1.1, 0.9])  # oblique, flipped
    a_out[:3, 3] = (5, -5, -5)
    shape_out = (8, 9, 10)
    out = pp.resample_array(data, a_in, a_out, shape_out, order=1)
    np.testing.assert_allclose(out, _linear(_grid_world(a_out, shape_out)), atol=1e-9)
    # outside the input: cval
    far = a_out.copy()
    far[:3, 3] += 500
    assert np.all(pp.resample_array(data, a_in, far, shape_out, cval=-7.0) == -7.0)


def test_resample_array_nearest_labels():
    lab = np.random.default_rng(0).integers(0, 5, (6, 7, 8)).astype(np.int64)
    a_in = np.eye(4)
    a_out = np.diag([0.5, 0.5, 0.5, 1.0])
    a_out[:3, 3] = 0.1  # no ties in the nearest-neighbour rounding
    out = pp.resample_array(lab, a_in, a_out, (11, 13, 15), order=0)
    assert out.dtype == np.int64
    g = np.round(_grid_world(a_out, (11, 13, 15))).astype(int)
    np.testing.assert_array_equal(out, lab[g[..., 0], g[..., 1], g[..., 2]])
    # a point takes the label of the voxel cube it falls in; beyond it, cval
    for shift, expect in [(7.4, lab[0, 0, 7]), (7.6, -1), (-0.4, lab[0, 0, 0]), (-0.6, -1)]:
        t = np.eye(4)
        t[2, 3] = shift
        assert pp.resample_array(lab, a_in, t, (1, 1, 1), order=0, cval=-1)[0, 0, 0] == expect
    with pytest.raises(InputError, match="singular"):
        pp.resample_array(lab, np.zeros((4, 4)), a_out, (2, 2, 2))
    with pytest.raises(InputError):
        pp.resample_array(lab[0], a_in, a_out, (2, 2, 2))


def test_resample_to_grid_and_spacing(tmp_path):
    a_in = np.diag([-2.0, 2.0, 2.0, 1.0])  # stored LAS
    a_in[:3, 3] = (10, -8, -6)
    shape = (10, 9, 8)
    data = _linear(_grid_world(a_in, shape)).astype(np.float32)
    p = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(data, a_in), str(p))
    vol = io.read_volume(p)

    same = pp.resample_to_grid(vol, a_in, shape)
    np.testing.assert_allclose(same.data.numpy(), vol.data.numpy(), atol=1e-5)
    np.testing.assert_allclose(same.affine, vol.affine)

    fine = pp.resample_to_spacing(vol, 1.0)
    assert fine.shape == (20, 18, 16) and fine.data.dtype == torch.float32
    np.testing.assert_allclose(fine.spacing, 1.0)
    centre = lambda v: v.affine @ [*((np.array(v.shape) - 1) / 2), 1]  # noqa: E731
    np.testing.assert_allclose(centre(fine), centre(vol))
    expect = _linear(_grid_world(fine.affine, fine.shape))
    inner = (slice(1, -1),) * 3  # the outer half voxel lies outside the input grid
    np.testing.assert_allclose(fine.data.numpy()[inner], expect[inner], atol=1e-4)
    # the result writes with its own (new) grid geometry
    out = io.write_volume(tmp_path / "fine.nii.gz", fine.data, like=fine)
    back = nib.load(str(out))
    np.testing.assert_allclose(back.affine, fine.orig_affine)
    np.testing.assert_allclose(io.read_volume(out).data.numpy(), fine.data.numpy())
    with pytest.raises(InputError, match="spacing"):
        pp.resample_to_spacing(vol, (1.0, 0.0, 1.0))


def test_resample_labels_volume(tmp_path):
    lab = np.zeros((8, 8, 8), np.uint8)
    lab[2:6, 2:6, 2:6] = 17
    p = tmp_path / "l.nii.gz"
    nib.save(nib.Nifti1Image(lab, np.diag([2.0, 2, 2, 1])), str(p))
    vol = io.read_labels(p)
    fine = pp.resample_to_spacing(vol, 1.0, order=0)
    assert fine.data.dtype == torch.int64 and set(np.unique(fine.data.numpy())) == {0, 17}
    assert int((fine.data == 17).sum()) == 8 * 8 * 8  # 4^3 voxels of 8 mm^3 -> 512 of 1 mm^3
