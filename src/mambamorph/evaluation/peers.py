"""Peers run by their own packages, as optional extras of an evaluation: ANTs SyN (``antspyx``),
greedy (``picsl-greedy``) and ConvexAdam (``convexadam``).

Each factory returns a ``"classical"`` :class:`~mambamorph.evaluation.methods.Method` that always
computes on the CPU (``device_bound=False``) and gives the package convention: a
``(1, 3, D0, D1, D2)`` float32 displacement in voxels, channel ``i`` along array axis ``i``,
``x -> x + flow(x)`` mapping fixed points into the moving image. None of these packages is
needed to register: a missing one raises a :class:`~mambamorph.errors.MambaMorphError` naming
the ``pip install`` command, when the method is built (before any data is read).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
import tempfile
from collections.abc import Sequence

import numpy as np
import torch

from mambamorph.errors import MambaMorphError
from mambamorph.evaluation.methods import FlowFn, Method

__all__ = ["ANTS_INSTALL_HINT", "PEER_PACKAGES", "ants_syn_method", "greedy_method",
           "convexadam_method", "greedy_flow", "convexadam_flow"]

ANTS_INSTALL_HINT = 'pip install "mambamorph[ants]"'
#: import name -> (pip package, install command)
PEER_PACKAGES = {
    "ants": ("antspyx", ANTS_INSTALL_HINT),
    "picsl_greedy": ("picsl-greedy", "pip install picsl-greedy"),
    "convexAdam": ("convexadam", "pip install convexadam"),
}


def _import_peer(module: str, what: str):
    """Import an optional peer package, or raise MambaMorphError naming its install command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pkg, hint = PEER_PACKAGES[module]
        raise MambaMorphError(f"{what} needs the optional package {pkg}, which is not "
                              f"installed: {hint}") from None


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


@contextlib.contextmanager
def _silence_stdout():
    """Send the C-level stdout/stderr of a compiled peer to a temporary file (greedy prints
    every iteration from C++, past Python's ``sys.stdout``)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _cpu_array(x: torch.Tensor) -> np.ndarray:
    """``(1, 1, D0, D1, D2)`` tensor -> ``(D0, D1, D2)`` float32 numpy array."""
    return np.ascontiguousarray(x[0, 0].detach().cpu().numpy(), dtype=np.float32)


def _mm_to_voxels(disp: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """``(D0, D1, D2, 3)`` displacement in mm along the array axes -> ``(3, D0, D1, D2)``
    float32 in voxels."""
    flow = np.moveaxis(disp, -1, 0) / np.asarray(spacing, np.float64).reshape(3, 1, 1, 1)
    return flow.astype(np.float32)


def _flow_runner(flow_fn, settings: tuple, device: torch.device) -> FlowFn:
    """``run(moving, fixed, spacing)`` calling ``flow_fn(moving, fixed, spacing, **settings)``
    on ``(D0, D1, D2)`` CPU arrays; the flow comes back on the fixed image's device."""
    kwargs = dict(settings)

    def run(moving, fixed, spacing):
        flow = flow_fn(_cpu_array(moving), _cpu_array(fixed), spacing, **kwargs)
        return torch.from_numpy(flow)[None].to(fixed.device)  # (1, 3, D0, D1, D2)

    return run


# --------------------------------------------------------------------------------------- ANTs
def _ants_flow(moving: np.ndarray, fixed: np.ndarray, spacing, iterations, metric: str,
               bins: int, seed: int) -> np.ndarray:
    ants = _import_peer("ants", "ANTs SyN")
    return _ants_register(ants, moving, fixed, spacing, iterations, metric, bins, seed)[0]


def ants_syn_method(iterations: Sequence[int] = (40, 20, 10), metric: str = "mattes",
                    bins: int = 32, seed: int = 0, name: str = "ANTs SyN") -> Method:
    """ANTs SyN (deformable only, no affine stage) as the classical reference.

    Runs ``ants.registration(type_of_transform="SyNOnly", syn_metric=metric, ...)`` on the
    pair with its voxel spacing, composes the forward transforms into one displacement field,
    and converts it to the package convention (voxels, channel ``i`` along array axis ``i``).
    Always computes on the CPU (time per pair: docs/results.md).

    Args:
        iterations: SyN iterations per level, coarse to fine (default 40x20x10).
        metric: ANTs metric name (``"mattes"`` mutual information by default; ``"CC"``,
            ``"meansquares"`` ...).
        bins: histogram bins of the Mattes metric (``syn_sampling``).
        seed: ANTs random seed (repeatable runs).
        name: row label.
    Returns:
        A ``"classical"`` :class:`Method`.
    Raises:
        MambaMorphError: antspyx is not installed (the message says how to install it).
    """
    ants = _import_peer("ants", "ANTs SyN")
    iters = tuple(int(i) for i in iterations)
    settings = (("iterations", iters), ("metric", metric), ("bins", int(bins)),
                ("seed", int(seed)))
    return Method(name=name, kind="classical",
                  make_runner=functools.partial(_flow_runner, _ants_flow, settings),
                  params=None,
                  source=(f"antspyx {getattr(ants, '__version__', '?')}: SyNOnly, {metric} "
                          f"({bins} bins), iterations {'x'.join(map(str, iters))}, seed {seed}"),
                  device_bound=False)


