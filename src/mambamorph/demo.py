"""``mambamorph demo``: the whole product on this machine, end to end, with no download.

1. builds the phantom MR/CT dataset at the CPU preset (2 mm, 96x112x96) in ``OUT/data``;
2. trains ``mambamorph`` and ``voxelmorph`` on its training split for a fixed number of steps
   (each capped in wall-clock time), each starting from the phantom weights shipped inside the package (trained longer by
   ``mambamorph train``; see docs/weights.md) when they exist;
3. evaluates both and the identity ("Initial") on the held-out test pairs and writes the tables
   and figures to ``OUT/eval``, printing the table.

``quick=True`` is a minutes-long smoke version (small grid, few subjects, a few steps) for CI.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from mambamorph.checkpoint import shipped_weights
from mambamorph.config import DataConfig, TrainConfig

log = logging.getLogger(__name__)

DEMO_MODELS = ("mambamorph", "voxelmorph")


@dataclass(frozen=True)
class DemoRecipe:
    """Settings of one demo flavour (the full demo or the CI-sized quick one)."""

    subjects: int
    grid: tuple[int, int, int] | None  # None = the CPU preset grid
    steps: dict[str, int]               # training steps per model ...
    minutes: dict[str, float]           # ... unless this wall-clock cap comes first
    lr: float
    steps_per_epoch: int
    val_pairs: int
    test_pairs: int


# Full demo: about 40 mambamorph steps (~9 s each) and 100 voxelmorph steps (~2 s each) on
# 2 CPU cores, each capped in time so the whole demo stays under 20 minutes.
FULL = DemoRecipe(subjects=60, grid=None, steps={"mambamorph": 40, "voxelmorph": 100},
                  minutes={"mambamorph": 7.0, "voxelmorph": 4.0}, lr=1e-4, steps_per_epoch=20,
                  val_pairs=4, test_pairs=10)
QUICK = DemoRecipe(subjects=6, grid=(48, 64, 48), steps={"mambamorph": 2, "voxelmorph": 2},
                   minutes={"mambamorph": 2.0, "voxelmorph": 2.0}, lr=1e-4, steps_per_epoch=1,
                   val_pairs=1, test_pairs=2)


def _phantom_matches(data_dir: Path, recipe: DemoRecipe) -> bool:
    """True when ``data_dir`` holds a complete phantom built for this recipe (reused)."""
    import json

    try:
        info = json.loads((data_dir / "phantom.json").read_text())
    except (OSError, ValueError):
        return False
    from mambamorph.data.phantom import PRESETS

    grid = list(recipe.grid or PRESETS["cpu"][0])
    return ((data_dir / "split.json").exists() and info.get("grid") == grid
            and info.get("n_subjects", len(info.get("subjects", []))) == recipe.subjects)


def run_demo(out: str | Path = "mambamorph-demo", minutes: float | None = None,
             quick: bool = False, overwrite: bool = False, progress: bool = True,
             threads: int | None = None, from_scratch: bool = False, printer=print):
    """Run the demo; returns the :class:`mambamorph.evaluation.EvalResult` of the test pairs.

    Args:
        out: run folder; an existing non-empty folder is refused unless ``overwrite`` (a phantom
            already built there by an earlier demo is reused).
        minutes: training budget per model, overriding the recipe's.
        quick: the CI-sized version.
        from_scratch: ignore the shipped phantom weights (train from random initialisation).
    """
    from mambamorph.data.phantom import build_phantom
    from mambamorph.evaluation import run_evaluation
    from mambamorph.io import prepare_output_dir
    from mambamorph.train import train

    recipe = QUICK if quick else FULL
    out = Path(out)
    data_dir = out / "data"
    runs = out / "runs"
    eval_dir = out / "eval"
    # an earlier demo's files are replaced one by one as they are written (its phantom reused)
    prepare_output_dir(out, overwrite=overwrite, what="demo folder")
    t0 = time.time()
    if not _phantom_matches(data_dir, recipe):
        printer(f"[1/3] building the phantom dataset ({recipe.subjects} subjects) in {data_dir}")
        rep = build_phantom(data_dir, n_subjects=recipe.subjects, preset="cpu",
                            grid=recipe.grid, seed=0, overwrite=True)
        printer(f"      {rep.summary() if hasattr(rep, 'summary') else rep}")
    else:
        printer(f"[1/3] reusing the phantom dataset in {data_dir}")

    checkpoints = []
    for name in DEMO_MODELS:
        init = None if from_scratch else shipped_weights(name)
        budget = minutes if minutes is not None else recipe.minutes[name]
        what = f"{budget:g} min" if minutes is not None else \
            f"{recipe.steps[name]} steps (at most {budget:g} min)"
        printer(f"[2/3] training {name} for {what} "
                f"({'from the shipped phantom weights' if init else 'from scratch'})")
        steps = recipe.steps[name] if minutes is None else 10**9  # --minutes: time only
        cfg = TrainConfig(model=name, data=DataConfig(root=str(data_dir)), lr=recipe.lr,
                          epochs=max(1, steps // recipe.steps_per_epoch),
                          steps_per_epoch=min(steps, recipe.steps_per_epoch),
                          val_pairs=recipe.val_pairs, seed=0, device="cpu",
                          init=str(init) if init else None, max_minutes=budget, threads=threads)
        res = train(cfg, runs / name, overwrite=True, progress=progress)
        best = runs / name / "checkpoints" / "best.json"
        checkpoints.append(best if best.exists() else runs / name / "checkpoints" / "last.json")
        printer(f"      {res.steps} steps, validation Dice {res.last_val_dice:.2f} "
                f"(best {res.best_score:.2f})")

    printer(f"[3/3] evaluating on {recipe.test_pairs} held-out test pairs")
    summary = run_evaluation(checkpoints=[str(c) for c in checkpoints], data_root=str(data_dir),
                             n_pairs=recipe.test_pairs, seed=0, out_dir=str(eval_dir),
                             device="cpu", identity=True, overwrite=True, progress=progress)
    printer(summary)
    printer(f"demo finished in {(time.time() - t0) / 60:.1f} min; tables and figures in {eval_dir}")
    return summary
