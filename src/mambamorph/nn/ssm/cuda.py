"""Selective scan with the fused CUDA kernels of ``mamba_ssm`` (optional extra).

Install with ``pip install "mambamorph[cuda]"`` (it pulls ``mamba-ssm``, which needs a CUDA
toolchain matching PyTorch). Without it the GPU uses :mod:`mambamorph.nn.ssm.torch_scan`.
The package is imported on first use, not when :mod:`mambamorph` is imported.
"""

from __future__ import annotations

import logging

import torch

from mambamorph.nn.ssm.reference import compute_dtype

__all__ = ["mamba_ssm_scan_fn", "selective_scan_cuda", "INSTALL_HINT"]

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "mambamorph[cuda]"  (installs mamba-ssm)'

_UNSET = object()
_scan_fn = _UNSET


def mamba_ssm_scan_fn():
    """``mamba_ssm``'s ``selective_scan_fn``, or None when the package cannot be imported.

    The import is tried once and its outcome cached. Raises nothing.
    """
    global _scan_fn
    if _scan_fn is _UNSET:
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        except (ImportError, OSError) as exc:  # absent, or built against another CUDA/torch
            log.debug("mamba_ssm unavailable: %s", exc)
            selective_scan_fn = None
        _scan_fn = selective_scan_fn
    return _scan_fn


def selective_scan_cuda(
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
    """Selective scan by ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``; same
    contract as :func:`mambamorph.nn.ssm.reference.selective_scan_reference`.

    ``u, delta, z: (B, E, L)``, ``A: (E, N)``, ``B, C: (B, N, L)``, ``D, delta_bias: (E,)``, all on
    one CUDA device. float16/bfloat16/float32 inputs go to the kernel as they are (it computes in
    float32); ``A``, ``D`` and ``delta_bias`` are passed in float32; float64 inputs are computed in
    float32 (the kernel has no float64 version) and returned as float64.

    Raises:
        RuntimeError: ``mamba_ssm`` cannot be imported (the message gives the install command).
        ValueError: a tensor is not on a CUDA device.
    """
    fn = mamba_ssm_scan_fn()
    if fn is None:
        raise RuntimeError(
            "selective_scan(impl='cuda') needs the mamba_ssm CUDA kernels, which could not be "
            f"imported. Install them with: {INSTALL_HINT}; or use impl='torch'."
        )
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                    ("delta_bias", delta_bias)):
        if t is not None and t.device.type != "cuda":
            raise ValueError(f"selective_scan(impl='cuda'): expected {name} on a CUDA device, "
                             f"got a tensor on {t.device}")
    dtype_in = u.dtype
    io = torch.float32 if dtype_in == torch.float64 else dtype_in

    def prep(t):
        t = t.to(io)
        return t if t.stride(-1) == 1 else t.contiguous()

    f32 = compute_dtype(torch.float32)
    out = fn(
        prep(u), prep(delta), A.to(f32).contiguous(), prep(B), prep(C),
        None if D is None else D.to(f32).contiguous(),
        None if z is None else prep(z),
        None if delta_bias is None else delta_bias.to(f32).contiguous(),
        bool(delta_softplus),
    )
    return out.to(dtype_in)
