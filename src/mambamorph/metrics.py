"""Registration metrics: Dice, HD95 (mm), folding %, SDlogJ, compression share (scoring only; timing and memory
live in :mod:`mambamorph.runtime`).

All label-map metrics take FreeSurfer-id label maps (numpy or torch, any integer dtype) and
evaluate the 16 ROIs of :mod:`mambamorph.labels` in table order. Field metrics take a
displacement ``(3, D0, D1, D2)`` or ``(B, 3, D0, D1, D2)`` in voxels, channel ``i`` along array
axis ``i``. Results are numpy float64 (or Python floats).

Rules stated once:

- HD95 (SPEC.md section 6): surface = mask minus its binary erosion by the 6-neighbourhood,
  with everything outside the array counting as background (a mask touching the array edge has
  a surface there); distances are exact Euclidean distances in millimetres between surface voxel
  centres (``scipy.ndimage.distance_transform_edt`` with ``sampling=spacing``); percentiles are
  ``np.percentile``'s default (linear interpolation). ``variant="pooled"`` (default; medpy's
  ``hd95`` and the reference code) takes the 95th percentile of both directed distance sets
  concatenated; ``variant="max"`` (Learn2Reg, MONAI ``compute_hausdorff_distance``, DeepMind
  surface-distance) takes the larger of the two directed 95th percentiles. Empty ROIs: absent in
  both maps -> NaN (left out of means by ``np.nanmean``); absent in one only -> ``empty``
  (default: the image diagonal in mm, the largest distance two voxels of the array can have, so
  a structure lost by a registration is penalised instead of silently dropped).
- Jacobian: ``det(I + grad u)`` with ``d u_i / d x_j`` by central differences (one-sided on the
  border voxels, ``np.gradient``), in voxel units (spacing cancels for a field in voxels).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from mambamorph.labels import ROI_IDS

__all__ = [
    "dice_per_roi",
    "surface_distances",
    "hd95",
    "hd95_per_roi",
    "jacobian_determinant",
    "folding_percent",
    "sdlogj",
    "sdlogj_of_determinant",
    "compressed_percent",
]


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def dice_per_roi(a, b, roi_ids: tuple[int, ...] = ROI_IDS) -> np.ndarray:
    """Dice overlap of each ROI between two label maps.

    Args:
        a, b: label maps of FreeSurfer ids with the same shape ``(D0, D1, D2)`` (a leading
            ``(1, 1)`` or ``(1,)`` is squeezed away).
        roi_ids: ids to evaluate, in output order (default: the 16 ROIs).
    Returns:
        ``(len(roi_ids),)`` float64 array in [0, 1]; NaN for a ROI absent from both maps.
    Raises:
        ValueError: shapes differ.
    """
    a = _as_numpy(a).squeeze()
    b = _as_numpy(b).squeeze()
    if a.shape != b.shape:
        raise ValueError(f"expected label maps of the same shape, got {a.shape} and {b.shape}")
    out = np.full(len(roi_ids), np.nan)
    for k, rid in enumerate(roi_ids):
        ma = a == rid
        mb = b == rid
        denom = int(ma.sum()) + int(mb.sum())
        if denom:
            out[k] = 2.0 * np.logical_and(ma, mb).sum() / denom
    return out


# ---------------------------------------------------------------------------------- HD95

_VARIANTS = ("pooled", "max")


def _check_spacing(spacing, ndim: int) -> tuple[float, ...]:
    sp = np.atleast_1d(np.asarray(spacing, dtype=np.float64))
    if sp.size == 1:
        sp = np.repeat(sp, ndim)
    if sp.shape != (ndim,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"expected {ndim} positive spacings (mm), got {spacing!r}")
    return tuple(float(v) for v in sp)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Mask minus its erosion by the 6-neighbourhood (outside the array is background)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(mask_a, mask_b, spacing: float | Sequence[float] = 1.0
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances between two non-empty binary masks, in millimetres.

    The arrays are first cropped to the bounding box of ``mask_a | mask_b`` grown by one voxel
    (and clipped to the array), which changes neither the surfaces nor the distances.

    Args:
        mask_a, mask_b: boolean arrays of one shape (any number of dimensions, usually 3), each
            with at least one voxel set.
        spacing: voxel size in mm per axis (or one number for all axes).
    Returns:
        ``(d_ab, d_ba)``: float64 arrays; ``d_ab`` holds, for every surface voxel of ``a``, the
        distance to the nearest surface voxel of ``b``, and ``d_ba`` the reverse.
    Raises:
        ValueError: shapes differ, bad spacing, or a mask is empty.
    """
    a = np.asarray(_as_numpy(mask_a), dtype=bool)
    b = np.asarray(_as_numpy(mask_b), dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"expected masks of the same shape, got {a.shape} and {b.shape}")
    sp = _check_spacing(spacing, a.ndim)
    union = a | b
    if not a.any() or not b.any():
        raise ValueError("surface_distances: expected two non-empty masks")
    box = []
    for axis in range(a.ndim):
        other = tuple(k for k in range(a.ndim) if k != axis)
        idx = np.flatnonzero(union.any(axis=other))
        box.append(slice(max(int(idx[0]) - 1, 0), int(idx[-1]) + 2))
    box = tuple(box)
    sa, sb = _surface(a[box]), _surface(b[box])
    dist_to_b = ndimage.distance_transform_edt(~sb, sampling=sp)
    dist_to_a = ndimage.distance_transform_edt(~sa, sampling=sp)
    return dist_to_b[sa].astype(np.float64), dist_to_a[sb].astype(np.float64)


