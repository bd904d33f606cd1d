"""Running an evaluation: every method on the same fixed test pairs, scored one way.

:func:`evaluate` runs the methods one at a time (so the device holds one model when its memory
is measured). For each method and pair it warps the moving label map with nearest-neighbour
sampling and scores it against the fixed label map:

- Dice of each of the 16 ROIs (x100; the pair's value is the mean over the ROIs present);
- HD95 of each ROI in mm, both variants of :mod:`mambamorph.metrics` ("pooled", shown in the
  table, and "max");
- plausibility of the field: folding (% of all voxels with a non-positive Jacobian
  determinant), SDlogJ, and the % of the fixed image's labelled voxels (fixed label map > 0,
  i.e. any of the 16 ROIs) with a Jacobian determinant below :data:`COMPRESSED_THRESHOLD`
  (0.2: squeezed to less than a fifth of their volume, folds included);
- time per pair, device-synchronised; each method's first pair is a warm-up and is left out of
  the mean (so at least 2 pairs are needed);
- peak memory of one registration of the largest pair (the first of them), measured by
  :func:`mambamorph.runtime.peak_memory`, the same function as ``mambamorph bench``: CUDA memory
  allocated (absolute) on a GPU; on a CPU the growth of the resident set during the call, in a
  fresh process after a small warm-up call, so that the figure does not depend on what ran
  before;
- the number of trainable parameters.

Label maps: the datasets give compact ROI indices (0 = background, k = ROI ``ROI_IDS[k-1]``);
they are turned into FreeSurfer ids once, by :func:`roi_index_to_ids`, and every metric and
figure then uses the default 16-ROI table of :mod:`mambamorph.labels`. The files written are
listed in :mod:`mambamorph.evaluation.report`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from mambamorph.errors import InputError
from mambamorph.evaluation import report
from mambamorph.evaluation.methods import (IO_SUFFIX, SPEC_WORDS, Method, checkpoint_io_method,
                                           checkpoint_method, identity_method,
                                           method_from_spec, unique_names)
from mambamorph.evaluation.results import EvalResult, MethodSummary, PairRecord, summarise
from mambamorph.io import prepare_output_dir
from mambamorph.labels import NUM_ROIS, ROI_IDS
from mambamorph.runtime import Timer, describe_device, peak_memory, resolve_device, \
    resolve_precision, warmup_crop

log = logging.getLogger(__name__)

__all__ = ["COMPRESSED_THRESHOLD", "roi_index_to_ids", "evaluate", "run_evaluation"]

#: Jacobian determinant below which a voxel of the fixed brain counts as compressed.
COMPRESSED_THRESHOLD = 0.2

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


# ------------------------------------------------------------------------------------ pairs
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
    """Dice, both HD95 variants and (given a ``(3, D0, D1, D2)`` flow in voxels) folding, SDlogJ
    and the compressed share of the fixed brain of one registered pair."""
    from mambamorph.metrics import (compressed_percent, dice_per_roi, folding_percent,
                                    hd95_per_roi, sdlogj)

    fixed_ids = pair["fixed_ids"]
    return PairRecord(
        method=method, pair=k, moving_id=pair["moving_id"], fixed_id=pair["fixed_id"],
        dice=100.0 * dice_per_roi(warped_ids, fixed_ids),
        hd95=hd95_per_roi(warped_ids, fixed_ids, spacing, variant="pooled"),
        hd95_max=hd95_per_roi(warped_ids, fixed_ids, spacing, variant="max"),
        folding=None if flow is None else float(folding_percent(flow)),
        sdlogj=None if flow is None else float(sdlogj(flow)),
        compressed=None if flow is None else float(
            compressed_percent(flow, fixed_ids > 0, COMPRESSED_THRESHOLD)))


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


# --------------------------------------------------------------------------------- one method
class _Figures:
    """What Fig. 2 needs from the first ``n`` pairs: per pair, method name -> warped moving
    image ``(D0, D1, D2)`` and method name -> mean Dice (%)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.warped: list[dict[str, np.ndarray]] = [{} for _ in range(n)]
        self.dice: list[dict[str, float]] = [{} for _ in range(n)]


