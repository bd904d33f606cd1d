"""Trilinear corner loops compiled into the CPU kernels: sampling at a position, its gradient
with respect to the position, and the transposed operation (scattering into the corners).

Conventions are :mod:`mambamorph.nn.spatial`'s: an array ``(D0, D1, D2, C)`` (channels last),
a position in voxels along the array axes, a corner outside the volume reading 0 (zero
padding). :mod:`mambamorph.nn.warp_cpu` (warps and their gradients) and
:mod:`mambamorph.nn.squaring_cpu` (the squarings' backward) call these; they are inlined.
"""

from __future__ import annotations

import math

from numba import njit

__all__ = ["cell", "corners", "scatter_corners"]


@njit(inline="always", cache=True, error_model="numpy")
def cell(p0, p1, p2):  # pragma: no cover - compiled
    """The lower corner ``(i0, i1, i2)`` of the voxel cell holding ``p`` and the position's
    fractions ``(t0, t1, t2)`` in it (``p = i + t``, ``0 <= t < 1``)."""
    f0 = math.floor(p0)
    f1 = math.floor(p1)
    f2 = math.floor(p2)
    return int(f0), int(f1), int(f2), p0 - f0, p1 - f1, p2 - f2


@njit(inline="always", cache=True, error_model="numpy")
def corners(img, p0, p1, p2, vec, backward):  # pragma: no cover - compiled
    """Trilinear sampling of ``img`` ``(D0, D1, D2, C)`` at an inside position ``p``.

    Forward (``backward`` False): ``vec[c] = img(p)[c]``; returns zeros. Backward: returns
    ``(g0, g1, g2)`` with ``g_k = sum_c vec[c] * d img(p)[c] / d p_k`` (``vec`` read only).
    Corners outside the volume read 0."""
    n0, n1, n2, nc = img.shape
    i0, i1, i2, t0, t1, t2 = cell(p0, p1, p2)
    g0 = 0.0
    g1 = 0.0
    g2 = 0.0
    if not backward:
        for c in range(nc):
            vec[c] = 0.0
    for d0 in range(2):
        j0 = i0 + d0
        if j0 < 0 or j0 >= n0:
            continue
        w0 = t0 if d0 else 1.0 - t0
        s0 = 1.0 if d0 else -1.0  # d w0 / d p0
        for d1 in range(2):
            j1 = i1 + d1
            if j1 < 0 or j1 >= n1:
                continue
            w1 = t1 if d1 else 1.0 - t1
            s1 = 1.0 if d1 else -1.0
            for d2 in range(2):
                j2 = i2 + d2
                if j2 < 0 or j2 >= n2:
                    continue
                w2 = t2 if d2 else 1.0 - t2
                s2 = 1.0 if d2 else -1.0
                if backward:
                    dot = 0.0
                    for c in range(nc):
                        dot += vec[c] * img[j0, j1, j2, c]
                    g0 += s0 * w1 * w2 * dot
                    g1 += w0 * s1 * w2 * dot
                    g2 += w0 * w1 * s2 * dot
                else:
                    w = w0 * w1 * w2
                    for c in range(nc):
                        vec[c] += w * img[j0, j1, j2, c]
    return g0, g1, g2


@njit(inline="always", cache=True, error_model="numpy")
def scatter_corners(out, p0, p1, p2, vec):  # pragma: no cover - compiled
    """The transpose of :func:`corners`' forward: ``out[c] += w_c(p) * vec`` for each corner
    ``c`` of the position ``p`` inside ``out`` ``(D0, D1, D2, C)`` (``w_c`` the trilinear
    weights; corners outside the volume are left out)."""
    n0, n1, n2, nc = out.shape
    i0, i1, i2, t0, t1, t2 = cell(p0, p1, p2)
    for d0 in range(2):
        j0 = i0 + d0
        if j0 < 0 or j0 >= n0:
            continue
        w0 = t0 if d0 else 1.0 - t0
        for d1 in range(2):
            j1 = i1 + d1
            if j1 < 0 or j1 >= n1:
                continue
            w01 = w0 * (t1 if d1 else 1.0 - t1)
            for d2 in range(2):
                j2 = i2 + d2
                if j2 < 0 or j2 >= n2:
                    continue
                w = w01 * (t2 if d2 else 1.0 - t2)
                for c in range(nc):
                    out[j0, j1, j2, c] += w * vec[c]
