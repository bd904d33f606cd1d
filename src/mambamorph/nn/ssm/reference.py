"""The selective scan written as the plain sequential recurrence: the specification.

Every other implementation in :mod:`mambamorph.nn.ssm` is an optimisation of this function and is
tested against it (forward output and every gradient). It is also usable at run time (``impl=
"reference"``), but it runs one small PyTorch step per token, so it is slow for long sequences.

Axis letters: ``B`` batch, ``E`` channels (the inner width of a Mamba block), ``L`` tokens,
``N`` state size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["selective_scan_reference", "compute_dtype"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a scan computes in for inputs of ``dtype``: float64 stays float64, anything
    narrower (float16, bfloat16, float32) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Selective scan (Mamba-1), one token at a time.

    With ``d = softplus(delta + delta_bias)`` (bias and softplus optional) and the state
    ``h`` of shape ``(B, E, N)`` starting at zero::

        h_t = exp(d_t * A) * h_{t-1} + d_t * B_t * u_t
        y_t = sum_n C_t[n] * h_t[n] + D * u_t
        out_t = y_t * silu(z_t)              (only when z is given)

    Args:
        u: input, ``(B, E, L)``.
        delta: step sizes before bias/softplus, ``(B, E, L)``.
        A: state matrix (diagonal, one row per channel, normally negative), ``(E, N)``.
        B: input projection, ``(B, N, L)``, shared by all channels.
        C: output projection, ``(B, N, L)``, shared by all channels.
        D: skip weight, ``(E,)``, or None.
        z: gate, ``(B, E, L)``, or None.
        delta_bias: added to ``delta`` before the softplus, ``(E,)``, or None.
        delta_softplus: apply ``softplus`` (PyTorch's, threshold 20) to the step sizes.

    Returns:
        ``(B, E, L)`` in the dtype of ``u``. The arithmetic is done in float32 (float64 when
        ``u`` is float64), whatever the input dtype.

    Raises:
        Nothing itself; shapes are checked by :func:`mambamorph.nn.ssm.selective_scan`.
    """
    dtype_in = u.dtype
    ct = compute_dtype(dtype_in)
    u, delta, A, B, C = (t.to(ct) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, channels, length = u.shape
    h = u.new_zeros((batch, channels, A.shape[1]))  # (B, E, N)
    # Split the time axis once (unbind): indexing [..., t] inside the loop would make the
    # backward pass quadratic in L (each index's backward writes a full-size zero tensor).
    steps = zip(delta.unsqueeze(-1).unbind(2),  # L x (B, E, 1)
                (u * delta).unsqueeze(-1).unbind(2),  # L x (B, E, 1)
                B.unsqueeze(1).unbind(3),  # L x (B, 1, N)
                C.unsqueeze(1).unbind(3))  # L x (B, 1, N)
    ys = []
    for d_t, du_t, b_t, c_t in steps:
        h = torch.exp(d_t * A) * h + du_t * b_t  # (B, E, N)
        ys.append((h * c_t).sum(-1))  # (B, E)
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(u.shape)  # (B, E, L)
    if D is not None:
        y = y + D.to(ct)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(dtype_in)
