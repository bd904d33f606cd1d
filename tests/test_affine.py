"""Affine pre-alignment (optimize/affine.py) and the ITK affine export (io.write_itk_affine)."""

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel import orientations as nio
from scipy import ndimage as ndi

from mambamorph import io
from mambamorph.errors import InputError
from mambamorph.optimize import affine as aff
from mambamorph.space import warp_to_fixed


def _rotation(axis, deg):
    axis = np.asarray(axis, np.float64) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.deg2rad(deg)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def _rigid(axis, deg, shift, centre=(0.0, 0.0, 0.0)):
    m = np.eye(4)
    m[:3, :3] = _rotation(axis, deg)
    c = np.asarray(centre, np.float64)
    m[:3, 3] = c - m[:3, :3] @ c + np.asarray(shift, np.float64)
    return m


def _grid_affine(codes, spacing, rot_axis=(1, 2, 3), rot_deg=0.0, shape=(8, 8, 8),
                 centre=(0.0, 0.0, 0.0)):
    """Voxel -> RAS affine, axes along ``codes``, oblique by ``rot_deg``, centred on ``centre``."""
    a = np.eye(4)
    a[:3, :3] = np.linalg.inv(nio.inv_ornt_aff(nio.axcodes2ornt(codes), (1, 1, 1))[:3, :3])
    a[:3, :3] = _rotation(rot_axis, rot_deg) @ a[:3, :3] * np.asarray(spacing)
    a[:3, 3] = np.asarray(centre) - a[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    return a


def _world(affine, shape):
    """``(D0, D1, D2, 3)`` world coordinates of every voxel of a grid."""
    vox = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    return vox @ affine[:3, :3].T + affine[:3, 3]


def _object(world, contrast="mr"):
    """An asymmetric 'head': a soft ellipsoid filled with smooth waves (an analytic texture of
    world position), seen in two contrasts (the 'ct' one is a non-monotonic map of the 'mr')."""
    rng = np.random.default_rng(7)
    waves = rng.normal(size=(6, 3))
    waves *= (2 * np.pi / rng.uniform(18.0, 40.0, size=(6, 1))) / np.linalg.norm(waves, axis=1,
                                                                               keepdims=True)
    phase = rng.uniform(0, 2 * np.pi, 6)
    tissue = np.sin(world @ waves.T + phase).mean(-1)  # (D0, D1, D2), about -1..1
    q = np.sqrt((((world - np.array([3.0, -2.0, 1.0])) / np.array([36.0, 30.0, 26.0])) ** 2
                 ).sum(-1))
    head = 1.0 / (1.0 + np.exp((q - 1.0) * 15.0))
    value = 0.5 + 0.4 * tissue if contrast == "mr" else 0.9 - 0.8 * np.abs(tissue)
    return (head * value).astype(np.float32)


def _pair(truth):
    """Fixed 'CT' on a 3 mm RAS grid; moving 'MR' of the same object seen through ``truth``.

    The moving grid is stored LPS with anisotropic 2.5 x 3 x 3.5 mm voxels, oblique; its
    voxels are computed analytically: moving(y) = object(inv(truth) y), so the alignment
    fixed world -> moving world is exactly ``truth``.
    """
    fshape, mshape = (36, 36, 32), (44, 36, 32)
    faff = _grid_affine("RAS", 3.0, shape=fshape)
    maff = _grid_affine("LPS", (2.5, 3.0, 3.5), rot_deg=8.0, shape=mshape, centre=(4, -3, 2))
    fixed = io.Volume.from_array(_object(_world(faff, fshape), "ct"), faff)
    mw = _world(maff, mshape) @ np.linalg.inv(truth)[:3, :3].T + np.linalg.inv(truth)[:3, 3]
    moving = io.Volume.from_array(_object(mw, "mr"), maff)
    return moving, fixed


def _error(found, truth, fixed):
    e = np.linalg.inv(truth) @ found
    u, _, vt = np.linalg.svd(e[:3, :3])
    angle = np.degrees(np.arccos(np.clip((np.trace(u @ vt) - 1) / 2, -1, 1)))
    pts = _world(fixed.affine, fixed.shape).reshape(-1, 3)[fixed.data.numpy().ravel() > 0.1]
    dist = np.linalg.norm(pts @ (found - truth)[:3, :3].T + (found - truth)[:3, 3], axis=1)
    return angle, dist.mean()


# ------------------------------------------------------------------- numerical pieces
def test_sample_matches_scipy_trilinear():
    rng = np.random.default_rng(0)
    img = rng.random((7, 9, 6)).astype(np.float32)
    vox = rng.uniform(-1.0, [7.0, 9.0, 6.0], size=(400, 3))
    got, inside = aff._sample(torch.from_numpy(img), torch.from_numpy(vox).float())
    want = ndi.map_coordinates(img, vox.T, order=1, mode="constant", cval=0.0)
    ok = np.all((vox >= 0) & (vox <= np.array(img.shape) - 1), axis=1)
    np.testing.assert_array_equal(inside.numpy(), ok)
    np.testing.assert_allclose(got.numpy()[ok], want[ok], atol=1e-5)
    assert np.all(got.numpy()[~ok] == 0)
    pts = torch.tensor([[2.3, 4.6, 1.2]], dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda p: aff._sample(torch.from_numpy(img).double(), p)[0], pts)


def test_parzen_windows_match_the_full_gaussian_and_so_does_the_mutual_information():
    """The windows are evaluated within 4 sigma only: against the plain definition (a Gaussian
    over every bin), weights agree to 4e-4 and the metric and its gradient to 0.1 % / 1 %."""
    def full(values, bins):
        centres = (torch.arange(bins, dtype=values.dtype) + 0.5) / bins
        w = torch.exp(-0.5 * ((values[:, None] - centres) * bins) ** 2)
        return w / w.sum(dim=1, keepdim=True)

    rng = np.random.default_rng(3)
    bins = 32
    x = torch.from_numpy(np.concatenate([rng.random(5000), [0.0, 1.0, 0.5 / bins]]))
    np.testing.assert_allclose(aff._parzen(x, bins).numpy(), full(x, bins).numpy(), atol=4e-4)
    y = (0.7 * x + 0.2 * torch.from_numpy(rng.random(len(x)))).requires_grad_()
    mask = torch.from_numpy((rng.random(len(x)) > 0.1).astype(np.float64))
    fast = aff._neg_mi(aff._parzen(x, bins), aff._parzen(y, bins), mask)
    plain = aff._neg_mi(full(x, bins), full(y, bins), mask)
    assert fast.item() == pytest.approx(plain.item(), rel=1e-3)
    g_fast, = torch.autograd.grad(fast, y)
    g_plain, = torch.autograd.grad(plain, y)
    assert float((g_fast - g_plain).abs().max()) < 0.01 * float(g_plain.abs().max())


def test_mutual_information_analytic_cases():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.random(20000))
    w = aff._parzen(x, 16)
    np.testing.assert_allclose(w.sum(1).numpy(), 1.0)
    mask = torch.ones(len(x), dtype=torch.float64)
    # hard (one-hot) bins: I(K; K) is the entropy of K; K and an independent L share nothing
    k = torch.from_numpy(rng.integers(0, 16, 20000))
    hot = torch.nn.functional.one_hot(k, 16).double()
    p = np.bincount(k.numpy(), minlength=16) / len(k)
    assert -float(aff._neg_mi(hot, hot, mask)) == pytest.approx(-(p * np.log(p)).sum(), rel=1e-6)
    other = torch.nn.functional.one_hot(torch.from_numpy(rng.integers(0, 16, 20000)), 16)
    assert -float(aff._neg_mi(hot, other.double(), mask)) < 0.01
    half = mask.clone()
    half[10000:] = 0  # masked samples do not count
    assert -float(aff._neg_mi(hot, torch.cat([hot[:10000], other[10000:].double()]), half)) \
        == pytest.approx(-float(aff._neg_mi(hot[:10000], hot[:10000], mask[:10000])), rel=1e-9)
    # Parzen weights: a reversed contrast (1 - x) carries the same information
    same = -float(aff._neg_mi(w, w, mask))
    inverted = -float(aff._neg_mi(w, aff._parzen(1 - x, 16), mask))  # a contrast change
    # (equal to the windows' truncation at 4 sigma, which is not mirror-symmetric: 1.2e-6)
    assert inverted == pytest.approx(same, rel=1e-5)
    shuffled = -float(aff._neg_mi(w, aff._parzen(x[torch.randperm(len(x))], 16), mask))
    assert shuffled < 0.01 < 0.5 * same


