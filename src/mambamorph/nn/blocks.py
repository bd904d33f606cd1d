"""Layers shared by the registration models: conv blocks, a token U-Net backbone, a conv U-Net.

Two families of networks are assembled from these pieces:

- :class:`RegistrationUNet`, the TransMorph-style backbone used by MambaMorph and TransMorph
  (SPEC.md §1): a convolutional skip branch (:class:`ConvSkipBranch`), a patch embedding with an
  optional fixed sinusoidal position code (:class:`PatchEmbed`, :func:`sinusoidal_position_code`),
  a stack of token stages joined by :class:`PatchMerging`, a decoder of :class:`DecoderBlock`
  and a :class:`FlowHead`. The per-stage *token mixer* is pluggable: any module with
  ``forward(x, grid) -> y`` on ``(B, L, C)`` tokens (Mamba for MambaMorph, Swin blocks for
  TransMorph). Model files only define their stage modules.
- :class:`ConvUNet`, the VoxelMorph U-Net (conv + LeakyReLU(0.2), max-pooling, nearest
  upsampling, concatenated skips), used by VoxelMorph and by the feature extractor.

Tokens, the position code, patch embedding and merging live in :mod:`mambamorph.nn.tokens`.
Nothing here holds a buffer, so ``state_dict()`` holds weights only and one network runs at any
admissible input size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from mambamorph.errors import InputError
from mambamorph.nn.tokens import PatchEmbed, PatchMerging, tokens_to_volume

__all__ = [
    "InstanceNorm3d", "ConvINAct", "ConvAct", "BoxPool3d", "ConvSkipBranch", "DecoderBlock", "FlowHead",
    "RegistrationUNet", "ConvUNet", "check_pair", "maybe_checkpoint",
]


def maybe_checkpoint(enabled: bool, fn, *args):
    """Run ``fn(*args)``, through gradient checkpointing when ``enabled`` and autograd records.

    Checkpointing (``torch.utils.checkpoint``, non-reentrant) keeps only ``fn``'s inputs for the
    backward pass and recomputes its inside there: same values and gradients, less memory.
    ``args`` may mix tensors and plain Python values.

    Args:
        enabled: checkpoint or call ``fn`` directly.
        fn: the function or module to run.
        *args: its positional arguments.
    Returns:
        ``fn(*args)``.
    """
    if enabled and torch.is_grad_enabled():
        return _checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


# ---------------------------------------------------------------------------------------------
# Convolution blocks
# ---------------------------------------------------------------------------------------------
class InstanceNorm3d(nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` that keeps a channels-last input channels-last.

    torch's instance norm returns a contiguous tensor whatever its input, so in a channels-last
    network (``predict`` on the CPU) every :class:`ConvINAct` paid a layout copy before its next
    convolution (0.8 s of a 176x208x192 ``mambamorph`` pass on 2 cores), and the decoder
    upsampled contiguous tensors, ~3x slower than channels-last ones. Without affine
    parameters or running statistics, the instance norm of sample ``b`` is the batch norm (batch
    statistics) of its ``(D0 D1 D2, C)`` view, which is what a channels-last tensor's memory
    already is; same numbers to float rounding (test in ``tests/test_blocks.py``). Any other
    input (contiguous, affine, running statistics) takes torch's path. No parameters or buffers
    beyond ``nn.InstanceNorm3d``'s: checkpoints are unchanged.

    ``(B, C, D0, D1, D2) -> (B, C, D0, D1, D2)``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cl = torch.channels_last_3d
        if (self.affine or self.track_running_stats or x.dim() != 5 or x.is_contiguous()
                or not x.is_contiguous(memory_format=cl)):
            return super().forward(x)
        b, c = x.shape[:2]
        rows = x.permute(0, 2, 3, 4, 1).reshape(b, -1, c)  # a view of channels-last memory
        outs = [F.batch_norm(rows[i], None, None, training=True, eps=self.eps) for i in range(b)]
        y = outs[0].unsqueeze(0) if b == 1 else torch.stack(outs)
        return y.view(b, *x.shape[2:], c).permute(0, 4, 1, 2, 3)


class ConvINAct(nn.Sequential):
    """Conv3d (no bias) -> InstanceNorm3d (no affine) -> LeakyReLU: TransMorph's conv block.

    ``(B, in_channels, D0, D1, D2) -> (B, out_channels, D0', D1', D2')`` (same size for the
    default ``kernel_size=3, stride=1``; padding is ``kernel_size // 2``).

    Args:
        in_channels, out_channels: channel counts.
        kernel_size: cubic kernel edge (odd).
        stride: convolution stride.
        negative_slope: LeakyReLU slope (0.01, PyTorch's default, in the reference).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 negative_slope: float = 0.01) -> None:
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride,
                      padding=kernel_size // 2, bias=False),
            InstanceNorm3d(out_channels, affine=False),
            nn.LeakyReLU(negative_slope),
        )


class ConvAct(nn.Sequential):
    """Conv3d (with bias) -> LeakyReLU: VoxelMorph's conv block.

    ``(B, in_channels, D0, D1, D2) -> (B, out_channels, D0 / stride, ...)`` (padding
    ``kernel_size // 2``). Weights are Kaiming-normal initialised (fan-in, gain for ReLU) and
    biases zero, as in voxelmorph.

    Args:
        in_channels, out_channels: channel counts.
        kernel_size: cubic kernel edge (odd).
        stride: convolution stride.
        negative_slope: LeakyReLU slope (0.2 in voxelmorph).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 negative_slope: float = 0.2) -> None:
        conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride,
                         padding=kernel_size // 2, bias=True)
        nn.init.kaiming_normal_(conv.weight)
        nn.init.zeros_(conv.bias)
        super().__init__(conv, nn.LeakyReLU(negative_slope))


class BoxPool3d(nn.Module):
    """``AvgPool3d(3, stride=2, padding=1)`` (zero padding counted, ``count_include_pad=True``)
    computed as a depthwise convolution with weights 1/27: the same numbers to float rounding,
    but oneDNN's convolution is an order of magnitude faster than torch's 3D average pooling on
    channels-last tensors on the CPU (the format :func:`mambamorph.models.predict` uses), and it
    runs in bfloat16 under autocast. No parameters: checkpoints are unchanged.

    ``(B, C, D0, D1, D2)`` -> ``(B, C, ceil(D0/2), ceil(D1/2), ceil(D2/2))``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        weight = torch.full((c, 1, 3, 3, 3), 1.0 / 27.0, device=x.device, dtype=x.dtype)
        return F.conv3d(x, weight, stride=2, padding=1, groups=c)


class ConvSkipBranch(nn.Module):
    """The full-volume convolutional skip branch of the TransMorph-style backbone.

    ``f_full = ConvINAct(x)`` at full resolution and ``f_half = ConvINAct(AvgPool3d(3, 2, 1)(x))``
    at half resolution.

    Args:
        in_channels: channels of the network input.
        full_channels: channels of ``f_full`` (16 in the reference).
        half_channels: channels of ``f_half`` (``embed_dim // 2`` = 48 in the reference).
        checkpoint: recompute the full-resolution conv in the backward pass (saves memory).
    """

    def __init__(self, in_channels: int, full_channels: int = 16, half_channels: int = 48,
                 checkpoint: bool = False) -> None:
        super().__init__()
        self.full_conv = ConvINAct(in_channels, full_channels)
        self.half_conv = ConvINAct(in_channels, half_channels)
        self.pool = BoxPool3d()  # = AvgPool3d(3, stride=2, padding=1), faster on the CPU
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, D0, D1, D2)`` -> ``f_full (B, full, D0, D1, D2)``,
        ``f_half (B, half, ceil(D0/2), ceil(D1/2), ceil(D2/2))``."""
        f_full = maybe_checkpoint(self.checkpoint and self.training, self.full_conv, x)
        f_half = self.half_conv(self.pool(x))
        return f_full, f_half


# ---------------------------------------------------------------------------------------------
# Decoder and head
# ---------------------------------------------------------------------------------------------
class DecoderBlock(nn.Module):
    """TransMorph's ``Up``: trilinear x2 upsampling -> concat skip -> 2 x :class:`ConvINAct`.

    ``x (B, in, S0, S1, S2)``, ``skip (B, skip, 2 S0, 2 S1, 2 S2)`` ->
    ``(B, out, 2 S0, 2 S1, 2 S2)``. Upsampling uses ``align_corners=False`` (as the reference);
    with a skip the output takes the skip's spatial size.

    Args:
        in_channels, out_channels, skip_channels: channel counts (``skip_channels=0``: no skip).
    """

    def __init__(self, in_channels: int, out_channels: int, skip_channels: int = 0) -> None:
        super().__init__()
        self.skip_channels = int(skip_channels)
        self.conv1 = ConvINAct(in_channels + skip_channels, out_channels)
        self.conv2 = ConvINAct(out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """See the class docstring.

        Raises:
            InputError: a skip is missing, unexpected, or has the wrong channel count.
        """
        if (skip is None) != (self.skip_channels == 0):
            raise InputError(f"DecoderBlock: built with skip_channels={self.skip_channels}, "
                             f"got skip={'None' if skip is None else tuple(skip.shape)}")
        if skip is not None:
            if skip.shape[1] != self.skip_channels:
                raise InputError(f"DecoderBlock: expected a skip with {self.skip_channels} "
                                 f"channels, got {skip.shape[1]}")
            x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
            x = torch.cat([x, skip], dim=1)
        else:
            x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
        return self.conv2(self.conv1(x))


class FlowHead(nn.Conv3d):
    """Conv3d(in -> 3, k3, p1) with weights N(0, 1e-5) and zero bias: a near-zero initial field.

    ``(B, in, D0, D1, D2) -> (B, 3, D0, D1, D2)`` (voxels; velocity or displacement, by model).

    Args:
        in_channels: input channels (16 in the reference).
        out_channels: field components (3).
        init_std: standard deviation of the initial weights.
    """

    def __init__(self, in_channels: int = 16, out_channels: int = 3,
                 init_std: float = 1e-5) -> None:
        super().__init__(in_channels, out_channels, kernel_size=3, padding=1, bias=True)
        nn.init.normal_(self.weight, 0.0, init_std)
        nn.init.zeros_(self.bias)


# ---------------------------------------------------------------------------------------------
# The TransMorph-style backbone with pluggable token stages
# ---------------------------------------------------------------------------------------------
class RegistrationUNet(nn.Module):
    """TransMorph-style registration backbone with pluggable token stages (SPEC.md §1 steps 1-5).

    ``x (B, in_channels, D0, D1, D2)`` (the moving and fixed images, or their features,
    stacked) -> head output ``(B, 3, D0, D1, D2)``. Each ``D_i`` must be a multiple of
    ``patch_size * 2 ** (len(stages) - 1)`` (16 for the reference).

    Dataflow with ``n = len(stages)``, ``C_i = embed_dim * 2**i``:

    1. ``f_full, f_half = ConvSkipBranch(x)`` (``head_channels`` and ``embed_dim // 2``).
    2. tokens = :class:`PatchEmbed` (``patch_size``, optional position code).
    3. stage ``i``: ``y = stages[i](x, grid)`` (``(B, L, C_i) -> (B, L, C_i)``); the skip is
       ``LayerNorm(y)``; for ``i < n - 1`` the next stage's input is ``PatchMerging(y)``.
    4. decoder: from the deepest normalised output, ``DecoderBlock(C_{i+1}, C_i, C_i)`` with
       the stage-``i`` skip for ``i = n-2 .. 0``, then ``DecoderBlock(C_0, C_0/2, C_0/2)`` with
       ``f_half`` and ``DecoderBlock(C_0/2, head, head)`` with ``f_full``.
    5. :class:`FlowHead` ``(head -> 3)``.

    Args:
        in_channels: channels of ``x``.
        stages: one token mixer per stage, stage ``i`` of width ``embed_dim * 2**i``. A stage is
            any module called as ``stage(x, grid)`` with tokens ``x (B, L, C)`` in raster order of
            ``grid = (G0, G1, G2)``, returning ``(B, L, C)`` (it must not change the width).
        embed_dim: token width of stage 0 (even).
        head_channels: channels of the last decoder block and of ``f_full``.
        patch_size: patch edge of the embedding.
        position_code: add the fixed sinusoidal position code after the embedding.
        checkpoint: gradient checkpointing of the stages, the two finest decoder blocks and the
            full-resolution skip conv (same results, less memory, ~1 extra forward of them).
    Raises:
        InputError: no stages or an odd ``embed_dim``.
    """

    def __init__(self, in_channels: int, stages: Sequence[nn.Module], embed_dim: int = 96,
                 head_channels: int = 16, patch_size: int = 4, position_code: bool = True,
                 checkpoint: bool = False) -> None:
        super().__init__()
        if len(stages) < 1:
            raise InputError("RegistrationUNet: expected at least one stage")
        if embed_dim % 2:
            raise InputError(f"RegistrationUNet: expected an even embed_dim, got {embed_dim}")
        n = len(stages)
        dims = [embed_dim * 2 ** i for i in range(n)]
        self.in_channels = int(in_channels)
        self.patch_size = int(patch_size)
        self.checkpoint = bool(checkpoint)
        self.skip_branch = ConvSkipBranch(in_channels, head_channels, embed_dim // 2,
                                          checkpoint=checkpoint)
        self.patch_embed = PatchEmbed(in_channels, embed_dim, patch_size, position_code)
        self.stages = nn.ModuleList(stages)
        self.stage_norms = nn.ModuleList(nn.LayerNorm(d) for d in dims)
        self.merges = nn.ModuleList(PatchMerging(d, 2 * d) for d in dims[:-1])
        self.token_decoder = nn.ModuleList(
            DecoderBlock(dims[i + 1], dims[i], dims[i]) for i in reversed(range(n - 1)))
        self.up_half = DecoderBlock(embed_dim, embed_dim // 2, embed_dim // 2)
        self.up_full = DecoderBlock(embed_dim // 2, head_channels, head_channels)
        self.head = FlowHead(head_channels, 3)

    @property
    def size_multiple(self) -> int:
        """Input dims must be multiples of this (``patch_size * 2 ** (stages - 1)``)."""
        return self.patch_size * 2 ** (len(self.stages) - 1)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Token encoder only: the normalised stage outputs as volumes, finest first.

        ``x (B, in, D0, D1, D2)`` -> ``[(B, C_i, D0 / (p 2^i), ...)]`` for ``i = 0 .. n-1``.
        """
        tokens, grid = self.patch_embed(x)
        outs = []
        for i, stage in enumerate(self.stages):
            y = maybe_checkpoint(self.checkpoint and self.training, stage, tokens, grid)
            outs.append(tokens_to_volume(self.stage_norms[i](y), grid))
            if i < len(self.merges):
                tokens, grid = self.merges[i](y, grid)
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, D0, D1, D2)`` -> head output ``(B, 3, D0, D1, D2)``.

        Raises:
            InputError: wrong channel count or dims that are not multiples of
                :attr:`size_multiple`.
        """
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise InputError(f"RegistrationUNet: expected (B, {self.in_channels}, D0, D1, D2), "
                             f"got {tuple(x.shape)}")
        m = self.size_multiple
        if any(d % m for d in x.shape[2:]):
            raise InputError(f"RegistrationUNet: input dims {tuple(x.shape[2:])} must be "
                             f"multiples of {m}")
        f_full, f_half = self.skip_branch(x)
        outs = self.encode(x)
        y = outs[-1]
        for block, skip in zip(self.token_decoder, reversed(outs[:-1])):
            y = block(y, skip)
        ckpt = self.checkpoint and self.training
        y = maybe_checkpoint(ckpt, self.up_half, y, f_half)
        y = maybe_checkpoint(ckpt, self.up_full, y, f_full)
        return self.head(y)


# ---------------------------------------------------------------------------------------------
# The VoxelMorph U-Net
# ---------------------------------------------------------------------------------------------
class ConvUNet(nn.Module):
    """VoxelMorph's U-Net: one :class:`ConvAct` per level, max-pooling, nearest upsampling.

    With ``enc = [e_1 .. e_k]`` and ``dec = [d_1 .. d_m]`` (``m >= k``):

    - encoder level ``j`` (resolution ``1 / 2**(j-1)``): ``ConvAct(-> e_j)``, kept as a skip,
      then ``MaxPool3d(2)``;
    - decoder level ``j = 1 .. k`` (from ``1 / 2**k`` up): ``ConvAct(-> d_j)``, nearest x2,
      concatenate the skip of the matching encoder level (with ``half_res`` the last level
      skips the upsampling and the concatenation, so the output is at half resolution);
    - then ``ConvAct(-> d_j)`` for each remaining ``d_{k+1} .. d_m`` at the output resolution.

    ``x (B, in_channels, D0, D1, D2)`` -> ``(B, dec[-1], D0, D1, D2)`` (halved with
    ``half_res``); each ``D_i`` must be a multiple of ``2 ** len(enc)``.

    Args:
        in_channels: input channels.
        enc_features, dec_features: channel lists (``len(dec) >= len(enc) >= 1``).
        half_res: skip the last upsampling (output at half resolution).
        negative_slope: LeakyReLU slope (0.2).
        checkpoint: gradient checkpointing of the full-resolution convs.
    Raises:
        InputError: inconsistent feature lists.
    """

    def __init__(self, in_channels: int, enc_features: Sequence[int],
                 dec_features: Sequence[int], half_res: bool = False,
                 negative_slope: float = 0.2, checkpoint: bool = False) -> None:
        super().__init__()
        enc, dec = [int(c) for c in enc_features], [int(c) for c in dec_features]
        if not enc or len(dec) < len(enc) or min(enc + dec) < 1:
            raise InputError(f"ConvUNet: expected non-empty positive channel lists with "
                             f"len(dec) >= len(enc), got enc={enc}, dec={dec}")
        k = len(enc)
        self.in_channels = int(in_channels)
        self.half_res = bool(half_res)
        self.checkpoint = bool(checkpoint)
        self.encoder = nn.ModuleList()
        prev, skips = in_channels, []
        for c in enc:
            self.encoder.append(ConvAct(prev, c, negative_slope=negative_slope))
            skips.append(c)
            prev = c
        self.decoder = nn.ModuleList()
        for j, c in enumerate(dec[:k]):
            self.decoder.append(ConvAct(prev, c, negative_slope=negative_slope))
            prev = c
            if not (half_res and j == k - 1):
                prev += skips[k - 1 - j]
        self.remaining = nn.ModuleList()
        for c in dec[k:]:
            self.remaining.append(ConvAct(prev, c, negative_slope=negative_slope))
            prev = c
        self.out_channels = prev

    @property
    def size_multiple(self) -> int:
        """Input dims must be multiples of this (``2 ** len(enc_features)``)."""
        return 2 ** len(self.encoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """See the class docstring.

        Raises:
            InputError: wrong channel count or dims not multiples of :attr:`size_multiple`.
        """
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise InputError(f"ConvUNet: expected (B, {self.in_channels}, D0, D1, D2), got "
                             f"{tuple(x.shape)}")
        m = self.size_multiple
        if any(d % m for d in x.shape[2:]):
            raise InputError(f"ConvUNet: input dims {tuple(x.shape[2:])} must be multiples of {m}")
        ckpt = self.checkpoint and self.training
        skips = []
        for level, conv in enumerate(self.encoder):
            x = maybe_checkpoint(ckpt and level == 0, conv, x)
            skips.append(x)
            x = F.max_pool3d(x, 2)
        k = len(self.decoder)
        for j, conv in enumerate(self.decoder):
            x = conv(x)
            if not (self.half_res and j == k - 1):
                skip = skips.pop()
                x = F.interpolate(x, size=skip.shape[2:], mode="nearest")
                x = torch.cat([x, skip], dim=1)
        full_res = not self.half_res
        for conv in self.remaining:
            x = maybe_checkpoint(ckpt and full_res, conv, x)
        return x


def check_pair(moving: torch.Tensor, fixed: torch.Tensor, in_channels: int,
               multiple: int, model: str) -> None:
    """Validate a ``(moving, fixed)`` pair for a model's ``forward``.

    Args:
        moving, fixed: ``(B, in_channels, D0, D1, D2)`` each, same shape.
        in_channels: expected channels per image.
        multiple: every ``D_i`` must be a multiple of it.
        model: name used in the message.
    Raises:
        InputError: any mismatch, with the shapes in the message.
    """
    for name, t in (("moving", moving), ("fixed", fixed)):
        if t.dim() != 5 or t.shape[1] != in_channels:
            raise InputError(f"{model}: expected {name} (B, {in_channels}, D0, D1, D2), got "
                             f"{tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise InputError(f"{model}: expected a floating {name} image, got {t.dtype}")
    if moving.shape != fixed.shape:
        raise InputError(f"{model}: moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} "
                         f"differ in shape")
    if any(d % multiple for d in moving.shape[2:]):
        raise InputError(f"{model}: image dims {tuple(moving.shape[2:])} must be multiples of "
                         f"{multiple} (crop or pad them first)")
