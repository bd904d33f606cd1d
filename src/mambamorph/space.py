"""The model grid and moving fields and images between grids in world space.

A network runs on a fixed kind of grid (its training spacing and shape); :func:`model_space`
builds that grid around a fixed image, keeping the fixed image's canonical axis directions.
:func:`displacement_to_fixed` takes a displacement from the model grid (voxels) to the fixed
image's grid (RAS mm) and :func:`warp_to_fixed` samples any volume (image or label map, any grid)
at ``p + d(p)`` for every fixed voxel ``p``. All points are RAS+ world coordinates in mm
(:mod:`mambamorph.io`); fields on a grid are ``(D0, D1, D2, 3)`` mm or ``(3, G0, G1, G2)`` voxels,
as each function says.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mambamorph.data.preprocess import foreground_box, foreground_centre
from mambamorph.errors import InputError
from mambamorph.io import Volume
from mambamorph.resample_cpu import sample_affine

__all__ = ["DEFAULT_SPACING", "DEFAULT_GRID", "ModelSpace", "model_space", "model_space_from_meta",
           "displacement_to_fixed", "warp_to_fixed", "warn_outside"]

log = logging.getLogger(__name__)

#: voxel size (mm) and grid assumed when a checkpoint's meta does not say (phantom CPU preset).
DEFAULT_SPACING: tuple[float, float, float] = (2.0, 2.0, 2.0)
DEFAULT_GRID: tuple[int, int, int] = (96, 112, 96)



# -------------------------------------------------------------------------------- model space
@dataclass(frozen=True)
class ModelSpace:
    """The grid the network runs on.

    Attributes:
        affine: ``(4, 4)`` voxel -> RAS world (mm) affine of the model grid.
        shape: ``(G0, G1, G2)`` grid shape (voxels).
        spacing: ``(3,)`` voxel size in mm.
    """

    affine: np.ndarray
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]


def model_space(fixed: Volume, spacing: float | Sequence[float] = DEFAULT_SPACING,
                grid: Sequence[int] = DEFAULT_GRID, centre: Sequence[float] | None = None
                ) -> ModelSpace:
    """The model grid for a fixed image: its canonical axes, the model's spacing and grid shape.

    Axis ``i`` of the model grid points the same way as canonical axis ``i`` of ``fixed`` (unit
    vector ``fixed.affine[:3, i] / fixed.spacing[i]``), with voxel size ``spacing[i]`` mm and
    ``grid[i]`` voxels; the grid's centre (voxel ``(grid - 1) / 2``) lies on ``centre``.

    Args:
        fixed: the fixed image.
        spacing: model voxel size in mm (one number or three).
        grid: model grid shape ``(G0, G1, G2)``.
        centre: world point (RAS mm) the grid is centred on; default
            :func:`foreground_centre` of ``fixed``.
    Returns:
        A :class:`ModelSpace`.
    Raises:
        InputError: non-positive spacing or grid sizes.
    """
    sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)).copy()
    shape = tuple(int(g) for g in grid)
    if not np.all(np.isfinite(sp) & (sp > 0)):
        raise InputError(f"model space: spacing must be 3 positive sizes in mm, got {spacing}")
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"model space: grid must be 3 positive sizes, got {grid}")
    c = foreground_centre(fixed) if centre is None else np.asarray(centre, dtype=np.float64)
    directions = fixed.affine[:3, :3] / fixed.spacing  # unit columns
    aff = np.eye(4)
    aff[:3, :3] = directions * sp
    aff[:3, 3] = c - aff[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    return ModelSpace(affine=aff, shape=shape, spacing=tuple(float(s) for s in sp))


def _meta_geometry(meta: dict, source: str) -> tuple[tuple[float, float, float],
                                                      tuple[int, int, int], list[str]]:
    """Spacing and grid from a checkpoint's meta (defaults logged), plus which were defaulted."""
    defaulted = []
    spacing = meta.get("spacing")
    if spacing is None:
        spacing = DEFAULT_SPACING
        defaulted.append("spacing")
        log.warning("%s: checkpoint meta has no 'spacing'; assuming %s mm (the phantom CPU "
                    "preset)", source, "x".join(f"{s:g}" for s in DEFAULT_SPACING))
    grid = meta.get("grid")
    if grid is None:
        grid = DEFAULT_GRID
        defaulted.append("grid")
        log.warning("%s: checkpoint meta has no 'grid'; assuming %s voxels (the phantom CPU "
                    "preset)", source, "x".join(str(g) for g in DEFAULT_GRID))
    try:
        sp = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)))
        gr = tuple(int(g) for g in grid)
    except (TypeError, ValueError):
        raise InputError(f"{source}: meta 'spacing' {spacing!r} / 'grid' {grid!r} are not "
                         f"3 numbers") from None
    if not all(np.isfinite(s) and s > 0 for s in sp):
        raise InputError(f"{source}: meta 'spacing' must be positive mm, got {spacing!r}")
    if len(gr) != 3 or min(gr) < 1 or any(g != float(v) for g, v in zip(gr, grid)):
        raise InputError(f"{source}: meta 'grid' must be 3 positive integers, got {grid!r}")
    return sp, gr, defaulted


