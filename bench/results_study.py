"""The results study: every model, one recipe, one budget, the same held-out phantom test pairs.

    python bench/results_study.py --out runs/study [--minutes 8] [--pairs 10] [--models ...]

1. builds the phantom at the CPU preset (60 subjects, seed 0) in ``OUT/data`` unless ``--data``
   names one;
2. trains each model with the recipe in ``--config`` (default ``configs/phantom-study.yaml``)
   for the same wall-clock budget (``--minutes``) and seed, whole volumes, on this machine's
   CPU threads (a model whose run folder already holds a best checkpoint is reused, so an
   interrupted study resumes where it stopped; ``--overwrite`` retrains);
3. evaluates every best checkpoint, the identity ("Initial") and, when ``antspyx`` is installed,
   ANTs SyN with a mutual-information metric, on the same ``--pairs`` test pairs
   (``mambamorph evaluate``); tables and figures go to ``OUT/eval``;
4. writes ``OUT/training.md`` (steps reached, seconds per step, best validation Dice) and prints
   both tables.

It prints figures; it never passes or fails on them. Measured results: docs/results.md.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import math
import sys
import time
from pathlib import Path

ALL_MODELS = ("mambamorph", "mambamorph-reg", "voxelmorph", "voxelmorph-feat", "transmorph",
              "transmorph-feat", "xmorpher")
REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="study folder (data, runs, eval)")
    ap.add_argument("--data", help="an existing phantom folder (default: build OUT/data)")
    ap.add_argument("--config", default=str(REPO / "configs" / "phantom-study.yaml"))
    ap.add_argument("--models", nargs="+", default=list(ALL_MODELS))
    ap.add_argument("--minutes", type=float, default=8.0, help="training budget per model")
    ap.add_argument("--pairs", type=int, default=10, help="test pairs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-ants", action="store_true", help="leave out ANTs SyN")
    ap.add_argument("--overwrite", action="store_true", help="retrain and re-evaluate")
    args = ap.parse_args(argv)

    from mambamorph.config import load_train_config
    from mambamorph.data.phantom import build_phantom
    from mambamorph.errors import MambaMorphError
    from mambamorph.evaluation import run_evaluation
    from mambamorph.io import atomic_write_text
    from mambamorph.train import train

    out = Path(args.out)
    data = Path(args.data) if args.data else out / "data"
    try:
        if not (data / "split.json").exists():
            if args.data:
                raise MambaMorphError(f"{data}: not a phantom/SR-Reg folder (no split.json)")
            print(f"building the phantom (CPU preset, 60 subjects, seed {args.seed}) in {data}")
            print(build_phantom(data, n_subjects=60, preset="cpu", seed=args.seed).summary())

        rows = []
        checkpoints = []
        for name in args.models:
            run = out / "runs" / name
            best = run / "checkpoints" / "best.json"
            if best.exists() and not args.overwrite:
                print(f"{name}: reusing {best}")
            else:
                cfg = load_train_config(args.config, {
                    "model": name, "data.root": str(data), "seed": args.seed, "epochs": 10**6,
                    "max_minutes": args.minutes, "threads": args.threads, "device": "cpu"})
                print(f"{name}: training for {args.minutes:g} min ({args.config})")
                t0 = time.time()
                res = train(cfg, run, overwrite=True, progress=True)
                print(f"{name}: {res.steps} steps in {time.time() - t0:.0f} s, best validation "
                      f"Dice {res.best_score:.2f}")
            rows.append(_training_row(name, run))
            checkpoints.append(best)

        table = ["| model | steps | minutes | s / step | best validation Dice (step) |",
                 "|---|---|---|---|---|"] + rows
        atomic_write_text(out / "training.md",
                          f"Training: {args.config}, {args.minutes:g} min per model, seed "
                          f"{args.seed}, data {data}\n\n" + "\n".join(table) + "\n",
                          overwrite=True)
        print("\n".join(table))

        ants = not args.no_ants and importlib.util.find_spec("ants") is not None
        if not ants and not args.no_ants:
            print('ANTs SyN left out: antspyx is not installed (pip install "mambamorph[ants]")')
        result = run_evaluation(checkpoints=[str(c) for c in checkpoints], data_root=str(data),
                                n_pairs=args.pairs, seed=args.seed, out_dir=str(out / "eval"),
                                device="cpu", identity=True, ants=ants, overwrite=True)
        print(result)
    except MambaMorphError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _training_row(name: str, run: Path) -> str:
    """One Markdown row from a run folder's log.csv."""
    steps, seconds, best, best_step = 0, 0.0, float("nan"), 0
    with open(run / "log.csv", newline="") as f:
        for r in csv.DictReader(f):
            steps = max(steps, int(r["step"]))
            seconds = max(seconds, float(r["seconds"] or 0.0))
            if r["val_dice"] and (math.isnan(best) or float(r["val_dice"]) > best):
                best, best_step = float(r["val_dice"]), int(r["step"])
    per = seconds / steps if steps else float("nan")
    return f"| {name} | {steps} | {seconds / 60:.1f} | {per:.2f} | {best:.2f} ({best_step}) |"


if __name__ == "__main__":
    sys.exit(main())
