"""NIfTI reading/writing: orientation round trips, validation errors, ITK displacement export."""

import gzip

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel import orientations as nio
from scipy import ndimage as ndi

from mambamorph import io
from mambamorph.errors import InputError


def _affine(codes, spacing=(1.0, 1.2, 1.5), origin=(10.0, -20.0, 30.0), rot_deg=0.0):
    """Voxel -> RAS affine whose array axes point along ``codes`` (e.g. "LPS", "ASR")."""
    a = np.eye(4)
    a[:3, :3] = nio.inv_ornt_aff(nio.axcodes2ornt(codes), (1, 1, 1))[:3, :3]
    a[:3, :3] = np.linalg.inv(a[:3, :3]) * np.asarray(spacing)
    t = np.deg2rad(rot_deg)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    a[:3, :3] = rot @ a[:3, :3]
    a[:3, 3] = origin
    return a


def _save(path, arr, affine, **hdr):
    img = nib.Nifti1Image(arr, affine)
    for k, v in hdr.items():
        img.header[k] = v
    nib.save(img, str(path))
    return path


@pytest.mark.parametrize("codes", ["RAS", "LAS", "LPS", "ASR", "SLP"])
def test_affine_helper(codes):
    assert nio.aff2axcodes(_affine(codes)) == tuple(codes)


@pytest.mark.parametrize("codes", ["RAS", "LAS", "LPS", "ASR"])
def test_read_write_roundtrip(tmp_path, codes):
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(5, 6, 7)).astype(np.float32)
    aff = _affine(codes)
    src = _save(tmp_path / "in.nii.gz", arr, aff)
    vol = io.read_volume(src)
    ref = nib.as_closest_canonical(nib.load(str(src)))
    assert vol.data.dtype == torch.float32 and vol.path == src
    np.testing.assert_array_equal(vol.data.numpy(), ref.get_fdata().astype(np.float32))
    np.testing.assert_allclose(vol.affine, ref.affine)
    assert nio.aff2axcodes(vol.affine) == ("R", "A", "S")
    stored = np.array([1.0, 1.2, 1.5])
    expect = np.empty(3)
    expect[vol.ornt[:, 0].astype(int)] = stored  # stored axis i becomes canonical ornt[i, 0]
    np.testing.assert_allclose(vol.spacing, expect)
    # a canonical voxel and the stored voxel at the same world point hold the same value
    x = np.array([1, 2, 3, 1.0])
    y = np.round(np.linalg.inv(aff) @ vol.affine @ x).astype(int)[:3]
    assert vol.data[tuple(x[:3].astype(int))] == arr[tuple(y)]

    out = io.write_volume(tmp_path / "out.nii.gz", vol.data, like=vol)
    back = nib.load(str(out))
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), arr)
    assert back.get_data_dtype() == np.float32
    np.testing.assert_array_equal(back.affine, nib.load(str(src)).affine)
    for key in ("qform_code", "sform_code", "pixdim", "dim", "quatern_b", "srow_x"):
        np.testing.assert_array_equal(back.header[key], nib.load(str(src)).header[key])
    # deterministic bytes (gzip mtime 0)
    io.write_volume(tmp_path / "out2.nii.gz", vol.data, like=vol)
    assert (tmp_path / "out.nii.gz").read_bytes() == (tmp_path / "out2.nii.gz").read_bytes()


def test_write_labels_multichannel_and_dtype(tmp_path):
    lab = np.zeros((6, 5, 4), np.uint8)
    lab[1:4, 1:3, 1:3] = 17
    lab[4, 3, 2] = 41
    src = _save(tmp_path / "lab.nii", lab, _affine("LPS"))
    vol = io.read_labels(src)
    assert vol.data.dtype == torch.int64 and int(vol.data.max()) == 41  # ids kept as stored
    merged = io.read_labels(src, merge_hemispheres=True)
    assert set(np.unique(merged.data.numpy())) == {0, 2, 17}
    out = io.write_volume(tmp_path / "lab_out.nii.gz", vol.data, like=vol)
    back = nib.load(str(out))
    assert back.get_data_dtype() == np.uint8  # int64 narrowed to the smallest type
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), lab)
    # extra trailing axes are carried; numpy input; explicit dtype
    multi = np.stack([vol.data.numpy()] * 2, -1)
    out = io.write_volume(tmp_path / "multi.nii", multi, like=vol, dtype=np.int16)
    back = nib.load(str(out))
    assert back.shape == (6, 5, 4, 2) and back.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asanyarray(back.dataobj)[..., 1], lab)


