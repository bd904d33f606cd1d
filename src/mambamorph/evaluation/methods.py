"""Registration methods that an evaluation compares: a :class:`Method` turns a
``(moving, fixed)`` pair into a displacement field.

Built in:

- :func:`identity_method` (the paper's "Initial" row): zero field; no time, memory or parameters;
- :func:`checkpoint_method` (``kind="learned"``): a checkpoint written by
  :func:`mambamorph.checkpoint.save_model`;
- :func:`ants_syn_method` (``kind="classical"``): ANTs SyN with a Mattes mutual-information
  metric (optional ``antspyx``).

Adding a method (an instance optimiser, another classical tool, ...) takes one factory function
here that returns a :class:`Method`, and, to reach it from a command-line word, one entry in
:data:`SPEC_WORDS`. The evaluator only calls ``method.make_runner(device)`` once per evaluation
and then ``run(moving, fixed, spacing) -> flow`` once per pair; it never looks at ``kind``
except that ``"identity"`` is scored without running anything. Give ``make_runner`` as a
module-level function (or a ``functools.partial`` of one, as the built-in methods do) so that a
method pickles: CPU memory is then measured in a fresh process
(:func:`mambamorph.evaluation.memory.peak_memory`); a method that does not pickle (a closure)
is measured in the evaluating process instead.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from mambamorph.errors import InputError, MambaMorphError

__all__ = [
    "ANTS_INSTALL_HINT",
    "DISPLAY_NAMES",
    "SPEC_WORDS",
    "FlowFn",
    "Method",
    "identity_method",
    "checkpoint_method",
    "ants_syn_method",
    "method_from_spec",
    "unique_names",
]

#: registry name -> the name the paper's tables use.
DISPLAY_NAMES = {
    "mambamorph": "MambaMorph",
    "mambamorph-reg": "MambaMorph-reg",
    "transmorph": "TransMorph",
    "transmorph-feat": "TransMorph-feat",
    "voxelmorph": "VoxelMorph",
    "voxelmorph-feat": "VoxelMorph-feat",
    "xmorpher": "XMorpher",
}
ANTS_INSTALL_HINT = 'pip install "mambamorph[ants]"'

#: ``run(moving, fixed, spacing) -> flow``: moving/fixed ``(1, 1, D0, D1, D2)`` float32 on the
#: evaluation device, spacing in mm; returns a ``(1, 3, D0, D1, D2)`` float displacement in voxels.
FlowFn = Callable[[torch.Tensor, torch.Tensor, tuple[float, float, float]], torch.Tensor]


@dataclass(eq=False)
class Method:
    """One registration method in an evaluation.

    Attributes:
        name: the row label in the tables (unique within an evaluation).
        kind: ``"identity"`` (scored without running: the unregistered pair), ``"learned"``,
            ``"classical"``, or any other word a new kind of method wants in the records.
        make_runner: ``make_runner(device) -> run`` prepares the method on ``device`` (loads the
            weights there) and returns ``run(moving, fixed, spacing) -> flow`` (see ``FlowFn``);
            the evaluator drops ``run`` when the method is done, which frees the device memory.
        params: trainable parameters (``None`` where it does not apply).
        source: where it comes from (checkpoint path, settings), for the record.
        device_bound: ``False`` for methods that always compute on the CPU (ANTs): their time and
            memory are measured on the CPU whatever the evaluation device.
        label: a short tag that tells apart methods of the same name (a checkpoint's run
            folder); :func:`unique_names` appends it to clashing names.
    """

    name: str
    kind: str
    make_runner: Callable[[torch.device], FlowFn]
    params: int | None = None
    source: str = ""
    device_bound: bool = True
    label: str | None = None

    def run(self, moving: torch.Tensor, fixed: torch.Tensor,
            spacing: Sequence[float] = (1.0, 1.0, 1.0),
            device: torch.device | str = "cpu") -> torch.Tensor:
        """Register one pair (convenience: prepares the method, e.g. loads its weights, on every
        call; :func:`mambamorph.evaluation.evaluate` prepares each method once).

        Args:
            moving, fixed: ``(1, 1, D0, D1, D2)`` float images (or ``(1, D0, D1, D2)``).
            spacing: voxel size in mm.
            device: where to compute.
        Returns:
            ``(1, 3, D0, D1, D2)`` float32 displacement in voxels (``x -> x + flow(x)`` maps
            fixed-space points into the moving image), on ``device``.
        """
        dev = torch.device(device)
        mov, fix = _as_batch(moving, "moving").to(dev), _as_batch(fixed, "fixed").to(dev)
        return self.make_runner(dev)(mov, fix, tuple(float(s) for s in spacing))


def _as_batch(x: torch.Tensor, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() == 3:
        x = x[None, None]
    elif x.dim() == 4:
        x = x[None]
    if x.dim() != 5 or x.shape[:2] != (1, 1):
        raise InputError(f"{name}: expected (1, 1, D0, D1, D2), got {tuple(x.shape)}")
    return x.float()


# ----------------------------------------------------------------------------------- identity
def _zero_flow(moving: torch.Tensor, fixed: torch.Tensor, spacing) -> torch.Tensor:
    return torch.zeros((1, 3, *fixed.shape[2:]), dtype=torch.float32, device=fixed.device)


def _identity_runner(device: torch.device) -> FlowFn:
    return _zero_flow


def identity_method(name: str = "Initial") -> Method:
    """The unregistered pair (zero displacement): the paper's "Initial" row."""
    return Method(name=name, kind="identity", make_runner=_identity_runner, params=None,
                  source="zero displacement")