def _ants_register(ants, moving: np.ndarray, fixed: np.ndarray, spacing, iterations,
                   metric: str, bins: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """ANTs SyN of two ``(D0, D1, D2)`` arrays.

    Returns:
        ``(flow, warped)``: the composed forward transform as a ``(3, D0, D1, D2)`` float32
        displacement in voxels (package convention), and ANTs' own resampling of ``moving``
        into the fixed grid (what warping ``moving`` by ``flow`` should reproduce).
    """
    sp = tuple(float(s) for s in spacing)
    # origin 0, identity direction: physical axis i is array axis i, scaled by spacing[i]
    fixed_img = ants.from_numpy(np.ascontiguousarray(fixed, dtype=np.float32), spacing=sp)
    moving_img = ants.from_numpy(np.ascontiguousarray(moving, dtype=np.float32), spacing=sp)
    with tempfile.TemporaryDirectory(prefix="mambamorph-ants-") as tmp:
        reg = ants.registration(fixed=fixed_img, moving=moving_img, type_of_transform="SyNOnly",
                                syn_metric=metric, syn_sampling=bins,
                                reg_iterations=tuple(iterations), random_seed=seed,
                                outprefix=os.path.join(tmp, "syn_"), verbose=False)
        # all forward transforms composed into one displacement field file
        field_path = ants.apply_transforms(fixed=fixed_img, moving=moving_img,
                                           transformlist=reg["fwdtransforms"],
                                           compose=os.path.join(tmp, "composed_"))
        disp = ants.image_read(field_path).numpy()  # (D0, D1, D2, 3), mm along physical axes
        warped = reg["warpedmovout"].numpy()
    if disp.shape != (*fixed.shape, 3):
        raise RuntimeError(f"ANTs returned a displacement field of shape {disp.shape}, "
                           f"expected {(*fixed.shape, 3)}")
    # ANTs maps fixed-space points into the moving image (x -> x + u(x)), as this package does;
    # only the unit changes: mm -> voxels, component i along array axis i
    return _mm_to_voxels(disp, sp), warped


# ------------------------------------------------------------------------------------- greedy
def _to_sitk(arr: np.ndarray, spacing: Sequence[float]):
    """A ``(D0, D1, D2)`` array as a SimpleITK image whose index axis i is array axis i
    (origin 0, identity direction: physical axis i is array axis i scaled by spacing[i])."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(arr, np.float32)
                                                      .transpose(2, 1, 0)))
    img.SetSpacing([float(s) for s in spacing])
    return img


def greedy_flow(moving: np.ndarray, fixed: np.ndarray, spacing: Sequence[float],
                iterations: Sequence[int] = (100, 50, 20), metric: str = "NMI",
                threads: int | None = None) -> np.ndarray:
    """greedy (picsl-greedy) deformable registration of two ``(D0, D1, D2)`` arrays.

    Args:
        moving, fixed: ``(D0, D1, D2)`` images on one grid.
        spacing: voxel size in mm.
        iterations: iterations per level, coarse to fine (greedy's ``-n``).
        metric: greedy's ``-m`` (``NMI``, ``NCC 2x2x2``, ``SSD``, ...).
        threads: greedy's ``-threads`` (default: torch's thread count).
    Returns:
        ``(3, D0, D1, D2)`` float32 displacement in voxels (package convention).
    Raises:
        MambaMorphError: picsl-greedy is not installed.
    """
    return _greedy_register(moving, fixed, spacing, iterations, metric, threads)[0]


def _greedy_register(moving: np.ndarray, fixed: np.ndarray, spacing: Sequence[float],
                     iterations: Sequence[int], metric: str, threads: int | None,
                     reslice: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """greedy of two ``(D0, D1, D2)`` arrays.

    Returns:
        ``(flow, warped)``: the ``(3, D0, D1, D2)`` float32 displacement in voxels (package
        convention) and, with ``reslice``, greedy's own resampling of ``moving`` by its warp
        (what warping ``moving`` by ``flow`` should reproduce), else ``None``.
    """
    greedy = _import_peer("picsl_greedy", "greedy")
    import SimpleITK as sitk

    g = greedy.Greedy3D()
    n = "x".join(str(int(i)) for i in iterations)
    threads = int(threads or torch.get_num_threads())
    with _silence_stdout():
        g.execute(f"-d 3 -i fixed moving -m {metric} -n {n} -threads {threads} -o warp",
                  fixed=_to_sitk(fixed, spacing), moving=_to_sitk(moving, spacing), warp=None)
        if reslice:
            g.execute(f"-d 3 -threads {threads} -rf fixed -rm moving resliced -r warp",
                      resliced=None)
    # greedy's warp maps fixed points into the moving image, in mm along the physical axes
    disp = sitk.GetArrayFromImage(g["warp"]).transpose(2, 1, 0, 3)  # (D0, D1, D2, 3) mm
    warped = (sitk.GetArrayFromImage(g["resliced"]).transpose(2, 1, 0) if reslice else None)
    return _mm_to_voxels(disp, spacing), warped


def greedy_method(iterations: Sequence[int] = (100, 50, 20), metric: str = "NMI",
                  name: str = "greedy") -> Method:
    """greedy (picsl-greedy), deformable only, as a classical peer: :func:`greedy_flow` with
    normalised mutual information and 100x50x20 iterations by default, on the CPU with torch's
    thread count.

    Raises:
        MambaMorphError: picsl-greedy is not installed (the message names the pip command).
    """
    _import_peer("picsl_greedy", "greedy")
    iters = tuple(int(i) for i in iterations)
    settings = (("iterations", iters), ("metric", metric))
    return Method(name=name, kind="classical",
                  make_runner=functools.partial(_flow_runner, greedy_flow, settings),
                  params=None,
                  source=(f"picsl-greedy {_version('picsl-greedy')}: {metric}, iterations "
                          f"{'x'.join(map(str, iters))}, threads = torch threads"),
                  device_bound=False)


# --------------------------------------------------------------------------------- ConvexAdam
def convexadam_flow(moving: np.ndarray, fixed: np.ndarray,
                    spacing: Sequence[float] = (1.0, 1.0, 1.0), **settings) -> np.ndarray:
    """ConvexAdam (convexadam package: MIND-SSC, coupled convex search, Adam) on two
    ``(D0, D1, D2)`` arrays, in float32 on the CPU, with the package's defaults unless
    ``settings`` (keywords of ``convex_adam_pt``) say otherwise.

    Args:
        moving, fixed: ``(D0, D1, D2)`` images on one grid.
        spacing: voxel size in mm (unused: ConvexAdam works in voxels; kept for the common
            signature of the peers).
    Returns:
        ``(3, D0, D1, D2)`` float32 displacement in voxels (package convention).
    Raises:
        MambaMorphError: convexadam is not installed.
    """
    _import_peer("convexAdam", "ConvexAdam")
    from convexAdam.convex_adam_MIND import convex_adam_pt

    with _silence_stdout():
        disp = convex_adam_pt(torch.as_tensor(fixed).float(), torch.as_tensor(moving).float(),
                              dtype=torch.float32, device=torch.device("cpu"), **settings)
    # (D0, D1, D2, 3) in voxels, component i along array axis i
    return np.ascontiguousarray(np.moveaxis(np.asarray(disp), -1, 0), dtype=np.float32)


def convexadam_method(name: str = "ConvexAdam", **settings) -> Method:
    """ConvexAdam (convexadam package) as a classical peer: :func:`convexadam_flow` with the
    package's ``convex_adam_pt`` defaults (``settings`` override them), float32 on the CPU.

    Raises:
        MambaMorphError: convexadam is not installed (the message names the pip command).
    """
    _import_peer("convexAdam", "ConvexAdam")
    chosen = ", ".join(f"{k}={v}" for k, v in settings.items()) or "package defaults"
    return Method(name=name, kind="classical",
                  make_runner=functools.partial(_flow_runner, convexadam_flow,
                                                tuple(settings.items())),
                  params=None,
                  source=f"convexadam {_version('convexAdam')}: {chosen}, float32 on the CPU",
                  device_bound=False)