def model_space_from_meta(fixed: Volume, meta: dict, source: str = "checkpoint"
                          ) -> tuple[ModelSpace, list[str]]:
    """:func:`model_space` with the spacing and grid of a checkpoint's ``meta``.

    Args:
        fixed: the fixed image.
        meta: the checkpoint JSON's ``"meta"`` dict (``"spacing"``, ``"grid"``; missing keys take
            :data:`DEFAULT_SPACING` / :data:`DEFAULT_GRID` with a logged warning).
        source: the checkpoint's name, for messages.
    Returns:
        ``(space, defaulted)``: the :class:`ModelSpace` and the keys that were defaulted.
    Raises:
        InputError: malformed ``spacing`` / ``grid`` values.
    """
    sp, gr, defaulted = _meta_geometry(meta or {}, source)
    return model_space(fixed, sp, gr), defaulted


# ------------------------------------------------------------------------- field and warping
def displacement_to_fixed(flow: torch.Tensor | np.ndarray, space: ModelSpace,
                          fixed: Volume) -> np.ndarray:
    """The model's displacement as world vectors at the voxels of the fixed image's grid.

    Args:
        flow: ``(3, G0, G1, G2)`` or ``(1, 3, G0, G1, G2)`` displacement in voxels of the model
            grid (channel ``i`` along model axis ``i``; fixed -> moving).
        space: the model grid.
        fixed: the fixed image (its canonical grid is the output grid).
    Returns:
        ``(D0, D1, D2, 3)`` float32 displacement in RAS mm on ``fixed``'s canonical grid:
        ``d(p) = A[:3, :3] @ u(inv(A) p)`` with ``u`` interpolated trilinearly, zero outside
        the model grid.
    Raises:
        InputError: ``flow`` does not have the model grid's shape.
    """
    u = flow.detach().float().cpu().numpy() if isinstance(flow, torch.Tensor) else np.asarray(
        flow, dtype=np.float32)
    if u.ndim == 5 and u.shape[0] == 1:
        u = u[0]
    if u.shape != (3, *space.shape):
        raise InputError(f"displacement of shape {u.shape}, expected (3, {space.shape}) on the "
                         f"model grid")
    # float32 like the network's output (interpolated in float64 either way), channels last:
    # the three components resampled together (resample_array's values, one pass)
    world = np.einsum("ij,j...->...i", space.affine[:3, :3].astype(np.float32), u)
    m = np.linalg.inv(np.asarray(space.affine, np.float64)) @ np.asarray(fixed.affine, np.float64)
    return sample_affine(world, m, fixed.shape, order=1, cval=0.0)


def warp_to_fixed(volume: Volume, disp_mm: np.ndarray, fixed: Volume, order: int = 1,
                  cval: float = 0.0) -> np.ndarray:
    """Sample ``volume`` at ``p + disp_mm(p)`` for every voxel ``p`` of the fixed grid.

    Points are mapped to ``volume``'s voxels through its own affine, so ``volume`` may have any
    grid. Sampling follows ``scipy.ndimage.map_coordinates`` (computed in parallel by
    :func:`mambamorph.resample_cpu.sample_affine`), with the same boundary rules as
    :func:`mambamorph.data.preprocess.resample_array`: ``order=1`` (images) gives ``cval``
    beyond the outermost voxel centres, ``order=0`` (label maps) beyond the outermost voxel
    cubes.

    Args:
        volume: the moving image or label map (canonical ``data`` and ``affine``).
        disp_mm: ``(D0, D1, D2, 3)`` displacement in RAS mm on ``fixed``'s canonical grid.
        fixed: the fixed image (output grid).
        order: 1 (trilinear) for images, 0 (nearest) for label maps.
        cval: value of points outside ``volume``.
    Returns:
        ``(D0, D1, D2)`` array on ``fixed``'s canonical grid: float32 for ``order=1``,
        ``volume``'s dtype (int64 for labels) for ``order=0``.
    Raises:
        InputError: ``disp_mm`` does not have the fixed grid's shape, or ``order`` is not 0
            or 1.
    """
    d = np.asarray(disp_mm)
    if d.shape != (*fixed.shape, 3):
        raise InputError(f"displacement of shape {d.shape}, expected {(*fixed.shape, 3)}")
    if order not in (0, 1):
        raise InputError(f"warp_to_fixed: order 0 (labels) or 1 (images), got {order}")
    data = volume.data.numpy()
    if order == 1:
        data = data.astype(np.float32, copy=False)
    to_vox = np.linalg.inv(volume.affine)
    m = to_vox @ fixed.affine  # fixed voxel -> volume voxel
    # scipy.ndimage.map_coordinates' rules, in parallel (mambamorph.resample_cpu)
    return sample_affine(data, m, fixed.shape, order=order, cval=cval, disp_mm=d,
                         mm_to_voxel=to_vox[:3, :3])


def warn_outside(fixed: Volume, space: ModelSpace) -> None:
    """Warn when the fixed image's foreground reaches beyond the model grid."""
    box = foreground_box(fixed)
    if box is None:
        return
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)])
    pts = np.where(corners, box[1], box[0])  # (8, 3) bounding-box corners, fixed voxels
    to_model = np.linalg.inv(space.affine) @ fixed.affine
    y = pts @ to_model[:3, :3].T + to_model[:3, 3]
    if (y < -0.5).any() or (y > np.array(space.shape) - 0.5).any():
        log.warning("%s: the foreground extends beyond the model grid (%s voxels at %s mm); "
                    "outside it the displacement is zero (not registered)", fixed.path,
                    "x".join(map(str, space.shape)), "x".join(f"{s:g}" for s in space.spacing))
