"""Register one pair of NIfTI files with a trained checkpoint (``mambamorph register``).

The pair may come in any orientation, voxel size and shape. Steps:

1. **Model space.** A network only works on the kind of grid it was trained on: canonical RAS+
   arrays (see :mod:`mambamorph.io`) at the training data's voxel size and of the training grid's
   shape, both read from the checkpoint's ``meta`` (``"spacing"`` in mm, ``"grid"`` in voxels;
   written by ``mambamorph train``; defaults 2 mm and 96x112x96, the phantom CPU preset, with a
   warning). The model space keeps the axis directions of the *fixed* image's canonical grid
   (an oblique fixed image gives an oblique model grid), takes the checkpoint's spacing and
   grid shape, and is centred on the centre of the bounding box of the fixed image's foreground
   (:func:`model_space`).
2. **Resampling.** Each image is min-max normalised to [0, 1] over its whole volume, as in
   training, then resampled into the model space through world coordinates (trilinear; 0
   outside the image, which is the image minimum after normalisation, as the training crop/pad
   does). This assumes the pair is already roughly aligned in world (scanner) coordinates, e.g.
   rigidly as the SR-Reg pairs are: the network only models the remaining deformation. Run a
   rigid/affine registration first for pairs that are not.
3. **Prediction.** The network gives a displacement ``u`` ``(3, G0, G1, G2)`` in voxels of the
   model grid (fixed -> moving); its world (RAS mm) form is ``A[:3, :3] @ u`` for the model
   grid's affine ``A``.
4. **Fixed space.** That world displacement ``d`` is interpolated (trilinearly, in model-grid
   coordinates) at every voxel ``p`` of the fixed image's canonical grid; outside the model grid
   ``d`` is **zero** (identity), so a fixed image whose foreground reaches beyond the model grid
   is only partly registered (a warning says so). The moving image is sampled at ``p + d(p)``
   through its own affine (trilinear, 0 outside the moving image as ITK's default), the moving
   label map likewise with nearest neighbour; outputs are written in the fixed image's stored
   orientation with its affine and header (:func:`mambamorph.io.write_volume`).

Outputs (in ``out_dir``):

- ``warped.nii.gz``: the moving image on the fixed grid (float32, the moving image's intensities);
- ``warped_seg.nii.gz``: the moving label map on the fixed grid (only with ``moving_seg``);
- ``displacement_itk.nii.gz``: ``d`` as an ITK/ANTs displacement field (5D vector NIfTI, LPS mm,
  :func:`mambamorph.io.write_itk_displacement`); ``sitk.Resample(moving, fixed,
  sitk.DisplacementFieldTransform(field), sitk.sitkLinear)`` or ``antsApplyTransforms -i MOVING
  -r FIXED -t displacement_itk.nii.gz`` reproduce ``warped.nii.gz`` (up to interpolation at the
  moving image's border);
- ``jacobian.nii.gz``: the Jacobian determinant of ``x -> x + u(x)``, computed on the model grid
  (:func:`mambamorph.metrics.jacobian_determinant`, the same numbers as the folding percentage
  and the evaluation) and resampled (trilinear) onto the fixed grid; 1 outside the model grid.
  The determinant does not depend on the coordinates it is computed in (voxels of either grid or
  mm), so this is the determinant of the written world transform wherever it is smooth;
- ``qc.png``: moving (before) | fixed | warped | checkerboard | fixed edges on warped, in three
  views (:func:`mambamorph.viz.qc_overlay`);
- ``register.json``: inputs, checkpoint, model, model space, timings, folding percentage.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

from mambamorph import __version__
from mambamorph.checkpoint import checkpoint_stem, load_model
from mambamorph.models import predict
from mambamorph.data.preprocess import minmax, resample_array
from mambamorph.errors import InputError
from mambamorph.io import Volume, atomic_write_bytes, read_labels, read_volume
from mambamorph.register_products import WORKERS, stage, write_products
from mambamorph.runtime import Timer, resolve_device

__all__ = [
    "DEFAULT_SPACING",
    "DEFAULT_GRID",
    "OUTPUT_NAMES",
    "ModelSpace",
    "RegistrationResult",
    "model_space",
    "model_space_from_meta",
    "foreground_centre",
    "displacement_to_fixed",
    "warp_to_fixed",
    "register_files",
]

log = logging.getLogger(__name__)

#: voxel size (mm) and grid assumed when a checkpoint's meta does not say (phantom CPU preset).
DEFAULT_SPACING: tuple[float, float, float] = (2.0, 2.0, 2.0)
DEFAULT_GRID: tuple[int, int, int] = (96, 112, 96)

#: output file of each product, in ``out_dir``.
OUTPUT_NAMES: dict[str, str] = {
    "warped": "warped.nii.gz",
    "warped_seg": "warped_seg.nii.gz",
    "displacement": "displacement_itk.nii.gz",
    "jacobian": "jacobian.nii.gz",
    "qc": "qc.png",
    "record": "register.json",
}

_SLAB = 16  # fixed-grid slices along axis 0 sampled at once (bounds the coordinate arrays)


# -------------------------------------------------------------------------------- model space
@dataclass(frozen=True)
class ModelSpace:
    """The grid the network runs on.

    Attributes:
        affine: ``(4, 4)`` voxel -> RAS world (mm) affine of the model grid.
        shape: ``(G0, G1, G2)`` grid shape (voxels).
        spacing: ``(3,)`` voxel size in mm.
    """

    affine: np.ndarray
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]


def _foreground_box(volume: Volume, fraction: float = 0.1) -> np.ndarray | None:
    """``(2, 3)`` first and last canonical voxel index of the foreground, or ``None``."""
    x = volume.data.numpy()
    lo, hi = float(x.min()), float(np.percentile(x, 99.5))
    if not hi > lo:
        return None
    idx = np.nonzero(x > lo + fraction * (hi - lo))
    if not idx[0].size:
        return None
    return np.array([[i.min() for i in idx], [i.max() for i in idx]], dtype=np.float64)


def foreground_centre(volume: Volume, fraction: float = 0.1) -> np.ndarray:
    """World (RAS mm) centre of the bounding box of a volume's foreground.

    Foreground: voxels above ``min + fraction * (p99.5 - min)`` of the volume's intensities
    (air is the minimum in MR and CT alike; the 99.5th percentile ignores a few bright outliers).
    A volume without such voxels gives the centre of its grid.

    Args:
        volume: a :class:`~mambamorph.io.Volume` (canonical ``data`` and ``affine`` are used).
        fraction: threshold between the minimum (0) and the 99.5th percentile (1).
    Returns:
        ``(3,)`` float64 world point in mm.
    """
    box = _foreground_box(volume, fraction)
    centre = ((np.array(volume.shape, dtype=np.float64) - 1) / 2.0 if box is None
              else box.mean(axis=0))
    return volume.affine[:3, :3] @ centre + volume.affine[:3, 3]


def model_space(fixed: Volume, spacing: float | Sequence[float] = DEFAULT_SPACING,
                grid: Sequence[int] = DEFAULT_GRID, centre: Sequence[float] | None = None
                ) -> ModelSpace:
    """The model grid for a fixed image: its canonical axes, the model's spacing and grid shape.

    Axis ``i`` of the model grid points the same way as canonical axis ``i`` of ``fixed`` (unit
    vector ``fixed.affine[:3, i] / fixed.spacing[i]``), with voxel size ``spacing[i]`` mm and
    ``grid[i]`` voxels; the grid's centre (voxel ``(grid - 1) / 2``) lies on ``centre``.

    Args:
        fixed: the fixed image.
        spacing: model voxel size in mm (one number or three).
        grid: model grid shape ``(G0, G1, G2)``.
        centre: world point (RAS mm) the grid is centred on; default
            :func:`foreground_centre` of ``fixed``.
    Returns:
        A :class:`ModelSpace`.
    Raises:
        InputError: non-positive spacing or grid sizes.
    """
    sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)).copy()
    shape = tuple(int(g) for g in grid)
    if not np.all(np.isfinite(sp) & (sp > 0)):
        raise InputError(f"model space: spacing must be 3 positive sizes in mm, got {spacing}")
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"model space: grid must be 3 positive sizes, got {grid}")
    c = foreground_centre(fixed) if centre is None else np.asarray(centre, dtype=np.float64)
    directions = fixed.affine[:3, :3] / fixed.spacing  # unit columns
    aff = np.eye(4)
    aff[:3, :3] = directions * sp
    aff[:3, 3] = c - aff[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    return ModelSpace(affine=aff, shape=shape, spacing=tuple(float(s) for s in sp))


def _meta_geometry(meta: dict, source: str) -> tuple[tuple[float, float, float],
                                                      tuple[int, int, int], list[str]]:
    """Spacing and grid from a checkpoint's meta (defaults logged), plus which were defaulted."""
    defaulted = []
    spacing = meta.get("spacing")
    if spacing is None:
        spacing = DEFAULT_SPACING
        defaulted.append("spacing")
        log.warning("%s: checkpoint meta has no 'spacing'; assuming %s mm (the phantom CPU "
                    "preset)", source, "x".join(f"{s:g}" for s in DEFAULT_SPACING))
    grid = meta.get("grid")
    if grid is None:
        grid = DEFAULT_GRID
        defaulted.append("grid")
        log.warning("%s: checkpoint meta has no 'grid'; assuming %s voxels (the phantom CPU "
                    "preset)", source, "x".join(str(g) for g in DEFAULT_GRID))
    try:
        sp = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)))
        gr = tuple(int(g) for g in grid)
    except (TypeError, ValueError):
        raise InputError(f"{source}: meta 'spacing' {spacing!r} / 'grid' {grid!r} are not "
                         f"3 numbers") from None
    if not all(np.isfinite(s) and s > 0 for s in sp):
        raise InputError(f"{source}: meta 'spacing' must be positive mm, got {spacing!r}")
    if len(gr) != 3 or min(gr) < 1 or any(g != float(v) for g, v in zip(gr, grid)):
        raise InputError(f"{source}: meta 'grid' must be 3 positive integers, got {grid!r}")
    return sp, gr, defaulted


