"""`mambamorph register`'s library side: model space, world-space warping, ITK export, errors."""

import json
import logging

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel import orientations as nio
from torch import nn

from mambamorph import checkpoint, io
from mambamorph import register as reg
from mambamorph.data.preprocess import resample_array
from mambamorph.errors import InputError
from mambamorph.models import build_model
from mambamorph.models.registry import RegistrationOutput

CENTRE = np.array([5.0, -10.0, 8.0])  # world centre (RAS mm) of the phantom object
RADII = np.array([40.0, 45.0, 35.0])
SEG_IDS = {2, 17, 41}
MODEL_META = {"spacing": [4, 4, 4], "grid": [32, 32, 32]}


def _affine(codes, spacing, shape, centre, rot_deg=0.0):
    """Voxel -> RAS affine with array axes along ``codes``, grid centre at world ``centre``."""
    a = np.eye(4)
    flip = nio.inv_ornt_aff(nio.axcodes2ornt(codes), (1, 1, 1))[:3, :3]
    t = np.deg2rad(rot_deg)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    a[:3, :3] = rot @ np.linalg.inv(flip) @ np.diag(spacing)
    a[:3, 3] = np.asarray(centre) - a[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return a


def _world(affine, shape):
    """(X, Y, Z, 3) world coordinates of every voxel."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def _object(p):
    """The phantom: a smooth textured ellipsoid defined in world space (mm), background 0."""
    q = (p - CENTRE) / RADII
    r = np.sqrt((q ** 2).sum(-1))
    inside = 1.0 / (1.0 + np.exp((r - 1.0) / 0.06))
    tex = (100 + 40 * np.sin(p[..., 0] / 7.0) * np.cos(p[..., 1] / 9.0)
           + 30 * np.sin(p[..., 2] / 6.0 + 0.5))
    return inside * tex


def _labels(p):
    q = (p - CENTRE) / RADII
    r = np.sqrt((q ** 2).sum(-1))
    lab = np.zeros(r.shape, np.int16)
    lab[r < 1.0] = 2
    lab[(r < 0.7) & (p[..., 0] > CENTRE[0])] = 41
    lab[r < 0.4] = 17
    return lab


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Fixed (LPS, oblique, anisotropic), moving (RAS, isotropic), seg, and a small checkpoint."""
    root = tmp_path_factory.mktemp("reg")
    f_shape, m_shape = (40, 36, 32), (52, 56, 48)
    f_aff = _affine("LPS", (3.0, 3.5, 4.0), f_shape, CENTRE + [2, 1, -3], rot_deg=10.0)
    m_aff = _affine("RAS", (2.5, 2.5, 2.5), m_shape, CENTRE + [-3, 2, 1])
    fixed = _object(_world(f_aff, f_shape)).astype(np.float32)
    moving = _object(_world(m_aff, m_shape)).astype(np.float32)
    nib.save(nib.Nifti1Image(fixed, f_aff), str(root / "fixed.nii.gz"))
    nib.save(nib.Nifti1Image(moving, m_aff), str(root / "moving.nii.gz"))
    nib.save(nib.Nifti1Image(_labels(_world(m_aff, m_shape)), m_aff), str(root / "seg.nii.gz"))
    torch.manual_seed(0)
    ck = checkpoint.save_model(root / "vm", build_model("voxelmorph"), meta=MODEL_META)
    return {"root": root, "fixed": root / "fixed.nii.gz", "moving": root / "moving.nii.gz",
            "seg": root / "seg.nii.gz", "ckpt": ck}


class FieldModel(nn.Module):
    """Wraps a loaded model; returns a known displacement (model voxels) and records inputs."""

    def __init__(self, base, field_fn):
        super().__init__()
        self.base, self.field_fn, self.seen = base, field_fn, None
        self.size_multiple = base.size_multiple

    def forward(self, moving, fixed):
        self.seen = (moving.detach().clone(), fixed.detach().clone())
        flow = torch.as_tensor(self.field_fn(moving.shape[2:]), dtype=torch.float32)
        return RegistrationOutput(flow=flow[None].to(moving.device))


def _sine(y, g, amp=2.0):
    """Smooth displacement (voxels) at model-grid points ``y`` (..., 3) of a grid ``g`` and its
    Jacobian matrix ``I + du/dy`` (..., 3, 3); gradients up to ~0.6: no folds."""
    w = 2 * np.pi / np.asarray(g, dtype=np.float64)
    u = np.zeros(y.shape)
    jac = np.broadcast_to(np.eye(3), (*y.shape[:-1], 3, 3)).copy()
    for i in range(3):
        j = (i + 1) % 3
        u[..., i] = amp * np.sin(w[j] * y[..., j] + i) + 0.5 * amp * np.sin(w[i] * y[..., i])
        jac[..., i, j] += amp * w[j] * np.cos(w[j] * y[..., j] + i)
        jac[..., i, i] += 0.5 * amp * w[i] * np.cos(w[i] * y[..., i])
    return u, jac


def _sine_field(shape):
    """:func:`_sine` on the voxels of a grid, as a (3, G0, G1, G2) field."""
    y = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)
    return np.moveaxis(_sine(y, shape)[0], -1, 0)