def _empty_value(empty, shape, sp) -> float:
    if isinstance(empty, str):
        if empty == "diagonal":
            return float(np.sqrt(sum(((n - 1) * s) ** 2 for n, s in zip(shape, sp))))
        if empty == "nan":
            return float("nan")
        raise ValueError(f"expected empty in ('diagonal', 'nan') or a number, got {empty!r}")
    return float(empty)


def hd95(mask_a, mask_b, spacing: float | Sequence[float] = 1.0, variant: str = "pooled",
         empty: str | float = "diagonal") -> float:
    """95th-percentile Hausdorff distance between two binary masks, in millimetres.

    See the module docstring for the surface, percentile and variant rules.

    Args:
        mask_a, mask_b: boolean (or 0/1) arrays of one shape.
        spacing: voxel size in mm per axis (or one number).
        variant: ``"pooled"`` (95th percentile of both directions concatenated; medpy and the
            reference code) or ``"max"`` (max of the two directed 95th percentiles; Learn2Reg,
            MONAI).
        empty: value when exactly one mask is empty: ``"diagonal"`` (the array diagonal in mm,
            ``sqrt(sum(((D_i - 1) * spacing_i)**2))``), ``"nan"``, or a number. Both empty -> NaN.
    Returns:
        The distance in mm (float).
    Raises:
        ValueError: shapes differ, bad spacing, unknown ``variant`` or ``empty``.
    """
    if variant not in _VARIANTS:
        raise ValueError(f"expected variant in {_VARIANTS}, got {variant!r}")
    a = np.asarray(_as_numpy(mask_a), dtype=bool)
    b = np.asarray(_as_numpy(mask_b), dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"expected masks of the same shape, got {a.shape} and {b.shape}")
    sp = _check_spacing(spacing, a.ndim)
    fill = _empty_value(empty, a.shape, sp)
    has_a, has_b = bool(a.any()), bool(b.any())
    if not has_a and not has_b:
        return float("nan")
    if not (has_a and has_b):
        return fill
    d_ab, d_ba = surface_distances(a, b, sp)
    if variant == "pooled":
        return float(np.percentile(np.concatenate([d_ab, d_ba]), 95))
    return float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))


def hd95_per_roi(a, b, spacing: float | Sequence[float] = (1.0, 1.0, 1.0),
                 roi_ids: tuple[int, ...] = ROI_IDS, variant: str = "pooled",
                 empty: str | float = "diagonal") -> np.ndarray:
    """HD95 of each ROI between two label maps, in millimetres.

    Args:
        a, b: label maps of FreeSurfer ids with the same shape ``(D0, D1, D2)`` (leading
            singleton axes are squeezed away), e.g. warped moving and fixed labels.
        spacing: voxel size in mm along ``(D0, D1, D2)`` (or one number).
        roi_ids: ids to evaluate, in output order (default: the 16 ROIs).
        variant: ``"pooled"`` (default) or ``"max"``; see :func:`hd95`.
        empty: value for a ROI present in only one map (see :func:`hd95`); a ROI absent from
            both maps gives NaN.
    Returns:
        ``(len(roi_ids),)`` float64 array in mm.
    Raises:
        ValueError: shapes differ, bad spacing, unknown ``variant`` or ``empty``.
    """
    a = _as_numpy(a).squeeze()
    b = _as_numpy(b).squeeze()
    if a.shape != b.shape:
        raise ValueError(f"expected label maps of the same shape, got {a.shape} and {b.shape}")
    if variant not in _VARIANTS:
        raise ValueError(f"expected variant in {_VARIANTS}, got {variant!r}")
    sp = _check_spacing(spacing, a.ndim)
    _empty_value(empty, a.shape, sp)  # validate once, before the loop
    return np.array([hd95(a == rid, b == rid, sp, variant=variant, empty=empty)
                     for rid in roi_ids], dtype=np.float64)


