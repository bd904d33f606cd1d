"""VoxelMorph baseline (``voxelmorph``, ``voxelmorph-feat``), as the MambaMorph reference runs it.

Network (SPEC.md §3): the moving and fixed images (or their features, see below) are stacked and
passed through the VoxelMorph U-Net (:class:`~mambamorph.nn.blocks.ConvUNet`: Conv3d k3 with bias
-> LeakyReLU(0.2), max-pooling, nearest upsampling) at full resolution, then the flow head
(Conv3d 16 -> 3, weights N(0, 1e-5), bias 0) gives a velocity field. As in voxelmorph's default
``int_downsize=2``, that field is resized to half resolution, integrated there by scaling and
squaring (7 steps) and the displacement is resized back to the input grid.

Configurations and parameter counts (one input channel per image):

============================  ====================================================  ==========
name / option                 U-Net features (encoder / decoder)                    parameters
============================  ====================================================  ==========
``voxelmorph`` (default)      [16]*4 / [16]*6 (the reference training script)           92,179
``voxelmorph``,               [16, 32, 32, 32] / [32, 32, 32, 32, 32, 16, 16]          327,331
``config="paper"``            (voxelmorph's own default, "vm2")
``voxelmorph-feat``           [16]*4 / [16]*6 on 2 x 16 extracted feature channels     154,051
``voxelmorph-feat``,          the same plus the unused read-out head                   158,166
``readout_head=True``
============================  ====================================================  ==========

The paper's table lists 0.33M parameters for VoxelMorph while the reference training script
builds 0.09M (its default features are ``[16]*4 / [16]*6``). voxelmorph's own default U-Net
features ("vm2") give 327,331 = 0.33M with the same layers, so ``config="paper"`` selects them.

Differences from the reference code, on purpose: the velocity is resized with
:func:`~mambamorph.nn.spatial.resize_flow`, whose vector scaling ``(S - 1) / (D - 1)`` matches
the ``align_corners=True`` grids (the reference scales by exactly 1/2 and 2); grids are computed
from the input shape, so one model runs at any size whose dims are multiples of 16 (and of
``int_downsize``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from mambamorph.models.config import ModelConfig, at_least
from mambamorph.models.registry import ReadoutMixin, RegistrationOutput, register_model
from mambamorph.nn.blocks import ConvUNet, FlowHead, check_pair, maybe_checkpoint
from mambamorph.nn.features import FeatureExtractor, ReadoutHead
from mambamorph.nn.spatial import integrate_velocity, resize_flow

__all__ = ["VoxelMorphConfig", "VoxelMorph", "VOXELMORPH_PRESETS"]

#: U-Net feature presets selectable with ``build_model("voxelmorph", config=NAME)``.
VOXELMORPH_PRESETS: dict[str, dict[str, tuple[int, ...]]] = {
    "code": {"enc_features": (16, 16, 16, 16), "dec_features": (16, 16, 16, 16, 16, 16)},
    "paper": {"enc_features": (16, 32, 32, 32), "dec_features": (32, 32, 32, 32, 32, 16, 16)},
}


@dataclass
class VoxelMorphConfig(ModelConfig):
    """Hyper-parameters of :class:`VoxelMorph`; ``build_model(name, **asdict(cfg))`` rebuilds it.

    Attributes:
        in_channels: channels of each input image.
        use_features: run the shared feature extractor on each image first (``voxelmorph-feat``).
        feature_channels: width of the feature extractor.
        readout_head: also build the reference's unused read-out head (parameter parity only;
            needs ``use_features``).
        enc_features, dec_features: U-Net channel lists (``len(dec) >= len(enc)``).
        integration_steps: scaling-and-squaring steps (0: the head output is the displacement).
        int_downsize: the velocity is integrated on a grid this many times coarser (1: full).
        unet_half_res: skip the U-Net's last upsampling, so the network itself runs its last
            convs at half resolution (needs ``int_downsize=2`` and integration; cheaper on CPU;
            ``voxelmorph``: 85,267 parameters). Off in the reference.
        checkpoint: gradient checkpointing in training of the feature extractor, the
            full-resolution convs and the integration (same results, less memory).

    ``config="code"|"paper"`` in :meth:`~mambamorph.models.config.ModelConfig.from_overrides`
    picks one of :data:`VOXELMORPH_PRESETS` (not together with ``enc_features`` or
    ``dec_features``).

    Raises:
        InputError: values of the wrong type, inconsistent or out of range (checked at
            construction; see :class:`~mambamorph.models.config.ModelConfig`).
    """

    in_channels: int = 1
    use_features: bool = False
    feature_channels: int = 16
    readout_head: bool = False
    enc_features: tuple[int, ...] = VOXELMORPH_PRESETS["code"]["enc_features"]
    dec_features: tuple[int, ...] = VOXELMORPH_PRESETS["code"]["dec_features"]
    integration_steps: int = 7
    int_downsize: int = 2
    unet_half_res: bool = False
    checkpoint: bool = False

    NAME = "voxelmorph"
    PRESETS = VOXELMORPH_PRESETS

    def problems(self) -> Iterator[str]:
        yield from at_least(self, 1, "in_channels", "feature_channels", "int_downsize")
        yield from at_least(self, 0, "integration_steps")
        if self.readout_head and not self.use_features:
            yield "readout_head=True needs use_features=True"
        if self.unet_half_res and (self.int_downsize != 2 or self.integration_steps == 0):
            yield "unet_half_res=True needs int_downsize=2 and integration_steps > 0"


class VoxelMorph(ReadoutMixin, nn.Module):
    """VoxelMorph: U-Net -> velocity -> (half-resolution) scaling and squaring -> displacement.

    ``forward(moving, fixed)`` with ``(B, in_channels, D0, D1, D2)`` images, each ``D_i`` a multiple
    of ``2 ** len(enc_features)`` (16) and of ``int_downsize``, returns
    :class:`~mambamorph.models.registry.RegistrationOutput` with ``flow`` the displacement
    ``(B, 3, D0, D1, D2)`` in voxels of the input grid and ``velocity`` the integrated field
    ``(B, 3, D0 / k, D1 / k, D2 / k)`` in voxels of its own grid (``k = int_downsize``), or
    ``None`` when ``integration_steps == 0``.

    Args:
        config: a :class:`VoxelMorphConfig`.
    """

    def __init__(self, config: VoxelMorphConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else VoxelMorphConfig()
        cfg = self.config
        if cfg.use_features:
            self.features = FeatureExtractor(cfg.in_channels, cfg.feature_channels,
                                             checkpoint=cfg.checkpoint)
            unet_in = 2 * cfg.feature_channels
        else:
            self.features = None
            unet_in = 2 * cfg.in_channels
        self.readout_head = ReadoutHead(cfg.feature_channels) if cfg.readout_head else None
        self.unet = ConvUNet(unet_in, cfg.enc_features, cfg.dec_features,
                             half_res=cfg.unet_half_res, checkpoint=cfg.checkpoint)
        self.head = FlowHead(self.unet.out_channels, 3)

    @property
    def size_multiple(self) -> int:
        """Input dims must be multiples of this."""
        return math.lcm(self.unet.size_multiple, self.config.int_downsize)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> RegistrationOutput:
        """Register ``moving`` to ``fixed`` (see the class docstring for shapes).

        Raises:
            InputError: shapes differ, wrong channel count, or dims that are not multiples of
                :attr:`size_multiple`.
        """
        cfg = self.config
        check_pair(moving, fixed, cfg.in_channels, self.size_multiple, "voxelmorph")
        if self.features is not None:
            x = self.features.pair(moving, fixed)  # (B, 2F, D0, D1, D2)
        else:
            x = torch.cat([moving, fixed], dim=1)  # (B, 2C, D0, D1, D2)
        field = self.head(self.unet(x))  # full resolution (half with unet_half_res)
        if cfg.integration_steps == 0:
            return RegistrationOutput(flow=field, velocity=None)
        full = tuple(moving.shape[2:])
        low = tuple(d // cfg.int_downsize for d in full)
        velocity = resize_flow(field, low)
        disp = maybe_checkpoint(cfg.checkpoint and self.training, integrate_velocity, velocity,
                                cfg.integration_steps)
        flow = resize_flow(disp, full)
        return RegistrationOutput(flow=flow, velocity=velocity)


@register_model("voxelmorph")
def voxelmorph(**overrides) -> VoxelMorph:
    """VoxelMorph on the image pair (92,179 parameters; ``config="paper"``: 327,331)."""
    return VoxelMorph(VoxelMorphConfig.from_overrides(**overrides))


@register_model("voxelmorph-feat")
def voxelmorph_feat(**overrides) -> VoxelMorph:
    """VoxelMorph on extracted features (154,051; 158,166 with ``readout_head=True``)."""
    return VoxelMorph(VoxelMorphConfig.from_overrides(**{"use_features": True, **overrides}))
