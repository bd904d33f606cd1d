"""Selective scan in plain PyTorch, chunked: the fallback on a GPU without ``mamba_ssm``.

The sequence is cut into chunks of ``T`` steps. Inside a chunk the recurrence
``h_t = a_t * h_{t-1} + x_t`` (with ``a_t = exp(d_t A)``, ``x_t = d_t B_t u_t``) is an associative
scan over the affine maps ``(a, x)``; it is evaluated with the Hillis-Steele doubling scheme:
``log2(T)`` rounds of ``x_t += a_t * x_{t-k}``, ``a_t *= a_{t-k}`` for ``k = 1, 2, 4, ...``. Every
round is a handful of large element-wise kernels, which is what a GPU (or CPU threads) does
well; after the last round ``a_t`` is the decay from the chunk start and ``x_t`` the state from a
zero start, so the state entering the chunk is added as ``h_t = x_t + a_t * h_0`` and the last
state is carried to the next chunk.

Numerics: only products of decays in ``[0, 1]`` and sums appear, never ``exp(S_t - S_s)`` of a
difference of cumulative log-decays (that cancels badly in float32 when a step is large), so the
result is as stable as the sequential recurrence.

Memory: one chunk holds ``(B, E, T, N)`` tensors. When gradients are needed each chunk is
recomputed in the backward pass (:class:`_RecomputedChunk`), so autograd keeps only each chunk's
inputs and its carried ``(B, E, N)`` state: memory is bounded by the chunk size, not by ``L``.
(``torch.utils.checkpoint`` with ``use_reentrant=False`` was tried first and kept about 30 MB
per chunk alive, 35 GB at full length.) The gradients themselves are PyTorch's autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mambamorph.nn.ssm.reference import compute_dtype

__all__ = ["selective_scan_torch", "default_chunk"]


def default_chunk(device: torch.device) -> int:
    """Chunk length used when none is given: 2048 on a GPU (fewer, larger kernels; not tuned,
    no GPU was available) and 128 on the CPU (64, 128 and 256 measured within 20% of each other
    at L = 16,128; fewer chunks mean fewer thread-pool barriers on a loaded machine)."""
    return 2048 if device.type == "cuda" else 128


def _shift(x: torch.Tensor, k: int, fill: float) -> torch.Tensor:
    """``x`` moved ``k`` steps later along dim -2 (time), the first ``k`` rows set to ``fill``."""
    return F.pad(x[..., :-k, :], (0, 0, k, 0), value=fill)


def _scan_chunk(u, d, A, B, C, h0):
    """One chunk. u, d: (B, E, T); A: (E, N); B, C: (B, N, T); h0: (B, E, N).

    Returns y (B, E, T) (= C_t . h_t, before skip and gate) and the last state (B, E, N).
    """
    length = u.shape[-1]
    a = torch.exp(d.unsqueeze(-1) * A[:, None, :])  # (B, E, T, 1) * (E, 1, N) -> (B, E, T, N)
    x = (d * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)  # (B, E, T, 1) * (B, 1, T, N)
    k = 1
    while k < length:
        x = x + a * _shift(x, k, 0.0)
        a = a * _shift(a, k, 1.0)
        k *= 2
    h = x + a * h0.unsqueeze(2)  # (B, E, T, N)
    y = (h * C.transpose(1, 2).unsqueeze(1)).sum(-1)  # (B, E, T, N) -> (B, E, T)
    return y, h[:, :, -1].clone()  # a copy: a view would keep all of h alive with the state


class _RecomputedChunk(torch.autograd.Function):
    """:func:`_scan_chunk` whose intermediates are not kept: the forward runs without autograd,
    the backward runs the chunk again with autograd and differentiates that (the scheme of
    reentrant activation checkpointing, written out so that what is kept is explicit: the
    chunk's inputs, which are slices of tensors that exist anyway, and its input state)."""

    @staticmethod
    def forward(ctx, u, d, A, B, C, h0):
        ctx.save_for_backward(u, d, A, B, C, h0)
        with torch.no_grad():
            return _scan_chunk(u, d, A, B, C, h0)

    @staticmethod
    def backward(ctx, grad_y, grad_h):
        inputs = [t.detach().requires_grad_(need)
                  for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad)]
        with torch.enable_grad():
            y, h = _scan_chunk(*inputs)
        outs, grads = [y], [grad_y]
        if grad_h is not None:
            outs.append(h)
            grads.append(grad_h)
        wanted = [t for t in inputs if t.requires_grad]
        got = iter(torch.autograd.grad(outs, wanted, grads, allow_unused=True))
        return tuple(next(got) if t.requires_grad else None for t in inputs)


def selective_scan_torch(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    chunk: int | None = None,
) -> torch.Tensor:
    """Chunked selective scan in pure PyTorch, on any device; same contract as
    :func:`mambamorph.nn.ssm.reference.selective_scan_reference`.

    Args:
        u, delta, z: ``(B, E, L)``; A: ``(E, N)``; B, C: ``(B, N, L)``; D, delta_bias: ``(E,)``.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        chunk: steps per chunk (None: :func:`default_chunk` of the device).

    Returns:
        ``(B, E, L)`` in the dtype of ``u`` (computed in float32, or float64 for float64 input).

    Raises:
        ValueError: ``chunk < 1``.
    """
    if chunk is None:
        chunk = default_chunk(u.device)
    if chunk < 1:
        raise ValueError(f"selective_scan(impl='torch'): expected chunk >= 1, got {chunk}")
    dtype_in = u.dtype
    ct = compute_dtype(dtype_in)
    u, delta, A, B, C = (t.to(ct) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, channels, length = u.shape
    h = u.new_zeros((batch, channels, A.shape[1]))  # (B, E, N)
    recompute = torch.is_grad_enabled() and any(
        t.requires_grad for t in (u, delta, A, B, C)
    )
    ys = []
    # torch.split, not x[..., t0:t1]: the backward of one split is one concatenation, while
    # each slice's backward writes a zero tensor of the full length (quadratic in L).
    pieces = zip(*(t.split(chunk, dim=-1) for t in (u, delta, B, C))) if length else ()
    for u_c, d_c, b_c, c_c in pieces:
        if recompute:
            y, h = _RecomputedChunk.apply(u_c, d_c, A, b_c, c_c, h)
        else:
            y, h = _scan_chunk(u_c, d_c, A, b_c, c_c, h)
        ys.append(y)
    y = torch.cat(ys, dim=-1) if ys else u.new_zeros(u.shape)  # (B, E, L)
    if D is not None:
        y = y + D.to(ct)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(dtype_in)