def test_compiled_metric_matches_the_torch_definition():
    """affine_cpu.neg_mi_at_points (one numba pass, value and gradient) against the torch
    definition (_sample, _parzen, _neg_mi through autograd), float64: points inside, outside and
    on the image's edge, samples clamped below 0 and above 1, the overlap share."""
    from mambamorph.optimize.affine_cpu import neg_mi_at_points

    g = torch.Generator().manual_seed(0)
    img = torch.rand(12, 14, 10, dtype=torch.float64, generator=g) * 1.2 - 0.1
    n = 3000
    span = torch.tensor([13.0, 15.0, 11.0], dtype=torch.float64)
    vox = torch.rand(n, 3, dtype=torch.float64, generator=g) * span - 0.5
    vox[:5] = torch.tensor([[0.0, 0.0, 0.0], [11.0, 13.0, 9.0], [11.0, 2.5, 3.5],
                            [-1e-3, 4.0, 4.0], [3.3, 13.2, 4.1]], dtype=torch.float64)
    for bins in (32, 8):
        wf = aff._parzen(torch.rand(n, dtype=torch.float64, generator=g), bins)
        a = vox.clone().requires_grad_()
        b = vox.clone().requires_grad_()
        value, share = neg_mi_at_points(img, a, wf)
        values, inside = aff._sample(img, b)
        ref = aff._neg_mi(wf, aff._parzen(values.clamp(0, 1), bins), inside.double())
        assert value.item() == pytest.approx(ref.item(), rel=1e-12)
        assert share == pytest.approx(float(inside.double().mean()), abs=1e-12)
        assert 0.4 < share < 0.9
        value.backward()
        ref.backward()
        # on the upper edge itself torch.minimum splits the gradient between its two equal
        # arguments (half of it lost); the kernel takes the one-sided derivative there
        on_edge = vox == span - 2.0  # (n, 3): the coordinates on the upper edge
        assert on_edge.sum() == 4 and on_edge[1:3].any(dim=1).all()
        assert torch.allclose(a.grad[~on_edge], b.grad[~on_edge], atol=1e-15, rtol=1e-9)
        torch.testing.assert_close(a.grad[on_edge], 2 * b.grad[on_edge], atol=1e-15, rtol=1e-9)
        assert b.grad.abs().max() > 0


