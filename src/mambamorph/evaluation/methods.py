"""Registration methods that an evaluation compares: a :class:`Method` turns a
``(moving, fixed)`` pair into a displacement field.

Built in:

- :func:`identity_method` (the paper's "Initial" row): zero field; no time, memory or parameters;
- :func:`checkpoint_method` (``kind="learned"``): a checkpoint written by
  :func:`mambamorph.checkpoint.save_model`;
- :func:`checkpoint_io_method` (``kind="learned+optimisation"``, row e.g. "MambaMorph + IO"):
  the checkpoint's prediction refined by instance optimisation
  (:func:`mambamorph.optimize.instance.instance_optimise`);
- :func:`io_method` (``kind="optimisation"``, row "IO (training-free)"): instance optimisation
  from the identity.

Optional peers, each needing its own package, live in :mod:`mambamorph.evaluation.peers`:
ANTs SyN, greedy and ConvexAdam.

Adding a method (another optimiser, another classical tool, ...) takes one factory function
that returns a :class:`Method`, and, to reach it from a command-line word, one entry in
:data:`SPEC_WORDS`. The evaluator only calls ``method.make_runner(device)`` once per evaluation
and then ``run(moving, fixed, spacing) -> flow`` once per pair; it never looks at ``kind``
except that ``"identity"`` is scored without running anything. Give ``make_runner`` as a
module-level function (or a ``functools.partial`` of one, as the built-in methods do) so that a
method pickles: CPU memory is then measured in a fresh process
(:func:`mambamorph.runtime.peak_memory`); a method that does not pickle (a closure)
is measured in the evaluating process instead.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mambamorph.errors import InputError

__all__ = [
    "DISPLAY_NAMES",
    "SPEC_WORDS",
    "IO_SUFFIX",
    "FlowFn",
    "Method",
    "identity_method",
    "checkpoint_method",
    "checkpoint_io_method",
    "io_method",
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

#: ``run(moving, fixed, spacing) -> flow``: moving/fixed ``(1, 1, D0, D1, D2)`` float32 on the
#: evaluation device, spacing in mm; returns a ``(1, 3, D0, D1, D2)`` float displacement in voxels.
FlowFn = Callable[[torch.Tensor, torch.Tensor, tuple[float, float, float]], torch.Tensor]


@dataclass(eq=False)
class Method:
    """One registration method in an evaluation.

    Attributes:
        name: the row label in the tables (unique within an evaluation).
        kind: ``"identity"`` (scored without running: the unregistered pair), ``"learned"``,
            ``"learned+optimisation"``, ``"optimisation"``, ``"classical"``, or any other word a
            new kind of method wants in the records.
        make_runner: ``make_runner(device) -> run`` prepares the method on ``device`` (loads the
            weights there) and returns ``run(moving, fixed, spacing) -> flow`` (see ``FlowFn``);
            the evaluator drops ``run`` when the method is done, which frees the device memory.
        params: trainable parameters (``None`` where it does not apply).
        source: where it comes from (checkpoint path, settings), for the record.
        device_bound: ``False`` for methods that always compute on the CPU (the peers): their
            time and memory are measured on the CPU whatever the evaluation device.
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


def _network_runner(path: str, overrides: dict, device: torch.device,
                    precision: str = "fp32"):
    """Load the checkpoint onto ``device``; return ``net_out(moving, fixed)`` giving the
    network's :class:`~mambamorph.models.RegistrationOutput` (float32, no gradient), computed
    in ``precision`` (see :func:`mambamorph.models.predict`)."""
    from mambamorph.checkpoint import load_model
    from mambamorph.models import predict

    net, _ = load_model(path, device, **overrides)

    @torch.no_grad()
    def net_out(moving, fixed):
        out = predict(net, moving, fixed, precision=precision)
        return replace(out, flow=out.flow.float(),
                       velocity=None if out.velocity is None else out.velocity.float())

    return net_out


def _checkpoint_runner(path: str, overrides: dict, precision: str,
                       device: torch.device) -> FlowFn:
    """Load the checkpoint onto ``device``; return its ``run(moving, fixed, spacing)``."""
    net_out = _network_runner(path, overrides, device, precision)

    def run(moving, fixed, spacing):
        return net_out(moving, fixed).flow

    return run


