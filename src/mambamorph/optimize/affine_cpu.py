"""The affine stage's metric on the CPU in one compiled pass: Parzen mutual information of the
moving image sampled at chosen points, and its gradient with respect to those points.

:mod:`mambamorph.optimize.affine` defines the metric with torch operations (:func:`~mambamorph.
optimize.affine._sample`, :func:`~mambamorph.optimize.affine._parzen`,
:func:`~mambamorph.optimize.affine._neg_mi`) and differentiates it with autograd; at the few
thousand points an iteration samples, those ~800 small operations per iteration cost far more
than their arithmetic (1.4 s of a 2 mm pair's affine stage, 2 cores, 2026-11-30). Here
:func:`neg_mi_at_points` computes the same value (float64 inside) and its gradient in one numba
kernel, and torch's autograd carries that gradient on to the transform's parameters.
``tests/test_affine.py`` checks value and gradient against the torch definition.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit

__all__ = ["MI_EPS", "PARZEN_TAPS", "neg_mi_at_points"]

#: bins one sample's Parzen window touches: those within 4 sigma (sigma = one bin) of its
#: value; the Gaussian weight of the nearest bin left out is below exp(-8) = 3.4e-4 of the peak
#: (also the windows of the torch definition, mambamorph.optimize.affine._parzen).
PARZEN_TAPS = 9
#: the regulariser of the logarithms of the mutual information (also affine._neg_mi's).
MI_EPS = 1e-10


@njit(cache=True, error_model="numpy")
def _neg_mi_kernel(img, vox, wf, grad):  # pragma: no cover - compiled; tested via the Function
    """Negative MI of the fixed Parzen weights ``wf`` ``(N, B)`` and the moving image ``img``
    ``(D0, D1, D2)`` sampled trilinearly at ``vox`` ``(N, 3)`` (voxels), and its gradient
    ``grad`` ``(N, 3)`` with respect to ``vox``; returns ``(value, points inside)``.

    Follows the torch definition step by step: a point outside ``[0, D - 1]`` on any axis is
    masked out; the sample is clamped to ``[0, 1]`` (no gradient where it is clamped off), spread
    over the 9 nearest of ``B`` Gaussian bins (sigma one bin, weights normalised to sum 1), and
    the joint histogram ``J = sum_n wf[n] (x) wm[n] / M`` (``M`` points inside) gives
    ``-sum J log((J + eps) / (pf pm + eps))``.
    """
    n_pts = vox.shape[0]
    bins = wf.shape[1]
    n0, n1, n2 = img.shape
    half = PARZEN_TAPS // 2
    first = np.zeros(n_pts, dtype=np.int64)  # bin of tap 0
    span = np.zeros(n_pts, dtype=np.int64)  # first non-zero bin of the fixed row
    w = np.zeros((n_pts, PARZEN_TAPS))  # normalised Parzen weights of the moving sample
    dw = np.zeros((n_pts, PARZEN_TAPS))  # their derivatives with respect to the sample value
    dv = np.zeros((n_pts, 3))  # the sample's gradient with respect to the point
    inside = np.zeros(n_pts, dtype=np.bool_)
    joint = np.zeros((bins, bins))
    count = 0
    for n in range(n_pts):
        p0 = vox[n, 0]
        p1 = vox[n, 1]
        p2 = vox[n, 2]
        if not (0.0 <= p0 <= n0 - 1 and 0.0 <= p1 <= n1 - 1 and 0.0 <= p2 <= n2 - 1):
            continue
        inside[n] = True
        count += 1
        i0 = max(min(int(math.floor(p0)), n0 - 2), 0)
        i1 = max(min(int(math.floor(p1)), n1 - 2), 0)
        i2 = max(min(int(math.floor(p2)), n2 - 2), 0)
        t0 = p0 - i0
        t1 = p1 - i1
        t2 = p2 - i2
        j0 = min(i0 + 1, n0 - 1)
        j1 = min(i1 + 1, n1 - 1)
        j2 = min(i2 + 1, n2 - 1)
        c000 = float(img[i0, i1, i2])
        c001 = float(img[i0, i1, j2])
        c010 = float(img[i0, j1, i2])
        c011 = float(img[i0, j1, j2])
        c100 = float(img[j0, i1, i2])
        c101 = float(img[j0, i1, j2])
        c110 = float(img[j0, j1, i2])
        c111 = float(img[j0, j1, j2])
        a00 = c000 * (1 - t2) + c001 * t2
        a01 = c010 * (1 - t2) + c011 * t2
        a10 = c100 * (1 - t2) + c101 * t2
        a11 = c110 * (1 - t2) + c111 * t2
        b0 = a00 * (1 - t1) + a01 * t1
        b1 = a10 * (1 - t1) + a11 * t1
        value = b0 * (1 - t0) + b1 * t0
        dv[n, 0] = b1 - b0
        dv[n, 1] = (a01 - a00) * (1 - t0) + (a11 - a10) * t0
        dv[n, 2] = (((c001 - c000) * (1 - t1) + (c011 - c010) * t1) * (1 - t0)
                    + ((c101 - c100) * (1 - t1) + (c111 - c110) * t1) * t0)
        passes = 1.0
        if value < 0.0:
            value, passes = 0.0, 0.0
        elif value > 1.0:
            value, passes = 1.0, 0.0
        # a fixed Parzen row is non-zero on at most PARZEN_TAPS consecutive bins: loop over them
        lo = 0
        while lo < bins - 1 and wf[n, lo] == 0.0:
            lo += 1
        hi = min(lo + PARZEN_TAPS, bins)
        span[n] = lo
        x = value * bins - 0.5
        f = int(math.floor(x))
        first[n] = f - half
        total = 0.0
        dtotal = 0.0
        for k in range(PARZEN_TAPS):
            b = f - half + k
            if 0 <= b < bins:
                d = x - b
                e = math.exp(-0.5 * d * d)
                w[n, k] = e
                dw[n, k] = -d * e  # d e / d x for now
                total += e
                dtotal += -d * e
        total = max(total, 1e-12)
        for k in range(PARZEN_TAPS):
            wk = w[n, k] / total
            # d (e_k / S) / d value = (e_k' - w_k S') / S * dx/dvalue
            dw[n, k] = (dw[n, k] - wk * dtotal) / total * bins * passes
            w[n, k] = wk
            b = f - half + k
            if 0 <= b < bins and wk != 0.0:
                for a in range(lo, hi):
                    joint[a, b] += wf[n, a] * wk
    m = max(count, 1)
    for a in range(bins):
        for b in range(bins):
            joint[a, b] /= m
    pf = joint.sum(axis=1)
    pm = joint.sum(axis=0)
    value = 0.0
    gj = np.zeros((bins, bins))  # d value / d joint
    row = np.zeros(bins)
    col = np.zeros(bins)
    for a in range(bins):
        for b in range(bins):
            q = pf[a] * pm[b] + MI_EPS
            j = joint[a, b]
            value -= j * math.log((j + MI_EPS) / q)
            gj[a, b] = -math.log((j + MI_EPS) / q) - j / (j + MI_EPS)
            row[a] += j * pm[b] / q
            col[b] += j * pf[a] / q
    for a in range(bins):
        for b in range(bins):
            gj[a, b] += row[a] + col[b]
    for n in range(n_pts):
        grad[n, 0] = 0.0
        grad[n, 1] = 0.0
        grad[n, 2] = 0.0
        if not inside[n]:
            continue
        g = 0.0
        for k in range(PARZEN_TAPS):
            b = first[n] + k
            if 0 <= b < bins and dw[n, k] != 0.0:
                s = 0.0
                for a in range(span[n], min(span[n] + PARZEN_TAPS, bins)):
                    s += wf[n, a] * gj[a, b]
                g += s * dw[n, k]
        g /= m
        grad[n, 0] = g * dv[n, 0]
        grad[n, 1] = g * dv[n, 1]
        grad[n, 2] = g * dv[n, 2]
    return value, count


class _NegMI(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vox, image, wf):
        pts = vox.detach().to(torch.float64).contiguous().numpy()
        grad = np.empty_like(pts)
        # wf in its own dtype (fixed for a level; the kernel sums in float64 either way)
        value, count = _neg_mi_kernel(image.detach().contiguous().numpy(), pts,
                                      wf.detach().contiguous().numpy(), grad)
        ctx.save_for_backward(torch.from_numpy(grad).to(vox.dtype))
        share = vox.new_tensor(count / max(len(pts), 1))
        ctx.mark_non_differentiable(share)
        return vox.new_tensor(value), share

    @staticmethod
    def backward(ctx, grad_value, grad_share):
        (grad,) = ctx.saved_tensors
        return grad_value * grad, None, None


def neg_mi_at_points(image: torch.Tensor, vox: torch.Tensor,
                     wf: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Negative Parzen mutual information of fixed samples and the moving image at points.

    Args:
        image: ``(D0, D1, D2)`` moving image on the CPU, intensities in [0, 1] (float32 or 64).
        vox: ``(N, 3)`` points in ``image`` voxels (array axes), float32 or float64; the value is
            differentiable with respect to them.
        wf: ``(N, B)`` Parzen weights of the fixed samples at the same points (rows sum to 1;
            :func:`mambamorph.optimize.affine._parzen`).
    Returns:
        ``(value, inside)``: the negative MI (a 0-d tensor in ``vox``'s dtype; lower is better),
        and the share of the points inside the moving image (those outside are left out).
    """
    value, share = _NegMI.apply(vox, image, wf)
    return value, float(share)