def test_write_refuses_overwrite_and_bad_input(tmp_path):
    arr = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    vol = io.read_volume(_save(tmp_path / "a.nii.gz", arr, _affine("LAS")))
    dst = tmp_path / "b.nii.gz"
    io.write_volume(dst, vol.data, vol)
    with pytest.raises(InputError, match="b.nii.gz: file exists"):
        io.write_volume(dst, vol.data * 2, vol)
    io.write_volume(dst, vol.data * 2, vol, overwrite=True)
    np.testing.assert_array_equal(io.read_volume(dst).data, vol.data * 2)
    with pytest.raises(InputError, match="does not fit"):
        io.write_volume(tmp_path / "c.nii.gz", vol.data[:2], vol)
    with pytest.raises(InputError, match="must end with"):
        io.write_volume(tmp_path / "c.png", vol.data, vol)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["a.nii.gz", "b.nii.gz"]


def test_trailing_singleton_accepted(tmp_path):
    arr = np.random.default_rng(0).random((4, 5, 6, 1)).astype(np.float32)
    vol = io.read_volume(_save(tmp_path / "t.nii.gz", arr, np.eye(4)))
    assert vol.shape == (4, 5, 6)


# ------------------------------------------------------------------------------- bad inputs
def _valid(tmp_path, name="v.nii.gz"):
    arr = np.random.default_rng(1).random((8, 8, 8)).astype(np.float32)
    return _save(tmp_path / name, arr, np.eye(4))


def test_error_missing(tmp_path):
    with pytest.raises(InputError, match="nope.nii.gz: file not found"):
        io.read_volume(tmp_path / "nope.nii.gz")


@pytest.mark.parametrize("name", ["text.nii.gz", "text.nii"])
def test_error_not_nifti(tmp_path, name):
    p = tmp_path / name
    p.write_text("subject,t1\n" * 50)
    with pytest.raises(InputError, match=name.replace(".", r"\.")) as e:
        io.read_volume(p)
    assert "NIfTI" in str(e.value)


def test_error_truncated_gzip(tmp_path):
    p = _valid(tmp_path)
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="v.nii.gz: unreadable, truncated or corrupt"):
        io.read_volume(p)


def test_error_corrupt_gzip(tmp_path):
    p = _valid(tmp_path)
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 64] = bytes(64)
    p.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="v.nii.gz: (unreadable|not a NIfTI)"):
        io.read_volume(p)


def test_error_truncated_plain(tmp_path):
    p = _save(tmp_path / "v.nii", np.ones((8, 8, 8), np.float32), np.eye(4))
    p.write_bytes(p.read_bytes()[:600])
    with pytest.raises(InputError, match="v.nii: unreadable, truncated or corrupt"):
        io.read_volume(p)


@pytest.mark.parametrize("shape", [(6, 6, 6, 2), (6, 6), (6, 6, 6, 1, 3)])
def test_error_dimensionality(tmp_path, shape):
    arr = np.random.default_rng(0).random(shape).astype(np.float32)
    p = _save(tmp_path / "d.nii.gz", arr, np.eye(4))
    with pytest.raises(InputError, match="d.nii.gz: expected a 3D volume"):
        io.read_volume(p)
    with pytest.raises(InputError, match="expected a 3D volume"):
        io.read_labels(p)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_error_non_finite(tmp_path, bad):
    arr = np.random.default_rng(0).random((6, 6, 6)).astype(np.float32)
    arr[2, 3, 4] = bad
    arr[1, 1, 1] = bad
    p = _save(tmp_path / "n.nii.gz", arr, np.eye(4))
    with pytest.raises(InputError, match="n.nii.gz: 2 NaN or Inf voxels"):
        io.read_volume(p)


