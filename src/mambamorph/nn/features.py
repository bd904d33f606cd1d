"""MambaMorph's fine-grained feature extractor (SPEC.md §2) and the reference's read-out head.

The extractor is a small VoxelMorph U-Net (:class:`~mambamorph.nn.blocks.ConvUNet`) applied with
SHARED weights to the moving and the fixed image; its two outputs are concatenated before the
registration network. With 16 channels::

    enc  1 -> 16 (full), maxpool, 16 -> 16 (1/2), maxpool
    dec 16 -> 16 (1/4), nearest x2, concat -> 32, 32 -> 16 (1/2), nearest x2, concat -> 32,
        32 -> 16 (full), 16 -> 16 (full)

Conv3d k3 p1 with bias -> LeakyReLU(0.2) everywhere: 48,912 parameters for one input channel.
"""

from __future__ import annotations

import torch
from torch import nn

from mambamorph.nn.blocks import ConvAct, ConvUNet, maybe_checkpoint

__all__ = ["FeatureExtractor", "ReadoutHead"]


class FeatureExtractor(nn.Module):
    """Two-level U-Net mapping an image to ``channels`` feature maps at full resolution.

    ``(B, in_channels, D0, D1, D2) -> (B, channels, D0, D1, D2)``; dims must be multiples of 4.

    Args:
        in_channels: channels of one image (1 for MR / CT).
        channels: width of every layer (16 in the paper).
        checkpoint: gradient checkpointing of the whole extractor (in training, only its input is
            kept for the backward pass, which recomputes it).
    """

    def __init__(self, in_channels: int = 1, channels: int = 16, checkpoint: bool = False) -> None:
        super().__init__()
        self.unet = ConvUNet(in_channels, [channels] * 2, [channels] * 4)
        self.in_channels = int(in_channels)
        self.out_channels = int(channels)
        self.checkpoint = bool(checkpoint)

    @property
    def size_multiple(self) -> int:
        """Input dims must be multiples of this (4)."""
        return self.unet.size_multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, D0, D1, D2)`` -> features ``(B, channels, D0, D1, D2)``.

        Raises:
            InputError: wrong channel count or dims not multiples of 4.
        """
        return maybe_checkpoint(self.checkpoint and self.training, self.unet, x)

    def pair(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """Features of both images (shared weights), concatenated: ``(B, 2 * channels, ...)``.

        The two images go through the network as one batch of ``2B``.
        """
        b = moving.shape[0]
        feats = self(torch.cat([moving, fixed], dim=0))  # (2B, C, D0, D1, D2)
        return torch.cat([feats[:b], feats[b:]], dim=1)  # -> (B, 2C, D0, D1, D2)


class ReadoutHead(nn.Sequential):
    """The reference's read-out head for feature contrastive learning (unused by registration).

    ``ConvAct(C -> C/2, k3, stride 2)`` then ``ConvAct(C/2 -> 3, k3)`` (LeakyReLU 0.2 after both):
    ``(B, C, D0, D1, D2) -> (B, 3, D0/2, D1/2, D2/2)``. For ``C = 16``: 4,115 parameters. The
    reference counts it in MambaMorph's 7,594,646 parameters although no loss uses it; models here
    build it only with ``readout_head=True``.

    Args:
        channels: feature channels ``C`` (even).
    """

    def __init__(self, channels: int = 16) -> None:
        super().__init__(ConvAct(channels, channels // 2, stride=2), ConvAct(channels // 2, 3))
