"""3D Swin Transformer layers: window attention with a relative position bias, shifted windows.

The token mixer of the TransMorph baseline (SPEC.md section 3). Token grids are channels-last,
``(B, G0, G1, G2, C)``; a window of ``w = (w0, w1, w2)`` tokens is flattened in raster order (last
axis fastest), ``N = w0 * w1 * w2`` tokens per window.

How a block treats a token grid that does not tile into windows (TransMorph / Video Swin rules):

1. Per axis, a window at least as large as the grid is clamped to the grid and that axis is not
   shifted (:func:`fit_window`): a single window already sees the whole axis.
2. The (normalised) grid is zero-padded at the high end of each axis to a multiple of the window
   (:func:`padded_grid`). As in TransMorph and the Swin segmentation backbone, the padded tokens
   take part in the attention as zero vectors; they are cropped away afterwards.
3. A shifted block rolls the padded grid by ``-shift`` before partitioning and back afterwards.
   Tokens that the roll brought together from opposite ends of the grid are kept apart by a
   mask (:func:`shifted_window_mask`): a token only attends to tokens of its own region
   (masked logits are set to ``-inf``; the reference adds ``-100``, which gives the same
   attention weights to float precision).

The bias table of a block is sized for its configured window,
``(2 w0 - 1)(2 w1 - 1)(2 w2 - 1)`` rows by ``heads``; a clamped window indexes the same table by
the same relative offsets (:func:`relative_position_index`), so a given offset always reads the
same bias. Index tensors are non-persistent buffers or are computed on the fly: checkpoints hold
weights only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mambamorph.errors import InputError

__all__ = [
    "window_partition",
    "window_reverse",
    "fit_window",
    "padded_grid",
    "relative_position_index",
    "shift_region_labels",
    "shifted_window_mask",
    "DropPath",
    "WindowAttention",
    "SwinBlock",
    "SwinStage",
]

Triple = tuple[int, int, int]


def _triple(value: int | Sequence[int], name: str) -> Triple:
    if isinstance(value, int):
        value = (value, value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 3:
        raise InputError(f"{name}: expected 3 values, got {value}")
    return value  # type: ignore[return-value]


def window_partition(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """Cut a token grid into non-overlapping windows.

    Args:
        x: ``(B, G0, G1, G2, C)`` with ``G_i`` a multiple of ``window[i]``.
        window: ``(w0, w1, w2)`` in tokens.
    Returns:
        ``(B * nW, N, C)`` with ``nW = prod(G_i / w_i)`` windows per item (batch outermost, then
        windows in raster order) and ``N = w0 * w1 * w2`` tokens per window in raster order.
    Raises:
        InputError: ``x`` is not 5D or a grid dim is not a multiple of the window.
    """
    if x.dim() != 5:
        raise InputError(f"window_partition: expected (B, G0, G1, G2, C), got {tuple(x.shape)}")
    b, g0, g1, g2, c = x.shape
    w0, w1, w2 = window
    if g0 % w0 or g1 % w1 or g2 % w2:
        raise InputError(f"window_partition: grid {(g0, g1, g2)} is not a multiple of the window "
                         f"{tuple(window)}")
    x = x.view(b, g0 // w0, w0, g1 // w1, w1, g2 // w2, w2, c)
    # (B, n0, w0, n1, w1, n2, w2, C) -> (B, n0, n1, n2, w0, w1, w2, C)
    x = x.permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(-1, w0 * w1 * w2, c)


def window_reverse(windows: torch.Tensor, window: Sequence[int],
                   grid: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`.

    Args:
        windows: ``(B * nW, N, C)`` as returned by :func:`window_partition`.
        window: ``(w0, w1, w2)`` in tokens.
        grid: ``(G0, G1, G2)``, multiples of the window.
    Returns:
        ``(B, G0, G1, G2, C)``.
    Raises:
        InputError: the window count or size does not match ``grid`` and ``window``.
    """
    w0, w1, w2 = window
    g0, g1, g2 = grid
    if g0 % w0 or g1 % w1 or g2 % w2:
        raise InputError(f"window_reverse: grid {tuple(grid)} is not a multiple of the window "
                         f"{tuple(window)}")
    n0, n1, n2 = g0 // w0, g1 // w1, g2 // w2
    n_win = n0 * n1 * n2
    if windows.dim() != 3 or windows.shape[1] != w0 * w1 * w2 or windows.shape[0] % n_win:
        raise InputError(f"window_reverse: got {tuple(windows.shape)} for window {tuple(window)} "
                         f"and grid {tuple(grid)}")
    b = windows.shape[0] // n_win
    c = windows.shape[2]
    x = windows.view(b, n0, n1, n2, w0, w1, w2, c)
    # (B, n0, n1, n2, w0, w1, w2, C) -> (B, n0, w0, n1, w1, n2, w2, C)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, g0, g1, g2, c)