def model_space_from_meta(fixed: Volume, meta: dict, source: str = "checkpoint"
                          ) -> tuple[ModelSpace, list[str]]:
    """:func:`model_space` with the spacing and grid of a checkpoint's ``meta``.

    Args:
        fixed: the fixed image.
        meta: the checkpoint JSON's ``"meta"`` dict (``"spacing"``, ``"grid"``; missing keys take
            :data:`DEFAULT_SPACING` / :data:`DEFAULT_GRID` with a logged warning).
        source: the checkpoint's name, for messages.
    Returns:
        ``(space, defaulted)``: the :class:`ModelSpace` and the keys that were defaulted.
    Raises:
        InputError: malformed ``spacing`` / ``grid`` values.
    """
    sp, gr, defaulted = _meta_geometry(meta or {}, source)
    return model_space(fixed, sp, gr), defaulted


# ------------------------------------------------------------------------- field and warping
def displacement_to_fixed(flow: torch.Tensor | np.ndarray, space: ModelSpace,
                          fixed: Volume) -> np.ndarray:
    """The model's displacement as world vectors at the voxels of the fixed image's grid.

    Args:
        flow: ``(3, G0, G1, G2)`` or ``(1, 3, G0, G1, G2)`` displacement in voxels of the model
            grid (channel ``i`` along model axis ``i``; fixed -> moving).
        space: the model grid.
        fixed: the fixed image (its canonical grid is the output grid).
    Returns:
        ``(D0, D1, D2, 3)`` float32 displacement in RAS mm on ``fixed``'s canonical grid:
        ``d(p) = A[:3, :3] @ u(inv(A) p)`` with ``u`` interpolated trilinearly, zero outside
        the model grid.
    Raises:
        InputError: ``flow`` does not have the model grid's shape.
    """
    u = flow.detach().float().cpu().numpy() if isinstance(flow, torch.Tensor) else np.asarray(
        flow, dtype=np.float32)
    if u.ndim == 5 and u.shape[0] == 1:
        u = u[0]
    if u.shape != (3, *space.shape):
        raise InputError(f"displacement of shape {u.shape}, expected (3, {space.shape}) on the "
                         f"model grid")
    # float32 like the network's output (scipy interpolates in float64 either way)
    world = np.einsum("ij,j...->i...", space.affine[:3, :3].astype(np.float32), u)
    out = np.empty((*fixed.shape, 3), dtype=np.float32)
    for i in range(3):
        out[..., i] = resample_array(world[i], space.affine, fixed.affine, fixed.shape,
                                     order=1, cval=0.0)
    return out


