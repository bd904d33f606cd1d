"""Warping a fixed image by a field that is being optimised, on the CPU: numba kernels.

:func:`mambamorph.nn.spatial.warp` calls :func:`warp_cpu` on the CPU when the image needs no
gradient (it is data: an image, its MIND features) and only the displacement does (instance
optimisation, training's image terms), for trilinear sampling with zero or border padding.
It computes the same as ``grid_sample(..., align_corners=True)`` and its gradient with respect
to the sampling positions, but

- in voxel units directly, with no normalised, axis-reversed grid to build and differentiate;
- on a channels-last image, so the channels of one corner are adjacent in memory;
- in parallel over the first array axis (torch's CPU 3D sampler and its backward run on one
  thread: in the instance optimisation of a 96x112x96 pair they were 65 % of its time,
  docs/results.md).

Conventions are :mod:`mambamorph.nn.spatial`'s: a displacement ``u`` ``(3, D0, D1, D2)`` in
voxels, channel ``i`` along array axis ``i``; the image is sampled at ``x + u(x)``. Padding:

- ``zeros``: a corner outside the volume reads 0 (and contributes no gradient);
- ``border``: each coordinate is first clamped to ``[0, D - 1]``; the gradient of a clamped
  coordinate is 0, with the volume's boundary itself counted as outside, as torch does.

A position that is not finite samples 0 with gradient 0. Results equal ``grid_sample``'s to
float rounding (``tests/test_spatial.py``). Kernels are compiled on first use and cached.

:func:`warp_ssd_cpu` fuses the warp with the squared difference to a reference image summed over
channels (the MIND-SSD of instance optimisation, via
:func:`mambamorph.similarity.warped_mind_ssd_loss`): value and gradient in one pass per voxel,
without storing the warped image. Both kernels share the position (:func:`_position`) and corner
(:func:`mambamorph.nn.trilinear_cpu.corners`) code.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange

from mambamorph.nn.squaring_cpu import torch_thread_count
from mambamorph.nn.trilinear_cpu import corners as _corners

__all__ = ["warp_cpu", "warp_ssd_cpu", "points_ssd_cpu", "supports"]


@njit(inline="always", cache=True, error_model="numpy")
def _position(u, x0, x1, x2, border, absolute, n0, n1, n2):  # pragma: no cover - compiled
    """The sampling position of voxel ``x``: ``x + u[:, x]``, or ``u[:, x]`` itself when
    ``absolute``; and the gradient factor of each coordinate (0 where border padding clamps it);
    ``inside`` is False when no corner lies in the volume (or the position is not finite): the
    sample is then 0 with gradient 0."""
    p0 = u[0, x0, x1, x2] if absolute else x0 + u[0, x0, x1, x2]
    p1 = u[1, x0, x1, x2] if absolute else x1 + u[1, x0, x1, x2]
    p2 = u[2, x0, x1, x2] if absolute else x2 + u[2, x0, x1, x2]
    k0 = 1.0
    k1 = 1.0
    k2 = 1.0
    finite = math.isfinite(p0) and math.isfinite(p1) and math.isfinite(p2)
    if border and finite:
        if p0 <= 0.0 or p0 >= n0 - 1:
            k0 = 0.0
            p0 = min(max(p0, 0.0), n0 - 1.0)
        if p1 <= 0.0 or p1 >= n1 - 1:
            k1 = 0.0
            p1 = min(max(p1, 0.0), n1 - 1.0)
        if p2 <= 0.0 or p2 >= n2 - 1:
            k2 = 0.0
            p2 = min(max(p2, 0.0), n2 - 1.0)
    inside = finite and -1.0 < p0 < n0 and -1.0 < p1 < n1 and -1.0 < p2 < n2
    return p0, p1, p2, k0, k1, k2, inside


@njit(parallel=True, cache=True, error_model="numpy")
def _sample(img, u, border, out, gout, gu):  # pragma: no cover - compiled; tested via warp_cpu
    """Forward (``gout`` of size 0): ``out[x, c] = img(x + u[:, x])[c]``. Backward (``gout``
    ``(D0, D1, D2, C)``): ``gu[k, x] = sum_c gout[x, c] * d img(x + u[:, x])[c] / d u_k``.

    ``img`` ``(D0, D1, D2, C)``, ``u`` and ``gu`` ``(3, D0, D1, D2)``, ``out`` ``(D0, D1, D2, C)``
    (size 0 in backward); every axis has at least two voxels.
    """
    n0, n1, n2, nc = img.shape
    backward = gout.size > 0
    for x0 in prange(n0):
        for x1 in range(n1):
            for x2 in range(n2):
                p0, p1, p2, k0, k1, k2, inside = _position(u, x0, x1, x2, border, False,
                                                           n0, n1, n2)
                if backward:
                    g0 = g1 = g2 = 0.0
                    if inside:
                        g0, g1, g2 = _corners(img, p0, p1, p2, gout[x0, x1, x2], True)
                    gu[0, x0, x1, x2] = g0 * k0
                    gu[1, x0, x1, x2] = g1 * k1
                    gu[2, x0, x1, x2] = g2 * k2
                elif inside:
                    _corners(img, p0, p1, p2, out[x0, x1, x2], False)
                else:
                    for c in range(nc):
                        out[x0, x1, x2, c] = 0.0


@njit(inline="always", cache=True, error_model="numpy")
def _ssd_interior(img, ref, x0, x1, x2, p0, p1, p2):  # pragma: no cover - compiled
    """Squared difference at a position whose eight corners all lie in the volume
    (``0 <= p_k < n_k - 1``): ``(cost, g0, g1, g2)`` with ``cost = sum_c (img(p)[c] -
    ref[x, c])**2`` and ``g_k = d cost / d p_k``. One pass over the channels reads each corner
    value once and forms the sample and its three partial derivatives together (the general
    path, :func:`~mambamorph.nn.trilinear_cpu.corners`, reads the corners twice, with bounds
    checks), in ``img``'s dtype."""
    i0 = int(p0)
    i1 = int(p1)
    i2 = int(p2)
    zero = img[0, 0, 0, 0] * 0
    t0 = zero + (p0 - i0)
    t1 = zero + (p1 - i1)
    t2 = zero + (p2 - i2)
    r0 = 1 - t0
    r1 = 1 - t1
    r2 = 1 - t2
    acc = zero
    g0 = zero
    g1 = zero
    g2 = zero
    for c in range(img.shape[3]):
        v000 = img[i0, i1, i2, c]
        v001 = img[i0, i1, i2 + 1, c]
        v010 = img[i0, i1 + 1, i2, c]
        v011 = img[i0, i1 + 1, i2 + 1, c]
        v100 = img[i0 + 1, i1, i2, c]
        v101 = img[i0 + 1, i1, i2 + 1, c]
        v110 = img[i0 + 1, i1 + 1, i2, c]
        v111 = img[i0 + 1, i1 + 1, i2 + 1, c]
        a00 = v000 * r2 + v001 * t2  # along axis 2: values ...
        a01 = v010 * r2 + v011 * t2
        a10 = v100 * r2 + v101 * t2
        a11 = v110 * r2 + v111 * t2
        b00 = v001 - v000  # ... and their derivatives along axis 2
        b01 = v011 - v010
        b10 = v101 - v100
        b11 = v111 - v110
        c0 = a00 * r1 + a01 * t1  # along axis 1
        c1 = a10 * r1 + a11 * t1
        e0 = a01 - a00
        e1 = a11 - a10
        f0 = b00 * r1 + b01 * t1
        f1 = b10 * r1 + b11 * t1
        d = c0 * r0 + c1 * t0 - ref[x0, x1, x2, c]  # along axis 0
        acc += d * d
        g0 += d * (c1 - c0)
        g1 += d * (e0 * r0 + e1 * t0)
        g2 += d * (f0 * r0 + f1 * t0)
    return acc, 2 * g0, 2 * g1, 2 * g2