def checkpoint_method(path: str | os.PathLike, name: str | None = None,
                      precision: str = "fp32", **overrides) -> Method:
    """A trained model from a checkpoint (``.safetensors`` + ``.json`` pair).

    The checkpoint is read once here (on the CPU) to fail early on a bad file and to count the
    parameters, and again onto the evaluation device when the method runs.

    Args:
        path: the stem or either file of the checkpoint.
        name: row label; default the paper's name of the model (e.g. ``"MambaMorph"``).
        precision: inference precision, ``fp32``, ``bf16`` or ``auto`` (see
            :func:`mambamorph.models.predict`).
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
    source = (f"{p} ({model_name}{f', step {step}' if step is not None else ''}"
              f"{'' if precision == 'fp32' else f', {precision} inference'})")
    return Method(name=name or DISPLAY_NAMES.get(model_name, model_name), kind="learned",
                  make_runner=functools.partial(_checkpoint_runner, str(p), dict(overrides),
                                                precision),
                  params=params, source=source, label=_checkpoint_label(p))


# -------------------------------------------------------------------- instance optimisation
def _io_source(cfg) -> str:
    return f"instance_optimise, {cfg!r}"


def _io_runner(cfg, device: torch.device) -> FlowFn:
    """``run(moving, fixed, spacing)``: instance optimisation from the identity."""
    from mambamorph.optimize.instance import instance_optimise

    def run(moving, fixed, spacing):
        return instance_optimise(moving, fixed, cfg=cfg).flow

    return run


def io_method(cfg=None, name: str = "IO (training-free)") -> Method:
    """Training-free instance optimisation: :func:`mambamorph.optimize.instance.
    instance_optimise` from the identity (MIND-SSD on a stationary velocity field) on the
    evaluation device.

    Args:
        cfg: :class:`mambamorph.optimize.instance.IOConfig` (default its defaults). The
            evaluation grid must be divisible by its level factors (8 and 4 by default).
        name: row label.
    Returns:
        An ``"optimisation"`` :class:`Method` (no trained parameters).
    """
    from mambamorph.optimize.instance import IOConfig

    cfg = cfg or IOConfig()
    return Method(name=name, kind="optimisation", make_runner=functools.partial(_io_runner, cfg),
                  params=None, source=_io_source(cfg))


def _checkpoint_io_runner(path: str, overrides: dict, cfg, precision: str,
                          device: torch.device) -> FlowFn:
    """Load the checkpoint onto ``device``; ``run`` refines its prediction by IO."""
    from mambamorph.optimize.instance import instance_optimise

    predict_flow = _network_runner(path, overrides, device, precision)

    def run(moving, fixed, spacing):
        out = predict_flow(moving, fixed)  # IO starts from the velocity, else the flow
        return instance_optimise(moving, fixed, init_velocity=out.velocity, init_flow=out.flow,
                                 cfg=cfg).flow

    return run


def checkpoint_io_method(path: str | os.PathLike, cfg=None, name: str | None = None,
                         precision: str = "fp32", **overrides) -> Method:
    """A checkpoint's prediction refined by instance optimisation: the network's stationary
    velocity (``RegistrationOutput.velocity``), or its displacement when the model has none,
    starts :func:`mambamorph.optimize.instance.instance_optimise`. Time and memory cover both
    stages.

    Args:
        path: the stem or either file of the checkpoint.
        cfg: :class:`mambamorph.optimize.instance.IOConfig` (default its defaults).
        name: row label; default the model's name + ``" + IO"`` (e.g. ``"MambaMorph + IO"``).
        precision: the network's inference precision (see :func:`checkpoint_method`).
        overrides: config fields for :func:`mambamorph.checkpoint.load_model`.
    Returns:
        A ``"learned+optimisation"`` :class:`Method` (params: the network's).
    Raises:
        InputError: missing or unreadable checkpoint, unknown model, mismatching weights.
    """
    from mambamorph.optimize.instance import IOConfig

    cfg = cfg or IOConfig()
    net = checkpoint_method(path, **overrides)
    return replace(net, name=name or f"{net.name} + IO", kind="learned+optimisation",
                   make_runner=functools.partial(_checkpoint_io_runner, str(Path(path)),
                                                 dict(overrides), cfg, precision),
                   source=f"{net.source} + {_io_source(cfg)}")


# ---------------------------------------------------------------------------- optional peers
def _peer(factory: str, **kwargs) -> Method:
    """A peer of :mod:`mambamorph.evaluation.peers` (imported on first use)."""
    from mambamorph.evaluation import peers

    return getattr(peers, factory)(**kwargs)


# ------------------------------------------------------------------------------ by name, names
#: command-line word -> factory of a :class:`Method` with default settings; anything else is
#: read as a checkpoint path (``PATH+io``: the checkpoint refined by IO) by
#: :func:`method_from_spec`. The peers need their optional packages.
SPEC_WORDS: dict[str, Callable[[], Method]] = {
    "identity": identity_method,
    "initial": identity_method,
    "io": io_method,
    "ants-syn": functools.partial(_peer, "ants_syn_method"),
    "ants": functools.partial(_peer, "ants_syn_method"),
    "greedy": functools.partial(_peer, "greedy_method"),
    "convexadam": functools.partial(_peer, "convexadam_method"),
}
IO_SUFFIX = "+io"


def method_from_spec(spec: str, precision: str = "fp32", **overrides) -> Method:
    """A method from a command-line word (a key of :data:`SPEC_WORDS`, case-insensitive:
    ``identity``/``initial``, ``io``, ``ants-syn``/``ants``, ``greedy``, ``convexadam``), a
    checkpoint path, or a checkpoint path ending in ``+io`` (the checkpoint refined by
    instance optimisation, see :func:`checkpoint_io_method`).

    Args:
        spec: the word or path.
        overrides: model config fields for a checkpoint (see :func:`checkpoint_method`).
    Raises:
        InputError: a checkpoint that cannot be loaded.
        MambaMorphError: a peer whose optional package is not installed (the message names
            the pip command).
    """
    factory = SPEC_WORDS.get(str(spec).strip().lower())
    if factory is not None:
        return factory()
    text = str(spec).strip()
    if text.lower().endswith(IO_SUFFIX):
        return checkpoint_io_method(text[:-len(IO_SUFFIX)], precision=precision, **overrides)
    return checkpoint_method(text, precision=precision, **overrides)


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
