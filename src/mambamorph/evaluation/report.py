"""The files an evaluation writes: the paper's tables (Markdown), CSV, JSON and figures.

Files written to the output folder (every one through :func:`mambamorph.io.atomic_write_text`
or, for figures, :mod:`mambamorph.viz`, which writes through
:func:`mambamorph.io.atomic_write_bytes`)::

    results.md        the paper's Table 1/2 layout (one row per method) and the settings
    results.csv       one row per method x pair (wide: summary metrics then per-ROI Dice and
                      HD95 columns); ``pandas.read_csv(...).groupby("method").mean()`` gives the
                      table
    results.json      settings, the per-method summary and every per-pair value
    per_roi_dice.md   method x ROI mean +- std Dice
    per_roi_dice.csv  the same, one row per ROI, ``<method>`` and ``<method> std`` columns
    per_roi_dice.png  box plots of the per-ROI Dice (:func:`mambamorph.viz.roi_boxplots`)
    fig2_pair<k>.png  the paper's Fig. 2 for the first pairs (:func:`mambamorph.viz.fig2`)

:func:`is_output` recognises exactly these names, so that replacing an earlier evaluation
deletes nothing else of the user's.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mambamorph.io import atomic_write_text
from mambamorph.labels import ROI_IDS, ROI_NAMES
from mambamorph.runtime import GB

if TYPE_CHECKING:
    from mambamorph.evaluation.methods import Method
    from mambamorph.evaluation.results import MethodSummary, PairRecord

__all__ = ["TABLE_COLUMNS", "OUTPUT_NAMES", "is_output", "results_table", "roi_table",
           "write_tables", "write_figures"]

TABLE_COLUMNS = ("Method", "Dice (%)", "HD95 (mm)", "Folding (%)", "SDlogJ", "J < 0.2 (%)",
                 "Time (s)", "Memory (GB)", "Params (M)")

#: the fixed file names of an evaluation (the Fig. 2 files are ``fig2_pair<k>.png``).
OUTPUT_NAMES = ("results.md", "results.csv", "results.json", "per_roi_dice.md",
                "per_roi_dice.csv", "per_roi_dice.png")
_FIG2_NAME = re.compile(r"fig2_pair[0-9]+\.png")


def is_output(out_dir: Path, path: Path) -> bool:
    """True if ``path`` is a file an evaluation writes directly in ``out_dir``."""
    return (Path(path).parent == Path(out_dir)
            and (path.name in OUTPUT_NAMES or _FIG2_NAME.fullmatch(path.name) is not None))


# ---------------------------------------------------------------------------------- markdown
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
    return f"{s.peak_memory_bytes / GB:.2f} ({unit})"


def results_table(summaries: Sequence[MethodSummary]) -> str:
    """The paper's Table 1/2 layout (columns :data:`TABLE_COLUMNS`), one row per method."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(TABLE_COLUMNS) - 1)) + "|"]
    for s in summaries:
        cells = [
            s.name,
            _pm(s.dice_mean, s.dice_std, 2),
            _pm(s.hd95_mean, s.hd95_std, 2),
            _pm(s.folding_mean, s.folding_std, 3),
            _pm(s.sdlogj_mean, s.sdlogj_std, 3),
            _pm(s.compressed_mean, s.compressed_std, 3),
            "-" if s.seconds_mean is None else f"{s.seconds_mean:.3f}",
            _memory_cell(s),
            "-" if s.params is None else f"{s.params / 1e6:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def roi_table(summaries: Sequence[MethodSummary]) -> str:
    """Method x ROI mean +- std Dice (%), one row per ROI."""
    head = ["ROI", "id"] + [s.name for s in summaries]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join(["---", "---:"] + ["---:"] * len(summaries)) + "|"]
    for k, (rid, rname) in enumerate(zip(ROI_IDS, ROI_NAMES)):
        cells = [rname, str(rid)] + [_pm(s.roi_dice_mean[k], s.roi_dice_std[k], 2)
                                      for s in summaries]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_NOTES = (
    "Dice: mean over the 16 ROIs (those present) of each pair, x100; nearest-neighbour "
    "label warping. "
    "HD95: 95th percentile of the pooled surface distances of both directions (mm), mean "
    "over the ROIs (the 'max' variant is in results.csv/json). Folding: % of all voxels with "
    "a non-positive Jacobian determinant (J <= 0). SDlogJ: std of log J (J clipped at 1e-9) over "
    "all voxels. J < 0.2: % of the fixed image's labelled voxels (fixed label map > 0, i.e. "
    "any of the 16 ROIs) with J < 0.2, folded ones included. Values are mean ± std over "
    "the pairs. Time: seconds per pair, device-synchronised, the first pair left out as "
    "warm-up. Memory: peak CUDA "
    "memory allocated (GPU) or growth of the resident set (CPU) during one registration "
    "of the largest pair, after a small warm-up registration; on a CPU it is measured in a "
    "fresh process, so it does not depend on what ran before. "
    "Params: trainable parameters, millions.")


