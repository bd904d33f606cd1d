"""Fast selective scan on the CPU: numba kernels for the forward and the backward pass.

Design (figures: docs/results.md and ``mambamorph.benchmarks.scan``):

- **Parallelism.** Time is cut into chunks of ``K`` steps (default 128) and the chunks into
  parallel regions of about 2048 steps. In a region the channels are split into ``G`` groups
  (``G`` = numba's thread count), one ``prange`` iteration per group; a group runs its channels
  one after the other through the region's chunks, so the slices of ``B`` and ``C`` a region
  reads (2 x 2048 x 16 values) stay in the core's L2 cache while all channels pass over them.
  Regions are few because each ends in a barrier, which on a loaded machine waits for a
  descheduled thread.
- **Vectorisation.** Inside a chunk the loop over the ``N`` states is the inner loop, written so
  LLVM turns it into SIMD code (the notes above the kernels list what that takes): ``exp`` is a
  branch-free float32 implementation (Cephes polynomial, two exact power-of-two scalings, at
  most 1.4 ulp over the whole float32 range, denormals included) because numba's ``math.exp``
  is a scalar libm call; fused multiply-adds are written out (:func:`_fma`) rather than left to
  fastmath. The sums over ``N`` (``y_t = C_t . h_t`` and the two dot
  products of the backward pass) and the per-chunk sums for ``dD`` and ``d delta_bias`` go
  through :func:`_hsum` / :func:`_hdot`, the only functions compiled with ``reassoc`` so that
  LLVM may add their terms as a tree; every other operation follows IEEE order (``fastmath``
  off).
- **Memory: checkpoints, not states.** The forward pass keeps the state ``h`` only at the start of
  every chunk: ``(B, E, ceil(L/K), N)`` values instead of ``(B, E, L, N)``. The backward pass walks the chunks in reverse; for each chunk it
  recomputes the states (and the decays ``exp(d A)``) from that chunk's checkpoint into a
  ``K x N`` workspace, then runs the reverse-time recurrence of ``dL/dh`` through it. The cost
  is one extra forward pass inside the backward; recomputing from the start of the sequence
  instead would be quadratic in ``L``.
- **Shared B and C.** Their gradients are sums over the channels. Each group adds into its own
  partial buffer for the current region (``2048 x N``); the partials are summed once the region
  is done. There are no atomics and no races, and for a given thread count the result does not
  depend on thread timing.
- **Small inputs** (under :data:`MIN_STEPS_PER_THREAD` channel-steps per thread) run on fewer
  threads, down to one: waking idle workers costs more than such a call.
- **Precision.** Float32 inputs are computed in float32 (as mamba's CUDA kernel does), except that
  the long reductions over ``B x L`` (the gradients of ``A``, ``D`` and ``delta_bias``)
  accumulate in float64 across chunks. Float64 inputs are computed in float64 throughout
  (``math.exp``, ``math.log1p``, scalar). Against the sequential float32 reference, outputs and
  gradients agree to a relative error (``||a - b|| / ||b||``) of about 5e-7.
- ``delta_bias``, the softplus (a vectorisable float32 version: ``log1p`` by an atanh series),
  ``D`` and the gate ``z`` are fused into the kernels: no ``(B, E, L)`` temporaries besides the
  output.

The first call compiles the kernels; ``cache=True`` stores them next to this file (or under
``NUMBA_CACHE_DIR``), so later processes only load them.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, prange

from mambamorph.nn.ssm.cpu_math import (_ONE, _ZERO, _exp, _fma, _hdot, _hsum, _softplus,
                                        _softplus_grad)
from mambamorph.nn.ssm.reference import compute_dtype

__all__ = ["selective_scan_cpu", "DEFAULT_CHUNK", "warm_up"]

DEFAULT_CHUNK = 128
"""Time steps per chunk: the checkpoint spacing of the forward pass and the size of the
workspace the backward pass recomputes (64, 128 and 256 timed within noise of each other)."""

REGION_STEPS = 2048
"""Time steps per parallel region: few barriers, while the slices of B and C one region reads
(2 x 2048 x N values) still fit in a core's L2 cache."""

# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
# Notes on writing loops that LLVM vectorises (each measured on this code):
# - error_model="numpy": with numba's default ("python"), every float division checks for zero
#   to raise ZeroDivisionError, and a loop containing that branch stays scalar (the sigmoid of
#   the gate ran 15x slower).
# - index with loop variables into views (u[b, e, t0:t0 + T], a (T, N) block of B, ...) rather
#   than with computed offsets such as t0 + t: numba wraps negative indices, and for a computed
#   index that check stays in the loop and blocks vectorisation (2x on the flat loops).
# - few arrays per loop: LLVM checks at run time that the arrays of a loop do not overlap, and
#   gives up beyond a handful; so the per-step work is split into several short loops.
# - keep a running state in its own small array; reading row t and writing row t+1 of one
#   workspace in the same loop is read as a possible overlap (8x slower).


@njit(parallel=True, cache=True, fastmath=False, error_model="numpy")
def _scan_fwd_kernel(u, dlt, bias, softplus, A, Bt, Ct, Dv, z, has_z, K, M, G, out, ckpt):
    """Forward scan.

    u, dlt, z: (Bn, E, L) (z unused unless has_z); bias: (E,) added to dlt, then softplus if
    ``softplus``; A: (E, N); Bt, Ct: (Bn, L, N) (time-major); Dv: (E,) (zeros when no D);
    K: steps per chunk; M: chunks per parallel region; G: channel groups (parallel iterations);
    out: (Bn, E, L) written; ckpt: (Bn, E, nC, N) written with the state before each chunk.
    """
    Bn, E, L = u.shape
    N = A.shape[1]
    nC = ckpt.shape[2]
    nS = (nC + M - 1) // M
    dt = u.dtype
    wsd = np.empty((G, 3, K), dt)  # per group: d, d * u, silu(z)
    wsp = np.empty((G, K, N), dt)  # per group: C_t * h_t
    wsh = np.empty((G, N), dt)  # per group: running state
    for b in range(Bn):
        for s in range(nS):
            c_lo = s * M
            c_hi = min(nC, c_lo + M)
            for g in prange(G):
                wd = wsd[g, 0]
                wx = wsd[g, 1]
                wz = wsd[g, 2]
                wp = wsp[g]
                h = wsh[g]
                for e in range(g, E, G):
                    dd = Dv[e]
                    be = bias[e]
                    a_row = A[e]
                    if c_lo == 0:
                        for n in range(N):
                            h[n] = _ZERO
                    else:
                        for n in range(N):
                            h[n] = ckpt[b, e, c_lo, n]
                    for c in range(c_lo, c_hi):
                        for n in range(N):
                            ckpt[b, e, c, n] = h[n]
                        t0 = c * K
                        t1 = min(L, t0 + K)
                        T = t1 - t0
                        u_r = u[b, e, t0:t1]
                        d_r = dlt[b, e, t0:t1]
                        o_r = out[b, e, t0:t1]
                        B2 = Bt[b, t0:t1]
                        C2 = Ct[b, t0:t1]
                        for t in range(T):
                            wd[t] = d_r[t] + be
                        if softplus:
                            for t in range(T):
                                wd[t] = _softplus(wd[t])
                        for t in range(T):
                            wx[t] = wd[t] * u_r[t]
                        for t in range(T):
                            d = wd[t]
                            x = wx[t]
                            for n in range(N):
                                hn = _fma(_exp(d * a_row[n]), h[n], x * B2[t, n])
                                h[n] = hn
                                wp[t, n] = hn * C2[t, n]
                        if has_z:
                            z_r = z[b, e, t0:t1]
                            for t in range(T):
                                zz = z_r[t]
                                wz[t] = zz / (_ONE + _exp(-zz))
                        for t in range(T):
                            y = _hsum(wp[t], N) + dd * u_r[t]
                            if has_z:
                                y = y * wz[t]
                            o_r[t] = y
                    if c_hi < nC:
                        for n in range(N):
                            ckpt[b, e, c_hi, n] = h[n]


