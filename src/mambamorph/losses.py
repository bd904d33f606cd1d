"""Training losses (SPEC.md section 4): soft Dice of warped one-hot labels, gradient smoothness,
and a local normalised cross-correlation image term.

The paper's objective is ``soft_dice_loss(warp(onehot(s_m), phi), onehot(s_f))
+ smooth_weight * grad_l2(velocity)`` with ``smooth_weight = 0.1 * 2 = 0.2``
(:data:`SMOOTH_WEIGHT`); the weight is applied by the training code, not here.

Every loss computes in float32 (float64 for float64 inputs) with autocast disabled: sums over
a full volume (about 7 million voxels) overflow float16.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from mambamorph.errors import InputError

__all__ = ["SMOOTH_WEIGHT", "soft_dice_loss", "grad_l2", "ncc_loss"]

#: Weight of :func:`grad_l2` in the paper's loss: the reference's ``0.1`` times its Grad
#: ``loss_mult`` of 2. The training code multiplies by it (``smooth_weight`` setting).
SMOOTH_WEIGHT: float = 0.2


def _no_autocast(device: torch.device):
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _work(*tensors: torch.Tensor) -> list[torch.Tensor]:
    dt = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return [t.to(dt) for t in tensors]


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
    with _no_autocast(pred.device):
        p, t = _work(pred, target)
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
    with _no_autocast(field.device):
        (f,) = _work(field)
        d0 = f[:, :, 1:] - f[:, :, :-1]
        d1 = f[:, :, :, 1:] - f[:, :, :, :-1]
        d2 = f[:, :, :, :, 1:] - f[:, :, :, :, :-1]
        return (d0.square().mean() + d1.square().mean() + d2.square().mean()) / 3.0


def ncc_loss(a: torch.Tensor, b: torch.Tensor, window: int = 9,
             eps: float = 1e-5) -> torch.Tensor:
    """Negative local normalised cross-correlation (squared), voxelmorph style.

    For each voxel, over the cubic ``window`` centred on it, clipped to the volume (border
    windows average over their in-volume voxels only):
    ``cc = cov(a, b)**2 / (var(a) * var(b) + eps)`` with window means, and the loss is
    ``-mean(cc)`` over voxels, channels and batch: ``-1`` for images related by a positive or
    negative affine intensity map wherever the window has contrast, about ``0`` for independent
    noise. Monomodal; not meaningful for MR -> CT (the paper uses no image term).
    Differences from voxelmorph's NCC: voxelmorph zero-pads border windows (which breaks the
    affine invariance near the border) and adds ``eps`` to the product of window *sums* of
    squares, so its effective eps is ``window**6`` times smaller than here.

    Args:
        a, b: ``(B, C, D0, D1, D2)`` images, same shape.
        window: odd window side in voxels.
        eps: stabiliser of the denominator (in squared variance units).
    Returns:
        Scalar tensor in [-1, 0] (float32, or float64 for float64 input).
    Raises:
        ValueError: shapes differ, are not 5-D, or ``window`` is not a positive odd integer.
    """
    if a.shape != b.shape or a.dim() != 5:
        raise InputError(f"ncc_loss: expected two (B, C, D0, D1, D2) images of one shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if int(window) != window or window < 1 or window % 2 == 0:
        raise InputError(f"ncc_loss: expected a positive odd window, got {window}")
    window = int(window)
    with _no_autocast(a.device):
        x, y = _work(a, b)
        n_b, n_c = x.shape[:2]
        # one pass of a box filter over the 5 moment images, channels folded into the batch
        stack = torch.stack([x, y, x * x, y * y, x * y], dim=2)  # (B, C, 5, D0, D1, D2)
        stack = stack.reshape(n_b * n_c * 5, 1, *x.shape[2:])  # (B*C*5, 1, D0, D1, D2)
        mean = F.avg_pool3d(stack, window, stride=1, padding=window // 2,
                            count_include_pad=False)
        mean = mean.reshape(n_b, n_c, 5, *x.shape[2:])
        mx, my, mxx, myy, mxy = mean.unbind(dim=2)
        cov = mxy - mx * my
        var_x = (mxx - mx * mx).clamp_min(0.0)
        var_y = (myy - my * my).clamp_min(0.0)
        cc = cov * cov / (var_x * var_y + eps)
        return -cc.mean()


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

    if not scales:
        raise InputError("expected at least one Dice scale, got none")
    total = flow.new_zeros(())
    for s in scales:
        s = int(s)
        if s == 1:
            m, f, u = moving_onehot, fixed_onehot, flow
        else:
            if any(d % s for d in flow.shape[2:]):
                raise InputError(f"Dice scale {s} does not divide the grid {tuple(flow.shape[2:])}")
            m = F.avg_pool3d(moving_onehot, s)
            f = F.avg_pool3d(fixed_onehot, s)
            u = F.avg_pool3d(flow, s) / s  # cell means, in coarse voxels (every voxel pulls)
        total = total + soft_dice_loss(warp(m, u), f)
    return total / len(scales)