def _measure_memory(method: Method, pair: dict, spacing, device: torch.device
                    ) -> tuple[int, str]:
    """Peak memory of one registration of ``pair`` (:func:`mambamorph.runtime.peak_memory`)."""
    if device.type == "cpu":
        mov, fix = pair["moving"][None], pair["fixed"][None]  # (1, 1, D0, D1, D2), pickled
    else:
        mov, fix = pair["moving"][None].to(device), pair["fixed"][None].to(device)
    return peak_memory(method.make_runner, (mov, fix, spacing), device,
                       warmup_args=(warmup_crop(mov), warmup_crop(fix), spacing))


def _register_pair(method: Method, runner, pair: dict, spacing, device: torch.device,
                   want_moved: bool) -> tuple[np.ndarray, np.ndarray, float, np.ndarray | None]:
    """Run one registration; return the warped label map, the ``(3, D0, D1, D2)`` flow, the
    seconds and (if ``want_moved``) the warped moving image, all on the CPU."""
    from mambamorph.nn.spatial import warp

    mov = pair["moving"][None].to(device)  # (1, 1, D0, D1, D2)
    fix = pair["fixed"][None].to(device)
    with Timer(device) as timer:
        flow = runner(mov, fix, spacing)
    if tuple(flow.shape) != (1, 3, *fix.shape[2:]):
        raise RuntimeError(f"{method.name}: expected a flow (1, 3, *{tuple(fix.shape[2:])}), "
                           f"got {tuple(flow.shape)}")
    flow = flow.float()
    seg = torch.from_numpy(pair["moving_ids"])[None, None].to(flow.device)
    warped_ids = warp(seg, flow, mode="nearest")[0, 0].cpu().numpy()
    moved = warp(mov.to(flow.device), flow)[0, 0].cpu().numpy() if want_moved else None
    return warped_ids, flow[0].detach().cpu().numpy(), timer.seconds, moved


def _run_method(method: Method, cache: list[dict], spacing, device: torch.device,
                figures: _Figures, progress) -> tuple[list[PairRecord], MethodSummary]:
    """Every pair of one method: its records and its table row; ``progress(name)`` after
    each pair."""
    mdev = device if method.device_bound else torch.device("cpu")
    is_identity = method.kind == "identity"
    mem_bytes = mem_kind = None
    mem_pair = -1
    if not is_identity:  # before the runner exists: one model on the device at a time
        mem_pair = max(range(len(cache)), key=lambda k: cache[k]["fixed"].numel())
        mem_bytes, mem_kind = _measure_memory(method, cache[mem_pair], spacing, mdev)
    runner = None if is_identity else method.make_runner(mdev)
    records: list[PairRecord] = []
    for k, pair in enumerate(cache):
        flow = seconds = None
        warped_ids = pair["moving_ids"]  # identity: the unregistered pair
        if runner is not None:
            warped_ids, flow, seconds, moved = _register_pair(method, runner, pair, spacing,
                                                              mdev, k < figures.n)
            if moved is not None:
                figures.warped[k][method.name] = moved
        rec = _score_pair(method.name, k, pair, warped_ids, flow, spacing)
        rec.seconds = seconds
        rec.peak_memory_bytes = mem_bytes if k == mem_pair else None
        rec.warmup = k == 0 and runner is not None
        records.append(rec)
        if k < figures.n:
            figures.dice[k][method.name] = rec.dice_mean
        progress(method.name)
    del runner
    if mdev.type == "cuda":
        torch.cuda.empty_cache()
    summary = summarise(method, records, mem_kind)
    log.info("%s: Dice %.2f ± %.2f, HD95 %.2f mm, time %s s", method.name, summary.dice_mean,
             summary.dice_std, summary.hd95_mean,
             "-" if summary.seconds_mean is None else f"{summary.seconds_mean:.3f}")
    return records, summary