@pytest.mark.parametrize("value", [0.0, 3.5])
def test_error_empty_volume(tmp_path, value):
    p = _save(tmp_path / "e.nii.gz", np.full((6, 6, 6), value, np.float32), np.eye(4))
    with pytest.raises(InputError, match="e.nii.gz: empty volume"):
        io.read_volume(p)


def test_error_labels(tmp_path):
    lab = np.zeros((6, 6, 6), np.float32)
    lab[1:3, 1:3, 1:3] = 2.0
    lab[4, 4, 4] = 2.5
    with pytest.raises(InputError, match="f.nii.gz: label map holds 1 non-integer"):
        io.read_labels(_save(tmp_path / "f.nii.gz", lab, np.eye(4)))
    lab[4, 4, 4] = 99
    p = _save(tmp_path / "u.nii.gz", lab, np.eye(4))
    with pytest.raises(InputError, match="u.nii.gz: labels outside the 16-ROI table.*99"):
        io.read_labels(p)
    assert int(io.read_labels(p, check_table=False).data.max()) == 99
    with pytest.raises(InputError, match="z.nii.gz: empty label map"):
        io.read_labels(_save(tmp_path / "z.nii.gz", np.zeros((6, 6, 6), np.uint8), np.eye(4)))


def test_scaled_integer_image(tmp_path):
    arr = np.arange(216, dtype=np.int16).reshape(6, 6, 6)
    p = _save(tmp_path / "s.nii.gz", arr, np.eye(4), scl_slope=0.5, scl_inter=-3.0)
    vol = io.read_volume(p)
    np.testing.assert_allclose(vol.data.numpy(), arr * 0.5 - 3.0)


# ------------------------------------------------------------------- ITK displacement export
def _smooth_noise(shape, seed, sigma=2.0):
    x = ndi.gaussian_filter(np.random.default_rng(seed).normal(size=shape), sigma)
    return (x / x.std()).astype(np.float32)


def test_itk_displacement_matches_independent_warp(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    # fixed: stored LPS, anisotropic voxels, rotated 12 degrees about z (oblique)
    fshape = (20, 24, 14)
    faff = _affine("LPS", spacing=(1.6, 1.3, 2.0), origin=(14.0, 16.0, -12.0), rot_deg=12.0)
    fpath = _save(tmp_path / "fixed.nii.gz", _smooth_noise(fshape, 0), faff)
    # moving: another grid (stored ASR, 1.1 mm), larger field of view
    mshape = (50, 46, 48)
    maff = _affine("ASR", spacing=(1.1, 1.1, 1.1))
    maff[:3, 3] = 0
    maff[:3, 3] = -(maff[:3, :3] @ ((np.array(mshape) - 1) / 2))  # centred on world 0
    moving = _smooth_noise(mshape, 1, sigma=2.5)
    mpath = _save(tmp_path / "moving.nii.gz", moving, maff)

    fixed = io.read_volume(fpath)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in fixed.shape], indexing="ij"), -1)
    world = grid @ fixed.affine[:3, :3].T + fixed.affine[:3, 3]  # (D0, D1, D2, 3) RAS mm
    disp = np.stack([3.0 * np.sin(world[..., 1] / 9.0), 2.5 * np.cos(world[..., 2] / 7.0),
                     2.0 * np.sin(world[..., 0] / 8.0 + 1.0)], -1)
    # independent expectation: moving sampled at p + disp(p), through the affines
    vox = (world + disp) @ np.linalg.inv(maff)[:3, :3].T + np.linalg.inv(maff)[:3, 3]
    expected = ndi.map_coordinates(moving, np.moveaxis(vox, -1, 0), order=1, mode="constant")
    inside = np.all((vox > 1) & (vox < np.array(mshape) - 2), -1)
    assert inside.mean() > 0.9

    def itk_warp(field_path):
        f_img = sitk.ReadImage(str(fpath))
        m_img = sitk.ReadImage(str(mpath), sitk.sitkFloat64)
        field = sitk.Cast(sitk.ReadImage(str(field_path)), sitk.sitkVectorFloat64)
        tx = sitk.DisplacementFieldTransform(field)
        out = sitk.GetArrayFromImage(sitk.Resample(m_img, f_img, tx, sitk.sitkLinear, 0.0))
        return nio.apply_orientation(out.transpose(2, 1, 0), fixed.ornt)  # -> canonical

    path = io.write_itk_displacement(tmp_path / "field.nii.gz", disp, like=fixed)
    hdr = nib.load(str(path))
    assert hdr.shape == (*fshape, 1, 3) and int(hdr.header["intent_code"]) == 1007
    np.testing.assert_allclose(hdr.affine, faff, atol=1e-5)
    got = itk_warp(path)
    corr = np.corrcoef(got[inside], expected[inside])[0, 1]
    assert corr > 0.999
    assert np.abs(got[inside] - expected[inside]).max() < 1e-3 * np.abs(moving).max()
    # the test can tell a wrong convention: RAS components written as they are do not match
    wrong = io.write_itk_displacement(tmp_path / "wrong.nii.gz",
                                      disp * np.array([-1.0, -1.0, 1.0]), like=fixed)
    bad = itk_warp(wrong)
    assert np.corrcoef(bad[inside], expected[inside])[0, 1] < 0.9