def _patch(monkeypatch, field_fn):
    holder = {}
    real = checkpoint.load_model

    def load(path, device="cpu", **kw):
        base, info = real(path, device, **kw)
        holder["model"] = FieldModel(base, field_fn)
        return holder["model"], info

    monkeypatch.setattr(reg, "load_model", load)
    return holder


def _corr(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


# ------------------------------------------------------------------------------------ tests
def test_model_space_geometry(data, caplog):
    fixed = io.read_volume(data["fixed"])
    centre = reg.foreground_centre(fixed)
    assert np.linalg.norm(centre - CENTRE) < 4.0  # one fixed voxel of the true object centre
    space = reg.model_space(fixed, (4, 5, 6), (32, 48, 16))
    assert space.shape == (32, 48, 16) and space.spacing == (4.0, 5.0, 6.0)
    cols = space.affine[:3, :3]
    np.testing.assert_allclose(np.linalg.norm(cols, axis=0), [4, 5, 6])
    np.testing.assert_allclose(cols / [4, 5, 6], fixed.affine[:3, :3] / fixed.spacing, atol=1e-12)
    np.testing.assert_allclose(space.affine[:3, :3] @ [15.5, 23.5, 7.5] + space.affine[:3, 3],
                               centre, atol=1e-9)
    with caplog.at_level(logging.WARNING, logger="mambamorph.register"):
        space, defaulted = reg.model_space_from_meta(fixed, {}, "ck")
    assert defaulted == ["spacing", "grid"] and space.shape == reg.DEFAULT_GRID
    assert "assuming 2x2x2 mm" in caplog.text and "assuming 96x112x96" in caplog.text
    for bad in ({"grid": [32, 32]}, {"grid": [32, 32.5, 32]}, {"spacing": [0, 1, 1]},
                {"spacing": "two"}):
        with pytest.raises(InputError, match="ck: meta"):
            reg.model_space_from_meta(fixed, {**MODEL_META, **bad}, "ck")


def test_register_outputs(data, tmp_path):
    """Real (randomly initialised) checkpoint end to end: files, geometry, labels, record."""
    out = tmp_path / "out"
    res = reg.register_files(data["moving"], data["fixed"], data["ckpt"], out,
                             moving_seg=data["seg"], affine=False, io=False)
    names = set(reg.OUTPUT_NAMES.values()) - {"affine_itk.tfm"}  # no affine stage asked for
    assert {p.name for p in out.iterdir()} == names
    assert set(res.files) == set(reg.OUTPUT_NAMES) - {"affine"}
    assert all(p.exists() for p in res.files.values())
    ref = nib.load(str(data["fixed"]))
    for name in names - {"qc.png", "register.json"}:
        img = nib.load(str(out / name))
        assert img.shape[:3] == ref.shape, name
        np.testing.assert_allclose(img.affine, ref.affine, atol=1e-5, err_msg=name)
        assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
        assert img.header["sform_code"] == ref.header["sform_code"]
    field = nib.load(str(out / "displacement_itk.nii.gz"))
    assert field.shape == (*ref.shape, 1, 3) and field.header.get_intent()[0] == "vector"
    seg = np.asanyarray(nib.load(str(out / "warped_seg.nii.gz")).dataobj)
    assert set(np.unique(seg).tolist()) <= SEG_IDS | {0} and len(np.unique(seg)) == 4
    # the random init predicts ~0: the result is the moving image resampled onto the fixed grid
    mov, fix = io.read_volume(data["moving"]), io.read_volume(data["fixed"])
    before = resample_array(mov.data.numpy(), mov.affine, fix.affine, fix.shape, order=1)
    warped = io.read_volume(out / "warped.nii.gz").data.numpy()
    assert np.abs(warped - before).max() < 1e-2 * before.max()
    rec = json.loads((out / "register.json").read_text())
    assert rec["model"] == "voxelmorph" and rec["model_space"]["grid"] == [32, 32, 32]
    assert rec["model_space"]["spacing_mm"] == [4.0, 4.0, 4.0] and rec["folding_percent"] == 0
    assert set(rec["outputs"].values()) == names and rec["moving_seg"].endswith("seg.nii.gz")
    text = str(res)
    for s in ("voxelmorph", "32x32x32", "4x4x4 mm", "folding 0.000 %", "warped_seg.nii.gz",
              "displacement_itk.nii.gz", "qc.png"):
        assert s in text, s


def test_zero_field_is_resampling(data, tmp_path, monkeypatch):
    """An identity model gives exactly the moving image resampled through world coordinates."""
    holder = _patch(monkeypatch, lambda s: np.zeros((3, *s)))
    out = tmp_path / "zero"
    res = reg.register_files(data["moving"], data["fixed"], data["ckpt"], out,
                             moving_seg=data["seg"], affine=False, io=False)
    mov, fix = io.read_volume(data["moving"]), io.read_volume(data["fixed"])
    seg = io.read_labels(data["seg"], check_table=False)
    before = resample_array(mov.data.numpy(), mov.affine, fix.affine, fix.shape, order=1)
    seg_before = resample_array(seg.data.numpy(), seg.affine, fix.affine, fix.shape, order=0)
    np.testing.assert_allclose(io.read_volume(out / "warped.nii.gz").data.numpy(), before,
                               atol=1e-4)
    got_seg = io.read_labels(out / "warped_seg.nii.gz", check_table=False).data.numpy()
    np.testing.assert_array_equal(got_seg, seg_before)
    jac = np.asanyarray(nib.load(str(out / "jacobian.nii.gz")).dataobj)
    np.testing.assert_array_equal(jac, 1.0)
    assert not np.asanyarray(nib.load(str(out / "displacement_itk.nii.gz")).dataobj).any()
    assert res.folding_percent == 0.0 and res.max_displacement_mm == 0.0
    # the network saw [0, 1] images of the model grid, the fixed one centred on the object
    m_in, f_in = holder["model"].seen
    assert m_in.shape == f_in.shape == (1, 1, 32, 32, 32)
    assert float(m_in.min()) >= 0 and float(f_in.max()) <= 1 and float(f_in.max()) > 0.9
    p = _world(res.space.affine, res.space.shape)
    expect = _object(p)
    assert _corr(f_in[0, 0].numpy(), expect) > 0.99 and _corr(m_in[0, 0].numpy(), expect) > 0.99


def test_itk_field_reproduces_warp(data, tmp_path, monkeypatch):
    """A non-trivial field: SimpleITK applying displacement_itk.nii.gz to MOVING gives
    warped.nii.gz, and both match the analytic object sampled at p + d(p)."""
    sitk = pytest.importorskip("SimpleITK")
    _patch(monkeypatch, _sine_field)
    out = tmp_path / "sine"
    res = reg.register_files(data["moving"], data["fixed"], data["ckpt"], out,
                             moving_seg=data["seg"], affine=False, io=False)
    assert res.max_displacement_mm > 6.0 and res.folding_percent == 0.0

    fixed_img = sitk.ReadImage(str(data["fixed"]), sitk.sitkFloat64)
    moving_img = sitk.ReadImage(str(data["moving"]), sitk.sitkFloat64)
    field = sitk.Cast(sitk.ReadImage(str(out / "displacement_itk.nii.gz")),
                      sitk.sitkVectorFloat64)
    tx = sitk.DisplacementFieldTransform(field)
    itk = sitk.GetArrayFromImage(sitk.Resample(moving_img, fixed_img, tx, sitk.sitkLinear, 0.0))
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz"), sitk.sitkFloat64))
    ident = sitk.GetArrayFromImage(sitk.Resample(moving_img, fixed_img, sitk.Transform(),
                                                 sitk.sitkLinear, 0.0))
    interior = (slice(3, -3),) * 3
    assert _corr(itk[interior], ours[interior]) > 0.999
    assert np.median(np.abs(itk - ours)[interior]) < 1e-3
    assert _corr(ident[interior], ours[interior]) < 0.95  # the field matters

    # independent of ITK: warped(p) ~ object(p + d(p)), d from the analytic field
    fix = io.read_volume(data["fixed"])
    p = _world(fix.affine, fix.shape)
    a = res.space.affine
    y = (p - a[:3, 3]) @ np.linalg.inv(a[:3, :3]).T  # model-grid coordinates
    g = np.array(res.space.shape)
    inside = np.all((y >= 0) & (y <= g - 1), -1)
    u, jac_true = _sine(y, g)
    u[~inside] = 0.0
    expect = _object(p + u @ a[:3, :3].T)
    warped = io.read_volume(out / "warped.nii.gz").data.numpy()
    assert _corr(warped, expect) > 0.99
    # labels follow the same field: the warped seg matches the analytic labels at p + d(p)
    seg = io.read_labels(out / "warped_seg.nii.gz", check_table=False).data.numpy()
    assert np.mean(seg == _labels(p + u @ a[:3, :3].T)) > 0.97
    jac = io.read_volume(out / "jacobian.nii.gz").data.numpy()  # canonical, as y
    core = np.all((y >= 1) & (y <= g - 2), -1)
    np.testing.assert_array_equal(jac[~inside], 1.0)
    assert np.abs(jac - np.linalg.det(jac_true))[core].max() < 0.03
    assert np.linalg.det(jac_true)[core].std() > 0.1  # a map worth checking


def test_small_model_grid_warns(data, tmp_path, caplog):
    ck = checkpoint.save_model(tmp_path / "small", build_model("voxelmorph"),
                               meta={"spacing": [4, 4, 4], "grid": [16, 16, 16]})
    with caplog.at_level(logging.WARNING, logger="mambamorph.register"):
        res = reg.register_files(data["moving"], data["fixed"], ck, tmp_path / "o", affine=False, io=False)
    assert "extends beyond the model grid (16x16x16 voxels at 4x4x4 mm)" in caplog.text
    jac = io.read_volume(res.files["jacobian"]).data.numpy()
    assert np.mean(jac == 1.0) > 0.5  # identity outside the 64 mm model grid


def test_refuses_to_overwrite(data, tmp_path, monkeypatch):
    _patch(monkeypatch, lambda s: np.zeros((3, *s)))
    out = tmp_path / "o"
    out.mkdir()
    (out / "qc.png").write_bytes(b"mine")
    with pytest.raises(InputError, match="qc.png"):
        reg.register_files(data["moving"], data["fixed"], data["ckpt"], out, affine=False, io=False)
    assert [p.name for p in out.iterdir()] == ["qc.png"]  # nothing else written
    assert (out / "qc.png").read_bytes() == b"mine"
    res = reg.register_files(data["moving"], data["fixed"], data["ckpt"], out, overwrite=True, affine=False, io=False)
    assert (out / "qc.png").read_bytes()[:4] == b"\x89PNG" and "warped_seg" not in res.files
    before = (out / "warped.nii.gz").read_bytes()
    with pytest.raises(InputError, match="would overwrite"):
        reg.register_files(data["moving"], data["fixed"], data["ckpt"], out, affine=False, io=False)
    assert (out / "warped.nii.gz").read_bytes() == before


def _bad_case(kind, data, tmp):
    """(moving, fixed, model, seg, expected message fragment) of one bad call."""
    mov, fix, ck, seg = data["moving"], data["fixed"], data["ckpt"], None
    if kind == "text moving":
        mov = tmp / "moving.nii.gz"
        mov.write_text("not an image\n" * 40)
        return mov, fix, ck, seg, f"{mov}: not a NIfTI"
    if kind == "4d fixed":
        fix = tmp / "f4.nii.gz"
        nib.save(nib.Nifti1Image(np.random.rand(8, 8, 8, 2).astype(np.float32), np.eye(4)),
                 str(fix))
        return mov, fix, ck, seg, f"{fix}: expected a 3D volume"
    if kind == "nan moving":
        mov = tmp / "nan.nii.gz"
        arr = np.random.rand(8, 8, 8).astype(np.float32)
        arr[1, 2, 3] = np.nan
        nib.save(nib.Nifti1Image(arr, np.eye(4)), str(mov))
        return mov, fix, ck, seg, f"{mov}: 1 NaN"
    if kind == "far moving":
        img = nib.load(str(mov))
        aff = img.affine.copy()
        aff[:3, 3] += 1000.0
        mov = tmp / "far.nii.gz"
        nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), aff), str(mov))
        return mov, fix, ck, seg, f"{mov}: does not overlap the model grid"
    if kind == "missing fixed":
        return mov, tmp / "nope.nii.gz", ck, seg, "nope.nii.gz: file not found"
    if kind == "float seg":
        seg = tmp / "s.nii.gz"
        nib.save(nib.Nifti1Image(np.full((8, 8, 8), 0.5, np.float32), np.eye(4)), str(seg))
        return mov, fix, ck, seg, f"{seg}: label map holds"
    if kind == "model name":
        return mov, fix, "voxelmorph", seg, "voxelmorph: a model name, not a checkpoint"
    if kind == "folder as checkpoint":
        return mov, fix, tmp, seg, "a folder, not a checkpoint"
    if kind == "missing checkpoint":
        return mov, fix, tmp / "ck.safetensors", seg, "ck.safetensors: checkpoint not found"
    if kind == "corrupt checkpoint":
        (tmp / "bad.json").write_text("{not json")
        (tmp / "bad.safetensors").write_bytes(b"x")
        return mov, fix, tmp / "bad", seg, "bad.json: not a readable checkpoint"
    if kind == "bad grid":
        ck2 = checkpoint.save_model(tmp / "g", build_model("voxelmorph"),
                                    meta={"spacing": 4, "grid": [32, 40, 32]})
        return mov, fix, ck2, seg, "not a multiple of 16"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["text moving", "4d fixed", "nan moving", "far moving",
                                  "missing fixed",
                                  "float seg", "model name", "folder as checkpoint",
                                  "missing checkpoint",
                                  "corrupt checkpoint", "bad grid"])
