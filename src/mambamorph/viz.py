"""Figures a person looks at: the paper's Fig. 2, per-ROI Dice box plots, registration QC.

Every function writes one PNG (atomically: temporary file + rename) and returns its path. The
figures are drawn on a bare :class:`matplotlib.figure.Figure` with the Agg canvas, so nothing here
touches pyplot's global state or the user's matplotlib backend.

Screen orientation. Volumes are ``(D0, D1, D2)`` arrays in the canonical RAS+ orientation that
:mod:`mambamorph.io` gives every input (axis 0 towards the subject's Right, axis 1 Anterior,
axis 2 Superior). A slice is drawn with the lower of its two remaining array axes horizontal and
the higher one vertical, origin at the bottom left (``imshow(slice.T, origin="lower")``), so:

- axial (``axis=2``): subject's left on the left of the screen, anterior up (neurological
  convention, as nilearn and FSLeyes' default show it);
- coronal (``axis=1``): left on the left, superior up;
- sagittal (``axis=0``): posterior on the left, anterior on the right, superior up.

Orientation letters are drawn at the edges of the first panel of each row. Pixel aspect ratios
follow the voxel ``spacing`` (mm).

Label maps passed to these functions hold FreeSurfer ids (the 16-ROI table of
:mod:`mambamorph.labels`), the same convention as :mod:`mambamorph.metrics`.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from mambamorph.labels import ROI_IDS, ROI_NAMES
from mambamorph.errors import InputError
from mambamorph.io import atomic_write_bytes

__all__ = [
    "LATERAL_VENTRICLE",
    "FOURTH_VENTRICLE",
    "AXIS_NAMES",
    "display_slice",
    "ventricle_slice",
    "checkerboard",
    "fig2",
    "roi_boxplots",
    "qc_overlay",
    "jacobian_map",
]

#: FreeSurfer ids of the two structures whose fixed-image contours Fig. 2 draws.
LATERAL_VENTRICLE = 4
FOURTH_VENTRICLE = 15
assert LATERAL_VENTRICLE in ROI_IDS and FOURTH_VENTRICLE in ROI_IDS

#: view name of a slice taken perpendicular to array axis ``i`` (RAS+ arrays).
AXIS_NAMES = ("sagittal", "coronal", "axial")
# (left, right, bottom, top) orientation letters of each view; see the module docstring.
_ORIENT_LETTERS = {0: ("P", "A", "I", "S"), 1: ("L", "R", "I", "S"), 2: ("L", "R", "P", "A")}

_CONTOUR_COLOURS = {LATERAL_VENTRICLE: "#ff2020", FOURTH_VENTRICLE: "#20e020"}
_DPI = 110


# ----------------------------------------------------------------------------------- helpers
def _volume(x, name: str) -> np.ndarray:
    """A 3D numpy array from a numpy array or tensor with optional leading singleton dims."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    while a.ndim > 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3:
        raise InputError(f"{name}: expected a 3D volume (D0, D1, D2) (leading 1s allowed), "
                         f"got shape {np.shape(x)}")
    return a


def _check_axis(axis: int) -> int:
    if axis not in (0, 1, 2):
        raise InputError(f"axis: expected 0, 1 or 2, got {axis!r}")
    return int(axis)


def _spacing3(spacing) -> tuple[float, float, float]:
    if spacing is None:
        return (1.0, 1.0, 1.0)
    s = tuple(float(v) for v in spacing)
    if len(s) != 3 or not all(np.isfinite(v) and v > 0 for v in s):
        raise InputError(f"spacing: expected 3 positive voxel sizes in mm, got {spacing!r}")
    return s


