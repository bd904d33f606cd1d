"""TransMorph: the Swin-Transformer baseline (SPEC.md section 3), with and without MambaMorph's
fine-grained feature extractor.

The network is MambaMorph's backbone (:class:`~mambamorph.nn.blocks.RegistrationUNet`: the
convolutional skip branch, patch embedding, patch merging, per-stage output norms, TransMorph
decoder and flow head) with a Swin stage (:class:`~mambamorph.nn.swin.SwinStage`) as the token
mixer of each of the three stages:

- widths 96 / 192 / 384, depths (2, 2, 4), heads (4, 4, 8), window (5, 6, 7) tokens, MLP ratio
  4, no qkv bias, relative position bias; blocks alternate plain and shifted windows;
- stochastic depth rising linearly from 0 to ``drop_path_rate`` (0.3) over the 8 blocks
  (training mode only);
- no position code: the reference configuration of TransMorph disables both the learned and
  the sinusoidal absolute codes (the relative bias is its only position information);
- the head output IS the displacement (no integration), in voxels, ``velocity=None``.

Token grids that do not tile into windows are zero-padded; a window larger than the grid along
an axis is clamped to it and that axis is not shifted (see :mod:`mambamorph.nn.swin`). At the
reference size (176, 208, 192) no axis is clamped and the model computes what the reference does.

Parameters (all trainable):

============================ ============ ==================================================
model                        parameters   made of
============================ ============ ==================================================
``transmorph``               14,287,299   Swin blocks 8,266,704; patch merging 741,888;
                                          patch embedding 12,576; stage norms 1,344;
                                          decoder 5,260,032; skip branch 3,456; head 1,299
``transmorph-feat``          14,572,371   the above with 32 input channels (+236,160) and
                                          the shared feature extractor (48,912)
============================ ============ ==================================================

The reference's TransMorph-with-features has no read-out head (unlike its MambaMorph-with-
features), so nothing is dropped here: both counts equal SPEC.md's exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from mambamorph.models.config import ModelConfig, at_least, token_stage_problems
from mambamorph.models.registry import RegistrationOutput, register_model
from mambamorph.nn.blocks import RegistrationUNet, check_pair
from mambamorph.nn.features import FeatureExtractor
from mambamorph.nn.swin import SwinStage

__all__ = ["TransMorphConfig", "TransMorph"]


@dataclass
class TransMorphConfig(ModelConfig):
    """Hyper-parameters of :class:`TransMorph`; ``build_model(name, **asdict(cfg))`` rebuilds it.

    Attributes:
        in_channels: channels of each input image.
        use_features: run both images through the shared fine-grained feature extractor first
            (``transmorph-feat``); otherwise the two images are stacked as channels.
        feature_channels: width of the feature extractor (16).
        embed_dim: token width of stage 0; stage ``i`` has ``embed_dim * 2**i``.
        depths: Swin blocks per stage.
        num_heads: attention heads per stage (stage width must divide by it).
        window_size: attention window in tokens per axis (clamped to small token grids).
        mlp_ratio: hidden width of the MLPs over the token width.
        qkv_bias: bias in the qkv projections (the reference: none).
        drop_path_rate: stochastic depth of the last block; rates rise linearly from 0 over all
            blocks.
        patch_size: patch edge of the embedding.
        head_channels: channels of the last decoder block and the full-resolution skip (16).
        position_code: add MambaMorph's fixed sinusoidal position code after the embedding (the
            reference TransMorph does not).
        checkpoint: gradient checkpointing (same result, less memory, slower backward).

    Raises:
        InputError: values of the wrong type, inconsistent or out of range (checked at
            construction; see :class:`~mambamorph.models.config.ModelConfig`).
    """

    in_channels: int = 1
    use_features: bool = False
    feature_channels: int = 16
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 4)
    num_heads: tuple[int, ...] = (4, 4, 8)
    window_size: tuple[int, int, int] = (5, 6, 7)
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    drop_path_rate: float = 0.3
    patch_size: int = 4
    head_channels: int = 16
    position_code: bool = False
    checkpoint: bool = False

    NAME = "transmorph"

    def problems(self) -> Iterator[str]:
        yield from at_least(self, 1, "in_channels", "feature_channels", "head_channels")
        yield from token_stage_problems(self)


class TransMorph(nn.Module):
    """TransMorph registration network (see the module docstring).

    ``forward(moving, fixed)``: two ``(B, in_channels, D0, D1, D2)`` images, every ``D_i`` a
    multiple of :attr:`size_multiple` (16 by default) -> :class:`RegistrationOutput` with the
    displacement ``flow (B, 3, D0, D1, D2)`` in voxels (channel ``i`` along array axis ``i``)
    and ``velocity=None``.

    Args:
        config: hyper-parameters (default: the reference's ``transmorph``).
    """

    def __init__(self, config: TransMorphConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config if config is not None else TransMorphConfig()
        if cfg.use_features:
            self.features = FeatureExtractor(cfg.in_channels, cfg.feature_channels,
                                             checkpoint=cfg.checkpoint)
            net_in = 2 * cfg.feature_channels
        else:
            self.features = None
            net_in = 2 * cfg.in_channels
        n_blocks = sum(cfg.depths)
        rates = torch.linspace(0.0, cfg.drop_path_rate, n_blocks).tolist()
        stages, start = [], 0
        for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads)):
            stages.append(SwinStage(cfg.embed_dim * 2 ** i, depth, heads, cfg.window_size,
                                    mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
                                    drop_path=rates[start:start + depth]))
            start += depth
        self.registration = RegistrationUNet(net_in, stages, embed_dim=cfg.embed_dim,
                                             head_channels=cfg.head_channels,
                                             patch_size=cfg.patch_size,
                                             position_code=cfg.position_code,
                                             checkpoint=cfg.checkpoint)

    @property
    def size_multiple(self) -> int:
        """Input dims must be multiples of this (16 for the reference configuration)."""
        m = self.registration.size_multiple
        if self.features is not None:
            m = math.lcm(m, self.features.size_multiple)
        return m

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> RegistrationOutput:
        """Predict the displacement that warps ``moving`` onto ``fixed``.

        Args:
            moving, fixed: ``(B, in_channels, D0, D1, D2)`` float images of one shape.
        Returns:
            :class:`RegistrationOutput` with ``flow (B, 3, D0, D1, D2)`` in voxels,
            ``velocity=None``.
        Raises:
            InputError: wrong channels, mismatched shapes, non-float images or dims that are not
                multiples of :attr:`size_multiple`.
        """
        check_pair(moving, fixed, self.config.in_channels, self.size_multiple, "transmorph")
        if self.features is not None:
            x = self.features.pair(moving, fixed)  # (B, 2F, D0, D1, D2)
        else:
            x = torch.cat([moving, fixed], dim=1)  # (B, 2 in, D0, D1, D2)
        return RegistrationOutput(flow=self.registration(x), velocity=None)


@register_model("transmorph")
def transmorph(**overrides) -> TransMorph:
    """TransMorph (Swin backbone, 14,287,299 parameters); ``overrides``: TransMorphConfig."""
    return TransMorph(TransMorphConfig.from_overrides(**overrides))


@register_model("transmorph-feat")
def transmorph_feat(**overrides) -> TransMorph:
    """TransMorph with the fine-grained feature extractor (14,572,371 parameters)."""
    return TransMorph(TransMorphConfig.from_overrides(**{"use_features": True, **overrides}))