def warp_to_fixed(volume: Volume, disp_mm: np.ndarray, fixed: Volume, order: int = 1,
                  cval: float = 0.0) -> np.ndarray:
    """Sample ``volume`` at ``p + disp_mm(p)`` for every voxel ``p`` of the fixed grid.

    Points are mapped to ``volume``'s voxels through its own affine, so ``volume`` may have any
    grid. Sampling is ``scipy.ndimage.map_coordinates``, with the same boundary rules as
    :func:`mambamorph.data.preprocess.resample_array`: ``order=1`` (images) gives ``cval``
    beyond the outermost voxel centres, ``order=0`` (label maps) beyond the outermost voxel
    cubes.

    Args:
        volume: the moving image or label map (canonical ``data`` and ``affine``).
        disp_mm: ``(D0, D1, D2, 3)`` displacement in RAS mm on ``fixed``'s canonical grid.
        fixed: the fixed image (output grid).
        order: 1 (trilinear) for images, 0 (nearest) for label maps.
        cval: value of points outside ``volume``.
    Returns:
        ``(D0, D1, D2)`` array on ``fixed``'s canonical grid: float32 for ``order >= 1``,
        ``volume``'s dtype (int64 for labels) for ``order=0``.
    Raises:
        InputError: ``disp_mm`` does not have the fixed grid's shape.
    """
    d = np.asarray(disp_mm)
    if d.shape != (*fixed.shape, 3):
        raise InputError(f"displacement of shape {d.shape}, expected {(*fixed.shape, 3)}")
    data = volume.data.numpy()
    if order >= 1:
        data = data.astype(np.float32, copy=False)
    to_vox = np.linalg.inv(volume.affine)
    m = to_vox @ fixed.affine  # fixed voxel -> volume voxel
    s0, s1, s2 = fixed.shape
    out = np.empty(fixed.shape, dtype=data.dtype)
    ax1, ax2 = np.arange(s1, dtype=np.float64), np.arange(s2, dtype=np.float64)
    mode = "grid-constant" if order == 0 else "constant"
    for start in range(0, s0, _SLAB):
        stop = min(start + _SLAB, s0)
        vox = np.stack(np.meshgrid(np.arange(start, stop, dtype=np.float64), ax1, ax2,
                                   indexing="ij")).reshape(3, -1)  # (3, n) fixed voxels
        disp = d[start:stop].reshape(-1, 3).T.astype(np.float64)  # (3, n) mm
        coords = m[:3, :3] @ vox + m[:3, 3:] + to_vox[:3, :3] @ disp  # (3, n) volume voxels
        out[start:stop] = ndi.map_coordinates(data, coords, order=order, mode=mode,
                                              cval=cval).reshape(stop - start, s1, s2)
    return out


