"""Instance optimisation (IO): refine the displacement of one pair on MIND-SSD.

The only parameter is a stationary velocity field ``v`` on a coarse control grid (the image grid
pooled by a level factor ``s``). Each Adam iteration:

1. ``v_s = smooth(v)``: ``smooth_passes`` 3^3 box filters (a B-spline-like smoothing, as in
   ConvexAdam);
2. ``u = exp(v_s)`` by scaling and squaring (:func:`mambamorph.nn.spatial.integrate_velocity`)
   on the control grid, so the map stays diffeomorphic, then upsampled trilinearly to the
   level's similarity grid (factor ``g``, a divisor of ``s``);
3. loss = ``mind_ssd_loss(warp(M_g, u), F_g) + lam * sum_j mean((d_j v_s)**2)`` with ``M_g``,
   ``F_g`` the MIND-SSC descriptors of the moving and fixed images average-pooled to the
   similarity grid and ``d_j`` forward differences along array axis ``j`` (control voxels).
   With a similarity stride ``k > 1`` (``IOConfig.sim_strides``) the MIND-SSD mean runs over one
   sub-lattice of stride ``k`` of the similarity grid, a different one at each iteration, and
   ``u`` is read at its points only (the same values as the upsampled field there).

A control grid coarser than the similarity grid is what keeps an iteration cheap on a CPU: the
integration and the smoothing (whose backward passes dominate) run on ``s**3`` times fewer voxels.

Levels run coarse to fine; the velocity is carried to the next level by trilinear upsampling.
The result is the final velocity upsampled to the image grid and integrated there
(``final="full"``), or the displacement integrated on the last level grid and upsampled
(``final="level"``, cheaper, not exactly diffeomorphic at full resolution).

Grid convention: a level grid of factor ``s`` is made by ``avg_pool3d(., s)``, so the centre of
coarse voxel ``p`` sits at fine coordinate ``s p + (s - 1) / 2``; fields move between grids with
:func:`_pool_field` (cell means) and :func:`_upsample_field` (``align_corners=False``), both
exact for that convention (:func:`mambamorph.nn.spatial.resize_flow` uses the corner-aligned
convention of arbitrary resampling instead, off by up to ``1/(D-1)`` of the extent here).

Bad input: a constant image, or one with NaN/Inf voxels, raises :class:`InputError` (there is
nothing to register); a non-finite loss during the optimisation stops it with a warning and
returns the last state whose loss was finite (the start itself if the first loss is not
finite), never a broken field.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mambamorph.errors import InputError
from mambamorph.nn.spatial import integrate_velocity
from mambamorph.optimize.adam import Adam
from mambamorph.similarity import mind_ssc, sampled_mind_ssd_loss, warped_mind_ssd_loss

__all__ = ["IOConfig", "IOResult", "instance_optimise", "load_kernels"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IOConfig:
    """Settings of :func:`instance_optimise`.

    The defaults were chosen on the demo phantom's validation pairs (docs/io-tuning.md,
    "Session 8"), through the whole ``register`` pipeline (affine stage included): the
    highest validation Dice whose SDlogJ stays within 0.11. The similarity is compared on the
    image-grid MIND descriptors at the fine level (one sub-lattice of stride 2 per iteration)
    and on the grid pooled by 2 at the coarse level (stride 2 again). On the 10 validation pairs,
    from the shipped network: 83.93 Dice, SDlogJ 0.108, no fold (the settings before, with
    the similarity on the grids pooled by 4 and 2 and ``lam=0.8``: 83.05 from the identity,
    SDlogJ 0.116); about 2 s per pair on 2 cores at 96x112x96 (5 s before the kernels of
    docs/results.md, "Session 10").

    Attributes:
        levels: grid factors of the velocity (control grid), coarse to fine (each divides every
            image size).
        sim_grids: grid factor of the similarity at each level (divides the level factor, is a
            multiple of ``mind_grid``).
        iterations: Adam iterations per level (same length as ``levels``).
        lr: Adam learning rate (the parameter is the velocity in image voxels, so a step moves
            it by about ``lr`` image voxels at every level).
        lam: weight of the diffusion term of the smoothed velocity.
        smooth_passes: 3^3 box filters applied to the velocity parameter (0 = none).
        steps: scaling-and-squaring steps on the level grids.
        final_steps: scaling-and-squaring steps of the full-resolution result.
        final: ``"full"`` (integrate the upsampled velocity at full resolution) or ``"level"``
            (upsample the displacement of the last level).
        mind_radius: MIND-SSC patch radius in voxels of the MIND grid.
        mind_dilations: MIND-SSC offsets in voxels of the MIND grid; several are concatenated
            (12 channels each).
        mind_grid: factor of the grid the MIND descriptors are computed on (1 = image grid,
            2 = the image average-pooled by 2); every level factor must be a multiple of it.
        sim_strides: per level, the similarity is evaluated at every ``k``-th voxel of its grid
            along each axis (one of the ``k**3`` sub-lattices, a different one at each
            iteration, every one once per ``k**3`` iterations; see :func:`_lattice_order`), a
            stochastic estimate of the whole-grid mean that costs ``k**3`` times less. Empty:
            1 at every level.
    """

    levels: tuple[int, ...] = (8, 4)
    sim_grids: tuple[int, ...] = (2, 1)
    iterations: tuple[int, ...] = (30, 30)
    lr: float = 1.0
    lam: float = 1.6
    smooth_passes: int = 3
    steps: int = 5
    final_steps: int = 7
    final: str = "full"
    mind_radius: int = 1
    mind_dilations: tuple[int, ...] = (1, 2)
    mind_grid: int = 1
    sim_strides: tuple[int, ...] = (2, 2)

    @classmethod
    def from_json(cls, text: str) -> "IOConfig":
        """Settings from a JSON object of field names (lists become tuples), e.g.
        ``'{"lam": 1.2, "sim_strides": [2, 2]}'``; the other fields keep their defaults.
        Raises :class:`InputError` for text that is not such an object or names no field."""
        try:
            fields = json.loads(text or "{}")
        except json.JSONDecodeError as e:
            raise InputError(f"instance optimisation settings: not JSON ({e}): {text!r}") from e
        if not isinstance(fields, dict):
            raise InputError(f"instance optimisation settings: expected a JSON object, got "
                             f"{text!r}")
        unknown = sorted(set(fields) - set(cls.__dataclass_fields__))
        if unknown:
            raise InputError(f"instance optimisation settings: unknown fields {unknown}; "
                             f"known: {sorted(cls.__dataclass_fields__)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})

    def check(self, shape: tuple[int, int, int]) -> None:
        """Raise :class:`InputError` if the settings are inconsistent or do not fit ``shape``."""
        levels, its, sims = tuple(self.levels), tuple(self.iterations), tuple(self.sim_grids)
        if not levels or len(levels) != len(its) or len(levels) != len(sims):
            raise InputError(f"instance optimisation: expected one iteration count and one "
                             f"similarity grid per level, got levels {levels}, iterations {its}, "
                             f"sim_grids {sims}")
        if any(int(s) != s or s < 1 for s in levels) or any(int(n) != n or n < 0 for n in its):
            raise InputError(f"instance optimisation: expected positive level factors and "
                             f"iteration counts >= 0, got {levels} and {its}")
        if int(self.mind_grid) != self.mind_grid or self.mind_grid < 1:
            raise InputError(f"instance optimisation: expected mind_grid >= 1, got "
                             f"{self.mind_grid}")
        for s, g in zip(levels, sims):
            if any(n % s for n in shape) or int(g) != g or g < 1 or s % g or g % self.mind_grid:
                raise InputError(f"instance optimisation: level factor {s} must divide the image "
                                 f"grid {tuple(shape)} and be a multiple of its similarity grid "
                                 f"{g}, itself a multiple of mind_grid {self.mind_grid}")
        if not (math.isfinite(self.lr) and self.lr > 0) or not (math.isfinite(self.lam)
                                                                 and self.lam >= 0):
            raise InputError(f"instance optimisation: expected lr > 0 and lam >= 0, got lr "
                             f"{self.lr}, lam {self.lam}")
        if self.final not in ("full", "level"):
            raise InputError(f"instance optimisation: expected final 'full' or 'level', got "
                             f"{self.final!r}")
        if not self.mind_dilations:
            raise InputError("instance optimisation: expected at least one MIND dilation")
        strides = tuple(self.sim_strides)
        if strides and (len(strides) != len(levels)
                        or any(int(k) != k or k < 1 for k in strides)):
            raise InputError(f"instance optimisation: expected no similarity strides or one "
                             f"integer >= 1 per level, got {strides} for levels {levels}")
        for g, k in zip(sims, strides):
            if any(n // g < k for n in shape):
                raise InputError(f"instance optimisation: similarity stride {k} does not fit "
                                 f"the similarity grid {tuple(n // g for n in shape)} (every "
                                 f"axis needs at least {k} voxels)")


@dataclass
class IOResult:
    """What :func:`instance_optimise` returns.

    Attributes:
        flow: displacement ``(1, 3, D0, D1, D2)`` in voxels of the image grid (channel ``i``
            along array axis ``i``; ``x -> x + flow(x)`` maps fixed points into the moving image).
        velocity: the stationary velocity ``(1, 3, D0, D1, D2)`` (image voxels) whose
            exponential is ``flow`` (``final="full"``) or approximates it (``final="level"``).
        loss_curve: total loss (similarity + regulariser) of every iteration, all levels in order.
        seconds: wall-clock time of the call.
        stopped_early: True when a non-finite loss stopped the optimisation.
    """

    flow: torch.Tensor
    velocity: torch.Tensor
    loss_curve: list[float] = field(default_factory=list)
    seconds: float = 0.0
    stopped_early: bool = False


def _pool_field(v: torch.Tensor, factor: int) -> torch.Tensor:
    """A field in fine voxels -> cell means on the grid pooled by ``factor``, in coarse voxels."""
    return v if factor == 1 else F.avg_pool3d(v, factor) / factor


def _upsample_field(v: torch.Tensor, factor: float, size) -> torch.Tensor:
    """A field on a pooled grid (coarse voxels) -> ``size`` grid ``factor`` times finer, in its
    voxels (cell-centred convention, ``align_corners=False``)."""
    if tuple(v.shape[2:]) == tuple(size):
        return v
    return F.interpolate(v, size=tuple(size), mode="trilinear", align_corners=False) * factor


def _smooth(v: torch.Tensor, passes: int) -> torch.Tensor:
    for _ in range(passes):
        v = F.avg_pool3d(v, 3, stride=1, padding=1, count_include_pad=False)
    return v


def _diffusion(v: torch.Tensor) -> torch.Tensor:
    """``sum_j mean((d_j v)**2)`` with forward differences along each array axis."""
    return ((v[:, :, 1:] - v[:, :, :-1]).square().mean()
            + (v[:, :, :, 1:] - v[:, :, :, :-1]).square().mean()
            + (v[:, :, :, :, 1:] - v[:, :, :, :, :-1]).square().mean())


def _lattice_order(k: int) -> list[tuple[int, int, int]]:
    """The ``k**3`` offsets of the sub-lattices of stride ``k``, in the order iterations visit
    them: offset number ``(i * p) mod k**3`` of ``itertools.product`` order at iteration ``i``,
    with ``p`` the first integer from ``0.38 k**3`` coprime to ``k**3`` (consecutive iterations
    sample far-apart lattices; every lattice once per cycle). ``k = 1``: ``[(0, 0, 0)]``."""
    offsets = list(itertools.product(range(k), repeat=3))
    n = len(offsets)
    p = max(1, int(0.38 * n))
    while math.gcd(p, n) != 1:
        p += 1
    return [offsets[(i * p) % n] for i in range(n)]


def _axis_weights(points: torch.Tensor, n: int) -> torch.Tensor:
    """``(E, n)`` matrix of the linear interpolation weights that read a 1D signal of ``n``
    samples at the positions ``points`` ``(E,)`` (in its sample units), positions clamped to
    ``[0, n - 1]`` (``grid_sample``'s ``padding_mode="border"``)."""
    p = points.clamp(0, n - 1)
    lo = p.floor().clamp(max=max(n - 2, 0)).long()
    w_hi = p - lo
    w = torch.zeros((p.numel(), n), dtype=points.dtype, device=points.device)
    rows = torch.arange(p.numel(), device=points.device)
    w[rows, lo] = 1 - w_hi
    if n > 1:
        w[rows, lo + 1] += w_hi
    return w


def _read_separable(u: torch.Tensor, weights: tuple) -> torch.Tensor:
    """A field ``(1, 3, A0, A1, A2)`` read at the points of a grid that is separable along the
    array axes: ``out[p, q, r] = sum_abc W0[p, a] W1[q, b] W2[r, c] u[a, b, c]``, i.e. trilinear
    interpolation at the points whose per-axis weight matrices ``weights`` = ``(W0, W1, W2)``
    (:func:`_axis_weights`) hold; three small matrix products, forward and backward."""
    w0, w1, w2 = weights
    x = torch.matmul(u, w2.t())                      # (1, 3, A0, A1, E2)
    x = torch.matmul(w1, x)                          # (1, 3, A0, E1, E2)
    return torch.einsum("pa,zcaqr->zcpqr", w0, x)    # (1, 3, E0, E1, E2)


def _lattices(ff: torch.Tensor, k: int, factor: float, size) -> list[tuple]:
    """Per sub-lattice of stride ``k`` of the similarity grid (in :func:`_lattice_order`): the
    fixed descriptors there ``(1, C, E0, E1, E2)`` (channels-last), the lattice points in
    similarity voxels ``(1, 3, E0, E1, E2)`` and the per-axis weights (:func:`_axis_weights`)
    that read a control grid of ``size`` (``factor`` times coarser, cell-centred) at those
    points with :func:`_read_separable`: the lattice is a product of one set of positions per
    axis, so trilinear interpolation there is three 1D interpolations (the same values as
    ``grid_sample`` with border padding, and as :func:`_upsample_field` sliced to the lattice;
    ``grid_sample``'s backward on the CPU cost as much as the rest of an iteration)."""
    out = []
    for o in _lattice_order(k):
        f_o = ff[:, :, o[0]::k, o[1]::k, o[2]::k].contiguous(memory_format=torch.channels_last_3d)
        axes = [torch.arange(n, dtype=ff.dtype, device=ff.device) * k + o[i]
                for i, n in enumerate(f_o.shape[2:])]
        base = torch.stack(torch.meshgrid(*axes, indexing="ij")).unsqueeze(0)
        # control-grid voxels of each axis's positions (align_corners=False centres)
        weights = tuple(_axis_weights((a + 0.5) / factor - 0.5, int(n))
                        for a, n in zip(axes, size))
        out.append((f_o, base, weights))
    return out


def _check_image(img: torch.Tensor, name: str) -> None:
    if img.dim() != 5 or img.shape[:2] != (1, 1):
        raise InputError(f"instance optimisation: expected the {name} image as (1, 1, D0, D1, D2),"
                         f" got {tuple(img.shape)}")
    if not torch.isfinite(img).all():
        raise InputError(f"instance optimisation: the {name} image has NaN or Inf voxels")
    lo, hi = float(img.min()), float(img.max())
    if not hi - lo > 1e-6 * max(1.0, abs(hi)):
        raise InputError(f"instance optimisation: the {name} image is constant (every voxel "
                         f"{lo:g}); there is nothing to register")


def mind_features(img: torch.Tensor, cfg: IOConfig) -> torch.Tensor:
    """MIND-SSC descriptors of ``img`` ``(1, 1, D0, D1, D2)`` on the MIND grid of ``cfg``:
    ``(1, 12 * len(cfg.mind_dilations), D0 / g, D1 / g, D2 / g)`` with ``g = cfg.mind_grid``."""
    x = img if cfg.mind_grid == 1 else F.avg_pool3d(img, int(cfg.mind_grid))
    return torch.cat([mind_ssc(x, cfg.mind_radius, d) for d in cfg.mind_dilations], dim=1)


def instance_optimise(moving: torch.Tensor, fixed: torch.Tensor,
                      init_velocity: torch.Tensor | None = None,
                      init_flow: torch.Tensor | None = None,
                      cfg: IOConfig | None = None) -> IOResult:
    """Refine the registration of one pair by instance optimisation (see the module docstring).

    Args:
        moving, fixed: ``(1, 1, D0, D1, D2)`` images on one grid (intensities in [0, 1], though
            MIND-SSC does not depend on the range).
        init_velocity: optional start ``(1, 3, E0, E1, E2)``: a stationary velocity in voxels of
            its own grid, which must be the image grid or the image grid pooled by an integer
            factor (e.g. a network's ``RegistrationOutput.velocity``).
        init_flow: optional start ``(1, 3, D0, D1, D2)``: a displacement in image voxels, used
            when no velocity is given; its logarithm is approximated to first order (``v ~ u``),
            which the first iterations then correct. Neither given: start from the identity.
        cfg: settings (default :class:`IOConfig()`).
    Returns:
        :class:`IOResult` with the flow and velocity on the image grid (float32, on the
        images' device).
    Raises:
        InputError: bad shapes, a constant image or one with NaN/Inf voxels, settings that do
            not fit the grid.
    """
    t0 = time.perf_counter()
    cfg = cfg or IOConfig()
    _check_image(moving, "moving")
    _check_image(fixed, "fixed")
    shape = tuple(fixed.shape[2:])
    if tuple(moving.shape[2:]) != shape:
        raise InputError(f"instance optimisation: the moving grid {tuple(moving.shape[2:])} "
                         f"differs from the fixed grid {shape}")
    cfg.check(shape)
    dev = fixed.device
    moving, fixed = moving.float(), fixed.float()

    start = None  # velocity in image voxels, on some grid
    if init_velocity is not None:
        start, what = init_velocity, "init_velocity"
    elif init_flow is not None:
        start, what = init_flow, "init_flow"
    if start is not None:
        if start.dim() != 5 or start.shape[:2] != (1, 3):
            raise InputError(f"instance optimisation: expected {what} as (1, 3, E0, E1, E2), got "
                             f"{tuple(start.shape)}")
        ratios = {n / e for n, e in zip(shape, start.shape[2:])}
        if len(ratios) != 1 or not float(next(iter(ratios))).is_integer():
            raise InputError(f"instance optimisation: {what} grid {tuple(start.shape[2:])} is not "
                             f"the image grid {shape} pooled by an integer factor")
        if not torch.isfinite(start).all():
            raise InputError(f"instance optimisation: {what} has NaN or Inf values")
        start_factor = int(next(iter(ratios)))
        start = start.detach().float().to(dev)

    with torch.no_grad():
        feat_m = mind_features(moving, cfg)
        feat_f = mind_features(fixed, cfg)

    curve: list[float] = []
    stopped = False
    v_level = None  # smoothed velocity of the previous level (its voxels), no grad
    prev_s = None
    strides = tuple(cfg.sim_strides) or (1,) * len(cfg.levels)
    for s, g, n_iter, k in zip(cfg.levels, cfg.sim_grids, cfg.iterations, strides):
        s, g, k = int(s), int(g), int(k)
        size = tuple(n // s for n in shape)
        sim_size = tuple(n // g for n in shape)
        with torch.no_grad():
            pool = g // int(cfg.mind_grid)
            fm = F.avg_pool3d(feat_m, pool) if pool > 1 else feat_m
            ff = F.avg_pool3d(feat_f, pool) if pool > 1 else feat_f
            # channels-last once per level: the CPU kernels read the channels of a voxel together
            fm = fm.contiguous(memory_format=torch.channels_last_3d)
            ff = ff.contiguous(memory_format=torch.channels_last_3d)
            lattices = _lattices(ff, k, s / g, size) if k > 1 else None
            if v_level is not None:
                v0 = _upsample_field(v_level, prev_s / s, size)
            elif start is not None:
                # start grid factor start_factor -> image voxels -> level grid s
                fine = _upsample_field(start, start_factor, shape) if start_factor > 1 else start
                v0 = _pool_field(fine, s)
            else:
                v0 = torch.zeros((1, 3, *size), device=dev)
        # the parameter is in IMAGE voxels (so lr means the same at every level)
        param = (v0 * s).requires_grad_(True)
        opt = Adam([param], lr=cfg.lr)
        last_good = param.detach().clone()
        for it in range(int(n_iter)):
            opt.zero_grad()
            vs = _smooth(param, cfg.smooth_passes) / s  # level voxels
            u = integrate_velocity(vs, cfg.steps)
            if lattices is None:
                disp = _upsample_field(u, s / g, sim_size)
                sim = warped_mind_ssd_loss(fm, ff, disp, padding_mode="border")
            else:  # one sub-lattice: u read at its points (= _upsample_field there)
                f_o, base, weights = lattices[it % len(lattices)]
                disp = _read_separable(u, weights) * (s / g)
                sim = sampled_mind_ssd_loss(fm, f_o, base + disp)
            loss = sim + cfg.lam * _diffusion(vs)
            value = float(loss.detach())
            if not math.isfinite(value):
                warnings.warn("instance optimisation: the loss became non-finite; returning the "
                              "last state whose loss was finite", RuntimeWarning, stacklevel=2)
                with torch.no_grad():
                    param.copy_(last_good)
                stopped = True
                break
            curve.append(value)
            last_good = param.detach().clone()
            loss.backward()
            opt.step()
        with torch.no_grad():
            if not torch.isfinite(param).all():  # the last step itself went non-finite
                param.copy_(last_good)
            v_level = _smooth(param, cfg.smooth_passes).detach() / s
        prev_s = s
        if stopped:
            break

    with torch.no_grad():
        s = prev_s
        velocity = _upsample_field(v_level, s, shape)
        if cfg.final == "full":
            flow = integrate_velocity(velocity, cfg.final_steps)
        else:
            flow = _upsample_field(integrate_velocity(v_level, cfg.steps), s, shape)
        if not torch.isfinite(flow).all():  # cannot happen for finite velocities; guard anyway
            raise RuntimeError("instance optimisation produced a non-finite field")
    seconds = time.perf_counter() - t0
    log.debug("instance optimisation: %d iterations in %.2f s", len(curve), seconds)
    return IOResult(flow=flow, velocity=velocity, loss_curve=curve, seconds=seconds,
                    stopped_early=stopped)


def load_kernels() -> None:
    """Load the compiled CPU kernels :func:`instance_optimise` runs (MIND-SSC, the fused
    warp + squared difference, the squarings and their backward) from numba's cache by running
    it once on a tiny random pair; nothing is returned or kept.

    Loading them took about 0.7 s in a fresh process here (2 cores, 2026-11-30); ``register``
    calls this on a worker thread while it reads the inputs and aligns them, so that the
    optimisation itself starts with its kernels loaded.
    """
    g = torch.Generator().manual_seed(0)
    shape = (1, 1, 32, 32, 32)  # the default levels pool it to 4**3 and 8**3
    with torch.no_grad():
        moving, fixed = torch.rand(shape, generator=g), torch.rand(shape, generator=g)
    instance_optimise(moving, fixed, cfg=IOConfig(iterations=(1, 1)))