# ---------------------------------------------------------------------------------- Jacobian

def _derivative(arr: np.ndarray, axis: int) -> np.ndarray:
    """Central differences (one-sided at the ends) along ``axis``; 0 on an axis of size 1."""
    if arr.shape[axis] < 2:
        return np.zeros_like(arr)
    return np.gradient(arr, axis=axis)


def _det_one(flow: np.ndarray, slab: int) -> np.ndarray:
    """det(I + grad u) of one (3, D0, D1, D2) field, slab by slab along axis 0 (memory)."""
    n0 = flow.shape[1]
    out = np.empty(flow.shape[1:], dtype=np.float64)
    for start in range(0, n0, slab):
        stop = min(start + slab, n0)
        lo, hi = max(start - 1, 0), min(stop + 1, n0)  # one halo slice each side
        part = flow[:, lo:hi].astype(np.float64)  # (3, d, D1, D2)
        keep = slice(start - lo, start - lo + (stop - start))
        # jac[i][j] = delta_ij + d u_i / d x_j, component i matched to array axis i
        jac = [[_derivative(part[i], j)[keep] + (1.0 if i == j else 0.0) for j in range(3)]
               for i in range(3)]
        out[start:stop] = (
            jac[0][0] * (jac[1][1] * jac[2][2] - jac[1][2] * jac[2][1])
            - jac[0][1] * (jac[1][0] * jac[2][2] - jac[1][2] * jac[2][0])
            + jac[0][2] * (jac[1][0] * jac[2][1] - jac[1][1] * jac[2][0]))
    return out


def _check_flow(flow) -> tuple[np.ndarray, bool]:
    f = _as_numpy(flow)
    batched = f.ndim == 5
    if f.ndim not in (4, 5) or f.shape[-4] != 3:
        raise ValueError(f"expected a displacement (3, D0, D1, D2) or (B, 3, D0, D1, D2), got "
                         f"{f.shape}")
    if not np.issubdtype(f.dtype, np.floating):
        raise ValueError(f"expected a floating displacement, got {f.dtype}")
    return (f if batched else f[None]), batched


def jacobian_determinant(flow, slab: int = 16) -> np.ndarray:
    """Jacobian determinant of ``x -> x + u(x)`` at every voxel.

    ``det(I + grad u)`` with ``(grad u)[i, j] = d u_i / d x_j``: component ``i`` of the field is
    the displacement along array axis ``i`` and is differentiated along every axis ``j`` by
    central differences, one-sided on the border voxels (``np.gradient``). (The reference code
    passes the components to SimpleITK in reversed order, which can report a fold as det +1.)
    Computed in float64, ``slab`` slices of axis 0 at a time to bound memory; the result does
    not depend on ``slab``.

    Args:
        flow: displacement ``(3, D0, D1, D2)`` or ``(B, 3, D0, D1, D2)`` in voxels (numpy or
            torch).
        slab: slices of axis 0 processed at once (>= 1).
    Returns:
        float64 array ``(D0, D1, D2)`` or ``(B, D0, D1, D2)``.
    Raises:
        ValueError: the field is not ``(.., 3, D0, D1, D2)`` floating point, or ``slab < 1``.
    """
    f, batched = _check_flow(flow)
    if int(slab) < 1:
        raise ValueError(f"expected slab >= 1, got {slab}")
    det = np.stack([_det_one(f[b], int(slab)) for b in range(f.shape[0])])
    return det if batched else det[0]