# ------------------------------------------------------------------------------------ result
@dataclass
class RegistrationResult:
    """What :func:`register_files` did.

    Attributes:
        out_dir: the output folder.
        files: ``{product: path}`` of every file written (keys of :data:`OUTPUT_NAMES`).
        checkpoint: the checkpoint given.
        model: the registry name of its model.
        device: where the network ran.
        space: the model grid.
        defaulted: meta keys (``"spacing"``, ``"grid"``) that took the defaults.
        seconds_total: wall time of the whole call (reading to writing), s.
        seconds_predict: time of the network's forward pass (device-synchronised), s.
        folding_percent: % of model-grid voxels with a Jacobian determinant <= 0.
        jacobian_range: ``(min, max)`` determinant over the model grid.
        max_displacement_mm: largest displacement length on the fixed grid, mm.
        seconds_stages: wall time of each stage, s (the stages after the network run side by
            side on threads: "products (wall)" is their total wall time).
    """

    out_dir: Path
    files: dict[str, Path]
    checkpoint: Path
    model: str
    device: str
    space: ModelSpace
    defaulted: list[str] = field(default_factory=list)
    seconds_total: float = float("nan")
    seconds_predict: float = float("nan")
    folding_percent: float = float("nan")
    jacobian_range: tuple[float, float] = (float("nan"), float("nan"))
    max_displacement_mm: float = float("nan")
    seconds_stages: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        grid = "x".join(str(g) for g in self.space.shape)
        sp = "x".join(f"{s:g}" for s in self.space.spacing)
        note = f" (defaulted: {', '.join(self.defaulted)})" if self.defaulted else ""
        lines = [
            f"registered with {self.model} ({self.checkpoint}) on {self.device}",
            f"  model grid {grid} voxels at {sp} mm{note}",
            f"  time {self.seconds_total:.2f} s (network {self.seconds_predict:.2f} s)",
            f"  folding {self.folding_percent:.3f} % of voxels; Jacobian determinant "
            f"{self.jacobian_range[0]:.3f} .. {self.jacobian_range[1]:.3f}; "
            f"max displacement {self.max_displacement_mm:.2f} mm",
            f"  wrote {len(self.files)} files in {self.out_dir}:",
        ]
        lines += [f"    {p.name}" for p in self.files.values()]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ driver
