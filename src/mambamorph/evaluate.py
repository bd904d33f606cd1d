"""``mambamorph evaluate``: score methods on the same fixed test pairs; write the paper's tables.

A :class:`Method` turns a ``(moving, fixed)`` pair into a displacement field. Three kinds:

- ``"identity"`` (the paper's "Initial" row): zero field; no time, memory or parameters;
- ``"learned"``: a checkpoint written by :func:`mambamorph.checkpoint.save_model`;
- ``"classical"``: ANTs SyN with a Mattes mutual-information metric (optional ``antspyx``).

:func:`evaluate` runs every method on the same pairs, one method at a time (so the device holds
one model when its memory is measured). For each method and pair it warps the moving label map
with nearest-neighbour sampling and scores it against the fixed label map:

- Dice of each of the 16 ROIs (x100; the pair's value is the mean over the ROIs present);
- HD95 of each ROI in mm, both variants of :mod:`mambamorph.metrics` ("pooled", shown in the
  table, and "max");
- folding (% of voxels with Jacobian determinant <= 0) and SDlogJ of the field;
- time per pair, device-synchronised; each method's first pair is a warm-up and is left out of
  the mean (so at least 2 pairs are needed);
- peak memory of the call: CUDA memory allocated (weights, inputs and activations, absolute) on
  a GPU, the growth of the resident set size on a CPU (before each method's warm-up pair, free
  heap memory is handed back to the OS so the whole working set is counted there; the timed
  pairs run without that, in steady state); the table shows the largest over the pairs;
- the number of trainable parameters.

Table values are mean +- standard deviation over the pairs (population std, as numpy's default).

Files written to ``out_dir``::

    results.md        the paper's Table 1/2 layout (one row per method) and the settings
    results.csv       one row per method x pair (wide: summary metrics then per-ROI Dice and
                      HD95 columns); ``pandas.read_csv(...).groupby("method").mean()`` gives the
                      table
    results.json      settings, the per-method summary and every per-pair value
    per_roi_dice.md   method x ROI mean +- std Dice
    per_roi_dice.csv  the same, one row per ROI, ``<method>`` and ``<method> std`` columns
    per_roi_dice.png  box plots of the per-ROI Dice (:func:`mambamorph.viz.roi_boxplots`)
    fig2_pair<k>.png  the paper's Fig. 2 for the first pairs (:func:`mambamorph.viz.fig2`)

Label maps: the datasets give compact ROI indices (0 = background, k = ROI ``ROI_IDS[k-1]``);
they are turned into FreeSurfer ids once, by :func:`roi_index_to_ids`, and every metric and
figure then uses the default 16-ROI table of :mod:`mambamorph.labels`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mambamorph.labels import NUM_ROIS, ROI_IDS, ROI_NAMES
from mambamorph.errors import InputError, MambaMorphError
from mambamorph.runtime import PeakMemory, Timer, describe_device, resolve_device

log = logging.getLogger(__name__)

__all__ = [
    "ANTS_INSTALL_HINT",
    "DISPLAY_NAMES",
    "Method",
    "identity_method",
    "checkpoint_method",
    "ants_syn_method",
    "method_from_spec",
    "roi_index_to_ids",
    "PairRecord",
    "MethodSummary",
    "EvalResult",
    "evaluate",
    "run_evaluation",
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
_IDENTITY_SPECS = ("identity", "initial")
_ANTS_SPECS = ("ants-syn", "ants")

#: ``run(moving, fixed, spacing) -> flow``: moving/fixed ``(1, 1, D0, D1, D2)`` float32 on the
#: evaluation device, spacing in mm; returns a ``(1, 3, D0, D1, D2)`` float displacement in voxels.
FlowFn = Callable[[torch.Tensor, torch.Tensor, tuple[float, float, float]], torch.Tensor]

# FreeSurfer id of each compact ROI index (index 0 = background stays 0).
_INDEX_TO_ID = np.array((0, *ROI_IDS), dtype=np.int16)


def roi_index_to_ids(index) -> np.ndarray:
    """Compact ROI indices (0..16, see :func:`mambamorph.labels.to_roi_index`) -> ids.

    Args:
        index: integer array or tensor of any shape with values 0..16.
    Returns:
        int16 numpy array of FreeSurfer ids (0 where the index is 0), same shape.
    Raises:
        InputError: a value outside 0..16.
    """
    a = index.detach().cpu().numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
    a = a.astype(np.int64, copy=False)
    if a.size and (a.min() < 0 or a.max() > NUM_ROIS):
        raise InputError(f"expected compact ROI indices 0..{NUM_ROIS}, got values "
                         f"{int(a.min())}..{int(a.max())}")
    return _INDEX_TO_ID[a]


# ------------------------------------------------------------------------------------ methods
@dataclass(eq=False)
class Method:
    """One registration method in an evaluation.

    Attributes:
        name: the row label in the tables (unique within an evaluation).
        kind: ``"identity"``, ``"learned"`` or ``"classical"``.
        params: trainable parameters (``None`` where it does not apply).
        source: where it comes from (checkpoint path, settings), for the record.
        make_runner: ``make_runner(device) -> run`` prepares the method on ``device`` (loads the
            weights there) and returns ``run(moving, fixed, spacing) -> flow`` (see ``FlowFn``);
            the evaluator drops ``run`` when the method is done, which frees the device memory.
        device_bound: ``False`` for methods that always compute on the CPU (ANTs): their time and
            memory are measured on the CPU whatever the evaluation device.
        label: a short tag that tells apart methods of the same name (a checkpoint's run
            folder); :func:`evaluate` appends it to clashing names.
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
        call; :func:`evaluate` prepares each method once).

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