def display_slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The 2D array to draw with ``imshow(..., origin="lower")`` for one slice.

    Args:
        volume: ``(D0, D1, D2)`` array (RAS+).
        axis: array axis the slice is perpendicular to (0 sagittal, 1 coronal, 2 axial).
        index: slice index along ``axis``.
    Returns:
        The slice transposed so that rows run along the higher remaining axis (drawn vertically)
        and columns along the lower one (drawn horizontally).
    Raises:
        InputError: bad axis or an index outside the volume.
    """
    axis = _check_axis(axis)
    n = volume.shape[axis]
    if not 0 <= index < n:
        raise InputError(f"slice_index: expected 0..{n - 1} along axis {axis}, got {index}")
    return np.take(volume, index, axis=axis).T


def _aspect(spacing: tuple[float, float, float], axis: int) -> float:
    """imshow aspect (height / width of one pixel) of a slice perpendicular to ``axis``."""
    h_axis, v_axis = [a for a in range(3) if a != axis]
    return spacing[v_axis] / spacing[h_axis]


def _window(volume: np.ndarray, lo: float = 0.5, hi: float = 99.5) -> tuple[float, float]:
    """Display window from percentiles of the non-zero voxels (background is often 0)."""
    v = volume[np.isfinite(volume)]
    nz = v[v != 0]
    if nz.size:
        v = nz
    if v.size == 0:
        return 0.0, 1.0
    a, b = np.percentile(v, [lo, hi])
    if not b > a:
        a, b = float(v.min()), float(v.max())
        if not b > a:
            b = a + 1.0
    return float(a), float(b)


def _unit(volume: np.ndarray) -> np.ndarray:
    """``volume`` mapped to [0, 1] through its display window (clipped)."""
    lo, hi = _window(volume)
    return np.clip((volume - lo) / (hi - lo), 0.0, 1.0)


def _foreground_centre(volume: np.ndarray) -> tuple[int, int, int]:
    """Centre of the bounding box of the non-zero voxels (the volume centre if all zero)."""
    nz = np.nonzero(np.abs(volume) > 0)
    if not nz[0].size:
        return tuple(s // 2 for s in volume.shape)
    return tuple(int((idx.min() + idx.max()) // 2) for idx in nz)


def ventricle_slice(fixed_seg: np.ndarray, axis: int) -> int:
    """The slice Fig. 2 shows: the most lateral-ventricle voxels among the slices that also
    cut the fourth ventricle.

    Args:
        fixed_seg: ``(D0, D1, D2)`` FreeSurfer-id label map of the fixed image.
        axis: array axis the slice is perpendicular to.
    Returns:
        The slice index. Falls back to the slice with the most lateral-ventricle voxels when no
        slice holds both ventricles, then to the most labelled voxels, then to the middle slice.
    """
    axis = _check_axis(axis)
    other = tuple(a for a in range(3) if a != axis)
    lat = (fixed_seg == LATERAL_VENTRICLE).sum(axis=other)
    fourth = (fixed_seg == FOURTH_VENTRICLE).sum(axis=other)
    both = np.where(fourth > 0, lat, 0)
    for score in (both, lat, (fixed_seg > 0).sum(axis=other)):
        if score.max() > 0:
            return int(np.argmax(score))
    return fixed_seg.shape[axis] // 2


def checkerboard(a, b, tiles: int = 8, normalise: bool = True) -> np.ndarray:
    """Checkerboard of two images of the same shape (2D or 3D): tiles alternate ``a`` and ``b``.

    Args:
        a, b: arrays or tensors of the same shape, e.g. the fixed image and the warped moving one.
        tiles: number of tiles along every axis (>= 2).
        normalise: map each image to [0, 1] through its own display window first, so that two
            modalities (MR, CT) appear with comparable brightness.
    Returns:
        float array of the input shape; tile ``(i, j, ...)`` comes from ``a`` when the sum of its
        tile indices is even, from ``b`` otherwise.
    Raises:
        InputError: shapes differ, or ``tiles < 2``.
    """
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    if isinstance(b, torch.Tensor):
        b = b.detach().cpu().numpy()
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise InputError(f"checkerboard: expected images of the same shape, got {a.shape} and "
                         f"{b.shape}")
    if int(tiles) < 2:
        raise InputError(f"checkerboard: expected tiles >= 2, got {tiles}")
    if normalise:
        a, b = _unit(a), _unit(b)
    parity = np.zeros(a.shape, dtype=np.int64)
    for ax, n in enumerate(a.shape):
        tile_idx = (np.arange(n) * int(tiles)) // max(n, 1)
        shape = [1] * a.ndim
        shape[ax] = n
        parity = parity + tile_idx.reshape(shape)
    return np.where(parity % 2 == 0, a, b)


def _edges(img2d: np.ndarray, percentile: float = 90.0) -> np.ndarray:
    """Binary edge map: Sobel gradient magnitude above a percentile of the non-zero magnitudes."""
    from scipy import ndimage

    img = img2d.astype(np.float64)
    mag = np.hypot(ndimage.sobel(img, axis=0), ndimage.sobel(img, axis=1))
    nz = mag[mag > 0]
    if not nz.size:
        return np.zeros_like(img, dtype=bool)
    return mag >= np.percentile(nz, percentile)


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out_png) -> Path:
    """Write ``fig`` to ``out_png`` atomically (:func:`mambamorph.io.atomic_write_bytes`,
    replacing an existing file) and return the path."""
    from mambamorph.io import atomic_write_bytes

    out = Path(out_png)
    if out.suffix.lower() != ".png":
        raise InputError(f"{out}: expected a .png file name")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, facecolor=fig.get_facecolor())
    return atomic_write_bytes(out, buf.getvalue(), overwrite=True)


def _orientation_letters(ax, axis: int, colour: str = "#ffd700") -> None:
    left, right, bottom, top = _ORIENT_LETTERS[axis]
    kw = dict(transform=ax.transAxes, color=colour, fontsize=8, fontweight="bold")
    ax.text(0.02, 0.5, left, ha="left", va="center", **kw)
    ax.text(0.98, 0.5, right, ha="right", va="center", **kw)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **kw)
    ax.text(0.5, 0.98, top, ha="center", va="top", **kw)


def _bare(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


# ------------------------------------------------------------------------------------ Fig. 2
def fig2(fixed, moving, warped_by_method: Mapping[str, object], fixed_seg, out_png,
         axis: int = 0, slice_index: int | None = None,
         dice_by_method: Mapping[str, float] | None = None, moving_dice: float | None = None,
         spacing: Sequence[float] | None = None, fixed_name: str = "Fixed",
         moving_name: str = "Moving", title: str | None = None) -> Path:
    """The paper's Fig. 2: fixed | moving | each method's warped moving image, one slice.

    The fixed image's lateral ventricle (red) and fourth ventricle (green) contours are drawn on
    every panel, so a reader sees how well each method moved the moving image's ventricles onto
    them. The moving image and every warped image share the moving image's display window.

    Args:
        fixed: ``(D0, D1, D2)`` fixed image (array or tensor; leading 1s allowed).
        moving: ``(D0, D1, D2)`` moving image, same shape.
        warped_by_method: ``{method name: (D0, D1, D2) warped moving image}``, drawn in order.
        fixed_seg: ``(D0, D1, D2)`` FreeSurfer-id label map of the fixed image.
        out_png: output file (``.png``).
        axis: view (0 sagittal, default: it cuts both ventricles near the midline; 1 coronal;
            2 axial).
        slice_index: slice along ``axis``; ``None`` picks :func:`ventricle_slice`.
        dice_by_method: mean 16-ROI Dice (%) of this pair per method, shown in the titles.
        moving_dice: Dice (%) of the unregistered pair, shown under "Moving".
        spacing: voxel size in mm (sets the pixel aspect ratio); default isotropic.
        fixed_name, moving_name: panel titles (e.g. ``"Fixed (CT)"``).
        title: optional figure title (e.g. the subject ids of the pair).
    Returns:
        The path of the written PNG.
    Raises:
        InputError: shapes differ, non-3D inputs, bad axis/slice, or a non-``.png`` name.
    """
    axis = _check_axis(axis)
    sp = _spacing3(spacing)
    fix = _volume(fixed, "fixed")
    mov = _volume(moving, "moving")
    seg = _volume(fixed_seg, "fixed_seg")
    warped = {str(k): _volume(v, f"warped image of {k}") for k, v in warped_by_method.items()}
    for name, arr in [("moving", mov), ("fixed_seg", seg), *warped.items()]:
        if arr.shape != fix.shape:
            raise InputError(f"{name}: expected the fixed image's shape {fix.shape}, "
                             f"got {arr.shape}")
    idx = ventricle_slice(seg, axis) if slice_index is None else int(slice_index)
    dice = dict(dice_by_method or {})

    panels = [(fixed_name, fix, _window(fix)), (moving_name, mov, _window(mov))]
    mwin = panels[1][2]
    panels += [(name, arr, mwin) for name, arr in warped.items()]
    subtitles = ["", "" if moving_dice is None else f"Dice {moving_dice:.1f}"]
    subtitles += ["" if dice.get(n) is None or not np.isfinite(dice[n]) else f"Dice {dice[n]:.1f}"
                  for n in warped]

    masks = {lab: display_slice(seg == lab, axis, idx) for lab in _CONTOUR_COLOURS}
    h_axis, v_axis = [a for a in range(3) if a != axis]
    ph = 2.6  # panel height in inches; 0.7 in above for the caption and titles, 0.3 below
    pw = ph * (fix.shape[h_axis] * sp[h_axis]) / (fix.shape[v_axis] * sp[v_axis])
    ncol = len(panels)
    fh = ph + 1.0
    fig = _new_figure(max(pw * ncol + 0.1 * (ncol + 1), 4.0), fh)
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.7 / fh, bottom=0.3 / fh, wspace=0.04)
    axes = fig.subplots(1, ncol, squeeze=False)[0]
    for k, (ax, (name, vol, (lo, hi))) in enumerate(zip(axes, panels)):
        ax.imshow(display_slice(vol, axis, idx), cmap="gray", vmin=lo, vmax=hi, origin="lower",
                  aspect=_aspect(sp, axis), interpolation="nearest")
        for lab, colour in _CONTOUR_COLOURS.items():
            if masks[lab].any():
                ax.contour(masks[lab].astype(np.float32), levels=[0.5], colors=[colour],
                           linewidths=1.3, origin="lower")
        ax.set_title(name + (f"\n{subtitles[k]}" if subtitles[k] else "\n"), fontsize=9)
        _bare(ax)
        if k == 0:
            _orientation_letters(ax, axis)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=_CONTOUR_COLOURS[LATERAL_VENTRICLE], lw=1.5,
                      label="lateral ventricle (fixed)"),
               Line2D([], [], color=_CONTOUR_COLOURS[FOURTH_VENTRICLE], lw=1.5,
                      label="fourth ventricle (fixed)")]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    caption = f"{AXIS_NAMES[axis]} slice {idx} of {fix.shape[axis]}"
    if title:
        caption = f"{title}  ({caption})"
    fig.text(0.5, 1 - 0.06 / fh, caption, ha="center", va="top", fontsize=9)
    return _save(fig, out_png)


# ---------------------------------------------------------------------------- box plots
def roi_boxplots(per_roi_dice: Mapping[str, object], out_png,
                 roi_names: Sequence[str] = ROI_NAMES, title: str | None = None) -> Path:
    """Per-ROI Dice box plots, one box per method within each ROI group.

    Args:
        per_roi_dice: ``{method name: (n_pairs, n_rois) array of Dice in %}`` (NaN = ROI absent
            in the pair; left out of that box).
        out_png: output file (``.png``).
        roi_names: ROI names in column order (default: the 16 ROIs of the label table).
        title: optional figure title.
    Returns:
        The path of the written PNG.
    Raises:
        InputError: no methods, or an array that is not ``(n_pairs, len(roi_names))``.
    """
    if not per_roi_dice:
        raise InputError("roi_boxplots: expected at least one method")
    names = list(roi_names)
    data = {}
    for m, arr in per_roi_dice.items():
        a = np.asarray(arr.detach().cpu() if isinstance(arr, torch.Tensor) else arr, dtype=float)
        if a.ndim != 2 or a.shape[1] != len(names):
            raise InputError(f"roi_boxplots: {m}: expected (n_pairs, {len(names)}) Dice values, "
                             f"got shape {a.shape}")
        data[str(m)] = a
    methods = list(data)
    nm = len(methods)
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    width = 0.8 / nm
    fw, fh = min(18.0, max(8.0, 1.2 + len(names) * (0.3 + 0.12 * nm))), 5.0
    fig = _new_figure(fw, fh)
    ax = fig.add_subplot(1, 1, 1)
    # inches: 0.6 above for the title and the legend row, 1.3 below for the rotated ROI names
    fig.subplots_adjust(left=0.8 / fw, right=1 - 0.15 / fw, top=1 - 0.6 / fh, bottom=1.3 / fh)
    for j, m in enumerate(methods):
        cols = [c[np.isfinite(c)] for c in data[m].T]
        pos = np.arange(len(names)) + (j - (nm - 1) / 2) * width
        keep = [i for i, c in enumerate(cols) if c.size]
        if not keep:
            continue
        bp = ax.boxplot([cols[i] for i in keep], positions=pos[keep], widths=width * 0.85,
                        patch_artist=True, showfliers=True, manage_ticks=False,
                        flierprops=dict(marker=".", markersize=3, alpha=0.6),
                        medianprops=dict(color="black", linewidth=1))
        for patch in bp["boxes"]:
            patch.set_facecolor(cmap(j % 10))
            patch.set_alpha(0.85)
        ax.plot([], [], color=cmap(j % 10), lw=6, label=m)
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels(names, rotation=40, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylabel("Dice (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    for i in range(1, len(names)):
        ax.axvline(i - 0.5, color="0.85", lw=0.6, zorder=0)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize=8, ncol=min(nm, 6),
              frameon=False)
    n_pairs = max(a.shape[0] for a in data.values())
    fig.suptitle(title or f"Dice per ROI ({n_pairs} test pair{'s' if n_pairs != 1 else ''})",
                 fontsize=10, y=1 - 0.04 / fh)
    return _save(fig, out_png)


# ---------------------------------------------------------------------------- QC figures
def _slices_at(volume: np.ndarray, centre: Sequence[int] | None) -> tuple[int, int, int]:
    if centre is None:
        return _foreground_centre(volume)
    c = tuple(int(v) for v in centre)
    if len(c) != 3 or any(not 0 <= v < n for v, n in zip(c, volume.shape)):
        raise InputError(f"slice_indices: expected 3 indices inside {volume.shape}, got {centre!r}")
    return c


def qc_overlay(fixed, warped, out_png, moving=None, spacing: Sequence[float] | None = None,
               slice_indices: Sequence[int] | None = None, tiles: int = 8,
               title: str | None = None) -> Path:
    """Registration quality-control figure in three orthogonal views.

    Rows: sagittal, coronal, axial slices through ``slice_indices`` (default: the centre of the
    fixed image's non-zero bounding box). Columns: [moving (before), if given] | fixed | warped
    moving | checkerboard of fixed and warped moving | warped moving with the fixed image's edges
    (Sobel magnitude above its 90th percentile) in yellow. Where the registration is good, edges
    line up with the warped image's boundaries and the checkerboard tiles continue each other.

    Drawn as pixels with Pillow (matplotlib's import and 15 axes took 0.74 s of CPU): slices
    scaled by nearest neighbour to rows of 253 pixels with the aspect ratio of ``spacing``.

    Args:
        fixed: ``(D0, D1, D2)`` fixed image (array or tensor; leading 1s allowed).
        warped: ``(D0, D1, D2)`` moving image after registration (same shape).
        out_png: output file (``.png``).
        moving: optional ``(D0, D1, D2)`` moving image before registration.
        spacing: voxel size in mm (pixel aspect ratio); default isotropic.
        slice_indices: ``(i0, i1, i2)`` slice of each view.
        tiles: checkerboard tiles per axis.
        title: optional figure title.
    Returns:
        The path of the written PNG.
    Raises:
        InputError: shapes differ, non-3D inputs, slices outside the volume, non-``.png`` name.
    """
    from PIL import Image, ImageDraw
    out = Path(out_png)
    if out.suffix.lower() != ".png":
        raise InputError(f"{out}: expected a .png file name")
    sp = _spacing3(spacing)
    fix = _volume(fixed, "fixed")
    wrp = _volume(warped, "warped")
    mov = None if moving is None else _volume(moving, "moving")
    for name, arr in (("warped", wrp), ("moving", mov)):
        if arr is not None and arr.shape != fix.shape:
            raise InputError(f"{name}: expected the fixed image's shape {fix.shape}, "
                             f"got {arr.shape}")
    centre = _slices_at(fix, slice_indices)
    if int(tiles) < 2:
        raise InputError(f"checkerboard: expected tiles >= 2, got {tiles}")
    fwin, wwin = _window(fix), _window(wrp)
    cols = (["moving (before)"] if mov is not None else []) + [
        "fixed", "warped moving", "checkerboard", "fixed edges on warped"]
    panels = ([(mov, _window(mov))] if mov is not None else []) + [
        (fix, fwin), (wrp, wwin), (None, (0.0, 1.0)), (wrp, wwin)]
    # pixel layout: panel widths follow the physical extent of each view's horizontal axis
    ext = [s * n for s, n in zip(sp, fix.shape)]
    row_h, gap, left = 253, 3, 38  # 2.3 inches at _DPI
    widths = [max(1, round(row_h * ext[min(a for a in range(3) if a != v)] /
                           ext[max(a for a in range(3) if a != v)])) for v in range(3)]
    cell_w, top = max(widths), (30 if title else 0) + 22  # top: title and column names
    width, height = left + len(cols) * (cell_w + gap) + 4, top + 3 * (row_h + gap) + 4
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font, small = _qc_font(13), _qc_font(11)
    if title:
        draw.text((width / 2, 6), title, fill="black", font=_qc_font(14), anchor="ma")
    for c, name in enumerate(cols):
        draw.text((left + c * (cell_w + gap) + cell_w / 2, top - 4), name, fill="black",
                  font=font, anchor="md")
    for r, view in enumerate((0, 1, 2)):
        idx, w = centre[view], widths[view]
        y0 = top + r * (row_h + gap)
        for c, (vol, (lo, hi)) in enumerate(panels):
            grey = (np.clip((display_slice(vol, view, idx) - lo) / (hi - lo), 0.0, 1.0)
                    if vol is not None else _checker_slice(fix, wrp, view, idx, tiles, fwin, wwin))
            rgb = np.repeat(grey[..., None], 3, axis=-1)
            if c == len(panels) - 1:
                edges = _edges(display_slice(fix, view, idx))
                rgb[edges] = 0.1 * rgb[edges] + 0.9 * np.array([1.0, 0.85, 0.0])
            img = Image.fromarray(np.round(rgb[::-1] * 255).astype(np.uint8))  # origin: bottom
            x0 = left + c * (cell_w + gap) + (cell_w - w) // 2
            canvas.paste(img.resize((w, row_h), Image.NEAREST), (x0, y0))
            if c == 0:
                xy = [(x0 + 3, y0 + row_h / 2), (x0 + w - 3, y0 + row_h / 2),
                      (x0 + w / 2, y0 + row_h - 3), (x0 + w / 2, y0 + 3)]
                for p, letter, anchor in zip(xy, _ORIENT_LETTERS[view], ("lm", "rm", "md", "ma")):
                    draw.text(p, letter, anchor=anchor, fill="#ffd700", font=small)
        label = Image.new("RGB", (row_h, left - 6), "white")
        ImageDraw.Draw(label).text((row_h / 2, (left - 6) / 2), f"{AXIS_NAMES[view]} {idx}",
                                   fill="black", font=font, anchor="mm")
        canvas.paste(label.rotate(90, expand=True), (2, y0))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", dpi=(_DPI, _DPI), compress_level=1)
    return atomic_write_bytes(out, buf.getvalue(), overwrite=True)  # replaces, as _save does


def _checker_slice(a: np.ndarray, b: np.ndarray, axis: int, index: int, tiles: int,
                   win_a: tuple[float, float], win_b: tuple[float, float]) -> np.ndarray:
    """``display_slice(checkerboard(a, b, tiles), axis, index)`` from ``a`` and ``b``'s
    display windows (:func:`_window` of the whole volumes), without the whole volume."""
    def unit(v, win):
        return np.clip((display_slice(v, axis, index).astype(np.float64) - win[0]) /
                       (win[1] - win[0]), 0.0, 1.0)

    h, v = [a for a in range(3) if a != axis]  # drawn horizontally (columns), vertically
    tile = [(np.arange(n) * int(tiles)) // max(n, 1) for n in a.shape]
    parity = tile[axis][index] + tile[h][None, :] + tile[v][:, None]
    return np.where(parity % 2 == 0, unit(a, win_a), unit(b, win_b))


def _qc_font(size: int):
    """Pillow's built-in scalable font at ``size`` pixels (its bitmap font without FreeType)."""
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or built without FreeType
        return ImageFont.load_default()


def jacobian_map(jac_det, out_png, spacing: Sequence[float] | None = None,
                 slice_indices: Sequence[int] | None = None, title: str | None = None,
                 limit: float = 2.0) -> Path:
    """Jacobian determinant of a transform in three orthogonal slices, folds marked.

    Colours: a diverging map centred on 1 (no volume change): blue < 1 (contraction), red > 1
    (expansion), clipped to ``[0, limit]``; voxels with a determinant <= 0 (folds) are drawn
    black. A colour bar shows the scale and the title the folding percentage of the volume.

    Args:
        jac_det: ``(D0, D1, D2)`` determinant (e.g. from
            :func:`mambamorph.metrics.jacobian_determinant`), array or tensor.
        out_png: output file (``.png``).
        spacing: voxel size in mm (pixel aspect ratio); default isotropic.
        slice_indices: ``(i0, i1, i2)``; default the middle of each axis.
        title: optional figure title (the folding percentage is appended).
        limit: upper end of the colour scale (> 1).
    Returns:
        The path of the written PNG.
    Raises:
        InputError: non-3D input, bad slices, ``limit <= 1``, non-``.png`` name.
    """
    from matplotlib.colors import TwoSlopeNorm

    det = _volume(jac_det, "jac_det").astype(np.float64)
    if not limit > 1:
        raise InputError(f"limit: expected a value > 1, got {limit}")
    sp = _spacing3(spacing)
    centre = (tuple(n // 2 for n in det.shape) if slice_indices is None
              else _slices_at(det, slice_indices))
    fold_pct = 100.0 * float(np.mean(det <= 0))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=float(limit))
    ext = [s * n for s, n in zip(sp, det.shape)]
    row_h = 2.6
    widths = [row_h * ext[[a for a in range(3) if a != v][0]] / ext[[a for a in range(3)
                                                                     if a != v][1]]
              for v in range(3)]
    fig = _new_figure(sum(widths) + 1.2, row_h + 0.8)
    fig.subplots_adjust(left=0.02, right=0.88, bottom=0.04, top=0.82, wspace=0.05)
    axes = fig.subplots(1, 3, squeeze=False, gridspec_kw={"width_ratios": widths})[0]
    im = None
    for ax, v in zip(axes, range(3)):
        sl = display_slice(det, v, centre[v])
        im = ax.imshow(np.clip(sl, 0.0, limit), cmap="RdBu_r", norm=norm, origin="lower",
                       aspect=_aspect(sp, v), interpolation="nearest")
        folds = sl <= 0
        if folds.any():
            rgba = np.zeros((*folds.shape, 4))
            rgba[folds] = (0, 0, 0, 1)
            ax.imshow(rgba, origin="lower", aspect=_aspect(sp, v), interpolation="nearest")
        ax.set_title(f"{AXIS_NAMES[v]} {centre[v]}", fontsize=9)
        _bare(ax)
        _orientation_letters(ax, v, colour="black")
    cax = fig.add_axes([0.9, 0.1, 0.02, 0.68])
    cb = fig.colorbar(im, cax=cax)
    cb.set_label("det J  (black: <= 0, folded)", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    head = f"{title}: " if title else ""
    fig.suptitle(f"{head}Jacobian determinant; folding {fold_pct:.3f} % of voxels", fontsize=10)
    return _save(fig, out_png)
