"""What an evaluation measured: one :class:`PairRecord` per method and pair, one
:class:`MethodSummary` (a table row) per method, and the :class:`EvalResult` that holds them.

Table values are mean +- standard deviation over the pairs (population std, as numpy's default).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mambamorph.evaluation.methods import Method

__all__ = ["PairRecord", "MethodSummary", "EvalResult", "summarise"]


@dataclass
class PairRecord:
    """Every value measured for one method on one pair.

    Attributes:
        method: method name; pair: index of the pair in the evaluation order.
        moving_id, fixed_id: subject ids of the pair.
        dice: ``(16,)`` Dice per ROI in %, NaN for a ROI absent from both label maps.
        hd95, hd95_max: ``(16,)`` HD95 per ROI in mm, "pooled" and "max" variants.
        folding: % of all voxels with a non-positive Jacobian determinant (``det <= 0``,
            :func:`mambamorph.metrics.folding_percent`; ``None`` for the identity).
        sdlogj: standard deviation of the log Jacobian determinant (``None`` for the identity).
        compressed: % of the fixed image's labelled voxels (fixed label map > 0: any of the 16
            ROIs) whose Jacobian determinant is below ``COMPRESSED_THRESHOLD`` (0.2) of
            :mod:`mambamorph.evaluation.run` (:func:`mambamorph.metrics.compressed_percent`;
            ``None`` for the identity).
        seconds: registration time of this pair (``None`` for the identity).
        warmup: ``True`` for the method's first pair (left out of the mean time).
        peak_memory_bytes: peak memory of one registration of this pair (see
            :func:`mambamorph.evaluation.memory.peak_memory`), or ``None`` (the identity, and
            every pair but the one it was measured on).
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
    compressed: float | None = None
    seconds: float | None = None
    warmup: bool = False
    peak_memory_bytes: int | None = None

    @property
    def dice_mean(self) -> float:
        """Mean Dice (%) over the ROIs present in the pair."""
        return nanmean(self.dice)

    @property
    def hd95_mean(self) -> float:
        """Mean "pooled" HD95 (mm) over the ROIs present in the pair."""
        return nanmean(self.hd95)

    @property
    def hd95_max_mean(self) -> float:
        """Mean "max" HD95 (mm) over the ROIs present in the pair."""
        return nanmean(self.hd95_max)


@dataclass
class MethodSummary:
    """One row of the results table: means and standard deviations over the pairs.

    ``*_std`` are population standard deviations across pairs of the per-pair values (each the
    mean over the ROIs). ``seconds_*`` leave out the warm-up pair. ``peak_memory_bytes`` is the
    largest peak over the pairs it was measured on; ``memory_kind`` says what it measures
    (``"GPU allocated"`` or ``"CPU RSS"``). Fields that do not apply (identity) are ``None``.
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
    compressed_mean: float | None
    compressed_std: float | None
    seconds_mean: float | None
    seconds_std: float | None
    n_timed: int
    peak_memory_bytes: int | None
    memory_kind: str | None
    roi_dice_mean: list[float] = field(default_factory=list)
    roi_dice_std: list[float] = field(default_factory=list)


@dataclass
class EvalResult:
    """What :func:`mambamorph.evaluation.evaluate` returns: the table rows, every per-pair value
    and the files written.

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
        from mambamorph.evaluation.report import results_table

        return results_table(self.summaries)

    def __str__(self) -> str:
        return self.table_markdown()


def nanmean(a) -> float:
    """Mean of the finite values of ``a`` (NaN when there is none), without a warning."""
    a = np.asarray(a, dtype=np.float64)
    return float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")


def _mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return None, None
    return float(v.mean()), float(v.std())


def summarise(method: Method, records: list[PairRecord], memory_kind: str | None
              ) -> MethodSummary:
    """The table row of ``method`` from its per-pair ``records`` (see :class:`MethodSummary`).

    Args:
        method: the method (name, kind, source, parameters are copied).
        records: its records, one per pair (at least one).
        memory_kind: what ``peak_memory_bytes`` measures (``None`` when nothing was measured).
    """
    timed = [r.seconds for r in records if not r.warmup and r.seconds is not None]
    t_m, t_s = _mean_std(timed)
    mems = [r.peak_memory_bytes for r in records if r.peak_memory_bytes is not None]
    roi = np.stack([r.dice for r in records])  # (n_pairs, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a ROI absent from every pair -> NaN
        roi_mean = np.nanmean(roi, axis=0)
        roi_std = np.nanstd(roi, axis=0)

    def mean_std_nan(values):  # the overlap metrics are NaN, not None, when nothing is finite
        m, s = _mean_std(values)
        return (float("nan") if m is None else m), (float("nan") if s is None else s)

    d_m, d_s = mean_std_nan(r.dice_mean for r in records)
    h_m, h_s = mean_std_nan(r.hd95_mean for r in records)
    hm_m, hm_s = mean_std_nan(r.hd95_max_mean for r in records)
    fold_m, fold_s = _mean_std(r.folding for r in records)
    sd_m, sd_s = _mean_std(r.sdlogj for r in records)
    co_m, co_s = _mean_std(r.compressed for r in records)
    return MethodSummary(
        name=method.name, kind=method.kind, source=method.source, params=method.params,
        n_pairs=len(records), dice_mean=d_m, dice_std=d_s, hd95_mean=h_m, hd95_std=h_s,
        hd95_max_mean=hm_m, hd95_max_std=hm_s,
        folding_mean=fold_m, folding_std=fold_s, sdlogj_mean=sd_m, sdlogj_std=sd_s,
        compressed_mean=co_m, compressed_std=co_s,
        seconds_mean=t_m, seconds_std=t_s, n_timed=len(timed),
        peak_memory_bytes=max(mems) if mems else None,
        memory_kind=memory_kind if mems else None,
        roi_dice_mean=[float(x) for x in roi_mean], roi_dice_std=[float(x) for x in roi_std])