def identity_method(name: str = "Initial") -> Method:
    """The unregistered pair (zero displacement): the paper's "Initial" row."""

    def make_runner(device: torch.device) -> FlowFn:
        def run(moving, fixed, spacing):
            return torch.zeros((1, 3, *fixed.shape[2:]), dtype=torch.float32,
                               device=fixed.device)
        return run

    return Method(name=name, kind="identity", make_runner=make_runner, params=None,
                  source="zero displacement")


def _checkpoint_label(path: Path) -> str:
    """A short label for a checkpoint: its run folder for ``<run>/checkpoints/<stem>``."""
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    if stem.parent.name == "checkpoints" and stem.parent.parent.name:
        return f"{stem.parent.parent.name}/{stem.name}"
    return stem.name


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
    from mambamorph.models import predict
    from mambamorph.models import count_parameters

    p = Path(path)
    model, info = load_model(p, "cpu", **overrides)
    params = count_parameters(model)
    model_name = info["model"]
    del model

    def make_runner(device: torch.device) -> FlowFn:
        net, _ = load_model(p, device, **overrides)

        @torch.no_grad()
        def run(moving, fixed, spacing):
            return predict(net, moving, fixed).flow.float()

        return run

    step = info.get("meta", {}).get("step")
    source = f"{p} ({model_name}{f', step {step}' if step is not None else ''})"
    return Method(name=name or DISPLAY_NAMES.get(model_name, model_name), kind="learned",
                  make_runner=make_runner, params=params, source=source,
                  label=_checkpoint_label(p))


def _import_ants():
    try:
        import ants  # noqa: PLC0415 (optional dependency, imported on first use)
    except ImportError:
        raise MambaMorphError("ANTs SyN needs the optional package antspyx, which is not "
                              f"installed: {ANTS_INSTALL_HINT}") from None
    return ants