def folding_percent(flow) -> float | np.ndarray:
    """Percentage of voxels whose Jacobian determinant is <= 0 (all voxels, borders included).

    Args:
        flow: displacement ``(3, D0, D1, D2)`` or ``(B, 3, D0, D1, D2)`` in voxels.
    Returns:
        A float in [0, 100] for an unbatched field, a ``(B,)`` float64 array for a batch.
    Raises:
        ValueError: see :func:`jacobian_determinant`.
    """
    det = jacobian_determinant(flow)
    if det.ndim == 3:
        return float(100.0 * np.mean(det <= 0))
    return 100.0 * np.mean(det.reshape(det.shape[0], -1) <= 0, axis=1)


def sdlogj(flow, crop: int = 0) -> float | np.ndarray:
    """Standard deviation of the log Jacobian determinant (Learn2Reg's SDlogJ).

    ``std(log(clip(det, 1e-9, 1e9)))`` (population std, ``ddof=0``): folded voxels count as
    ``log(1e-9)``. By default every voxel counts, borders included (the border derivatives are
    one-sided); ``crop=2`` leaves out two voxels on each face as Learn2Reg's script does.

    Args:
        flow: displacement ``(3, D0, D1, D2)`` or ``(B, 3, D0, D1, D2)`` in voxels.
        crop: voxels left out on every face of the volume (>= 0).
    Returns:
        A float for an unbatched field, a ``(B,)`` float64 array for a batch.
    Raises:
        ValueError: see :func:`jacobian_determinant`; ``crop`` negative or leaving no voxel.
    """
    return sdlogj_of_determinant(jacobian_determinant(flow), crop)


def sdlogj_of_determinant(det, crop: int = 0) -> float | np.ndarray:
    """:func:`sdlogj` from a Jacobian determinant already computed
    (:func:`jacobian_determinant`), so a caller that has it does not compute it twice.

    Args:
        det: ``(D0, D1, D2)`` or ``(B, D0, D1, D2)`` determinant (numpy).
        crop: voxels left out on every face of the volume (>= 0).
    Returns:
        A float for an unbatched determinant, a ``(B,)`` float64 array for a batch.
    Raises:
        ValueError: ``crop`` negative or leaving no voxel.
    """
    det = np.asarray(det)
    crop = int(crop)
    if crop < 0 or any(n <= 2 * crop for n in det.shape[-3:]):
        raise ValueError(f"expected 0 <= crop < half of every size {det.shape[-3:]}, got {crop}")
    if crop:
        det = det[..., crop:-crop, crop:-crop, crop:-crop]
    logj = np.log(np.clip(det, 1e-9, 1e9))
    if logj.ndim == 3:
        return float(logj.std())
    return logj.reshape(logj.shape[0], -1).std(axis=1)


def compressed_percent(flow, mask, threshold: float = 0.2) -> float | np.ndarray:
    """Percentage of the voxels of ``mask`` whose Jacobian determinant is below ``threshold``.

    With the fixed image's brain as ``mask``, this is the share of the brain squeezed to less
    than ``threshold`` of its volume (folded voxels, ``det <= 0``, count too). The determinant is
    :func:`jacobian_determinant`'s (central differences, one-sided on the border).

    Args:
        flow: displacement ``(3, D0, D1, D2)`` or ``(B, 3, D0, D1, D2)`` in voxels.
        mask: boolean (or 0/1) ``(D0, D1, D2)`` array, or ``(B, D0, D1, D2)`` /
            ``(B, 1, D0, D1, D2)`` for a batch (one mask per field, or one shared mask).
        threshold: determinant bound (the share counted is ``det < threshold``).
    Returns:
        A float in [0, 100] for an unbatched field, a ``(B,)`` float64 array for a batch; NaN
        where the mask is empty.
    Raises:
        ValueError: see :func:`jacobian_determinant`; a mask that does not fit the field's grid.
    """
    det = jacobian_determinant(flow)
    m = np.asarray(_as_numpy(mask)).astype(bool)
    grid = det.shape[-3:]
    if m.ndim == 5 and m.shape[1] == 1:
        m = m[:, 0]
    if m.shape[-3:] != grid or m.ndim not in (3, det.ndim):
        raise ValueError(f"expected a mask on the field's grid {grid}, got {m.shape}")
    m = np.broadcast_to(m, det.shape)
    below = (det < float(threshold)) & m
    axes = tuple(range(det.ndim - 3, det.ndim))
    n = m.sum(axis=axes)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(n > 0, 100.0 * below.sum(axis=axes) / np.maximum(n, 1), np.nan)
    return float(share) if det.ndim == 3 else share.astype(np.float64)