def test_bad_inputs(data, tmp_path, kind):
    mov, fix, ck, seg, msg = _bad_case(kind, data, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=msg.replace(".", r"\.")):
        reg.register_files(mov, fix, ck, out, moving_seg=seg, affine=False, io=False)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_unavailable(data, tmp_path):
    with pytest.raises(InputError, match="CUDA is not available"):
        reg.register_files(data["moving"], data["fixed"], data["ckpt"], tmp_path / "o",
                           device="cuda", affine=False, io=False)
    with pytest.raises(InputError, match="bogus"):
        reg.register_files(data["moving"], data["fixed"], data["ckpt"], tmp_path / "o",
                           device="bogus", affine=False, io=False)


def test_cli_register(data, tmp_path, capsys):
    from mambamorph.cli import main

    out = tmp_path / "cli"
    rc = main(["register", str(data["moving"]), str(data["fixed"]), "--model",
               str(data["ckpt"]), "--out", str(out), "--moving-seg", str(data["seg"])])
    text = capsys.readouterr().out
    assert rc == 0 and "warped.nii.gz" in text and "folding" in text
    assert (out / "warped_seg.nii.gz").exists()
    rc = main(["register", str(data["moving"]), str(data["fixed"]), "--model",
               str(data["ckpt"]), "--out", str(out)])
    assert rc == 2 and "would overwrite" in capsys.readouterr().err


