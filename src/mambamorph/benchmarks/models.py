"""Model inference benchmark: time per pair and peak memory of each registered model on random
inputs at a given grid. Prints figures, never pass/fail; measured figures: docs/results.md.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from mambamorph.models import build_model, count_parameters, predict
from mambamorph.runtime import GB, Timer, describe_device, peak_memory, warmup_crop

__all__ = ["GRIDS", "ModelBenchRow", "bench_model", "TABLE_HEADER"]

#: the two grids of the paper's setting: the CPU preset (2 mm) and full size (1 mm).
GRIDS = {"cpu": (96, 112, 96), "full": (176, 208, 192)}

TABLE_HEADER = ("| model | grid | params | s / pair | peak GB | device |",
                "|---|---|---|---|---|---|")


@dataclass
class ModelBenchRow:
    """One row of the model table: ``seconds`` per pair, ``peak_gb`` in GB (1e9 bytes), of
    ``memory_kind`` (``"CPU RSS"`` or ``"GPU allocated"``, see
    :func:`mambamorph.runtime.peak_memory`)."""

    model: str
    grid: tuple[int, int, int]
    params: int
    seconds: float
    peak_gb: float
    device: str
    memory_kind: str = "CPU RSS"

    def as_markdown(self) -> str:
        g = "x".join(map(str, self.grid))
        return (f"| {self.model} | {g} | {self.params:,} | {self.seconds:.2f} | "
                f"{self.peak_gb:.2f} | {self.device} |")


def _model_runner(name: str, device: torch.device):
    """``run(moving, fixed) -> flow`` of a freshly built ``name`` (random weights) on ``device``
    (a module-level function, so that :func:`mambamorph.runtime.peak_memory` can rebuild it in
    a fresh process)."""
    model = build_model(name).to(device).eval()

    @torch.no_grad()
    def run(moving, fixed):
        return predict(model, moving, fixed).flow

    return run


@torch.no_grad()
def bench_model(name: str, grid: tuple[int, int, int], device: torch.device,
                repeat: int = 1) -> ModelBenchRow:
    """Inference time per pair and peak memory of model ``name`` on random inputs.

    Args:
        name: registry name.
        grid: ``(D0, D1, D2)`` of the pair (dims divisible by 16).
        device: where it runs.
        repeat: timed passes (the fastest is kept).
    Returns:
        A :class:`ModelBenchRow`: seconds per pair (device-synchronised, after a warm-up pass:
        at 32^3 on a CPU, at ``grid`` on a GPU for cuDNN autotuning) and the peak memory of one
        pass in GB, measured by :func:`mambamorph.runtime.peak_memory` (the function
        ``mambamorph evaluate`` uses: CUDA memory allocated on a GPU; on a CPU the growth of the
        resident set in a fresh process).
    """
    mov = torch.rand(1, 1, *grid, device=device)  # (1, 1, D0, D1, D2)
    fix = torch.rand(1, 1, *grid, device=device)
    warm = (mov, fix) if device.type == "cuda" else (warmup_crop(mov), warmup_crop(fix))
    peak, kind = peak_memory(functools.partial(_model_runner, name), (mov, fix), device,
                             warmup_args=warm)
    model = build_model(name).to(device).eval()
    predict(model, *warm)
    times = []
    for _ in range(repeat):
        with Timer(device) as t:
            predict(model, mov, fix)
        times.append(t.seconds)
    return ModelBenchRow(name, tuple(grid), count_parameters(model), min(times), peak / GB,
                         describe_device(device), kind)