def test_both_metric_paths_align_alike():
    """align_affine's stages with the compiled metric and with the torch definition reach the
    same transform (to float32 rounding of the definition's sampling positions)."""
    truth = _rigid((1.0, -0.5, 0.3), 8.0, (4.0, -3.0, 2.0))
    moving, fixed = _pair(truth)
    mats = []
    for reference in (False, True):
        stages = aff._Stages(moving, fixed, aff.foreground_centre(fixed), (2, 1), 20, 32, 0.2, 0,
                             reference=reference)
        mats.append(stages.run("rigid", np.eye(4))[0])
    np.testing.assert_allclose(mats[0], mats[1], atol=1e-3)
    angle, dist = _error(mats[0], truth, fixed)
    assert angle < 1.5 and dist < 1.5, (angle, dist)


def test_rotation_vector_matches_scipy():
    from scipy.spatial.transform import Rotation

    r = np.array([0.3, -0.2, 0.5])
    np.testing.assert_allclose(aff._rotation(torch.from_numpy(r)).numpy(),
                               Rotation.from_rotvec(r).as_matrix(), atol=1e-12)


# ------------------------------------------------------------------------------ recovery
def test_recovers_known_rotation_and_shift():
    truth = _rigid((1.0, -0.5, 0.3), 12.0, (6.0, -4.0, 5.0), centre=(2.0, 1.0, -1.0))
    moving, fixed = _pair(truth)
    start_angle, start_dist = _error(np.eye(4), truth, fixed)
    assert start_angle > 11 and start_dist > 8
    threads = torch.get_num_threads()
    res = aff.align_affine(moving, fixed, levels=(2, 1), sampling=0.2)
    assert torch.get_num_threads() == threads  # the one-thread setting is restored
    assert res.stages == ["centre", "rigid", "affine"] and not res.warnings
    angle, dist = _error(res.rigid, truth, fixed)
    assert angle < 1.0 and dist < 1.0, (angle, dist)
    angle, dist = _error(res.matrix, truth, fixed)
    assert angle < 1.0 and dist < 1.0, (angle, dist)
    assert np.isfinite(res.metric) and res.metric < 0 and res.seconds > 0
    assert aff.check_linear(res.rigid, rigid=True) is None