def _meta(cache: list[dict], spacing, device: torch.device, description: str | None,
          methods: Sequence[Method]) -> dict:
    grids = sorted({tuple(p["fixed"].shape[1:]) for p in cache})
    return {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": describe_device(device),
        "torch": torch.__version__,
        "n_pairs": len(cache),
        "pairs": [[p["moving_id"], p["fixed_id"]] for p in cache],
        "grid": (list(grids[0]) if len(grids) == 1 else None),  # None: shapes differ
        "spacing_mm": list(spacing),
        "description": description,
        "hd95_table_variant": "pooled",
        "compressed_threshold": COMPRESSED_THRESHOLD,
        "compressed_mask": "fixed label map > 0 (voxels of any of the 16 ROIs)",
        "methods": [{"name": m.name, "kind": m.kind, "params": m.params, "source": m.source}
                    for m in methods],
    }


# ------------------------------------------------------------------------------------ public
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
        out_dir: folder for the files listed in :mod:`mambamorph.evaluation.report`; created if
            missing.
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
        InputError: no methods, fewer than 2 pairs, bad data from the dataset, CUDA asked for
            but absent.
        OutputExistsError: a non-empty ``out_dir`` without ``overwrite``.
        WriteError: an output could not be written.
    """
    methods = list(methods)
    if not methods:
        raise InputError("nothing to evaluate: give at least one method")
    pairs = list(pairs)
    if len(pairs) < 2:
        raise InputError(f"need at least 2 test pairs (each method's first pair is a timing "
                         f"warm-up), got {len(pairs)}")
    methods = unique_names(methods)
    dev = resolve_device(device)
    out = prepare_output_dir(out_dir, overwrite,
                             owned=lambda p: report.is_output(Path(out_dir), p),
                             what="output folder")

    cache = [_cached_pair(item) for item in dataset.pairs(pairs)]  # read once, kept on the CPU
    spacing = tuple(float(s) for s in dataset.spacing)
    figures = _Figures(min(max(int(n_figures), 0), len(cache)))
    total = len(methods) * len(cache)
    report_progress, close_bar = _progress_callback(progress, total)
    records: list[PairRecord] = []
    summaries: list[MethodSummary] = []
    done = 0

    def pair_done(name: str) -> None:
        nonlocal done
        done += 1
        report_progress(done, total, name)

    try:
        for method in methods:
            mrecords, summary = _run_method(method, cache, spacing, dev, figures, pair_done)
            records.extend(mrecords)
            summaries.append(summary)
    finally:
        close_bar()

    meta = _meta(cache, spacing, dev, description, methods)
    files = report.write_tables(out, summaries, records, meta, methods)
    modality = {k: v for k in ("moving", "fixed")
                if isinstance(v := getattr(dataset, k, None), str)}
    files |= report.write_figures(
        out, cache, figures.warped, figures.dice, summaries, records, spacing,
        identity_names={m.name for m in methods if m.kind == "identity"},
        moving_modality=modality.get("moving"), fixed_modality=modality.get("fixed"),
        axis=figure_axis)
    return EvalResult(out_dir=out, summaries=summaries, records=records, files=files, meta=meta)


def _is_ants(spec: str) -> bool:
    return str(spec).strip().lower() in ("ants", "ants-syn")


def _spec_method(spec: str, seed: int, precision: str = "fp32") -> Method:
    """:func:`method_from_spec`, with the evaluation's seed for ANTs SyN."""
    return SPEC_WORDS["ants-syn"](seed=seed) if _is_ants(spec) else \
        method_from_spec(spec, precision=precision)


