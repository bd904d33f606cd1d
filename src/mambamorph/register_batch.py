"""Many pairs with one command: ``mambamorph register --pairs pairs.csv --out DIR``.

The pairs file is a CSV with a header line and one row per pair:

- ``moving``, ``fixed`` (required): NIfTI paths, absolute or relative to the CSV's folder;
- ``moving_seg`` (optional): the moving label map, warped with nearest neighbour;
- ``id`` (optional): the pair's output folder name (letters, digits, ``.``, ``_``, ``-``);
  default the moving file's stem + ``__`` + the fixed file's stem (``-2``, ``-3``, ... appended
  when that name is taken).

One :class:`~mambamorph.register.Registrar` serves every pair, so the network is loaded once.
The pairs run one after another; each writes what ``mambamorph register`` writes for one pair
into ``DIR/<id>/`` (:mod:`mambamorph.register`), ``register.json`` last. After each pair,
``DIR/summary.csv`` (:data:`SUMMARY_COLUMNS`) is rewritten atomically with every pair done so
far (and, while a pair runs, a ``running`` row for it), so a killed run loses no finished pair.

Resuming: a pair whose folder holds a ``register.json`` of the same inputs, checkpoint and IO
settings is ``skipped`` (not recomputed; ``overwrite`` recomputes it); one of other inputs or
settings fails the pair unless ``overwrite``. A pair the summary shows ``running`` (a run killed
mid-pair) is redone in place; other files found in a pair's folder are replaced only with
``overwrite``. A pair that fails on its own account (a missing or corrupt file, inputs that
do not overlap, a refused or failed write: any :class:`~mambamorph.errors.MambaMorphError`) is
recorded as ``failed`` with its message and the next pair runs; anything else (a bug) propagates.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path

from mambamorph.checkpoint import checkpoint_stem
from mambamorph.errors import InputError, MambaMorphError, OutputExistsError, WriteError
from mambamorph.io import atomic_write_text, require_file
from mambamorph.optimize.instance import IOConfig
from mambamorph.register import OUTPUT_NAMES, Registrar

__all__ = ["Pair", "PairRow", "BatchResult", "SUMMARY_NAME", "SUMMARY_COLUMNS", "read_pairs",
           "register_pairs"]

log = logging.getLogger(__name__)

#: the summary file in the output folder.
SUMMARY_NAME = "summary.csv"
#: its columns: the pair's id and input paths; the status: ``ok``, ``failed``, ``skipped`` (a
#: complete result found from an earlier run) or ``running`` (only while it runs, or after a
#: kill); wall seconds of the pair's registration; % of model-grid voxels with a Jacobian
#: determinant <= 0 and the std of its log (SDlogJ) of the deformable field; the message of a
#: failed pair. A skipped pair keeps the figures of the run that computed it (SDlogJ when that
#: run's summary had it).
SUMMARY_COLUMNS = ("id", "moving", "fixed", "status", "seconds", "folding_percent", "sdlogj",
                   "error")

_COLUMNS = ("moving", "fixed", "moving_seg", "id")
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z")


@dataclass(frozen=True)
class Pair:
    """One row of a pairs file: the pair's output folder name and its input paths."""

    id: str
    moving: Path
    fixed: Path
    moving_seg: Path | None = None


@dataclass
class PairRow:
    """One row of the summary (:data:`SUMMARY_COLUMNS`); ``exception``: what a failed pair
    raised (not written)."""

    id: str
    moving: str
    fixed: str
    status: str
    seconds: float = math.nan
    folding_percent: float = math.nan
    sdlogj: float = math.nan
    error: str = ""
    exception: MambaMorphError | None = field(default=None, repr=False, compare=False)

    def csv_values(self) -> list[str]:
        def num(x: float, fmt: str) -> str:
            return "" if x is None or math.isnan(x) else format(x, fmt)

        return [self.id, self.moving, self.fixed, self.status, num(self.seconds, ".2f"),
                num(self.folding_percent, ".6g"), num(self.sdlogj, ".6g"), self.error]