def test_stages_can_be_switched_off():
    truth = _rigid((0, 0, 1), 5.0, (3.0, 0.0, 0.0))
    moving, fixed = _pair(truth)
    res = aff.align_affine(moving, fixed, rigid=False, affine=False)
    assert res.stages == ["centre"] and np.isnan(res.metric)
    np.testing.assert_allclose(res.matrix[:3, :3], np.eye(3))
    np.testing.assert_array_equal(res.matrix, res.rigid)
    res = aff.align_affine(moving, fixed, affine=False, levels=(2,), iterations=30)
    assert res.stages == ["centre", "rigid"]
    np.testing.assert_array_equal(res.matrix, res.rigid)


def test_levels_keep_their_size_in_mm():
    """register's shrink factors pool any fixed image to about 8 and 4 mm (2 mm -> 4, 2)."""
    data = np.zeros((4, 4, 4), np.float32)
    for spacing, want in [((2.0, 2.0, 2.0), (4, 2)), ((1.0, 1.0, 1.0), (8, 4)),
                          ((1.0, 1.0, 3.0), (8, 4)), ((3.5, 3.5, 3.5), (2, 1)),
                          ((10.0, 10.0, 10.0), (1, 1))]:
        vol = io.Volume.from_array(data, np.diag([*spacing, 1.0]))
        assert aff.levels_for(vol) == want, spacing
    assert aff.levels_for(io.Volume.from_array(data, np.diag([0.5, 0.5, 0.5, 1.0])),
                          levels_mm=(6.0, 3.0, 1.0)) == (12, 6, 2)


# ------------------------------------------------------------------------------- bad input
def test_constant_image_is_refused():
    a = np.eye(4)
    good = io.Volume.from_array(np.random.default_rng(0).random((8, 8, 8)), a)
    flat = io.Volume.from_array(np.zeros((8, 8, 8), np.float32), a, path="flat.nii.gz")
    with pytest.raises(InputError, match="flat.nii.gz: empty image"):
        aff.align_affine(flat, good)
    with pytest.raises(InputError, match="fixed image: empty image"):
        aff.align_affine(good, io.Volume.from_array(np.ones((8, 8, 8), np.float32), a))
    with pytest.raises(InputError, match="sampling"):
        aff.align_affine(good, good, sampling=0.0)
    with pytest.raises(InputError, match="levels"):
        aff.align_affine(good, good, levels=(2, 0))