def ants_syn_method(iterations: Sequence[int] = (40, 20, 10), metric: str = "mattes",
                    bins: int = 32, seed: int = 0, name: str = "ANTs SyN") -> Method:
    """ANTs SyN (deformable only, no affine stage) as the classical reference.

    Runs ``ants.registration(type_of_transform="SyNOnly", syn_metric=metric, ...)`` on the
    pair with its voxel spacing, composes the forward transforms into one displacement field,
    and converts it to the package convention (voxels, channel ``i`` along array axis ``i``).
    Always computes on the CPU (about 22 s per pair at the 2 mm phantom grid with the
    defaults, measured with antspyx 0.6.3 on 2 cores).

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

    def make_runner(device: torch.device) -> FlowFn:
        def run(moving, fixed, spacing):
            return _ants_flow(ants, moving, fixed, spacing, iters, metric, bins, seed)
        return run

    return Method(name=name, kind="classical", make_runner=make_runner, params=None,
                  source=(f"antspyx {getattr(ants, '__version__', '?')}: SyNOnly, {metric} "
                          f"({bins} bins), iterations {'x'.join(map(str, iters))}, seed {seed}"),
                  device_bound=False)


def _ants_flow(ants, moving: torch.Tensor, fixed: torch.Tensor, spacing, iterations,
               metric: str, bins: int, seed: int) -> torch.Tensor:
    """Run ANTs SyN on one pair; return the displacement ``(1, 3, D0, D1, D2)`` in voxels."""
    flow, _ = _ants_register(ants, moving[0, 0].detach().cpu().numpy(),
                             fixed[0, 0].detach().cpu().numpy(), spacing, iterations, metric,
                             bins, seed)
    return torch.from_numpy(flow)[None].to(fixed.device)


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


def method_from_spec(spec: str, **overrides) -> Method:
    """A method from a command-line word: ``identity``/``initial``, ``ants-syn``/``ants`` or a
    checkpoint path.

    Raises:
        InputError: a checkpoint that cannot be loaded.
        MambaMorphError: ``ants-syn`` without antspyx.
    """
    low = str(spec).strip().lower()
    if low in _IDENTITY_SPECS:
        return identity_method()
    if low in _ANTS_SPECS:
        return ants_syn_method()
    return checkpoint_method(spec, **overrides)


def _unique_names(methods: Sequence[Method]) -> list[Method]:
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
        out.append(m if seen[m.name] == 1 else replace(m, name=f"{m.name} "
                                                                         f"#{seen[m.name]}"))
    return out


# ------------------------------------------------------------------------------------ results
@dataclass
class PairRecord:
    """Every value measured for one method on one pair.

    Attributes:
        method: method name; pair: index of the pair in the evaluation order.
        moving_id, fixed_id: subject ids of the pair.
        dice: ``(16,)`` Dice per ROI in %, NaN for a ROI absent from both label maps.
        hd95, hd95_max: ``(16,)`` HD95 per ROI in mm, "pooled" and "max" variants.
        folding: % of voxels with Jacobian determinant <= 0 (``None`` for the identity).
        sdlogj: standard deviation of the log Jacobian determinant (``None`` for the identity).
        seconds: registration time of this pair (``None`` for the identity).
        warmup: ``True`` for the method's first pair (left out of the mean time).
        peak_memory_bytes: peak memory of this call (see the module docstring), or ``None``.
    """

    method: str
    pair: int
    moving_id: str
    fixed_id: str
    dice: np.ndarray
    hd95: np.ndarray
    hd95_max: np.ndarray
    folding: float | None = None
    sdlogj: float | None = None
    seconds: float | None = None
    warmup: bool = False
    peak_memory_bytes: int | None = None

    @property
    def dice_mean(self) -> float:
        """Mean Dice (%) over the ROIs present in the pair."""
        return _nanmean(self.dice)

    @property
    def hd95_mean(self) -> float:
        """Mean "pooled" HD95 (mm) over the ROIs present in the pair."""
        return _nanmean(self.hd95)

    @property
    def hd95_max_mean(self) -> float:
        """Mean "max" HD95 (mm) over the ROIs present in the pair."""
        return _nanmean(self.hd95_max)


@dataclass
class MethodSummary:
    """One row of the results table: means and standard deviations over the pairs.

    ``*_std`` are population standard deviations across pairs of the per-pair values (each the
    mean over the ROIs). ``seconds_*`` leave out the warm-up pair. ``peak_memory_bytes`` is the
    largest peak over all pairs; ``memory_kind`` says what it measures (``"GPU allocated"`` or
    ``"CPU RSS"``). Fields that do not apply (identity) are ``None``.
    """

    name: str
    kind: str
    source: str
    params: int | None
    n_pairs: int
    dice_mean: float
    dice_std: float
    hd95_mean: float
    hd95_std: float
    hd95_max_mean: float
    hd95_max_std: float
    folding_mean: float | None
    folding_std: float | None
    sdlogj_mean: float | None
    sdlogj_std: float | None
    seconds_mean: float | None
    seconds_std: float | None
    n_timed: int
    peak_memory_bytes: int | None
    memory_kind: str | None
    roi_dice_mean: list[float] = field(default_factory=list)
    roi_dice_std: list[float] = field(default_factory=list)


@dataclass
class EvalResult:
    """What :func:`evaluate` returns: the table rows, every per-pair value and the files.

    ``str(result)`` is the Markdown results table (what the CLI prints).
    """

    out_dir: Path
    summaries: list[MethodSummary]
    records: list[PairRecord]
    files: dict[str, Path]
    meta: dict[str, Any]

    def summary(self, name: str) -> MethodSummary:
        """The row of method ``name``. Raises KeyError if there is none."""
        for s in self.summaries:
            if s.name == name:
                return s
        raise KeyError(name)

    def per_roi_dice(self, name: str) -> np.ndarray:
        """``(n_pairs, 16)`` Dice (%) of method ``name``, pairs in evaluation order."""
        rows = [r.dice for r in self.records if r.method == name]
        if not rows:
            raise KeyError(name)
        return np.stack(rows)

    def table_markdown(self) -> str:
        """The paper's Table 1/2 layout as a Markdown table."""
        return _results_table(self.summaries)

    def __str__(self) -> str:
        return self.table_markdown()


def _nanmean(a) -> float:
    a = np.asarray(a, dtype=np.float64)
    return float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")


def _mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return None, None
    return float(v.mean()), float(v.std())