def _check_checkpoint_arg(model: str | os.PathLike) -> Path:
    """A checkpoint path; a bare model name gets a message that says what to pass instead."""
    p = Path(model)
    stem = checkpoint_stem(p)
    if not (stem.with_suffix(".json").exists() or stem.with_suffix(".safetensors").exists()):
        from mambamorph.models.registry import list_models

        if p.is_dir():
            raise InputError(f"{p}: a folder, not a checkpoint; pass the weights file, e.g. "
                             f"{p / 'checkpoints' / 'best.safetensors'}")

        if str(model) in list_models():
            raise InputError(f"{model}: a model name, not a checkpoint; pass the trained "
                             f"weights (e.g. RUN/checkpoints/best.safetensors from "
                             f"`mambamorph train`)")
        raise InputError(f"{model}: checkpoint not found (expected {stem}.safetensors and "
                         f"{stem}.json)")
    return p


def _outputs(out_dir: Path, with_seg: bool, overwrite: bool) -> dict[str, Path]:
    """Output paths, after checking that none exists (unless ``overwrite``).

    Raises:
        InputError: ``out_dir`` is not a folder.
        OutputExistsError: an output exists and ``overwrite`` is false.
    """
    from mambamorph.errors import OutputExistsError

    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder")
    names = {k: out_dir / v for k, v in OUTPUT_NAMES.items() if with_seg or k != "warped_seg"}
    existing = [p for p in names.values() if p.exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"{out_dir}: would overwrite "
                                f"{', '.join(p.name for p in existing)}; choose another folder")
    if not with_seg and (out_dir / OUTPUT_NAMES["warped_seg"]).exists():
        log.warning("%s: left in place from an earlier run (no moving segmentation given now)",
                    out_dir / OUTPUT_NAMES["warped_seg"])
    return names