@njit(parallel=True, cache=True, error_model="numpy",
      fastmath={"reassoc", "contract", "nsz", "arcp"})
def _ssd(img, ref, u, border, absolute, cost, gu):  # pragma: no cover - compiled; tested
    """Fused sampling and squared difference: ``cost[x] = sum_c (img(p(x))[c] - ref[x, c])**2``
    with ``p(x) = x + u[:, x]`` (a warp, ``E = D``) or ``u[:, x]`` itself when ``absolute``
    (chosen points), and its gradient ``gu[k, x] = d cost[x] / d u_k``, in one pass (the
    sampled image is never stored). ``img`` ``(D0, D1, D2, C)``; ``ref`` ``(E0, E1, E2, C)``,
    ``u``, ``gu`` ``(3, E0, E1, E2)``, ``cost`` ``(E0, E1, E2)``."""
    n0, n1, n2, nc = img.shape
    m0, m1, m2 = cost.shape
    for x0 in prange(m0):
        vec = np.empty(nc, dtype=img.dtype)
        for x1 in range(m1):
            for x2 in range(m2):
                p0, p1, p2, k0, k1, k2, inside = _position(u, x0, x1, x2, border, absolute,
                                                           n0, n1, n2)
                if (inside and k0 * k1 * k2 == 1.0 and 0.0 <= p0 < n0 - 1
                        and 0.0 <= p1 < n1 - 1 and 0.0 <= p2 < n2 - 1):
                    acc, g0, g1, g2 = _ssd_interior(img, ref, x0, x1, x2, p0, p1, p2)
                    cost[x0, x1, x2] = acc
                    gu[0, x0, x1, x2] = g0
                    gu[1, x0, x1, x2] = g1
                    gu[2, x0, x1, x2] = g2
                    continue
                if inside:
                    _corners(img, p0, p1, p2, vec, False)
                else:
                    for c in range(nc):
                        vec[c] = 0.0
                acc = 0.0
                for c in range(nc):
                    d = vec[c] - ref[x0, x1, x2, c]
                    acc += d * d
                    vec[c] = 2.0 * d  # d cost / d sample_c
                cost[x0, x1, x2] = acc
                g0 = g1 = g2 = 0.0
                if inside:
                    g0, g1, g2 = _corners(img, p0, p1, p2, vec, True)
                gu[0, x0, x1, x2] = g0 * k0
                gu[1, x0, x1, x2] = g1 * k1
                gu[2, x0, x1, x2] = g2 * k2


