"""Training augmentation: random crops and intra-subject pairs with a known deformation.

Pairs are the dicts of :meth:`mambamorph.data.datasets.SRRegDataset.pair`: ``moving``/``fixed``
float32 ``(1, D0, D1, D2)`` images, ``moving_seg``/``fixed_seg`` uint8 ``(1, D0, D1, D2)`` ROI
indices and the two subject ids. Randomness comes only from the generators passed in, in a
fixed order, so training with a given seed draws the same crops and fields on every run.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mambamorph.errors import InputError
from mambamorph.nn.spatial import integrate_velocity, warp

__all__ = ["random_displacement", "random_crop", "synthetic_pair"]


def random_displacement(shape, max_voxels: float, generator: torch.Generator,
                        coarse: int = 8, device: torch.device | str | None = None) -> torch.Tensor:
    """A smooth random diffeomorphic displacement ``(1, 3, D0, D1, D2)`` in voxels.

    Gaussian noise on a grid ``coarse`` times coarser, upsampled trilinearly, scaled so that the
    largest velocity component is ``max_voxels``, then integrated by scaling and squaring (7
    steps), so the field is invertible and its largest displacement is about ``max_voxels``.
    The noise is always drawn on the CPU from ``generator`` (same field for the same seed on any
    device); the upsampling and integration run on ``device`` (default: the CPU).

    Args:
        shape: ``(D0, D1, D2)`` of the field.
        max_voxels: largest velocity component, in voxels.
        generator: a CPU ``torch.Generator`` (the only source of randomness).
        coarse: downsampling factor of the noise grid (each dim at least 2).
        device: where the field is computed and returned.
    """
    small = [max(2, int(d) // coarse) for d in shape]
    v = torch.randn(1, 3, *small, generator=generator)
    if device is not None:
        v = v.to(device)
    v = F.interpolate(v, size=tuple(int(d) for d in shape), mode="trilinear", align_corners=True)
    v = v * (max_voxels / v.abs().amax().clamp_min(1e-6))
    return integrate_velocity(v, 7)


def random_crop(batch: dict, size, rng: np.random.Generator) -> dict:
    """Crop every volume of a pair (``(C, D0, D1, D2)`` tensors) to ``size`` at one random offset.

    Training on crops makes a step several times cheaper; inference still runs on whole
    volumes (every model accepts any dims divisible by 16). Draws one integer per axis from
    ``rng``; non-tensor entries (the ids) are passed through.

    Raises:
        InputError: ``size`` is larger than the volumes along some axis.
    """
    shape = batch["moving"].shape[1:]
    if any(int(c) > int(d) for c, d in zip(size, shape)):
        raise InputError(f"crop {tuple(size)} is larger than the volumes {tuple(shape)}")
    start = [int(rng.integers(0, int(d) - int(c) + 1)) for c, d in zip(size, shape)]
    sl = (slice(None),) + tuple(slice(a, a + int(c)) for a, c in zip(start, size))
    return {k: (v[sl].contiguous() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def synthetic_pair(dataset, rng: np.random.Generator, max_voxels: float, crop=None,
                   device: torch.device | str | None = None) -> dict:
    """An intra-subject pair with a known deformation (``target_flow``).

    Moving = the moving modality of subject s; fixed = the fixed modality of the same subject
    (aligned with it) warped by a random smooth field psi, and its labels warped the same way
    (nearest). The exact answer is ``flow = psi``: a dense, label-free training signal that
    teaches correspondence across modalities far faster than the sparse Dice gradient.
    The field's largest velocity component is drawn uniformly in
    ``[max_voxels / 4, max_voxels]``, so that small displacements are learnt as well as large.
    With ``device`` (e.g. the training GPU) the field and the warps are computed there and the
    returned tensors live there.

    Args:
        dataset: a dataset with ``subjects`` and ``pair(moving_id, fixed_id)``.
        rng: draws, in order, the subject, the crop offset (with ``crop``), the amplitude and
            the seed of the field's noise.
        max_voxels: largest velocity component of the field, in voxels.
        crop: ``(S0, S1, S2)`` random crop applied before warping, or ``None``.
        device: where the field and the warped volumes are computed.
    Returns:
        A pair dict (``moving_id == fixed_id``) plus ``target_flow`` ``(3, D0, D1, D2)`` in
        voxels, the displacement that warps the original fixed image onto ``fixed``.
    """
    sid = dataset.subjects[int(rng.integers(len(dataset.subjects)))]
    batch = dataset.pair(sid, sid)
    if crop:
        batch = random_crop(batch, crop, rng)
    amplitude = max_voxels * (0.25 + 0.75 * float(rng.random()))
    gen = torch.Generator().manual_seed(int(rng.integers(2**31 - 1)))
    psi = random_displacement(batch["fixed"].shape[1:], amplitude, gen, device=device)
    if device is not None:
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    batch["fixed"] = warp(batch["fixed"][None], psi)[0]
    if "fixed_seg" in batch:  # a dataset without labels has none
        batch["fixed_seg"] = warp(batch["fixed_seg"][None], psi, mode="nearest")[0]
    batch["target_flow"] = psi[0]
    return batch
