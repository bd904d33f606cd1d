"""Training losses (SPEC.md section 4): soft Dice of warped one-hot labels, gradient
smoothness, and the choice of training loss (:func:`parse_loss`, :func:`image_term`). The image
similarity functions themselves (MIND-SSD, local NCC, mutual information) live in
:mod:`mambamorph.similarity`.

The paper's objective is ``soft_dice_loss(warp(onehot(s_m), phi), onehot(s_f))
+ smooth_weight * grad_l2(velocity)`` with ``smooth_weight = 0.1 * 2 = 0.2``
(:data:`SMOOTH_WEIGHT`); the weight is applied by the training code, not here.

Every loss computes in float32 (float64 for float64 inputs) with autocast disabled: sums over
a full volume (about 7 million voxels) overflow float16.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from mambamorph.errors import InputError
from mambamorph.nn.spatial import in_work_dtype, no_autocast

__all__ = ["SMOOTH_WEIGHT", "IMAGE_TERMS", "LossSpec", "parse_loss", "image_term",
           "soft_dice_loss", "grad_l2", "multiscale_label_dice_loss", "multiscale_image_loss"]

#: Weight of :func:`grad_l2` in the paper's loss: the reference's ``0.1`` times its Grad
#: ``loss_mult`` of 2. The training code multiplies by it (``smooth_weight`` setting).
SMOOTH_WEIGHT: float = 0.2


def soft_dice_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Negative mean soft Dice of two one-hot (or soft) label volumes.

    Per batch item ``b`` and channel ``k``:
    ``dice[b, k] = 2 * sum(pred * target) / max(sum(pred + target), eps)`` over the voxels;
    the loss is ``-mean(dice)`` over channels and batch, so ``-1`` is a perfect overlap and
    ``0`` no overlap. As in the reference (voxelmorph's Dice), a channel empty in both inputs
    has Dice 0 and still counts in the mean.

    Args:
        pred: ``(B, K, D0, D1, D2)`` in [0, 1], typically the moving one-hot warped trilinearly.
        target: same shape, the fixed one-hot.
        eps: lower bound of the denominator.
    Returns:
        Scalar tensor (float32, or float64 for float64 input), differentiable w.r.t. both inputs.
    Raises:
        ValueError: the shapes differ or have fewer than 3 dimensions.
    """
    if pred.shape != target.shape or pred.dim() < 3:
        raise InputError(f"soft_dice_loss: expected two (B, K, ...) tensors of one shape, got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")
    with no_autocast(pred.device):
        p, t = in_work_dtype(pred, target)
        axes = tuple(range(2, p.dim()))
        top = 2.0 * (p * t).sum(dim=axes)  # (B, K)
        bottom = (p + t).sum(dim=axes).clamp_min(eps)  # (B, K)
        return -(top / bottom).mean()


def grad_l2(field: torch.Tensor) -> torch.Tensor:
    """Mean squared forward difference of a field, averaged over the three spatial axes.

    ``(mean(d0**2) + mean(d1**2) + mean(d2**2)) / 3`` with ``d_j`` the forward differences along
    array axis ``j`` (voxel units, no spacing), each mean over every batch item, channel and
    difference. This is voxelmorph's ``Grad('l2')`` before its ``loss_mult``; the paper's total
    weight is ``0.1 * 2``: the training code multiplies by :data:`SMOOTH_WEIGHT` (0.2).

    Args:
        field: ``(B, C, D0, D1, D2)``, usually a velocity or displacement in voxels.
    Returns:
        Scalar tensor in squared field units (float32, or float64 for float64 input).
    Raises:
        ValueError: not a 5-D tensor or an axis shorter than 2.
    """
    if field.dim() != 5 or min(field.shape[2:]) < 2:
        raise InputError(f"grad_l2: expected a field (B, C, D0, D1, D2) with every spatial size "
                         f">= 2, got {tuple(field.shape)}")
    with no_autocast(field.device):
        (f,) = in_work_dtype(field)
        d0 = f[:, :, 1:] - f[:, :, :-1]
        d1 = f[:, :, :, 1:] - f[:, :, :, :-1]
        d2 = f[:, :, :, :, 1:] - f[:, :, :, :, :-1]
        return (d0.square().mean() + d1.square().mean() + d2.square().mean()) / 3.0


def multiscale_label_dice_loss(moving_onehot: torch.Tensor, fixed_onehot: torch.Tensor,
                               flow: torch.Tensor, scales=(1,)) -> torch.Tensor:
    """Soft Dice of warped one-hot labels, averaged over a pyramid of label resolutions.

    At scale ``s > 1`` both one-hots are average-pooled by ``s`` (soft partial-volume labels) and
    the displacement is average-pooled the same way and divided by ``s`` (coarse voxels), so a
    label boundary pulls on the whole ``s``-voxel cell of the field: a wider capture range early in training. ``scales=(1,)``
    is exactly the paper's loss, ``soft_dice_loss(warp(moving_onehot, flow), fixed_onehot)``.

    Args:
        moving_onehot, fixed_onehot: ``(B, K, D0, D1, D2)`` one-hot (or soft) labels.
        flow: ``(B, 3, D0, D1, D2)`` displacement in voxels of the full grid.
        scales: integer pooling factors; each must divide every spatial dim.
    Returns:
        Scalar, the mean over scales of the negative soft Dice (-1 is perfect).
    Raises:
        InputError: a scale that does not divide the grid, or an empty ``scales``.
    """
    from mambamorph.nn.spatial import warp

    total, n = flow.new_zeros(()), 0
    for _, (m, f), u in _pyramid(flow, scales, moving_onehot, fixed_onehot):
        total, n = total + soft_dice_loss(warp(m, u), f), n + 1
    return total / n


