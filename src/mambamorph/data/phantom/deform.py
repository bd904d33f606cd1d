"""Random smooth deformations of the phantom template and the warp that applies them.

A displacement is ``(3, D0, D1, D2)`` in voxels, channel ``i`` along array axis ``i``, and
warping samples the source at ``x + u(x)`` (the convention of :mod:`mambamorph.nn.spatial`).
:func:`random_transform` draws a stationary velocity made of Gaussian random fields at three
scales, integrates it by scaling and squaring (:func:`integrate_velocity_np`) on a ~4 mm grid,
upsamples it and composes it with a small random affine (:func:`random_affine`);
:func:`warp_template` moves the template's T1, mask and labels with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

from mambamorph.data.phantom.params import PhantomParams
from mambamorph.data.phantom.template import Template
from mambamorph.errors import InputError

__all__ = ["smooth_noise", "integrate_velocity_np", "random_velocity", "random_affine",
           "random_transform", "warp_template"]

#: soft brain-mask values below this are set to 0 in a subject (a skull-stripped edge).
_MASK_FLOOR = 0.25


# ---------------------------------------------------------------------------- random fields
def _coarse(shape: Sequence[int], spacing: float, target_mm: float) -> tuple[tuple[int, ...],
                                                                               np.ndarray]:
    """A coarse grid spanning the same extent (corner-aligned) with voxels of ~``target_mm``.

    Returns the coarse shape and its per-axis spacing in mm.
    """
    stride = max(1.0, target_mm / spacing)
    cs = tuple(max(2, int(math.ceil((n - 1) / stride)) + 1) if n > 1 else 1 for n in shape)
    cmm = np.array([spacing * (n - 1) / (c - 1) if c > 1 else spacing
                    for n, c in zip(shape, cs)])
    return cs, cmm


def _upsample(a: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Corner-aligned trilinear upsampling of a 3D array to ``shape`` (float32)."""
    if tuple(a.shape) == tuple(shape):
        return a.astype(np.float32, copy=False)
    zoom = [n / c for n, c in zip(shape, a.shape)]
    out = ndi.zoom(a, zoom, order=1, mode="nearest", grid_mode=False, output=np.float32)
    assert out.shape == tuple(shape), (out.shape, shape)
    return out


def smooth_noise(rng: np.random.Generator, shape: Sequence[int], spacing: float,
                 sigma_mm: float, channels: int = 1) -> np.ndarray:
    """A Gaussian random field of unit RMS: white noise smoothed with ``sigma_mm``.

    Generated on a coarse grid (about ``sigma_mm / 2`` voxels) and upsampled trilinearly, so the
    cost hardly depends on ``shape``.

    Args:
        rng: numpy generator (consumed).
        shape: ``(D0, D1, D2)``.
        spacing: voxel size of ``shape`` in mm.
        sigma_mm: smoothing sigma in mm, > 0.
        channels: number of independent fields.
    Returns:
        ``(channels, D0, D1, D2)`` float32, each field with unit RMS over the grid.
    Raises:
        InputError: ``sigma_mm <= 0``.
    """
    if not sigma_mm > 0:
        raise InputError(f"smooth_noise: sigma_mm must be > 0, got {sigma_mm}")
    cs, cmm = _coarse(shape, spacing, sigma_mm / 2.0)
    out = np.empty((channels, *shape), dtype=np.float32)
    for c in range(channels):
        w = rng.standard_normal(cs, dtype=np.float32)
        w = ndi.gaussian_filter(w, sigma_mm / cmm, mode="reflect")
        w /= max(float(np.sqrt(np.mean(w.astype(np.float64) ** 2))), 1e-12)
        out[c] = _upsample(w, shape)
    return out


