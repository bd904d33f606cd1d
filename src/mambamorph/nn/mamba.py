"""The Mamba-1 block (SPEC.md section 1), with mamba's initialisation.

Width ``D`` (``d_model``), inner width ``E = expand * D``, state size ``N``, step rank
``R = ceil(D / 16)``::

    x, z  = split(Linear(D -> 2E, no bias)(u))                     (B, L, D) -> 2 x (B, E, L)
    x     = SiLU(causal depthwise Conv1d(E, k=d_conv, bias)(x))
    dt, B, C = split(Linear(E -> R + 2N, no bias)(x))
    delta = softplus(Linear(R -> E, bias)(dt))                     (the bias goes to the scan)
    y     = selective_scan(x, delta, A = -exp(A_log), B, C, D_skip) * SiLU(z)
    out   = Linear(E -> D, no bias)(y)                             (B, E, L) -> (B, L, D)

Parameters: ``6 D^2 + 4 D R + 110 D`` for ``N = 16``, ``d_conv = 4``, ``expand = 2`` (68,160 /
251,520 / 963,840 for D = 96 / 192 / 384). ``bidirectional=True`` (not in the paper) adds a
second branch that scans the reversed sequence with its own conv, x_proj, dt_proj, A_log and
D_skip (``4 D R + 110 D`` more parameters, e.g. 12,864 at D = 96) and sums both scans before the
gate and ``out_proj``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mambamorph.errors import InputError
from mambamorph.nn.ssm import selective_scan

__all__ = ["Mamba", "mamba_parameter_count"]


def mamba_parameter_count(d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                          dt_rank: int | None = None, bidirectional: bool = False) -> int:
    """Closed-form parameter count of :class:`Mamba` (for checks and documentation).

    ``dt_rank`` None means ``ceil(d_model / 16)``. Raises nothing.
    """
    e = expand * d_model
    r = math.ceil(d_model / 16) if dt_rank is None else dt_rank
    branch = e * d_conv + e + e * (r + 2 * d_state) + r * e + e + e * d_state + e
    shared = d_model * 2 * e + e * d_model
    return shared + branch * (2 if bidirectional else 1)


def _ssm_layers(d_inner, d_state, d_conv, dt_rank):
    """The layers of one scan direction: conv1d, x_proj, dt_proj, A_log, D (uninitialised SSM)."""
    conv1d = nn.Conv1d(d_inner, d_inner, kernel_size=d_conv, groups=d_inner,
                       padding=d_conv - 1, bias=True)
    x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
    dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
    a_log = nn.Parameter(torch.empty(d_inner, d_state, dtype=torch.float32))
    d_skip = nn.Parameter(torch.empty(d_inner, dtype=torch.float32))
    a_log._no_weight_decay = True
    d_skip._no_weight_decay = True
    return conv1d, x_proj, dt_proj, a_log, d_skip


@torch.no_grad()
def _init_ssm(dt_proj: nn.Linear, a_log: torch.Tensor, d_skip: torch.Tensor, dt_min: float,
              dt_max: float, dt_init_floor: float) -> None:
    """mamba's initialisation of dt_proj, A_log and D (conv and x_proj keep PyTorch's)."""
    d_inner, d_state = a_log.shape
    std = dt_proj.in_features ** -0.5
    nn.init.uniform_(dt_proj.weight, -std, std)
    # softplus(bias) log-uniform in [dt_min, dt_max], floored; bias = softplus^-1(dt)
    dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min))
                   + math.log(dt_min)).clamp(min=dt_init_floor)
    dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
    dt_proj.bias._no_reinit = True
    a_log.copy_(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).expand(d_inner, -1))
    d_skip.fill_(1.0)


def _scan_branch(x, z, conv1d, x_proj, dt_proj, a_log, d_skip, d_state, scan_impl):
    """One direction: x, z (B, E, L) -> scan output (B, E, L), gated by SiLU(z) if z is given."""
    length = x.shape[-1]
    x = F.silu(conv1d(x)[..., :length])  # causal: keep the first L of the L + k - 1 outputs
    x_dbl = x_proj(x.transpose(1, 2))  # (B, E, L) -> (B, L, R + 2N)
    dt, b, c = torch.split(x_dbl, [dt_proj.in_features, d_state, d_state], dim=-1)
    delta = F.linear(dt, dt_proj.weight).transpose(1, 2)  # (B, L, R) -> (B, E, L)
    a = -torch.exp(a_log)  # (E, N)
    return selective_scan(
        x, delta, a, b.transpose(1, 2), c.transpose(1, 2),  # (B, L, N) -> (B, N, L)
        D=d_skip, z=z, delta_bias=dt_proj.bias, delta_softplus=True, impl=scan_impl,
    )


class Mamba(nn.Module):
    """Mamba-1 block: ``(B, L, d_model) -> (B, L, d_model)`` (see the module docstring).

    Args:
        d_model: width ``D``.
        d_state: state size ``N``.
        d_conv: kernel of the causal depthwise convolution.
        expand: inner width ``E = expand * D``.
        dt_rank: rank ``R`` of the step projection, or ``"auto"`` for ``ceil(D / 16)``.
        dt_min, dt_max: range of the initial step sizes ``softplus(dt_proj.bias)`` (log-uniform).
        dt_init_floor: lower clamp of those initial step sizes.
        bidirectional: add a second scan over the reversed sequence (not in the paper).
        scan_impl: selective-scan implementation passed to
            :func:`mambamorph.nn.ssm.selective_scan` (None: automatic by device).

    Raises:
        InputError: a size is not positive, or ``dt_rank`` is neither ``"auto"`` nor an int.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 1e-3, dt_max: float = 1e-1,
                 dt_init_floor: float = 1e-4, bidirectional: bool = False,
                 scan_impl: str | None = None):
        super().__init__()
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        if not isinstance(dt_rank, int) or isinstance(dt_rank, bool):
            raise InputError(f"Mamba: dt_rank must be 'auto' or an int, got {dt_rank!r}")
        for name, v in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv),
                        ("expand", expand), ("dt_rank", dt_rank)):
            if v < 1:
                raise InputError(f"Mamba: {name} must be >= 1, got {v}")
        if not 0 < dt_min <= dt_max:
            raise InputError(f"Mamba: need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = expand * d_model
        self.dt_rank = dt_rank
        self.bidirectional = bidirectional
        self.scan_impl = scan_impl
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        # parameter names as in mamba_ssm (and Vision Mamba's "_b" names for the reverse scan)
        layers = (self.d_inner, d_state, d_conv, dt_rank)
        self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D = _ssm_layers(*layers)
        _init_ssm(self.dt_proj, self.A_log, self.D, dt_min, dt_max, dt_init_floor)
        if bidirectional:
            (self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log,
             self.D_b) = _ssm_layers(*layers)
            _init_ssm(self.dt_proj_b, self.A_b_log, self.D_b, dt_min, dt_max, dt_init_floor)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden: (B, L, d_model)`` -> ``(B, L, d_model)``.

        Raises:
            InputError: ``hidden`` is not 3-D with ``d_model`` features last.
        """
        if hidden.dim() != 3 or hidden.shape[-1] != self.d_model:
            raise InputError(f"Mamba: expected input (B, L, {self.d_model}), "
                             f"got {tuple(hidden.shape)}")
        xz = self.in_proj(hidden).transpose(1, 2)  # (B, L, 2E) -> (B, 2E, L)
        x, z = xz.chunk(2, dim=1)  # 2 x (B, E, L)
        fwd = (self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D, self.d_state,
               self.scan_impl)
        if not self.bidirectional:
            y = _scan_branch(x, z, *fwd)
        else:
            bwd = (self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b,
                   self.d_state, self.scan_impl)
            y = _scan_branch(x, None, *fwd)
            y = y + _scan_branch(x.flip(-1), None, *bwd).flip(-1)  # scan the reversed sequence
            y = y * F.silu(z)
        return self.out_proj(y.transpose(1, 2))  # (B, E, L) -> (B, L, D)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, d_conv={self.d_conv}, "
                f"expand={self.expand}, dt_rank={self.dt_rank}, "
                f"bidirectional={self.bidirectional}, scan_impl={self.scan_impl}")
