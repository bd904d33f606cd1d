"""Benchmarks that print figures (never pass/fail): model inference time and peak memory per
grid (:mod:`~mambamorph.benchmarks.models`) and the selective-scan paths at stage-0 length
(:mod:`~mambamorph.benchmarks.scan`). ``mambamorph bench`` and ``bench/*.py`` call these.
Measured figures: docs/results.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from mambamorph.benchmarks.models import GRIDS, TABLE_HEADER, ModelBenchRow, bench_model
from mambamorph.runtime import describe_device, resolve_device

__all__ = ["GRIDS", "ModelBenchRow", "bench_model", "run_bench"]

#: the grid of ``quick`` runs (a smoke run, seconds).
QUICK_GRID = (64, 64, 64)


def run_bench(quick: bool = False, models: list[str] | None = None,
              sizes: list[str] | None = None, device: str = "auto", out: str | None = None,
              printer: Callable[[str], None] = print) -> list[ModelBenchRow]:
    """Time every model (or ``models``) at the CPU preset and full size, then the scan paths.

    Args:
        quick: a 64x64x64 grid and short scans (a smoke run, seconds).
        models: registry names (default: all).
        sizes: keys of :data:`GRIDS` (default: both).
        device: ``auto``, ``cpu``, ``cuda[:i]``.
        out: also write the model table (Markdown rows) to this file (replaced if present).
        printer: where the lines go.
    Returns:
        The model rows that ran (a model that fails, e.g. out of memory, prints a row saying so).
    Raises:
        InputError: an unknown or unavailable device, an unknown model name.
    """
    from mambamorph.benchmarks.scan import scan_table
    from mambamorph.models import list_models

    dev = resolve_device(device)
    names = models or list_models()
    grids = [QUICK_GRID] if quick else [GRIDS[s] for s in (sizes or ["cpu", "full"])]
    printer(f"# model inference, {describe_device(dev)}, torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d')}")
    for line in TABLE_HEADER:
        printer(line)
    rows = []
    for grid in grids:
        for name in names:
            try:
                row = bench_model(name, grid, dev)
            except (RuntimeError, MemoryError) as e:  # out of memory at full size, say so
                printer(f"| {name} | {'x'.join(map(str, grid))} | - | failed: "
                        f"{str(e).splitlines()[0][:60]} | - | {dev} |")
                continue
            rows.append(row)
            printer(row.as_markdown())
    lengths = [2001] if quick else [24 * 28 * 24, 44 * 52 * 48]
    for line in scan_table(lengths, device=dev, quick=quick):
        printer(line)
    if out:
        from mambamorph.io import atomic_write_text

        atomic_write_text(out, "\n".join(r.as_markdown() for r in rows) + "\n", overwrite=True)
    return rows