@pytest.mark.gpu
def test_cuda_matches_cpu(data, tmp_path):
    cpu = reg.register_files(data["moving"], data["fixed"], data["ckpt"], tmp_path / "cpu", affine=False, io=False)
    gpu = reg.register_files(data["moving"], data["fixed"], data["ckpt"], tmp_path / "gpu",
                             device="cuda", affine=False, io=False)
    assert gpu.device.startswith("cuda")
    a = io.read_volume(cpu.files["warped"]).data.numpy()
    b = io.read_volume(gpu.files["warped"]).data.numpy()
    np.testing.assert_allclose(a, b, atol=1e-3 * np.abs(a).max())


def test_qc_checkerboard_slices_match_the_volume_checkerboard():
    """The QC figure's checkerboard panels are slices of :func:`viz.checkerboard` of the volumes."""
    from mambamorph import viz

    rng = np.random.default_rng(0)
    a, b = rng.random((20, 23, 17)) * 5, rng.random((20, 23, 17)) * 3 + 1
    a[:3] = 0  # background, left out of the display window
    for tiles in (2, 5):
        cb = viz.checkerboard(a, b, tiles=tiles)
        for axis in range(3):
            for index in (0, 7, 16):
                np.testing.assert_array_equal(
                    viz._checker_slice(a, b, axis, index, tiles, viz._window(a), viz._window(b)),
                    viz.display_slice(cb, axis, index))