@njit(parallel=True, cache=True, fastmath=False, error_model="numpy")
def _scan_bwd_kernel(u, dlt, bias, softplus, A, Bt, Ct, Dv, z, has_z, K, M, G, ckpt, gout,
                     du, ddlt, dz, dBt, dCt, dA_acc, dD_acc, dbias_acc):
    """Backward scan: recompute each chunk from its checkpoint, then run dL/dh backwards.

    Inputs as in the forward kernel plus ckpt (Bn, E, nC, N) and gout = dL/dout (Bn, E, L).
    Writes du, ddlt, dz (if has_z): (Bn, E, L); dBt, dCt: (Bn, L, N); adds to dA_acc: (Bn, E, N),
    dD_acc and dbias_acc: (Bn, E) (float64).
    """
    Bn, E, L = u.shape
    N = A.shape[1]
    nC = ckpt.shape[2]
    nS = (nC + M - 1) // M
    dt = u.dtype
    wsd = np.empty((G, 6, K), dt)  # per group: d, d * u, dL/dy, y_t before the gate,
    #                                sigmoid(z), softplus'(delta + bias)
    wsa = np.empty((G, K * N), dt)  # decays exp(d A), later dL/d(d A); (t, n) flat
    wsh = np.empty((G, (K + 1) * N), dt)  # states: row 0 = state before the chunk, row t+1 = h_t
    wsg = np.empty((G, K * N), dt)  # C_t * h_t, later dL/dh_t
    wsc = np.empty((G, N), dt)  # running dL/dh carried to the previous step
    wsr = np.empty((G, N), dt)  # running state of the recomputation
    wacc = np.empty((G, N), np.float64)  # dA accumulator of one (b, e)
    pB = np.empty((G, M * K * N), dt)  # per-group partial sums over channels, one region
    pC = np.empty((G, M * K * N), dt)
    carry = np.zeros((Bn, E, N), dt)  # dL/dh before the region processed last, times its decay
    for b in range(Bn):
        for s in range(nS - 1, -1, -1):
            c_lo = s * M
            c_hi = min(nC, c_lo + M)
            r0 = c_lo * K
            R = min(L, c_hi * K) - r0
            for g in prange(G):
                wd = wsd[g, 0]
                wx = wsd[g, 1]
                wy = wsd[g, 2]
                wz = wsd[g, 3]
                ws = wsd[g, 4]
                wq = wsd[g, 5]
                wa_f = wsa[g]
                wa = wa_f.reshape((K, N))
                wh_f = wsh[g]
                wh = wh_f.reshape((K + 1, N))
                wg_f = wsg[g]
                wg = wg_f.reshape((K, N))
                dh = wsc[g]
                h = wsr[g]
                acc = wacc[g]
                gB_f = pB[g]
                gC_f = pC[g]
                gB = gB_f.reshape((M * K, N))
                gC = gC_f.reshape((M * K, N))
                for i in range(R * N):
                    gB_f[i] = _ZERO
                    gC_f[i] = _ZERO
                for e in range(g, E, G):
                    dd = Dv[e]
                    be = bias[e]
                    a_row = A[e]
                    for n in range(N):
                        dh[n] = carry[b, e, n]
                    for c in range(c_hi - 1, c_lo - 1, -1):
                        t0 = c * K
                        t1 = min(L, t0 + K)
                        T = t1 - t0
                        TN = T * N
                        u_r = u[b, e, t0:t1]
                        d_r = dlt[b, e, t0:t1]
                        g_r = gout[b, e, t0:t1]
                        du_r = du[b, e, t0:t1]
                        dd_r = ddlt[b, e, t0:t1]
                        B2 = Bt[b, t0:t1]
                        C2 = Ct[b, t0:t1]
                        C_f = C2.reshape(TN)
                        h1 = wh[1:T + 1]  # h_t
                        h1_f = wh_f[N:N + TN]
                        gBc = gB[t0 - r0:t1 - r0]
                        gCc = gC[t0 - r0:t1 - r0]
                        # -- recompute the chunk from its checkpoint
                        for n in range(N):
                            h[n] = ckpt[b, e, c, n]
                            wh[0, n] = h[n]
                        for t in range(T):
                            wd[t] = d_r[t] + be
                        if softplus:
                            for t in range(T):
                                wq[t] = _softplus_grad(wd[t])
                            for t in range(T):
                                wd[t] = _softplus(wd[t])
                        for t in range(T):
                            wx[t] = wd[t] * u_r[t]
                        for t in range(T):
                            d = wd[t]
                            for n in range(N):
                                wa[t, n] = _exp(d * a_row[n])
                        for t in range(T):
                            x = wx[t]
                            for n in range(N):
                                hn = _fma(wa[t, n], h[n], x * B2[t, n])
                                h[n] = hn
                                h1[t, n] = hn
                        # -- gradient at y (through the gate and the skip)
                        if has_z:
                            z_r = z[b, e, t0:t1]
                            dz_r = dz[b, e, t0:t1]
                            for i in range(TN):
                                wg_f[i] = h1_f[i] * C_f[i]
                            for t in range(T):
                                wz[t] = _hsum(wg[t], N) + dd * u_r[t]  # y_t before the gate
                            for t in range(T):
                                ws[t] = _ONE / (_ONE + _exp(-z_r[t]))  # sigmoid(z_t)
                            for t in range(T):
                                zz = z_r[t]
                                sg = ws[t]
                                dz_r[t] = g_r[t] * wz[t] * (sg * (_ONE + zz * (_ONE - sg)))
                                wy[t] = g_r[t] * (zz * sg)
                        else:
                            for t in range(T):
                                wy[t] = g_r[t]
                        for t in range(T):
                            du_r[t] = wy[t] * dd
                        dD_acc[b, e] += _hdot(wy, u_r, T)
                        # -- reverse-time recurrence of dL/dh
                        for t in range(T - 1, -1, -1):
                            gy = wy[t]
                            for n in range(N):
                                v = _fma(gy, C2[t, n], dh[n])
                                wg[t, n] = v
                                dh[n] = v * wa[t, n]
                        # -- per-step gradients
                        for i in range(TN):
                            wa_f[i] = wg_f[i] * wh_f[i] * wa_f[i]  # dL/d(d_t A[e, n])
                        for n in range(N):
                            acc[n] = 0.0
                        for t in range(T):
                            d = wd[t]
                            for n in range(N):
                                acc[n] += wa[t, n] * d
                        for n in range(N):
                            dA_acc[b, e, n] += acc[n]
                        for t in range(T):
                            x = wx[t]
                            gy = wy[t]
                            for n in range(N):
                                gBc[t, n] = _fma(wg[t, n], x, gBc[t, n])
                                gCc[t, n] = _fma(gy, h1[t, n], gCc[t, n])
                        for t in range(T):
                            s_b = _hdot(wg[t], B2[t], N)
                            dd_r[t] = _hdot(wa[t], a_row, N) + s_b * u_r[t]
                            du_r[t] += wd[t] * s_b
                        if softplus:
                            for t in range(T):
                                dd_r[t] = dd_r[t] * wq[t]
                        dbias_acc[b, e] += _hsum(dd_r, T)
                    for n in range(N):
                        carry[b, e, n] = dh[n]
            # -- sum the per-group partials of dB, dC over this region
            dB_f = dBt[b].reshape(L * N)[r0 * N:(r0 + R) * N]
            dC_f = dCt[b].reshape(L * N)[r0 * N:(r0 + R) * N]
            for i in range(R * N):
                sb = pB[0, i]
                sc = pC[0, i]
                for g in range(1, G):
                    sb += pB[g, i]
                    sc += pC[g, i]
                dB_f[i] = sb
                dC_f[i] = sc


