"""MR, CT and T2 synthesis of a phantom subject from its warped clean T1 and labels.

The CT is not a relabelled MR: each voxel's Hounsfield value comes from a per-structure
piecewise-linear curve of the T1 intensity (:func:`tissue_image`), so the T1 supplies the
partial volume while the labels decide the tissue. Images are ``(D0, D1, D2)`` float32 in [0, 1].
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from mambamorph.data.phantom.deform import smooth_noise
from mambamorph.data.phantom.params import PhantomParams
from mambamorph.data.phantom.template import _CEREBELLAR_IDS, _CEREBRAL_IDS, _DEEP, TISSUES
from mambamorph.data.preprocess import minmax
from mambamorph.errors import InputError

__all__ = ["tissue_image", "synth_mr", "synth_ct", "synth_t2"]


def tissue_image(t1: np.ndarray, labels: np.ndarray, values: dict[str, float],
                 levels: dict[str, float]) -> np.ndarray:
    """Map a clean T1 and its labels to another contrast through per-structure tissue curves.

    Each voxel's value is a piecewise-linear function of its T1 intensity, chosen by its label:
    cerebrum (ids 0, 2, 3, 4, 5, 14, 15, 24) interpolates CSF -> cortex -> wm anchors;
    cerebellum (7, 8) CSF -> cerebellum_cortex -> cerebellum_wm; each deep structure (10, 11,
    12, 13, 16, 17, 18, 26, 28) CSF -> its own anchor; beyond the end anchors values are
    constant. The T1 thus gives the partial volume between tissues, the labels the tissue.

    Args:
        t1: ``(D0, D1, D2)`` T1 normalised like :attr:`Template.t1`.
        labels: ``(D0, D1, D2)`` merged FreeSurfer ids.
        values: contrast value per tissue key of :data:`TISSUES`.
        levels: T1 anchor per tissue key (:attr:`Template.levels`).
    Returns:
        ``(D0, D1, D2)`` float32.
    Raises:
        InputError: shapes differ or a tissue key is missing.
    """
    if t1.shape != labels.shape:
        raise InputError(f"tissue_image: t1 {t1.shape} and labels {labels.shape} differ")
    missing = [k for k in TISSUES if k not in values or k not in levels]
    if missing:
        raise InputError(f"tissue_image: missing tissue keys {missing}")
    curves: list[tuple[tuple[int, ...], list[str]]] = [
        (_CEREBRAL_IDS, ["csf", "cortex", "wm"]),
        (_CEREBELLAR_IDS, ["csf", "cerebellum_cortex", "cerebellum_wm"]),
        *(((lab,), ["csf", name]) for lab, name in _DEEP.items()),
    ]
    group = np.zeros(256, dtype=np.int8)  # label id -> curve index
    for g, (ids, _) in enumerate(curves):
        group[list(ids)] = g
    gmap = group[labels]
    out = np.empty(t1.shape, dtype=np.float32)
    for g, (_, keys) in enumerate(curves):
        sel = gmap == g
        if sel.any():
            out[sel] = np.interp(t1[sel], [levels[k] for k in keys], [values[k] for k in keys])
    return out


def _noise_scale(spacing: float) -> float:
    """Noise sd factor of a ``spacing`` mm voxel relative to 1 mm (mean of ``spacing**3``)."""
    return float(spacing) ** -1.5


def _quantize(x: np.ndarray, levels: int) -> np.ndarray:
    if levels <= 0:
        return x.astype(np.float32)
    return (np.round(np.clip(x, 0.0, 1.0) * levels) / np.float32(levels)).astype(np.float32)


def synth_mr(rng: np.random.Generator, t1: np.ndarray, mask: np.ndarray, spacing: float,
             params: PhantomParams | None = None) -> np.ndarray:
    """A T1 MR from a clean warped T1: random gamma, smooth bias field, noise, min-max.

    ``mr = minmax(max(t1**gamma * exp(b) + sigma * n * mask, 0))``.

    Args:
        rng: numpy generator (consumed).
        t1, mask: ``(D0, D1, D2)`` from :func:`warp_template`.
        spacing: voxel size in mm (scales the bias field).
        params: :class:`PhantomParams`.
    Returns:
        ``(D0, D1, D2)`` float32 in [0, 1] (0 outside the brain).
    """
    p = params or PhantomParams()
    gamma = float(np.exp(np.clip(rng.standard_normal(), -2.5, 2.5) * p.mr_gamma_sd))
    bias = np.exp(p.bias_rms * smooth_noise(rng, t1.shape, spacing, p.bias_sigma_mm)[0])
    sigma = float(rng.uniform(*p.mr_noise)) * _noise_scale(spacing)
    noise = rng.standard_normal(t1.shape, dtype=np.float32)
    img = np.power(np.clip(t1, 0.0, None), gamma) * bias + np.float32(sigma) * noise * mask
    img = np.clip(img, 0.0, None) * (mask > 0)
    return _quantize(minmax(img), p.quantize)


def _jitter_hu(rng: np.random.Generator, p: PhantomParams) -> dict[str, float]:
    offset = float(np.clip(rng.standard_normal(), -2.5, 2.5)) * p.ct_offset_sd
    hu = {}
    for k in TISSUES:
        mean, sd = p.ct_hu[k]
        v = mean + offset + float(np.clip(rng.standard_normal(), -2.5, 2.5)) * sd
        if k in p.ct_hu_range:
            v = float(np.clip(v, *p.ct_hu_range[k]))
        hu[k] = v
    return hu


def synth_ct(rng: np.random.Generator, t1: np.ndarray, mask: np.ndarray, labels: np.ndarray,
             levels: dict[str, float], spacing: float, params: PhantomParams | None = None,
             return_hu: bool = False) -> np.ndarray | tuple[np.ndarray, dict[str, float]]:
    """A brain-windowed CT from a subject's clean T1 and labels (tissue classes, not relabelling).

    HU = :func:`tissue_image` with per-subject jittered HU anchors (white matter ~20-30, grey
    ~35-45, CSF ~0-15, deep nuclei and cerebellum their own), + a smooth inhomogeneity, then a
    Gaussian partial-volume blur (``ct_blur_mm``), Gaussian noise of a few HU, the brain window
    (level 40, width 80 -> [0, 1], clipped) and the soft brain mask (0 outside).

    Args:
        rng: numpy generator (consumed).
        t1, mask, labels: ``(D0, D1, D2)`` from :func:`warp_template`.
        levels: :attr:`Template.levels`.
        spacing: voxel size in mm.
        params: :class:`PhantomParams`.
        return_hu: also return the subject's HU anchors.
    Returns:
        ``(D0, D1, D2)`` float32 in [0, 1]; with ``return_hu``, ``(ct, hu_dict)``.
    """
    p = params or PhantomParams()
    hu = _jitter_hu(rng, p)
    img = tissue_image(t1, labels, hu, levels)
    img += np.float32(p.ct_inhomogeneity_hu) * smooth_noise(rng, t1.shape, spacing,
                                                            p.bias_sigma_mm)[0]
    if p.ct_blur_mm > 0:
        img = ndi.gaussian_filter(img, p.ct_blur_mm / spacing, mode="nearest")
    sigma = float(rng.uniform(*p.ct_noise_hu)) * _noise_scale(spacing)
    img += np.float32(sigma) * rng.standard_normal(t1.shape, dtype=np.float32)
    level, width = p.ct_window
    ct = np.clip((img - (level - width / 2.0)) / width, 0.0, 1.0) * mask
    ct = _quantize(ct, p.quantize)
    return (ct, hu) if return_hu else ct


def synth_t2(rng: np.random.Generator, t1: np.ndarray, mask: np.ndarray, labels: np.ndarray,
             levels: dict[str, float], spacing: float, params: PhantomParams | None = None
             ) -> np.ndarray:
    """A T2-weighted MR (CSF bright, white matter dark) from a subject's clean T1 and labels.

    :func:`tissue_image` with jittered ``t2_values``, then gamma, a bias field, noise, the brain
    mask and min-max.

    Returns:
        ``(D0, D1, D2)`` float32 in [0, 1] (0 outside the brain).
    """
    p = params or PhantomParams()
    vals = {k: float(v * np.exp(np.clip(rng.standard_normal(), -2.5, 2.5) * p.t2_jitter))
            for k, v in p.t2_values.items()}
    img = tissue_image(t1, labels, vals, levels)
    gamma = float(np.exp(np.clip(rng.standard_normal(), -2.5, 2.5) * p.t2_gamma_sd))
    bias = np.exp(p.bias_rms * smooth_noise(rng, t1.shape, spacing, p.bias_sigma_mm)[0])
    sigma = float(rng.uniform(*p.t2_noise)) * _noise_scale(spacing)
    noise = rng.standard_normal(t1.shape, dtype=np.float32)
    img = np.power(np.clip(img, 0.0, None), gamma) * bias + np.float32(sigma) * noise
    img = np.clip(img, 0.0, None) * mask
    return _quantize(minmax(img), p.quantize)

