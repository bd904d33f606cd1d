"""Figures: slice orientation, slice choice, checkerboard, and PNGs that read back."""

import numpy as np
import pytest
import torch
from matplotlib import image as mpimg

from mambamorph import viz
from mambamorph.errors import InputError

SHAPE = (32, 40, 36)


def _phantom():
    """A head-like ellipsoid with a lateral-ventricle blob (4) and a fourth ventricle (15)."""
    g = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")).astype(float)
    c = np.array(SHAPE, float)[:, None, None, None] / 2
    r = ((g - c) / (np.array(SHAPE, float)[:, None, None, None] * 0.42)) ** 2
    head = r.sum(0) <= 1
    img = np.where(head, 0.6, 0.0).astype(np.float32)
    seg = np.where(head, 2, 0).astype(np.int16)
    lat = (np.abs(g[0] - 16) <= 5) & (np.abs(g[1] - 22) <= 6) & (np.abs(g[2] - 22) <= 3)
    fourth = (np.abs(g[0] - 14) <= 2) & (np.abs(g[1] - 14) <= 2) & (np.abs(g[2] - 10) <= 2)
    seg[lat] = viz.LATERAL_VENTRICLE
    seg[fourth] = viz.FOURTH_VENTRICLE
    img[lat | fourth] = 0.1
    return img, seg


def _read_png(path):
    assert path.exists() and path.stat().st_size > 5_000
    arr = mpimg.imread(str(path))
    assert arr.ndim == 3 and arr.shape[2] in (3, 4)
    assert arr[..., :3].std() > 0.02  # not a blank canvas
    return arr


def test_display_slice_orientation():
    vol = np.arange(np.prod(SHAPE)).reshape(SHAPE)
    for axis in range(3):
        idx = 5
        shown = viz.display_slice(vol, axis, idx)
        h, v = [a for a in range(3) if a != axis]
        # rows run along the higher remaining axis (vertical), columns along the lower one
        assert shown.shape == (SHAPE[v], SHAPE[h])
        point = [0, 0, 0]
        point[axis], point[h], point[v] = idx, 3, 7
        assert shown[7, 3] == vol[tuple(point)]


def test_display_slice_bad_index():
    with pytest.raises(InputError, match="slice_index"):
        viz.display_slice(np.zeros(SHAPE), 2, SHAPE[2])
    with pytest.raises(InputError, match="axis"):
        viz.display_slice(np.zeros(SHAPE), 3, 0)


def test_ventricle_slice_prefers_slices_with_both_ventricles():
    seg = np.zeros(SHAPE, np.int16)
    seg[20, 5:15, 5:15] = viz.LATERAL_VENTRICLE     # the biggest lateral-ventricle slice
    seg[12, 5:10, 5:10] = viz.LATERAL_VENTRICLE     # smaller, but it also cuts the 4th ventricle
    seg[12, 20:22, 20:22] = viz.FOURTH_VENTRICLE
    assert viz.ventricle_slice(seg, 0) == 12
    seg[seg == viz.FOURTH_VENTRICLE] = 0
    assert viz.ventricle_slice(seg, 0) == 20        # fallback: most lateral-ventricle voxels
    assert viz.ventricle_slice(np.zeros(SHAPE, np.int16), 1) == SHAPE[1] // 2