# ------------------------------------------------------------ the whole pipeline (affine, IO)
def _moved_header(path, out, deg=20.0, shift=(16.0, -20.0, 14.0)):
    """``path`` with its world position moved by a rigid transform (rotation ``deg`` about an
    oblique axis through the object's centre, then ``shift`` mm): same voxels, new header."""
    from scipy.spatial.transform import Rotation

    img = nib.load(str(path))
    rot = Rotation.from_rotvec(np.deg2rad(deg) * np.array([1.0, 2.0, 0.5])
                               / np.linalg.norm([1.0, 2.0, 0.5])).as_matrix()
    move = np.eye(4)
    move[:3, :3] = rot
    move[:3, 3] = CENTRE - rot @ CENTRE + np.asarray(shift)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), move @ img.affine), str(out))
    return out


def _label_agreement(out, fixed_path):
    """Share of the fixed object's voxels whose warped label equals the analytic label there."""
    fix = io.read_volume(fixed_path)
    truth = _labels(_world(fix.affine, fix.shape))
    got = io.read_labels(out / "warped_seg.nii.gz", check_table=False).data.numpy()
    return float(np.mean(got[truth > 0] == truth[truth > 0]))


def test_pipeline_whole_transform_is_exported(data, tmp_path):
    """Affine + network + IO (the defaults): the ITK field is the whole transform (SimpleITK
    applying it reproduces warped.nii.gz), the affine alone is written as an ITK .tfm, and the
    record says what ran."""
    sitk = pytest.importorskip("SimpleITK")
    from mambamorph.optimize.instance import IOConfig

    out = tmp_path / "all"
    cfg = IOConfig(iterations=(5, 5))
    res = reg.register_files(data["moving"], data["fixed"], data["ckpt"], out,
                             moving_seg=data["seg"], io_config=cfg)
    assert {p.name for p in out.iterdir()} == set(reg.OUTPUT_NAMES.values())
    assert res.instance_optimisation and res.affine is not None and res.folding_percent == 0
    rec = json.loads((out / "register.json").read_text())
    assert rec["instance_optimisation"]["iterations"] == [5, 5] and len(rec["affine"]) == 4
    assert {"affine", "network", "instance optimisation"} <= set(rec["seconds_stages"])
    fixed_img = sitk.ReadImage(str(data["fixed"]), sitk.sitkFloat64)
    moving_img = sitk.ReadImage(str(data["moving"]), sitk.sitkFloat64)
    field = sitk.Cast(sitk.ReadImage(str(out / "displacement_itk.nii.gz")),
                      sitk.sitkVectorFloat64)
    itk = sitk.GetArrayFromImage(sitk.Resample(moving_img, fixed_img,
                                               sitk.DisplacementFieldTransform(field),
                                               sitk.sitkLinear, 0.0))
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz"), sitk.sitkFloat64))
    interior = (slice(3, -3),) * 3
    assert _corr(itk[interior], ours[interior]) > 0.999
    tfm = sitk.ReadTransform(str(out / "affine_itk.tfm"))
    assert isinstance(tfm, sitk.Transform) and tfm.GetNumberOfFixedParameters() == 3