def run_evaluation(checkpoints: Sequence[str | os.PathLike] = (), data_root: str | None = None,
                   manifest: str | None = None, moving: str = "mr", fixed: str = "ct",
                   grid: Sequence[int] | None = None, n_pairs: int = 20, seed: int = 0,
                   out_dir: str | os.PathLike = "evaluation", device: str = "auto",
                   identity: bool = True, ants: bool = False, overwrite: bool = False,
                   progress=True, split_file: str | None = None, n_figures: int = 2,
                   figure_axis: int = 0, methods: Sequence[Method] = (), io: bool = False,
                   specs: Sequence[str] = (), precision: str = "fp32") -> EvalResult:
    """What ``mambamorph evaluate`` does: open the test split, build the methods, evaluate.

    Args:
        checkpoints: checkpoint files, one row each, in order (a path ending in ``+io``: that
            checkpoint refined by instance optimisation instead).
        data_root: SR-Reg-layout folder (SR-Reg or a phantom); or ``manifest``: a CSV manifest.
        moving, fixed: modalities (moving -> fixed, e.g. MR -> CT).
        grid: crop/pad volumes to this grid (dims divisible by 16).
        n_pairs: number of fixed test pairs (>= 2), drawn with ``seed``.
        seed: seed of the test-pair draw (and of the split, when the dataset has no split file).
        out_dir: output folder (see :func:`evaluate`).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda[:i]``; resolved once, first.
        identity: include the "Initial" row (unregistered pairs).
        ants: include ANTs SyN (needs antspyx; once, also when ``specs`` name it).
        overwrite: replace an earlier evaluation's results in ``out_dir``.
        progress: tqdm bar (``True``), a callable, or nothing.
        split_file: explicit split JSON (default: the dataset's own).
        n_figures, figure_axis: see :func:`evaluate`.
        methods: further :class:`Method` objects, after ``specs`` and before ANTs.
        io: after each checkpoint's row, add the row of that checkpoint refined by instance
            optimisation (:func:`~mambamorph.evaluation.methods.checkpoint_io_method`, e.g.
            "MambaMorph + IO").
        specs: further methods by command-line word or path, after the checkpoints (see
            :func:`~mambamorph.evaluation.methods.method_from_spec`: ``io``, ``convexadam``,
            ``greedy``, ``ants-syn``, ``PATH``, ``PATH+io``); ANTs SyN gets ``seed``.
        precision: the networks' inference precision, ``fp32``, ``bf16`` or ``auto`` (see
            :func:`mambamorph.models.predict`).
    Returns:
        :class:`EvalResult`; ``str()`` of it is the results table.
    Raises:
        InputError: nothing to evaluate, bad data, bad checkpoints, an unknown or unavailable
            device.
        OutputExistsError: a non-empty ``out_dir`` without ``overwrite``.
        MambaMorphError: ``ants`` or a peer in ``specs`` without its package installed.
    """
    from mambamorph.config import DataConfig
    from mambamorph.data.datasets import open_dataset, test_pairs

    dev = resolve_device(device)
    resolve_precision(precision, dev)  # an unknown precision fails before any work
    if int(n_pairs) < 2:
        raise InputError(f"need at least 2 test pairs (the first is a timing warm-up), "
                         f"got {n_pairs}")
    chosen: list[Method] = [identity_method()] if identity else []
    for c in checkpoints:
        if str(c).strip().lower().endswith(IO_SUFFIX):
            chosen.append(method_from_spec(str(c), precision=precision))
            continue
        chosen.append(checkpoint_method(c, precision=precision))
        if io:
            chosen.append(checkpoint_io_method(c, precision=precision))
    chosen += [_spec_method(s, seed, precision) for s in specs]
    chosen += list(methods)
    if ants and not any(_is_ants(s) for s in specs):
        chosen.append(_spec_method("ants-syn", seed))
    if not chosen:
        raise InputError("nothing to evaluate: no checkpoint, no method and no identity row")
    data = DataConfig(root=data_root, manifest=manifest, moving=moving, fixed=fixed,
                      grid=list(grid) if grid else None, split_file=split_file)
    dataset = open_dataset(data, "test", seed)
    if not dataset.has_labels:
        raise InputError(f"{manifest}: no 'seg' column; evaluation scores warped label maps "
                         "and needs one per subject")
    n_subj = len(dataset.subjects)
    if int(n_pairs) > n_subj * (n_subj - 1):
        log.warning("the test split has %d subjects: evaluating all %d ordered pairs instead "
                    "of %d", n_subj, n_subj * (n_subj - 1), n_pairs)
        n_pairs = n_subj * (n_subj - 1)
    pairs = test_pairs(dataset.subjects, int(n_pairs), seed)
    description = (f"Data: {data_root or manifest}, test split, {moving.upper()} -> "
                   f"{fixed.upper()}, {len(pairs)} pairs drawn with seed {seed}.")
    return evaluate(chosen, dataset, pairs, out_dir, device=dev, progress=progress,
                    overwrite=overwrite, n_figures=n_figures, figure_axis=figure_axis,
                    description=description)