def supports(image: torch.Tensor, flow: torch.Tensor, mode: str, padding_mode: str) -> bool:
    """Whether :func:`warp_cpu` applies: CPU tensors, float32/float64 of one dtype, trilinear
    sampling with zero or border padding, an image that needs no gradient, every spatial axis
    of at least two voxels."""
    return (image.device.type == "cpu" and flow.device.type == "cpu"
            and mode == "bilinear" and padding_mode in ("zeros", "border")
            and image.dtype == flow.dtype and image.dtype in (torch.float32, torch.float64)
            and not image.requires_grad and min(image.shape[2:]) >= 2)


class _Warp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image_cl, flow, border):  # image_cl (Bi, D0, D1, D2, C), flow (Bf, 3, ...)
        u = flow.detach().contiguous()
        batch = max(image_cl.shape[0], u.shape[0])  # a batch of 1 broadcasts
        out = image_cl.new_empty((batch, *image_cl.shape[1:]))
        empty = np.zeros((0, 0, 0, 0), dtype=out.numpy().dtype)
        with torch_thread_count():
            for b in range(batch):
                _sample(_item(image_cl, b), _item(u, b), border, out[b].numpy(), empty, empty)
        ctx.save_for_backward(image_cl, u)
        ctx.border = border
        return out

    @staticmethod
    def backward(ctx, grad_out):
        image_cl, u = ctx.saved_tensors
        gout = grad_out.contiguous()
        batch = gout.shape[0]
        gu = u.new_empty((batch, *u.shape[1:]))
        empty = np.zeros((0, 0, 0, 0), dtype=gu.numpy().dtype)
        with torch_thread_count():
            for b in range(batch):
                _sample(_item(image_cl, b), _item(u, b), ctx.border, empty, gout[b].numpy(),
                        gu[b].numpy())
        if u.shape[0] == 1 and batch > 1:  # the flow was broadcast: sum its gradients
            gu = gu.sum(dim=0, keepdim=True)
        return None, gu, None


def _channels_last(image: torch.Tensor) -> torch.Tensor:
    """``(B, C, D0, D1, D2)`` -> a ``(B, D0, D1, D2, C)`` contiguous view (free when the image
    is already in channels-last memory), detached: the kernels' layout."""
    return image.detach().permute(0, 2, 3, 4, 1).contiguous()