def _sample_field(f: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Sample each channel of ``f`` (C, ...) at ``coords`` (3, ...) linearly, border-clamped."""
    return np.stack([ndi.map_coordinates(f[c], coords, order=1, mode="nearest",
                                         output=np.float32) for c in range(f.shape[0])])


def integrate_velocity_np(velocity: np.ndarray, steps: int = 7) -> np.ndarray:
    """Scaling and squaring of a stationary velocity field (numpy / scipy).

    ``u <- v / 2**steps``, then ``steps`` times ``u <- u + u o (id + u)`` with linear
    interpolation (border values beyond the grid): the displacement of the flow's time-1 map.

    Args:
        velocity: ``(3, D0, D1, D2)`` float velocity in voxels, channel ``i`` along axis ``i``.
        steps: number of squarings, >= 0.
    Returns:
        ``(3, D0, D1, D2)`` float32 displacement in voxels.
    Raises:
        InputError: wrong shape or negative ``steps``.
    """
    velocity = np.asarray(velocity)
    if velocity.ndim != 4 or velocity.shape[0] != 3:
        raise InputError(f"integrate_velocity_np: expected (3, D0, D1, D2), got {velocity.shape}")
    if steps < 0:
        raise InputError(f"integrate_velocity_np: steps must be >= 0, got {steps}")
    u = velocity.astype(np.float32) / np.float32(2.0 ** steps)
    grid = np.indices(velocity.shape[1:], dtype=np.float32)
    for _ in range(steps):
        u = u + _sample_field(u, grid + u)
    return u


def random_velocity(rng: np.random.Generator, shape: Sequence[int], spacing: float,
                    rms_mm: float, sigmas_mm: Sequence[float] = (20.0, 10.0, 5.0),
                    weights: Sequence[float] = (1.0, 0.5, 0.25)) -> np.ndarray:
    """A multi-scale smooth random velocity field in mm.

    Sum over scales of ``weights[k] * smooth_noise(sigma=sigmas_mm[k])`` (3 channels), rescaled
    so that the RMS over the grid of the vector field (channels pooled) is exactly ``rms_mm``.

    Returns:
        ``(3, D0, D1, D2)`` float32, in **mm** along array axes.
    Raises:
        InputError: ``sigmas_mm`` and ``weights`` differ in length, or ``rms_mm < 0``.
    """
    if len(sigmas_mm) != len(weights) or not sigmas_mm:
        raise InputError("random_velocity: sigmas_mm and weights must have the same length")
    if rms_mm < 0:
        raise InputError(f"random_velocity: rms_mm must be >= 0, got {rms_mm}")
    v = np.zeros((3, *shape), dtype=np.float32)
    for s, w in zip(sigmas_mm, weights):
        v += np.float32(w) * smooth_noise(rng, shape, spacing, s, channels=3)
    rms = float(np.sqrt(np.mean(v.astype(np.float64) ** 2)))
    v *= np.float32(rms_mm / max(rms, 1e-12))
    return v


def random_affine(rng: np.random.Generator, rotation_sd_deg: float = 0.5,
                  log_scale_sd: float = 0.0075, translation_sd_mm: float = 0.5) -> np.ndarray:
    """A small random affine of world space about the origin, as a ``(4, 4)`` matrix.

    ``A = R_0 R_1 R_2 S`` plus a translation, with per-axis rotations ``N(0, rotation_sd_deg)``,
    scales ``exp(N(0, log_scale_sd))`` and translations ``N(0, translation_sd_mm)`` mm, each
    draw clipped at 2.5 standard deviations. Apply it about a centre ``c`` as
    ``x -> c + A (x - c) + t``.

    Returns:
        ``(4, 4)`` float64 homogeneous matrix (mm).
    """
    z = np.clip(rng.standard_normal(9), -2.5, 2.5)
    ang = np.deg2rad(z[0:3] * rotation_sd_deg)
    scale = np.exp(z[3:6] * log_scale_sd)
    trans = z[6:9] * translation_sd_mm
    rot = np.eye(3)
    for axis, a in enumerate(ang):
        c, s = math.cos(a), math.sin(a)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rot = rot @ r
    out = np.eye(4)
    out[:3, :3] = rot @ np.diag(scale)
    out[:3, 3] = trans
    return out


def random_transform(rng: np.random.Generator, shape: Sequence[int], spacing: float,
                     params: PhantomParams | None = None, affine: bool = True) -> np.ndarray:
    """A random smooth diffeomorphic transform (velocity integral o small affine) as a field.

    The velocity (:func:`random_velocity`, ``params.deform_rms_mm``) lives on a grid of
    ~``params.integration_spacing_mm`` and is integrated there (:func:`integrate_velocity_np`),
    then upsampled; the affine (:func:`random_affine`) acts about the grid centre. The result
    maps subject voxel ``x`` to template voxel ``x + u(x)`` with
    ``x + u(x) = c + A (x + d(x) - c) + t`` in voxel units (isotropic grid, so the affine's
    rotations are preserved).

    Args:
        rng: numpy generator (consumed).
        shape: ``(D0, D1, D2)`` grid.
        spacing: isotropic voxel size in mm.
        params: :class:`PhantomParams` (default calibrated values).
        affine: include the random affine.
    Returns:
        ``(3, D0, D1, D2)`` float32 displacement in voxels (channel ``i`` along axis ``i``).
    """
    p = params or PhantomParams()
    cs, cmm = _coarse(shape, spacing, p.integration_spacing_mm)
    v_mm = random_velocity(rng, cs, float(np.mean(cmm)), p.deform_rms_mm, p.deform_sigmas_mm,
                           p.deform_weights)
    v_vox = v_mm / cmm.astype(np.float32)[:, None, None, None]
    d_c = integrate_velocity_np(v_vox, p.integration_steps)
    disp = np.stack([_upsample(d_c[i] * np.float32(cmm[i] / spacing), shape) for i in range(3)])
    if affine:
        a = random_affine(rng, p.rotation_sd_deg, p.log_scale_sd, p.translation_sd_mm)
        m = a[:3, :3]
        t = a[:3, 3] / spacing
        c = (np.asarray(shape, dtype=np.float64) - 1) / 2.0
        axes = np.ogrid[tuple(slice(0, n) for n in shape)]
        y = [axes[j] + disp[j] - c[j] for j in range(3)]  # x + d(x) - c
        out = np.empty_like(disp)
        for i in range(3):
            out[i] = (m[i, 0] * y[0] + m[i, 1] * y[1] + m[i, 2] * y[2]
                      + (c[i] + t[i]) - axes[i])
        disp = out
    return disp.astype(np.float32, copy=False)


def warp_template(template: Template, displacement: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Warp the template's T1 and mask (linear) and labels (nearest) by a displacement.

    Args:
        template: :class:`Template` on grid ``(D0, D1, D2)``.
        displacement: ``(3, D0, D1, D2)`` voxels; output voxel ``x`` samples ``x + u(x)``;
            outside the grid reads as background.
    Returns:
        ``(t1, mask, labels)``: float32, float32 in [0, 1], uint8, each ``(D0, D1, D2)``. The
        mask is soft but cut to 0 below 0.25 (images multiplied by it are exactly 0 outside the
        brain's edge voxels); labels are 0 where the mask is below 0.5.
    Raises:
        InputError: the displacement's shape does not match the template.
    """
    if displacement.shape != (3, *template.shape):
        raise InputError(f"warp_template: expected a (3, {template.shape}) displacement, got "
                         f"{displacement.shape}")
    coords = np.indices(template.shape, dtype=np.float32)
    coords += displacement
    t1 = ndi.map_coordinates(template.t1, coords, order=1, mode="constant", cval=0.0,
                             output=np.float32)
    mask = ndi.map_coordinates(template.mask, coords, order=1, mode="constant", cval=0.0,
                               output=np.float32)
    labels = ndi.map_coordinates(template.labels, coords, order=0, mode="constant", cval=0,
                                 output=np.uint8)
    np.clip(mask, 0.0, 1.0, out=mask)
    mask[mask < _MASK_FLOOR] = 0.0  # skull-stripped: a sharp edge, exact zeros beyond it
    labels[mask < 0.5] = 0
    return t1, mask, labels