@dataclass
class BatchResult:
    """What :func:`register_pairs` did.

    Attributes:
        out_dir: the output folder; summary: ``out_dir / summary.csv``.
        rows: one :class:`PairRow` per pair, in the pairs' order.
        seconds: wall time of the whole call (the network's loading included), s.
        network_loads: times the network was loaded (1 with a checkpoint, 0 without).
    """

    out_dir: Path
    summary: Path
    rows: list[PairRow]
    seconds: float
    network_loads: int

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.rows)

    @property
    def failed(self) -> list[PairRow]:
        return [r for r in self.rows if r.status == "failed"]

    def __str__(self) -> str:
        n, done = len(self.rows), self.count("ok")
        rate = f" ({60.0 * done / self.seconds:.1f} pairs/min)" if done and self.seconds > 0 else ""
        lines = [f"{n} pairs in {self.seconds:.1f} s{rate}: {done} ok, "
                 f"{self.count('skipped')} skipped (done earlier), {len(self.failed)} failed",
                 f"  one folder per pair in {self.out_dir}; summary: {self.summary}"]
        if self.failed:
            lines.append(f"  failed: {', '.join(r.id for r in self.failed)}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------- pairs file
def _stem(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii", ".gz"):
        if name.lower().endswith(ext):
            return name[:-len(ext)]
    return name


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).lstrip("._-")[:48] or "x"


def read_pairs(csv_path: str | os.PathLike) -> list[Pair]:
    """The pairs of a pairs file (module docstring), with absolute paths.

    Only the file is read: whether each image exists is found out when its pair runs.

    Args:
        csv_path: the CSV (UTF-8, header ``moving,fixed[,moving_seg][,id]`` in any order; other
            columns are ignored with a warning).
    Returns:
        The pairs in file order (blank rows skipped), with unique, folder-safe ids.
    Raises:
        InputError: (naming the file and the line) the file is missing or unreadable, empty or
            without pairs; a required column is missing; a row lacks a path or has more fields
            than the header; an id is repeated or not a safe folder name.
    """
    p = require_file(csv_path, "pairs file", "a CSV of pairs")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{p}: not a UTF-8 text file (expected a CSV of pairs)") from None
    except OSError as e:
        raise InputError(f"{p}: unreadable ({e.strerror or e})") from None
    expected = "a header line moving,fixed[,moving_seg][,id] and one row per pair"
    reader = csv.reader(StringIO(text))
    pairs: list[tuple[int, dict[str, str]]] = []
    try:
        header = next(reader, None)
        while header is not None and not any(h.strip() for h in header):
            header = next(reader, None)
        if header is None:
            raise InputError(f"{p}: empty; expected {expected}")
        names = [h.strip().lower() for h in header]
        repeated = sorted({n for n in names if n and names.count(n) > 1})
        if repeated:
            raise InputError(f"{p}: column {', '.join(repeated)} given twice")
        missing = [c for c in ("moving", "fixed") if c not in names]
        if missing:
            raise InputError(f"{p}: missing column {' and '.join(repr(c) for c in missing)} "
                             f"(header: {','.join(header)}); expected {expected}")
        unknown = [h for h, n in zip(header, names) if n not in _COLUMNS]
        if unknown:
            log.warning("%s: ignoring column %s (known: %s)", p, ", ".join(map(repr, unknown)),
                        ", ".join(_COLUMNS))
        for values in reader:
            if not any(v.strip() for v in values):
                continue
            if len(values) > len(names):
                raise InputError(f"{p} line {reader.line_num}: {len(values)} fields, the header "
                                 f"has {len(names)}")
            pairs.append((reader.line_num,
                          {n: v.strip() for n, v in zip(names, values) if n in _COLUMNS}))
    except csv.Error as e:
        raise InputError(f"{p} line {reader.line_num}: not a readable CSV ({e})") from None
    if not pairs:
        raise InputError(f"{p}: no pairs (a header but no rows); expected {expected}")

    def path(value: str) -> Path:  # absolute, ".." folded (as the summary shows it)
        return Path(os.path.abspath(p.parent / Path(value).expanduser()))

    rows, given = [], {}
    for line, row in pairs:
        for col in ("moving", "fixed"):
            if not row.get(col):
                raise InputError(f"{p} line {line}: no {col} path")
        pid = row.get("id", "")
        if pid:
            if not _SAFE_ID.match(pid) or pid == SUMMARY_NAME:
                raise InputError(f"{p} line {line}: id {pid!r} is not a safe folder name "
                                 f"(up to 100 letters, digits, '.', '_', '-', starting with a "
                                 f"letter or digit; not {SUMMARY_NAME!r})")
            if pid in given:
                raise InputError(f"{p} line {line}: id {pid!r} already used on line {given[pid]}"
                                 f" (ids name the output folders and must be unique)")
            given[pid] = line
        rows.append((pid, path(row["moving"]), path(row["fixed"]),
                     path(row["moving_seg"]) if row.get("moving_seg") else None))
    used = set(given)
    out = []
    for pid, mov, fix, seg in rows:
        if not pid:
            base = pid = f"{_safe(_stem(mov))}__{_safe(_stem(fix))}"
            k = 1
            while pid in used:
                k += 1
                pid = f"{base}-{k}"
            used.add(pid)
        out.append(Pair(pid, mov, fix, seg))
    return out


# ------------------------------------------------------------------------------------ summary
def _read_summary(path: Path) -> dict[str, dict[str, str]] | None:
    """Rows of an earlier summary by id ({} when there is none; None: not ours)."""
    if not path.exists():
        return {}
    try:
        rows = list(csv.reader(StringIO(path.read_text(encoding="utf-8"))))
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    if not rows or tuple(rows[0]) != SUMMARY_COLUMNS:
        return None
    return {r[0]: dict(zip(SUMMARY_COLUMNS, r)) for r in rows[1:] if len(r) == len(SUMMARY_COLUMNS)}


def _write_summary(path: Path, rows: Sequence[PairRow]) -> None:
    buf = StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SUMMARY_COLUMNS)
    w.writerows(r.csv_values() for r in rows)
    atomic_write_text(path, buf.getvalue(), overwrite=True)


