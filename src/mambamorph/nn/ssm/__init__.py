"""Selective scan (the state-space core of a Mamba-1 block), one function, several engines.

:func:`selective_scan` checks its arguments and hands them to one implementation:

==============  ==============================================================================
``reference``   :mod:`.reference`: the sequential recurrence, one token per step; the spec.
``cpu``         :mod:`.cpu`: numba kernels (forward and backward), chunked, multi-threaded.
``torch``       :mod:`.torch_scan`: chunked parallel scan in plain PyTorch, any device.
``cuda``        :mod:`.cuda`: ``mamba_ssm``'s fused CUDA kernels (optional extra).
==============  ==============================================================================

Choice, first match wins: the ``impl`` argument; the environment variable ``MAMBAMORPH_SCAN``
(same names; empty or ``auto`` means unset); automatic: on CUDA ``cuda`` when ``mamba_ssm``
imports and the input is not float64, else ``torch``; on the CPU ``cpu``; other devices
``torch``. All of them agree with ``reference`` to float32 rounding, in value and gradient.

Axis letters: ``B`` batch, ``E`` channels, ``L`` tokens, ``N`` state size.
"""

from __future__ import annotations

import os

import torch

from mambamorph.errors import InputError
from mambamorph.nn.ssm.cuda import INSTALL_HINT, mamba_ssm_scan_fn, selective_scan_cuda
from mambamorph.nn.ssm.reference import selective_scan_reference

__all__ = ["selective_scan", "resolve_impl", "IMPLEMENTATIONS", "ENV_VAR", "INSTALL_HINT"]

IMPLEMENTATIONS = ("reference", "cpu", "torch", "cuda")
ENV_VAR = "MAMBAMORPH_SCAN"


def resolve_impl(impl: str | None, device: torch.device | str, dtype: torch.dtype = torch.float32
                 ) -> str:
    """The implementation :func:`selective_scan` uses for tensors on ``device`` of ``dtype``.

    Args:
        impl: an entry of :data:`IMPLEMENTATIONS`, or None for the environment/automatic choice.
        device: where the tensors live.
        dtype: the dtype of ``u`` (float64 never goes to ``mamba_ssm`` automatically).

    Raises:
        InputError: ``impl`` (or ``$MAMBAMORPH_SCAN``) is not a known implementation.
    """
    source = "impl"
    if impl is None:
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env and env != "auto":
            impl, source = env, f"${ENV_VAR}"
    if impl is not None:
        if impl not in IMPLEMENTATIONS:
            raise InputError(f"selective_scan: {source} must be one of "
                             f"{', '.join(IMPLEMENTATIONS)} (or unset for automatic), got {impl!r}")
        return impl
    device = torch.device(device)
    if device.type == "cuda":
        if dtype != torch.float64 and mamba_ssm_scan_fn() is not None:
            return "cuda"
        return "torch"
    if device.type == "cpu":
        return "cpu"
    return "torch"


def _check(u, delta, A, B, C, D, z, delta_bias) -> None:
    def bad(name, want, t):
        raise InputError(f"selective_scan: expected {name} of shape {want}, "
                         f"got {tuple(t.shape)}")

    if u.dim() != 3:
        bad("u", "(B, E, L)", u)
    batch, channels, length = u.shape
    if A.dim() != 2 or A.shape[0] != channels:
        bad("A", f"(E, N) = ({channels}, N)", A)
    n_state = A.shape[1]
    if delta.shape != u.shape:
        bad("delta", f"{tuple(u.shape)} like u", delta)
    for name, t in (("B", B), ("C", C)):
        if t.shape != (batch, n_state, length):
            bad(name, f"(B, N, L) = {(batch, n_state, length)}", t)
    if z is not None and z.shape != u.shape:
        bad("z", f"{tuple(u.shape)} like u", z)
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (channels,):
            bad(name, f"(E,) = ({channels},)", t)
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D),
                    ("z", z), ("delta_bias", delta_bias)):
        if t is not None and not t.is_floating_point():
            raise InputError(f"selective_scan: expected {name} to be a floating-point tensor, "
                             f"got {t.dtype}")


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    impl: str | None = None,
) -> torch.Tensor:
    """Selective scan of Mamba-1 (the semantics of mamba's ``selective_scan_ref``).

    With ``d = softplus(delta + delta_bias)`` (bias and softplus each optional) and a state
    ``h: (B, E, N)`` starting at zero::

        h_t = exp(d_t * A) * h_{t-1} + d_t * B_t * u_t
        y_t = sum_n C_t[n] h_t[n] + D * u_t ;  y_t *= silu(z_t) when z is given

    Args:
        u: input, ``(B, E, L)``.
        delta: step sizes (before bias and softplus), ``(B, E, L)``.
        A: diagonal state matrix, one row per channel (real, normally negative), ``(E, N)``.
        B, C: input and output projections, ``(B, N, L)``, shared by the channels.
        D: skip weight ``(E,)`` or None.
        z: gate ``(B, E, L)`` or None.
        delta_bias: ``(E,)`` or None.
        delta_softplus: apply PyTorch's softplus to the step sizes.
        impl: ``"reference" | "cpu" | "torch" | "cuda"`` or None (see the module docstring).

    Returns:
        ``y: (B, E, L)`` in the dtype of ``u``. Arithmetic is in float32 for float16, bfloat16 and
        float32 inputs (safe under autocast) and in float64 for float64 inputs. Differentiable in
        every tensor argument.

    Raises:
        InputError: shapes do not match, a tensor is not floating point, or ``impl`` is unknown.
        RuntimeError: ``impl="cuda"`` and ``mamba_ssm`` is not installed (names the install
            command).
        ValueError: the tensors are on a device the chosen implementation cannot use.
    """
    _check(u, delta, A, B, C, D, z, delta_bias)
    which = resolve_impl(impl, u.device, u.dtype)
    args = (u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))
    if which == "reference":
        return selective_scan_reference(*args)
    if which == "cuda":
        return selective_scan_cuda(*args)
    if which == "cpu":
        from mambamorph.nn.ssm.cpu import selective_scan_cpu  # imports numba on first use

        return selective_scan_cpu(*args)
    from mambamorph.nn.ssm.torch_scan import selective_scan_torch

    return selective_scan_torch(*args)