def _results_md(summaries, meta: dict, methods: Sequence[Method]) -> str:
    lines = [f"# Registration results ({meta['n_pairs']} test pairs)", ""]
    if meta.get("description"):
        lines += [meta["description"], ""]
    lines += [
        (f"Grid {'x'.join(map(str, meta['grid']))}" if meta["grid"] else "Grids differ")
        + f" at {'x'.join(f'{s:g}' for s in meta['spacing_mm'])} mm; device {meta['device']}; "
        f"torch {meta['torch']}; {meta['created']}.",
        "",
        results_table(summaries),
        _NOTES,
        "",
        "| Method | Source |",
        "|---|---|",
    ]
    lines += [f"| {m.name} | {m.source} |" for m in methods]
    lines += ["", "Pairs (moving -> fixed): "
              + ", ".join(f"{a} -> {b}" for a, b in meta["pairs"]), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ CSV/JSON
def _slug(name: str) -> str:
    return name.replace(" ", "_")


def _round(v, digits: int = 5):
    if v is None:
        return None
    v = float(v)
    return round(v, digits) if math.isfinite(v) else None


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
        "folding_percent": r.folding, "sdlogj": r.sdlogj, "compressed_percent": r.compressed,
        "seconds": r.seconds,
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


def _pairs_csv(records: Sequence[PairRecord], params: Mapping[str, int | None]) -> str:
    roi_cols = [f"dice_{_slug(n)}" for n in ROI_NAMES] + [f"hd95_{_slug(n)}" for n in ROI_NAMES]
    head = ["method", "pair", "moving_id", "fixed_id", "dice", "hd95", "hd95_max",
            "folding_percent", "sdlogj", "compressed_percent", "seconds", "warmup",
            "peak_memory_gb", "params"]
    rows: list[list] = [head + roi_cols]
    for r in records:
        mem = None if r.peak_memory_bytes is None else round(r.peak_memory_bytes / GB, 4)
        rows.append([r.method, r.pair, r.moving_id, r.fixed_id, _round(r.dice_mean),
                     _round(r.hd95_mean), _round(r.hd95_max_mean), _round(r.folding),
                     _round(r.sdlogj), _round(r.compressed), _round(r.seconds, 6),
                     int(r.warmup), mem,
                     params.get(r.method)]
                    + [_round(v) for v in r.dice] + [_round(v) for v in r.hd95])
    return _csv_text(rows)


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


# ------------------------------------------------------------------------------------ writing
def write_tables(out: Path, summaries: Sequence[MethodSummary], records: Sequence[PairRecord],
                 meta: dict, methods: Sequence[Method]) -> dict[str, Path]:
    """Write ``results.md/.csv/.json`` and ``per_roi_dice.md/.csv`` into ``out``.

    ``out`` has been prepared by :func:`mambamorph.io.prepare_output_dir` (the one rule for a
    non-empty folder), so the files are replaced if present.

    Returns:
        ``{"results_md": path, "results_csv": ..., "results_json": ..., "per_roi_dice_md": ...,
        "per_roi_dice_csv": ...}``.
    Raises:
        WriteError: a file could not be written (the message names it).
    """
    def write(name: str, text: str) -> Path:
        return atomic_write_text(out / name, text, overwrite=True)

    doc = {
        "format": 1,
        "meta": meta,
        "rois": [{"id": rid, "name": name} for rid, name in zip(ROI_IDS, ROI_NAMES)],
        "summary": [asdict(s) for s in summaries],
        "pairs": [_record_dict(r) for r in records],
    }
    return {
        "results_md": write("results.md", _results_md(summaries, meta, methods)),
        "results_csv": write("results.csv",
                             _pairs_csv(records, {m.name: m.params for m in methods})),
        "results_json": write("results.json",
                              json.dumps(_jsonable(doc), indent=1, allow_nan=False) + "\n"),
        "per_roi_dice_md": write("per_roi_dice.md",
                                 f"# Dice (%) per ROI, mean ± std over {meta['n_pairs']} pairs"
                                 "\n\n" + roi_table(summaries)),
        "per_roi_dice_csv": write("per_roi_dice.csv", _roi_csv(summaries)),
    }


def write_figures(out: Path, pairs: Sequence[dict], warped: Sequence[Mapping[str, np.ndarray]],
                  dice: Sequence[Mapping[str, float]], summaries: Sequence[MethodSummary],
                  records: Sequence[PairRecord], spacing: Sequence[float],
                  identity_names: set[str], moving_modality: str | None = None,
                  fixed_modality: str | None = None, axis: int = 0) -> dict[str, Path]:
    """Draw Fig. 2 for the first ``len(warped)`` pairs and the per-ROI Dice box plots.

    Args:
        out: the output folder.
        pairs: the evaluation's pairs (dicts with ``moving``/``fixed`` ``(1, D0, D1, D2)``
            images, ``moving_ids``/``fixed_ids`` ``(D0, D1, D2)`` FreeSurfer-id label maps,
            ``moving_id``/``fixed_id``).
        warped: per figure pair, method name -> ``(D0, D1, D2)`` warped moving image.
        dice: per figure pair, method name -> mean Dice (%) of that pair.
        summaries, records: the evaluation's rows and per-pair values (box plots).
        spacing: voxel size in mm.
        identity_names: methods left out of the Dice labels of Fig. 2.
        moving_modality, fixed_modality: e.g. ``"mr"``, ``"ct"`` (panel titles).
        axis: Fig. 2 view (0 sagittal, 1 coronal, 2 axial).
    Returns:
        ``{"fig2_pair1": path, ..., "per_roi_dice_png": path}``.
    """
    from mambamorph import viz
    from mambamorph.evaluation.results import nanmean
    from mambamorph.metrics import dice_per_roi

    files: dict[str, Path] = {}
    for k, (w, d) in enumerate(zip(warped, dice)):
        pair = pairs[k]
        moving_dice = 100.0 * dice_per_roi(pair["moving_ids"], pair["fixed_ids"])
        files[f"fig2_pair{k + 1}"] = viz.fig2(
            pair["fixed"][0].numpy(), pair["moving"][0].numpy(), dict(w), pair["fixed_ids"],
            out / f"fig2_pair{k + 1}.png", axis=axis,
            dice_by_method={n: v for n, v in d.items() if n not in identity_names},
            moving_dice=nanmean(moving_dice), spacing=spacing,
            fixed_name=f"Fixed ({fixed_modality.upper()})" if fixed_modality else "Fixed",
            moving_name=f"Moving ({moving_modality.upper()})" if moving_modality else "Moving",
            title=f"{pair['moving_id']} -> {pair['fixed_id']}")
    files["per_roi_dice_png"] = viz.roi_boxplots(
        {s.name: np.stack([r.dice for r in records if r.method == s.name]) for s in summaries},
        out / "per_roi_dice.png")
    return files
