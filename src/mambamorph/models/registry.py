"""Model registry: ``build_model(name, **overrides)`` builds any registered model by name.

Each model file registers a two-line builder with :func:`register_model`. Training, evaluation
and the CLI resolve names only through this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from mambamorph.errors import InputError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


@dataclass
class RegistrationOutput:
    """What every model's ``forward(moving, fixed)`` returns.

    Attributes:
        flow: displacement ``(B, 3, D0, D1, D2)`` in voxels, channel ``i`` along array axis ``i``,
            at the input resolution; ``x -> x + flow(x)`` maps fixed-space points into the moving
            image.
        velocity: the stationary velocity field integrated to get ``flow`` (same layout; possibly at
            a lower resolution), or ``None`` for models that predict the displacement directly.
    """

    flow: torch.Tensor
    velocity: torch.Tensor | None = None

    @property
    def smooth_target(self) -> torch.Tensor:
        """The field the smoothness loss acts on: the velocity if there is one, else the flow."""
        return self.velocity if self.velocity is not None else self.flow


class ReadoutMixin:
    """``readout()`` for the models that can carry the reference's unused read-out head.

    The model sets ``self.readout_head`` to a :class:`~mambamorph.nn.features.ReadoutHead` (built
    with ``readout_head=True``, for parameter parity with the reference) or ``None``, and holds a
    ``config`` whose ``NAME`` names the model in messages.
    """

    readout_head: nn.Module | None

    def readout(self, features: torch.Tensor) -> torch.Tensor:
        """Apply the read-out head to extractor features (parameter parity only).

        ``(B, feature_channels, D0, D1, D2) -> (B, 3, D0/2, D1/2, D2/2)``.

        Raises:
            InputError: the model was built without ``readout_head=True``.
        """
        if self.readout_head is None:
            raise InputError(f"{self.config.NAME}: built without readout_head=True")
        return self.readout_head(features)


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering ``fn(**overrides) -> nn.Module`` under ``name``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise RuntimeError(f"model {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def _ensure_loaded() -> None:
    # Importing the model modules runs their @register_model decorators.
    from mambamorph.models import mambamorph, transmorph, voxelmorph, xmorpher  # noqa: F401


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def build_model(name: str, **overrides) -> nn.Module:
    """Build the model registered as ``name`` with config ``overrides``.

    Raises:
        InputError: unknown name (the message lists the known ones).
    """
    _ensure_loaded()
    if name not in _REGISTRY:
        raise InputError(f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}")
    model = _REGISTRY[name](**overrides)
    model.registry_name = name  # the checkpoint format stores it (see mambamorph.checkpoint)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def predict(model: nn.Module, moving: torch.Tensor, fixed: torch.Tensor,
            precision: str | None = "fp32") -> RegistrationOutput:
    """Inference forward pass of a registration model (no autograd).

    ``moving``, ``fixed``: ``(B, C, D0, D1, D2)`` on the model's device. On the CPU the weights
    and inputs are put in channels-last 3D memory format first: oneDNN's 3D convolutions, which
    dominate these models' CPU time, run faster that way (figures in docs/results.md); the
    numbers computed are the same to float rounding.

    ``precision``: ``fp32``, ``bf16`` (bfloat16 autocast: convolutions and matrix products in
    bfloat16; every loss, warp, integration and the selective scan stay in float32) or
    ``auto`` (:func:`mambamorph.runtime.resolve_precision`). The returned fields are float32.
    """
    from mambamorph.runtime import resolve_precision

    device = moving.device
    if device.type == "cpu":
        cl = torch.channels_last_3d
        model.to(memory_format=cl)
        moving = moving.contiguous(memory_format=cl)
        fixed = fixed.contiguous(memory_format=cl)
    bf16 = resolve_precision(precision, device) == "bf16"
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(moving, fixed)
    if bf16:
        out = RegistrationOutput(out.flow.float(), None if out.velocity is None
                                 else out.velocity.float())
    return out