#: image similarity terms a training loss may name; ``image`` is MIND-SSD across modalities and
#: LNCC within one (see :func:`parse_loss`)
IMAGE_TERMS = ("image", "mind", "lncc", "mi")


class LossSpec(NamedTuple):
    """A parsed ``--loss``: the image term (``mind``/``lncc``/``mi`` or None) and whether the
    label Dice term is used."""

    image: str | None
    dice: bool


def parse_loss(spec: str, moving: str = "mr", fixed: str = "ct") -> LossSpec:
    """Parse a training loss: terms joined by ``+`` from ``image``, ``mind``, ``lncc``, ``mi``
    and ``dice`` (e.g. ``image+dice``, ``mind``, ``dice``; at most one image term).

    ``image`` resolves to ``mind`` (MIND-SSD, modality independent) when the moving and fixed
    modalities differ and to ``lncc`` when they are the same modality.

    Raises:
        InputError: an unknown term, two image terms, or no term.
    """
    terms = [t.strip().lower() for t in str(spec).split("+") if t.strip()]
    unknown = [t for t in terms if t not in IMAGE_TERMS + ("dice",)]
    if not terms or unknown:
        raise InputError(f"loss {spec!r}: expected terms joined by '+' from "
                         f"{', '.join(IMAGE_TERMS + ('dice',))} (e.g. image+dice)")
    images = [t for t in terms if t != "dice"]
    if len(images) > 1:
        raise InputError(f"loss {spec!r}: at most one image term, got {images}")
    image = images[0] if images else None
    if image == "image":
        image = "lncc" if str(moving).lower() == str(fixed).lower() else "mind"
    return LossSpec(image, "dice" in terms)


def image_term(name: str, warped: torch.Tensor, fixed: torch.Tensor,
               fixed_features: torch.Tensor | None = None) -> torch.Tensor:
    """Image dissimilarity of the warped moving and the fixed image, lower is better.

    ``mind``: :func:`~mambamorph.similarity.mind_ssd_loss` of the MIND-SSC descriptors (radius
    1, dilation 2 voxels); ``fixed_features`` may pass the fixed image's descriptor computed once.
    ``lncc``: :func:`~mambamorph.similarity.lncc_loss` (9-voxel window). ``mi``:
    :func:`~mambamorph.similarity.mi_loss` (32 bins).

    Args:
        name: ``mind``, ``lncc`` or ``mi`` (a :class:`LossSpec` image term).
        warped, fixed: ``(B, 1, D0, D1, D2)`` images in [0, 1].
    Returns:
        Scalar tensor (float32).
    """
    from mambamorph import similarity as sim

    if name == "mind":
        f = sim.mind_ssc(fixed) if fixed_features is None else fixed_features
        return sim.mind_ssd_loss(sim.mind_ssc(warped), f)
    if name == "lncc":
        return sim.lncc_loss(warped, fixed)
    if name == "mi":
        return sim.mi_loss(warped, fixed)
    raise InputError(f"unknown image term {name!r}; expected mind, lncc or mi")


def _pyramid(flow: torch.Tensor, scales, *volumes: torch.Tensor):
    """For each integer scale ``s``: ``(s, volumes average-pooled by s, flow pooled by s / s)``
    (the displacement in coarse voxels), the inputs themselves at ``s == 1``."""
    if not scales:
        raise InputError("expected at least one loss scale, got none")
    for s in scales:
        s = int(s)
        if s == 1:
            yield s, volumes, flow
            continue
        if any(d % s for d in flow.shape[2:]):
            raise InputError(f"loss scale {s} does not divide the grid {tuple(flow.shape[2:])}")
        yield s, tuple(F.avg_pool3d(v, s) for v in volumes), F.avg_pool3d(flow, s) / s


def multiscale_image_loss(name: str, moving: torch.Tensor, fixed: torch.Tensor,
                          flow: torch.Tensor, scales=(1,)) -> torch.Tensor:
    """:func:`image_term` of the warped moving and the fixed image, averaged over a pyramid.

    At scale ``s > 1`` both images are average-pooled by ``s`` and warped by the displacement
    pooled the same way and divided by ``s``, as in :func:`multiscale_label_dice_loss`: MIND's
    offsets and LNCC's window then span ``s`` times more of the head, so a misalignment of
    several voxels still gives a consistent gradient (a wider capture range).

    Args:
        name: ``mind``, ``lncc`` or ``mi``.
        moving, fixed: ``(B, 1, D0, D1, D2)`` images.
        flow: ``(B, 3, D0, D1, D2)`` displacement in voxels of the full grid.
        scales: integer pooling factors, each dividing every spatial dim.
    Returns:
        Scalar, the mean over scales.
    """
    from mambamorph.nn.spatial import warp

    total, n = flow.new_zeros(()), 0
    for _, (m, f), u in _pyramid(flow, scales, moving, fixed):
        total, n = total + image_term(name, warp(m, u), f), n + 1
    return total / n