@pytest.mark.parametrize("matrix,reason", [
    (np.diag([1.0, 1.0, 1.0, 1.0]), None),
    (np.diag([1.2, 0.9, 1.1, 1.0]), None),
    (np.diag([-1.0, 1.0, 1.0, 1.0]), "determinant"),
    (np.diag([0.3, 1.0, 1.0, 1.0]), "scale"),
    (np.diag([2.5, 1.0, 1.0, 1.0]), "scale"),
    (np.array([[1.0, 1.2, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), "shear"),
    (np.full((4, 4), np.nan), "non-finite"),
])
def test_check_linear(matrix, reason):
    got = aff.check_linear(matrix)
    assert got is None if reason is None else reason in got
    assert aff.check_linear(np.diag([1.1, 1, 1, 1]), rigid=True).startswith("not a rotation")


@pytest.mark.parametrize("bad", ["reflect", "collapse", "nan", "raise"])
def test_divergent_affine_stage_falls_back_to_rigid(monkeypatch, bad):
    """A diverging affine stage is discarded with a warning; the rigid result is kept."""
    truth = _rigid((0, 0, 1), 8.0, (4.0, -2.0, 0.0))
    moving, fixed = _pair(truth)
    real = aff._Stages.run

    def run(self, name, start):
        if name == "rigid":
            return real(self, name, start)
        m = start.copy()
        if bad == "raise":
            raise RuntimeError("All samples map outside moving image buffer")
        if bad == "reflect":
            m[:3, :3] = m[:3, :3] @ np.diag([-1.0, 1, 1])
        elif bad == "collapse":
            m[:3, :3] *= 0.1
        return m, float("nan") if bad == "nan" else -0.5

    monkeypatch.setattr(aff._Stages, "run", run)
    res = aff.align_affine(moving, fixed, levels=(2,), iterations=40)
    assert res.stages == ["centre", "rigid"]
    assert len(res.warnings) == 1 and "affine stage discarded" in res.warnings[0]
    assert "keeping the rigid result" in res.warnings[0]
    np.testing.assert_array_equal(res.matrix, res.rigid)
    assert aff.check_linear(res.matrix, rigid=True) is None


def test_failed_rigid_stage_keeps_the_centre_initialisation(monkeypatch):
    truth = _rigid((0, 0, 1), 0.0, (5.0, 0.0, 0.0))
    moving, fixed = _pair(truth)
    monkeypatch.setattr(aff._Stages, "run",
                        lambda self, name, start: (np.full((4, 4), np.nan), float("nan")))
    res = aff.align_affine(moving, fixed, levels=(2,), iterations=1)
    assert res.stages == ["centre"] and len(res.warnings) == 2
    assert "keeping the centre result" in res.warnings[0]
    np.testing.assert_allclose(res.matrix[:3, :3], np.eye(3))
    assert abs(res.matrix[0, 3] - 5.0) < 1.5  # foreground centres of the shifted object


# --------------------------------------------------------------------------- ITK exports
def _oblique_pair(tmp_path):
    """Tiny fixed (stored LPS, anisotropic, oblique) and moving (stored ASR) NIfTI files."""
    fshape, mshape = (18, 22, 12), (40, 36, 38)
    faff = _grid_affine("LPS", (1.6, 1.3, 2.0), rot_axis=(0, 0, 1), rot_deg=12.0, shape=fshape,
                        centre=(3.0, -2.0, 1.0))
    maff = _grid_affine("ASR", (1.1, 1.2, 1.0), rot_axis=(1, 0, 0), rot_deg=-9.0, shape=mshape)
    rng = np.random.default_rng(0)
    fdata = ndi.gaussian_filter(rng.normal(size=fshape), 2).astype(np.float32)
    mdata = ndi.gaussian_filter(rng.normal(size=mshape), 2.5).astype(np.float32)
    fpath, mpath = tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz"
    nib.save(nib.Nifti1Image(fdata, faff), str(fpath))
    nib.save(nib.Nifti1Image(mdata, maff), str(mpath))
    return fpath, mpath


def _sitk_warp(sitk, fpath, mpath, tx, fixed):
    f_img = sitk.ReadImage(str(fpath))
    m_img = sitk.ReadImage(str(mpath), sitk.sitkFloat64)
    out = sitk.GetArrayFromImage(sitk.Resample(m_img, f_img, tx, sitk.sitkLinear, 0.0))
    return nio.apply_orientation(out.transpose(2, 1, 0), fixed.ornt)  # stored -> canonical


def _inside(matrix, fixed, moving, disp=None, margin=1.5):
    """Fixed voxels whose sampling point lies well inside the moving grid."""
    t = aff.compose_affine_displacement(matrix, fixed, disp)
    pts = _world(fixed.affine, fixed.shape) + t
    vox = pts @ np.linalg.inv(moving.affine)[:3, :3].T + np.linalg.inv(moving.affine)[:3, 3]
    return np.all((vox > margin) & (vox < np.array(moving.shape) - 1 - margin), -1)


def test_write_itk_affine_reproduces_our_resampling(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    fpath, mpath = _oblique_pair(tmp_path)
    fixed, moving = io.read_volume(fpath), io.read_volume(mpath)
    a = _rigid((1.0, 2.0, -1.0), 17.0, (2.5, -3.0, 1.5))
    a[:3, :3] = a[:3, :3] @ np.diag([1.05, 0.95, 1.0])  # plus scaling: a true affine
    ours = warp_to_fixed(moving, aff.compose_affine_displacement(a, fixed), fixed)
    path = io.write_itk_affine(tmp_path / "affine.tfm", a)
    got = _sitk_warp(sitk, fpath, mpath, sitk.ReadTransform(str(path)), fixed)
    inside = _inside(a, fixed, moving)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(got[inside], ours[inside], atol=1e-4 * np.abs(ours).max())
    # the comparison can tell a wrong convention: the RAS matrix written as it is
    wrong = sitk.AffineTransform(3)
    wrong.SetMatrix(a[:3, :3].ravel().tolist())
    wrong.SetTranslation(a[:3, 3].tolist())
    bad = _sitk_warp(sitk, fpath, mpath, wrong, fixed)
    assert np.corrcoef(bad[inside], ours[inside])[0, 1] < 0.9


def test_write_itk_affine_errors(tmp_path):
    with pytest.raises(InputError, match="4, 4"):
        io.write_itk_affine(tmp_path / "a.tfm", np.eye(3))
    with pytest.raises(InputError, match=".tfm"):
        io.write_itk_affine(tmp_path / "a.nii.gz", np.eye(4))
    io.write_itk_affine(tmp_path / "a.tfm", torch.eye(4))
    with pytest.raises(InputError, match="file exists"):
        io.write_itk_affine(tmp_path / "a.tfm", np.eye(4))


def test_affine_then_deformable_as_one_itk_field(tmp_path):
    """x -> A(x + d(x)): equals resampling by A, then warping that by d; SimpleITK agrees."""
    sitk = pytest.importorskip("SimpleITK")
    fpath, mpath = _oblique_pair(tmp_path)
    fixed, moving = io.read_volume(fpath), io.read_volume(mpath)
    a = _rigid((0.0, 1.0, 1.0), 14.0, (-2.0, 1.0, 3.0))
    w = _world(fixed.affine, fixed.shape)
    d = np.stack([2.0 * np.sin(w[..., 1] / 7.0), 1.5 * np.cos(w[..., 2] / 6.0),
                  1.8 * np.sin(w[..., 0] / 8.0 + 1.0)], -1).astype(np.float32)
    total = aff.compose_affine_displacement(a, fixed, d)
    inside = _inside(a, fixed, moving, d)
    assert inside.mean() > 0.5
    # independent expectation: the moving image at A (x + d(x)), through its own affine
    pts = (w + d) @ a[:3, :3].T + a[:3, 3]
    vox = pts @ np.linalg.inv(moving.affine)[:3, :3].T + np.linalg.inv(moving.affine)[:3, 3]
    expected = ndi.map_coordinates(moving.data.numpy(), np.moveaxis(vox, -1, 0), order=1)
    np.testing.assert_allclose(warp_to_fixed(moving, total, fixed)[inside], expected[inside],
                               atol=1e-4)
    # the order the pipeline applies: resample by A onto a fine grid, then warp that by d
    path = io.write_itk_displacement(tmp_path / "field.nii.gz", total, like=fixed)
    field = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkVectorFloat64)
    got = _sitk_warp(sitk, fpath, mpath, sitk.DisplacementFieldTransform(field), fixed)
    np.testing.assert_allclose(got[inside], expected[inside],
                               atol=1e-3 * np.abs(expected).max())
    # the other order, x -> A x + d(x), is a different transform: the test can tell
    other = aff.compose_affine_displacement(a, fixed) + d
    assert np.abs(other - total)[inside].max() > 0.3
    with pytest.raises(InputError, match="expected"):
        aff.compose_affine_displacement(a, fixed, d[:-1])