def _number(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


# --------------------------------------------------------------------------- earlier results
def _resolved(path) -> str | None:
    return str(Path(path).resolve()) if path is not None else None


def _earlier_record(folder: Path, pair: Pair, registrar: Registrar) -> dict | None:
    """The ``register.json`` of a complete earlier result of this pair with these settings, or
    None when there is none (no or an unreadable record: the pair did not finish).

    Raises:
        OutputExistsError: the record is of other inputs or settings.
    """
    try:
        rec = json.loads((folder / OUTPUT_NAMES["record"]).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(rec, dict):
        return None
    io_cfg = (json.loads(json.dumps(dataclasses.asdict(registrar.io_config or IOConfig())))
              if registrar.io else None)
    ckpt = registrar.checkpoint
    now = {"moving": _resolved(pair.moving), "fixed": _resolved(pair.fixed),
           "moving_seg": _resolved(pair.moving_seg),
           "checkpoint": _resolved(checkpoint_stem(ckpt)) if ckpt is not None else None,
           "instance_optimisation": io_cfg, "affine": registrar.align != "none"}
    then = {**{k: rec.get(k) for k in now}, "affine": rec.get("affine") is not None}
    if isinstance(then["checkpoint"], str):
        then["checkpoint"] = _resolved(checkpoint_stem(Path(then["checkpoint"])))
    names = {"moving": "moving image", "fixed": "fixed image", "moving_seg": "moving label map",
             "checkpoint": "checkpoint", "instance_optimisation": "instance optimisation",
             "affine": "affine stage"}
    differ = [names[k] for k in now if now[k] != then[k]]
    if differ:
        raise OutputExistsError(f"{folder}: holds an earlier result with another "
                                f"{', '.join(differ)}; choose another folder or id")
    return rec


# ------------------------------------------------------------------------------------- driver
def register_pairs(pairs: Sequence[Pair] | str | os.PathLike, out: str | os.PathLike,
                   registrar: Registrar, overwrite: bool = False, progress: bool = False,
                   on_pair: Callable[[PairRow], None] | None = None) -> BatchResult:
    """Register every pair with one :class:`~mambamorph.register.Registrar` (module docstring).

    Each pair gets what :func:`mambamorph.register.register_files` writes, in ``out/<id>/``;
    ``out/summary.csv`` is rewritten after each pair. The network is loaded before the first
    pair (a bad checkpoint stops here, before any pair).

    Args:
        pairs: a pairs CSV (:func:`read_pairs`) or the pairs themselves.
        out: the output folder (created if missing).
        registrar: the settings and network every pair uses.
        overwrite: recompute pairs with a complete earlier result (default: skip them) and
            replace earlier results of other inputs or settings (default: such a pair fails).
        progress: show a tqdm bar (pairs done, ok / failed / skipped).
        on_pair: called with each pair's :class:`PairRow` once it is done (e.g. to print a
            failure).
    Returns:
        A :class:`BatchResult` (``str()``: counts, throughput and where the summary is).
    Raises:
        InputError: a bad pairs file; ``out`` is not a folder; a bad checkpoint.
        OutputExistsError: ``out/summary.csv`` exists and is not a summary of this command.
        WriteError: the folder or the summary cannot be written.
        KeyboardInterrupt: as raised; the summary then holds every pair finished before.
    """
    t0 = time.perf_counter()
    if not isinstance(pairs, Sequence) or isinstance(pairs, str):
        pairs = read_pairs(pairs)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder")
    summary = out_dir / SUMMARY_NAME
    earlier = _read_summary(summary)
    if earlier is None:
        raise OutputExistsError(f"{summary}: exists and is not a summary of register --pairs; "
                                f"choose another folder")
    registrar.load()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"{out_dir}: cannot create the output folder: {e.strerror or e}") from e

    rows: list[PairRow] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(pairs), desc="register", unit="pair", dynamic_ncols=True)
    try:
        from contextlib import nullcontext

        if bar is not None:
            from tqdm.contrib.logging import logging_redirect_tqdm
            redirect = logging_redirect_tqdm()
        else:
            redirect = nullcontext()
        with redirect:
            for pair in pairs:
                row = _one_pair(pair, out_dir / pair.id, registrar, overwrite,
                                earlier.get(pair.id),
                                lambda running: _write_summary(summary, [*rows, running]))
                rows.append(row)
                _write_summary(summary, rows)
                if on_pair is not None:
                    on_pair(row)
                if bar is not None:
                    bar.set_postfix(ok=sum(r.status == "ok" for r in rows),
                                    failed=sum(r.status == "failed" for r in rows),
                                    skipped=sum(r.status == "skipped" for r in rows),
                                    refresh=False)
                    bar.update()
    finally:
        if bar is not None:
            bar.close()
    return BatchResult(out_dir=out_dir, summary=summary, rows=rows,
                       seconds=time.perf_counter() - t0, network_loads=registrar.loads)