def test_itk_displacement_errors(tmp_path):
    vol = io.read_volume(_valid(tmp_path))
    with pytest.raises(InputError, match="expected"):
        io.write_itk_displacement(tmp_path / "f.nii.gz", np.zeros((8, 8, 8, 2)), vol)
    d = np.zeros((8, 8, 8, 3))
    d[1, 1, 1, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        io.write_itk_displacement(tmp_path / "f.nii.gz", d, vol)
    io.write_itk_displacement(tmp_path / "f.nii.gz", torch.zeros(8, 8, 8, 3), vol)
    with pytest.raises(InputError, match="file exists"):
        io.write_itk_displacement(tmp_path / "f.nii.gz", torch.zeros(8, 8, 8, 3), vol)


def test_gzip_output_is_valid_gzip(tmp_path):
    vol = io.read_volume(_valid(tmp_path))
    out = io.write_volume(tmp_path / "o.nii.gz", vol.data, vol)
    raw = gzip.decompress(out.read_bytes())
    assert raw[344:348] == b"n+1\x00"  # NIfTI-1 single-file magic


def test_gzip_bytes_deflates_only_what_shrinks():
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(600_000).astype(np.float32).tobytes()  # 2.4 MB, deflates ~8 %
    ramp = np.repeat(np.arange(300, dtype=np.int16), 4000).tobytes()  # 2.4 MB, deflates to ~0
    for raw in (noise, ramp, b"", b"tiny"):
        packed = io.gzip_bytes(raw)
        assert gzip.decompress(packed) == raw
        assert io.gzip_bytes(raw) == packed  # deterministic (mtime 0)
    # noise is stored (level 0: a few bytes over the raw size), the ramp deflated
    assert len(noise) <= len(io.gzip_bytes(noise)) <= len(noise) + 1000
    assert len(io.gzip_bytes(ramp)) < 0.05 * len(ramp)
    # small payloads are always deflated (no sample to judge by): the same as gzip level 6
    assert io.gzip_bytes(b"tiny" * 100) == gzip.compress(b"tiny" * 100, 6, mtime=0)


@pytest.mark.parametrize("intent,expect", [(1007, (1.0, 2.0, 3.0)), (1006, (-1.0, -2.0, 3.0))])
def test_itk_reader_vector_convention(tmp_path, intent, expect):
    """The ITK behaviour write_itk_displacement relies on: 1007 as stored, 1006 RAS -> LPS."""
    sitk = pytest.importorskip("SimpleITK")
    d = np.zeros((3, 4, 5, 1, 3), np.float32)
    d[...] = (1.0, 2.0, 3.0)
    img = nib.Nifti1Image(d, _affine("LPS"))
    img.header.set_intent(intent)
    nib.save(img, str(tmp_path / "v.nii.gz"))
    r = sitk.ReadImage(str(tmp_path / "v.nii.gz"))
    assert r.GetNumberOfComponentsPerPixel() == 3 and r.GetSize() == (3, 4, 5)
    assert r[1, 2, 3] == pytest.approx(expect)