def test_rigidly_moved_pair_registers_like_the_aligned_one(data, tmp_path):
    """A moving image whose header is rotated by 20 degrees and shifted by 29 mm: with the affine
    stage the labels land where they belong, as for the aligned pair; without it they do not."""
    from mambamorph.optimize.instance import IOConfig

    cfg = IOConfig(iterations=(5, 5))
    moved = _moved_header(data["moving"], tmp_path / "moved.nii.gz")
    seg = _moved_header(data["seg"], tmp_path / "moved_seg.nii.gz")
    kw = dict(io_config=cfg)
    reg.register_files(data["moving"], data["fixed"], data["ckpt"], tmp_path / "a",
                       moving_seg=data["seg"], **kw)
    reg.register_files(moved, data["fixed"], data["ckpt"], tmp_path / "b", moving_seg=seg, **kw)
    reg.register_files(moved, data["fixed"], data["ckpt"], tmp_path / "c", moving_seg=seg,
                       affine=False, **kw)
    aligned = _label_agreement(tmp_path / "a", data["fixed"])
    moved_aff = _label_agreement(tmp_path / "b", data["fixed"])
    moved_none = _label_agreement(tmp_path / "c", data["fixed"])
    assert aligned > 0.9 and moved_aff > aligned - 0.02, (aligned, moved_aff)
    assert moved_none < aligned - 0.1, (aligned, moved_none)  # the move matters