def _one_pair(pair: Pair, folder: Path, registrar: Registrar, overwrite: bool,
              earlier_row: dict[str, str] | None,
              starting: Callable[[PairRow], None]) -> PairRow:
    """Register one pair into ``folder`` (or find it done): its summary row. ``starting`` is
    called with a ``running`` row just before the registration starts."""
    names = {"id": pair.id, "moving": str(pair.moving), "fixed": str(pair.fixed)}
    t0 = time.perf_counter()

    def failed(e: MambaMorphError) -> PairRow:
        log.debug("pair %s failed", pair.id, exc_info=True)
        return PairRow(**names, status="failed", seconds=time.perf_counter() - t0,
                       error=str(e), exception=e)

    try:
        rec = None if overwrite else _earlier_record(folder, pair, registrar)
    except MambaMorphError as e:
        return failed(e)
    if rec is not None:
        same = earlier_row is not None and all(earlier_row.get(k) == v for k, v in names.items())
        return PairRow(**names, status="skipped",
                       seconds=_number(str(rec.get("seconds_total", ""))),
                       folding_percent=_number(str(rec.get("folding_percent", ""))),
                       sdlogj=_number(earlier_row.get("sdlogj")) if same else math.nan)
    # partial outputs are replaced only where this command left them: a run killed while this
    # pair was running (its summary row says so); anything else needs ``overwrite``
    left_by_us = earlier_row is not None and earlier_row.get("status") == "running"
    starting(PairRow(**names, status="running"))
    try:
        res = registrar.register(pair.moving, pair.fixed, folder, moving_seg=pair.moving_seg,
                                 overwrite=overwrite or left_by_us)
    except MambaMorphError as e:
        return failed(e)
    return PairRow(**names, status="ok", seconds=res.seconds_total,
                   folding_percent=res.folding_percent, sdlogj=res.sdlogj)
