"""scipy.ndimage's order-0 and order-1 resampling in parallel on the CPU: the numba kernel behind
:func:`mambamorph.data.preprocess.resample_array` and :mod:`mambamorph.space`'s warps.

``register``'s outputs resample five volumes onto the fixed image's grid (the three components of
the displacement, the Jacobian, the moving image for the QC figure) and warp two (the moving image
and its label map). ``scipy.ndimage`` does each on one thread, 0.1-0.4 s per 96x112x96 volume
(2 cores, 2026-11-30). The kernels here compute what ``scipy.ndimage.affine_transform`` and
``map_coordinates`` compute for the two cases the package uses, in parallel over the first output
axis and for several channels at once:

- ``order=1``, mode ``"constant"``: a point with a coordinate outside ``[0, n - 1]`` on any axis
  takes ``cval``; inside, trilinear interpolation in float64 (weights ``1 - t`` and
  ``1 - (1 - t)`` as scipy's, the eight corners in its order): scipy's values to float rounding
  (``tests/test_resample.py``: 1e-12 in float64; float32 results rounded from them);
- ``order=0``, mode ``"grid-constant"``: the voxel ``floor(c + 0.5)`` along each axis (ties
  round up, as scipy), ``cval`` where that voxel is outside the volume.

Points are ``M @ (p, 1)`` for output voxel ``p`` (scipy's summation order), plus an optional
displacement ``D @ d(p)`` with ``d`` in mm (``D`` the input's mm -> voxel matrix).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from mambamorph.nn.squaring_cpu import torch_thread_count

__all__ = ["sample_affine"]


@njit(parallel=True, cache=True, error_model="numpy")
def _sample(data, m, shift, disp, dmat, order, cval, out):  # pragma: no cover - compiled
    """``out[p, c] = data(q)[c]`` with ``q = m @ p + shift (+ dmat @ disp[p])``.

    ``data`` ``(N0, N1, N2, C)``; ``out`` ``(S0, S1, S2, C)``; ``disp`` ``(S0, S1, S2, 3)`` mm
    or size 0 (no displacement); ``m``, ``dmat`` ``(3, 3)``; ``shift`` ``(3,)``.
    """
    n0, n1, n2, nc = data.shape
    s0, s1, s2 = out.shape[0], out.shape[1], out.shape[2]
    displaced = disp.size > 0
    for p0 in prange(s0):
        w0 = np.empty(2)
        w1 = np.empty(2)
        w2 = np.empty(2)
        for p1 in range(s1):
            for p2 in range(s2):
                q0 = shift[0]
                q0 += p0 * m[0, 0]
                q0 += p1 * m[0, 1]
                q0 += p2 * m[0, 2]
                q1 = shift[1]
                q1 += p0 * m[1, 0]
                q1 += p1 * m[1, 1]
                q1 += p2 * m[1, 2]
                q2 = shift[2]
                q2 += p0 * m[2, 0]
                q2 += p1 * m[2, 1]
                q2 += p2 * m[2, 2]
                if displaced:
                    d0 = disp[p0, p1, p2, 0]
                    d1 = disp[p0, p1, p2, 1]
                    d2 = disp[p0, p1, p2, 2]
                    q0 += dmat[0, 0] * d0 + dmat[0, 1] * d1 + dmat[0, 2] * d2
                    q1 += dmat[1, 0] * d0 + dmat[1, 1] * d1 + dmat[1, 2] * d2
                    q2 += dmat[2, 0] * d0 + dmat[2, 1] * d1 + dmat[2, 2] * d2
                if order == 0:
                    if not (math.isfinite(q0) and math.isfinite(q1) and math.isfinite(q2)):
                        for c in range(nc):
                            out[p0, p1, p2, c] = cval
                        continue
                    i0 = int(math.floor(q0 + 0.5))
                    i1 = int(math.floor(q1 + 0.5))
                    i2 = int(math.floor(q2 + 0.5))
                    if 0 <= i0 < n0 and 0 <= i1 < n1 and 0 <= i2 < n2:
                        for c in range(nc):
                            out[p0, p1, p2, c] = data[i0, i1, i2, c]
                    else:
                        for c in range(nc):
                            out[p0, p1, p2, c] = cval
                    continue
                if not (0.0 <= q0 <= n0 - 1 and 0.0 <= q1 <= n1 - 1 and 0.0 <= q2 <= n2 - 1):
                    for c in range(nc):
                        out[p0, p1, p2, c] = cval
                    continue
                f0 = math.floor(q0)
                f1 = math.floor(q1)
                f2 = math.floor(q2)
                i0 = int(f0)
                i1 = int(f1)
                i2 = int(f2)
                w0[0] = 1.0 - (q0 - f0)  # scipy's weights: 1 - t, then 1 - (1 - t)
                w0[1] = 1.0 - w0[0]
                w1[0] = 1.0 - (q1 - f1)
                w1[1] = 1.0 - w1[0]
                w2[0] = 1.0 - (q2 - f2)
                w2[1] = 1.0 - w2[0]
                # a corner beyond the last voxel has weight 0 (the point is on the edge): scipy
                # reads a mirrored voxel there; any in-volume voxel times 0 gives the same sum
                j0 = i0 + 1 if i0 + 1 < n0 else i0
                j1 = i1 + 1 if i1 + 1 < n1 else i1
                j2 = i2 + 1 if i2 + 1 < n2 else i2
                for c in range(nc):
                    acc = 0.0
                    for a in range(2):
                        x0 = j0 if a else i0
                        for b in range(2):
                            x1 = j1 if b else i1
                            for e in range(2):
                                x2 = j2 if e else i2
                                acc += float(data[x0, x1, x2, c]) * w0[a] * w1[b] * w2[e]
                    out[p0, p1, p2, c] = acc


def sample_affine(data: np.ndarray, matrix: np.ndarray, shape_out, order: int = 1,
                  cval: float = 0.0, disp_mm: np.ndarray | None = None,
                  mm_to_voxel: np.ndarray | None = None) -> np.ndarray:
    """Sample ``data`` at ``matrix @ (p, 1)`` (+ ``mm_to_voxel @ disp_mm[p]``) for every voxel
    ``p`` of an output grid of ``shape_out``; scipy's values (see the module docstring).

    Args:
        data: ``(N0, N1, N2)`` or ``(N0, N1, N2, C)`` array (channels last); integer data only
            with ``order=0``.
        matrix: ``(3, 4)`` or ``(4, 4)`` output voxel -> input voxel.
        shape_out: ``(S0, S1, S2)``.
        order: 1 (trilinear, mode "constant") or 0 (nearest, mode "grid-constant").
        cval: the value of points outside the input.
        disp_mm: optional ``(S0, S1, S2, 3)`` displacement in mm at the output voxels.
        mm_to_voxel: ``(3, 3)`` the input's mm -> voxel linear map (with ``disp_mm``).
    Returns:
        ``(S0, S1, S2)`` (or ``(S0, S1, S2, C)``) array: float32 for ``order=1`` (float64 for a
        float64 input), ``data``'s dtype for ``order=0``.
    """
    if order not in (0, 1):
        raise ValueError(f"sample_affine: order 0 or 1, got {order}")
    arr = np.asarray(data)
    flat = arr.ndim == 3
    src = arr[..., None] if flat else arr
    if order == 1 and src.dtype not in (np.float32, np.float64):
        src = src.astype(np.float32)
    src = np.ascontiguousarray(src)
    m = np.asarray(matrix, dtype=np.float64)
    shape_out = tuple(int(s) for s in shape_out)
    out = np.empty((*shape_out, src.shape[3]), dtype=src.dtype)
    if disp_mm is None:
        disp = np.zeros((0, 0, 0, 3), dtype=np.float64)
        dmat = np.zeros((3, 3))
    else:
        disp = np.ascontiguousarray(disp_mm, dtype=np.float64)
        dmat = np.ascontiguousarray(mm_to_voxel, dtype=np.float64)
    with torch_thread_count():
        _sample(src, np.ascontiguousarray(m[:3, :3]), np.ascontiguousarray(m[:3, 3]), disp,
                dmat, int(order), src.dtype.type(cval), out)
    return out[..., 0] if flat else out