def _summarise(method: Method, records: list[PairRecord], memory_kind: str | None
               ) -> MethodSummary:
    dice = [r.dice_mean for r in records]
    hd = [r.hd95_mean for r in records]
    hdm = [r.hd95_max_mean for r in records]
    fold_m, fold_s = _mean_std(r.folding for r in records)
    sd_m, sd_s = _mean_std(r.sdlogj for r in records)
    timed = [r.seconds for r in records if not r.warmup and r.seconds is not None]
    t_m, t_s = _mean_std(timed)
    mems = [r.peak_memory_bytes for r in records if r.peak_memory_bytes is not None]
    roi = np.stack([r.dice for r in records])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a ROI absent from every pair -> NaN
        roi_mean = np.nanmean(roi, axis=0)
        roi_std = np.nanstd(roi, axis=0)
    d_m, d_s = _mean_std(dice)
    h_m, h_s = _mean_std(hd)
    hm_m, hm_s = _mean_std(hdm)
    nan = float("nan")
    return MethodSummary(
        name=method.name, kind=method.kind, source=method.source, params=method.params,
        n_pairs=len(records),
        dice_mean=nan if d_m is None else d_m, dice_std=nan if d_s is None else d_s,
        hd95_mean=nan if h_m is None else h_m, hd95_std=nan if h_s is None else h_s,
        hd95_max_mean=nan if hm_m is None else hm_m, hd95_max_std=nan if hm_s is None else hm_s,
        folding_mean=fold_m, folding_std=fold_s, sdlogj_mean=sd_m, sdlogj_std=sd_s,
        seconds_mean=t_m, seconds_std=t_s, n_timed=len(timed),
        peak_memory_bytes=max(mems) if mems else None,
        memory_kind=memory_kind if mems else None,
        roi_dice_mean=[float(x) for x in roi_mean], roi_dice_std=[float(x) for x in roi_std])


# ---------------------------------------------------------------------------------- formatting
TABLE_COLUMNS = ("Method", "Dice (%)", "HD95 (mm)", "Folding (%)", "SDlogJ", "Time (s)",
                 "Memory (GB)", "Params (M)")


def _pm(mean: float | None, std: float | None, digits: int) -> str:
    if mean is None or not math.isfinite(mean):
        return "-"
    if std is None or not math.isfinite(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _memory_cell(s: MethodSummary) -> str:
    if s.peak_memory_bytes is None:
        return "-"
    unit = "GPU" if s.memory_kind == "GPU allocated" else "CPU"
    return f"{s.peak_memory_bytes / 1e9:.2f} ({unit})"


def _results_table(summaries: Sequence[MethodSummary]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(TABLE_COLUMNS) - 1)) + "|"]
    for s in summaries:
        cells = [
            s.name,
            _pm(s.dice_mean, s.dice_std, 2),
            _pm(s.hd95_mean, s.hd95_std, 2),
            _pm(s.folding_mean, s.folding_std, 3),
            _pm(s.sdlogj_mean, s.sdlogj_std, 3),
            "-" if s.seconds_mean is None else f"{s.seconds_mean:.3f}",
            _memory_cell(s),
            "-" if s.params is None else f"{s.params / 1e6:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _roi_table(summaries: Sequence[MethodSummary]) -> str:
    head = ["ROI", "id"] + [s.name for s in summaries]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join(["---", "---:"] + ["---:"] * len(summaries)) + "|"]
    for k, (rid, rname) in enumerate(zip(ROI_IDS, ROI_NAMES)):
        cells = [rname, str(rid)] + [_pm(s.roi_dice_mean[k], s.roi_dice_std[k], 2)
                                      for s in summaries]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _slug(name: str) -> str:
    return name.replace(" ", "_")