def test_checkerboard_alternates_tiles():
    a = np.zeros((8, 8))
    b = np.ones((8, 8))
    cb = viz.checkerboard(a, b, tiles=4, normalise=False)
    expected = (np.add.outer(np.arange(8) // 2, np.arange(8) // 2) % 2).astype(float)
    np.testing.assert_array_equal(cb, expected)
    cb3 = viz.checkerboard(np.zeros(SHAPE), np.ones(SHAPE), tiles=2, normalise=False)
    assert cb3[0, 0, 0] == 0 and cb3[-1, 0, 0] == 1 and cb3[-1, -1, 0] == 0
    with pytest.raises(InputError, match="same shape"):
        viz.checkerboard(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(InputError, match="tiles"):
        viz.checkerboard(a, b, tiles=1)


def test_fig2_writes_png_with_ventricle_contours(tmp_path):
    img, seg = _phantom()
    moving = np.roll(img, 2, axis=1)
    warped = {"Method A": torch.from_numpy(np.roll(img, 1, axis=1))[None, None],
              "Method B": img}
    out = viz.fig2(img, moving, warped, seg, tmp_path / "fig2.png",
                   dice_by_method={"Method A": 71.5, "Method B": 88.0}, moving_dice=60.0,
                   spacing=(2.0, 2.0, 2.0), fixed_name="Fixed (CT)", moving_name="Moving (MR)",
                   title="a -> b")
    arr = _read_png(out)
    h, w = arr.shape[:2]
    assert w > 3 * h  # one row of four panels
    rgb = arr[..., :3]
    red = (rgb[..., 0] > 0.8) & (rgb[..., 1] < 0.35) & (rgb[..., 2] < 0.35)
    green = (rgb[..., 1] > 0.7) & (rgb[..., 0] < 0.35) & (rgb[..., 2] < 0.35)
    assert red.sum() > 50 and green.sum() > 20  # contours on the panels (and the legend)


def test_fig2_rejects_mismatched_shapes(tmp_path):
    img, seg = _phantom()
    with pytest.raises(InputError, match="Method A"):
        viz.fig2(img, img, {"Method A": img[:-1]}, seg, tmp_path / "f.png")
    with pytest.raises(InputError, match=".png"):
        viz.fig2(img, img, {}, seg, tmp_path / "f.jpg")


def test_roi_boxplots(tmp_path):
    rng = np.random.default_rng(0)
    data = {"Initial": rng.uniform(40, 70, (5, 16)), "Model": rng.uniform(60, 90, (5, 16))}
    data["Initial"][:, 3] = np.nan  # a ROI absent in every pair: no box, no crash
    out = viz.roi_boxplots(data, tmp_path / "box.png")
    arr = _read_png(out)
    assert arr.shape[1] > arr.shape[0]
    with pytest.raises(InputError, match=r"\(n_pairs, 16\)"):
        viz.roi_boxplots({"bad": np.zeros((5, 15))}, tmp_path / "b.png")
    with pytest.raises(InputError, match="at least one"):
        viz.roi_boxplots({}, tmp_path / "b.png")


def test_qc_overlay_and_jacobian_map(tmp_path):
    img, _ = _phantom()
    warped = np.roll(img, 1, axis=0)
    out = viz.qc_overlay(img, warped, tmp_path / "qc.png", moving=np.roll(img, 3, axis=0),
                         spacing=(1.0, 1.0, 1.5), title="moving.nii.gz -> fixed.nii.gz")
    arr = _read_png(out)
    assert arr.shape[1] > arr.shape[0]  # five columns, three rows
    with pytest.raises(InputError, match="warped"):
        viz.qc_overlay(img, warped[:-1], tmp_path / "qc2.png")
    with pytest.raises(InputError, match="slice_indices"):
        viz.qc_overlay(img, warped, tmp_path / "qc3.png", slice_indices=(0, 0, 99))

    def black_pixels(det, name):
        arr = mpimg.imread(str(viz.jacobian_map(det, tmp_path / name, slice_indices=(11, 11, 11),
                                                title="t")))
        return int((arr[..., :3].max(axis=-1) < 0.05).sum())

    det = np.ones(SHAPE)
    smooth = black_pixels(det, "jac_smooth.png")  # text and letters only
    det[10:12, 10:12, 10:12] = -0.5  # a fold, cut by each of the three views
    assert black_pixels(det, "jac.png") >= smooth + 3 * 4  # folded voxels are drawn black
    with pytest.raises(InputError, match="limit"):
        viz.jacobian_map(det, tmp_path / "jac2.png", limit=1.0)


def test_figures_are_written_through_the_atomic_writer(tmp_path):
    """A figure replaces an earlier one, creates its folder, leaves no temporary file, and a
    failed write is a WriteError naming the file (the one writer of mambamorph.io)."""
    from mambamorph.errors import WriteError

    data = {"A": np.full((3, 16), 70.0)}
    out = tmp_path / "new" / "box.png"
    viz.roi_boxplots(data, out)
    first = out.read_bytes()
    out.write_bytes(b"stale")
    assert viz.roi_boxplots(data, out) == out and out.read_bytes() == first
    assert sorted(p.name for p in out.parent.iterdir()) == ["box.png"]
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(WriteError, match="box.png"):
        viz.roi_boxplots(data, blocker / "box.png")
