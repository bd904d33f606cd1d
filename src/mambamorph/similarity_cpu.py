"""MIND-SSC on the CPU without autograd: numba kernels for the features instance optimisation
computes once per image.

:func:`mambamorph.similarity.mind_ssc` is the definition (differentiable, used by the losses);
:func:`mind_ssc_cpu` computes the same descriptor (to float rounding, ``tests/test_similarity.py``)
for a CPU image when no gradient is needed. On a 96x112x96 image torch's version makes about ten
full passes over the 12-channel volume (shifted differences, concatenation, padding, a 27-voxel
average pool, minimum, mean, exponential), 0.3-0.4 s per image and dilation on 2 cores; here
the patch distances are one pass, the box filter three separable passes with clamped indices
(the replicate padding), and the normalisation two passes, in parallel over the first array
axis; the exponential is torch's.
The result is channels-last, the layout :mod:`mambamorph.nn.warp_cpu` samples without a copy.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from mambamorph.nn.squaring_cpu import torch_thread_count
from mambamorph.similarity import MIND_OFFSET_PAIRS

__all__ = ["mind_ssc_cpu"]

_OFFSETS = np.asarray(MIND_OFFSET_PAIRS, dtype=np.int64)  # (12, 2, 3)


@njit(parallel=True, cache=True)
def _distances(img, offsets, d, out):  # pragma: no cover - compiled; tested via mind_ssc_cpu
    """``out[x, c] = (img[clamp(x + d a_c)] - img[clamp(x + d b_c)]) ** 2`` (replicate
    padding); ``img`` ``(D0, D1, D2)``, ``out`` ``(D0, D1, D2, 12)``."""
    n0, n1, n2 = img.shape
    for x0 in prange(n0):
        for x1 in range(n1):
            for x2 in range(n2):
                for c in range(offsets.shape[0]):
                    a0 = min(max(x0 + d * offsets[c, 0, 0], 0), n0 - 1)
                    a1 = min(max(x1 + d * offsets[c, 0, 1], 0), n1 - 1)
                    a2 = min(max(x2 + d * offsets[c, 0, 2], 0), n2 - 1)
                    b0 = min(max(x0 + d * offsets[c, 1, 0], 0), n0 - 1)
                    b1 = min(max(x1 + d * offsets[c, 1, 1], 0), n1 - 1)
                    b2 = min(max(x2 + d * offsets[c, 1, 2], 0), n2 - 1)
                    diff = img[a0, a1, a2] - img[b0, b1, b2]
                    out[x0, x1, x2, c] = diff * diff


@njit(parallel=True, cache=True)
def _box(src, r, axis, out):  # pragma: no cover - compiled; tested via mind_ssc_cpu
    """Mean over ``2 r + 1`` voxels along ``axis`` (0, 1 or 2) of ``(D0, D1, D2, C)`` ``src``,
    indices clamped to the volume (replicate padding)."""
    n0, n1, n2, nc = src.shape
    k = 2 * r + 1
    for x0 in prange(n0):
        for x1 in range(n1):
            for x2 in range(n2):
                for c in range(nc):
                    s = src[x0, x1, x2, c] * 0.0
                    for o in range(-r, r + 1):
                        if axis == 0:
                            s += src[min(max(x0 + o, 0), n0 - 1), x1, x2, c]
                        elif axis == 1:
                            s += src[x0, min(max(x1 + o, 0), n1 - 1), x2, c]
                        else:
                            s += src[x0, x1, min(max(x2 + o, 0), n2 - 1), c]
                    out[x0, x1, x2, c] = s / k


@njit(parallel=True, cache=True)
def _box3(src, axis, out):  # pragma: no cover - compiled; tested via mind_ssc_cpu
    """:func:`_box` for ``r = 1``: ``out = (src[x - e] + src[x] + src[x + e]) / 3`` along
    ``axis`` with replicate padding, written so that the innermost loop runs over contiguous
    memory without bounds checks (the voxels of a line times their channels), which the
    compiler vectorises; the general kernel clamps every index (3x slower at 96x112x96x12)."""
    n0, n1, n2, nc = src.shape
    third = src.dtype.type(1.0 / 3.0)
    if axis == 2:
        m = n2 * nc
        for x0 in prange(n0):
            for x1 in range(n1):
                a = src[x0, x1].reshape(m)
                b = out[x0, x1].reshape(m)
                if n2 == 1:
                    for j in range(m):
                        b[j] = a[j]
                    continue
                for j in range(nc):
                    b[j] = (a[j] + a[j] + a[j + nc]) * third
                    b[m - nc + j] = (a[m - 2 * nc + j] + a[m - nc + j] + a[m - nc + j]) * third
                for j in range(nc, m - nc):
                    b[j] = (a[j - nc] + a[j] + a[j + nc]) * third
    else:
        for x0 in prange(n0):
            for x1 in range(n1):
                if axis == 0:
                    lo, hi = max(x0 - 1, 0), min(x0 + 1, n0 - 1)
                    p = src[lo, x1].reshape(n2 * nc)
                    q = src[hi, x1].reshape(n2 * nc)
                else:
                    lo, hi = max(x1 - 1, 0), min(x1 + 1, n1 - 1)
                    p = src[x0, lo].reshape(n2 * nc)
                    q = src[x0, hi].reshape(n2 * nc)
                a = src[x0, x1].reshape(n2 * nc)
                b = out[x0, x1].reshape(n2 * nc)
                for j in range(n2 * nc):
                    b[j] = (p[j] + a[j] + q[j]) * third

@njit(parallel=True, cache=True)
def _centre(dist, var):  # pragma: no cover - compiled; tested via mind_ssc_cpu
    """In place: ``dist[x, c] -= min_c dist[x, c]``; ``var[x] = mean_c dist[x, c]``."""
    n0, n1, n2, nc = dist.shape
    for x0 in prange(n0):
        for x1 in range(n1):
            for x2 in range(n2):
                lo = dist[x0, x1, x2, 0]
                for c in range(1, nc):
                    lo = min(lo, dist[x0, x1, x2, c])
                s = lo * 0.0
                for c in range(nc):
                    v = dist[x0, x1, x2, c] - lo
                    dist[x0, x1, x2, c] = v
                    s += v
                var[x0, x1, x2] = s / nc


@njit(parallel=True, cache=True)
def _scale(dist, var, lo, hi):  # pragma: no cover - compiled; tested via mind_ssc_cpu
    """In place: ``dist[x, c] = -dist[x, c] / v(x)`` with ``v = clamp(var, lo, hi)`` (1 where
    that is 0: a constant image); the exponential is torch's (vectorised; numba's is not)."""
    n0, n1, n2, nc = dist.shape
    for x0 in prange(n0):
        for x1 in range(n1):
            for x2 in range(n2):
                v = min(max(var[x0, x1, x2], lo), hi)
                if not v > 0:
                    v = 1.0
                for c in range(nc):
                    dist[x0, x1, x2, c] = -dist[x0, x1, x2, c] / v


def mind_ssc_cpu(img: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """:func:`mambamorph.similarity.mind_ssc` of a CPU image, without autograd.

    Args:
        img: ``(B, 1, D0, D1, D2)`` float32 or float64 image on the CPU (any intensity range).
        radius: box-filter radius in voxels (>= 0).
        dilation: offset length in voxels (>= 1).
    Returns:
        ``(B, 12, D0, D1, D2)`` descriptor in ``img``'s dtype (float32 for other types),
        channels-last memory; no gradient.
    """
    x = img.detach()
    if x.dtype != torch.float64:
        x = x.float()
    batch, shape = x.shape[0], tuple(x.shape[2:])
    first = torch.empty((batch, *shape, len(MIND_OFFSET_PAIRS)), dtype=x.dtype)
    second = torch.empty_like(first) if radius else first
    var = torch.empty((batch, *shape), dtype=x.dtype)
    with torch_thread_count():
        for b in range(batch):
            a, c = first[b].numpy(), second[b].numpy()
            _distances(np.ascontiguousarray(x[b, 0].numpy()), _OFFSETS, int(dilation), a)
            if radius == 1:  # the 3D box of a replicate-padded volume is three 1D boxes
                _box3(a, 0, c)
                _box3(c, 1, a)
                _box3(a, 2, c)
            elif radius:
                _box(a, int(radius), 0, c)
                _box(c, int(radius), 1, a)
                _box(a, int(radius), 2, c)
            v = var[b].numpy()
            _centre(c, v)
            level = float(v.mean(dtype=np.float64))
            _scale(c, v, 1e-3 * level, 1e3 * level)
    return second.exp_().permute(0, 4, 1, 2, 3)
