"""Tokens of the token backbone: volumes <-> ``(B, L, C)`` tokens, the fixed sinusoidal position
code, patch embedding and patch merging (SPEC.md §1).

Tokens are ``(B, L, C)`` in raster order of a ``grid = (G0, G1, G2)`` (last axis fastest):
``token[g0 * G1 * G2 + g1 * G2 + g2]`` is the patch at grid index ``(g0, g1, g2)``. Position
codes are computed from the grid shape and cached, never stored as buffers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from mambamorph.errors import InputError

__all__ = ["Grid", "sinusoidal_position_code", "tokens_to_volume", "volume_to_tokens",
           "PatchEmbed", "PatchMerging"]

Grid = tuple[int, int, int]


@lru_cache(maxsize=32)
def _position_code_cached(grid: Grid, channels: int, device: torch.device,
                          dtype: torch.dtype) -> torch.Tensor:
    # Built outside inference mode so that the cached tensor can later meet autograd.
    with torch.inference_mode(False), torch.no_grad():
        per_axis = 2 * math.ceil(channels / 6)  # even, 3 * per_axis >= channels
        half = per_axis // 2
        inv_freq = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)  # (half,)
        parts = []
        for axis, n in enumerate(grid):
            angle = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (n, half)
            code = torch.cat([angle.sin(), angle.cos()], dim=1)  # (n, per_axis)
            view = [1, 1, 1, per_axis]
            view[axis] = n
            parts.append(code.view(view).expand(*grid, per_axis))
        code = torch.cat(parts, dim=-1)[..., :channels]  # (G0, G1, G2, C)
        code = code.permute(3, 0, 1, 2).contiguous()  # (G0, G1, G2, C) -> (C, G0, G1, G2)
    return code.to(device=device, dtype=dtype)


def sinusoidal_position_code(grid: Sequence[int], channels: int,
                             device: torch.device | str | None = None,
                             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Fixed 3D sinusoidal position code of a token grid (no parameters).

    Each axis gets ``c = 2 * ceil(channels / 6)`` channels: ``c/2`` sines then ``c/2`` cosines of
    ``pos * 10000 ** (-k / (c/2))``, ``k = 0 .. c/2 - 1``, ``pos`` the integer patch index along
    that axis. Axis 0 fills channels ``[0, c)``, axis 1 ``[c, 2c)``, axis 2 ``[2c, 3c)``; the
    result is cut to ``channels`` (for 96 channels: 32 per axis, frequencies ``10000^(-k/16)``).
    Cached per ``(grid, channels, device, dtype)``: treat the result as read-only.

    Args:
        grid: token grid ``(G0, G1, G2)``.
        channels: number of channels ``C`` (>= 1).
        device, dtype: of the result.
    Returns:
        ``(C, G0, G1, G2)`` tensor.
    Raises:
        InputError: ``grid`` is not 3 positive sizes or ``channels < 1``.
    """
    grid = tuple(int(g) for g in grid)
    if len(grid) != 3 or min(grid) < 1:
        raise InputError(f"sinusoidal_position_code: expected 3 positive sizes, got {grid}")
    if int(channels) < 1:
        raise InputError(f"sinusoidal_position_code: expected channels >= 1, got {channels}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return _position_code_cached(grid, int(channels), dev, dtype)


def volume_to_tokens(x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
    """``(B, C, G0, G1, G2)`` -> tokens ``(B, G0*G1*G2, C)`` in raster order, and the grid."""
    grid = tuple(x.shape[2:])
    return x.flatten(2).transpose(1, 2), grid  # (B, C, G0, G1, G2) -> (B, L, C)


def tokens_to_volume(x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Tokens ``(B, L, C)`` in raster order of ``grid`` -> ``(B, C, G0, G1, G2)``.

    Raises:
        InputError: ``L != G0 * G1 * G2``.
    """
    b, n, c = x.shape
    if n != math.prod(grid):
        raise InputError(f"tokens_to_volume: {n} tokens do not fill the grid {tuple(grid)}")
    # (B, L, C) -> (B, C, L) -> (B, C, G0, G1, G2)
    return x.transpose(1, 2).reshape(b, c, *grid)


class PatchEmbed(nn.Module):
    """Patch embedding: Conv3d(k = s = patch_size) -> LayerNorm -> (+ position code) -> tokens.

    Args:
        in_channels: channels of the input volume.
        embed_dim: token width ``C``.
        patch_size: cubic patch edge; input dims must be multiples of it.
        position_code: add :func:`sinusoidal_position_code` after the norm (MambaMorph: yes,
            TransMorph: no).
    """

    def __init__(self, in_channels: int, embed_dim: int = 96, patch_size: int = 4,
                 position_code: bool = True) -> None:
        super().__init__()
        self.patch_size = int(patch_size)
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)
        self.position_code = bool(position_code)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        """``(B, in, D0, D1, D2)`` -> tokens ``(B, L, C)`` and ``grid = (D0/p, D1/p, D2/p)``.

        Raises:
            InputError: a spatial dim is not a multiple of ``patch_size``.
        """
        if any(d % self.patch_size for d in x.shape[2:]):
            raise InputError(f"PatchEmbed: input dims {tuple(x.shape[2:])} must be multiples of "
                             f"the patch size {self.patch_size}")
        tokens, grid = volume_to_tokens(self.proj(x))  # (B, C, G0, G1, G2) -> (B, L, C)
        tokens = self.norm(tokens)
        if self.position_code:
            code = sinusoidal_position_code(grid, tokens.shape[-1], tokens.device, tokens.dtype)
            tokens = tokens + code.flatten(1).transpose(0, 1)  # (C, G0, G1, G2) -> (L, C)
        return tokens, grid


class PatchMerging(nn.Module):
    """Patch merging: every 2x2x2 block of tokens -> one token of ``out_dim`` channels.

    ``norm="before"`` (Swin; MambaMorph, TransMorph): the 8 sub-grids are concatenated in the
    order of offsets (0,0,0), (1,0,0), (0,1,0), (0,0,1), (1,1,0), (0,1,1), (1,0,1), (1,1,1) into
    ``8C`` channels, then ``LayerNorm(8C) -> Linear(8C -> out_dim, no bias)`` (``16 C + 8 C out``
    parameters). ``norm="after"`` (XMorpher): ``Linear(8C -> out_dim, bias)`` of each block,
    computed as ``Conv3d(C -> out_dim, k=2, s=2)``, then ``LayerNorm(out_dim)`` (``8 C out +
    3 out`` parameters).

    Args:
        dim: input token width ``C``; out_dim: output width (default ``2C``).
        norm: ``"before"`` or ``"after"``.
        pad_odd: zero-pad odd grid axes at the high end first (merged grid ``ceil(G_i / 2)``);
            otherwise an odd grid is an error.
    Raises:
        InputError: an unknown ``norm``.
    """

    _OFFSETS = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1), (1, 0, 1),
                (1, 1, 1))

    def __init__(self, dim: int, out_dim: int | None = None, norm: str = "before",
                 pad_odd: bool = False) -> None:
        super().__init__()
        out_dim = out_dim or 2 * dim
        if norm == "before":
            self.norm = nn.LayerNorm(8 * dim)
            self.reduction = nn.Linear(8 * dim, out_dim, bias=False)
        elif norm == "after":
            self.reduction = nn.Conv3d(dim, out_dim, kernel_size=2, stride=2)
            self.norm = nn.LayerNorm(out_dim)
        else:
            raise InputError(f"PatchMerging: norm must be 'before' or 'after', got {norm!r}")
        self.norm_first = norm == "before"
        self.pad_odd = bool(pad_odd)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # XMorpher checkpoints written before it used this class name the conv ``reduce``
        for key in [k for k in state_dict if k.startswith(prefix + "reduce.")]:
            state_dict[prefix + "reduction." + key[len(prefix + "reduce."):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, grid: Sequence[int]) -> tuple[torch.Tensor, Grid]:
        """Tokens ``(B, G0*G1*G2, C)`` of ``grid`` -> ``(B, g0*g1*g2, out_dim)``, merged grid.

        Raises:
            InputError: the token count does not match ``grid``, or a grid size is odd without
                ``pad_odd``.
        """
        grid = tuple(int(g) for g in grid)
        b, n, c = x.shape
        if n != math.prod(grid):
            raise InputError(f"PatchMerging: {n} tokens do not fill the grid {grid}")
        odd = tuple(g % 2 for g in grid)
        if any(odd) and not self.pad_odd:
            raise InputError(f"PatchMerging: expected an even token grid, got {grid}")
        v = x.reshape(b, *grid, c)  # (B, L, C) -> (B, G0, G1, G2, C)
        if any(odd):
            v = F.pad(v, (0, 0, 0, odd[2], 0, odd[1], 0, odd[0]))  # zeros at the high ends
        new_grid = tuple((g + o) // 2 for g, o in zip(grid, odd))
        if self.norm_first:
            v = torch.cat([v[:, i::2, j::2, k::2, :] for i, j, k in self._OFFSETS], dim=-1)
            v = v.reshape(b, -1, 8 * c)  # (B, g0, g1, g2, 8C) -> (B, L', 8C)
            return self.reduction(self.norm(v)), new_grid
        v = self.reduction(v.permute(0, 4, 1, 2, 3))  # (B, C, G0, G1, G2) -> (B, out, g0, g1, g2)
        v = self.norm(v.permute(0, 2, 3, 4, 1))  # -> (B, g0, g1, g2, out)
        return v.reshape(b, -1, v.shape[-1]), new_grid  # -> (B, L', out)