def register_files(moving: str | os.PathLike, fixed: str | os.PathLike,
                   model: str | os.PathLike, out: str | os.PathLike,
                   moving_seg: str | os.PathLike | None = None,
                   device: str | torch.device = "cpu",
                   overwrite: bool = False) -> RegistrationResult:
    """Register ``moving`` onto ``fixed`` with a trained checkpoint and write the results.

    See the module docstring for the method, the assumption of a pair roughly aligned in world
    coordinates, and the files written. Nothing is written until every input has been read and
    checked and the prediction is done; existing outputs are refused before anything is read.

    Args:
        moving: moving image (``.nii`` / ``.nii.gz``, any orientation, spacing and shape).
        fixed: fixed image; every output is on its grid, with its affine and header.
        model: a checkpoint (the stem or either file of a ``.safetensors`` + ``.json`` pair).
        out: output folder (created if missing).
        moving_seg: optional label map of the moving image (integer ids, any grid overlapping
            the moving image in world space), warped with nearest neighbour.
        device: ``"cpu"`` (default), ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
        overwrite: replace existing output files.
    Returns:
        A :class:`RegistrationResult` (``str()`` gives a readable summary).
    Raises:
        InputError: an output exists and ``overwrite`` is false; a missing, non-NIfTI, corrupt,
            non-3D, NaN/Inf or constant input (named); a model name or missing/corrupt
            checkpoint; malformed meta spacing/grid, or a grid the model cannot run on; an
            unavailable device.
    """
    t_start = time.perf_counter()
    stages: dict[str, float] = {}
    out_dir = Path(out)
    paths = _outputs(out_dir, moving_seg is not None, overwrite)
    dev = resolve_device(device)
    ckpt = _check_checkpoint_arg(model)

    with ThreadPoolExecutor(WORKERS) as pool:
        # the model (and the numba kernels it runs) loads on a worker thread while the inputs
        # are read here: gzip, nibabel and safetensors release the GIL for most of their time
        with stage(stages, "read inputs + load model"):
            j_net = pool.submit(_load_network, ckpt, dev)
            fix = read_volume(fixed)
            mov = read_volume(moving)
            seg = read_labels(moving_seg, check_table=False) if moving_seg is not None else None
            net, info = j_net.result()
        if seg is not None and (seg.shape != mov.shape or
                                not np.allclose(seg.affine, mov.affine, atol=1e-3)):
            log.warning("%s: grid differs from the moving image's %s; it is sampled through "
                        "its own affine", seg.path, mov.path)
        with stage(stages, "model space + resample to it"):
            space, defaulted = model_space_from_meta(fix, info.get("meta", {}), str(ckpt))
            multiple = int(getattr(net, "size_multiple", 1))
            if any(g % multiple for g in space.shape):
                raise InputError(f"{ckpt}: grid {list(space.shape)} of the checkpoint's meta is "
                                 f"not a multiple of {multiple}, which model {info['model']!r} "
                                 f"needs")
            _warn_outside(fix, space)
            # min-max over the whole volume (as training), then resample (0 = minimum)
            mov_m, fix_m = pool.map(
                lambda v: resample_array(minmax(v.data.numpy()), v.affine, space.affine,
                                         space.shape, 1), (mov, fix))
        if not mov_m.any():
            raise InputError(f"{mov.path}: does not overlap the model grid around the fixed "
                             f"image's centre; the pair must be roughly aligned in world "
                             f"coordinates (run a rigid registration first)")
        mov_t, fix_t = (torch.from_numpy(np.ascontiguousarray(a, np.float32))[None, None].to(dev)
                        for a in (mov_m, fix_m))  # (G0, G1, G2) -> (1, 1, G0, G1, G2)
        with torch.no_grad(), Timer(dev) as timer:
            flow = predict(net, mov_t, fix_t).flow
        stages["network"] = timer.seconds
        u = flow.detach().float().cpu()[0].numpy()  # (3, G0, G1, G2) model voxels
        if not np.all(np.isfinite(u)):
            raise InputError(f"{ckpt}: the network returned NaN/Inf displacements")
        with stage(stages, "products (wall)"):
            written, det_model, fold, disp = write_products(pool, stages, u, space, fix, mov, seg,
                                                       paths, overwrite, str(info["model"]))
    result = RegistrationResult(
        out_dir=out_dir, files=written, checkpoint=ckpt, model=str(info["model"]),
        device=str(dev), space=space, defaulted=defaulted, seconds_predict=timer.seconds,
        folding_percent=fold,
        jacobian_range=(float(det_model.min()), float(det_model.max())),
        max_displacement_mm=float(np.sqrt((disp.astype(np.float64) ** 2).sum(-1)).max()),
        seconds_stages=stages)
    written["record"] = paths["record"]  # listed in the record itself
    result.seconds_total = time.perf_counter() - t_start
    record = _record(result, mov, fix, seg)
    atomic_write_bytes(paths["record"], (json.dumps(record, indent=2) + "\n").encode(),
                       overwrite=overwrite)
    log.info("%s", result)
    return result


