"""Float32 scalar helpers compiled into the CPU scan kernels (:mod:`mambamorph.nn.ssm.cpu`):
a branch-free, vectorisable ``exp`` and softplus, explicit fused multiply-adds, and the only
reductions compiled with ``reassoc`` (:func:`_hsum`, :func:`_hdot`). Every other operation of the
kernels follows IEEE order.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

# ---------------------------------------------------------------------------------------------
# scalar helpers (compiled into the kernels)
# ---------------------------------------------------------------------------------------------
# Constants are float32 so that float32 arithmetic stays float32 (a Python float literal would
# promote it to float64); in the float64 kernels they promote exactly.
_F = np.float32
_ZERO = _F(0.0)
_ONE = _F(1.0)
_HALF = _F(0.5)
_EXP_LO = _F(-104.0)  # exp(-104) rounds to 0 in float32
_EXP_HI = _F(89.0)  # exp(89) overflows to inf in float32
_LOG2E = _F(1.4426950408889634)
_LN2_HI = _F(0.693359375)  # ln 2 split in two (Cody-Waite); _LN2_HI * k is exact
_LN2_LO = _F(-2.12194440e-4)
# minimax polynomial of (exp(r) - 1 - r) / r^2 on |r| <= ln(2)/2 (Cephes expf)
_P0 = _F(1.9875691500e-4)
_P1 = _F(1.3981999507e-3)
_P2 = _F(8.3334519073e-3)
_P3 = _F(4.1665795894e-2)
_P4 = _F(1.6666665459e-1)
_P5 = _F(5.0000001201e-1)


_SOFTPLUS_THRESHOLD = _F(20.0)  # PyTorch's: softplus(x) = x above it
# log1p(e) = 2 atanh(s) with s = e / (2 + e) = 2 s (1 + s^2/3 + s^4/5 + ...); for 0 <= e <= 1,
# s <= 1/3 and the terms up to s^14/15 leave a truncation error below 2e-9.
_Q = tuple(_F(1.0 / (2 * k + 1)) for k in range(8))
_TWO = _F(2.0)


@intrinsic
def _int32_bits_as_float32(typingctx, bits):
    """Reinterpret the 32 bits of an int32 as a float32 (a no-op LLVM bitcast, vectorisable)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c rounded once (LLVM's fma intrinsic: one instruction, and it vectorises).

    Explicit, so the rest of the code keeps IEEE semantics without fastmath's ``contract``."""
    if not (a == b == c and isinstance(a, types.Float)):
        return None
    sig = a(a, b, c)

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return sig, codegen


@njit(inline="always", error_model="numpy")
def _exp_f32(x):
    """exp for float32 without branches or calls, so loops over it vectorise.

    x = k ln2 + r with |r| <= ln2/2; exp(r) by a degree-7 polynomial; 2^k applied as two exact
    power-of-two factors 2^(k//2) * 2^(k - k//2) built from their bit patterns, which covers the
    whole range (results from denormal to overflow). Max error 1.4 ulp; NaN propagates.
    """
    xc = min(max(x, _EXP_LO), _EXP_HI)
    fk = np.floor(_fma(xc, _LOG2E, _HALF))
    r = _fma(fk, -_LN2_HI, xc)
    r = _fma(fk, -_LN2_LO, r)
    p = _fma(_fma(_fma(_fma(_fma(_P0, r, _P1), r, _P2), r, _P3), r, _P4), r, _P5)
    p = _fma(p, r * r, r) + _ONE
    k = np.int32(fk)
    k1 = k >> 1
    k2 = k - k1
    s1 = _int32_bits_as_float32((k1 + 127) << 23)
    s2 = _int32_bits_as_float32((k2 + 127) << 23)
    res = p * s1 * s2
    return res if x == x else x


@njit(inline="always", error_model="numpy")
def _softplus_f32(x):
    """PyTorch's softplus in float32, vectorisable: x above 20, else
    max(x, 0) + log1p(exp(-|x|)), with log1p by the atanh series (about 2 ulp)."""
    e = _exp_f32(-abs(x))
    sv = e / (_TWO + e)
    s2 = sv * sv
    q = _fma(_fma(_fma(_fma(_fma(_fma(_fma(_Q[7], s2, _Q[6]), s2, _Q[5]), s2, _Q[4]), s2,
                                 _Q[3]), s2, _Q[2]), s2, _Q[1]), s2, _Q[0])
    res = max(x, _ZERO) + _TWO * sv * q
    return x if x > _SOFTPLUS_THRESHOLD else res


def _exp(x):  # pragma: no cover - replaced by the overload inside compiled code
    return math.exp(x)


@overload(_exp)
def _exp_overload(x):
    if x == types.float32:
        return lambda x: _exp_f32(x)
    return lambda x: math.exp(x)


def _softplus(x):  # pragma: no cover - replaced by the overload inside compiled code
    return x if x > 20 else math.log1p(math.exp(x))


@overload(_softplus)
def _softplus_overload(x):
    if x == types.float32:
        return lambda x: _softplus_f32(x)
    return lambda x: x if x > 20.0 else math.log1p(math.exp(x))


@njit(inline="always", error_model="numpy")
def _softplus_grad(x):
    """d softplus / dx as PyTorch has it: 1 above the threshold, else sigmoid(x) (stable)."""
    e = _exp(-abs(x))
    sg = _ONE / (_ONE + e) if x >= _ZERO else e / (_ONE + e)
    return _ONE if x > _SOFTPLUS_THRESHOLD else sg


@njit(fastmath={"reassoc", "contract"}, cache=True, error_model="numpy")
def _hsum(p, n):
    """Sum of ``p[0:n]`` in any order (tree-shaped so that it vectorises). n >= 1."""
    s = p[0]
    for i in range(1, n):
        s += p[i]
    return s


@njit(fastmath={"reassoc", "contract"}, cache=True, error_model="numpy")
def _hdot(p, q, n):
    """Dot product of ``p[0:n]`` and ``q[0:n]`` in any order (vectorised). n >= 1."""
    s = p[0] * q[0]
    for i in range(1, n):
        s += p[i] * q[i]
    return s