def _item(t: torch.Tensor, b: int) -> np.ndarray:
    """Sample ``b`` of a batch as a numpy view (a batch of 1 serves every sample)."""
    return t[b if t.shape[0] > 1 else 0].numpy()


def warp_cpu(image: torch.Tensor, flow: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """``out(x) = image(x + flow(x))``, trilinear, differentiable with respect to ``flow`` only.

    Args:
        image: ``(B, C, D0, D1, D2)`` float32 or float64 on the CPU, no gradient (see
            :func:`supports`); channels-last memory avoids one copy.
        flow: ``(B, 3, D0, D1, D2)`` displacement in voxels, same dtype and batch.
        padding_mode: ``"zeros"`` or ``"border"`` (see the module docstring).
    Returns:
        ``(B, C, D0, D1, D2)`` in ``image``'s dtype, channels-last memory.
    """
    out = _Warp.apply(_channels_last(image), flow, padding_mode == "border")
    return out.permute(0, 4, 1, 2, 3)


class _WarpSSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image_cl, ref_cl, flow, border, absolute):  # (B, ..., C) x2, (B, 3, ...)
        u = flow.detach().contiguous()
        batch = max(image_cl.shape[0], ref_cl.shape[0], u.shape[0])
        cost = u.new_empty((batch, 1, *u.shape[2:]))
        gu = u.new_empty((batch, *u.shape[1:]))
        with torch_thread_count():
            for b in range(batch):
                _ssd(_item(image_cl, b), _item(ref_cl, b), _item(u, b), border, absolute,
                     cost[b, 0].numpy(), gu[b].numpy())
        ctx.save_for_backward(gu)
        ctx.flow_batch = u.shape[0]
        return cost

    @staticmethod
    def backward(ctx, grad_cost):
        (gu,) = ctx.saved_tensors
        g = grad_cost * gu  # (B, 1, ...) x (B, 3, ...)
        if ctx.flow_batch == 1 and g.shape[0] > 1:
            g = g.sum(dim=0, keepdim=True)
        return None, None, g, None, None


def warp_ssd_cpu(image: torch.Tensor, reference: torch.Tensor, flow: torch.Tensor,
                 padding_mode: str = "zeros") -> torch.Tensor:
    """``cost(x) = sum_c (image(x + flow(x))[c] - reference(x)[c])**2``, fused: the same as
    ``(warp_cpu(image, flow) - reference).square().sum(1, keepdim=True)`` (to float rounding)
    without storing the warped image, differentiable with respect to ``flow`` only.

    Its gradient is computed with the cost (one pass over the corners per voxel), so a call
    costs about what ``warp_cpu``'s forward and backward cost together, and none of the
    subtraction, squaring and reduction passes over ``C`` channels that torch would make.

    Args:
        image: ``(B, C, D0, D1, D2)`` float32 or float64 on the CPU, no gradient (see
            :func:`supports`), e.g. the moving image's MIND descriptors.
        reference: same shape and dtype, no gradient (e.g. the fixed image's descriptors).
        flow: ``(B, 3, D0, D1, D2)`` displacement in voxels, same dtype.
        padding_mode: ``"zeros"`` or ``"border"`` (see the module docstring).
    Returns:
        ``(B, 1, D0, D1, D2)`` cost per voxel in squared image units.
    """
    return _WarpSSD.apply(_channels_last(image), _channels_last(reference), flow,
                          padding_mode == "border", False)


def points_ssd_cpu(image: torch.Tensor, reference: torch.Tensor,
                   points: torch.Tensor) -> torch.Tensor:
    """``cost(y) = sum_c (image(points(y))[c] - reference(y)[c])**2`` at chosen points, border
    padding, fused as :func:`warp_ssd_cpu`; differentiable with respect to ``points`` only.

    Args:
        image: ``(B, C, D0, D1, D2)`` float32 or float64 on the CPU, no gradient.
        reference: ``(B, C, E0, E1, E2)``, same dtype, no gradient: the values to compare with
            at each point (e.g. the fixed descriptors at a sub-lattice of their grid).
        points: ``(B, 3, E0, E1, E2)`` absolute positions in ``image`` voxels (channel ``i``
            along array axis ``i``), same dtype.
    Returns:
        ``(B, 1, E0, E1, E2)`` cost per point.
    """
    return _WarpSSD.apply(_channels_last(image), _channels_last(reference), points, True, True)