def _load_network(ckpt: Path, dev: torch.device) -> tuple[torch.nn.Module, dict]:
    """:func:`~mambamorph.checkpoint.load_model`, then the numba scan kernels if it uses them.

    Importing numba and loading the cached kernels took 0.48 s of CPU here; run here (on a
    worker thread, while the inputs are read and resampled) it is off the network's clock.
    """
    net, info = load_model(ckpt, dev)
    from mambamorph.nn.mamba import Mamba
    from mambamorph.nn.ssm import resolve_impl

    if any(isinstance(m, Mamba) and resolve_impl(m.scan_impl, dev) == "cpu"
           for m in net.modules()):
        from mambamorph.nn.ssm.cpu import selective_scan_cpu

        e, n, length = 2, 2, 3  # a tiny float32 problem: loads the kernels the network runs
        with torch.no_grad():
            selective_scan_cpu(torch.zeros(1, e, length), torch.zeros(1, e, length),
                               -torch.ones(e, n), torch.zeros(1, n, length),
                               torch.zeros(1, n, length), torch.zeros(e),
                               torch.zeros(1, e, length), torch.zeros(e), True)
    return net, info


def _warn_outside(fixed: Volume, space: ModelSpace) -> None:
    """Warn when the fixed image's foreground reaches beyond the model grid."""
    box = _foreground_box(fixed)
    if box is None:
        return
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)])
    pts = np.where(corners, box[1], box[0])  # (8, 3) bounding-box corners, fixed voxels
    to_model = np.linalg.inv(space.affine) @ fixed.affine
    y = pts @ to_model[:3, :3].T + to_model[:3, 3]
    if (y < -0.5).any() or (y > np.array(space.shape) - 0.5).any():
        log.warning("%s: the foreground extends beyond the model grid (%s voxels at %s mm); "
                    "outside it the displacement is zero (not registered)", fixed.path,
                    "x".join(map(str, space.shape)), "x".join(f"{s:g}" for s in space.spacing))


def _record(res: RegistrationResult, mov: Volume, fix: Volume, seg: Volume | None) -> dict:
    def path(v):
        return str(Path(v.path).resolve()) if v is not None else None

    return {
        "mambamorph_version": __version__,
        "moving": path(mov), "fixed": path(fix), "moving_seg": path(seg),
        "checkpoint": str(res.checkpoint.resolve()), "model": res.model, "device": res.device,
        "model_space": {"grid": list(res.space.shape), "spacing_mm": list(res.space.spacing),
                        "affine": np.round(res.space.affine, 6).tolist(),
                        "defaulted": res.defaulted},
        "seconds_total": round(res.seconds_total, 4),
        "seconds_predict": round(res.seconds_predict, 4),
        "seconds_stages": {k: round(v, 4) for k, v in res.seconds_stages.items()},
        "folding_percent": res.folding_percent,
        "jacobian_min": res.jacobian_range[0], "jacobian_max": res.jacobian_range[1],
        "max_displacement_mm": res.max_displacement_mm,
        "outputs": {k: p.name for k, p in res.files.items()},
        "notes": "displacement_itk.nii.gz: ITK/ANTs displacement field (LPS mm, fixed -> moving);"
                 " the displacement is zero outside the model grid; inputs assumed roughly "
                 "aligned in world coordinates",
    }