def fit_window(grid: Sequence[int], window: Sequence[int],
               shift: Sequence[int]) -> tuple[Triple, Triple]:
    """Window and shift actually used on a token grid.

    Per axis, where the grid is no larger than the window, the window shrinks to the grid and
    that axis is not shifted; elsewhere both are kept.

    Args:
        grid: ``(G0, G1, G2)`` token grid.
        window: configured window ``(w0, w1, w2)``.
        shift: configured shift ``(s0, s1, s2)``, each ``0 <= s_i < w_i``.
    Returns:
        ``(window, shift)`` to use.
    """
    win, sh = [], []
    for g, w, s in zip(grid, window, shift):
        if g <= w:
            win.append(int(g))
            sh.append(0)
        else:
            win.append(int(w))
            sh.append(int(s))
    return tuple(win), tuple(sh)  # type: ignore[return-value]


def padded_grid(grid: Sequence[int], window: Sequence[int]) -> Triple:
    """``grid`` rounded up per axis to a multiple of ``window`` (tokens)."""
    return tuple(-(-int(g) // int(w)) * int(w) for g, w in zip(grid, window))  # type: ignore


def relative_position_index(window: Sequence[int],
                            table_window: Sequence[int] | None = None) -> torch.Tensor:
    """Row of the bias table read by every (query, key) pair of a window.

    The table is laid out for ``table_window = (t0, t1, t2)``: the offset
    ``d = key - query`` (``|d_i| < t_i``) reads row
    ``(d0 + t0 - 1)(2 t1 - 1)(2 t2 - 1) + (d1 + t1 - 1)(2 t2 - 1) + (d2 + t2 - 1)``.

    Args:
        window: window actually used, ``window[i] <= table_window[i]``.
        table_window: window the table was sized for (default: ``window``).
    Returns:
        ``(N, N)`` int64, ``N = prod(window)``; entry ``[q, k]`` for query ``q`` and key ``k``
        in raster order.
    Raises:
        InputError: ``window`` exceeds ``table_window`` along an axis.
    """
    table_window = tuple(window) if table_window is None else tuple(table_window)
    if any(w > t or w < 1 for w, t in zip(window, table_window)):
        raise InputError(f"relative_position_index: window {tuple(window)} does not fit the "
                         f"table's window {table_window}")
    axes = [torch.arange(int(w)) for w in window]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij")).flatten(1)  # (3, N)
    offset = coords[:, None, :] - coords[:, :, None]  # (3, N_query, N_key): key - query
    t0, t1, t2 = table_window
    return ((offset[0] + t0 - 1) * (2 * t1 - 1) * (2 * t2 - 1)
            + (offset[1] + t1 - 1) * (2 * t2 - 1)
            + (offset[2] + t2 - 1))


def shift_region_labels(grid: Sequence[int], window: Sequence[int], shift: Sequence[int],
                        device: torch.device | str | None = None) -> torch.Tensor:
    """Region of every token of a padded grid after the cyclic shift by ``-shift``.

    Along an axis of length ``P`` with window ``w`` and shift ``s > 0``, positions of the rolled
    grid fall into three regions: ``[0, P - w)``, ``[P - w, P - s)`` and ``[P - s, P)`` (the last
    holds the tokens that wrapped around from the start). An unshifted axis is one region.
    Two tokens are in the same 3D region iff they are in the same region along every axis.

    Args:
        grid: padded grid ``(P0, P1, P2)``, multiples of ``window``.
        window: ``(w0, w1, w2)``; shift: ``(s0, s1, s2)`` with ``0 <= s_i < w_i``.
        device: where to build the result.
    Returns:
        ``(P0, P1, P2)`` int64 labels in ``0..26``.
    """
    labels = []
    for p, w, s in zip(grid, window, shift):
        pos = torch.arange(int(p), device=device)
        lab = torch.zeros_like(pos)
        if s > 0:
            lab = (pos >= p - w).long() + (pos >= p - s).long()
        labels.append(lab)
    return labels[0][:, None, None] * 9 + labels[1][None, :, None] * 3 + labels[2][None, None, :]


def shifted_window_mask(grid: Sequence[int], window: Sequence[int], shift: Sequence[int],
                        device: torch.device | str | None = None) -> torch.Tensor:
    """Pairs of tokens a shifted window must not let attend to each other.

    Args:
        grid: padded grid ``(P0, P1, P2)``, multiples of ``window``.
        window: ``(w0, w1, w2)``; shift: ``(s0, s1, s2)``.
        device: where to build the result.
    Returns:
        ``(nW, N, N)`` bool, True where query ``q`` and key ``k`` of window ``n`` (rolled grid,
        raster order) belong to different regions (:func:`shift_region_labels`).
    """
    labels = shift_region_labels(grid, window, shift, device)
    lab = window_partition(labels[None, ..., None], window)[..., 0]  # (nW, N)
    return lab[:, :, None] != lab[:, None, :]


class DropPath(nn.Module):
    """Stochastic depth: in training mode, zero a residual branch for a random subset of batch
    items (each with probability ``p``) and scale the kept ones by ``1 / (1 - p)``; identity in
    eval mode or when ``p == 0``.

    Raises:
        InputError: ``p`` outside ``[0, 1)``.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise InputError(f"DropPath: p must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, ...)``; returns the same shape."""
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias.

    ``qkv = Linear(C, 3C, bias=qkv_bias)``; per head, ``softmax(q k^T / sqrt(C / heads) + bias
    [+ mask]) v``; ``proj = Linear(C, C)`` with bias. The bias table
    ``relative_position_bias_table`` is ``((2 w0 - 1)(2 w1 - 1)(2 w2 - 1), heads)``, initialised
    from a normal distribution with std 0.02 truncated to [-2, 2].

    Args:
        dim: token width ``C``; must divide by ``num_heads``.
        num_heads: attention heads.
        window: configured window ``(w0, w1, w2)`` in tokens (sizes the table).
        qkv_bias: bias in the qkv projection.

    Raises:
        InputError: ``dim`` does not divide by ``num_heads``, or a non-positive size.
    """

    def __init__(self, dim: int, num_heads: int, window: Sequence[int], qkv_bias: bool = False):
        super().__init__()
        window = _triple(window, "WindowAttention window")
        if dim <= 0 or num_heads <= 0 or dim % num_heads:
            raise InputError(f"WindowAttention: dim {dim} must be a positive multiple of "
                             f"num_heads {num_heads}")
        if min(window) < 1:
            raise InputError(f"WindowAttention: window must be positive, got {window}")
        self.dim = dim
        self.num_heads = num_heads
        self.window = window
        self.scale = (dim // num_heads) ** -0.5
        rows = (2 * window[0] - 1) * (2 * window[1] - 1) * (2 * window[2] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window),
                             persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def relative_bias(self, window: Sequence[int] | None = None) -> torch.Tensor:
        """Bias added to the attention logits: ``(heads, N, N)`` for ``window`` (default: the
        configured one; a smaller one reads the same table by offset)."""
        window = self.window if window is None else tuple(window)
        if window == self.window:
            index = self.relative_position_index
        else:
            index = relative_position_index(window, self.window).to(
                self.relative_position_bias_table.device)
        n = index.shape[0]
        bias = self.relative_position_bias_table[index.reshape(-1)]  # (N * N, heads)
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)  # (heads, N, N)

    def forward(self, x: torch.Tensor, window: Sequence[int] | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend within each window.

        Args:
            x: ``(B * nW, N, C)`` windows as from :func:`window_partition` (batch outermost).
            window: the window ``x`` was cut with (default: the configured one).
            mask: ``(nW, N, N)`` bool, True for forbidden (query, key) pairs, or None.
        Returns:
            ``(B * nW, N, C)``.
        Raises:
            InputError: ``N`` does not match the window, or the window count does not divide
                by the mask's.
        """
        window = self.window if window is None else tuple(window)
        bw, n, c = x.shape
        if n != window[0] * window[1] * window[2] or c != self.dim:
            raise InputError(f"WindowAttention: expected (B*nW, {window[0] * window[1] * window[2]}"
                             f", {self.dim}) for window {window}, got {tuple(x.shape)}")
        heads = self.num_heads
        qkv = self.qkv(x).view(bw, n, 3, heads, c // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B*nW, heads, N, C/heads)
        bias = self.relative_bias(window).to(q.dtype)  # (heads, N, N)
        if mask is None:
            attn_mask = bias.unsqueeze(0)  # (1, heads, N, N)
        else:
            n_win = mask.shape[0]
            if bw % n_win:
                raise InputError(f"WindowAttention: {bw} windows do not divide by the mask's "
                                 f"{n_win}")
            blocked = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
            blocked = blocked.masked_fill(mask, float("-inf"))
            attn_mask = bias.unsqueeze(0) + blocked.unsqueeze(1)  # (nW, heads, N, N)
            # (nW, heads, N, N) -> (B * nW, heads, N, N); a view when B == 1
            attn_mask = attn_mask.unsqueeze(0).expand(bw // n_win, -1, -1, -1, -1)
            attn_mask = attn_mask.reshape(bw, heads, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        out = out.transpose(1, 2).reshape(bw, n, c)  # (B*nW, heads, N, C/h) -> (B*nW, N, C)
        return self.proj(out)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, window={self.window}"


class SwinBlock(nn.Module):
    """One Swin Transformer block (pre-norm, two residual branches).

    ``x = x + DropPath(W-MSA(LayerNorm(x)))`` (windows shifted by ``window // 2`` per axis when
    ``shifted``), then ``x = x + DropPath(MLP(LayerNorm(x)))`` with
    ``MLP = Linear(C, rC) -> GELU -> Linear(rC, C)``, ``r = mlp_ratio``.

    Parameters: ``(3 + 1 + 2r) C^2 + (5 + r) C + heads (2 w0 - 1)(2 w1 - 1)(2 w2 - 1)``, plus
    ``3C`` with ``qkv_bias``.

    Args:
        dim: token width ``C``.
        num_heads: attention heads (``dim`` must divide by it).
        window: configured window ``(w0, w1, w2)`` in tokens.
        shifted: use the shifted-window partition (shift ``w_i // 2``).
        mlp_ratio: hidden width of the MLP over ``C``.
        qkv_bias: bias in the qkv projection.
        drop_path: stochastic-depth probability of both residual branches (training only).

    Raises:
        InputError: invalid sizes (see :class:`WindowAttention`, :class:`DropPath`).
    """

    def __init__(self, dim: int, num_heads: int, window: Sequence[int] = (7, 7, 7),
                 shifted: bool = False, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 drop_path: float = 0.0):
        super().__init__()
        window = _triple(window, "SwinBlock window")
        self.window = window
        self.shift = tuple(w // 2 for w in window) if shifted else (0, 0, 0)
        hidden = int(dim * mlp_ratio)
        if hidden <= 0:
            raise InputError(f"SwinBlock: mlp_ratio {mlp_ratio} gives no hidden units")
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)

    def _mix(self, x: torch.Tensor) -> torch.Tensor:
        """(Shifted-)window attention on a normalised grid ``(B, G0, G1, G2, C)``."""
        grid = tuple(x.shape[1:4])
        window, shift = fit_window(grid, self.window, self.shift)
        padded = padded_grid(grid, window)
        pad = [p - g for p, g in zip(padded, grid)]
        if any(pad):
            # zero tokens at the high end of each axis: (C, G2, G1, G0) pairs of F.pad
            x = F.pad(x, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
        shifted = any(shift)
        if shifted:
            x = torch.roll(x, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
            mask = shifted_window_mask(padded, window, shift, device=x.device)
        else:
            mask = None
        windows = window_partition(x, window)  # (B*nW, N, C)
        windows = self.attn(windows, window=window, mask=mask)
        x = window_reverse(windows, window, padded)  # (B, P0, P1, P2, C)
        if shifted:
            x = torch.roll(x, shifts=shift, dims=(1, 2, 3))
        if any(pad):
            x = x[:, :grid[0], :grid[1], :grid[2]]
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, G0, G1, G2, C)`` token grid, any positive grid size; returns the same
        shape.

        Raises:
            InputError: ``x`` is not 5D or its width is not ``dim``.
        """
        if x.dim() != 5 or x.shape[-1] != self.attn.dim:
            raise InputError(f"SwinBlock: expected (B, G0, G1, G2, {self.attn.dim}), got "
                             f"{tuple(x.shape)}")
        x = x + self.drop_path(self._mix(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SwinStage(nn.Module):
    """``depth`` Swin blocks of one width; blocks 1, 3, ... use shifted windows.

    The token mixer of one TransMorph stage, with the stage interface of
    :class:`~mambamorph.nn.blocks.RegistrationUNet` (``stage(x, grid)`` on raster-order tokens);
    the stage's output norm and patch merging belong to that backbone.

    Args:
        dim: token width ``C``.
        depth: number of blocks.
        num_heads: attention heads per block.
        window: configured window ``(w0, w1, w2)`` in tokens.
        mlp_ratio: hidden width of the MLPs over ``C``.
        qkv_bias: bias in the qkv projections.
        drop_path: stochastic-depth probability, one per block or one for all.

    Raises:
        InputError: ``depth < 1``, a ``drop_path`` list of the wrong length, or invalid sizes.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, window: Sequence[int] = (7, 7, 7),
                 mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 drop_path: float | Sequence[float] = 0.0):
        super().__init__()
        if depth < 1:
            raise InputError(f"SwinStage: depth must be >= 1, got {depth}")
        rates = [float(drop_path)] * depth if isinstance(drop_path, (int, float)) \
            else [float(p) for p in drop_path]
        if len(rates) != depth:
            raise InputError(f"SwinStage: {len(rates)} drop-path rates for {depth} blocks")
        self.dim = dim
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window, shifted=bool(i % 2), mlp_ratio=mlp_ratio,
                      qkv_bias=qkv_bias, drop_path=rates[i])
            for i in range(depth))

    def forward(self, x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """Tokens ``(B, G0*G1*G2, C)`` in raster order of ``grid = (G0, G1, G2)`` -> same shape.

        Raises:
            InputError: the token count does not fill ``grid`` or the width is not ``dim``.
        """
        grid = tuple(int(g) for g in grid)
        if x.dim() != 3 or len(grid) != 3 or x.shape[1] != grid[0] * grid[1] * grid[2] \
                or x.shape[2] != self.dim:
            raise InputError(f"SwinStage: expected tokens (B, prod{grid}, {self.dim}), got "
                             f"{tuple(x.shape)}")
        b = x.shape[0]
        v = x.reshape(b, *grid, self.dim)  # (B, L, C) -> (B, G0, G1, G2, C)
        for block in self.blocks:
            v = block(v)
        return v.reshape(b, -1, self.dim)  # (B, G0, G1, G2, C) -> (B, L, C)
