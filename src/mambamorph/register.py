"""Register one pair of NIfTI files (``mambamorph register``).

The pair may come in any orientation, voxel size, shape and world position. Stages:

1. **Affine pre-alignment** (``affine``, default on): rigid then affine (12 parameters) in world
   space on mutual information (:func:`mambamorph.optimize.affine.align_affine`): ``A`` maps
   fixed-world points to moving-world points. A stage that diverges is discarded with a warning.
2. **Model space** (:mod:`mambamorph.space`): the grid the network was trained on (the
   checkpoint's ``meta`` spacing and grid; 2 mm and 96x112x96 without a network), with the fixed
   image's canonical axis directions, centred on the fixed image's foreground. Each image is
   min-max normalised over its whole volume (as in training) and resampled into it trilinearly
   (0 outside); the moving image through ``A`` (sampled at ``A @ x``).
3. **Network** (``model``, default the shipped ``mambamorph`` weights; ``None``: none): a
   displacement ``u`` ``(3, G0, G1, G2)`` in model voxels (fixed -> moving) and its velocity.
4. **Instance optimisation** (``io``, default on): the velocity refined for this pair on
   MIND-SSD + diffusion, integrated by scaling-and-squaring
   (:func:`mambamorph.optimize.instance.instance_optimise`), from the network's velocity or from
   the identity.
5. **Fixed space**: ``u`` in world mm (``d``), interpolated at every voxel ``p`` of the fixed
   image's canonical grid (zero outside the model grid: a warning says when the fixed
   foreground reaches beyond it); the whole transform is ``T(p) = A (p + d(p))``. The moving
   image is sampled at ``T(p)`` through its own affine (trilinear, 0 outside, as ITK's default),
   the label map with nearest neighbour; outputs keep the fixed image's stored orientation,
   affine and header.

Outputs (in ``out_dir``):

- ``warped.nii.gz``: the moving image on the fixed grid (float32, the moving image's intensities);
- ``warped_seg.nii.gz``: the moving label map on the fixed grid (only with ``moving_seg``);
- ``displacement_itk.nii.gz``: the whole transform ``T(p) - p`` as an ITK/ANTs displacement
  field (5D vector NIfTI, LPS mm, :func:`mambamorph.io.write_itk_displacement`); ``sitk.Resample(moving, fixed,
  sitk.DisplacementFieldTransform(field), sitk.sitkLinear)`` or ``antsApplyTransforms -i MOVING
  -r FIXED -t displacement_itk.nii.gz`` reproduce ``warped.nii.gz`` (up to interpolation at the
  moving image's border);
- ``affine_itk.tfm``: ``A`` alone as an ITK transform file (with the affine stage);
- ``jacobian.nii.gz``: the Jacobian determinant of ``x -> x + u(x)`` (the deformable stage; the
  affine multiplies it by the constant ``det A``), computed on the model grid
  (:func:`mambamorph.metrics.jacobian_determinant`, the same numbers as the folding percentage
  and the evaluation) and resampled (trilinear) onto the fixed grid; 1 outside the model grid.
  The determinant does not depend on the coordinates it is computed in (voxels of either grid or
  mm), so without the affine stage this is the determinant of the written transform;
- ``qc.png``: moving (before) | fixed | warped | checkerboard | fixed edges on warped, in three
  views (:func:`mambamorph.viz.qc_overlay`);
- ``register.json``: inputs, checkpoint, model, model space, affine, IO settings, stage timings,
  folding percentage, warnings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mambamorph import __version__
from mambamorph.checkpoint import checkpoint_stem, load_model, shipped_weights
from mambamorph.models import predict
from mambamorph.data.preprocess import minmax, resample_array
from mambamorph.errors import InputError
from mambamorph.io import Volume, atomic_write_bytes, read_labels, read_volume, write_itk_affine
from mambamorph.metrics import sdlogj_of_determinant
from mambamorph.optimize.affine import align_affine, levels_for
from mambamorph.optimize.instance import IOConfig, instance_optimise, load_kernels
from mambamorph.register_products import WORKERS, stage, write_products
from mambamorph.runtime import Timer, resolve_device, resolve_precision
from mambamorph.space import (DEFAULT_GRID, DEFAULT_SPACING, ModelSpace, displacement_to_fixed,
                              model_space, model_space_from_meta, warn_outside, warp_to_fixed)
from mambamorph.data.preprocess import foreground_centre

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
    "Registrar",
    "register_files",
    "DEFAULT_MODEL",
]

log = logging.getLogger(__name__)

#: output file of each product, in ``out_dir``.
OUTPUT_NAMES: dict[str, str] = {
    "warped": "warped.nii.gz",
    "warped_seg": "warped_seg.nii.gz",
    "displacement": "displacement_itk.nii.gz",
    "jacobian": "jacobian.nii.gz",
    "qc": "qc.png",
    "affine": "affine_itk.tfm",
    "record": "register.json",
}

#: the checkpoint ``register`` uses unless told otherwise: the ``mambamorph`` weights shipped in
#: the package (phantom, MR -> CT, 2 mm; docs/weights.md), as a stem path.
DEFAULT_MODEL: Path | None = shipped_weights("mambamorph")


# ------------------------------------------------------------------------------------ result
@dataclass
class RegistrationResult:
    """What :func:`register_files` did.

    Attributes:
        out_dir: the output folder.
        files: ``{product: path}`` of every file written (keys of :data:`OUTPUT_NAMES`).
        checkpoint: the checkpoint used (None: training-free, no network).
        model: the registry name of its model (``"none"`` without a network).
        device: where the network ran.
        space: the model grid.
        defaulted: meta keys (``"spacing"``, ``"grid"``) that took the defaults.
        seconds_total: wall time of the whole call (reading to writing), s.
        seconds_predict: time of the network's forward pass (device-synchronised), s.
        folding_percent: % of model-grid voxels with a Jacobian determinant <= 0.
        sdlogj: standard deviation of the log Jacobian determinant over the model grid (every
            voxel; :func:`mambamorph.metrics.sdlogj` of the deformable field).
        jacobian_range: ``(min, max)`` determinant over the model grid.
        max_displacement_mm: largest displacement length on the fixed grid, mm.
        seconds_stages: wall time of each stage, s (the stages after the network run side by
            side on threads: "products (wall)" is their total wall time).
        affine: the affine pre-alignment, ``(4, 4)`` fixed world -> moving world (RAS mm) as
            nested lists, or None when that stage was off.
        instance_optimisation: whether the field was refined by instance optimisation.
        warnings: what went wrong but was recovered (a discarded affine stage, an optimisation
            stopped on a non-finite loss), one line each.
    """

    out_dir: Path
    files: dict[str, Path]
    checkpoint: Path | None
    model: str
    device: str
    space: ModelSpace
    defaulted: list[str] = field(default_factory=list)
    seconds_total: float = float("nan")
    seconds_predict: float = float("nan")
    folding_percent: float = float("nan")
    sdlogj: float = float("nan")
    jacobian_range: tuple[float, float] = (float("nan"), float("nan"))
    max_displacement_mm: float = float("nan")
    seconds_stages: dict[str, float] = field(default_factory=dict)
    affine: list | None = None
    instance_optimisation: bool = False
    warnings: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        grid = "x".join(str(g) for g in self.space.shape)
        sp = "x".join(f"{s:g}" for s in self.space.spacing)
        note = f" (defaulted: {', '.join(self.defaulted)})" if self.defaulted else ""
        lines = [
            f"registered with {_method_name({'model': self.model} if self.checkpoint else {}, self.instance_optimisation, self.affine)}"
            f"{f' ({self.checkpoint})' if self.checkpoint else ' (training-free)'} on {self.device}",
            f"  model grid {grid} voxels at {sp} mm{note}",
            f"  time {self.seconds_total:.2f} s ("
            + ", ".join(f"{k} {self.seconds_stages[k]:.2f} s" for k in
                        ("affine", "network", "instance optimisation") if k in self.seconds_stages)
            + ")",
            f"  folding {self.folding_percent:.3f} % of voxels; Jacobian determinant "
            f"{self.jacobian_range[0]:.3f} .. {self.jacobian_range[1]:.3f}; "
            f"max displacement {self.max_displacement_mm:.2f} mm",
            f"  wrote {len(self.files)} files in {self.out_dir}:",
        ]
        lines += [f"    {p.name}" for p in self.files.values()]
        lines += [f"  warning: {w}" for w in self.warnings]
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


def _outputs(out_dir: Path, with_seg: bool, overwrite: bool,
             with_affine: bool = True) -> dict[str, Path]:
    """Output paths, after checking that none exists (unless ``overwrite``).

    Raises:
        InputError: ``out_dir`` is not a folder.
        OutputExistsError: an output exists and ``overwrite`` is false.
    """
    from mambamorph.errors import OutputExistsError

    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder")
    names = {k: out_dir / v for k, v in OUTPUT_NAMES.items()
             if (with_seg or k != "warped_seg") and (with_affine or k != "affine")}
    existing = [p for p in names.values() if p.exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"{out_dir}: would overwrite "
                                f"{', '.join(p.name for p in existing)}; choose another folder")
    if not with_seg and (out_dir / OUTPUT_NAMES["warped_seg"]).exists():
        log.warning("%s: left in place from an earlier run (no moving segmentation given now)",
                    out_dir / OUTPUT_NAMES["warped_seg"])
    return names


class Registrar:
    """The settings of ``mambamorph register`` and its network, loaded once for many pairs.

    :func:`register_files` is ``Registrar(...).register(...)`` for one pair; ``mambamorph
    register --pairs`` (:mod:`mambamorph.register_batch`) keeps one :class:`Registrar` for every
    pair, so the checkpoint is read once. The settings are checked on construction (before any
    file is read); the network is loaded by :meth:`load` or, if that was not called, by the first
    :meth:`register` on a worker thread while that pair's images are read.

    Args:
        model: a checkpoint (the stem or either file of a ``.safetensors`` + ``.json`` pair);
            default the ``mambamorph`` weights shipped in the package (trained on the phantom,
            MR -> CT, 2 mm); ``None``: no network (training-free: instance optimisation from the
            identity on the default 2 mm, 96x112x96 model grid).
        device: ``"cpu"`` (default), ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
        affine: the pre-alignment: ``True`` / ``"affine"`` (default: rigid then affine),
            ``"rigid"`` (rigid only), ``False`` / ``"none"`` (off).
        io: refine the field by instance optimisation (default on).
        io_config: settings of the instance optimisation (default :class:`IOConfig()`, chosen on
            the phantom's validation pairs: docs/io-tuning.md).
        precision: the network's inference precision: ``fp32``, ``bf16`` or ``auto``
            (:func:`mambamorph.runtime.resolve_precision`).
    Raises:
        InputError: a bad ``affine`` value or precision; no stage to run (no model, no IO and no affine); an
            unavailable device; a model name or missing checkpoint.

    Attributes:
        checkpoint: the checkpoint path (None: training-free); device: the resolved device;
        align: ``"affine"``, ``"rigid"`` or ``"none"``; io, io_config: as given;
        loads: how many times the network was loaded (0 or 1).
    """

    def __init__(self, model: str | os.PathLike | None = DEFAULT_MODEL,
                 device: str | torch.device = "cpu", affine: bool | str = True,
                 io: bool = True, io_config: IOConfig | None = None,
                 precision: str | None = "fp32") -> None:
        align = {True: "affine", False: "none"}.get(affine, affine)
        if align not in ("affine", "rigid", "none"):
            raise InputError(f"affine pre-alignment: expected 'affine', 'rigid' or 'none', got "
                             f"{affine!r}")
        if model is None and not io and align == "none":
            raise InputError("nothing to register: no network, no instance optimisation and no "
                             "affine stage")
        self.align, self.io, self.io_config = align, io, io_config
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.checkpoint = _check_checkpoint_arg(model) if model is not None else None
        self.loads = 0
        self._network: tuple[torch.nn.Module, dict] | None = None
        self._io_kernels = False  # instance optimisation's kernels loaded in this process

    def load(self) -> "Registrar":
        """Load the network now (once; nothing without a checkpoint) and return ``self``.

        Raises:
            InputError: a corrupt checkpoint or one the device cannot run.
        """
        if self.checkpoint is not None and self._network is None:
            self._network = _load_network(self.checkpoint, self.device)
            self.loads += 1
        return self

    def register(self, moving: str | os.PathLike, fixed: str | os.PathLike,
                 out: str | os.PathLike = "mambamorph-register",
                 moving_seg: str | os.PathLike | None = None,
                 overwrite: bool = False) -> RegistrationResult:
        """Register ``moving`` onto ``fixed`` with these settings and write the results.

        See :func:`register_files` for the arguments, outputs and errors (the settings'
        errors are raised by the constructor instead).
        """
        t_start = time.perf_counter()
        stages: dict[str, float] = {}
        notes: list[str] = []
        out_dir = Path(out)
        align, io, io_config, dev, ckpt = (self.align, self.io, self.io_config, self.device,
                                           self.checkpoint)
        paths = _outputs(out_dir, moving_seg is not None, overwrite, with_affine=align != "none")

        with ThreadPoolExecutor(WORKERS) as pool:
            # the model (and the numba kernels it runs) loads on a worker thread while the
            # inputs are read here: gzip, nibabel and safetensors release the GIL for most of
            # their time
            with stage(stages, "read inputs + load model"):
                j_net = (pool.submit(self.load) if ckpt is not None and self._network is None
                         else None)
                # the optimisation's compiled kernels load beside the inputs and the affine stage
                j_io = (pool.submit(load_kernels) if io and dev.type == "cpu"
                        and not self._io_kernels else None)
                fix = read_volume(fixed)
                mov = read_volume(moving)
                seg = (read_labels(moving_seg, check_table=False) if moving_seg is not None
                       else None)
                if j_net is not None:
                    j_net.result()
                net, info = self._network if self._network is not None else (None, {})
            if seg is not None and (seg.shape != mov.shape or
                                    not np.allclose(seg.affine, mov.affine, atol=1e-3)):
                log.warning("%s: grid differs from the moving image's %s; it is sampled through "
                            "its own affine", seg.path, mov.path)
            aff = None
            if align != "none":
                with stage(stages, "affine"):
                    aff = align_affine(mov, fix, affine=align == "affine",
                                       levels=levels_for(fix))
                notes += aff.warnings
            with stage(stages, "model space + resample to it"):
                space, defaulted, mov_t, fix_t = _to_model_space(pool, net, info, ckpt, mov, fix,
                                                                 aff, dev)
            velocity = None
            u_t = torch.zeros((1, 3, *space.shape), device=dev)
            if net is not None:
                with torch.no_grad(), Timer(dev) as timer:
                    pred = predict(net, mov_t, fix_t, precision=self.precision)
                stages["network"] = timer.seconds
                u_t, velocity = pred.flow.float(), pred.velocity
                if not torch.isfinite(u_t).all():
                    raise InputError(f"{ckpt}: the network returned NaN/Inf displacements")
            if io:
                if j_io is not None:
                    with stage(stages, "wait for the IO kernels"):
                        j_io.result()
                    self._io_kernels = True
                with stage(stages, "instance optimisation"):
                    res_io = instance_optimise(mov_t, fix_t, init_velocity=velocity,
                                               init_flow=u_t if net is not None else None,
                                               cfg=io_config)
                if res_io.stopped_early:
                    notes.append("instance optimisation stopped early on a non-finite loss; its "
                                 "last finite state is used")
                u_t = res_io.flow
            u = u_t.detach().float().cpu()[0].numpy()  # (3, G0, G1, G2) model voxels
            with stage(stages, "products (wall)"):
                written, det_model, fold, disp = write_products(
                    pool, stages, u, space, fix, mov, seg, paths, overwrite,
                    _method_name(info, io, aff), affine=aff.matrix if aff is not None else None)
        if aff is not None:
            written["affine"] = write_itk_affine(paths["affine"], aff.matrix, overwrite=overwrite)
        for note in notes:
            log.warning("%s -> %s: %s", mov.path.name, fix.path.name, note)
        result = RegistrationResult(
            out_dir=out_dir, files=written, checkpoint=ckpt,
            model=str(info["model"]) if net is not None else "none", device=str(dev),
            space=space, defaulted=defaulted, seconds_predict=stages.get("network", 0.0),
            folding_percent=fold, sdlogj=sdlogj_of_determinant(det_model),
            jacobian_range=(float(det_model.min()), float(det_model.max())),
            max_displacement_mm=float(np.sqrt((disp.astype(np.float64) ** 2).sum(-1)).max()),
            seconds_stages=stages, affine=None if aff is None else aff.matrix.tolist(),
            instance_optimisation=io, warnings=notes)
        written["record"] = paths["record"]  # listed in the record itself
        result.seconds_total = time.perf_counter() - t_start
        record = _record(result, mov, fix, seg, io_config or IOConfig() if io else None,
                         self.precision if net is not None else None)
        atomic_write_bytes(paths["record"], (json.dumps(record, indent=2) + "\n").encode(),
                           overwrite=overwrite)
        log.info("%s", result)
        return result


def register_files(moving: str | os.PathLike, fixed: str | os.PathLike,
                   model: str | os.PathLike | None = DEFAULT_MODEL,
                   out: str | os.PathLike = "mambamorph-register",
                   moving_seg: str | os.PathLike | None = None,
                   device: str | torch.device = "cpu", overwrite: bool = False,
                   affine: bool | str = True, io: bool = True,
                   io_config: IOConfig | None = None,
                   precision: str | None = "fp32") -> RegistrationResult:
    """Register ``moving`` onto ``fixed`` and write the results.

    Stages (module docstring): affine pre-alignment in world space (``affine``), the network's
    prediction on the model grid (``model``), instance optimisation of that prediction on MIND-SSD
    (``io``); the outputs hold the whole transform. Nothing is written until every input has been
    read and checked and the registration is done; existing outputs are refused before anything
    is read. (One pair; for many, keep one :class:`Registrar`, which loads the network once.)

    Args:
        moving: moving image (``.nii`` / ``.nii.gz``, any orientation, spacing and shape).
        fixed: fixed image; every output is on its grid, with its affine and header.
        model: a checkpoint (the stem or either file of a ``.safetensors`` + ``.json`` pair);
            default the ``mambamorph`` weights shipped in the package (trained on the phantom,
            MR -> CT, 2 mm); ``None``: no network (training-free: instance optimisation from the
            identity on the default 2 mm, 96x112x96 model grid).
        out: output folder (created if missing).
        moving_seg: optional label map of the moving image (integer ids, any grid overlapping
            the moving image in world space), warped with nearest neighbour.
        device: ``"cpu"`` (default), ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
        overwrite: replace existing output files.
        affine: the pre-alignment: ``True`` / ``"affine"`` (default: rigid then affine),
            ``"rigid"`` (rigid only), ``False`` / ``"none"`` (off).
        io: refine the field by instance optimisation (default on).
        io_config: settings of the instance optimisation (default :class:`IOConfig()`, chosen on
            the phantom's validation pairs: docs/io-tuning.md).
        precision: the network's inference precision: ``fp32``, ``bf16`` or ``auto`` (see
            :func:`mambamorph.models.predict`; recorded in register.json).
    Returns:
        A :class:`RegistrationResult` (``str()`` gives a readable summary).
    Raises:
        InputError: an output exists and ``overwrite`` is false; a missing, non-NIfTI, corrupt,
            non-3D, NaN/Inf or constant input (named); a model name or missing/corrupt
            checkpoint; malformed meta spacing/grid, or a grid the model cannot run on; an
            unavailable device; no stage to run (no model, no IO and no affine).
    """
    return Registrar(model, device, affine, io, io_config, precision).register(
        moving, fixed, out, moving_seg=moving_seg, overwrite=overwrite)


def _to_model_space(pool, net, info: dict, ckpt: Path | None, mov: Volume, fix: Volume,
                    aff, dev: torch.device):
    """The model grid and both images on it: ``(space, defaulted, moving, fixed)``, the images
    ``(1, 1, G0, G1, G2)`` float32 on ``dev``, min-max normalised over the whole volume (as in
    training) and resampled trilinearly (0 outside = the minimum); the moving image through the
    affine pre-alignment ``aff`` (sampled at ``A @ x``) when there is one."""
    if net is not None:
        space, defaulted = model_space_from_meta(fix, info.get("meta", {}), str(ckpt))
        multiple = int(getattr(net, "size_multiple", 1))
        if any(g % multiple for g in space.shape):
            raise InputError(f"{ckpt}: grid {list(space.shape)} of the checkpoint's meta is "
                             f"not a multiple of {multiple}, which model {info['model']!r} needs")
    else:
        space, defaulted = model_space(fix, DEFAULT_SPACING, DEFAULT_GRID), []
    warn_outside(fix, space)
    mov_out = space.affine if aff is None else aff.matrix @ space.affine
    mov_m, fix_m = pool.map(lambda va: resample_array(minmax(va[0].data.numpy()), va[0].affine,
                                                      va[1], space.shape, 1),
                            ((mov, mov_out), (fix, space.affine)))
    if not mov_m.any():
        raise InputError(f"{mov.path}: does not overlap the model grid around the fixed image's "
                         f"centre; the pair must overlap in world coordinates (keep the affine "
                         f"stage on for pairs that are not aligned)")
    mov_t, fix_t = (torch.from_numpy(np.ascontiguousarray(a, np.float32))[None, None].to(dev)
                    for a in (mov_m, fix_m))  # (G0, G1, G2) -> (1, 1, G0, G1, G2)
    return space, defaulted, mov_t, fix_t


def _method_name(info: dict, io: bool, aff) -> str:
    """A short name of what ran, for the QC figure's title (e.g. "affine + mambamorph + IO")."""
    parts = (["affine"] if aff is not None else []) + (
        [str(info["model"])] if info else []) + (["IO"] if io else [])
    return " + ".join(parts)


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


def _record(res: RegistrationResult, mov: Volume, fix: Volume, seg: Volume | None,
            io_config: IOConfig | None, precision: str | None = None) -> dict:
    def path(v):
        return str(Path(v.path).resolve()) if v is not None else None

    return {
        "mambamorph_version": __version__,
        "moving": path(mov), "fixed": path(fix), "moving_seg": path(seg),
        "checkpoint": str(res.checkpoint.resolve()) if res.checkpoint else None,
        "model": res.model, "device": res.device, "network_precision": precision,
        "model_space": {"grid": list(res.space.shape), "spacing_mm": list(res.space.spacing),
                        "affine": np.round(res.space.affine, 6).tolist(),
                        "defaulted": res.defaulted},
        "affine": res.affine,
        "instance_optimisation": dataclasses.asdict(io_config) if io_config else None,
        "seconds_total": round(res.seconds_total, 4),
        "seconds_predict": round(res.seconds_predict, 4),
        "seconds_stages": {k: round(v, 4) for k, v in res.seconds_stages.items()},
        "folding_percent": res.folding_percent,
        "jacobian_min": res.jacobian_range[0], "jacobian_max": res.jacobian_range[1],
        "max_displacement_mm": res.max_displacement_mm,
        "warnings": res.warnings,
        "outputs": {k: p.name for k, p in res.files.items()},
        "notes": "displacement_itk.nii.gz: the whole transform (affine and deformable) as an "
                 "ITK/ANTs displacement field (LPS mm, fixed -> moving); affine_itk.tfm: the "
                 "affine stage alone (ITK transform file); jacobian.nii.gz: the deformable "
                 "stage's determinant (the affine's is a constant factor); the deformable "
                 "displacement is zero outside the model grid",
    }
