"""Affine pre-alignment of a pair in world space: rigid, then affine (12 parameters).

Everything here is in **world** coordinates (RAS mm, the canonical frame of
:mod:`mambamorph.io`). A transform is a ``(4, 4)`` matrix ``A`` that maps a *fixed*-world point
``x`` to the *moving*-world point ``A @ x`` where the moving image is sampled (the direction
resampling needs, as ITK's): the aligned moving image is ``moving(A x)`` on the fixed grid.

Method (:func:`align_affine`):

1. **Centre initialisation**: ``A0 = translate(c_m - c_f)`` from the foreground centres of the
   two images (:func:`mambamorph.data.preprocess.foreground_centre`); rotations and scalings are about
   ``c_f``.
2. **Rigid** (6 parameters: rotation about ``c_f`` + translation), then **affine** (12), each
   multi-resolution (``levels`` shrink factors, coarse to fine, default 4 then 2; images
   averaged over blocks of ``s**3`` voxels at shrink ``s > 1``), optimised by Adam in torch on a
   modality-independent metric: mutual information of a Gaussian Parzen-window joint
   histogram of the fixed and the (trilinearly sampled) moving intensities at a random share
   of the fixed voxels. Metric values are negative MI (lower is better); the metric and its
   gradient at the samples come from one compiled kernel
   (:mod:`mambamorph.optimize.affine_cpu`), with the torch operations here as its reference.
   The choice of this optimiser over SimpleITK's registration framework (Mattes MI) is
   measured in docs/affine.md.
3. **Checks**: a stage that fails (exception, NaN metric, non-finite matrix) or whose linear part
   is implausible (determinant <= 0, a singular value outside :data:`SCALE_BOUNDS`, ratio of the
   largest to the smallest singular value above :data:`MAX_ANISOTROPY`) is discarded with a
   warning (logged and listed in :attr:`AffineResult.warnings`); the previous stage's result
   (rigid, or the centre initialisation) is kept.

:func:`compose_affine_displacement` turns ``A`` (and a deformable displacement found after it)
into one world displacement field for :func:`mambamorph.io.write_itk_displacement`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from mambamorph.data.preprocess import foreground_centre
from mambamorph.errors import InputError
from mambamorph.io import Volume
from mambamorph.nn.spatial import identity_grid
from mambamorph.optimize.adam import Adam, cosine_lr
from mambamorph.optimize.affine_cpu import MI_EPS, PARZEN_TAPS, neg_mi_at_points

__all__ = ["AffineResult", "SCALE_BOUNDS", "MAX_ANISOTROPY", "LEVELS_MM", "align_affine",
           "check_linear", "compose_affine_displacement", "levels_for"]

log = logging.getLogger(__name__)

#: accepted range of each singular value (scale) of an affine stage's linear part.
SCALE_BOUNDS = (0.5, 2.0)
#: accepted ratio of the largest to the smallest singular value (shear / anisotropic scaling).
MAX_ANISOTROPY = 2.0
#: voxel sizes (mm) of the pooled fixed grids ``register`` aligns on, coarse to fine: the shrink
#: factors 4 and 2 measured on 2 mm images (docs/affine.md), kept in mm for any resolution.
LEVELS_MM = (8.0, 4.0)

_SLAB = 16


@dataclass
class AffineResult:
    """What :func:`align_affine` found.

    Attributes:
        matrix: ``(4, 4)`` float64, fixed world (RAS mm) -> moving world (RAS mm): the moving
            image is sampled at ``matrix @ x`` for a fixed-world point ``x``.
        rigid: ``(4, 4)`` the rigid stage's matrix (same convention; the centre initialisation
            when the rigid stage was off or discarded).
        metric: final metric value of the kept stage (negative mutual information, lower is
            better; NaN when no stage ran).
        seconds: wall time of the whole call, s.
        stages: the stages whose result is in ``matrix``, in order (``"centre"``, ``"rigid"``,
            ``"affine"``).
        warnings: one line per discarded stage (also logged).
    """

    matrix: np.ndarray
    rigid: np.ndarray
    metric: float
    seconds: float
    stages: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------- checks
def check_linear(matrix: np.ndarray, rigid: bool = False) -> str | None:
    """Why a ``(4, 4)`` transform is implausible for two brains, or ``None`` when it is fine.

    Args:
        matrix: ``(4, 4)`` world transform (mm).
        rigid: also require the linear part to be a rotation (singular values 1 within 1e-3).
    Returns:
        ``None``, or a short reason: non-finite entries, determinant <= 0, a singular value
        outside :data:`SCALE_BOUNDS`, anisotropy above :data:`MAX_ANISOTROPY`.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        return "non-finite matrix"
    det = float(np.linalg.det(m[:3, :3]))
    if not det > 0:
        return f"determinant {det:.3g} <= 0 (a reflection or collapse)"
    sv = np.linalg.svd(m[:3, :3], compute_uv=False)
    if rigid and np.abs(sv - 1.0).max() > 1e-3:
        return f"not a rotation (singular values {np.round(sv, 4).tolist()})"
    if sv.min() < SCALE_BOUNDS[0] or sv.max() > SCALE_BOUNDS[1]:
        return (f"scale {sv.min():.3g}..{sv.max():.3g} outside {SCALE_BOUNDS[0]:g}.."
                f"{SCALE_BOUNDS[1]:g}")
    if sv.max() / sv.min() > MAX_ANISOTROPY:
        return f"shear/anisotropy {sv.max() / sv.min():.3g} > {MAX_ANISOTROPY:g}"
    return None


