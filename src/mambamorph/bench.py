"""Benchmarks that print figures (never pass/fail): model inference time and peak memory per
grid, and the selective-scan paths at stage-0 length. ``mambamorph bench`` and ``bench/*.py``
call these functions.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from mambamorph.models import build_model, count_parameters, list_models, predict
from mambamorph.runtime import PeakMemory, Timer, describe_device, resolve_device

log = logging.getLogger(__name__)

GRIDS = {"cpu": (96, 112, 96), "full": (176, 208, 192)}


@dataclass
class ModelBenchRow:
    model: str
    grid: tuple[int, int, int]
    params: int
    seconds: float
    peak_mb: float
    device: str

    def as_markdown(self) -> str:
        g = "x".join(map(str, self.grid))
        return (f"| {self.model} | {g} | {self.params:,} | {self.seconds:.2f} | "
                f"{self.peak_mb:,.0f} | {self.device} |")


@torch.no_grad()
def bench_model(name: str, grid: tuple[int, int, int], device: torch.device,
                repeat: int = 1) -> ModelBenchRow:
    """Inference time per pair (s, device-synchronised, after a warm-up) and peak memory (MB).

    Peak memory is CUDA ``max_memory_allocated`` on GPU and the peak resident set above the
    starting one on CPU. The warm-up runs at 32^3 on CPU (compiles kernels) and at ``grid`` on
    GPU (cuDNN autotuning).
    """

    model = build_model(name).to(device).eval()
    warm = grid if device.type == "cuda" else (32, 32, 32)
    x = torch.rand(1, 1, *warm, device=device)
    predict(model, x, x)
    mov = torch.rand(1, 1, *grid, device=device)
    fix = torch.rand(1, 1, *grid, device=device)
    times = []
    with PeakMemory(device) as mem:
        for _ in range(repeat):
            with Timer(device) as t:
                predict(model, mov, fix)
            times.append(t.seconds)
    return ModelBenchRow(name, tuple(grid), count_parameters(model), min(times),
                         mem.peak_bytes / 2**20, describe_device(device))


def run_bench(quick: bool = False, models: list[str] | None = None,
              sizes: list[str] | None = None, device: str = "auto", out: str | None = None,
              printer=print) -> list[ModelBenchRow]:
    """Time every model (or ``models``) at the CPU preset and full size, then the scan paths.

    ``quick`` uses a 64x64x64 grid and short scans (a smoke run, seconds).
    """

    dev = resolve_device(device)
    names = models or list_models()
    grids = [(64, 64, 64)] if quick else [GRIDS[s] for s in (sizes or ["cpu", "full"])]
    printer(f"# model inference, {describe_device(dev)}, torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d')}")
    printer("| model | grid | params | s / pair | peak MB | device |")
    printer("|---|---|---|---|---|---|")
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
    from mambamorph.nn.ssm.bench import scan_table
    lengths = [2001] if quick else [24 * 28 * 24, 44 * 52 * 48]
    for line in scan_table(lengths, device=dev, quick=quick):
        printer(line)
    if out:
        from pathlib import Path
        Path(out).write_text("\n".join(r.as_markdown() for r in rows) + "\n")
    return rows
