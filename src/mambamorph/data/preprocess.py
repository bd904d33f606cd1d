"""Intensity normalisation, CT windowing, centred crop/pad to a grid, and resampling.

Tensors are ``(..., D0, D1, D2)``: the last three axes are the volume, any leading axes
(batch, channel) are carried along. Resampling works on :class:`mambamorph.io.Volume` objects
through their voxel -> world affines (mm).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage as ndi

from mambamorph.errors import InputError
from mambamorph.io import Volume

__all__ = ["minmax", "ct_window", "CropPad", "crop_or_pad", "uncrop", "resample_array",
           "resample_to_grid", "resample_to_spacing"]


def minmax(x: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Min-max normalise each volume to [0, 1].

    Args:
        x: ``(..., D0, D1, D2)`` tensor or array; each leading index is normalised on its own.
    Returns:
        ``float32`` of the same shape and kind (torch in, torch out). A constant volume maps to
        zeros (no division by zero); :func:`mambamorph.io.read_volume` already rejects constant
        files, so this only happens for arrays built in memory.
    Raises:
        InputError: fewer than 3 dimensions, or NaN / Inf values.
    """
    is_np = isinstance(x, np.ndarray)
    t = torch.as_tensor(x).float()
    if t.dim() < 3:
        raise InputError(f"minmax expects (..., D0, D1, D2), got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise InputError("minmax: input holds NaN or Inf values")
    flat = t.reshape(*t.shape[:-3], -1)
    lo = flat.amin(-1)[..., None, None, None]
    span = (flat.amax(-1)[..., None, None, None] - lo)
    out = (t - lo) / torch.where(span > 0, span, torch.ones_like(span))
    return out.numpy() if is_np else out


def ct_window(hu: torch.Tensor | np.ndarray, level: float = 40.0,
              width: float = 80.0) -> torch.Tensor | np.ndarray:
    """Map Hounsfield units through a window to [0, 1]: ``clip((hu - level + width/2) / width)``.

    Args:
        hu: any shape, in HU. The default window (level 40, width 80) is the brain window.
        level, width: window centre and width in HU.
    Returns:
        ``float32`` of the same shape and kind (torch in, torch out).
    Raises:
        InputError: ``width <= 0``.
    """
    if not width > 0:
        raise InputError(f"ct_window: width must be > 0 HU, got {width}")
    is_np = isinstance(hu, np.ndarray)
    out = ((torch.as_tensor(hu).float() - (level - width / 2)) / width).clamp_(0.0, 1.0)
    return out.numpy() if is_np else out


@dataclass(frozen=True)
class CropPad:
    """What :func:`crop_or_pad` did, per axis (D0, D1, D2), to undo it or move an affine.

    Attributes:
        in_shape: the spatial shape before.
        out_shape: the spatial shape after.
        start: index in the *input* of output voxel 0 along each axis (negative = padding).
    """

    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    start: tuple[int, int, int]

    def shift_affine(self, affine: np.ndarray) -> np.ndarray:
        """The ``(4, 4)`` voxel -> mm affine of the output grid, given the input's."""
        shift = np.eye(4)
        shift[:3, 3] = self.start
        return np.asarray(affine, dtype=np.float64) @ shift


def _crop_pad(x: torch.Tensor, src_start: Sequence[int], out_shape: Sequence[int],
              value: float) -> torch.Tensor:
    """Copy the window ``[src_start, src_start + out_shape)`` of ``x``, ``value`` outside."""
    out = x.new_full((*x.shape[:-3], *out_shape), value)
    src, dst = [], []
    for s, n, m in zip(src_start, x.shape[-3:], out_shape):
        a, b = max(s, 0), min(s + m, n)
        src.append(slice(a, max(a, b)))
        dst.append(slice(a - s, a - s + max(0, b - a)))
    out[(..., *dst)] = x[(..., *src)]
    return out


def crop_or_pad(x: torch.Tensor, shape: Sequence[int],
                value: float = 0.0) -> tuple[torch.Tensor, CropPad]:
    """Centre-crop or pad the last three axes to ``shape``.

    Along an axis of size ``n`` made ``m``: if ``n > m``, ``(n - m) // 2`` voxels are cut at the
    start and the rest at the end; if ``n < m``, ``(m - n) // 2`` voxels of ``value`` are added
    at the start and the rest at the end.

    Args:
        x: ``(..., D0, D1, D2)`` tensor.
        shape: target ``(S0, S1, S2)``, positive integers.
        value: padding value.
    Returns:
        ``(y, info)``: ``y`` of shape ``(..., S0, S1, S2)`` and the :class:`CropPad` record for
        :func:`uncrop` and :meth:`CropPad.shift_affine`.
    Raises:
        InputError: ``x`` has fewer than 3 dims or ``shape`` is not 3 positive integers.
    """
    shape = tuple(int(s) for s in shape)
    if x.dim() < 3 or len(shape) != 3 or min(shape) < 1:
        raise InputError(f"crop_or_pad: expected (..., D0, D1, D2) and a 3D target shape, got "
                         f"{tuple(x.shape)} -> {shape}")
    in_shape = tuple(int(n) for n in x.shape[-3:])
    start = tuple((n - m) // 2 if n >= m else -((m - n) // 2) for n, m in zip(in_shape, shape))
    info = CropPad(in_shape=in_shape, out_shape=shape, start=start)
    if in_shape == shape:
        return x, info
    return _crop_pad(x, start, shape, value), info


def uncrop(y: torch.Tensor, info: CropPad, value: float = 0.0) -> torch.Tensor:
    """Undo :func:`crop_or_pad`: back to ``info.in_shape``, cropped-away voxels set to ``value``.

    Works for any ``(..., S0, S1, S2)`` tensor on the output grid (images, label maps, and
    displacement fields in voxels, whose vectors crop/pad leaves unchanged).

    Raises:
        InputError: ``y``'s last three axes are not ``info.out_shape``.
    """
    if y.dim() < 3 or tuple(y.shape[-3:]) != info.out_shape:
        raise InputError(f"uncrop: expected (..., {info.out_shape}), got {tuple(y.shape)}")
    if info.in_shape == info.out_shape:
        return y
    return _crop_pad(y, tuple(-s for s in info.start), info.in_shape, value)


def resample_array(data: np.ndarray, affine_in: np.ndarray, affine_out: np.ndarray,
                   shape_out: Sequence[int], order: int = 1, cval: float = 0.0) -> np.ndarray:
    """Resample a ``(D0, D1, D2)`` array onto another voxel grid of the same world (mm).

    Output voxel ``y`` takes the input's value at voxel ``inv(affine_in) @ affine_out @ y``
    (``scipy.ndimage.affine_transform``; order 0 of any data and order 1 of float data come
    from the parallel kernel of :mod:`mambamorph.resample_cpu`, scipy's values to float
    rounding). Outside the input: with ``order=0`` a point takes the label of the voxel cube it
    falls in (scipy mode ``grid-constant``), so ``cval`` starts half a voxel beyond the
    outermost voxel centres; with ``order >= 1`` ``cval`` starts right beyond them (mode
    ``constant``: no extrapolation).

    Args:
        data: ``(D0, D1, D2)`` array.
        affine_in, affine_out: ``(4, 4)`` voxel -> mm affines of the input and output grids.
        shape_out: ``(S0, S1, S2)``.
        order: spline order: 1 (linear) for images, 0 (nearest) for label maps.
        cval: value outside the input.
    Returns:
        ``(S0, S1, S2)`` array, ``data``'s dtype.
    Raises:
        InputError: bad shapes or a singular ``affine_in``.
    """
    data = np.asarray(data)
    shape_out = tuple(int(s) for s in shape_out)
    if data.ndim != 3 or len(shape_out) != 3 or min(shape_out) < 1:
        raise InputError(f"resample: expected a 3D array and a 3D output shape, got "
                         f"{data.shape} -> {shape_out}")
    try:
        m = np.linalg.inv(np.asarray(affine_in, np.float64)) @ np.asarray(affine_out, np.float64)
    except np.linalg.LinAlgError:
        raise InputError("resample: the input affine is singular") from None
    if order == 0 or (order == 1 and data.dtype in (np.float32, np.float64)):
        # scipy's values to the last bit, in parallel (mambamorph.resample_cpu)
        from mambamorph.resample_cpu import sample_affine

        return sample_affine(data, m, shape_out, order=order, cval=cval)
    return ndi.affine_transform(data, m[:3, :3], offset=m[:3, 3], output_shape=shape_out,
                                order=order, mode="grid-constant" if order == 0 else "constant",
                                cval=cval)


def resample_to_grid(volume: Volume, affine_out: np.ndarray, shape_out: Sequence[int],
                     order: int = 1) -> Volume:
    """Resample a :class:`Volume` onto the grid ``(affine_out, shape_out)``.

    Args:
        volume: the input (its canonical ``data`` and ``affine`` are used).
        affine_out: ``(4, 4)`` voxel -> mm affine of the new grid (any orientation).
        shape_out: ``(S0, S1, S2)`` array shape of the new grid in that orientation.
        order: 1 for images, 0 for label maps.
    Returns:
        A :class:`Volume` whose *stored* geometry is the new grid (so :func:`write_volume` writes
        it with ``affine_out``), reoriented to canonical like every Volume; the dtype is kept.
    Raises:
        InputError: as :func:`resample_array`.
    """
    out = resample_array(volume.data.numpy(), volume.affine, affine_out, shape_out, order)
    return Volume.from_array(out, affine_out, volume.header, volume.path)


def resample_to_spacing(volume: Volume, spacing: float | Sequence[float],
                        order: int = 1) -> Volume:
    """Resample to a new voxel size (mm) over the same field of view, axes kept.

    The new shape along axis ``i`` is ``max(1, round(D_i * s_i / t_i))`` for old spacing ``s``
    and new ``t``; the new grid is centred on the old one (same world centre).

    Args:
        volume: the input :class:`Volume`.
        spacing: new voxel size in mm, one number or three (along the canonical axes).
        order: 1 for images, 0 for label maps.
    Returns:
        The resampled :class:`Volume` (canonical orientation, stored geometry = the new grid).
    Raises:
        InputError: non-positive spacing.
    """
    new = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    if not np.all(new > 0):
        raise InputError(f"resample: spacing must be > 0 mm, got {spacing}")
    shape = np.array(volume.shape)
    new_shape = np.maximum(1, np.round(shape * volume.spacing / new)).astype(int)
    aff = volume.affine.copy()
    aff[:3, :3] = volume.affine[:3, :3] * (new / volume.spacing)
    centre = volume.affine[:3, :3] @ ((shape - 1) / 2) + volume.affine[:3, 3]
    aff[:3, 3] = centre - aff[:3, :3] @ ((new_shape - 1) / 2)
    return resample_to_grid(volume, aff, tuple(new_shape), order)


# ------------------------------------------------------------------------------ foreground
def foreground_box(volume: Volume, fraction: float = 0.1) -> np.ndarray | None:
    """``(2, 3)`` first and last canonical voxel index of the foreground, or ``None``."""
    x = volume.data.numpy()
    lo, hi = float(x.min()), float(np.percentile(x, 99.5))
    if not hi > lo:
        return None
    idx = np.nonzero(x > lo + fraction * (hi - lo))
    if not idx[0].size:
        return None
    return np.array([[i.min() for i in idx], [i.max() for i in idx]], dtype=np.float64)


def foreground_centre(volume: Volume, fraction: float = 0.1) -> np.ndarray:
    """World (RAS mm) centre of the bounding box of a volume's foreground.

    Foreground: voxels above ``min + fraction * (p99.5 - min)`` of the volume's intensities
    (air is the minimum in MR and CT alike; the 99.5th percentile ignores a few bright outliers).
    A volume without such voxels gives the centre of its grid.

    Args:
        volume: a :class:`~mambamorph.io.Volume` (canonical ``data`` and ``affine`` are used).
        fraction: threshold between the minimum (0) and the 99.5th percentile (1).
    Returns:
        ``(3,)`` float64 world point in mm.
    """
    box = foreground_box(volume, fraction)
    centre = ((np.array(volume.shape, dtype=np.float64) - 1) / 2.0 if box is None
              else box.mean(axis=0))
    return volume.affine[:3, :3] @ centre + volume.affine[:3, 3]