def _check_image(vol: Volume, what: str) -> None:
    x = vol.data
    name = vol.path if vol.path is not None else what
    if x.dim() != 3 or x.numel() == 0:
        raise InputError(f"{name}: expected a 3D image, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise InputError(f"{name}: NaN or Inf voxels")
    if not x.dtype.is_floating_point or float(x.max()) == float(x.min()):
        raise InputError(f"{name}: empty image (constant or not an intensity image); "
                         f"nothing to align")


# ------------------------------------------------------------------------------ public API
def levels_for(fixed: Volume, levels_mm: Sequence[float] = LEVELS_MM) -> tuple[int, ...]:
    """Shrink factors for :func:`align_affine` whose pooled fixed grids have about the voxel
    sizes ``levels_mm``: ``max(1, round(mm / smallest fixed spacing))`` per level.

    A 2 mm image gets ``(4, 2)``, a 1 mm image ``(8, 4)``: the same grids in mm at any
    resolution. (With ``(4, 2)`` on 1 mm images the stage took 7.0 s per pair on 2 cores, against
    about 1 s for 2 mm images; docs/results.md, "The affine stage at 1 mm".)

    Args:
        fixed: the fixed image (its voxel sizes in mm, :attr:`Volume.spacing`).
        levels_mm: pooled voxel sizes in mm, coarse to fine.
    Returns:
        One shrink factor (int >= 1) per level, for ``align_affine(levels=...)``.
    """
    finest = float(min(fixed.spacing))
    return tuple(max(1, int(round(float(mm) / finest))) for mm in levels_mm)


def align_affine(moving: Volume, fixed: Volume, rigid: bool = True, affine: bool = True,
                 levels: Sequence[int] = (4, 2), iterations: int = 30, bins: int = 32,
                 sampling: float = 0.1, seed: int = 0) -> AffineResult:
    """Rigid then affine alignment of ``moving`` to ``fixed`` in world space (any modalities).

    Args:
        moving, fixed: images (:class:`~mambamorph.io.Volume`: canonical ``(D0, D1, D2)``
            data and voxel -> RAS mm affine); grids, spacings and orientations may differ.
        rigid, affine: run each stage (both off gives the centre initialisation).
        levels: shrink factors, coarse to fine (each >= 1, e.g. ``(4, 2, 1)``).
        iterations: Adam iterations per level and stage (the step size decays to 0 over them).
        bins: histogram bins of the mutual information.
        sampling: share of voxels drawn (at random, fixed ``seed``) at each level for the
            metric, in ``(0, 1]``.
        seed: seed of the sampling.
    Returns:
        An :class:`AffineResult` (``matrix``: fixed world -> moving world, RAS mm).
    Raises:
        InputError: a constant/empty or non-finite image, or bad options (levels, iterations,
            bins, sampling).
    """

    t0 = time.perf_counter()
    _check_image(moving, "moving image")
    _check_image(fixed, "fixed image")
    levels = tuple(int(s) for s in levels)
    if not levels or min(levels) < 1:
        raise InputError(f"affine alignment: levels must be shrink factors >= 1, got {levels}")
    if int(iterations) < 1 or int(bins) < 4 or not 0 < sampling <= 1:
        raise InputError(f"affine alignment: need iterations >= 1, bins >= 4 and 0 < sampling "
                         f"<= 1, got {iterations}, {bins}, {sampling}")

    c_f = foreground_centre(fixed)
    c_m = foreground_centre(moving)
    init = np.eye(4)
    init[:3, 3] = c_m - c_f
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: more threads only contend (docs/affine.md)
    try:
        kept, current, rigid_m, metric, warnings = _run_stages(
            _Stages(moving, fixed, c_f, levels, int(iterations), int(bins), float(sampling),
                    seed), init, rigid, affine, str(moving.path or "moving image"))
    finally:
        torch.set_num_threads(threads)
    return AffineResult(matrix=current, rigid=rigid_m, metric=metric,
                        seconds=time.perf_counter() - t0, stages=kept, warnings=warnings)


def _run_stages(stages, init, rigid, affine, name_of_moving):
    """Rigid then affine from ``init``, each checked (see the module docstring).

    Returns ``(kept stage names, matrix, rigid matrix, metric, warnings)``.
    """
    current, metric, kept, warnings = init, float("nan"), ["centre"], []
    rigid_m = init
    for name, on in (("rigid", rigid), ("affine", affine)):
        if not on:
            continue
        try:
            m, value = stages.run(name, current)
            reason = None if np.isfinite(value) else f"metric is {value}"
            reason = reason or check_linear(m, rigid=name == "rigid")
        except (RuntimeError, FloatingPointError) as e:  # e.g. torch.linalg failures
            reason = f"failed: {str(e).strip().splitlines()[-1] if str(e).strip() else e}"
        if reason is not None:
            msg = (f"{name_of_moving}: {name} stage discarded ({reason}); "
                   f"keeping the {kept[-1]} result")
            log.warning("%s", msg)
            warnings.append(msg)
            continue
        current, metric = m, value
        kept.append(name)
        if name == "rigid":
            rigid_m = m
    return kept, current, rigid_m, metric, warnings


def compose_affine_displacement(matrix: np.ndarray, fixed: Volume,
                                disp_mm: np.ndarray | None = None) -> np.ndarray:
    """One world displacement field for "deformable first, then affine".

    The whole transform is ``T(x) = A (x + d(x))``: the deformable stage registers the affinely
    resampled moving image ``moving(A y)`` to the fixed image with ``y = x + d(x)``, so a
    fixed-world point ``x`` is first displaced by ``d`` and then mapped by ``A`` into the
    moving world. Returns ``T(x) - x`` at every fixed voxel, the form
    :func:`mambamorph.io.write_itk_displacement` and
    :func:`mambamorph.space.warp_to_fixed` take.

    Args:
        matrix: ``(4, 4)`` fixed world -> moving world (RAS mm), as :attr:`AffineResult.matrix`.
        fixed: the fixed image (its canonical grid and affine).
        disp_mm: ``(D0, D1, D2, 3)`` deformable displacement in RAS mm at the fixed voxels
            (as :func:`mambamorph.space.displacement_to_fixed` gives); ``None``: zero.
    Returns:
        ``(D0, D1, D2, 3)`` float32 displacement in RAS mm on ``fixed``'s canonical grid.
    Raises:
        InputError: ``matrix`` is not a finite ``(4, 4)`` or ``disp_mm`` has the wrong shape.
    """
    a = np.asarray(matrix, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise InputError(f"affine: expected a finite (4, 4) matrix, got shape {a.shape}")
    if disp_mm is not None and tuple(np.shape(disp_mm)) != (*fixed.shape, 3):
        raise InputError(f"displacement of shape {tuple(np.shape(disp_mm))}, expected "
                         f"{(*fixed.shape, 3)}")
    s0, s1, s2 = fixed.shape
    out = np.empty((*fixed.shape, 3), dtype=np.float32)
    lin = a[:3, :3] - np.eye(3)
    for start in range(0, s0, _SLAB):
        stop = min(start + _SLAB, s0)
        vox = np.stack(np.meshgrid(np.arange(start, stop), np.arange(s1), np.arange(s2),
                                   indexing="ij"), -1).astype(np.float64)  # (n0, D1, D2, 3)
        x = vox @ fixed.affine[:3, :3].T + fixed.affine[:3, 3]  # world RAS mm
        t = x @ lin.T + a[:3, 3]  # A x - x
        if disp_mm is not None:
            t += np.asarray(disp_mm[start:stop], dtype=np.float64) @ a[:3, :3].T  # + A d
        out[start:stop] = t
    return out


# ------------------------------------------------------------------------------ optimiser
def _normalise(x: torch.Tensor) -> torch.Tensor:
    """Intensities to [0, 1]: minimum -> 0, 99.5th percentile -> 1 (clipped above)."""
    x = x.float()
    lo = x.min()
    flat = x.flatten()
    k = max(1, int(round(0.995 * flat.numel())))
    hi = flat.kthvalue(k).values
    if not hi > lo:
        hi = x.max()
    return ((x - lo) / (hi - lo)).clamp(0.0, 1.0)


def _shrink(x: torch.Tensor, affine: np.ndarray, s: int) -> tuple[torch.Tensor, np.ndarray]:
    """Average-pool a ``(D0, D1, D2)`` image by ``s``; the affine of the pooled grid."""
    if s == 1:
        return x, affine
    y = F.avg_pool3d(x[None, None], kernel_size=s, stride=s, ceil_mode=True,
                     count_include_pad=False)[0, 0]
    scale = np.eye(4)
    scale[:3, :3] *= s
    scale[:3, 3] = (s - 1) / 2.0  # pooled voxel 0 is the centre of voxels 0..s-1
    return y, affine @ scale


def _sample(image: torch.Tensor, vox: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Trilinear values of ``image`` ``(D0, D1, D2)`` at voxel points ``vox`` ``(N, 3)``.

    Returns ``(values (N,), inside (N,) bool)``; points beyond the outermost voxel centres
    read 0 and are flagged outside. Differentiable with respect to ``vox``.
    """
    size = torch.tensor(image.shape, dtype=vox.dtype)
    inside = ((vox >= 0) & (vox <= size - 1)).all(dim=1)
    v = torch.minimum(vox.clamp(min=0), size - 1)
    lo = v.floor().clamp(max=size - 2).clamp(min=0)
    w = v - lo  # (N, 3) weights of the upper neighbour
    lo = lo.long()
    d1, d2 = image.shape[1], image.shape[2]
    flat = image.reshape(-1)
    out = 0.0
    for c0 in (0, 1):
        for c1 in (0, 1):
            for c2 in (0, 1):
                i0 = (lo[:, 0] + c0).clamp(max=image.shape[0] - 1)
                i1 = (lo[:, 1] + c1).clamp(max=d1 - 1)
                i2 = (lo[:, 2] + c2).clamp(max=d2 - 1)
                wt = ((w[:, 0] if c0 else 1 - w[:, 0]) * (w[:, 1] if c1 else 1 - w[:, 1])
                      * (w[:, 2] if c2 else 1 - w[:, 2]))
                out = out + wt * flat[(i0 * d1 + i1) * d2 + i2]
    return out * inside, inside



def _parzen(values: torch.Tensor, bins: int) -> torch.Tensor:
    """``(N,)`` values in [0, 1] -> ``(N, bins)`` Gaussian Parzen weights (rows sum to 1).

    Bin ``j`` is centred at ``(j + 0.5) / bins`` and the Gaussian's sigma is one bin. Only the
    :data:`~mambamorph.optimize.affine_cpu.PARZEN_TAPS` bins within 4 sigma of each value are
    evaluated (the rest are 0, where the full Gaussian is below 3.4e-4 of its peak;
    tests/test_affine.py compares the two): 9 exponentials per sample instead of ``bins``.
    Differentiable with respect to ``values``.
    """
    x = values * bins - 0.5  # bin coordinates: bin j's centre at j
    half = PARZEN_TAPS // 2
    index = torch.floor(x.detach()).long()[:, None] + torch.arange(-half, half + 1)
    d = x[:, None] - index.to(x.dtype)
    w = torch.exp(-0.5 * d * d) * ((index >= 0) & (index < bins)).to(x.dtype)
    w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return x.new_zeros(len(x), bins).scatter_add(1, index.clamp(0, bins - 1), w)


def _neg_mi(wf: torch.Tensor, wm: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Negative mutual information of the joint Parzen histogram of the masked samples."""
    joint = (wf * mask[:, None]).T @ wm / mask.sum().clamp_min(1.0)  # (bins, bins)
    pf = joint.sum(dim=1, keepdim=True)
    pm = joint.sum(dim=0, keepdim=True)
    return -(joint * torch.log((joint + MI_EPS) / (pf @ pm + MI_EPS))).sum()


def _rotation(r: torch.Tensor) -> torch.Tensor:
    """Rotation matrix of a rotation vector ``(3,)`` (radians), by the matrix exponential."""
    z = r.new_zeros(())
    k = torch.stack([torch.stack([z, -r[2], r[1]]), torch.stack([r[2], z, -r[0]]),
                     torch.stack([-r[1], r[0], z])])
    return torch.linalg.matrix_exp(k)


class _Stages:
    """Rigid / affine stages by Adam on a Parzen-window mutual information (float64 geometry).

    Per level of shrink ``s``: the fixed samples (world points relative to the fixed centre and
    their Parzen weights) are drawn once; Adam steps start at ``0.5 s`` mm for the translation,
    ``0.01 s`` rad for the rotation vector and ``0.005 s`` for the linear part's entries, and
    decay to 0 (cosine) over ``iterations``.
    """

    def __init__(self, moving, fixed, centre, levels, iterations, bins, sampling, seed,
                 reference=False):
        self.reference = reference  # the metric by torch operations (the definition) if True
        self.centre = torch.tensor(centre, dtype=torch.float64)
        self.iterations, self.bins = iterations, bins
        gen = torch.Generator().manual_seed(int(seed))
        fx, mv = _normalise(fixed.data), _normalise(moving.data)
        self.levels = []
        for s in levels:
            f_s, f_aff = _shrink(fx, fixed.affine, s)
            m_s, m_aff = _shrink(mv, moving.affine, s)
            idx = identity_grid(f_s.shape, dtype=torch.float64).reshape(3, -1).T  # (N, 3)
            n = idx.shape[0]
            keep = max(min(n, 512), int(round(sampling * n)))
            pick = torch.randperm(n, generator=gen)[:keep]
            pts = idx[pick] @ torch.from_numpy(f_aff[:3, :3]).T + torch.from_numpy(f_aff[:3, 3])
            wf = _parzen(f_s.reshape(-1)[pick], bins)
            to_vox = torch.from_numpy(np.linalg.inv(m_aff))
            self.levels.append((s, pts - self.centre, wf, m_s, to_vox))

    def _metric(self, lin, trans, level):
        s, pts, wf, m_s, to_vox = level
        world = pts @ lin.T + self.centre + trans  # (N, 3) moving world mm
        vox = world @ to_vox[:3, :3].T + to_vox[:3, 3]
        if self.reference:
            values, inside = _sample(m_s, vox.float())
            mask = inside.float()
            value, share = _neg_mi(wf, _parzen(values.clamp(0, 1), self.bins), mask), mask.mean()
        else:  # the same metric and gradient in one compiled pass (affine_cpu)
            value, share = neg_mi_at_points(m_s, vox, wf)
        if not share >= 0.01:
            raise RuntimeError("the images no longer overlap (under 1 % of the sampled fixed "
                               "voxels fall inside the moving image)")
        return value

    def run(self, name: str, start: np.ndarray) -> tuple[np.ndarray, float]:
        st = torch.from_numpy(np.asarray(start, dtype=np.float64))
        lin0 = st[:3, :3]
        t0 = st[:3, :3] @ self.centre + st[:3, 3] - self.centre  # x = c + y -> A x = c + M y + t0
        rot = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        dlin = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
        dt = torch.zeros(3, dtype=torch.float64, requires_grad=True)

        def transform():
            lin = _rotation(rot) @ lin0 if name == "rigid" else lin0 + dlin
            return lin, t0 + dt

        value = float("nan")
        for level in self.levels:
            s = level[0]
            # step sizes: mm for the translation, rad or matrix entries for the linear part
            turn = (rot, 0.01 * s) if name == "rigid" else (dlin, 0.005 * s)
            opt = Adam([dt, turn[0]], lr=[0.5 * s, turn[1]])
            for i in range(self.iterations):
                opt.zero_grad()
                loss = self._metric(*transform(), level)
                if not torch.isfinite(loss):
                    return np.full((4, 4), np.nan), float("nan")
                loss.backward()
                opt.step(cosine_lr(i, self.iterations))
            with torch.no_grad():
                value = float(self._metric(*transform(), level))
        with torch.no_grad():
            lin, t = transform()
        m = np.eye(4)
        m[:3, :3] = lin.numpy()
        m[:3, 3] = (t + self.centre - lin @ self.centre).numpy()
        return m, value
