"""Scaling and squaring on the CPU without autograd: one numba kernel per squaring step.

:func:`mambamorph.nn.spatial.integrate_velocity` calls :func:`square_cpu` for each of its
squarings when the field is on the CPU and no gradient is needed (inference: ``predict``,
``register``, ``evaluate``). A step is ``u <- u + u o (id + u)``: the same computation as
``u + warp(u, u)`` (trilinear, zero padding, ``align_corners=True``), but

- in voxel units directly, with no sampling grid to build (``grid_sample`` needs an
  ``(B, D0, D1, D2, 3)`` grid of normalised, axis-reversed coordinates each step);
- on a channels-last field, so the three components of a corner are one cache line;
- without torch's generic 3D sampler, which loops over channels with bounds checks per
  corner: at 176x208x192 a step took 0.5-0.7 s there on 2 cores, and the 7 steps of a
  ``mambamorph`` pass were its largest cost (docs/results.md, "Faster CPU inference").

Results equal ``grid_sample``'s to float rounding (test: ``tests/test_spatial.py``). The kernel
is compiled on first use and cached next to this file (or under ``NUMBA_CACHE_DIR``), as the
selective scan's kernels are.
"""

from __future__ import annotations

import contextlib
import math

import numba
import numpy as np
import torch
from numba import njit, prange

from mambamorph.nn.trilinear_cpu import corners, scatter_corners

__all__ = ["square_cpu", "torch_thread_count"]


@njit(parallel=True, cache=True, error_model="numpy")
def _square(u, out, zero):  # pragma: no cover - compiled; tested through square_cpu
    """``out[x] = u[x] + trilinear(u, x + u[x])`` with zero padding.

    ``u``, ``out``: ``(D0, D1, D2, 3)`` C-contiguous arrays, channel ``i`` the displacement along
    array axis ``i`` in voxels; ``zero``: 0 in their dtype (the type of the sums). A corner
    outside the volume contributes zero (``grid_sample``'s ``padding_mode="zeros"``); a
    position that is not finite samples zero; along an axis of one voxel every position reads
    that voxel (as ``grid_sample`` with ``align_corners=True``).
    """
    n0, n1, n2 = u.shape[0], u.shape[1], u.shape[2]
    for x0 in prange(n0):
        for x1 in range(n1):
            for x2 in range(n2):
                a0 = u[x0, x1, x2, 0]
                a1 = u[x0, x1, x2, 1]
                a2 = u[x0, x1, x2, 2]
                # an axis of one voxel samples that voxel whatever the displacement along it
                # (grid_sample's align_corners=True unnormalisation multiplies by n - 1 = 0)
                p0 = x0 + a0 if n0 > 1 else 0.0
                p1 = x1 + a1 if n1 > 1 else 0.0
                p2 = x2 + a2 if n2 > 1 else 0.0
                s0 = zero
                s1 = zero
                s2 = zero
                # every corner is outside (or the position is NaN / inf): the sample is zero
                if 0.0 <= p0 < n0 - 1 and 0.0 <= p1 < n1 - 1 and 0.0 <= p2 < n2 - 1:
                    # all eight corners inside (almost every voxel): no bounds checks
                    i0 = int(p0)
                    i1 = int(p1)
                    i2 = int(p2)
                    t0 = p0 - i0
                    t1 = p1 - i1
                    t2 = p2 - i2
                    r0 = 1.0 - t0
                    r1 = 1.0 - t1
                    r2 = 1.0 - t2
                    w00 = r0 * r1
                    w01 = r0 * t1
                    w10 = t0 * r1
                    w11 = t0 * t1
                    for ch in range(3):
                        c00 = u[i0, i1, i2, ch] * r2 + u[i0, i1, i2 + 1, ch] * t2
                        c01 = u[i0, i1 + 1, i2, ch] * r2 + u[i0, i1 + 1, i2 + 1, ch] * t2
                        c10 = u[i0 + 1, i1, i2, ch] * r2 + u[i0 + 1, i1, i2 + 1, ch] * t2
                        c11 = u[i0 + 1, i1 + 1, i2, ch] * r2 + u[i0 + 1, i1 + 1, i2 + 1, ch] * t2
                        val = w00 * c00 + w01 * c01 + w10 * c10 + w11 * c11
                        if ch == 0:
                            s0 = val
                        elif ch == 1:
                            s1 = val
                        else:
                            s2 = val
                elif -1.0 < p0 < n0 and -1.0 < p1 < n1 and -1.0 < p2 < n2:
                    f0 = math.floor(p0)
                    f1 = math.floor(p1)
                    f2 = math.floor(p2)
                    t0 = p0 - f0
                    t1 = p1 - f1
                    t2 = p2 - f2
                    i0 = int(f0)
                    i1 = int(f1)
                    i2 = int(f2)
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
                                s0 += w * u[j0, j1, j2, 0]
                                s1 += w * u[j0, j1, j2, 1]
                                s2 += w * u[j0, j1, j2, 2]
                out[x0, x1, x2, 0] = a0 + s0
                out[x0, x1, x2, 1] = a1 + s1
                out[x0, x1, x2, 2] = a2 + s2