# --------------------------------------------------------------------------------- checkpoint
def _checkpoint_label(path: Path) -> str:
    """A short label for a checkpoint: its run folder for ``<run>/checkpoints/<stem>``."""
    from mambamorph.checkpoint import checkpoint_stem

    stem = checkpoint_stem(path)
    if stem.parent.name == "checkpoints" and stem.parent.parent.name:
        return f"{stem.parent.parent.name}/{stem.name}"
    return stem.name


def _checkpoint_runner(path: str, overrides: dict, device: torch.device) -> FlowFn:
    """Load the checkpoint onto ``device``; return its ``run(moving, fixed, spacing)``."""
    from mambamorph.checkpoint import load_model
    from mambamorph.models import predict

    net, _ = load_model(path, device, **overrides)

    @torch.no_grad()
    def run(moving, fixed, spacing):
        return predict(net, moving, fixed).flow.float()

    return run


def checkpoint_method(path: str | os.PathLike, name: str | None = None, **overrides) -> Method:
    """A trained model from a checkpoint (``.safetensors`` + ``.json`` pair).

    The checkpoint is read once here (on the CPU) to fail early on a bad file and to count the
    parameters, and again onto the evaluation device when the method runs.

    Args:
        path: the stem or either file of the checkpoint.
        name: row label; default the paper's name of the model (e.g. ``"MambaMorph"``).
        overrides: config fields passed to :func:`mambamorph.checkpoint.load_model` (e.g.
            ``scan_impl``).
    Returns:
        A ``"learned"`` :class:`Method`.
    Raises:
        InputError: missing or unreadable checkpoint, unknown model, mismatching weights.
    """
    from mambamorph.checkpoint import load_model
    from mambamorph.models import count_parameters

    p = Path(path)
    model, info = load_model(p, "cpu", **overrides)
    params = count_parameters(model)
    model_name = info["model"]
    del model
    step = info.get("meta", {}).get("step")
    source = f"{p} ({model_name}{f', step {step}' if step is not None else ''})"
    return Method(name=name or DISPLAY_NAMES.get(model_name, model_name), kind="learned",
                  make_runner=functools.partial(_checkpoint_runner, str(p), dict(overrides)),
                  params=params, source=source, label=_checkpoint_label(p))


# --------------------------------------------------------------------------------------- ANTs
def _import_ants():
    try:
        import ants  # noqa: PLC0415 (optional dependency, imported on first use)
    except ImportError:
        raise MambaMorphError("ANTs SyN needs the optional package antspyx, which is not "
                              f"installed: {ANTS_INSTALL_HINT}") from None
    return ants


def _ants_runner(iterations: tuple[int, ...], metric: str, bins: int, seed: int,
                 device: torch.device) -> FlowFn:
    ants = _import_ants()

    def run(moving, fixed, spacing):
        flow, _ = _ants_register(ants, moving[0, 0].detach().cpu().numpy(),
                                 fixed[0, 0].detach().cpu().numpy(), spacing, iterations,
                                 metric, bins, seed)
        return torch.from_numpy(flow)[None].to(fixed.device)  # (1, 3, D0, D1, D2)

    return run


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
    ants = _import_ants()
    iters = tuple(int(i) for i in iterations)
    return Method(name=name, kind="classical",
                  make_runner=functools.partial(_ants_runner, iters, metric, int(bins),
                                                int(seed)),
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
    flow = np.moveaxis(disp, -1, 0) / np.asarray(sp, dtype=np.float64).reshape(3, 1, 1, 1)
    return flow.astype(np.float32), warped


# ------------------------------------------------------------------------------ by name, names
#: command-line word -> factory of a :class:`Method` with default settings; anything else is
#: read as a checkpoint path by :func:`method_from_spec`.
SPEC_WORDS: dict[str, Callable[[], Method]] = {
    "identity": identity_method,
    "initial": identity_method,
    "ants-syn": ants_syn_method,
    "ants": ants_syn_method,
}


def method_from_spec(spec: str, **overrides) -> Method:
    """A method from a command-line word (a key of :data:`SPEC_WORDS`, case-insensitive:
    ``identity``/``initial``, ``ants-syn``/``ants``) or a checkpoint path.

    Args:
        spec: the word or path.
        overrides: model config fields for a checkpoint (see :func:`checkpoint_method`).
    Raises:
        InputError: a checkpoint that cannot be loaded.
        MambaMorphError: ``ants-syn`` without antspyx.
    """
    factory = SPEC_WORDS.get(str(spec).strip().lower())
    if factory is not None:
        return factory()
    return checkpoint_method(spec, **overrides)


def unique_names(methods: Sequence[Method]) -> list[Method]:
    """Copies of ``methods`` with unique names: clashing names get the method's ``label``
    (e.g. ``"VoxelMorph (runA/best)"``), then ``#2``, ``#3`` ... if they still clash."""
    counts: dict[str, int] = {}
    for m in methods:
        counts[m.name] = counts.get(m.name, 0) + 1
    named = [replace(m, name=f"{m.name} ({m.label})")
             if counts[m.name] > 1 and m.label else m for m in methods]
    seen: dict[str, int] = {}
    out = []
    for m in named:
        seen[m.name] = seen.get(m.name, 0) + 1
        out.append(m if seen[m.name] == 1 else replace(m, name=f"{m.name} #{seen[m.name]}"))
    return out