# ---------------------------------------------------------------------------------------------
# autograd wrapper
# ---------------------------------------------------------------------------------------------
def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


MIN_STEPS_PER_THREAD = 1 << 18
"""Work (batch x channels x tokens) below which a kernel runs on one thread. Waking numba's
worker threads costs little on an idle machine but up to a scheduler time slice (measured 16 ms
per call, against 0.05 ms on one thread) when other jobs hold the cores."""


class _threads:
    """Run numba kernels on ``n`` threads (``n`` chosen from the work), then restore."""

    def __init__(self, work: int, channels: int):
        self.n = int(max(1, min(numba.get_num_threads(), channels,
                                work // MIN_STEPS_PER_THREAD)))

    def __enter__(self):
        self.saved = numba.get_num_threads()
        numba.set_num_threads(self.n)
        return self.n

    def __exit__(self, *exc):
        numba.set_num_threads(self.saved)


def _regions(chunk: int) -> int:
    """Chunks per parallel region: about REGION_STEPS time steps each."""
    return max(1, REGION_STEPS // chunk)


class _SelectiveScanCPU(torch.autograd.Function):
    """``out = scan(u, softplus?(delta + delta_bias), A, B, C, D, z)`` by the numba kernels."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, chunk):
        ct = u.dtype
        bn, e, length = u.shape
        n = A.shape[1]
        nc = max(1, -(-length // chunk))
        Bt = B.transpose(1, 2).contiguous()  # (B, N, L) -> (B, L, N), time-major
        Ct = C.transpose(1, 2).contiguous()
        Dv = D if D is not None else torch.zeros(e, dtype=ct)
        bias = delta_bias if delta_bias is not None else torch.zeros(e, dtype=ct)
        zz = z if z is not None else torch.zeros((1, 1, 1), dtype=ct)
        out = torch.empty((bn, e, length), dtype=ct)
        ckpt = torch.empty((bn, e, nc, n), dtype=ct)
        if length > 0:
            with _threads(bn * e * length, e) as groups:
                _scan_fwd_kernel(_np(u), _np(delta), _np(bias), softplus, _np(A), _np(Bt),
                                 _np(Ct), _np(Dv), _np(zz), z is not None, chunk,
                                 _regions(chunk), groups, out.numpy(), ckpt.numpy())
        ctx.save_for_backward(u, delta, bias, A, Bt, Ct, Dv, zz, ckpt)
        ctx.flags = (z is not None, D is not None, delta_bias is not None, softplus, chunk)
        return out

    @staticmethod
    def backward(ctx, gout):
        u, delta, bias, A, Bt, Ct, Dv, zz, ckpt = ctx.saved_tensors
        has_z, has_d, has_bias, softplus, chunk = ctx.flags
        ct = u.dtype
        bn, e, length = u.shape
        n = A.shape[1]
        new = torch.empty if length > 0 else torch.zeros  # the kernel writes every element
        du = new(u.shape, dtype=ct)
        dd = new(u.shape, dtype=ct)
        dz = new(u.shape if has_z else (1, 1, 1), dtype=ct)
        dBt = new((bn, length, n), dtype=ct)
        dCt = new((bn, length, n), dtype=ct)
        dA = torch.zeros((bn, e, n), dtype=torch.float64)
        dD = torch.zeros((bn, e), dtype=torch.float64)
        dbias = torch.zeros((bn, e), dtype=torch.float64)
        if length > 0:
            with _threads(bn * e * length, e) as groups:
                _scan_bwd_kernel(_np(u), _np(delta), _np(bias), softplus, _np(A), _np(Bt),
                                 _np(Ct), _np(Dv), _np(zz), has_z, chunk, _regions(chunk),
                                 groups, _np(ckpt), _np(gout.to(ct)), du.numpy(), dd.numpy(),
                                 dz.numpy(), dBt.numpy(), dCt.numpy(), dA.numpy(), dD.numpy(),
                                 dbias.numpy())
        return (du, dd, dA.sum(0).to(ct),
                dBt.transpose(1, 2), dCt.transpose(1, 2),  # (B, L, N) -> (B, N, L)
                dD.sum(0).to(ct) if has_d else None, dz if has_z else None,
                dbias.sum(0).to(ct) if has_bias else None, None, None)


def selective_scan_cpu(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Selective scan with the numba CPU kernels; same contract as
    :func:`mambamorph.nn.ssm.reference.selective_scan_reference`.

    Args:
        u, delta, z: ``(B, E, L)``; A: ``(E, N)``; B, C: ``(B, N, L)``; D, delta_bias: ``(E,)``.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        chunk: time steps between the state checkpoints kept for the backward pass; memory kept
            for the backward is ``B * E * ceil(L / chunk) * N`` values.

    Returns:
        ``(B, E, L)`` in the dtype of ``u`` (computed in float32, or float64 for float64 input).
        Differentiable with respect to every tensor argument.

    Raises:
        ValueError: a tensor is not on the CPU, or ``chunk < 1``.
    """
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                    ("delta_bias", delta_bias)):
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"selective_scan(impl='cpu'): expected {name} on the CPU, "
                             f"got a tensor on {t.device}")
    if chunk < 1:
        raise ValueError(f"selective_scan(impl='cpu'): expected chunk >= 1, got {chunk}")
    dtype_in = u.dtype
    ct = compute_dtype(dtype_in)

    def cast(t):
        return None if t is None else t.to(ct)

    out = _SelectiveScanCPU.apply(cast(u), cast(delta), cast(A), cast(B), cast(C), cast(D),
                                  cast(z), cast(delta_bias), bool(delta_softplus), int(chunk))
    return out.to(dtype_in)


def warm_up(dtypes=(torch.float32,)) -> None:
    """Compile (or load from the cache) the kernels for ``dtypes`` on a tiny problem, so the
    first real call does not pay for it. Raises nothing beyond numba's own errors."""
    for dt in dtypes:
        args = [torch.randn(1, 2, 3, dtype=dt, requires_grad=True), torch.rand(1, 2, 3, dtype=dt),
                -torch.rand(2, 2, dtype=dt), torch.randn(1, 2, 3, dtype=dt),
                torch.randn(1, 2, 3, dtype=dt), torch.randn(2, dtype=dt),
                torch.randn(1, 2, 3, dtype=dt)]
        selective_scan_cpu(*args).sum().backward()