def _jsonable(x):
    """NaN/inf -> None, numpy -> Python, recursively (strict JSON has no NaN)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return [_jsonable(v) for v in x.tolist()]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, Path):
        return str(x)
    return x


def _record_dict(r: PairRecord) -> dict:
    return {
        "method": r.method, "pair": r.pair, "moving_id": r.moving_id, "fixed_id": r.fixed_id,
        "dice": r.dice_mean, "hd95": r.hd95_mean, "hd95_max": r.hd95_max_mean,
        "folding_percent": r.folding, "sdlogj": r.sdlogj, "seconds": r.seconds,
        "warmup": r.warmup, "peak_memory_bytes": r.peak_memory_bytes,
        "dice_per_roi": r.dice, "hd95_per_roi": r.hd95, "hd95_max_per_roi": r.hd95_max,
    }


def _csv_text(rows: list[list]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for row in rows:
        w.writerow(["" if (isinstance(v, float) and not math.isfinite(v)) or v is None else v
                    for v in row])
    return buf.getvalue()


def _pairs_csv(records: list[PairRecord], params: Mapping[str, int | None]) -> str:
    roi_cols = [f"dice_{_slug(n)}" for n in ROI_NAMES] + [f"hd95_{_slug(n)}" for n in ROI_NAMES]
    head = ["method", "pair", "moving_id", "fixed_id", "dice", "hd95", "hd95_max",
            "folding_percent", "sdlogj", "seconds", "warmup", "peak_memory_mb", "params"]
    rows: list[list] = [head + roi_cols]
    for r in records:
        mem = None if r.peak_memory_bytes is None else round(r.peak_memory_bytes / 2**20, 3)
        rows.append([r.method, r.pair, r.moving_id, r.fixed_id, _round(r.dice_mean),
                     _round(r.hd95_mean), _round(r.hd95_max_mean), _round(r.folding),
                     _round(r.sdlogj), _round(r.seconds, 6), int(r.warmup), mem,
                     params.get(r.method)]
                    + [_round(v) for v in r.dice] + [_round(v) for v in r.hd95])
    return _csv_text(rows)


def _round(v, digits: int = 5):
    if v is None:
        return None
    v = float(v)
    return round(v, digits) if math.isfinite(v) else None


def _roi_csv(summaries: Sequence[MethodSummary]) -> str:
    head = ["roi_id", "roi"]
    for s in summaries:
        head += [s.name, f"{s.name} std"]
    rows: list[list] = [head]
    for k, (rid, rname) in enumerate(zip(ROI_IDS, ROI_NAMES)):
        row: list = [rid, rname]
        for s in summaries:
            row += [_round(s.roi_dice_mean[k], 4), _round(s.roi_dice_std[k], 4)]
        rows.append(row)
    return _csv_text(rows)


def _write_text(path: Path, text: str) -> Path:
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------------- evaluation
_OUTPUT_GLOBS = ("results.md", "results.csv", "results.json", "per_roi_dice.md",
                 "per_roi_dice.csv", "per_roi_dice.png", "fig2_pair*.png")


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise InputError(f"{out_dir}: output folder exists and is not empty; choose another "
                             "folder or pass overwrite (--overwrite) to replace its results")
        for pattern in _OUTPUT_GLOBS:  # only what an earlier evaluation wrote
            for p in out_dir.glob(pattern):
                p.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def _progress_callback(progress, total: int):
    """(callback(done, total, method), close) from ``progress`` (bool, callable or None)."""
    if callable(progress):
        return progress, lambda: None
    if not progress:
        return (lambda done, tot, name: None), lambda: None
    from tqdm import tqdm

    bar = tqdm(total=total, desc="evaluate", unit="pair", dynamic_ncols=True)

    def cb(done, tot, name):
        bar.set_description(f"evaluate {name}", refresh=False)
        bar.n = done
        bar.refresh()

    return cb, bar.close


def _cached_pair(item: Mapping) -> dict:
    """One pair from a dataset, checked, with its label maps turned into FreeSurfer ids."""
    ids = f"pair {item.get('moving_id')} -> {item.get('fixed_id')}"
    shapes = {key: tuple(item[key].shape) for key in ("moving", "fixed", "moving_seg",
                                                        "fixed_seg")}
    if len(set(shapes.values())) != 1 or len(shapes["fixed"]) != 4 or shapes["fixed"][0] != 1:
        raise InputError(f"{ids}: expected moving, fixed and both label maps of one shape "
                         f"(1, D0, D1, D2), got {shapes}")
    return {
        "moving": item["moving"].float(), "fixed": item["fixed"].float(),  # (1, D0, D1, D2)
        "moving_ids": roi_index_to_ids(item["moving_seg"])[0],  # (D0, D1, D2) int16
        "fixed_ids": roi_index_to_ids(item["fixed_seg"])[0],
        "moving_id": str(item["moving_id"]), "fixed_id": str(item["fixed_id"]),
    }


def _score_pair(method: str, k: int, pair: dict, warped_ids: np.ndarray,
                flow: np.ndarray | None, spacing) -> PairRecord:
    """Dice, both HD95 variants and (given a flow) folding and SDlogJ of one registered pair."""
    from mambamorph.metrics import dice_per_roi, folding_percent, hd95_per_roi, sdlogj

    fixed_ids = pair["fixed_ids"]
    return PairRecord(
        method=method, pair=k, moving_id=pair["moving_id"], fixed_id=pair["fixed_id"],
        dice=100.0 * dice_per_roi(warped_ids, fixed_ids),
        hd95=hd95_per_roi(warped_ids, fixed_ids, spacing, variant="pooled"),
        hd95_max=hd95_per_roi(warped_ids, fixed_ids, spacing, variant="max"),
        folding=None if flow is None else float(folding_percent(flow)),
        sdlogj=None if flow is None else float(sdlogj(flow)))


def evaluate(methods: Sequence[Method], dataset, pairs: Sequence, out_dir: str | os.PathLike,
             device: str | torch.device = "cpu", progress=None, overwrite: bool = False,
             n_figures: int = 2, figure_axis: int = 0,
             description: str | None = None) -> EvalResult:
    """Run every method on the same test pairs, score them, and write tables and figures.

    Args:
        methods: the methods, in table order (names must be unique; equal names of checkpoints
            get their run folder appended).
        dataset: a dataset of :mod:`mambamorph.data.datasets`: ``dataset.pairs(pairs)`` yields
            dicts with ``moving``/``fixed`` ``(1, D0, D1, D2)`` float32 images,
            ``moving_seg``/``fixed_seg`` ``(1, D0, D1, D2)`` compact ROI indices,
            ``moving_id``/``fixed_id``; ``dataset.spacing`` is the voxel size in mm.
        pairs: the fixed test pairs (e.g. :func:`mambamorph.data.datasets.test_pairs`); at
            least 2 (the first is each method's timing warm-up). They are read once and kept in
            memory (about 70 MB per pair at 176x208x192).
        out_dir: folder for the files listed in the module docstring; created if missing.
        device: where learned methods run (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        progress: ``True`` for a tqdm bar, a callable ``progress(done, total, method_name)``,
            or ``None``/``False`` for nothing.
        overwrite: replace the results of an earlier evaluation in a non-empty ``out_dir``
            (other files there are kept).
        n_figures: Fig. 2 is drawn for the first ``n_figures`` pairs.
        figure_axis: Fig. 2 view (0 sagittal, 1 coronal, 2 axial; see :mod:`mambamorph.viz`).
        description: one line about the data (dataset, modalities), written in ``results.md``.
    Returns:
        :class:`EvalResult` (``str()`` of it is the results table).
    Raises:
        InputError: no methods, fewer than 2 pairs, a non-empty ``out_dir`` without
            ``overwrite``, bad data from the dataset, CUDA asked for but absent.
    """
    from mambamorph import viz
    from mambamorph.metrics import dice_per_roi
    from mambamorph.nn.spatial import warp

    methods = list(methods)
    if not methods:
        raise InputError("nothing to evaluate: give at least one method")
    pairs = list(pairs)
    if len(pairs) < 2:
        raise InputError(f"need at least 2 test pairs (each method's first pair is a timing "
                         f"warm-up), got {len(pairs)}")
    methods = _unique_names(methods)

    dev = device if isinstance(device, torch.device) else resolve_device(str(device))
    out = Path(out_dir)
    _prepare_out_dir(out, overwrite)

    # ---- the pairs, read once: images on the CPU, label maps as FreeSurfer ids
    cache = [_cached_pair(item) for item in dataset.pairs(pairs)]
    spacing = tuple(float(s) for s in dataset.spacing)
    n_fig = min(max(int(n_figures), 0), len(cache))
    warped_for_fig: list[dict[str, np.ndarray]] = [{} for _ in range(n_fig)]
    dice_for_fig: list[dict[str, float]] = [{} for _ in range(n_fig)]

    total = len(methods) * len(cache)
    report, close_bar = _progress_callback(progress, total)
    records: list[PairRecord] = []
    summaries: list[MethodSummary] = []
    try:
        for method in methods:
            mdev = dev if method.device_bound else torch.device("cpu")
            runner = method.make_runner(mdev) if method.kind != "identity" else None
            mrecords: list[PairRecord] = []
            for k, pair in enumerate(cache):
                flow = seconds = mem_bytes = None
                warped_ids = pair["moving_ids"]  # identity: the unregistered pair
                if runner is not None:
                    mov = pair["moving"][None].to(mdev)  # (1, 1, D0, D1, D2)
                    fix = pair["fixed"][None].to(mdev)
                    # k == 0 (warm-up, not timed): trim the heap so the working set shows
                    with PeakMemory(mdev, release_free=k == 0) as mem, Timer(mdev) as timer:
                        flow = runner(mov, fix, spacing)
                    seconds, mem_bytes = timer.seconds, int(mem.peak_bytes)
                    if tuple(flow.shape) != (1, 3, *fix.shape[2:]):
                        raise RuntimeError(f"{method.name}: expected a flow (1, 3, "
                                           f"*{tuple(fix.shape[2:])}), got {tuple(flow.shape)}")
                    flow = flow.float()
                    seg = torch.from_numpy(pair["moving_ids"])[None, None].to(flow.device)
                    warped_ids = warp(seg, flow, mode="nearest")[0, 0].cpu().numpy()
                    if k < n_fig:
                        moved = warp(pair["moving"][None].to(flow.device), flow)
                        warped_for_fig[k][method.name] = moved[0, 0].cpu().numpy()
                    flow = flow[0].detach().cpu().numpy()  # (3, D0, D1, D2)
                    del mov, fix
                rec = _score_pair(method.name, k, pair, warped_ids, flow, spacing)
                rec.seconds, rec.peak_memory_bytes = seconds, mem_bytes
                rec.warmup = k == 0 and runner is not None
                mrecords.append(rec)
                if k < n_fig:
                    dice_for_fig[k][method.name] = rec.dice_mean
                report(len(records) + len(mrecords), total, method.name)
            del runner
            if mdev.type == "cuda":
                torch.cuda.empty_cache()
            mem_kind = "GPU allocated" if mdev.type == "cuda" else "CPU RSS"
            summary = _summarise(method, mrecords,
                                 None if method.kind == "identity" else mem_kind)
            log.info("%s: Dice %.2f ± %.2f, HD95 %.2f mm, time %s s", method.name,
                     summary.dice_mean, summary.dice_std, summary.hd95_mean,
                     "-" if summary.seconds_mean is None else f"{summary.seconds_mean:.3f}")
            records.extend(mrecords)
            summaries.append(summary)
    finally:
        close_bar()

    grids = sorted({tuple(p["fixed"].shape[1:]) for p in cache})
    meta = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": describe_device(dev),
        "torch": torch.__version__,
        "n_pairs": len(cache),
        "pairs": [[p["moving_id"], p["fixed_id"]] for p in cache],
        "grid": (list(grids[0]) if len(grids) == 1 else None),  # None: shapes differ
        "spacing_mm": list(spacing),
        "description": description,
        "hd95_table_variant": "pooled",
        "methods": [{"name": m.name, "kind": m.kind, "params": m.params, "source": m.source}
                    for m in methods],
    }
    files = _write_outputs(out, summaries, records, meta, methods)

    # ---- figures
    modal_m = getattr(dataset, "moving", None)
    modal_f = getattr(dataset, "fixed", None)
    identity_names = {m.name for m in methods if m.kind == "identity"}
    for k in range(n_fig):
        pair = cache[k]
        warped = {n: w for n, w in warped_for_fig[k].items()}
        moving_dice = 100.0 * dice_per_roi(pair["moving_ids"], pair["fixed_ids"])
        files[f"fig2_pair{k + 1}"] = viz.fig2(
            pair["fixed"][0].numpy(), pair["moving"][0].numpy(), warped, pair["fixed_ids"],
            out / f"fig2_pair{k + 1}.png", axis=figure_axis,
            dice_by_method={n: d for n, d in dice_for_fig[k].items() if n not in identity_names},
            moving_dice=_nanmean(moving_dice), spacing=spacing,
            fixed_name=f"Fixed ({modal_f.upper()})" if isinstance(modal_f, str) else "Fixed",
            moving_name=f"Moving ({modal_m.upper()})" if isinstance(modal_m, str) else "Moving",
            title=f"{pair['moving_id']} -> {pair['fixed_id']}")
    files["per_roi_dice_png"] = viz.roi_boxplots(
        {s.name: np.stack([r.dice for r in records if r.method == s.name]) for s in summaries},
        out / "per_roi_dice.png")
    return EvalResult(out_dir=out, summaries=summaries, records=records, files=files, meta=meta)


def _write_outputs(out: Path, summaries: list[MethodSummary], records: list[PairRecord],
                   meta: dict, methods: Sequence[Method]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    n = meta["n_pairs"]
    lines = [f"# Registration results ({n} test pairs)", ""]
    if meta.get("description"):
        lines += [meta["description"], ""]
    lines += [
        (f"Grid {'x'.join(map(str, meta['grid']))}" if meta["grid"] else "Grids differ")
        + f" at {'x'.join(f'{s:g}' for s in meta['spacing_mm'])} mm; device {meta['device']}; "
        f"torch {meta['torch']}; {meta['created']}.",
        "",
        _results_table(summaries),
        "Dice: mean over the 16 ROIs (those present) of each pair, x100; nearest-neighbour "
        "label warping. "
        "HD95: 95th percentile of the pooled surface distances of both directions (mm), mean "
        "over the ROIs (the 'max' variant is in results.csv/json). Folding: % of voxels with "
        "Jacobian determinant <= 0. Values are mean ± std over the pairs. Time: seconds per "
        "pair, device-synchronised, the first pair left out as warm-up. Memory: peak CUDA "
        "memory allocated (GPU) or growth of the resident set (CPU) during one registration, "
        "the largest over the pairs (on a CPU the warm-up pair runs after free heap memory is "
        "returned to the OS, so the whole working set counts). "
        "Params: trainable parameters, millions.",
        "",
        "| Method | Source |",
        "|---|---|",
    ]
    lines += [f"| {m.name} | {m.source} |" for m in methods]
    lines += ["", "Pairs (moving -> fixed): "
              + ", ".join(f"{a} -> {b}" for a, b in meta["pairs"]), ""]
    files["results_md"] = _write_text(out / "results.md", "\n".join(lines))
    params = {m.name: m.params for m in methods}
    files["results_csv"] = _write_text(out / "results.csv", _pairs_csv(records, params))
    doc = {
        "format": 1,
        "meta": meta,
        "rois": [{"id": rid, "name": name} for rid, name in zip(ROI_IDS, ROI_NAMES)],
        "summary": [asdict(s) for s in summaries],
        "pairs": [_record_dict(r) for r in records],
    }
    files["results_json"] = _write_text(
        out / "results.json", json.dumps(_jsonable(doc), indent=1, allow_nan=False) + "\n")
    files["per_roi_dice_md"] = _write_text(
        out / "per_roi_dice.md",
        f"# Dice (%) per ROI, mean ± std over {n} pairs\n\n" + _roi_table(summaries))
    files["per_roi_dice_csv"] = _write_text(out / "per_roi_dice.csv", _roi_csv(summaries))
    return files


def run_evaluation(checkpoints: Sequence[str | os.PathLike] = (), data_root: str | None = None,
                   manifest: str | None = None, moving: str = "mr", fixed: str = "ct",
                   grid: Sequence[int] | None = None, n_pairs: int = 20, seed: int = 0,
                   out_dir: str | os.PathLike = "evaluation", device: str = "auto",
                   identity: bool = True, ants: bool = False, overwrite: bool = False,
                   progress=True, split_file: str | None = None, n_figures: int = 2,
                   figure_axis: int = 0) -> EvalResult:
    """What ``mambamorph evaluate`` does: open the test split, build the methods, evaluate.

    Args:
        checkpoints: checkpoint files, one row each, in order.
        data_root: SR-Reg-layout folder (SR-Reg or a phantom); or ``manifest``: a CSV manifest.
        moving, fixed: modalities (moving -> fixed, e.g. MR -> CT).
        grid: crop/pad volumes to this grid (dims divisible by 16).
        n_pairs: number of fixed test pairs (>= 2), drawn with ``seed``.
        seed: seed of the test-pair draw (and of the split, when the dataset has no split file).
        out_dir: output folder (see :func:`evaluate`).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda[:i]``.
        identity: include the "Initial" row (unregistered pairs).
        ants: include ANTs SyN (needs antspyx).
        overwrite: replace an earlier evaluation's results in ``out_dir``.
        progress: tqdm bar (``True``), a callable, or nothing.
        split_file: explicit split JSON (default: the dataset's own).
        n_figures, figure_axis: see :func:`evaluate`.
    Returns:
        :class:`EvalResult`; ``str()`` of it is the results table.
    Raises:
        InputError: nothing to evaluate, bad data, bad checkpoints, a non-empty ``out_dir``.
        MambaMorphError: ``ants`` without antspyx installed.
    """
    from mambamorph.config import DataConfig
    from mambamorph.data.datasets import test_pairs
    from mambamorph.data.datasets import open_dataset

    out = Path(out_dir)
    if out.exists() and out.is_dir() and any(out.iterdir()) and not overwrite:
        # fail before loading models and data
        raise InputError(f"{out}: output folder exists and is not empty; choose another "
                         "folder or pass --overwrite to replace its results")
    if int(n_pairs) < 2:
        raise InputError(f"--pairs: need at least 2 test pairs (the first is a timing warm-up), "
                         f"got {n_pairs}")
    methods: list[Method] = []
    if identity:
        methods.append(identity_method())
    methods += [checkpoint_method(c) for c in checkpoints]
    if ants:
        methods.append(ants_syn_method(seed=seed))
    if not methods:
        raise InputError("nothing to evaluate: give checkpoint files, --ants, or keep the "
                         "identity row")
    dev = resolve_device(device)
    data = DataConfig(root=data_root, manifest=manifest, moving=moving, fixed=fixed,
                      grid=list(grid) if grid else None, split_file=split_file)
    dataset = open_dataset(data, "test", seed)
    n_subj = len(dataset.subjects)
    if int(n_pairs) > n_subj * (n_subj - 1):
        log.warning("the test split has %d subjects: evaluating all %d ordered pairs instead "
                    "of %d", n_subj, n_subj * (n_subj - 1), n_pairs)
        n_pairs = n_subj * (n_subj - 1)
    pairs = test_pairs(dataset.subjects, int(n_pairs), seed)
    source = data_root or manifest
    description = (f"Data: {source}, test split, {moving.upper()} -> {fixed.upper()}, "
                   f"{len(pairs)} pairs drawn with seed {seed}.")
    return evaluate(methods, dataset, pairs, out, device=dev, progress=progress,
                    overwrite=overwrite, n_figures=n_figures, figure_axis=figure_axis,
                    description=description)