def test_training_free_path(data, tmp_path, capsys):
    """No network (model=None / --no-model): IO from the identity on the default 2 mm grid."""
    from mambamorph.cli import main

    out = tmp_path / "free"
    rc = main(["register", str(data["moving"]), str(data["fixed"]), "--no-model", "--no-affine",
               "--io-iterations", "3,3", "--out", str(out), "--moving-seg", str(data["seg"])])
    text = capsys.readouterr().out
    assert rc == 0 and "training-free" in text
    rec = json.loads((out / "register.json").read_text())
    assert rec["checkpoint"] is None and rec["model"] == "none"
    assert rec["model_space"]["grid"] == list(reg.DEFAULT_GRID)
    assert "network" not in rec["seconds_stages"]
    assert _label_agreement(out, data["fixed"]) > 0.85


def test_the_command_ends_at_once_after_register_with_its_outputs_and_exit_code(data, tmp_path):
    """``python -m mambamorph register`` (cli.run) ends the process without the interpreter's
    teardown: every output is there and complete, the printed summary arrives, and the exit
    code is the command's (0, then 2 for an existing output folder)."""
    import subprocess
    import sys

    out = tmp_path / "cmd"
    cmd = [sys.executable, "-m", "mambamorph", "register", str(data["moving"]),
           str(data["fixed"]), "--no-model", "--no-affine", "--io-iterations", "2,2", "--out",
           str(out), "--moving-seg", str(data["seg"])]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "registered with" in done.stdout and "register.json" in done.stdout
    rec = json.loads((out / "register.json").read_text())
    for name in ("warped", "warped_seg", "displacement", "jacobian", "qc"):
        path = out / rec["outputs"][name]
        assert path.is_file() and path.stat().st_size > 0, name
    assert nib.load(str(out / "warped.nii.gz")).get_fdata().shape == (40, 36, 32)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_cli_register_contradictions(data, tmp_path, capsys):
    from mambamorph.cli import main

    base = ["register", str(data["moving"]), str(data["fixed"]), "--out", str(tmp_path / "x")]
    assert main(base + ["--no-model", "--model", str(data["ckpt"])]) == 2
    assert "contradict" in capsys.readouterr().err
    assert main(base + ["--no-model", "--no-io"]) == 2
    assert main(base + ["--io-iterations", "5"]) == 2
    assert "one per level" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_default_model_is_the_shipped_weights():
    from mambamorph.checkpoint import shipped_weights

    assert reg.DEFAULT_MODEL == shipped_weights("mambamorph") is not None
