"""The outputs of one ``mambamorph register`` call, computed and written side by side.

After the network, :func:`write_products` takes the prediction to the fixed image's grid, warps
the moving image and label map, resamples the Jacobian, writes the four NIfTI files and draws the
QC figure (see :mod:`mambamorph.register` for what each file holds) on a thread pool: the
resampling kernels (:mod:`mambamorph.resample_cpu`, themselves parallel), zlib and nibabel
release the GIL, so these pieces overlap. :func:`stage` records the wall time of each piece.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mambamorph.data.preprocess import resample_array
from mambamorph.io import Volume, write_itk_displacement, write_volume
from mambamorph.metrics import jacobian_determinant
from mambamorph.space import displacement_to_fixed, warp_to_fixed

if TYPE_CHECKING:
    from mambamorph.space import ModelSpace

__all__ = ["WORKERS", "stage", "timed_call", "write_products"]

#: threads for the work around the network (reading, resampling, gzip, the QC figure): the
#: resampling kernels, zlib and nibabel release the GIL, so they run side by side on the cores.
WORKERS = max(2, min(4, os.cpu_count() or 1))


@contextmanager
def stage(stages: dict[str, float], name: str):
    """Add the wall time of the ``with`` body to ``stages[name]`` (seconds)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        stages[name] = stages.get(name, 0.0) + time.perf_counter() - t0


def timed_call(stages: dict[str, float], name: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, its wall time added to ``stages[name]`` (seconds)."""
    with stage(stages, name):
        return fn(*args, **kwargs)


def write_products(pool: ThreadPoolExecutor, stages: dict[str, float], u: np.ndarray,
                   space: ModelSpace, fix: Volume, mov: Volume, seg: Volume | None,
                   paths: dict[str, Path], overwrite: bool, model_name: str,
                   affine: np.ndarray | None = None):
    """Every output of the prediction ``u`` ``(3, G0, G1, G2)`` (model voxels), written.

    The independent pieces run on ``pool``: the Jacobian (model grid, then onto the fixed grid)
    and the moving image on the fixed grid (the QC's "before") while the displacement is taken
    to the fixed grid; then the warps, the gzip writes and the QC figure. Each task's own time
    goes into ``stages`` (they overlap, so they add up to more than the wall time).

    Args:
        pool: the thread pool to run on; stages: ``{name: seconds}`` to add the times to.
        u: ``(3, G0, G1, G2)`` float32 displacement in voxels of the model grid ``space``.
        fix, mov, seg: the fixed image, moving image and moving label map (or None).
        paths: ``{product: path}`` (keys of :data:`mambamorph.register.OUTPUT_NAMES`).
        overwrite: replace existing files; model_name: for the QC figure's title.
        affine: ``(4, 4)`` fixed world -> moving world (RAS mm) of an affine pre-alignment, or
            None; the whole transform is then ``x -> A (x + d(x))``
            (:func:`mambamorph.optimize.affine.compose_affine_displacement`), and that whole
            transform is what the warps and ``displacement_itk.nii.gz`` use. The Jacobian files
            stay those of the deformable stage (the affine's determinant is a constant factor).

    Returns:
        ``(written, det_model, folding_percent, disp)``: ``{product: path}`` of the files
        written (all but the record), the ``(G0, G1, G2)`` float64 Jacobian determinant on the
        model grid, the % of its voxels <= 0, and the ``(D0, D1, D2, 3)`` RAS mm displacement
        on the fixed grid (the whole transform, affine included).
    """
    from mambamorph.viz import qc_overlay

    def jacobian():
        det = timed_call(stages, "jacobian (model grid)", jacobian_determinant, u)
        jac = timed_call(stages, "jacobian to fixed grid", resample_array, det, space.affine,
                         fix.affine, fix.shape, order=1, cval=1.0)
        path = timed_call(stages, "write jacobian", write_volume, paths["jacobian"],
                          jac.astype(np.float32), like=fix, overwrite=overwrite)
        return det, path

    def warp_and_write(key, volume, order):
        arr = timed_call(stages, f"warp {key}", warp_to_fixed, volume, disp, fix, order=order)
        return arr, timed_call(stages, f"write {key}", write_volume, paths[key], arr, like=fix,
                               overwrite=overwrite)

    j_jac = pool.submit(jacobian)
    j_before = pool.submit(timed_call, stages, "moving to fixed grid (QC)", resample_array,
                           mov.data.numpy(), mov.affine, fix.affine, fix.shape, order=1)
    disp = timed_call(stages, "displacement to fixed grid", displacement_to_fixed, u, space, fix)
    if affine is not None:
        from mambamorph.optimize.affine import compose_affine_displacement

        disp = timed_call(stages, "compose with the affine", compose_affine_displacement,
                          affine, fix, disp)
    j_disp = pool.submit(timed_call, stages, "write displacement", write_itk_displacement,
                         paths["displacement"], disp, like=fix, overwrite=overwrite)
    j_seg = (pool.submit(warp_and_write, "warped_seg", seg, 0) if seg is not None else None)
    warped, warped_path = warp_and_write("warped", mov, 1)
    det_model, jac_path = j_jac.result()
    fold = float(100.0 * np.mean(det_model <= 0))  # = metrics.folding_percent(u)
    qc_path = timed_call(
        stages, "QC figure", qc_overlay, fix.data.numpy(), warped, paths["qc"],
        moving=j_before.result(), spacing=fix.spacing,
        title=f"{mov.path.name} -> {fix.path.name} ({model_name}, folding {fold:.2f} %)")
    written: dict[str, Path] = {"warped": warped_path}
    if j_seg is not None:
        written["warped_seg"] = j_seg.result()[1]
    written["displacement"] = j_disp.result()
    written["jacobian"] = jac_path
    written["qc"] = qc_path
    return written, det_model, fold, disp