@njit(parallel=True, cache=True, error_model="numpy")
def _square_backward(u, g_out, parts):  # pragma: no cover - compiled; tested via SquareSteps
    """Backward of one :func:`_square` step: ``parts[t]`` accumulates, for the voxels of
    chunk ``t`` of the first axis, the gradient of ``sum(g_out * out)`` with respect to ``u``;
    the caller sums ``parts`` over ``t`` (each chunk scatters into its own buffer: no two
    threads write one address, and with a fixed number of chunks the result does not depend
    on the thread count).

    ``out[x] = u[x] + sum_c w_c(p) u[c]`` with ``p = x + u[x]`` gives three terms per voxel:
    ``g_out[x]`` itself; ``w_c(p) g_out[x]`` scattered to each corner ``c`` inside the volume;
    and, along each axis ``j`` of more than one voxel, ``sum_i g_out[x, i] d/dp_j sample_i(p)``
    at ``x`` (the position's gradient; a zero-padded corner contributes nothing to either).
    ``u``, ``g_out``: ``(D0, D1, D2, 3)``; ``parts``: ``(T, D0, D1, D2, 3)`` of zeros.
    """
    n0, n1, n2 = u.shape[0], u.shape[1], u.shape[2]
    nt = parts.shape[0]
    chunk = (n0 + nt - 1) // nt
    for t in prange(nt):
        acc = parts[t]
        for x0 in range(t * chunk, min(n0, (t + 1) * chunk)):
            for x1 in range(n1):
                for x2 in range(n2):
                    g = g_out[x0, x1, x2]
                    for c in range(3):
                        acc[x0, x1, x2, c] += g[c]
                    p0 = x0 + u[x0, x1, x2, 0] if n0 > 1 else 0.0
                    p1 = x1 + u[x0, x1, x2, 1] if n1 > 1 else 0.0
                    p2 = x2 + u[x0, x1, x2, 2] if n2 > 1 else 0.0
                    if not (-1.0 < p0 < n0 and -1.0 < p1 < n1 and -1.0 < p2 < n2):
                        continue  # every corner outside, or a non-finite position
                    scatter_corners(acc, p0, p1, p2, g)
                    dp0, dp1, dp2 = corners(u, p0, p1, p2, g, True)
                    if n0 > 1:
                        acc[x0, x1, x2, 0] += dp0
                    if n1 > 1:
                        acc[x0, x1, x2, 1] += dp1
                    if n2 > 1:
                        acc[x0, x1, x2, 2] += dp2


@contextlib.contextmanager
def torch_thread_count():
    """numba's parallel kernels run on as many threads as torch's CPU ops (at most numba's
    own count) inside the block: ``mambamorph --threads`` and ``torch.set_num_threads`` hold
    for the kernels of this package too. numba's count is per calling thread."""
    saved = numba.get_num_threads()
    numba.set_num_threads(max(1, min(saved, torch.get_num_threads())))
    try:
        yield
    finally:
        numba.set_num_threads(saved)


def square_cpu(disp: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` squarings ``u <- u + warp(u, u)`` of a CPU field, without autograd.

    Args:
        disp: ``(B, 3, D0, D1, D2)`` float32 or float64 displacement in voxels on the CPU (the
            velocity already divided by ``2**steps``).
        steps: number of squarings, >= 0.
    Returns:
        ``(B, 3, D0, D1, D2)`` displacement in voxels, ``disp``'s dtype, in channels-last memory
        (its values do not depend on the layout).
    """
    if steps == 0:
        return disp
    a = disp.detach().permute(0, 2, 3, 4, 1).contiguous()  # (B, D0, D1, D2, 3)
    b = torch.empty_like(a)
    zero = np.zeros((), dtype=a.numpy().dtype)[()]
    with torch_thread_count():
        for _ in range(int(steps)):
            for i in range(a.shape[0]):
                _square(a[i].numpy(), b[i].numpy(), zero)
            a, b = b, a
    return a.permute(0, 4, 1, 2, 3)


#: chunks of the first axis the backward scatters into separate buffers (then summed in
#: order): up to this many threads share it, and its result is the same for any thread count
#: (a training run resumed on another count must reproduce the same weights)
_BACKWARD_CHUNKS = 4


class SquareSteps(torch.autograd.Function):
    """``steps`` squarings of a CPU field with a gradient: the :func:`_square` kernel forward
    (each step's input kept) and :func:`_square_backward` backward, the same values and
    gradients as ``grid_sample``'s squarings to float rounding (``tests/test_spatial.py``) at
    a fraction of their cost on small grids (instance optimisation's control grids: 24x28x24,
    5 steps, forward + backward 28 ms with ``grid_sample``, docs/results.md).

    ``SquareSteps.apply(disp, steps)``: ``disp`` ``(B, 3, D0, D1, D2)`` float32 or float64
    displacement in voxels (the velocity divided by ``2**steps``), ``steps >= 1``; returns the
    ``(B, 3, D0, D1, D2)`` displacement in channels-last memory.
    """

    @staticmethod
    def forward(ctx, disp, steps):  # noqa: D102 - documented on the class
        a = disp.detach().permute(0, 2, 3, 4, 1).contiguous()  # (B, D0, D1, D2, 3)
        zero = np.zeros((), dtype=a.numpy().dtype)[()]
        kept = []
        with torch_thread_count():
            for _ in range(int(steps)):
                b = torch.empty_like(a)
                for i in range(a.shape[0]):
                    _square(a[i].numpy(), b[i].numpy(), zero)
                kept.append(a)
                a = b
        ctx.save_for_backward(*kept)
        return a.permute(0, 4, 1, 2, 3)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102 - documented on the class
        g = grad.permute(0, 2, 3, 4, 1).contiguous()
        with torch_thread_count():
            for a in reversed(ctx.saved_tensors):
                parts = torch.zeros((_BACKWARD_CHUNKS, *a.shape[1:]), dtype=a.dtype)
                out = torch.empty_like(g)
                for i in range(a.shape[0]):
                    parts.zero_()
                    _square_backward(a[i].numpy(), g[i].numpy(), parts.numpy())
                    torch.sum(parts, dim=0, out=out[i])
                g = out
        return g.permute(0, 4, 1, 2, 3), None
