"""MambaMorph (``mambamorph``) and its registration module alone (``mambamorph-reg``).

Network (SPEC.md §1-2):

- optional fine-grained feature extractor (:class:`~mambamorph.nn.features.FeatureExtractor`),
  shared by the moving and the fixed image; the two 16-channel outputs are concatenated;
- the registration module: :class:`~mambamorph.nn.blocks.RegistrationUNet` (convolutional skip
  branch, patch embedding 4^3 with a fixed sinusoidal position code, three token stages of width
  96 / 192 / 384 joined by patch merging, TransMorph decoder, flow head) whose stages are
  :class:`MambaStage`: ``y = Mamba(LayerNorm(x))``, one Mamba block per stage, no residual;
- the head output is a stationary velocity field, integrated by scaling and squaring (7 steps)
  at full resolution into the displacement.

Parameter counts (one input channel per image):

=======================================  ============
``mambamorph-reg``                          7,305,459
``mambamorph`` (default)                    7,590,531
``mambamorph``, ``readout_head=True``       7,594,646
=======================================  ============

The reference's MambaMorph carries a 2-layer read-out head for feature contrastive learning
(Conv3d 16 -> 8 k3 stride 2, Conv3d 8 -> 3 k3: 4,115 parameters) that no loss or output uses, so
the paper's 7.59M includes it. It is left out by default here; ``readout_head=True`` builds it
(reachable through :meth:`MambaMorph.readout`) to reproduce the reference count.

Options beyond the paper (off by default): ``residual=True`` adds a residual connection around
each Mamba block (``x + Mamba(LN(x))``, no new parameters); ``bidirectional=True`` is passed to
the Mamba block, which adds a reversed scan branch (``mambamorph``: 7,712,835 parameters);
``checkpoint=True`` turns on gradient checkpointing of the feature extractor, the Mamba stages,
the full- and half-resolution convolutions and the integration (same results, less memory, one
more forward pass of those parts in the backward pass).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from mambamorph.models.config import ModelConfig, at_least
from mambamorph.models.registry import ReadoutMixin, RegistrationOutput, register_model
from mambamorph.nn.blocks import RegistrationUNet, check_pair, maybe_checkpoint
from mambamorph.nn.tokens import Grid
from mambamorph.nn.features import FeatureExtractor, ReadoutHead
from mambamorph.nn.mamba import Mamba
from mambamorph.nn.spatial import integrate_velocity

__all__ = ["MambaMorphConfig", "MambaMorph", "MambaStage"]


@dataclass
class MambaMorphConfig(ModelConfig):
    """Hyper-parameters of :class:`MambaMorph`; ``build_model(name, **asdict(cfg))`` rebuilds it.

    Attributes:
        in_channels: channels of each input image.
        use_features: run the shared feature extractor first (``mambamorph``); ``False`` gives
            the registration module alone (``mambamorph-reg``).
        feature_channels: width of the feature extractor.
        readout_head: also build the reference's unused read-out head (parameter parity only;
            needs ``use_features``).
        embed_dim: token width of stage 0 (stage ``i`` has ``embed_dim * 2**i``); even.
        num_stages: number of Mamba stages; input dims must be multiples of
            ``4 * 2 ** (num_stages - 1)`` (16 for 3 stages).
        head_channels: channels of the last decoder block, of the full-resolution skip and of
            the flow head's input.
        d_state, d_conv, expand: Mamba block settings (N, conv width, inner width / width).
        residual: residual connection around each Mamba block (not in the paper).
        bidirectional: scan the tokens in both directions (passed to the Mamba block; not in
            the paper).
        integration_steps: scaling-and-squaring steps (0: the head output is the displacement).
        scan_impl: selective-scan implementation for the Mamba blocks (``None``: automatic; see
            :func:`mambamorph.nn.ssm.selective_scan`). A runtime choice, saved with the config.
        checkpoint: gradient checkpointing in training (same results, less memory, about one
            extra forward pass of the checkpointed parts in the backward pass).
    Raises:
        InputError: values of the wrong type, inconsistent or out of range (checked at
            construction; see :class:`~mambamorph.models.config.ModelConfig`).
    """

    in_channels: int = 1
    use_features: bool = True
    feature_channels: int = 16
    readout_head: bool = False
    embed_dim: int = 96
    num_stages: int = 3
    head_channels: int = 16
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    residual: bool = False
    bidirectional: bool = False
    integration_steps: int = 7
    scan_impl: str | None = None
    checkpoint: bool = False

    NAME = "mambamorph"

    def problems(self) -> Iterator[str]:
        yield from at_least(self, 1, "in_channels", "feature_channels", "embed_dim", "num_stages",
                            "head_channels", "d_state", "d_conv", "expand")
        yield from at_least(self, 0, "integration_steps")
        if self.embed_dim % 2:
            yield f"embed_dim must be even, got {self.embed_dim}"
        if self.readout_head and not self.use_features:
            yield "readout_head=True needs use_features=True"


class MambaStage(nn.Module):
    """One MambaMorph stage: ``y = Mamba(LayerNorm(x))`` (or ``x + Mamba(LayerNorm(x))``).

    Called as ``stage(x, grid)`` by :class:`~mambamorph.nn.blocks.RegistrationUNet`: tokens
    ``x (B, L, dim)`` in raster order of ``grid`` (unused: the scan runs over the raster order)
    -> ``(B, L, dim)``.

    Args:
        dim: token width.
        d_state, d_conv, expand: Mamba settings.
        residual: add the input back (not in the reference).
        bidirectional: passed to :class:`~mambamorph.nn.mamba.Mamba`.
        scan_impl: passed to :class:`~mambamorph.nn.mamba.Mamba`.
    """

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 residual: bool = False, bidirectional: bool = False,
                 scan_impl: str | None = None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mamba = Mamba(dim, d_state=d_state, d_conv=d_conv, expand=expand,
                           bidirectional=bidirectional, scan_impl=scan_impl)
        self.residual = bool(residual)

    def forward(self, x: torch.Tensor, grid: Grid | None = None) -> torch.Tensor:
        """Tokens ``(B, L, dim)`` -> ``(B, L, dim)``."""
        y = self.mamba(self.norm(x))
        return x + y if self.residual else y

    def extra_repr(self) -> str:
        return f"residual={self.residual}"


class MambaMorph(ReadoutMixin, nn.Module):
    """MambaMorph: (feature extractor) -> Mamba registration module -> velocity -> displacement.

    ``forward(moving, fixed)`` with ``(B, in_channels, D0, D1, D2)`` images, each ``D_i`` a
    multiple of 16 (non-cubic shapes are fine), returns
    :class:`~mambamorph.models.registry.RegistrationOutput`: ``flow`` the displacement
    ``(B, 3, D0, D1, D2)`` in voxels (``x -> x + flow(x)`` maps fixed-space points into the
    moving image) and ``velocity`` the head output it integrates (same shape), or ``None``
    when ``integration_steps == 0``.

    Args:
        config: a :class:`MambaMorphConfig` (default: the paper's ``mambamorph``).
    """

    def __init__(self, config: MambaMorphConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else MambaMorphConfig()
        cfg = self.config
        if cfg.use_features:
            self.features = FeatureExtractor(cfg.in_channels, cfg.feature_channels,
                                             checkpoint=cfg.checkpoint)
            reg_in = 2 * cfg.feature_channels
        else:
            self.features = None
            reg_in = 2 * cfg.in_channels
        self.readout_head = ReadoutHead(cfg.feature_channels) if cfg.readout_head else None
        stages = [MambaStage(cfg.embed_dim * 2 ** i, cfg.d_state, cfg.d_conv, cfg.expand,
                             residual=cfg.residual, bidirectional=cfg.bidirectional,
                             scan_impl=cfg.scan_impl)
                  for i in range(cfg.num_stages)]
        self.registration = RegistrationUNet(reg_in, stages, embed_dim=cfg.embed_dim,
                                             head_channels=cfg.head_channels, patch_size=4,
                                             position_code=True, checkpoint=cfg.checkpoint)

    @property
    def size_multiple(self) -> int:
        """Input dims must be multiples of this (16 for 3 stages)."""
        return self.registration.size_multiple

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> RegistrationOutput:
        """Register ``moving`` to ``fixed`` (see the class docstring for shapes).

        Raises:
            InputError: shapes differ, wrong channel count, or dims not multiples of 16.
        """
        cfg = self.config
        check_pair(moving, fixed, cfg.in_channels, self.size_multiple, "mambamorph")
        if self.features is not None:
            x = self.features.pair(moving, fixed)  # (B, 2F, D0, D1, D2)
        else:
            x = torch.cat([moving, fixed], dim=1)  # (B, 2C, D0, D1, D2)
        velocity = self.registration(x)  # (B, 3, D0, D1, D2), voxels
        if cfg.integration_steps == 0:
            return RegistrationOutput(flow=velocity, velocity=None)
        flow = maybe_checkpoint(cfg.checkpoint and self.training, integrate_velocity, velocity,
                                cfg.integration_steps)
        return RegistrationOutput(flow=flow, velocity=velocity)


@register_model("mambamorph")
def mambamorph(**overrides) -> MambaMorph:
    """MambaMorph with the feature extractor (7,590,531; 7,594,646 with ``readout_head=True``)."""
    return MambaMorph(MambaMorphConfig.from_overrides(**overrides))


@register_model("mambamorph-reg")
def mambamorph_reg(**overrides) -> MambaMorph:
    """MambaMorph's registration module alone, on the image pair (7,305,459 parameters)."""
    return MambaMorph(MambaMorphConfig.from_overrides(**{"use_features": False, **overrides}))
